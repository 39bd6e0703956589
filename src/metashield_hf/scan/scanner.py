"""The model-level scan: "is this checkpoint backdoored, and which class is the target?".

[`scan_model`] needs a few clean samples and no triggered input. It synthesizes one candidate trigger per class
([`metashield_hf.scan.synthesis`]), measures how easily each class can be forced (Neural Cleanse's anomaly index over
the classes), feeds the perturbed clean samples to the adapted input-level detector, and combines these signals
([`metashield_hf.scan.signals`]) with a small logistic head ([`ScanHead`]) into a score in ``[0, 1]``. Text models also
get a discrete search for short token triggers in their own vocabulary ([`metashield_hf.scan.token_search`]).
[`scan_adapter`] runs the same scan on an already loaded target adapter, e.g. once per candidate model of an FL round.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..targets import load_target, target_device
from ..targets.base import TargetAdapter, TargetOutput
from .config import DEFAULT_BLEND_STEPS, MIN_SCAN_SAMPLES, SOURCE_FLIP_THRESHOLD, SOURCE_LOSS_QUANTILE, ScanConfig
from .positives import model_fingerprint
from .progress import log_scan_cost, tqdm_disable
from .report import ClassEvidence, ScanReport
from .signals import (
    BLEND,
    FEATURE,
    LARGE_VOCABULARY,
    SOURCE,
    TOKEN_SIGNALS,
    dormant_signals,
    max_margin_signals,
    scan_signals,
    scan_variant,
    token_detector_signal,
    token_signals,
    variant_signals,
)
from .synthesis import anomaly_indices, synthesis_space, synthesize_triggers

logger = logging.getLogger(__name__)

__all__ = [
    "checkpoint_name",
    "prepare_clean_items",
    "run_synthesis",
    "scan_adapter",
    "scan_model",
    "class_evidence",
    "trigger_agnostic_evidence",
]


# ---- scanning ---------------------------------------------------------------------------------------------------
def checkpoint_name(checkpoint) -> str:
    """How a report names the scanned model: its path or Hub id, else its config's ``_name_or_path``, else its class."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return str(checkpoint)
    if isinstance(checkpoint, TargetAdapter):
        checkpoint = checkpoint.model
    path = getattr(getattr(checkpoint, "config", None), "_name_or_path", None)
    return path or type(checkpoint).__name__


def prepare_clean_items(adapter: TargetAdapter, clean_samples, n: int | None = None, seed: int = 0) -> list:
    """The clean samples as the adapter's items (at most ``n``; a spec string goes through [`load_samples`]), at least
    [`MIN_SCAN_SAMPLES`] of them."""
    if isinstance(clean_samples, (str, os.PathLike)):
        from ..samples import load_samples

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


def _class_labels(adapter: TargetAdapter, k: int) -> list[str]:
    from ..targets.transformers_models import unwrap

    id2label = getattr(getattr(unwrap(adapter.model), "config", None), "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(k)]


def _clean_outputs(adapter, items) -> TargetOutput:
    """The model's outputs on the clean samples; refuses a model with fewer than 2 classes."""
    clean_out = adapter(items)
    num_classes = clean_out.logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"the model has {num_classes} output; a scan needs a classifier with at least 2 classes")
    return clean_out


def run_synthesis(
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
    progress=None,
    stage="synthesis",
):
    """The per-class trigger synthesis on clean ``items``: ``(clean outputs, SynthesisResult, anomaly indices)``.

    Shared by [`scan_model`], its extra syntheses, [`neural_cleanse_scan`] and the FL screen, so that all of them
    synthesize alike. The keywords are [`synthesize_triggers`]'s; ``clean_out``: the clean outputs of the same items
    (not recomputed), given by a caller that already has them."""
    if clean_out is None:
        clean_out = _clean_outputs(adapter, items)
        _warn_few_classes(clean_out.logits.shape[1])
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
        progress=progress,
        stage=stage,
    )
    return clean_out, result, anomaly_indices(result.sizes)


def _warn_few_classes(num_classes: int) -> None:
    if num_classes < 3:
        logger.warning("only %d classes: the anomaly index (MAD over classes) cannot single out a target", num_classes)


def class_evidence(
    adapter, result, anomaly, detector_scores=None, tokens=None, flip_threshold: float = 0.9
) -> list[ClassEvidence]:
    """One [`ClassEvidence`] per class from the synthesis ``result`` and the token search ``tokens``; without a
    synthesis (``result=None``), the token trigger of each class stands for its synthesized trigger."""
    k_classes = len(result.sizes) if result is not None else len(tokens.flip_rates)
    labels = _class_labels(adapter, k_classes)
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


