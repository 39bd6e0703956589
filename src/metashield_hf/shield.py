"""Few-shot adaptation of a detector to one target model, and scoring with an honest threshold."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .features import compute_features, loo_features
from .features.reference import Reference, build_reference, reference_without
from .modeling_metashield import MetaShieldDetector
from .probes import LiveEvidence
from .scan.config import ScanConfig
from .scan.erase import ERASE_FLIP_DROP, EraseCheck
from .scan.positives import (
    POSITIVES,
    SynthesizedPositives,
    positives_for,
    positives_from_report,
    synthesized_positives,
)
from .targets import load_target, target_device
from .targets.base import TargetAdapter, TargetOutput

logger = logging.getLogger(__name__)

MIN_CLEAN = 3


_WARNED_SMALL_K: set[tuple[int, float]] = set()  # (k, target FPR) pairs already warned about: said once
CALIBRATIONS = ("quantile", "conformal", "normal", "tolerance")
#: What ``adapt(..., erase=)`` accepts.
ERASES = ("auto", "off")
TOLERANCE_CONFIDENCE = 0.9  # the "tolerance" rule's confidence that the FPR is at most the target


def expected_fpr(calibration_scores: np.ndarray, threshold: float, quantile: float = 0.9) -> dict[str, float]:
    """What FPR a threshold keeps on new clean inputs, from the ``n`` clean scores it was calibrated on.

    For exchangeable clean scores, the chance that a new clean input scores above the ``r``-th smallest calibration
    score is Beta(n + 1 - r, r)-distributed over the draw of the clean samples, whatever the detector: mean
    ``(n + 1 - r) / (n + 1)``. A threshold between the ``r``-th and ``(r+1)``-th scores (the interpolated quantile)
    gets the mean and the ``quantile`` of the two ranks' laws interpolated at its place between them. Leave-one-out
    calibration scores run higher than new clean inputs' scores, so the estimate errs towards more false alarms.

    Returns:
        ``{"mean", "p90" (the ``quantile``), "n", "smallest_honest_fpr"}``; ``smallest_honest_fpr`` is ``1/(n+1)``,
        the mean FPR of the largest clean score as threshold, below which no rank rule can aim.
    """
    from scipy.stats import beta

    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    n = len(scores)
    r = int((scores <= threshold).sum())
    out = {"n": n, "smallest_honest_fpr": 1.0 / (n + 1)}
    if n == 0 or r == 0:
        return {"mean": 1.0, "p90": 1.0, **out}

    def law(rank: int) -> tuple[float, float]:
        a, b = n + 1 - rank, rank
        return a / (a + b), float(beta.ppf(quantile, a, b))

    lo = law(r)
    if r == n:  # at or above the largest score: no next rank to reach
        return {"mean": float(lo[0]), "p90": lo[1], **out}
    hi, frac = law(r + 1), float((threshold - scores[r - 1]) / (scores[r] - scores[r - 1]))
    return {"mean": float(lo[0] + frac * (hi[0] - lo[0])), "p90": float(lo[1] + frac * (hi[1] - lo[1])), **out}


def calibrate_threshold(scores: np.ndarray, target_fpr: float, method: str = "quantile") -> float:
    """Threshold from leave-one-out clean scores.

    - ``"quantile"`` (default): the interpolated ``1 - target_fpr`` quantile, an aim at the target FPR.
    - ``"conformal"``: the ``ceil((n+1)(1-α))``-th smallest score (split-conformal), which guarantees FPR ≤ α for
      exchangeable clean inputs but is the *largest* clean score whenever ``n < 1/α - 1`` (20 samples at α = 0.05),
      and so far more conservative than asked.
    - ``"normal"``: the ``1 - α`` quantile of a normal fitted to the scores' logits (every score informs the tail,
      not the top one or two ranks).
    - ``"tolerance"``: the one-sided normal tolerance bound on the logits: if they are normal, the FPR is at most α
      with probability ``TOLERANCE_CONFIDENCE`` over the draw of the clean samples (noncentral-t factor).

    With ``n`` exchangeable clean scores, a rank rule's FPR is Beta-distributed whatever the detector (at ``n = 20``
    the 95th percentile leaves a 90th-percentile FPR near 0.18); the normal rules trade that spread for an
    assumption on the score distribution.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {method!r}")
    scores = np.asarray(scores, dtype=np.float64)
    if method == "quantile":
        return float(np.quantile(scores, 1.0 - target_fpr))
    n = len(scores)
    if method in ("normal", "tolerance"):
        from scipy.stats import nct, norm

        z = np.log(np.clip(scores, 1e-9, 1 - 1e-9)) - np.log1p(-np.clip(scores, 1e-9, 1 - 1e-9))
        zp = norm.ppf(1.0 - target_fpr)
        factor = (
            zp if method == "normal" else nct.ppf(TOLERANCE_CONFIDENCE, df=n - 1, nc=zp * math.sqrt(n)) / math.sqrt(n)
        )
        bound = z.mean() + factor * (z.std(ddof=1) if n > 1 else 0.0)
        return float(1.0 / (1.0 + math.exp(-bound)))
    k = math.ceil((n + 1) * (1.0 - target_fpr))
    if k > n:
        logger.warning(
            "%d clean samples cannot certify FPR %.3f (need %d); using the largest clean score as threshold",
            n,
            target_fpr,
            math.ceil(1.0 / target_fpr) - 1,
        )
        k = n
    return float(np.sort(scores)[k - 1])


