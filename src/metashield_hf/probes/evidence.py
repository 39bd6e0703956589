"""`LiveEvidence`: the live probes of one target, fitted on its clean samples, as fixed-length features per input.

Each probe's raw statistics are given three ways, so that their meaning does not depend on the model: the value, its
z-score against the clean samples' values, and its mid-rank percentile among them (the clean samples' own rows are
scored leave-one-out). The width ``3 · Σ statistics`` depends only on the probes chosen, never on the model.

Example:
    ```python
    >>> evidence = LiveEvidence(probe_passes=16, seed=0).fit(target, clean_inputs)
    >>> evidence(test_inputs).shape          # (B, len(evidence.feature_names))
    >>> evidence.extra_passes                # forward passes per input beyond the ordinary one
    ```
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ..targets.base import TargetAdapter, TargetOutput
from .base import PROBES, Probe, eval_mode

__all__ = ["DEFAULT_PROBES", "DEFAULT_PROBE_PASSES", "LiveEvidence", "standardise_against"]

DEFAULT_PROBES: tuple[str, ...] = ("trajectory", "parameter_amplification", "superimposition", "input_amplification")
DEFAULT_PROBE_PASSES = 16
_Z_MAX = 50.0


def standardise_against(values: np.ndarray, reference: np.ndarray, *, leave_one_out: bool = False) -> np.ndarray:
    """``(B, S)`` values → ``(B, 3S)``: each statistic, its z-score and its mid-rank percentile against ``reference``.

    ``leave_one_out``: ``values`` is ``reference`` itself, and row ``i`` is compared with the other rows only.
    """
    b, s = values.shape
    out = np.empty((b, 3 * s))
    for j in range(s):
        v, ref = values[:, j], reference[:, j]
        if leave_one_out:
            others = np.array([np.delete(ref, i) for i in range(b)])  # (B, N-1)
        else:
            others = np.broadcast_to(ref, (b, len(ref)))
        mu, sd = others.mean(1), others.std(1)
        scale = np.maximum(sd, 1e-3 * np.abs(mu) + 1e-6)
        z = np.clip((v - mu) / scale, -_Z_MAX, _Z_MAX)
        rank = (others < v[:, None]).mean(1) + 0.5 * (others == v[:, None]).mean(1)
        out[:, 3 * j : 3 * j + 3] = np.stack([v, z, rank], 1)
    return out


class LiveEvidence:
    """The live probes of one target (the layer trajectory and the perturbation probes) under a pass budget.

    Args:
        probes: probe names, in order (``()``: no live evidence, the one-pass detector).
        probe_passes: the most extra forward passes per input all probes together may spend (default 16).
        passes: per-probe passes overriding the defaults, e.g. ``{"superimposition": 8}``.
        options: per-probe constructor options, e.g. ``{"parameter_amplification": {"factor": 2.0}}``.
        seed: seeds every probe.

    Raises:
        KeyError: an unknown probe (the message lists the available ones).
        ValueError: probes that need more passes than the budget, or a repeated probe.
    """

    def __init__(
        self,
        probes: Sequence[str] = DEFAULT_PROBES,
        *,
        probe_passes: int = DEFAULT_PROBE_PASSES,
        passes: dict[str, int] | None = None,
        options: dict[str, dict] | None = None,
        seed: int = 0,
    ):
        probes = tuple(probes)
        if len(set(probes)) != len(probes):
            raise ValueError(f"probes {probes} name one more than once; list each once")
        if not isinstance(probe_passes, int) or probe_passes < 0:
            raise ValueError(f"probe_passes must be a non-negative int, got {probe_passes!r}")
        passes, options = dict(passes or {}), dict(options or {})
        unknown = (set(passes) | set(options)) - set(probes)
        if unknown:
            raise ValueError(f"passes= / options= name probes that are not selected: {sorted(unknown)}")
        self.probes: list[Probe] = [
            PROBES.build(n, passes=passes.get(n), seed=seed, **options.get(n, {})) for n in probes
        ]
        need = {p.name: p.passes for p in self.probes}
        if sum(need.values()) > probe_passes:
            raise ValueError(
                f"the probes need {sum(need.values())} extra forward passes per input ({need}) but probe_passes is "
                f"{probe_passes}; raise probe_passes, lower passes= (each probe's minimum: "
                f"{ {p.name: p.min_passes for p in self.probes} }) or drop probes"
            )
        self.probe_passes, self.seed = probe_passes, seed
        self.adapter: TargetAdapter | None = None
        self._support: np.ndarray | None = None
        self.seconds: dict[str, float] = dict.fromkeys(self.names, 0.0)  # wall time per probe (fit + scoring)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.probes)

    @property
    def statistic_names(self) -> list[str]:
        return [f"{p.name}.{s}" for p in self.probes for s in p.names]

    @property
    def feature_names(self) -> list[str]:
        """``probe.statistic``, ``…_z`` and ``…_rank`` of every statistic, in output order."""
        return [f"{n}{suffix}" for n in self.statistic_names for suffix in ("", "_z", "_rank")]

    @property
    def needs_layers(self) -> bool:
        return any(p.needs_layers for p in self.probes)

    @property
    def extra_passes(self) -> int:
        """Forward passes per input beyond the ordinary one, for the fitted target's modality."""
        if self.adapter is None:
            return sum(p.passes for p in self.probes)
        return sum(p.passes for p in self.probes if p.applies)

    def fit(
        self, adapter: TargetAdapter, clean_inputs, out: TargetOutput | None = None, *, support: bool = True
    ) -> LiveEvidence:
        """Fit every probe on the clean inputs of ``adapter``'s model (put in ``eval()`` mode, restored after).

        Args:
            out: the target's outputs on the clean inputs already computed, as in [`statistics`].
            support: also compute the clean inputs' own statistics now (what the detector's features compare with);
                a baseline that only scores new inputs passes ``False`` and never pays for them.
        """
        self.adapter = adapter
        items = adapter.prepare_items(clean_inputs)
        if len(items) < 3:
            raise ValueError(f"live evidence needs at least 3 clean inputs, got {len(items)}")
        self._support, self._n_support = None, len(items)
        self._each_probe(items, out, lambda p, out: p.fit(adapter, items, out))
        if support:
            self.support_statistics  # noqa: B018  (computed and kept: a failing probe fails here, at fit)
        return self

    def _each_probe(self, items: list, out: TargetOutput | None, call) -> list:
        """``call(probe, out)`` for every probe in eval mode, timed per probe; ``out`` computed when not given."""
        results = []
        with eval_mode(self.adapter.model):
            if out is None:
                out = self.adapter(items, layers=self.needs_layers)
            elif len(out) != len(items) or (self.needs_layers and not out.layers):
                raise ValueError(f"out must hold the {len(items)} inputs' outputs with layers={self.needs_layers}")
            for p in self.probes:
                t0 = time.perf_counter()
                results.append(call(p, out))
                self.seconds[p.name] += time.perf_counter() - t0
        return results

    @staticmethod
    def _stack(blocks: list[np.ndarray], n: int) -> np.ndarray:
        return np.concatenate(blocks, 1) if blocks else np.zeros((n, 0))

    @property
    def support_statistics(self) -> np.ndarray:
        """``(N, S)`` statistics of the clean inputs themselves (leave-one-out where a probe draws on them), computed
        once (at [`fit`] unless it was told not to)."""
        if self.adapter is None:
            raise RuntimeError("LiveEvidence is not fitted: call .fit(adapter, clean_inputs) first")
        if self._support is None:
            blocks = []
            with eval_mode(self.adapter.model):
                for p in self.probes:
                    t0 = time.perf_counter()
                    blocks.append(p.support_statistics())
                    self.seconds[p.name] += time.perf_counter() - t0
            self._support = self._stack(blocks, self._n_support)
        return self._support

    def statistics(self, inputs, out: TargetOutput | None = None) -> np.ndarray:
        """``(B, S)`` raw statistics of raw inputs (``statistic_names`` order).

        ``out``: the target's outputs on ``inputs`` already computed (from their prepared items, with ``layers`` when
        a probe reads them), to save the ordinary pass.
        """
        if self.adapter is None:
            raise RuntimeError("LiveEvidence is not fitted: call .fit(adapter, clean_inputs) first")
        items = self.adapter.prepare_items(inputs)
        return self._stack(self._each_probe(items, out, lambda p, out: p.statistics(items, out)), len(items))

    def features(self, inputs, out: TargetOutput | None = None) -> torch.Tensor:
        """``(B, F)`` float32 features of raw inputs (``feature_names`` order); ``out`` as in [`statistics`]."""
        return torch.from_numpy(standardise_against(self.statistics(inputs, out), self.support_statistics)).float()

    __call__ = features

    def support_features(self) -> torch.Tensor:
        """``(N, F)`` features of the clean inputs themselves, each against the others."""
        s = self.support_statistics
        return torch.from_numpy(standardise_against(s, s, leave_one_out=True)).float()

    def __repr__(self) -> str:
        return f"LiveEvidence(probes={self.names}, probe_passes={self.probe_passes}, seed={self.seed})"
