"""The model-level signals a scan computes and its head combines: their names and how they are computed.

Each signal is one number per model, computed from per-class evidence: trigger sizes and anomaly indices of the
synthesis ([`metashield_hf.scan.synthesis`]), the token search's flip rates and probabilities
([`metashield_hf.scan.token_search`]), and the adapted input-level detector's scores of the perturbed clean samples.
"""

from __future__ import annotations

import math

import numpy as np

from .synthesis import anomaly_indices, chance_anomaly_index

#: Signals of every scan that runs the mask synthesis: the suspected target's anomaly index and log size ratio,
#: corrected for the number of classes ([`class_count_signals`]), and the detector's response to its trigger.
SYNTHESIS_SIGNALS = ("anomaly_excess", "log_size_z", "detector_response", "detector_response_gap")
#: The two synthesis signals before that correction (Neural Cleanse's rule reads the raw anomaly index).
RAW_SYNTHESIS_SIGNALS = ("anomaly_index", "log_size_ratio")
#: Signals of text models only (the discrete token-trigger search). ``token_logit_2`` is the log-odds of
#: ``token_prob_2``: a logistic head is linear in its inputs, and a probability saturates just where a trigger and a
#: natural class word differ (0.975 against 0.997 is 3.7 against 5.8 in log-odds). ``token_detector`` is the largest
#: over classes of the detector's mean score on the clean samples with the class's token trigger inserted times the
#: share of them that trigger flips (0 for a scan without the detector).
TOKEN_SIGNALS = (
    "token_flip",
    "token_prob",
    "token_flip_2",
    "token_prob_2",
    "token_prob_low",
    "token_prob_low_2",
    "token_dominance",
    "token_dominance_2",
    "token_logit_2",
    "token_detector",
)
#: Signals of an image scan with the blend synthesis (the default on images): the class-count-corrected anomaly index
#: and log size ratio of the class whose smallest whole-input blend ``(1 - a) * x + a * p`` is the outlier.
BLEND_SIGNALS = ("blend_anomaly_excess", "blend_log_size_z")
#: Signals of an image scan with the source-specific synthesis (``ScanConfig.source_steps``): the same two for the
#: class whose smallest mask that flips the *easiest half* of the clean samples is the outlier, the form of a
#: source-specific trigger (TaCT), which flips only some classes' inputs.
SOURCE_SIGNALS = ("source_anomaly_excess", "source_log_size_z")
#: Trigger-agnostic signals of a scan with the maximum-margin statistics (``ScanConfig.max_margin_steps``; MM-BD, Wang
#: et al., S&P 2024): the class-count-corrected robust z-score of the largest per-class achievable logit margin, and
#: its log ratio to the median class's margin, in the same units ([`class_count_signals`]).
MAX_MARGIN_SIGNALS = ("max_margin_excess", "max_margin_log_z")
#: Trigger-agnostic signals of a scan with the feature-space trigger inversion (``ScanConfig.feature_steps``;
#: FeatureRE / BTI-DBF-like): the class-count-corrected anomaly index and log size ratio of the class reached by the
#: abnormally shortest shift of an intermediate block's output.
FEATURE_SIGNALS = ("feature_anomaly_excess", "feature_log_size_z")
#: Trigger-agnostic signals of a scan with the dormant shortcut weights (``ScanConfig.dormancy``; [`dormant_mass`]):
#: the class-count-corrected robust z-score of the log dormant mass of the class with the most, and its log ratio to
#: the median class's, in the same units ([`class_count_signals`]).
DORMANT_SIGNALS = ("dormant_excess", "dormant_log_z")
SIGNALS = (
    SYNTHESIS_SIGNALS
    + RAW_SYNTHESIS_SIGNALS
    + TOKEN_SIGNALS
    + BLEND_SIGNALS
    + SOURCE_SIGNALS
    + MAX_MARGIN_SIGNALS
    + FEATURE_SIGNALS
    + DORMANT_SIGNALS
)

#: The variant of a text scan whose vocabulary the token search prefilters (pretrained checkpoints: 30k-250k tokens).
LARGE_VOCABULARY = "large_vocabulary"
#: The variant of an image scan with the blend synthesis.
BLEND = "blend"
#: The variant of an image scan with the source-specific synthesis.
SOURCE = "source"
#: The head variant of image scans that carry the trigger-agnostic evidence ([`MAX_MARGIN_SIGNALS`],
#: [`DORMANT_SIGNALS`] where the dormancy ran, [`FEATURE_SIGNALS`] where the feature inversion ran) beside the blend
#: synthesis; it falls back to the blend part where the scan lacks a signal the part weighs.
AGNOSTIC = "agnostic"
#: The prefix of the feature-space inversion's signals ([`FEATURE_SIGNALS`]); not a head variant.
FEATURE = "feature"


def scan_variant(variant: str | None, signals) -> str | None:
    """The head variant of a scan: [`AGNOSTIC`] for a blend scan that also carries the [`MAX_MARGIN_SIGNALS`],
    else ``variant`` as it is (the scanner and [`record_variant`] decide it with this one rule)."""
    if variant == BLEND and all(name in signals for name in MAX_MARGIN_SIGNALS):
        return AGNOSTIC
    return variant


