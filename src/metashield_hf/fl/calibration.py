"""A client-update screen calibrated against the server's own benign rounds.

The relative screen of [`score_client_updates`] compares the clients of one round with each other and flags a robust
z-score above a fixed threshold. Its null distribution is unknown: with a handful of clients per round the median
and MAD are noisy, a client whose labels lean towards one class moves that class as a trigger would, and a fixed z
sets no false-positive rate. This module replaces the fixed threshold with a calibration the server fills on rounds
it trusts (the warm-up rounds before screening starts, or the first rounds of a deployment):

1. **Evidence per client and class** ([`client_evidence`]): for every candidate model ``global + Δk`` and every class
   ``c``, trigger-agnostic numbers that a backdoor moves for its target class:

   - ``margin_gain``: the log of the data-free maximum logit margin of class ``c`` (MM-BD, [`max_margins`]) in the
     candidate minus the same in the global model. A backdoor teaches a shortcut that overrides the rest of the
     input, so its target class admits a larger margin than before, whatever the trigger's shape; a benign update
     mostly sharpens existing routes a little;
   - ``trigger_drift``: ``1 − cos`` between the candidate's synthesized trigger mask for ``c`` and the global model's
     (the scan's per-class trigger synthesis). A backdoor opens a new route to its target and the mask moves to it;
   - ``point_margin_gain``: the candidate's logit margin of class ``c`` at the global model's own maximum-margin input
     for ``c`` minus the global model's margin there. Nothing is re-optimised per candidate, so the number carries no
     optimisation noise and is nearly free (one forward pass per candidate); once the global model holds part of a
     backdoor its maximum-margin input for the target class carries the trigger, and an update that strengthens the
     backdoor raises the margin there, however small its norm.

   Each number is centred twice: on its candidate (minus the median over the candidate's classes, which removes
   how large the update is overall: a large benign update moves every class) and then on the round (minus the
   median over the round's clients for the same class, which removes what every client of the round shares, such
   as the global model's own drift between rounds). What is left is how much one class of one client stands out.
   ``point_margin_gain`` is centred on its candidate only: colluders that make up a large share of a round pull the
   round's median of their class towards themselves.

2. **Calibration** ([`ScreenCalibration`]): the centred evidence of benign rounds, per signal and class. A new
   client's evidence is standardised per class against that history (median and MAD of the class over the benign
   rows; mean and standard deviation for the Šidák null), so a class whose benign gains vary widely, because some writers hold much of it, needs a larger gain to
   count. The statistic is the maximum over classes and signals of the standardised evidence.

3. **Decision**: the statistic's null distribution is the one of the benign rows themselves, each standardised
   against the other rounds only (leave one round out, so the null is not optimistic). A client's p-value is
   ``(1 + #{null ≥ statistic}) / (1 + #null)`` (conformal: for a benign client exchangeable with the history its
   false-alarm probability is at most ``target_fpr``); it is flagged when ``p ≤ target_fpr``. The maximum over
   classes already holds the correction for the number of classes, since the null is the maximum too. With
   ``null="sidak"`` the p-value is instead ``1 − (1 − Φ̄(z))^(C·S)`` (per-class z taken as standard normal, Šidák's
   correction for ``C`` classes and ``S`` signals), for a history too short to give an empirical tail. It is an
   approximation: the centred evidence of one client's classes is neither independent nor normal, and its false-alarm
   rate can exceed the target; the empirical null is the default.

4. **Over rounds** (``accumulate=True``): a client's standardised evidence is summed per class over the rounds it took
   part in and divided by the square root of their number (Stouffer's combination), so an attacker whose every update
   is small but pushes the same class builds up evidence that no single round shows. The null is accumulated alike:
   the calibration rows, each standardised against the other rounds, summed per client id over the calibration
   rounds in order; a benign client whose labels lean towards one class carries that lean in the null too (with
   ``null="sidak"`` the accumulated z is standard normal under that null's own model, and its p-value is as above). It
   relies on client ids that persist over rounds: an attacker under a new id each round keeps one round's evidence.

   How often a client appears differs between the calibration rounds and the screened ones: over a few calibration
   rounds a client appears once or twice, over many screened rounds it may appear many times, and a benign client's
   persistent lean grows with the square root of its rounds. With ``null_counts="running"`` the null is the set of
   running accumulations of the calibration rows (every count a calibration client reached, once each). With
   ``null_counts="matched"`` the null depends on the count: a client assessed on its k-th round is compared with
   statistics each accumulated over ``min(k, n_j)`` held-out-standardised rows of one calibration client ``j`` (``n_j``
   its rows; every subset of that size, or ``null_draws`` drawn ones when there are more), each calibration client
   weighing one in the p-value ``(1 + Σ_j w_j) / (1 + J)`` (``w_j``: the share of client ``j``'s statistics at or
   above the client's). The longer the calibration history, the more of the screened counts it holds.

   With ``round_cap=c`` each round's standardised evidence (per client, class and signal) is clipped to ``[-c, c]``
   before it is summed, and so is every held-out row of the null (both nulls): one round adds at most ``c``, so a
   single spike of an honest client does not flag it for its later rounds, while a steady push adds up (``k`` rounds at
   ``c`` give ``c·√k``). Without ``accumulate`` it only bounds the statistic (every client above ``c`` ties at ``c``).
   With ``null="sidak"`` the clipped z is no longer standard normal (its variance is below one): the p-values are
   conservative.

5. **The union of the single-round and the accumulated screen** (``single_round_union=True``, with ``accumulate``): a
   capped accumulation cannot flag a client in its first round (one round adds at most the cap), an uncapped one
   carries an honest writer's single spike into its later rounds. The union runs two screens on the same rows, each
   at ``target_fpr / 2``: the *single-round* one (this round's standardised evidence, unclipped and not accumulated,
   against the held-out calibration rows, unclipped and not accumulated; with ``null="sidak"`` the single-round
   Šidák p-value) and the accumulated one as configured (``round_cap``, ``null_counts``). A client is flagged when
   either half flags it; its p-value is ``min(1, 2·min(p_single, p_accumulated))`` (Bonferroni), so
   ``p <= target_fpr`` is the same decision and a benign client's false-alarm probability is at most about
   ``target_fpr``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .screen import MAD_CONSISTENCY, candidate_state, flatten, state_of, to_deltas

CALIBRATED_SIGNALS = ("margin_gain", "trigger_drift", "point_margin_gain")
#: Signals centred on their candidate only, never on the round (see the module docstring).
CANDIDATE_CENTRED = ("point_margin_gain",)
#: The signals the calibrated screen uses unless told otherwise, and whether it accumulates them over a client's
#: rounds (``ScreenCalibration.accumulate``); chosen on the MNIST benchmark settings by the rules written in
#: benchmarks/fl/README.md ("Calibrated screen: the rule", then "... evidence for small colluding updates").
DEFAULT_CALIBRATED_SIGNALS: tuple[str, ...] = ("margin_gain", "trigger_drift", "point_margin_gain")
DEFAULT_ACCUMULATE = True
#: How an accumulating calibration's null counts a client's rounds (``ScreenCalibration.null_counts``): ``"running"``
#: (each calibration row accumulated over its client's earlier calibration rows) or ``"matched"`` (a client assessed on
#: its k-th round is compared with statistics accumulated over k rows of one calibration client; see the module
#: docstring, step 4).
DEFAULT_NULL_COUNTS = "running"
#: The bound on one round's standardised evidence before it accumulates (``ScreenCalibration.round_cap``; ``None``: no
#: bound); see the module docstring, step 4, and benchmarks/fl/README.md ("Capping each round's evidence ...").
DEFAULT_ROUND_CAP: float | None = None
#: Whether the screen is the union of the single-round and the accumulated screen, each at half the target FPR
#: (``ScreenCalibration.single_round_union``); see the module docstring, step 5, and benchmarks/fl/README.md ("The
#: union of the single-round and the capped accumulated screen").
DEFAULT_SINGLE_ROUND_UNION = False
NULL_COUNTS = ("running", "matched")
MIN_CLIENTS_FOR_CENTRING = 3  # below this a round's median says nothing


@dataclass(frozen=True)
class EvidenceSettings:
    """How [`client_evidence`] measures each candidate.

    Attributes:
        margin_steps / margin_starts / margin_lr: [`max_margins`]' budget (gradient-ascent steps, random starts per
            class, learning rate as a fraction of the input bounds' span); ``margin_floor``: margins below it are
            taken as it before their log.
        synthesis_steps / synthesis_lr: the per-class trigger synthesis behind ``trigger_drift``.
        n: clean samples used (the first ``n`` of the server's clean samples).
        seed: seeds the margin starts and the synthesis; the same for every candidate, so candidates differ only by
            their weights.
        centre_by_round: also subtract the round's per-class median (needs at least 3 clients; see
            [`centre_evidence`]); never for the signals of [`CANDIDATE_CENTRED`].
    """

    margin_steps: int = 20
    margin_starts: int = 4
    margin_lr: float = 0.1
    margin_floor: float = 0.1
    synthesis_steps: int = 20
    synthesis_lr: float = 0.1
    n: int = 10
    seed: int = 0
    centre_by_round: bool = True

    def replace(self, **changes: Any) -> EvidenceSettings:
        import dataclasses

        return dataclasses.replace(self, **changes)


@dataclass
class ClientEvidence:
    """Per-client, per-class evidence of one round (``K`` clients, ``C`` classes).

    Attributes:
        raw: signal -> ``(K, C)`` uncentred values (``margin_gain``: log candidate margin − log global margin;
            ``trigger_drift``: 1 − mask cosine to the global model's; ``point_margin_gain``: candidate margin − global
            margin at the global model's maximum-margin inputs).
        centred: signal -> ``(K, C)`` values minus each candidate's median over classes, then minus the round's
            per-class median (skipped when the round is too small to centre).
        global_margins: ``(C,)`` the global model's maximum margins (``None`` without ``margin_gain``).
        update_norms: ``(K,)`` L2 norms of the updates.
        seconds: ``(K,)`` wall time per client (the global model's share spread evenly).
    """

    raw: dict[str, np.ndarray]
    centred: dict[str, np.ndarray]
    global_margins: np.ndarray | None
    update_norms: np.ndarray
    seconds: np.ndarray

    @classmethod
    def from_raw(cls, raw: dict) -> ClientEvidence:
        """Evidence rebuilt from saved raw values (signal -> ``(K, C)`` nested lists or arrays), e.g. a benchmark's
        ``--save_evidence`` file, to rescore a screen offline: the centred values are derived on use
        ([`centred_for`]); norms 1 and times 0 stand for what was not saved."""
        values = {s: np.asarray(v, dtype=np.float64) for s, v in raw.items()}
        k = {len(v) for v in values.values()}
        if len(k) != 1:
            raise ValueError(f"every signal needs the same number of clients, got {sorted(k)}")
        n = k.pop()
        return cls(values, {}, None, np.ones(n), np.zeros(n))

    @property
    def num_clients(self) -> int:
        return len(self.update_norms)

    def centred_for(self, signal: str, by_round: bool) -> np.ndarray:
        """``raw[signal]`` centred on each candidate and, with ``by_round``, on the round ([`centre_evidence`])."""
        return centre_evidence(self.raw[signal], by_round=by_round and signal not in CANDIDATE_CENTRED)


def _check_signals(signals: Sequence[str]) -> tuple[str, ...]:
    signals = tuple(signals)
    unknown = sorted(set(signals) - set(CALIBRATED_SIGNALS))
    if unknown or not signals:
        raise ValueError(
            f"unknown calibrated signals {unknown or list(signals)}; use any of {list(CALIBRATED_SIGNALS)}"
        )
    return signals


def centre_evidence(values: np.ndarray, *, by_round: bool = True) -> np.ndarray:
    """``(K, C)`` evidence minus each candidate's median over classes (how large its update is overall) and, with
    ``by_round`` and at least 3 clients, minus the round's median per class (what every client of the round shares).

    Centring on the round removes the global model's own drift between rounds but assumes a benign majority of the
    round for every class: colluding attackers that make up a large share of a round pull the median towards
    themselves.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v - np.median(v, axis=1, keepdims=True)
    if by_round and len(v) >= MIN_CLIENTS_FOR_CENTRING:
        v = v - np.median(v, axis=0)
    return v


def point_margins(adapter: Any, items: list, inputs: torch.Tensor) -> np.ndarray:
    """``(C,)`` the logit margin of each class ``c`` at ``inputs[c]`` (e.g. a model's maximum-margin inputs, in
    [`max_margins`]' space and units), ``f_c(x) − max_{j≠c} f_j(x)``, for the model the adapter holds now."""
    from ..scan.max_margin import logit_margins
    from ..scan.synthesis import MAX_SYNTHESIS_SIDE, synthesis_space

    space = synthesis_space(adapter, list(items[:1]))
    if space.downsized is not None:  # max_margins maximises large images at the synthesis's own size
        space = space.downsized(MAX_SYNTHESIS_SIDE) or space
    k = len(inputs)
    ones = torch.ones((k, *space.mask_shape[1:]), device=space.device)
    with torch.no_grad():  # one item, k classes: row c is class c (space.run's class-major layout)
        logits, _ = space.run(ones, inputs.to(space.device), k)
    return logit_margins(logits.float().cpu(), torch.arange(k)).double().numpy()


def client_evidence(
    global_model: nn.Module,
    updates: Sequence[Any],
    clean_samples: Any,
    *,
    signals: Sequence[str] = DEFAULT_CALIBRATED_SIGNALS,
    settings: EvidenceSettings | None = None,
    as_deltas: bool = True,
    processor: Any = None,
) -> ClientEvidence:
    """Per-client, per-class evidence of one round's updates: what each candidate ``global + Δk`` changes per class.

    Args:
        global_model: the round's global model (not modified).
        updates: one delta mapping, client state dict (``as_deltas=False``) or client ``nn.Module`` per client.
        clean_samples: the server's clean inputs (at least 5), in the model's input format.
        signals: any of [`CALIBRATED_SIGNALS`].
        settings: the budgets ([`EvidenceSettings`]).
        as_deltas: whether mappings are deltas (default) or client state dicts.
        processor: the model's tokenizer / image processor where its inputs need one.

    Returns:
        A [`ClientEvidence`] with ``(K, C)`` arrays per signal, raw and centred on the round.
    """
    from ..scan.max_margin import max_margins
    from ..scan.scanner import prepare_clean_items, run_synthesis
    from ..targets import load_target

    signals = _check_signals(signals)
    settings = settings or EvidenceSettings()
    global_state = state_of(global_model)
    deltas = to_deltas(global_state, updates, as_deltas=as_deltas)
    if not deltas:
        raise ValueError("client_evidence needs at least one update")
    candidate = copy.deepcopy(global_model).eval()
    adapter = load_target(candidate, processor)
    items = prepare_clean_items(adapter, clean_samples, settings.n, settings.seed)
    with torch.no_grad():
        num_classes = int(adapter(items).logits.shape[1])  # also shows the adapter its head
    synth = {"steps": settings.synthesis_steps, "lr": settings.synthesis_lr, "flip_threshold": 0.9,
             "class_batch": 16, "seed": settings.seed}  # fmt: skip

    def measure(ascent: bool, at: torch.Tensor | None = None) -> dict[str, Any]:
        """The candidate's evidence; ``at``: the inputs of its point margins (None: its own maximising inputs)."""
        out: dict[str, Any] = {}
        if ascent and ("margin_gain" in signals or "point_margin_gain" in signals):
            result = max_margins(
                adapter, items, num_classes, steps=settings.margin_steps, starts=settings.margin_starts,
                lr=settings.margin_lr, seed=settings.seed, progress=False,
            )  # fmt: skip
            out["margins"], out["inputs"] = result.margins, result.inputs
        if "point_margin_gain" in signals:
            out["point"] = point_margins(adapter, items, out["inputs"] if at is None else at)
        if "trigger_drift" in signals:
            out["masks"] = run_synthesis(adapter, items, **synth, progress=False)[1].masks.flatten(1).float()
        return out

    t0 = time.perf_counter()
    reference = measure(ascent=True)  # the copy still holds the global weights here
    shared = time.perf_counter() - t0
    raw: dict[str, list[np.ndarray]] = {s: [] for s in signals}
    seconds = []
    for delta in deltas:
        t0 = time.perf_counter()
        candidate.load_state_dict(candidate_state(global_state, delta))
        got = measure(ascent="margin_gain" in signals, at=reference.get("inputs"))
        if "point_margin_gain" in signals:
            raw["point_margin_gain"].append(got["point"] - reference["point"])
        if "margin_gain" in signals:
            floor = settings.margin_floor
            gain = np.log(np.maximum(got["margins"], floor)) - np.log(np.maximum(reference["margins"], floor))
            raw["margin_gain"].append(gain)
        if "trigger_drift" in signals:
            cos = torch.nn.functional.cosine_similarity(got["masks"], reference["masks"], dim=1)
            raw["trigger_drift"].append(1.0 - cos.double().numpy())
        seconds.append(time.perf_counter() - t0)
    candidate.load_state_dict(global_state)
    arrays = {s: np.stack(v).astype(np.float64) for s, v in raw.items()}
    centred = {
        s: centre_evidence(v, by_round=settings.centre_by_round and s not in CANDIDATE_CENTRED)
        for s, v in arrays.items()
    }
    norms = np.array([math.sqrt(float(flatten(d) @ flatten(d))) if d else 0.0 for d in deltas])
    return ClientEvidence(
        raw=arrays, centred=centred, global_margins=reference.get("margins"), update_norms=norms,
        seconds=np.asarray(seconds) + shared / len(deltas),
    )  # fmt: skip


@dataclass
class Assessment:
    """What [`ScreenCalibration.assess`] says about one round's clients (``K`` clients, ``C`` classes).

    Attributes:
        statistic: ``(K,)`` the largest per-class standardised evidence over classes and signals.
        p_value: ``(K,)`` its p-value under the benign null.
        flagged: ``(K,)`` ``p_value <= target_fpr``.
        z: signal -> ``(K, C)`` the per-class standardised evidence.
        top_signal / top_class: ``(K,)`` where the statistic came from.
        single_round_statistic / single_round_p_value: ``(K,)`` with ``single_round_union``: the single-round
            half's statistic (unclipped, not accumulated) and its p-value; ``statistic`` and its p-value are then the
            accumulated half's own (the latter in ``accumulated_p_value``), and ``p_value`` is the union's,
            ``min(1, 2·min(single, accumulated))``. ``None`` otherwise.
    """

    statistic: np.ndarray
    p_value: np.ndarray
    flagged: np.ndarray
    z: dict[str, np.ndarray]
    top_signal: list[str]
    top_class: np.ndarray
    single_round_statistic: np.ndarray | None = None
    single_round_p_value: np.ndarray | None = None
    accumulated_p_value: np.ndarray | None = None


@dataclass
class ScreenCalibration:
    """The benign history that turns a client's per-class evidence into a p-value.

    Fill it on rounds the server trusts ([`calibrate`] with the round's model and updates, or [`update`] with
    evidence already measured), then [`assess`] new rounds; [`save`] / [`load`] keep it as JSON.

    Attributes:
        signals: the evidence signals it uses (any of ``"margin_gain"``, ``"trigger_drift"``).
        target_fpr: the false-positive rate the threshold is set for (a client is flagged when ``p <= target_fpr``).
        null: ``"empirical"`` (leave-one-round-out conformal p-value of the max statistic) or ``"sidak"`` (per-class
            z as standard normal, Šidák-corrected for classes × signals).
        min_scale: signal -> floor of a class's spread (a class that never moves would turn noise into large z).
        settings: the evidence budgets ([`EvidenceSettings`]) the history was measured with; new rounds must be
            measured alike.
        accumulate: accumulate each client's evidence over the rounds it takes part in (by client id; see the
            module docstring, step 4): [`assess`] given ``client_ids`` adds each round to ``memory``.
        rows: signal -> list of per-client ``C``-vectors of centred benign evidence.
        row_rounds: the calibration round each row came from (for the leave-one-round-out null).
        row_clients: the client id of each row (``None`` where none was given: the row is its own client).
        memory: client id (as a string) -> ``{"count": rounds seen, signal: per-class sum of standardised evidence}``
            of the assessed rounds (``accumulate`` only).
        null_counts: ``"running"`` or ``"matched"``: how the accumulated null counts a client's rounds (see the
            module docstring, step 4; ``accumulate`` with the empirical null only).
        null_draws: the most subsets of one calibration client's rows the matched null draws per count.
        round_cap: clip each round's standardised evidence to ``[-round_cap, round_cap]`` before it accumulates, the
            null's rows alike (``None``: no clipping; see the module docstring, step 4).
        single_round_union: flag a client when either the single-round screen (unclipped, not accumulated) or the
            accumulated one (with ``round_cap``) flags it, each at ``target_fpr / 2`` (needs ``accumulate``; see the
            module docstring, step 5).

    Example:
        ```python
        >>> calibration = ScreenCalibration(round_cap=3.0)  # one round adds at most 3 to a client's accumulated z
        >>> union = ScreenCalibration(round_cap=4.0, single_round_union=True)  # first-round spikes, steady pushes
        ```
    """

    signals: tuple[str, ...] = DEFAULT_CALIBRATED_SIGNALS
    target_fpr: float = 0.10
    null: str = "empirical"
    min_scale: dict[str, float] = field(
        default_factory=lambda: {"margin_gain": 0.05, "trigger_drift": 0.01, "point_margin_gain": 0.05}
    )
    settings: EvidenceSettings = field(default_factory=EvidenceSettings)
    accumulate: bool = DEFAULT_ACCUMULATE
    rows: dict[str, list[list[float]]] = field(default_factory=dict)
    row_rounds: list[int] = field(default_factory=list)
    row_clients: list[str | None] = field(default_factory=list)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    null_counts: str = DEFAULT_NULL_COUNTS
    null_draws: int = 20
    round_cap: float | None = DEFAULT_ROUND_CAP
    single_round_union: bool = DEFAULT_SINGLE_ROUND_UNION

    def __post_init__(self) -> None:
        self.signals = _check_signals(self.signals)
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.null not in ("empirical", "sidak"):
            raise ValueError(f"null must be 'empirical' or 'sidak', got {self.null!r}")
        if self.null_counts not in NULL_COUNTS:
            raise ValueError(f"null_counts must be one of {list(NULL_COUNTS)}, got {self.null_counts!r}")
        if self.null_draws < 1:
            raise ValueError(f"null_draws must be >= 1, got {self.null_draws}")
        if self.round_cap is not None and not self.round_cap > 0:
            raise ValueError(f"round_cap must be a positive number or None (no clipping), got {self.round_cap}")
        if self.single_round_union and not self.accumulate:
            raise ValueError("single_round_union needs accumulate=True (without it both halves are single-round)")
        if isinstance(self.settings, Mapping):
            self.settings = EvidenceSettings(**self.settings)
        for s in self.signals:
            self.rows.setdefault(s, [])
        if len(self.row_clients) != len(self.row_rounds):  # a calibration saved without client ids
            self.row_clients = [None] * len(self.row_rounds)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._null_cache: np.ndarray | None = None
        self._single_null_cache: np.ndarray | None = None
        self._held_out_cache: dict[float | None, dict[str, np.ndarray]] = {}
        self._matched_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def level(self) -> float:
        """The FPR each screen is tested at: ``target_fpr``, or half of it for each half of ``single_round_union``."""
        return self.target_fpr / 2 if self.single_round_union else self.target_fpr

    # ---- filling -------------------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.row_rounds)

    @property
    def num_rounds(self) -> int:
        return len(set(self.row_rounds))

    @property
    def num_classes(self) -> int | None:
        first = self.rows.get(self.signals[0]) or []
        return len(first[0]) if first else None

    @property
    def ready(self) -> bool:
        """Enough benign history to decide: two rounds at least, and for the empirical null enough rows that a
        p-value can reach ``target_fpr`` (``1 / (rows + 1) <= target_fpr``; half of it with ``single_round_union``)."""
        if self.num_rounds < 2:
            return False
        return self.null == "sidak" or 1.0 / (self.num_rows + 1) <= self.level

    def update(
        self, evidence: ClientEvidence, *, round_id: int | None = None, client_ids: Sequence[Any] | None = None
    ) -> ScreenCalibration:
        """Add one benign round's evidence (every client of it) to the history; ``client_ids`` (one per client) let
        an accumulating calibration sum a client's rows over the calibration rounds for its null."""
        if client_ids is not None and len(client_ids) != evidence.num_clients:
            raise ValueError(f"got {len(client_ids)} client_ids for {evidence.num_clients} clients")
        centred = self._centred(evidence)
        c = centred[self.signals[0]].shape[1]
        if self.num_classes not in (None, c):
            raise ValueError(f"the evidence has {c} classes but the calibration {self.num_classes}")
        rid = (max(self.row_rounds) + 1 if self.row_rounds else 0) if round_id is None else int(round_id)
        for s in self.signals:
            self.rows[s].extend(centred[s].tolist())
        self.row_rounds.extend([rid] * evidence.num_clients)
        self.row_clients.extend([None] * evidence.num_clients if client_ids is None else [str(c) for c in client_ids])
        self._reset_caches()
        return self

    def calibrate(
        self,
        global_model: nn.Module,
        updates: Sequence[Any],
        clean_samples: Any,
        *,
        round_id: int | None = None,
        client_ids: Sequence[Any] | None = None,
        as_deltas: bool = True,
        processor: Any = None,
    ) -> ClientEvidence:
        """Measure one trusted round's updates ([`client_evidence`] with this calibration's settings) and add them.

        Returns:
            The round's evidence.
        """
        evidence = client_evidence(
            global_model, updates, clean_samples, signals=self.signals, settings=self.settings, as_deltas=as_deltas,
            processor=processor,
        )  # fmt: skip
        self.update(evidence, round_id=round_id, client_ids=client_ids)
        return evidence

    def _centred(self, evidence: ClientEvidence) -> dict[str, np.ndarray]:
        missing = sorted(set(self.signals) - set(evidence.raw))
        if missing:
            raise ValueError(f"the evidence lacks signals {missing}; it has {sorted(evidence.raw)}")
        return {s: evidence.centred_for(s, self.settings.centre_by_round) for s in self.signals}

    # ---- deciding ------------------------------------------------------------------------------------------------
    def _scales(self, keep: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for s in self.signals:
            h = np.asarray(self.rows[s], dtype=np.float64)
            if keep is not None:
                h = h[keep]
            if self.null == "sidak":  # the normal model behind Šidák's correction: mean and standard deviation
                loc, spread = h.mean(axis=0), h.std(axis=0, ddof=1)
            else:  # robust: a few unusual benign rows do not widen the scale
                loc = np.median(h, axis=0)
                spread = MAD_CONSISTENCY * np.median(np.abs(h - loc), axis=0)
            scale = np.maximum(spread, self.min_scale.get(s, 1e-6))
            out[s] = (loc, scale)
        return out

    def _standardise(self, centred: Mapping[str, np.ndarray], scales, cap: float | None) -> dict[str, np.ndarray]:
        """One round's standardised evidence, clipped to ``cap`` (the null's rows and new rounds alike)."""
        z = {s: (np.asarray(centred[s], dtype=np.float64) - scales[s][0]) / scales[s][1] for s in self.signals}
        if cap is not None:
            z = {s: np.clip(v, -cap, cap) for s, v in z.items()}
        return z

    @staticmethod
    def _max_stat(z: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.max(np.stack([v.max(axis=1) for v in z.values()]), axis=0)

    def held_out_z(self, *, clipped: bool = True) -> dict[str, np.ndarray]:
        """signal -> ``(rows, C)``: each benign row standardised against the other calibration rounds only (clipped
        to ``round_cap`` unless ``clipped=False``)."""
        cap = self.round_cap if clipped else None
        if cap not in self._held_out_cache:
            rounds = np.asarray(self.row_rounds)
            out = {s: np.empty((len(rounds), self.num_classes or 0)) for s in self.signals}
            for r in np.unique(rounds):
                held = rounds == r
                rows = {s: np.asarray(self.rows[s], dtype=np.float64)[held] for s in self.signals}
                for s, v in self._standardise(rows, self._scales(~held), cap).items():
                    out[s][held] = v
            self._held_out_cache[cap] = out
        return self._held_out_cache[cap]

    def _row_names(self) -> list[str]:
        return [c or f"row:{i}" for i, c in enumerate(self.row_clients)]

    def null_statistics(self) -> np.ndarray:
        """The benign rows' statistics, each standardised against the other calibration rounds only (with
        ``accumulate``: accumulated over its client's earlier calibration rows, the running null)."""
        if self._null_cache is None:
            rounds = np.asarray(self.row_rounds)
            z_all = self.held_out_z()
            names = self._row_names()
            stats = np.empty(len(rounds))
            sums: dict[str, dict[str, Any]] = {}
            for r in np.unique(rounds):  # in round order, so that a row accumulates its client's earlier rows only
                held = rounds == r
                z = {s: v[held] for s, v in z_all.items()}
                if self.accumulate:
                    z = _accumulated(sums, [names[i] for i in np.flatnonzero(held)], z)
                stats[held] = self._max_stat(z)
            self._null_cache = stats
        return self._null_cache

    def single_round_null(self) -> np.ndarray:
        """The single-round half's null (``single_round_union``): each benign row's statistic, standardised against
        the other calibration rounds only, unclipped and not accumulated."""
        if self._single_null_cache is None:
            self._single_null_cache = self._max_stat(self.held_out_z(clipped=False))
        return self._single_null_cache

    def matched_null(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The count-matched null for a client seen ``count`` times: statistics accumulated over ``min(count, n_j)``
        held-out-standardised rows of one calibration client ``j`` (every subset of that size, or ``null_draws``
        drawn ones), and their weights (``1 / #subsets`` of their client, so each client weighs one).

        Returns:
            ``(statistics, weights)``, one entry per subset.
        """
        count = max(int(count), 1)
        if count not in self._matched_cache:
            z_all = self.held_out_z()
            by_client: dict[str, list[int]] = {}
            for i, name in enumerate(self._row_names()):
                by_client.setdefault(name, []).append(i)
            stats, weights = [], []
            for j, (_, index) in enumerate(sorted(by_client.items())):
                m = min(count, len(index))
                if math.comb(len(index), m) <= self.null_draws:
                    subsets = [list(c) for c in itertools.combinations(index, m)]
                else:
                    rng = np.random.default_rng([count, j])
                    subsets = [sorted(rng.choice(index, size=m, replace=False)) for _ in range(self.null_draws)]
                for subset in subsets:
                    z = {s: v[subset].sum(axis=0, keepdims=True) / math.sqrt(m) for s, v in z_all.items()}
                    stats.append(float(self._max_stat(z)[0]))
                    weights.append(1.0 / len(subsets))
            self._matched_cache[count] = (np.asarray(stats), np.asarray(weights))
        return self._matched_cache[count]

    def _uses_matched(self) -> bool:
        return self.accumulate and self.null == "empirical" and self.null_counts == "matched"

    def threshold(self, count: int = 1, *, single_round: bool = False) -> float:
        """The boundary of the flagged statistics at ``target_fpr`` (a statistic above it is flagged; ``inf`` when
        none can be); ``count``: the rounds a client has been seen in (the matched null only). With
        ``single_round_union`` each half's boundary at ``target_fpr / 2``: the accumulated half's, or with
        ``single_round=True`` the single-round half's."""
        level = self.level
        if self.null == "sidak":
            from scipy.stats import norm

            m = len(self.signals) * (self.num_classes or 1)
            return float(norm.isf(1.0 - (1.0 - level) ** (1.0 / m)))
        if self._uses_matched() and not single_round:  # descending: the first null value whose p-value breaks it
            values = np.unique(self.matched_null(count)[0])[::-1]
            above = np.flatnonzero(self.p_values(values, [count] * len(values)) > level)
            return float(values[above[0]]) if len(above) else -math.inf
        null = np.sort(self.single_round_null() if single_round else self.null_statistics())[::-1]
        n = len(null)
        allowed = math.floor(level * (n + 1)) - 1  # p = (1 + count) / (n + 1) <= level: count <= allowed
        if allowed < 0:
            return math.inf
        return float(null[allowed]) if allowed < n else -math.inf

    def p_values(
        self, statistic: np.ndarray, counts: Sequence[int] | None = None, *, single_round: bool = False
    ) -> np.ndarray:
        """P-values of statistics under the benign null; ``counts``: the rounds each client has been seen in (the
        matched null only; ``None``: one round each); ``single_round``: under the single-round null (unclipped, not
        accumulated rows; [`single_round_null`]) instead of the screen's own."""
        statistic = np.asarray(statistic, dtype=np.float64)
        if self.null == "sidak":
            from scipy.stats import norm

            m = len(self.signals) * (self.num_classes or 1)
            return 1.0 - (1.0 - norm.sf(statistic)) ** m
        if self._uses_matched() and not single_round:
            counts = [1] * len(statistic) if counts is None else list(counts)
            out = np.empty(len(statistic))
            for k, (value, count) in enumerate(zip(statistic, counts, strict=True)):
                stats, weights = self.matched_null(count)
                out[k] = (1.0 + weights[stats >= value].sum()) / (1.0 + weights.sum())
            return out
        null = self.single_round_null() if single_round else self.null_statistics()
        return (1.0 + (null[None, :] >= statistic[:, None]).sum(axis=1)) / (len(null) + 1.0)

    def assess(self, evidence: ClientEvidence, client_ids: Sequence[Any] | None = None) -> Assessment:
        """Standardise a round's evidence against the benign history and decide at ``target_fpr``.

        With ``accumulate`` and ``client_ids`` the round is added to the clients' ``memory`` and the decision is on
        each client's evidence accumulated over its rounds so far: call it once per round. Without ``client_ids``
        the round is assessed alone and nothing is remembered. With ``single_round_union`` the round's unclipped
        evidence is also assessed alone, and a client is flagged when either half's p-value is at most
        ``target_fpr / 2`` (see [`Assessment`]).
        """
        if client_ids is not None and len(client_ids) != evidence.num_clients:
            raise ValueError(f"got {len(client_ids)} client_ids for {evidence.num_clients} clients")
        if not self.ready:
            raise ValueError(
                f"the calibration holds {self.num_rows} rows from {self.num_rounds} rounds: not enough to decide at "
                f"target_fpr={self.target_fpr}; add benign rounds with calibrate() / update() first"
            )
        centred = self._centred(evidence)
        c = centred[self.signals[0]].shape[1]
        if c != self.num_classes:
            raise ValueError(f"the evidence has {c} classes but the calibration {self.num_classes}")
        scales = self._scales()
        z = self._standardise(centred, scales, self.round_cap)
        counts = None
        if self.accumulate and client_ids is not None:
            names = [str(c) for c in client_ids]
            z = _accumulated(self.memory, names, z)
            counts = [self.memory[c]["count"] for c in names]
        per_signal = np.stack([z[s].max(axis=1) for s in self.signals])  # (S, K)
        statistic = per_signal.max(axis=0)
        top = per_signal.argmax(axis=0)
        top_class = np.array([int(z[self.signals[t]][k].argmax()) for k, t in enumerate(top)])
        p = self.p_values(statistic, counts)
        single = single_p = accumulated_p = None
        if self.single_round_union:
            single = self._max_stat(self._standardise(centred, scales, None))
            single_p, accumulated_p = self.p_values(single, single_round=True), p
            p = np.minimum(1.0, 2.0 * np.minimum(single_p, accumulated_p))  # Bonferroni: each half at target / 2
        return Assessment(
            statistic, p, p <= self.target_fpr, z, [self.signals[t] for t in top], top_class, single, single_p,
            accumulated_p,
        )  # fmt: skip

    # ---- persistence ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "signals": list(self.signals), "target_fpr": self.target_fpr, "null": self.null,
            "min_scale": dict(self.min_scale), "settings": asdict(self.settings),
            "accumulate": self.accumulate, "rows": {s: self.rows[s] for s in self.signals},
            "row_rounds": list(self.row_rounds), "row_clients": list(self.row_clients),
            "memory": {c: {k: v if k == "count" else list(v) for k, v in m.items()} for c, m in self.memory.items()},
            "null_counts": self.null_counts, "null_draws": self.null_draws, "round_cap": self.round_cap,
            "single_round_union": self.single_round_union,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScreenCalibration:
        data = dict(data)
        data["signals"] = tuple(data["signals"])
        data["settings"] = EvidenceSettings(**data.get("settings", {}))
        data.setdefault("accumulate", False)  # saved before accumulation existed
        data.setdefault("null_counts", "running")  # saved before the matched null existed
        data.setdefault("round_cap", None)  # saved before the cap existed
        data.setdefault("single_round_union", False)  # saved before the union existed
        data["memory"] = {
            c: {k: v if k == "count" else np.asarray(v, dtype=np.float64) for k, v in m.items()}
            for c, m in data.get("memory", {}).items()
        }
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScreenCalibration:
        """Read a calibration written by [`save`]."""
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _accumulated(
    memory: dict[str, dict[str, Any]], clients: Sequence[str], z: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Add a round's ``(K, C)`` standardised evidence to ``memory`` (per client: rounds seen, per-class sums) and
    return each client's accumulated evidence, ``sum / sqrt(rounds seen)`` (Stouffer's combination)."""
    out = {s: np.empty_like(v) for s, v in z.items()}
    for k, client in enumerate(clients):
        seen = memory.setdefault(client, {"count": 0})
        seen["count"] += 1
        for s, v in z.items():
            seen[s] = seen.get(s, 0.0) + v[k]
            out[s][k] = seen[s] / math.sqrt(seen["count"])
    return out