# The extra per-class syntheses an image scan may add after the mask synthesis, in this order, each with the
# synthesize_triggers options that make it what it is; a later one's head part takes precedence (it falls back to the
# earlier one's, VARIANT_FALLBACK).
EXTRA_SYNTHESES = {
    BLEND: {"uniform_mask": True},
    SOURCE: {"flip_threshold": SOURCE_FLIP_THRESHOLD, "loss_quantile": SOURCE_LOSS_QUANTILE},
}


def _detector_scores(
    detector,
    adapter,
    clean_out: TargetOutput,
    perturbed: list,
    *,
    adapt_steps: int | None,
    seed: int,
    progress: bool | None = None,
) -> list[np.ndarray]:
    """Per-class mean score of the detector, adapted once to the model on ``clean_out``, on each set of perturbed
    clean samples in ``perturbed``: ``(logits (K, N, C), penultimate (K, N, D))`` pairs, class ``k``'s trigger on
    every sample. ``progress``: a bar over the adaptation and each set's scoring."""
    from ..loading import load_detector
    from ..shield import adapt_from_activations

    bar = tqdm(total=1 + len(perturbed), desc="detector: adapt", unit="stage", disable=tqdm_disable(progress))
    with bar:
        if detector is None or isinstance(detector, (str, os.PathLike)):
            detector = load_detector(detector, one_pass=True)
        if detector.config.probes:
            raise ValueError(
                f"the scan scores synthesized activations, which live probes cannot perturb; pass a one-pass detector "
                f"(this one reads the probes {detector.config.probes}; load_detector(one_pass=True) is the embedded "
                "one)"
            )
        head = adapter.head
        shield = adapt_from_activations(
            detector,
            clean_out,
            head.weight.detach().float().cpu(),
            None if head.bias is None else head.bias.detach().float().cpu(),
            steps=detector.config.adapt_steps if adapt_steps is None else adapt_steps,
            seed=seed,
        )
        bar.update()
        scores = []
        for i, (logits, penultimate) in enumerate(perturbed):
            bar.set_description(f"detector: score triggered set {i + 1}/{len(perturbed)}")
            k, n = logits.shape[:2]
            _, feats = shield.features_of(TargetOutput(logits.reshape(k * n, -1), penultimate.reshape(k * n, -1)))
            scores.append(shield.score_features(feats).view(k, n).mean(1).numpy().astype(np.float64))
            bar.update()
    return scores


def trigger_agnostic_evidence(
    adapter: TargetAdapter, items: list, clean_out: TargetOutput, config: ScanConfig
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, float], dict]:
    """The trigger-agnostic evidence sources the config turns on: the maximum-margin statistic
    ([`max_margins`], ``max_margin_steps``), the dormant shortcut weights ([`dormant_mass`], ``dormancy``; from the
    clean forward pass ``clean_out``) and the feature-space trigger inversion ([`invert_features`], ``feature_steps``).

    Returns ``(signals, per-class arrays by ClassEvidence field, timings, options)``. Their signals
    ([`MAX_MARGIN_SIGNALS`], [`DORMANT_SIGNALS`], [`FEATURE_SIGNALS`]) go into the report; a head part that weighs
    them scores the scan with them, one that does not scores it as it would without them.
    """
    signals: dict[str, float] = {}
    per_class: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    options: dict = {"max_margin_steps": 0, "feature_steps": 0}
    num_classes = clean_out.logits.shape[1]
    if config.max_margin_steps:
        from .max_margin import max_margins

        t = time.perf_counter()
        mm = max_margins(
            adapter, items, num_classes, steps=config.max_margin_steps, starts=config.max_margin_starts,
            seed=config.seed, progress=config.progress,
        )  # fmt: skip
        signals |= max_margin_signals(mm.margins)
        per_class |= {"max_margin": mm.margins, "max_margin_z": mm.anomaly}
        timings["max_margin_s"] = time.perf_counter() - t
        options |= {"max_margin_steps": config.max_margin_steps, "max_margin_starts": config.max_margin_starts}
    if config.dormancy:
        from .dormant import dormant_mass

        t = time.perf_counter()
        if clean_out.penultimate is None:
            logger.warning("dormancy: %s gave no penultimate activations; skipped", type(adapter.model))
        else:
            mass = dormant_mass(adapter.head.weight, clean_out.penultimate)
            signals |= dormant_signals(mass)
            per_class |= {"dormant_mass": mass}
            timings["dormancy_s"] = time.perf_counter() - t
    options["dormancy"] = bool(config.dormancy)
    if config.feature_steps and not adapter.layer_blocks():
        logger.warning("feature_steps: %s has no layer blocks to invert a trigger at; skipped", type(adapter.model))
    elif config.feature_steps:
        from .feature_inversion import invert_features

        t = time.perf_counter()
        inv = invert_features(
            adapter, items, clean_out.logits.argmax(-1), num_classes, steps=config.feature_steps,
            depth=config.feature_depth, flip_threshold=config.flip_threshold, class_batch=config.class_batch,
            seed=config.seed, progress=config.progress,
        )  # fmt: skip
        signals |= variant_signals(FEATURE, inv.sizes)
        per_class |= {"feature_size": inv.sizes, "feature_anomaly": inv.anomaly}
        timings["feature_s"] = time.perf_counter() - t
        options |= {"feature_steps": config.feature_steps, "feature_depth": config.feature_depth}
        options["feature_layer"] = inv.layer
    return signals, per_class, timings, options