def token_signals(tokens) -> tuple[int, dict[str, float]]:
    """The suspected target and the token signals of a [`TokenSearchResult`] (or any object with its per-class
    ``flip_rates``, ``target_probs``, ``low_probs`` and ``dominance`` arrays).

    Each signal is the largest over classes: how many clean samples the best single-token trigger and the best
    longest one flip, how confidently they force the class (mean probability, and its lower quartile: the samples that
    resist), and how often they still win against the other classes' strongest words. The ``_2`` signals are the
    longest trigger's: 2 tokens where the search prefiltered a large vocabulary, 3 where it screened all of it. The
    suspected target is the class its triggers force most confidently ([`scan_model`] prefers the detector's, with its
    ``token_detector`` signal).
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
    nothing has no trigger to flag.
    """
    diverted = np.asarray(detector_scores, dtype=np.float64) * np.asarray(flip_rates, dtype=np.float64)
    return int(np.argmax(diverted)), {"token_detector": float(diverted.max())}


def class_count_signals(anomaly_index: float, log_size_ratio: float, num_classes: int) -> dict[str, float]:
    """The suspected target's anomaly index and log size ratio, corrected for the number of classes.

    The anomaly index is a maximum over ``K`` classes, so by chance alone it grows with ``K`` (about 1.6 for 10
    classes, 2.3 for 62); ``anomaly_excess`` subtracts that chance level ([`chance_anomaly_index`]), and
    ``log_size_z`` divides the log size ratio (which grows the same way) by it. For a fixed ``K`` this is a change of
    units, so a head fit on 10-class models scores them alike, and a model with many more classes is not flagged for
    its class count.
    """
    m = chance_anomaly_index(int(num_classes))
    return {"anomaly_excess": anomaly_index - m, "log_size_z": log_size_ratio / m}


def synthesis_signals(anomaly: np.ndarray, sizes: np.ndarray, target: int) -> dict[str, float]:
    """Class ``target``'s raw anomaly index and log size ratio (its trigger size over the median class's), and their
    class-count-corrected forms ([`class_count_signals`])."""
    raw = {
        "anomaly_index": float(anomaly[target]),
        "log_size_ratio": float(np.log(max(sizes[target], 1e-12) / max(float(np.median(sizes)), 1e-12))),
    }
    return raw | class_count_signals(raw["anomaly_index"], raw["log_size_ratio"], len(sizes))


def variant_signals(variant: str, sizes: np.ndarray) -> dict[str, float]:
    """The signals of an extra synthesis ([`BLEND_SIGNALS`], [`SOURCE_SIGNALS`], [`FEATURE_SIGNALS`]): the class-count-corrected anomaly
    index and log size ratio of the class with the most anomalous (smallest) trigger, named ``{variant}_...``."""
    anomaly = anomaly_indices(sizes)
    signals = synthesis_signals(anomaly, sizes, int(np.argmax(anomaly)))
    return {f"{variant}_anomaly_excess": signals["anomaly_excess"], f"{variant}_log_size_z": signals["log_size_z"]}


def max_margin_signals(margins: np.ndarray) -> dict[str, float]:
    """[`MAX_MARGIN_SIGNALS`] of per-class maximum margins ``(K,)``: for the class with the largest margin, its robust
    z-score over the classes less the chance level of a maximum over ``K`` ([`class_count_signals`]), and
    ``log(margin / median margin)`` in the same units (margins are floored at ``1e-6``: a class no input puts on top
    has a negative margin)."""
    m = np.asarray(margins, dtype=np.float64)
    anomaly = anomaly_indices(-m)  # the largest margin is the outlier
    t = int(np.argmax(anomaly))
    log_ratio = float(np.log(max(m[t], 1e-6) / max(float(np.median(m)), 1e-6)))
    signals = class_count_signals(float(anomaly[t]), log_ratio, len(m))
    return {"max_margin_excess": signals["anomaly_excess"], "max_margin_log_z": signals["log_size_z"]}


def dormant_signals(mass: np.ndarray) -> dict[str, float]:
    """[`DORMANT_SIGNALS`] of per-class dormant masses ``(K,)`` ([`dormant_mass`]): for the class whose log mass is
    the largest outlier, its robust z-score over the classes less the chance level of a maximum over ``K``, and
    ``log(mass / median mass)`` in the same units ([`class_count_signals`])."""
    log_mass = np.log(np.maximum(np.asarray(mass, dtype=np.float64), 1e-12))
    anomaly = anomaly_indices(-log_mass)  # the largest mass is the outlier
    t = int(np.argmax(anomaly))
    signals = class_count_signals(float(anomaly[t]), float(log_mass[t] - np.median(log_mass)), len(log_mass))
    return {"dormant_excess": signals["anomaly_excess"], "dormant_log_z": signals["log_size_z"]}


def scan_signals(sizes: np.ndarray, anomaly: np.ndarray, response: np.ndarray) -> tuple[int, dict[str, float]]:
    """The suspected target (the class with the largest anomaly index) and the signals of the image head: the
    class-count-corrected anomaly index and size ratio of that class, and the detector's response to its trigger,
    alone and above the median class's (``response``: per-class mean detector score, zeros without a detector)."""
    target = int(np.argmax(anomaly))
    return target, {
        **synthesis_signals(anomaly, sizes, target),
        "detector_response": float(response[target]),
        "detector_response_gap": float(response[target] - np.median(response)),
    }