def augmented_outputs(
    adapter: TargetAdapter, clean_samples, copies: int, *, seed: int = 0
) -> tuple[TargetOutput, torch.Tensor]:
    """The target's outputs on ``copies`` augmented copies of each clean sample (``adapter.perturb(..., "augment")``)
    and each copy's clean sample index."""
    items = adapter.prepare_items(clean_samples)
    bounds = adapter.input_range(items)
    rng = np.random.default_rng([seed, 0xA06])
    made, origin = [], []
    for i, item in enumerate(items):
        for _ in range(copies):
            made.append(adapter.perturb(item, "augment", rng=rng, bounds=bounds))
            origin.append(i)
    return adapter(made), torch.as_tensor(origin, dtype=torch.long)


def augmented_scores(shield: AdaptedShield, out: TargetOutput, origin: torch.Tensor) -> np.ndarray:
    """Scores of augmented copies of the shield's clean samples, each against the reference without its origin (the
    footing of its origin's leave-one-out score)."""
    ref, feats = shield.reference, shield.reference_features
    scores = np.empty(len(out))
    for i in torch.unique(origin).tolist():
        if not 0 <= i < ref.num_samples:
            raise ValueError(f"augmented copy of clean sample {i}, but the shield has {ref.num_samples}")
        rows = (origin == i).nonzero().flatten()
        psi = compute_features(out.penultimate[rows], out.logits[rows], reference_without(ref, i), shield.groups,
                               seed=shield.seed)  # fmt: skip
        if psi.shape[1] < feats.shape[1]:  # live-probe columns: the clean samples' mean, as for pseudo-anomalies
            psi = torch.cat([psi, feats[:, psi.shape[1] :].mean(0, keepdim=True).expand(len(psi), -1)], 1)
        others = torch.cat([feats[:i], feats[i + 1 :]])
        scores[rows.numpy()] = shield.score_features(psi, others).numpy()
    return scores