def scan_model(
    checkpoint,
    clean_samples,
    detector=None,
    config: ScanConfig | None = None,
    *,
    processor=None,
    **options,
) -> ScanReport:
    """Scan a classifier for a backdoor from a few clean samples, without any triggered input.

    Args:
        checkpoint: a Hub id, a local folder (transformers, timm, PEFT adapter), a model object or a target adapter.
        clean_samples: at least 5 clean inputs of the model's modality (list, tensor batch, `datasets` column), or a
            spec for [`load_samples`] (text file, image folder, CSV/JSONL/parquet, ``dataset[:split[:column]]``).
        detector: the input-level [`MetaShieldDetector`] (or its folder / Hub id); default: the embedded one.
        config: the scan's options ([`ScanConfig`]; default: ``ScanConfig()``, what the shipped head is fit on).
        processor: tokenizer / image processor when ``checkpoint`` is a model object that needs one.
        **options: [`ScanConfig`] fields that override ``config``'s (``scan_model(m, clean, steps=40)``).

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
    config = (config or ScanConfig()).replace(**options)
    t0 = time.perf_counter()
    adapter = load_target(
        checkpoint,
        processor,
        batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
        device=target_device(checkpoint, config.device),
    )
    head = config.load_head()
    items = prepare_clean_items(adapter, clean_samples, config.n, config.seed)
    return scan_adapter(
        adapter, items, config.replace(head=head), detector, name=checkpoint_name(checkpoint), started=t0
    )


def scan_adapter(
    adapter: TargetAdapter,
    items: list,
    config: ScanConfig | None = None,
    detector=None,
    *,
    name: str | None = None,
    started: float | None = None,
) -> ScanReport:
    """[`scan_model`] on an already loaded target adapter and its clean items ([`prepare_clean_items`]).

    The report's ``synthesis`` holds the mask synthesis (masks, patterns; ``None`` where it did not run), which the FL
    screen compares between candidates and the global model. ``config``'s loading options are not read here.

    Args:
        adapter: the target ([`load_target`]).
        items: the clean samples as the adapter's items.
        config: the scan's options (default: ``ScanConfig()``).
        detector: the input-level detector, its folder or Hub id (default: the embedded one).
        name: how the report names the model (default: [`checkpoint_name`] of the adapter).
        started: ``time.perf_counter()`` when loading began, so that ``timings["load_s"]`` counts it (default: now).

    Example:
        ```python
        >>> adapter = load_target(model)
        >>> report = scan_adapter(adapter, prepare_clean_items(adapter, clean_images[:20]), ScanConfig(steps=40))
        >>> report.synthesis.masks.shape
        torch.Size([10, 8, 8])
        ```
    """
    config = config or ScanConfig()
    t_load = time.perf_counter()
    t0 = t_load if started is None else started
    name = checkpoint_name(adapter) if name is None else name
    head = config.load_head()
    # synthesis and blend_steps: None in the config means "where the head reads it"; resolved below for this scan
    synthesis, blend_steps, seed = config.synthesis, config.blend_steps, config.seed
    tokens_on = config.token_search and adapter.modality == "text"
    variant = None
    if tokens_on:
        from .token_search import large_vocabulary

        variant = LARGE_VOCABULARY if large_vocabulary(adapter) else None
    if synthesis is None:  # run it where the score reads it
        synthesis = not tokens_on or bool(head.for_modality(adapter.modality, variant=variant).missing(TOKEN_SIGNALS))
    if not synthesis and not tokens_on:
        raise ValueError("synthesis=False needs the token search: a text model and token_search=True")
    result = anomaly = None
    t_forward = time.perf_counter()
    clean_out = _clean_outputs(adapter, items)
    num_classes = clean_out.logits.shape[1]
    if synthesis:
        side = None
        if adapter.modality == "image":  # the estimate scales with the area the synthesis runs at
            side = max(synthesis_space(adapter, items[:1]).mask_shape[-2:])
        log_scan_cost(
            name, adapter.modality, config, num_classes, len(items), time.perf_counter() - t_forward, tokens_on, side
        )
        _warn_few_classes(num_classes)
        _, result, anomaly = run_synthesis(
            adapter, items, steps=config.steps, lr=config.lr, flip_threshold=config.flip_threshold,
            class_batch=config.class_batch, seed=seed, refine=config.refine, screen_steps=config.screen_steps,
            clean_out=clean_out, progress=config.progress,
        )  # fmt: skip
    t_syn = time.perf_counter()
    tokens = None
    signals: dict[str, float] = {}
    if tokens_on:
        from .token_search import search_token_triggers, trigger_outputs

        pred = clean_out.logits.argmax(-1)
        tokens = search_token_triggers(adapter, items, pred, num_classes, progress=config.progress)
        target, signals = token_signals(tokens)
    t_tok = time.perf_counter()
    det = token_det = None
    if config.use_detector:
        perturbed = [(result.logits, result.penultimate)] if synthesis else []
        if tokens_on:
            # the detector also reads the clean samples with each class's token trigger: the text head weighs that
            # (token_detector) with or without the synthesis, so both scans of a model get the same score
            out = trigger_outputs(adapter, items, [best[-1] for best in tokens.triggers])
            n = len(items)
            perturbed.append((out.logits.view(num_classes, n, -1), out.penultimate.view(num_classes, n, -1)))
        scores = _detector_scores(
            detector,
            adapter,
            clean_out,
            perturbed,
            adapt_steps=config.adapt_steps,
            seed=seed,
            progress=config.progress,
        )
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
    budgets = {BLEND: blend_steps, SOURCE: config.source_steps}
    extra_sizes, extra_s = {}, {}
    for kind, options in EXTRA_SYNTHESES.items():
        if budgets[kind] and space == "pixels":
            t = time.perf_counter()
            _, extra, _ = run_synthesis(
                adapter, items, **{"flip_threshold": config.flip_threshold, **options}, steps=budgets[kind],
                lr=config.lr, class_batch=config.class_batch, seed=seed, clean_out=clean_out,
                progress=config.progress, stage=f"{kind} synthesis",
            )  # fmt: skip
            extra_sizes[kind], extra_s[f"{kind}_s"] = extra.sizes, time.perf_counter() - t
            signals |= variant_signals(kind, extra.sizes)
            variant = kind
        elif budgets[kind]:
            logger.warning(
                "%s_steps: that synthesis is for image models (pixels); skipped for this %s scan", kind, space
            )
    agnostic_signals, agnostic_per_class, agnostic_s, agnostic_options = trigger_agnostic_evidence(
        adapter, items, clean_out, config
    )
    signals |= agnostic_signals
    variant = scan_variant(variant, signals)  # AGNOSTIC: the image/agnostic part where there is one, else blend
    # a scan in pixel space is an image scan, whatever the adapter (timm, transformers or a plain torch module)
    head = head.for_modality("image" if space == "pixels" else adapter.modality, signals, variant)
    score = head.score(signals)
    if head.target is not None:  # the part's target chooser reads every source's per-class evidence
        from .target import choose_target

        arrays = {"anomaly_index": anomaly, "detector_score": det, "blend_size": extra_sizes.get(BLEND)}
        target = choose_target(head.target, arrays | agnostic_per_class)
    evidence = class_evidence(adapter, result, anomaly, det, tokens, config.flip_threshold)
    for kind, sizes in extra_sizes.items():
        for ev, size in zip(evidence, sizes, strict=True):
            setattr(ev, f"{kind}_size", float(size))
    for field_name, values in agnostic_per_class.items():
        for ev, value in zip(evidence, values, strict=True):
            setattr(ev, field_name, float(value))
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
            **agnostic_s,
            "total_s": t1 - t0,
        },
        options={
            "steps": config.steps if synthesis else None,
            "refine": config.refine,
            "screen_steps": config.screen_steps if config.refine is not None else None,
            "lr": config.lr,
            "flip_threshold": config.flip_threshold,
            "seed": seed,
            "head": head.source,
            "token_search": tokens is not None,
            "large_vocabulary": variant == LARGE_VOCABULARY,
            "synthesis": synthesis,
            **{f"{kind}_steps": budgets[kind] if kind in extra_sizes else 0 for kind in EXTRA_SYNTHESES},
            **agnostic_options,
            "adapt_steps": config.adapt_steps,
            "device": str(adapter.device),
        },  # fmt: skip
        synthesis=result,
        fingerprint=model_fingerprint(adapter),
    )
    logger.info(
        "scan of %s: %s (score %.3f, suspected target %d) in %.1f s",
        report.checkpoint,
        report.verdict,
        score,
        target,
        report.timings["total_s"],
    )
    return report
