"""Screening federated client updates with the model-level scan.

For every client update ``Δk`` of a round the server builds the candidate model ``global + Δk`` and runs
[`scan_model`] on it with its own few clean samples: no triggered input and no client data. Because the server sees
all the round's clients at once, each client is also scored *relative to the round*: a robust z-score (median and
MAD over the round's clients) of its scan score and of how easily each class of its candidate can be forced compared
with the same class in the other candidates. A backdoored update makes its target class an outlier on both, while
the benign non-IID drift that moves an absolute threshold moves every candidate alike.

Given a [`ScreenCalibration`] (``metashield_hf.fl.calibration``) filled on rounds the server trusts, the screen is
calibrated instead: per-class trigger-agnostic evidence of each candidate is standardised against the benign history
and flagged at a target false-positive rate (see that module), rather than against a fixed z over one round.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..scan.config import ScanConfig
from ..scan.head import NEURAL_CLEANSE_RULE_HEAD

if TYPE_CHECKING:
    from .calibration import ClientEvidence, ScreenCalibration

logger = logging.getLogger(__name__)

MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation for normal data
MIN_CLIENTS_FOR_RELATIVE = 3  # below this a median/MAD over the round says nothing; the scan's own verdict is used
# trigger_drift alone: on captured MNIST rounds (3 captures, 6 attacks) it caught data poisoning, DBA and Neurotoxin
# where scan_score / class_size_shift caught none, and adding those mostly adds false alarms (see
# benchmarks/fl/README.md).
DEFAULT_SIGNALS = ("trigger_drift",)
KNOWN_SIGNALS = ("trigger_drift", "scan_score", "class_size_shift", "anomaly_index")
DRIFT_MIN_SCALE = 0.02  # floor of the per-class spread of mask cosines (identical candidates would divide by ~0)
#: The scan that screens each candidate: a short mask synthesis (every class 40 steps), no blend synthesis or token
#: search, and Neural Cleanse's rule as its head, since the fitted head is fit on full-budget scans of whole zoo models
#: and does not transfer to these short ones (on the 5-client digits round of the tests it ranked the malicious
#: client's candidate below benign ones, where the rule put it on top).
FL_SCAN_CONFIG = ScanConfig(steps=40, token_search=False, blend_steps=0, head=NEURAL_CLEANSE_RULE_HEAD)
StateDict = dict[str, torch.Tensor]


@dataclass
class ClientScore:
    """The screen's verdict on one client update.

    Attributes:
        client: the client's id (``client_ids[k]``, or its index in ``updates``).
        index: position of the update in the list that was scored.
        score: the screening score (larger = more suspicious); for the MetaShield screen the largest robust z-score
            of the chosen signals over the round (or the scan score when the round is too small).
        flagged: whether ``score`` passed the threshold.
        evidence: JSON-able per-signal numbers (raw values, z-scores, the scan's suspected target, ...).
        seconds: wall time spent on this client.
    """

    client: Any
    index: int
    score: float
    flagged: bool
    evidence: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def robust_z(values: Sequence[float] | np.ndarray, *, min_scale: float = 1e-6) -> np.ndarray:
    """``(v - median) / max(1.4826 * MAD, min_scale)``: how far each value sits from the round's bulk.

    ``min_scale`` keeps a round of near-identical values from turning tiny differences into huge scores.

    Example:
        ```python
        robust_z([1.0, 1.1, 0.9, 1.0, 5.0]).round(1)   # array([ 0. ,  0.7, -0.7,  0. , 27. ])
        ```
    """
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    scale = max(MAD_CONSISTENCY * float(np.median(np.abs(v - med))), float(min_scale))
    return (v - med) / scale


def _as_tensor(value: Any) -> torch.Tensor:
    return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def state_of(model: nn.Module | Mapping[str, Any]) -> StateDict:
    """A detached ``name -> tensor`` copy of a module's state dict or of any mapping of arrays."""
    items = model.state_dict().items() if isinstance(model, nn.Module) else model.items()
    return {k: _as_tensor(v).clone() for k, v in items}


def to_deltas(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[Any], *, as_deltas: bool = True
) -> list[StateDict]:
    """Client updates as float deltas ``Δk = local − global``.

    An ``nn.Module`` is always a client *model*. A mapping is a delta when ``as_deltas`` (the default, what
    ``local_train`` and most FL loops produce), else a client model's state dict (what a Flower reply's
    ``ArrayRecord`` holds). Keys missing from a delta mean "unchanged"; non-float entries are ignored.
    """
    out = []
    for k, upd in enumerate(updates):
        is_model = isinstance(upd, nn.Module) or not as_deltas
        state = state_of(upd)
        unknown = sorted(set(state) - set(global_state))
        if unknown:
            raise ValueError(f"update {k} has keys the global model lacks: {unknown[:5]}; pass matching state dicts")
        delta = {}
        for name, ref in global_state.items():
            if not ref.is_floating_point() or name not in state:
                continue
            value = state[name].to(ref.dtype).reshape(ref.shape)
            delta[name] = value - ref if is_model else value
        out.append(delta)
    return out


def flatten(delta: Mapping[str, torch.Tensor]) -> np.ndarray:
    """All float entries of an update in one ``float64`` vector (sorted keys, so every client lines up)."""
    return np.concatenate([delta[k].detach().double().flatten().numpy() for k in sorted(delta)])


def candidate_state(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> StateDict:
    """``global + Δ`` (integer buffers such as BatchNorm counters are kept from the global model)."""
    return {k: (v + delta[k].to(v.dtype)) if k in delta else v.clone() for k, v in global_state.items()}


def score_client_updates(
    global_model: nn.Module,
    updates: Sequence[Any],
    clean_samples: Any,
    detector: Any = None,
    *,
    client_ids: Sequence[Any] | None = None,
    as_deltas: bool = True,
    relative: bool = True,
    signals: Sequence[str] = DEFAULT_SIGNALS,
    z_threshold: float = 3.5,
    min_log_scale: float = 0.5,
    config: ScanConfig | None = None,
    processor: Any = None,
    calibration: ScreenCalibration | None = None,
    **scan_options: Any,
) -> list[ClientScore]:
    """Score each client update of one round for a backdoor, from the server's few clean samples only.

    For client ``k`` the candidate model ``global + Δk`` is scanned with [`scan_model`] (trigger synthesis per class,
    Neural Cleanse anomaly index, the adapted input-level detector, the model-level head). With ``relative=True`` and
    at least 3 clients, each client is then compared with the round:

    - ``trigger_drift`` (the default): the global model is scanned too, and for every class ``c`` the cosine between
      the candidate's synthesized mask for ``c`` and the global model's is compared with the round's other
      candidates (how much lower than the round's median, in units of the round's spread); the maximum over classes.
      A benign update, even one whose labels lean towards ``c``, makes the *existing* route to ``c`` easier, so its
      mask keeps the global model's shape; a backdoor opens a *new* route (the trigger) and the mask moves to it;
    - ``scan_score``: robust z-score of the candidate's scan score over the round's candidates;
    - ``class_size_shift``: for every class ``c``, how much smaller (in log) the candidate's synthesized trigger for
      ``c`` is than the round's median for ``c``, in units of the round's spread for ``c``; the maximum over classes.
      A backdoor opens a shortcut to its target class that no benign update opens;
    - ``anomaly_index``: robust z-score of the scan's anomaly index (off by default; noisier on young FL models).

    The client's score is the largest z of ``signals``; it is flagged when the score exceeds ``z_threshold``. With
    ``relative=False`` (or fewer than 3 clients) the score is the scan score and the flag the scan's own verdict.

    With ``calibration`` (a [`ScreenCalibration`] filled on benign rounds) the screen is the calibrated one instead:
    per-class trigger-agnostic evidence of each candidate ([`client_evidence`]: maximum-margin gain, trigger drift and
    the margin gain at the global model's maximum-margin inputs, against the global model), standardised per class
    against the benign history (by default accumulated over each client's rounds), and flagged when its p-value
    under the benign null is at most ``calibration.target_fpr``. The evidence is then measured with
    ``calibration.settings`` (as the history was), and ``relative``, ``signals``, ``z_threshold``, ``config`` and the
    scan options are not used. An accumulating calibration (``accumulate=True``) decides on each client's evidence
    summed over the rounds it took part in, by ``client_ids``, which it then needs.

    Args:
        global_model: the round's global model (not modified; a copy is loaded with each candidate).
        updates: one entry per client: a delta mapping ``name -> tensor/ndarray`` (``Δk = local − global``), a
            client state dict (with ``as_deltas=False``) or a client ``nn.Module``.
        clean_samples: at least 5 clean inputs in the model's input format (e.g. an ``(N, C, H, W)`` tensor).
        detector: the input-level detector for the scan (``None``: the embedded default).
        client_ids: ids reported in [`ClientScore.client`] (default ``0..K-1``).
        as_deltas: whether mappings are deltas (default) or client state dicts.
        relative: compare the clients of the round with each other (robust z-scores).
        signals: the relative signals that make up the score (see above).
        z_threshold: flag above this score in relative mode.
        min_log_scale: floor of the per-class spread of log trigger sizes (a round of near-identical candidates
            would otherwise turn noise into large z-scores).
        config: the scan of each candidate ([`ScanConfig`]; default [`FL_SCAN_CONFIG`]: 40 synthesis steps, Neural
            Cleanse's rule as the head behind ``scan_score``). Its ``seed`` is used for every candidate, so candidates
            differ only by their weights.
        processor: the model's tokenizer / image processor where its inputs need one.
        calibration: a ready [`ScreenCalibration`]: use the calibrated screen (see above).
        **scan_options: [`ScanConfig`] fields that override ``config``'s (e.g. ``steps=20, seed=1``).

    Returns:
        One [`ClientScore`] per update, in input order; ``evidence`` holds the scan signals, the suspected target,
        the per-class log trigger sizes, the update norm and every z-score.

    Example:
        ```python
        >>> scores = score_client_updates(global_model, deltas, clean_images[:10], client_ids=[3, 8, 11, 14, 19])
        >>> [(s.client, round(s.score, 1), s.flagged) for s in scores]
        [(3, 0.4, False), (8, 11.2, True), (11, 0.0, False), (14, -0.7, False), (19, 0.9, False)]
        ```
    """
    from ..scan.scanner import prepare_clean_items, run_synthesis, scan_adapter
    from ..targets import load_target

    if len(updates) == 0:
        return []
    ids = list(range(len(updates))) if client_ids is None else list(client_ids)
    if len(ids) != len(updates):
        raise ValueError(f"got {len(updates)} updates but {len(ids)} client_ids; pass one id per update")
    unknown = sorted(set(signals) - set(KNOWN_SIGNALS))
    if unknown or not signals:
        raise ValueError(f"unknown signals {unknown or list(signals)}; use any of {list(KNOWN_SIGNALS)}")
    config = (config or FL_SCAN_CONFIG).replace(**scan_options)
    if calibration is not None:
        from .calibration import client_evidence

        if calibration.accumulate and client_ids is None:
            raise ValueError(
                "the calibration accumulates evidence per client over rounds: pass client_ids (the same id for a "
                "client every round)"
            )
        evidence = client_evidence(
            global_model, updates, clean_samples, signals=calibration.signals, settings=calibration.settings,
            as_deltas=as_deltas, processor=processor,
        )  # fmt: skip
        return calibrated_scores(evidence, calibration, ids)
    config = config.replace(head=config.load_head())
    if config.use_detector and (detector is None or isinstance(detector, (str, os.PathLike))):
        from ..loading import load_detector

        detector = load_detector(detector, one_pass=True)  # once per round, not once per candidate
    global_state = state_of(global_model)
    deltas = to_deltas(global_state, updates, as_deltas=as_deltas)
    use_relative = relative and len(deltas) >= MIN_CLIENTS_FOR_RELATIVE
    # One adapter around one copy of the global model; each candidate is loaded into it in turn.
    candidate = copy.deepcopy(global_model).eval()
    adapter = load_target(candidate, processor, batch_size=config.batch_size)
    items = prepare_clean_items(adapter, clean_samples, config.n, config.seed)
    synth = {"steps": config.steps, "lr": config.lr, "flip_threshold": config.flip_threshold,
             "class_batch": config.class_batch, "seed": config.seed}  # fmt: skip
    t0 = time.perf_counter()
    reference = None
    if use_relative and "trigger_drift" in signals:  # the copy still holds the global weights here
        reference = run_synthesis(adapter, items, **synth)[1].masks.flatten(1).float()
    reference_s = time.perf_counter() - t0
    reports, seconds, cosines = [], [], []
    for delta in deltas:
        t0 = time.perf_counter()
        candidate.load_state_dict(candidate_state(global_state, delta))
        report = scan_adapter(adapter, items, config, detector, name=type(global_model).__name__, started=t0)
        result = report.synthesis
        reports.append(report)
        if reference is not None:
            cosines.append(torch.nn.functional.cosine_similarity(result.masks.flatten(1).float(), reference, dim=1))
        seconds.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    scan_scores = np.array([r.score for r in reports])
    anomaly = np.array([r.anomaly_index for r in reports])
    log_sizes = np.log(np.array([[max(c.trigger_size, 1e-12) for c in r.per_class] for r in reports]))
    norms = np.array([math.sqrt(float(flatten(d) @ flatten(d))) if d else 0.0 for d in deltas])
    z: dict[str, np.ndarray] = {}
    if use_relative:
        if cosines:
            cos = torch.stack(cosines).numpy()  # (K, C)
            med = np.median(cos, axis=0)
            spread = MAD_CONSISTENCY * np.median(np.abs(cos - med), axis=0) + DRIFT_MIN_SCALE
            drift = (med - cos) / spread  # positive = candidate k's route to class c moved away from the global's
            z["trigger_drift"] = drift.max(axis=1)
        z["scan_score"] = robust_z(scan_scores, min_scale=0.02)
        z["anomaly_index"] = robust_z(anomaly, min_scale=0.25)
        med = np.median(log_sizes, axis=0)
        spread = np.maximum(MAD_CONSISTENCY * np.median(np.abs(log_sizes - med), axis=0), min_log_scale)
        shift = (med - log_sizes) / spread  # (K, C): positive = class c is easier to force in candidate k
        z["class_size_shift"] = shift.max(axis=1)
        shift_class = shift.argmax(axis=1)
        total = np.max(np.stack([z[s] for s in signals]), axis=0)
    overhead = (time.perf_counter() - t0 + reference_s) / len(deltas)  # the global model's scan is shared
    out = []
    for k, report in enumerate(reports):
        evidence: dict[str, Any] = {
            "scan_score": float(report.score),
            "scan_verdict": report.verdict,
            "suspected_target": int(report.suspected_target),
            "anomaly_index": float(report.anomaly_index),
            "signals": {s: float(v) for s, v in report.signals.items()},
            "log_trigger_sizes": [float(x) for x in log_sizes[k]],
            "update_norm": float(norms[k]),
            "relative": use_relative,
        }
        if use_relative:
            evidence["z"] = {s: float(v[k]) for s, v in z.items()}
            evidence["shift_class"] = int(shift_class[k])
            if cosines:
                evidence["mask_cosine_to_global"] = [float(x) for x in cos[k]]
                evidence["drift_class"] = int(drift[k].argmax())
            score, flagged = float(total[k]), bool(total[k] > z_threshold)
        else:
            score, flagged = float(report.score), report.is_backdoored
        out.append(ClientScore(ids[k], k, score, flagged, evidence, seconds[k] + overhead))
    logger.info("screened %d client updates: flagged %s", len(out), [s.client for s in out if s.flagged] or "none")
    return out


def calibrated_scores(
    evidence: ClientEvidence, calibration: ScreenCalibration, client_ids: Sequence[Any] | None = None
) -> list[ClientScore]:
    """[`ClientScore`]s of one round from its measured evidence and a ready calibration.

    The score is the calibrated statistic (largest per-class standardised evidence), ``flagged`` is
    ``p_value <= calibration.target_fpr``; ``evidence`` holds the p-value, where the statistic came from, the update
    norm and the per-class standardised values of every signal.
    """
    ids = list(range(evidence.num_clients)) if client_ids is None else list(client_ids)
    if len(ids) != evidence.num_clients:
        raise ValueError(f"got evidence for {evidence.num_clients} clients but {len(ids)} client_ids")
    verdict = calibration.assess(evidence, client_ids=ids)
    out = []
    for k, cid in enumerate(ids):
        info: dict[str, Any] = {
            "calibrated": True,
            "statistic": float(verdict.statistic[k]),
            "p_value": float(verdict.p_value[k]),
            "target_fpr": calibration.target_fpr,
            "top_signal": verdict.top_signal[k],
            "suspected_target": int(verdict.top_class[k]),
            "update_norm": float(evidence.update_norms[k]),
            "z": {s: [round(float(x), 4) for x in v[k]] for s, v in verdict.z.items()},
        }
        out.append(
            ClientScore(
                cid, k, float(verdict.statistic[k]), bool(verdict.flagged[k]), info, float(evidence.seconds[k])
            )
        )
    logger.info(
        "calibrated screen of %d updates: flagged %s", len(out), [s.client for s in out if s.flagged] or "none"
    )
    return out
