"""ψ group ``consistency``: how stable the prediction is when the *model* is perturbed at its last layer.

A trigger drives the penultimate activation deep into its target class's region, so the prediction survives dropout
at the penultimate layer and noise on the head's weights better than a clean input's (cf. input-perturbation
defences such as [STRIP, Gao et al. 2019](https://arxiv.org/abs/1902.06531); here the model, not the input, is
perturbed, so the group needs no knowledge of the input domain). Dropout as model perturbation:
[Gal & Ghahramani 2016](https://arxiv.org/abs/1506.02142).

The ``M`` perturbed heads are drawn once per call from the group's seeded generator and shared by the whole batch,
so an input's features do not depend on the batch it came in, and one GEMM ``(B, D) × (D, M·C)`` scores them all.
Weight noise is drawn directly in logit space, where it has the same distribution for each input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import FEATURE_GROUPS, FeatureGroup
from .reference import Reference

__all__ = ["ConsistencyGroup"]


def _pct(x: float) -> str:
    return f"{round(100 * x):02d}"


class ConsistencyGroup(FeatureGroup):
    """Prediction consistency under dropout at the penultimate layer and Gaussian noise on the head weights.

    Features (for each dropout rate ``p`` and relative noise ``σ``; ``M`` draws each):
        - ``keep_pXX``: fraction of dropout masks (inverted dropout, rate ``p``) on the penultimate activation under
          which ``head`` keeps the original argmax;
        - ``drop_pXX``: mean drop of the original class's softmax probability under those masks;
        - ``keep_noiseXX``: fraction of heads ``W + σ·rms(W)·ε`` (``ε`` standard normal) that keep the argmax.

    Without a head (``ref.head_weight is None``) every ``keep`` is 0.5 and every ``drop`` 0 (uninformative, finite).

    Args:
        dropout: dropout rates.
        noise: relative standard deviations of the weight noise.
        draws: perturbations per rate (``M``).
    """

    def __init__(
        self, dropout: Sequence[float] = (0.1, 0.3, 0.5), noise: Sequence[float] = (0.1, 0.3), draws: int = 16
    ):
        if not all(0.0 < p < 1.0 for p in dropout):
            raise ValueError(f"dropout rates must lie in (0, 1), got {tuple(dropout)}")
        if not all(s > 0.0 for s in noise):
            raise ValueError(f"noise levels must be > 0, got {tuple(noise)}")
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.dropout = tuple(float(p) for p in dropout)
        self.noise = tuple(float(s) for s in noise)
        self.draws = int(draws)
        self.names = (
            *(f"keep_p{_pct(p)}" for p in self.dropout),
            *(f"drop_p{_pct(p)}" for p in self.dropout),
            *(f"keep_noise{_pct(s)}" for s in self.noise),
        )

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        b = penultimate.shape[0]
        n_drop, n_noise = len(self.dropout), len(self.noise)
        if ref.head_weight is None:
            neutral = [0.5] * n_drop + [0.0] * n_drop + [0.5] * n_noise
            return torch.tensor(neutral, dtype=torch.float64).expand(b, -1).clone()
        h = penultimate.double()
        w = ref.head_weight.double()  # (C, D)
        bias = ref.head_bias.double() if ref.head_bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        c, d = w.shape
        m = self.draws
        base = h @ w.T + bias
        orig = base.argmax(1)
        p_orig = base.softmax(1).gather(1, orig[:, None])

        # Dropping unit j of h == zeroing column j of W: all masked heads in one (B, D) x (D, R*M*C) GEMM, in
        # float32 (the argmax is what counts; float64 would double the cost of the largest step of ψ).
        masks = torch.cat([(torch.rand(m, d, generator=generator) >= p).float() / (1.0 - p) for p in self.dropout])
        heads = (masks[:, None, :] * ref.head_weight[None]).reshape(-1, d)  # (R*M*C, D)
        dropped = (h.float() @ heads.T).double().reshape(b, n_drop, m, c) + bias
        kept_drop = (dropped.argmax(-1) == orig[:, None, None]).double().mean(-1)
        prob = dropped.softmax(-1).gather(-1, orig[:, None, None, None].expand(b, n_drop, m, 1))[..., 0]
        drop = (p_orig[:, :, None] - prob).mean(-1)

        # W + σ·rms(W)·ε changes logit c by σ·rms(W)·(ε h)_c ~ N(0, (σ·rms(W)·|h|)²), independently over c: drawing
        # that directly is exact in distribution for each input and costs O(B·M·C) instead of O(B·M·C·D).
        rms = w.pow(2).mean().sqrt()
        scale = (
            torch.tensor(self.noise, dtype=torch.float64)[None, :, None, None]
            * rms
            * h.norm(dim=1)[:, None, None, None]
        )
        eps = torch.randn(n_noise, m, c, generator=generator, dtype=torch.float64)
        noised = base[:, None, None, :] + scale * eps[None]
        kept_noise = (noised.argmax(-1) == orig[:, None, None]).double().mean(-1)
        return torch.cat([kept_drop, drop, kept_noise], 1)


FEATURE_GROUPS.register("consistency")(ConsistencyGroup())
