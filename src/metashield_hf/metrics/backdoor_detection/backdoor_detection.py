"""`evaluate` metric for backdoor detection: TPR, FPR, TPR at 1%/5% FPR, AUROC and accuracy.

Shipped inside the package, so it loads offline from its folder (no Hub download)::

    import evaluate
    from metashield_hf.evaluation.metrics import metric_path

    metric = evaluate.load(str(metric_path()))

The maths lives in ``metashield_hf.evaluation.metrics``; this file only declares the `evaluate` interface.
"""

from __future__ import annotations

import datasets
import evaluate

from metashield_hf.evaluation.metrics import detection_metrics

_DESCRIPTION = """\
Backdoor-detection metrics from one score per example (higher = more likely triggered) and a 0/1 reference
(1 = triggered input, or backdoored model for scans): AUROC, TPR at 1% and 5% FPR (threshold set on the clean scores),
and, given the detector's threshold (flag `score > threshold`), the detection rate on triggered inputs (`tpr`), the
false-positive rate on clean inputs (`fpr`) and `accuracy` (for scans: over models).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `float`): detector scores, higher = more likely triggered / backdoored.
    references (`list` of `int`): 1 = triggered input (backdoored model), 0 = clean.
    threshold (`float`, *optional*): the detector's decision threshold; without it `tpr`, `fpr` and `accuracy`
        are omitted.
    fprs (`tuple` of `float`, defaults to `(0.01, 0.05)`): clean FPRs at which to report the TPR.

Returns:
    auroc (`float`), tpr@1fpr (`float`), tpr@5fpr (`float`) and, with a threshold, tpr, fpr, accuracy (`float`).

Examples:
    >>> metric = evaluate.load(str(metric_path()))
    >>> metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1], threshold=0.5)
    {'auroc': 0.75, 'tpr@1fpr': 0.5, 'tpr@5fpr': 0.5, 'tpr': 0.5, 'fpr': 0.0, 'accuracy': 0.75}
"""

_CITATION = """\
@misc{metashield_hf,
  title = {MetaShield: few-shot, meta-learned backdoor detection for Hugging Face classifiers},
  year = {2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BackdoorDetection(evaluate.Metric):
    """Backdoor-detection metrics (see `metashield_hf.evaluation.metrics.detection_metrics`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, threshold=None, fprs=(0.01, 0.05)) -> dict[str, float]:
        return detection_metrics(predictions, references, threshold=threshold, fprs=tuple(fprs))