@dataclass
class AdaptedShield:
    """A detector adapted to one target model: reference statistics, adapted weights and a calibrated threshold.

    Use :meth:`score` for scores in ``[0, 1]`` (higher = more likely triggered) and :meth:`predict` for decisions.
    ``fpr_estimate`` says what false-positive rate the threshold keeps (mean and 90th percentile over draws of the
    clean samples, [`expected_fpr`]); ``positives`` what the inner loop's positives were (``None``: pseudo-anomalies
    by request). ``erase`` is the erase check of the synthesized trigger ([`EraseCheck`]) when the shield uses it:
    an input's score is then the larger of the detector's score and the check's probability drop, and
    ``erase_note`` says why the check is off otherwise.
    """

    detector: MetaShieldDetector
    target: TargetAdapter | None
    reference: Reference
    reference_features: torch.Tensor
    threshold: float
    target_fpr: float
    calibration_scores: np.ndarray
    groups: tuple[str, ...] | None = None
    seed: int = 0
    params: dict[str, torch.Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    evidence: LiveEvidence | None = None
    positives: SynthesizedPositives | None = None
    fpr_estimate: dict[str, float] = field(default_factory=dict)
    augmented_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    erase: EraseCheck | None = None
    erase_note: str = ""

    def features(self, inputs) -> tuple[TargetOutput, torch.Tensor]:
        """Run the target (once, plus the live probes' passes when the detector reads them) and return its
        activations and the detector's features relative to the clean samples: ψ, then the live evidence."""
        if self.target is None:
            raise ValueError("this shield was adapted from activations; use features_of(outputs) instead")
        if self.evidence is None:
            return self.features_of(self.target(inputs))
        items = self.target.prepare_items(inputs)
        out = self.target(items, layers=self.evidence.needs_layers)
        live = self.evidence.features(items, out)
        return out, torch.cat([self.features_of(out)[1], live], 1)

    def features_of(self, out: TargetOutput) -> tuple[TargetOutput, torch.Tensor]:
        """ψ of already computed target outputs, relative to the clean reference."""
        return out, compute_features(out.penultimate, out.logits, self.reference, self.groups, seed=self.seed)

    @torch.no_grad()
    def score_features(self, features: torch.Tensor, reference_features: torch.Tensor | None = None) -> torch.Tensor:
        ref = self.reference_features if reference_features is None else reference_features
        if self.params is None:
            return self.detector(features=features, reference_features=ref).scores
        return torch.func.functional_call(self.detector, self.params, (features, ref)).scores

    def score(self, inputs) -> np.ndarray:
        """Scores in ``[0, 1]`` for a batch of raw inputs (any type the target adapter accepts)."""
        return self.scored(inputs)[1].numpy()

    def scored(self, inputs) -> tuple[TargetOutput, torch.Tensor]:
        """The target's outputs on ``inputs`` and their scores: the detector's, or with the erase check on, the larger
        of the detector's and the check's probability drop."""
        if self.erase is not None:
            inputs = self.target.prepare_items(inputs)
        out, feats = self.features(inputs)
        scores = self.score_features(feats)
        drops = self.erase_drops(inputs, out.logits)
        return out, scores if drops is None else torch.maximum(scores, drops.to(scores.dtype))

    def erase_drops(self, items, logits: torch.Tensor) -> torch.Tensor | None:
        """The erase check's probability drops on prepared ``items`` whose target ``logits`` are known (one forward
        pass of the erased copies); ``None`` with the check off."""
        if self.erase is None:
            return None
        return torch.as_tensor(self.erase.drops(self.target, items, logits))

    def predict(self, inputs) -> list[dict]:
        """One ``{"label", "score", "threshold", "predicted_class"}`` dict per input."""
        out, scores = self.scored(inputs)
        return self.decide(scores, out.logits)

    def decide(self, scores: torch.Tensor, logits: torch.Tensor) -> list[dict]:
        classes = logits.argmax(-1).tolist()
        return [
            {
                "label": "backdoored" if s > self.threshold else "clean",
                "score": float(s),
                "threshold": self.threshold,
                "predicted_class": int(c),
            }
            for s, c in zip(scores.tolist(), classes, strict=True)
        ]


def _count(samples) -> int | None:
    try:
        return len(samples)
    except TypeError:
        return None


def adapt(
    detector: MetaShieldDetector,
    target,
    clean_samples,
    *,
    steps: int | None = None,
    lr: float | None = None,
    target_fpr: float = 0.05,
    seed: int = 0,
    processor=None,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    calibration: str = "quantile",
    probe_passes: int | None = None,
    positives: str = "auto",
    scan_report=None,
    synthesis: ScanConfig | None = None,
    calibration_copies: int = 0,
    erase: str = "auto",
    device: str | None = None,
) -> AdaptedShield:
    """Adapt ``detector`` to ``target`` from clean samples only.

    Args:
        detector: a (meta-trained) [`MetaShieldDetector`].
        target: anything `load_target` accepts: a Hub id, a local folder, a model object or a target adapter.
        clean_samples: 5–50 clean inputs of the target's modality (list, tensor batch, `datasets.Dataset` or column).
        steps: inner-loop steps on the clean support and generic pseudo-anomalies (0 = reference statistics only;
            ``None`` = ``detector.config.adapt_steps``, what the detector was meta-trained with).
        lr: inner-loop learning rate (``None`` = ``detector.config.adapt_lr``).
        target_fpr: false-positive rate the threshold is calibrated for.
        seed: seeds the features' perturbations and the pseudo-anomalies.
        processor: tokenizer / image processor when ``target`` is a model object that needs one.
        batch_size: batch size of the target's forward passes.
        trust_remote_code: passed to the target loader; off unless you trust the checkpoint.
        allow_pickle: accept pickle-only weights (``pytorch_model.bin``); off unless you trust the files.
        calibration: ``"quantile"`` (aims at ``target_fpr``), ``"conformal"`` (guarantees it; conservative),
            ``"normal"`` or ``"tolerance"`` (normal fits to the clean scores' logits); see [`calibrate_threshold`].
        probe_passes: the most extra forward passes per input the detector's live probes may spend (``None``: the
            budget it was trained with); a budget below what its probes need is an error, since the detector reads
            every probe's features (a one-pass detector runs none).
        positives: the inner loop's positives: ``"auto"`` (the default: synthesized for image and tensor models,
            pseudo for text), ``"pseudo"`` (generic pseudo-anomalies in activation space) or ``"synthesized"``
            (the clean samples with the trigger the scan's synthesis finds for the class easiest to force,
            [`synthesized_positives`]; pseudo-anomalies when the synthesis reaches no class, recorded in
            ``shield.positives``). Text models get pseudo-anomalies under ``"auto"``: the text synthesis runs in
            embedding space, and its positives cost text models detection (``benchmarks/input_detection/README.md``).
        scan_report: a [`ScanReport`] of this model: its synthesized triggers are the positives (nothing is
            synthesized again); implies ``positives="synthesized"``. A report of another model is refused.
        synthesis: the synthesis budget ([`ScanConfig`]; default: the scan's own).
        calibration_copies: mild label-preserving copies of each clean sample (``TargetAdapter.perturb(...,
            "augment")``: shifted and noisy images, a dropped word) whose scores join the leave-one-out clean scores
            the threshold is calibrated on. Each copy is scored against the reference without its origin, as its
            origin is. More scores smooth the rank rule's steps, but copies are not new draws of the clean
            distribution: ``fpr_estimate`` still counts the ``k`` samples only. Needs a one-pass detector.
        erase: the erase check of the synthesized trigger ([`EraseCheck`]; one extra forward pass per input):
            ``"auto"`` (the default) uses it when the positives were synthesized in the model's input space and
            erasing the trigger's region drops the target class's probability by ``ERASE_FLIP_DROP`` on at most
            ``max(1, ⌊target_fpr·k⌋)`` of the ``k`` clean samples ([`use_erase`]); ``"off"`` never. The clean samples' drops join their calibration
            scores, so the threshold covers both; ``shield.erase_note`` says why the check is off.
        device: where the target runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; [`resolve_device`]); ``None``: CUDA
            when present for a checkpoint named by path or Hub id, and a model object stays where it is.

    Returns:
        An [`AdaptedShield`]. Its threshold comes from leave-one-out scores of the clean samples, so the FPR estimate
        is not optimistic; ``shield.fpr_estimate`` gives its mean and spread.

    Example:
        ```python
        >>> shield = detector.adapt(model, clean_images[:20], target_fpr=0.05)
        >>> shield.predict(test_images)[0]
        {'label': 'clean', 'score': 0.12, 'threshold': 0.61, 'predicted_class': 3}
        ```
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    steps = detector.config.adapt_steps if steps is None else steps
    lr = detector.config.adapt_lr if lr is None else lr
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if erase not in ERASES:
        raise ValueError(f"erase must be one of {ERASES}, got {erase!r}")
    if calibration_copies < 0:
        raise ValueError(f"calibration_copies must be >= 0, got {calibration_copies}")
    if calibration_copies and detector.config.probes:
        raise ValueError("calibration_copies needs a one-pass detector (this one reads live probes)")
    n = _count(clean_samples)
    if n is not None and n < MIN_CLEAN:
        raise ValueError(
            f"need at least {MIN_CLEAN} clean samples to adapt (5-50 recommended), got {n}; "
            "pass more clean inputs of the target's modality"
        )
    t0 = time.perf_counter()
    adapter = load_target(
        target,
        processor,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=target_device(target, device),
    )
    evidence, live_ref = None, None
    if detector.config.probes:
        clean_samples = adapter.prepare_items(clean_samples)  # what the probes perturb, and scored the same way
        budget = detector.config.probe_passes if probe_passes is None else probe_passes
        evidence = LiveEvidence(detector.config.probes, probe_passes=budget, seed=seed)
    clean_out = adapter(clean_samples, layers=evidence is not None and evidence.needs_layers)
    if evidence is not None:
        live_ref = evidence.fit(adapter, clean_samples, out=clean_out).support_features()
    found = None
    positives = positives_for(positives, adapter.modality)
    if steps > 0 and (scan_report is not None or positives == "synthesized"):
        items = clean_samples if evidence is not None else adapter.prepare_items(clean_samples)
        if scan_report is not None:
            found = positives_from_report(scan_report, adapter, items, seed=seed)
        else:
            found = synthesized_positives(adapter, items, clean_out, config=synthesis, seed=seed)
        if found.outputs is None:
            logger.warning("synthesized positives: %s; the inner loop uses pseudo-anomalies", found.reason)
    augmented_out, origin = None, None
    if calibration_copies:
        augmented_out, origin = augmented_outputs(adapter, clean_samples, calibration_copies, seed=seed)
    head = adapter.head
    shield = adapt_from_activations(
        detector,
        clean_out,
        head.weight.detach().float(),
        None if head.bias is None else head.bias.detach().float(),
        steps=steps,
        lr=lr,
        target_fpr=target_fpr,
        seed=seed,
        calibration=calibration,
        target=adapter,
        live_reference_features=live_ref,
        anomaly_out=None if found is None else found.outputs,
        augmented_out=augmented_out,
        augmented_origin=origin,
    )
    shield.evidence = evidence
    shield.positives = found
    if erase == "auto" and found is not None:  # `items`: the prepared clean samples the positives were made on
        check, shield.erase_note = EraseCheck.from_positives(adapter, items, found)
        if check is not None:
            use_erase(shield, check, check.drops(adapter, items, clean_out.logits), calibration)
    elif erase == "auto":
        shield.erase_note = "no synthesized positives"
    else:
        shield.erase_note = "off by request"
    shield.timings["adapt_s"] = time.perf_counter() - t0
    return shield


def use_erase(
    shield: AdaptedShield, check: EraseCheck, support_drops: np.ndarray, calibration: str = "quantile"
) -> bool:
    """Turn ``check`` on for ``shield`` unless erasing moves its clean samples: at most ``max(1, ⌊target_fpr·k⌋)``
    of the ``k`` may drop by ``ERASE_FLIP_DROP`` or more. Their drops then join their leave-one-out scores (the larger
    of the two per sample), and the threshold and its FPR estimate are recalibrated, so a clean sample the erasure
    moves raises the threshold rather than the false alarms. Returns whether the check is on."""
    drops = np.asarray(support_drops, dtype=np.float64)
    flips = int((drops >= ERASE_FLIP_DROP).sum())
    if flips > max(1, math.floor(shield.target_fpr * len(drops))):
        shield.erase_note = f"erasing the synthesized trigger's region flips {flips} of {len(drops)} clean samples"
        return False
    shield.erase, shield.erase_note = check, ""
    shield.calibration_scores = np.maximum(shield.calibration_scores, drops)
    pool = np.concatenate([shield.calibration_scores, shield.augmented_scores])
    shield.threshold = calibrate_threshold(pool, shield.target_fpr, calibration)
    shield.fpr_estimate = expected_fpr(shield.calibration_scores, shield.threshold)
    return True


def adapt_after_scan(
    detector: MetaShieldDetector,
    target,
    clean_samples,
    *,
    scan_config: ScanConfig | None = None,
    processor=None,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    device: str | None = None,
    **adapt_options,
):
    """Scan a checkpoint, then protect it with the scan's synthesized triggers as the inner loop's positives: the
    ``scan_first`` flow of the pipeline and of ``metashield detect``. The checkpoint is loaded and synthesized once.

    Args:
        detector: the input-level detector to adapt (the scan scores with the embedded one-pass detector).
        target, clean_samples, processor, batch_size, trust_remote_code, allow_pickle, seed, device: as in [`adapt`].
        scan_config: the scan's options (default: ``ScanConfig()``); its seed is ``seed``.
        **adapt_options: the rest of [`adapt`]'s options.

    Returns:
        ``(ScanReport, AdaptedShield)``.
    """
    from .scan.scanner import checkpoint_name, prepare_clean_items, scan_adapter

    config = (scan_config or ScanConfig()).replace(seed=seed)
    adapter = load_target(
        target,
        processor,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=target_device(target, device if device is not None else config.device),
    )
    items = prepare_clean_items(adapter, clean_samples, config.n, seed)
    report = scan_adapter(adapter, items, config, name=checkpoint_name(target))
    return report, adapt(detector, adapter, clean_samples, scan_report=report, seed=seed, **adapt_options)


def adapt_from_activations(
    detector: MetaShieldDetector,
    clean_out: TargetOutput,
    head_weight: torch.Tensor | None,
    head_bias: torch.Tensor | None,
    *,
    steps: int = 0,
    lr: float = 0.05,
    target_fpr: float = 0.05,
    seed: int = 0,
    calibration: str = "quantile",
    target: TargetAdapter | None = None,
    params: dict[str, torch.Tensor] | None = None,
    anomaly_out: TargetOutput | None = None,
    reference_features: torch.Tensor | None = None,
    anomaly_features: torch.Tensor | None = None,
    live_reference_features: torch.Tensor | None = None,
    augmented_out: TargetOutput | None = None,
    augmented_origin: torch.Tensor | None = None,
) -> AdaptedShield:
    """The core of [`adapt`] on activations already computed (used by meta-training, evaluation and the FL screen).

    Args:
        clean_out: the target's outputs on the clean samples.
        head_weight, head_bias: the target's classification head.
        params: start from these detector parameters instead of the detector's own (e.g. meta-learned fast weights).
        anomaly_out: outputs on triggered inputs to use in the inner loop instead of pseudo-anomalies: synthesized
            triggers ([`synthesized_positives`]), or true ones in the ``oracle`` ablation (deployment never has
            triggered examples).
        reference_features: ``(N, F)`` leave-one-out ψ of ``clean_out`` already computed (with this ``seed`` and the
            detector's groups), e.g. by an evaluation episode shared by several detectors; skips recomputing it.
        anomaly_features: ``(m, F)`` ψ of the inner loop's positives already computed (replaces ``anomaly_out`` and
            the pseudo-anomalies).
        live_reference_features: ``(N, F_live)`` the clean samples' live-probe features
            (`metashield_hf.probes.LiveEvidence.support_features`), appended to ψ for a detector that reads them;
            the pseudo-anomalies get the clean samples' mean there (they are made in ψ space only).
        augmented_out, augmented_origin: outputs on augmented copies of the clean samples ([`augmented_outputs`])
            and, per copy, the index of its clean sample; their scores join the calibration scores.
        Others: as in [`adapt`].
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if len(clean_out) < MIN_CLEAN:
        raise ValueError(f"need at least {MIN_CLEAN} clean samples to adapt (5-50 recommended), got {len(clean_out)}")
    if len(clean_out) < 5:
        logger.warning("only %d clean samples: thresholds from fewer than 5 are unreliable", len(clean_out))
    t0 = time.perf_counter()
    detector.eval()
    groups = tuple(detector.config.feature_groups) if detector.config.feature_groups else None
    ref = build_reference(clean_out.penultimate, clean_out.logits, head_weight, head_bias)
    ref_feats = loo_features(ref, groups, seed=seed) if reference_features is None else reference_features
    live_fill = None
    if live_reference_features is not None and reference_features is None:
        ref_feats = torch.cat([ref_feats, live_reference_features.float()], 1)
        live_fill = live_reference_features.float().mean(0, keepdim=True)
    if ref_feats.shape[1] != detector.config.feature_dim:
        raise ValueError(
            f"the detector expects {detector.config.feature_dim} features but the feature groups {groups} give "
            f"{ref_feats.shape[1]}; the detector was saved with another ψ layout"
        )
    t_ref = time.perf_counter()
    if steps > 0:
        from .meta.inner import inner_loop, make_pseudo_features

        if anomaly_features is not None:
            anomalies = anomaly_features
        elif anomaly_out is not None:
            anomalies = compute_features(anomaly_out.penultimate, anomaly_out.logits, ref, groups, seed=seed)
        else:
            anomalies = make_pseudo_features(ref, max(len(clean_out), 8), groups, seed)
        if live_fill is not None and anomalies.shape[1] < ref_feats.shape[1]:
            anomalies = torch.cat([anomalies, live_fill.expand(len(anomalies), -1)], 1)
        base = params if params is not None else dict(detector.named_parameters())
        start = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}
        with torch.enable_grad():
            adapted = inner_loop(detector, start, ref_feats, anomalies, ref_feats, steps=steps, lr=lr)
        params = {k: v.detach() for k, v in adapted.items()}

    shield = AdaptedShield(detector, target, ref, ref_feats, 0.0, target_fpr, np.empty(0), groups, seed, params)
    # Leave-one-out at the detector level too: clean sample i is scored against the other clean samples only.
    loo = [
        shield.score_features(ref_feats[i : i + 1], torch.cat([ref_feats[:i], ref_feats[i + 1 :]])).item()
        for i in range(len(ref_feats))
    ]
    shield.calibration_scores = np.asarray(loo)
    pool = shield.calibration_scores
    if augmented_out is not None and len(augmented_out):
        if augmented_origin is None or len(augmented_origin) != len(augmented_out):
            raise ValueError("augmented_out needs augmented_origin, the clean sample index of each copy")
        shield.augmented_scores = augmented_scores(shield, augmented_out, augmented_origin)
        pool = np.concatenate([pool, shield.augmented_scores])
    shield.threshold = calibrate_threshold(pool, target_fpr, calibration)
    shield.fpr_estimate = expected_fpr(shield.calibration_scores, shield.threshold)
    if target_fpr < shield.fpr_estimate["smallest_honest_fpr"] and (len(loo), target_fpr) not in _WARNED_SMALL_K:
        _WARNED_SMALL_K.add((len(loo), target_fpr))
        logger.warning(
            "%d clean samples cannot calibrate FPR %.3f: the smallest honest rate is 1/(k+1) = %.3f; expect an FPR "
            "near %.3f (90th percentile over draws %.3f); pass at least %d clean samples for this rate",
            len(loo), target_fpr, shield.fpr_estimate["smallest_honest_fpr"], shield.fpr_estimate["mean"],
            shield.fpr_estimate["p90"], math.ceil(1.0 / target_fpr) - 1,
        )  # fmt: skip
    shield.timings = {"reference_s": t_ref - t0, "adapt_s": time.perf_counter() - t0}
    return shield
