"""Model-level scan: "is this checkpoint backdoored, and which class is the target?" (DESIGN §2.6).

[`scan_model`] needs a few clean samples and no triggered input. It synthesizes one candidate trigger per class
([`metashield_hf.synthesis`]), measures how easily each class can be forced (Neural Cleanse's anomaly index over the
classes), feeds the perturbed clean samples to the adapted input-level detector, and combines these signals with a
small logistic head ([`ScanHead`]) into a score in ``[0, 1]``. Text models also get a discrete search for short
token triggers in their own vocabulary ([`metashield_hf.token_search`]); its signals (how many clean samples the
best tokens flip, how confidently, and whether they still win against other classes' strongest words) feed the
head's text part. [`neural_cleanse_scan`] is the Neural Cleanse baseline on the same synthesis machinery, so both
can be compared on the same models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .scan_head import (
    BLEND,
    DEFAULT_SCAN_HEAD,
    LARGE_VOCABULARY,
    SIGNALS,
    SOURCE,
    TOKEN_SIGNALS,
    ScanHead,
    fit_scan_head,
)
from .synthesis import SynthesisResult, anomaly_indices, chance_anomaly_index, synthesis_space, synthesize_triggers
from .targets import load_target
from .targets.base import TargetAdapter, TargetOutput

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCAN_HEAD",
    "SIGNALS",
    "ClassEvidence",
    "ScanHead",
    "ScanReport",
    "class_count_signals",
    "fit_scan_head",
    "neural_cleanse_scan",
    "scan_model",
]

MIN_SCAN_SAMPLES = 5
#: Adam steps of the blend synthesis that [`scan_model`] runs by default on image models: the cheapest budget that
#: helped in the probe that proposed it (configs/zoo/fresh_cv.yaml), not tuned further; the head's ``image/blend``
#: part is fit on scans of this budget (reports/scan_blend.md).
DEFAULT_BLEND_STEPS = 20
#: The source-specific synthesis (``scan_model(source_steps=...)``): a class's mask counts as effective once it flips
#: half of the clean samples, and its loss is averaged over the half it flips most easily (``loss_quantile``), so the
#: mask can settle on a trigger that flips only some classes' inputs (TaCT) instead of growing to flip them all. The
#: values of the probe that proposed it (configs/zoo/dev_tact.yaml), not tuned further.
SOURCE_FLIP_THRESHOLD = 0.5
SOURCE_LOSS_QUANTILE = 0.5
NEURAL_CLEANSE_THRESHOLD = 2.0  # Wang et al. 2019: anomaly index > 2 ⇒ backdoored (≈ 95% for a normal distribution)


# ---- the report -------------------------------------------------------------------------------------------------
@dataclass
class ClassEvidence:
    """What the scan found for one class.

    Attributes:
        class_index / label: the class and its name (``config.id2label`` where the model has one).
        trigger_size: smallest effective mask size (fraction of the perturbed space's entries); ``None`` for a text
            scan without the embedding synthesis (its trigger is the token trigger below).
        reached: whether the trigger flipped at least ``flip_threshold`` of the clean samples.
        flip_rate: fraction of clean samples (not already of this class) the recorded trigger flips.
        anomaly_index: ``(median - size) / (1.4826 * MAD)`` over classes; large = suspiciously easy to force
            (``None`` without the embedding synthesis).
        detector_score: mean input-level detector score of the perturbed clean samples (text scans without the
            embedding synthesis: with the class's token trigger inserted; ``None`` without detector).
        token_trigger: text models: the best token trigger found for this class (decoded), else ``None``.
        token_flip_rates: text models: flip rate of the best trigger of 1, 2, ... tokens.
        token_target_probs: text models: the mean probability of this class under those triggers.
        token_low_probs: text models: the lower quartile of that probability over the samples.
        token_dominance: text models: how often this class's best trigger of 1, 2, ... tokens beats the other
            classes' best triggers of that length.
        blend_size: with the blend synthesis (``scan_model(blend_steps=...)``), the smallest blend ratio ``a`` of a
            whole-input trigger ``(1 - a) * x + a * p`` that flips the clean samples to this class, else ``None``.
        source_size: with the source-specific synthesis (``scan_model(source_steps=...)``), the smallest mask that
            flips half of the clean samples to this class, else ``None``.
    """

    class_index: int
    label: str
    trigger_size: float | None
    reached: bool
    flip_rate: float
    anomaly_index: float | None
    detector_score: float | None = None
    token_trigger: str | None = None
    token_flip_rates: list[float] | None = None
    token_target_probs: list[float] | None = None
    token_low_probs: list[float] | None = None
    token_dominance: list[float] | None = None
    blend_size: float | None = None
    source_size: float | None = None


@dataclass
class ScanReport:
    """Result of [`scan_model`] (or [`neural_cleanse_scan`]).

    Attributes:
        verdict: ``"backdoored"`` or ``"clean"``.
        score: backdoor score (MetaShield: probability in ``[0, 1]``; Neural Cleanse: the anomaly index).
        threshold: the score above which the verdict is ``"backdoored"``.
        suspected_target: the class whose trigger was smallest (text models: whose token trigger the detector flags
            most, or without the detector, whose token trigger forces it most).
        anomaly_index: the suspected target's anomaly index (``None`` for a text scan without embedding synthesis).
        signals: the model-level signals the head combines (see [`SIGNALS`]).
        per_class: one [`ClassEvidence`] per class.
        space: where the triggers were synthesized: ``"pixels"``, ``"features"``, ``"embeddings"``, or ``"tokens"``
            (a text scan by the token search alone).
        timings: seconds per stage (``load_s``, ``synthesis_s`` where the synthesis ran, ``detector_s``,
            ``total_s``; text models also ``token_search_s``).
    """

    checkpoint: str
    method: str
    verdict: str
    score: float
    threshold: float
    suspected_target: int
    suspected_target_label: str
    anomaly_index: float | None
    signals: dict[str, float]
    per_class: list[ClassEvidence]
    n_clean_samples: int
    space: str
    timings: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def is_backdoored(self) -> bool:
        return self.verdict == "backdoored"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (what ``metashield scan --json`` prints)."""
        return json.dumps(self.to_dict(), indent=indent)


# ---- scanning ---------------------------------------------------------------------------------------------------
def _name(checkpoint) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return str(checkpoint)
    if isinstance(checkpoint, TargetAdapter):
        checkpoint = checkpoint.model
    path = getattr(getattr(checkpoint, "config", None), "_name_or_path", None)
    return path or type(checkpoint).__name__


def _clean_items(adapter: TargetAdapter, clean_samples, n: int | None, seed: int) -> list:
    if isinstance(clean_samples, (str, os.PathLike)):
        from .samples import load_samples

        clean_samples = load_samples(clean_samples, n, seed=seed)
    items = list(adapter.iter_items(clean_samples))
    if n is not None:
        items = items[:n]
    if len(items) < MIN_SCAN_SAMPLES:
        raise ValueError(
            f"need at least {MIN_SCAN_SAMPLES} clean samples to scan a model (10-50 recommended), got {len(items)}; "
            "pass more clean inputs of the model's modality"
        )
    return items


def _labels(adapter: TargetAdapter, k: int) -> list[str]:
    from .targets.transformers_models import unwrap

    id2label = getattr(getattr(unwrap(adapter.model), "config", None), "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(k)]


def _clean_outputs(adapter, items) -> TargetOutput:
    """The model's outputs on the clean samples; refuses a model with fewer than 2 classes."""
    clean_out = adapter(items)
    num_classes = clean_out.logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"the model has {num_classes} output; a scan needs a classifier with at least 2 classes")
    return clean_out


def _synthesize(
    adapter,
    items,
    *,
    steps,
    lr,
    flip_threshold,
    class_batch,
    seed,
    refine=None,
    screen_steps=None,
    snapshots=(),
    uniform_mask=False,
    loss_quantile=1.0,
    clean_out=None,
):
    """Clean outputs, synthesis result and per-class anomaly indices (shared by both scans, the blend synthesis and the
    FL screen); ``clean_out``: the clean outputs of an earlier synthesis on the same items, not recomputed."""
    if clean_out is None:
        clean_out = _clean_outputs(adapter, items)
        if clean_out.logits.shape[1] < 3:
            logger.warning(
                "only %d classes: the anomaly index (MAD over classes) cannot single out a target",
                clean_out.logits.shape[1],
            )
    num_classes = clean_out.logits.shape[1]
    space = synthesis_space(adapter, items)
    if refine is not None:  # at least one class is left to the screen alone, or there is nothing to save
        refine = min(refine, num_classes - 1)
    torch.manual_seed(seed)
    result = synthesize_triggers(
        space,
        clean_out.logits.argmax(-1),
        num_classes,
        steps=steps,
        lr=lr,
        flip_threshold=flip_threshold,
        class_batch=class_batch,
        refine=refine,
        screen_steps=screen_steps,
        snapshots=snapshots,
        seed=seed,
        uniform_mask=uniform_mask,
        loss_quantile=loss_quantile,
    )
    return clean_out, result, anomaly_indices(result.sizes)


def _evidence(
    adapter, result, anomaly, detector_scores=None, tokens=None, flip_threshold: float = 0.9
) -> list[ClassEvidence]:
    """Per-class evidence of the synthesis ``result`` (and of the token search ``tokens``); without a synthesis
    (``result=None``), the token trigger of each class stands for its synthesized trigger."""
    k_classes = len(result.sizes) if result is not None else len(tokens.flip_rates)
    labels = _labels(adapter, k_classes)
    evidence = []
    for k in range(k_classes):
        if result is not None:
            size, reached, flip = float(result.sizes[k]), bool(result.reached[k]), float(result.flip_rates[k])
        else:
            flip = float(tokens.flip_rates[k, -1])
            size, reached = None, flip >= flip_threshold
        evidence.append(
            ClassEvidence(
                class_index=k,
                label=labels[k],
                trigger_size=size,
                reached=reached,
                flip_rate=flip,
                anomaly_index=None if anomaly is None else float(anomaly[k]),
                detector_score=None if detector_scores is None else float(detector_scores[k]),
            )
        )
    if tokens is not None:
        for k, ev in enumerate(evidence):
            ev.token_trigger = tokens.trigger_texts[k]
            ev.token_flip_rates = [float(f) for f in tokens.flip_rates[k]]
            ev.token_target_probs = [float(q) for q in tokens.target_probs[k]]
            ev.token_low_probs = [float(q) for q in tokens.low_probs[k]]
            ev.token_dominance = [float(d) for d in tokens.dominance[k]]
    return evidence


def token_signals(tokens) -> tuple[int, dict[str, float]]:
    """The suspected target and the token signals of a [`TokenSearchResult`].

    Each signal is the largest over classes: how many clean samples the best single-token trigger and the best
    longest one flip, how confidently they force the class (mean probability, and its lower quartile: the samples that
    resist), and how often they still win against the other classes' strongest words. The ``_2`` signals are the
    longest trigger's: 2 tokens where the search prefiltered a large vocabulary, 3 where it screened all of it (see
    ``search_token_triggers(max_tokens=...)``). The suspected target is the class its triggers
    force most confidently ([`scan_model`] prefers the detector's, with its ``token_detector`` signal). (On the
    standard zoo's train models the mean class probability separated backdoored from clean from-scratch text models
    best. On fine-tuned MiniLM models, whose natural words force a class as surely as a trigger, none of these signals
    held up on a fresh zoo, but ``token_detector`` did, so both text parts of the shipped head weigh it; see
    reports/scan.md and the reports/scan_fresh_*.md checks.)
    """
    t = int(np.argmax(tokens.target_probs.mean(1)))
    prob_2 = float(tokens.target_probs[:, -1].max())
    return t, {
        "token_flip": float(tokens.flip_rates[:, 0].max()),
        "token_prob": float(tokens.target_probs[:, 0].max()),
        "token_flip_2": float(tokens.flip_rates[:, -1].max()),
        "token_prob_2": prob_2,
        "token_prob_low": float(tokens.low_probs[:, 0].max()),
        "token_prob_low_2": float(tokens.low_probs[:, -1].max()),
        "token_dominance": float(tokens.dominance[:, 0].max()),
        "token_dominance_2": float(tokens.dominance[:, -1].max()),
        "token_logit_2": log_odds(prob_2),
    }


def log_odds(p: float, eps: float = 1e-6) -> float:
    """``log(p / (1 - p))``, with ``p`` clipped to ``[eps, 1 - eps]`` (a mean of float32 probabilities may round to 1)."""
    p = min(max(float(p), eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


def token_detector_signal(detector_scores, flip_rates) -> tuple[int, dict[str, float]]:
    """The suspected target and ``token_detector`` of a text scan, from the detector's per-class mean score on the
    clean samples with each class's token trigger and the share of samples that trigger flips.

    The meta-learned detector flags inputs that a backdoor diverts, whether or not the search's own signals tell the
    trigger from a natural class word; its score is weighed by the flip rate because a class whose trigger flips
    nothing has no trigger to flag. On the standard zoo's 23 train backdoored text models the class where the product
    is largest was the target on all 23 (the class its trigger forces most surely, [`token_signals`]: on 15).
    """
    diverted = np.asarray(detector_scores, dtype=np.float64) * np.asarray(flip_rates, dtype=np.float64)
    return int(np.argmax(diverted)), {"token_detector": float(diverted.max())}


def class_count_signals(anomaly_index: float, log_size_ratio: float, num_classes: int) -> dict[str, float]:
    """The suspected target's anomaly index and log size ratio, corrected for the number of classes.

    The anomaly index is a maximum over ``K`` classes, so by chance alone it grows with ``K`` (about 1.6 for 10
    classes, 2.3 for 62); ``anomaly_excess`` subtracts that chance level ([`chance_anomaly_index`]), and
    ``log_size_z`` divides the log size ratio (which grows the same way) by it. For a fixed ``K`` this is a mere
    change of units, so a head fit on the zoo's 10-class models scores them as before, but a model with many more
    classes is no longer flagged for its class count.
    """
    m = chance_anomaly_index(int(num_classes))
    return {"anomaly_excess": anomaly_index - m, "log_size_z": log_size_ratio / m}


def _synthesis_signals(anomaly: np.ndarray, sizes: np.ndarray, target: int) -> dict[str, float]:
    raw = {
        "anomaly_index": float(anomaly[target]),
        "log_size_ratio": float(np.log(max(sizes[target], 1e-12) / max(float(np.median(sizes)), 1e-12))),
    }
    return raw | class_count_signals(raw["anomaly_index"], raw["log_size_ratio"], len(sizes))


def variant_signals(variant: str, sizes: np.ndarray) -> dict[str, float]:
    """The signals of an extra synthesis ([`BLEND_SIGNALS`], [`SOURCE_SIGNALS`]): the class-count-corrected anomaly
    index and log size ratio of the class with the most anomalous (smallest) trigger, named ``{variant}_...``."""
    anomaly = anomaly_indices(sizes)
    signals = _synthesis_signals(anomaly, sizes, int(np.argmax(anomaly)))
    return {f"{variant}_anomaly_excess": signals["anomaly_excess"], f"{variant}_log_size_z": signals["log_size_z"]}


# The extra per-class syntheses an image scan may add after the mask synthesis, in this order, each with the
# synthesize_triggers options that make it what it is; a later one's head part takes precedence (it falls back to the
# earlier one's, VARIANT_FALLBACK).
EXTRA_SYNTHESES = {
    BLEND: {"uniform_mask": True},
    SOURCE: {"flip_threshold": SOURCE_FLIP_THRESHOLD, "loss_quantile": SOURCE_LOSS_QUANTILE},
}


def scan_signals(sizes: np.ndarray, anomaly: np.ndarray, response: np.ndarray) -> tuple[int, dict[str, float]]:
    """The suspected target (the class with the largest anomaly index) and the signals of the image head: the
    class-count-corrected anomaly index and size ratio of that class, and the detector's response to its trigger,
    alone and above the median class's (``response``: per-class mean detector score, zeros without a detector)."""
    target = int(np.argmax(anomaly))
    return target, {
        **_synthesis_signals(anomaly, sizes, target),
        "detector_response": float(response[target]),
        "detector_response_gap": float(response[target] - np.median(response)),
    }


def _detector_scores(
    detector, adapter, clean_out: TargetOutput, perturbed: list, *, adapt_steps: int | None, seed: int
) -> list[np.ndarray]:
    """Per-class mean score of the detector, adapted once to the model on ``clean_out``, on each set of perturbed
    clean samples in ``perturbed``: ``(logits (K, N, C), penultimate (K, N, D))`` pairs, class ``k``'s trigger on
    every sample."""
    from .hub import load_detector
    from .shield import adapt_from_activations

    if detector is None or isinstance(detector, (str, os.PathLike)):
        detector = load_detector(detector)
    head = adapter.head
    shield = adapt_from_activations(
        detector,
        clean_out,
        head.weight.detach().float().cpu(),
        None if head.bias is None else head.bias.detach().float().cpu(),
        steps=detector.config.adapt_steps if adapt_steps is None else adapt_steps,
        seed=seed,
    )
    scores = []
    for logits, penultimate in perturbed:
        k, n = logits.shape[:2]
        _, feats = shield.features_of(TargetOutput(logits.reshape(k * n, -1), penultimate.reshape(k * n, -1)))
        scores.append(shield.score_features(feats).view(k, n).mean(1).numpy().astype(np.float64))
    return scores


def scan_model(
    checkpoint,
    clean_samples,
    detector=None,
    *,
    processor=None,
    n: int | None = None,
    steps: int = 80,
    refine: int | None = None,
    screen_steps: int = 40,
    lr: float = 0.3,
    flip_threshold: float = 0.9,
    class_batch: int = 16,
    adapt_steps: int | None = None,
    use_detector: bool = True,
    token_search: bool = True,
    synthesis: bool | None = None,
    blend_steps: int | None = None,
    source_steps: int = 0,
    head: ScanHead | str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> ScanReport:
    """Scan a classifier for a backdoor from a few clean samples, without any triggered input.

    Args:
        checkpoint: a Hub id, a local folder (transformers, timm, PEFT adapter), a model object or a target adapter.
        clean_samples: at least 5 clean inputs of the model's modality (list, tensor batch, `datasets` column), or a
            spec for [`load_samples`] (text file, image folder, CSV/JSONL/parquet, ``dataset[:split[:column]]``).
        detector: the input-level [`MetaShieldDetector`] (or its folder / Hub id); default: the embedded one.
        processor: tokenizer / image processor when ``checkpoint`` is a model object that needs one.
        n: use at most this many clean samples.
        steps / lr: Adam steps and learning rate of the trigger synthesis (classes optimised together). The
            shipped scan head was fit on signals of this budget; others give trigger sizes it does not expect (all
            classes at 40 steps, 2.5-3x faster, cut the held-out image AUROC to 0.76-0.78, reports/scan_steps40.md).
            80 rather than 120: on the standard zoo's train image models the trigger sizes have settled by step 80
            (the target classes' sizes within a few percent of their 120-step ones; at 40 steps they are about 5x
            larger), see reports/scan_budget.md.
        refine / screen_steps: opt-in screen and refine: every class gets ``screen_steps`` steps, and only the
            ``refine`` classes with the smallest triggers then (at most ``K - 1``) continue to ``steps``
            (``None``, the default: every class runs the full budget, as Neural Cleanse does). With
            ``steps=120``, ``refine=3`` halved the synthesis on 10 classes (2.6x faster than Neural Cleanse on 62),
            but on the standard zoo's held-out models it cut AUROC (cv 0.875, fl 0.916; reports/scan_refine.md): a
            target whose trigger shrinks late is not among the screen's smallest, and the head no longer fits
            classes of unequal budgets.
        flip_threshold: fraction of clean samples a synthesized trigger must flip to count as effective.
        class_batch: classes optimised in one batch (memory: ``class_batch * n`` rows per forward pass).
        adapt_steps: inner-loop steps when adapting the detector to the model (``None``: the detector's own
            ``config.adapt_steps``, what it was meta-trained with, 3 for the shipped one; 0 = reference statistics
            only). On 31 train cv models of the standard zoo, 3 steps made the detector's response gap a much
            better signal than 0 (AUROC 0.95 against 0.78).
        use_detector: feed the synthesized inputs (text models: also the clean samples with each class's token
            trigger) to the adapted detector (False: the detector signals are 0).
        token_search: text models: also search the vocabulary for short token triggers
            ([`search_token_triggers`]); its signals feed the head's text part and pick the suspected target.
        synthesis: run the continuous trigger synthesis (pixels, features or input embeddings). ``None`` (default):
            where the head's score reads its signals, i.e. always for images; for a text scan with the token search
            only if the head's text part weighs a synthesis signal (the shipped one does not). Skipping it saves the
            embedding synthesis: 2.4 s of a 6.2 s scan on the standard zoo's held-out text models at 80 steps; then
            ``trigger_size`` / ``anomaly_index`` are ``None``. Either way the detector reads the clean samples with
            each class's token trigger inserted (``token_detector``); with the synthesis it also reads the
            synthesized inputs, whose scores the per-class evidence shows.
        blend_steps: image models: also synthesize per class the smallest *whole-input* blend trigger
            ``(1 - a) * x + a * p`` in this many steps (``synthesize_triggers(uniform_mask=True)``), the form of
            blended and signal triggers that a small mask cannot take, and score with the head's ``image/blend``
            part on the [`BLEND_SIGNALS`] too. ``None`` (default): [`DEFAULT_BLEND_STEPS`] for image models, none
            for others; 0: no blend synthesis (the head's plain image part scores the scan). On the 106 train image
            models of the standard zoo (cv and FL) and ``configs/zoo/fresh_cv.yaml``, the part scored a
            cross-validated AUROC of 0.997 against 0.989 without it, for about 1.6 s (cv) to 3 s (FL) more per scan
            (reports/scan_blend.md).
        source_steps: opt-in, image models: also synthesize per class, in this many steps, the smallest mask that
            flips the easiest half of the clean samples ([`SOURCE_FLIP_THRESHOLD`], [`SOURCE_LOSS_QUANTILE`]), the
            form of a source-specific trigger (TaCT) that flips only some classes' inputs, and score with the head's
            ``image/source`` part on the [`SOURCE_SIGNALS`] too (0, the default: none). It costs about one more mask
            synthesis at 80 steps, which makes the scan slower than Neural Cleanse's 120 steps; hence opt-in (see
            reports/scan_source.md for what it buys).
        head: the model-level [`ScanHead`] (or its JSON path); default: the shipped one.
        seed: seeds the synthesis and the detector's features; the same seed gives the same report.
        batch_size: batch size of the clean forward pass.
        trust_remote_code / allow_pickle: loading safety switches, both off by default.

    Returns:
        A [`ScanReport`] with the verdict, score, suspected target and per-class evidence.

    Example:
        ```python
        >>> from metashield_hf import scan_model
        >>> report = scan_model("path/to/checkpoint", clean_images[:20])
        >>> report.verdict, report.suspected_target, round(report.score, 3)
        ('backdoored', 0, 0.981)
        >>> print(report.to_json())
        ```
    """
    t0 = time.perf_counter()
    adapter = load_target(
        checkpoint,
        processor,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    head = head if isinstance(head, ScanHead) else ScanHead.load(head)
    items = _clean_items(adapter, clean_samples, n, seed)
    report, _ = _scan_loaded(
        adapter, items, _name(checkpoint), detector, head, steps=steps, lr=lr, flip_threshold=flip_threshold,
        refine=refine, screen_steps=screen_steps, class_batch=class_batch, adapt_steps=adapt_steps,
        use_detector=use_detector, token_search=token_search, synthesis=synthesis, seed=seed, t0=t0,
        blend_steps=blend_steps, source_steps=source_steps,
    )  # fmt: skip
    return report


def _scan_loaded(
    adapter: TargetAdapter,
    items: list,
    name: str,
    detector,
    head: ScanHead,
    *,
    steps: int,
    lr: float,
    flip_threshold: float,
    class_batch: int,
    adapt_steps: int | None,
    use_detector: bool,
    seed: int,
    t0: float,
    token_search: bool = False,
    synthesis: bool | None = None,
    refine: int | None = None,
    screen_steps: int | None = None,
    blend_steps: int | None = 0,
    source_steps: int = 0,
) -> tuple[ScanReport, SynthesisResult | None]:
    """[`scan_model`] on an already loaded target and clean items; also returns the synthesis (masks, patterns;
    ``None`` when skipped), which the FL screen compares between candidates and the global model."""
    t_load = time.perf_counter()
    tokens_on = token_search and adapter.modality == "text"
    variant = None
    if tokens_on:
        from .token_search import large_vocabulary

        variant = LARGE_VOCABULARY if large_vocabulary(adapter) else None
    if synthesis is None:  # run it where the score reads it
        synthesis = not tokens_on or bool(head.for_modality(adapter.modality, variant=variant).missing(TOKEN_SIGNALS))
    if not synthesis and not tokens_on:
        raise ValueError("synthesis=False needs the token search: a text model and token_search=True")
    if blend_steps is not None and blend_steps < 0:
        raise ValueError(f"blend_steps must be >= 0, got {blend_steps}")
    if source_steps < 0:
        raise ValueError(f"source_steps must be >= 0, got {source_steps}")
    result = anomaly = None
    if synthesis:
        clean_out, result, anomaly = _synthesize(
            adapter, items, steps=steps, lr=lr, flip_threshold=flip_threshold, class_batch=class_batch, seed=seed,
            refine=refine, screen_steps=screen_steps,
        )  # fmt: skip
        num_classes = len(result.sizes)
    else:
        clean_out = _clean_outputs(adapter, items)
        num_classes = clean_out.logits.shape[1]
    t_syn = time.perf_counter()
    tokens = None
    signals: dict[str, float] = {}
    if tokens_on:
        from .token_search import search_token_triggers, trigger_outputs

        tokens = search_token_triggers(adapter, items, clean_out.logits.argmax(-1), num_classes)
        target, signals = token_signals(tokens)
    t_tok = time.perf_counter()
    det = token_det = None
    if use_detector:
        perturbed = [(result.logits, result.penultimate)] if synthesis else []
        if tokens_on:
            # the detector also reads the clean samples with each class's token trigger: the text head weighs that
            # (token_detector) with or without the synthesis, so both scans of a model get the same score
            out = trigger_outputs(adapter, items, [best[-1] for best in tokens.triggers])
            n = len(items)
            perturbed.append((out.logits.view(num_classes, n, -1), out.penultimate.view(num_classes, n, -1)))
        scores = _detector_scores(detector, adapter, clean_out, perturbed, adapt_steps=adapt_steps, seed=seed)
        det = scores[0]  # the per-class evidence shows the synthesized inputs' scores where there are any
        token_det = scores[-1] if tokens_on else None
    if token_det is not None:
        target, detected = token_detector_signal(token_det, tokens.flip_rates[:, -1])
        signals |= detected
    elif tokens_on:  # no detector: its signals are 0, as for the synthesis
        signals["token_detector"] = 0.0
    t_det = time.perf_counter()
    if synthesis:
        syn_target, syn_signals = scan_signals(
            result.sizes, anomaly, det if det is not None else np.zeros(num_classes)
        )
        signals = syn_signals | signals
        target = target if tokens is not None else syn_target
    space = result.kind if result is not None else "tokens"
    if blend_steps is None:  # the default: where the head has a part for it, i.e. image scans
        blend_steps = DEFAULT_BLEND_STEPS if space == "pixels" else 0
    budgets = {BLEND: blend_steps, SOURCE: source_steps}
    extra_sizes, extra_s = {}, {}
    for kind, options in EXTRA_SYNTHESES.items():
        if budgets[kind] and space == "pixels":
            t = time.perf_counter()
            _, extra, _ = _synthesize(
                adapter, items, **{"flip_threshold": flip_threshold, **options}, steps=budgets[kind], lr=lr,
                class_batch=class_batch, seed=seed, clean_out=clean_out,
            )  # fmt: skip
            extra_sizes[kind], extra_s[f"{kind}_s"] = extra.sizes, time.perf_counter() - t
            signals |= variant_signals(kind, extra.sizes)
            variant = kind
        elif budgets[kind]:
            logger.warning(
                "%s_steps: that synthesis is for image models (pixels); skipped for this %s scan", kind, space
            )
    # a scan in pixel space is an image scan, whatever the adapter (timm, transformers or a plain torch module)
    head = head.for_modality("image" if space == "pixels" else adapter.modality, signals, variant)
    score = head.score(signals)
    evidence = _evidence(adapter, result, anomaly, det, tokens, flip_threshold)
    for kind, sizes in extra_sizes.items():
        for ev, size in zip(evidence, sizes, strict=True):
            setattr(ev, f"{kind}_size", float(size))
    t1 = time.perf_counter()
    report = ScanReport(
        checkpoint=name,
        method="metashield",
        verdict="backdoored" if score > head.threshold else "clean",
        score=score,
        threshold=head.threshold,
        suspected_target=target,
        suspected_target_label=evidence[target].label,
        anomaly_index=None if anomaly is None else float(anomaly[target]),
        signals=signals,
        per_class=evidence,
        n_clean_samples=len(items),
        space=space,
        timings={
            "load_s": t_load - t0,
            **({"synthesis_s": t_syn - t_load} if synthesis else {}),
            "detector_s": t_det - t_tok,
            **({"token_search_s": t_tok - t_syn} if tokens is not None else {}),
            **extra_s,
            "total_s": t1 - t0,
        },
        options={
            "steps": steps if synthesis else None,
            "refine": refine,
            "screen_steps": screen_steps if refine is not None else None,
            "lr": lr,
            "flip_threshold": flip_threshold,
            "seed": seed,
            "head": head.source,
            "token_search": tokens is not None,
            "large_vocabulary": variant == LARGE_VOCABULARY,
            "synthesis": synthesis,
            **{f"{kind}_steps": budgets[kind] if kind in extra_sizes else 0 for kind in EXTRA_SYNTHESES},
            "adapt_steps": adapt_steps,
        },  # fmt: skip
    )
    logger.info(
        "scan of %s: %s (score %.3f, suspected target %d) in %.1f s",
        report.checkpoint,
        report.verdict,
        score,
        target,
        report.timings["total_s"],
    )
    return report, result


def neural_cleanse_scan(
    checkpoint,
    clean_samples,
    *,
    processor=None,
    n: int | None = None,
    steps: int = 60,
    lr: float = 0.3,
    flip_threshold: float = 0.99,
    class_batch: int = 16,
    threshold: float = NEURAL_CLEANSE_THRESHOLD,
    seed: int = 0,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> ScanReport:
    """Neural Cleanse baseline: per-class mask + pattern reverse engineering and the MAD anomaly index.

    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019
    (https://doi.org/10.1109/SP.2019.00031). The trigger of each class is the smallest mask (with its pattern) that
    flips ``flip_threshold`` (the paper: 99%) of the clean samples; the model is flagged when the smallest mask's
    anomaly index exceeds ``threshold`` (the paper: 2). It runs the same synthesis as [`scan_model`] (so the two
    compare on equal terms) without the detector and the learned head.

    Args:
        checkpoint / clean_samples / processor / n / seed / batch_size / trust_remote_code / allow_pickle: as in
            [`scan_model`].
        steps / lr / flip_threshold / class_batch: the synthesis settings.
        threshold: anomaly index above which the verdict is ``"backdoored"``.

    Returns:
        A [`ScanReport`] with ``method="neural_cleanse"`` and ``score`` = the anomaly index (unbounded).

    Example:
        ```python
        >>> nc = neural_cleanse_scan(model, clean_images[:20])
        >>> nc.verdict, nc.suspected_target, nc.anomaly_index
        ('backdoored', 0, 3.7)
        ```
    """
    t0 = time.perf_counter()
    adapter = load_target(
        checkpoint, processor, batch_size=batch_size, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    items = _clean_items(adapter, clean_samples, n, seed)
    t_load = time.perf_counter()
    _, result, anomaly = _synthesize(
        adapter, items, steps=steps, lr=lr, flip_threshold=flip_threshold, class_batch=class_batch, seed=seed
    )
    t1 = time.perf_counter()
    target = int(np.argmax(anomaly))
    evidence = _evidence(adapter, result, anomaly)
    sizes = result.sizes
    return ScanReport(
        checkpoint=_name(checkpoint),
        method="neural_cleanse",
        verdict="backdoored" if anomaly[target] > threshold else "clean",
        score=float(anomaly[target]),
        threshold=threshold,
        suspected_target=target,
        suspected_target_label=evidence[target].label,
        anomaly_index=float(anomaly[target]),
        signals=_synthesis_signals(anomaly, sizes, target),
        per_class=evidence,
        n_clean_samples=len(items),
        space=result.kind,
        timings={"load_s": t_load - t0, "synthesis_s": t1 - t_load, "total_s": t1 - t0},
        options={"steps": steps, "lr": lr, "flip_threshold": flip_threshold, "seed": seed},
    )
