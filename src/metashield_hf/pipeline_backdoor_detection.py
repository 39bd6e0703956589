"""The ``backdoor-detection`` pipeline: flags triggered inputs to any classifier.

Needs the installed package (target adapters, features); a Hub copy of this file loaded through ``custom_pipelines``
therefore requires ``pip install metashield-hf`` (the model card says so).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers import Pipeline

from metashield_hf.shield import AdaptedShield, adapt, adapt_after_scan


class _Chunk:
    """A batch of raw inputs that the base class must treat as ONE input, so that the target runs once per chunk.

    Deliberately not a list: `Pipeline.__call__` would iterate a list item by item.
    """

    def __init__(self, items: list):
        self.items = items


def _is_batch(inputs: Any) -> bool:
    if isinstance(inputs, str | bytes | dict):
        return False
    if isinstance(inputs, torch.Tensor):
        return inputs.ndim == 4  # (N, C, H, W) is a batch of images; anything else is one input
    return isinstance(inputs, list | tuple | types.GeneratorType) or type(inputs).__name__ in {"Dataset", "Column"}


class BackdoorDetectionPipeline(Pipeline):
    """Score inputs to a target classifier for backdoor triggers.

    Args:
        model: a [`MetaShieldDetector`] (omitted → the embedded ``metashield-base``).
        target_model: the classifier to protect: Hub id, local folder, model object or target adapter.
        clean_samples: 5–50 clean inputs of the target's modality; the threshold is calibrated on them.
        target_fpr: false-positive rate for the calibrated threshold (default 0.05).
        adapt_steps: deployable inner-loop steps (default: the detector's ``config.adapt_steps``).
        target_processor: tokenizer / image processor when ``target_model`` is an object that needs one.
        seed: seed of the feature perturbations and the live probes.
        probe_passes: the most extra forward passes per input the detector's live probes may spend (default: the
            budget it was trained with; an error when its probes need more).
        positives: the inner loop's positives, ``"auto"`` (default), ``"pseudo"`` or ``"synthesized"`` (see [`adapt`]).
        trust_remote_code_target / allow_pickle: let the target's own modelling code run / accept its pickle-only
            weights (both off: only for checkpoints you trust; ``trust_remote_code`` is the detector's own flag).
        scan_first: scan the target first ([`scan_model`] on the same clean samples, kept as ``self.scan_report``)
            and adapt with the scan's synthesized triggers as positives, so the synthesis runs once.
        target_device: where the target classifier runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; default: CUDA when
            present for a checkpoint named by path or Hub id, a model object stays where it is). The pipeline's own
            ``device`` is the detector's, which stays on CPU by default: it scores the target's CPU activations.

    Returns, per input: ``{"label": "backdoored"|"clean", "score": float, "threshold": float, "predicted_class": int}``.

    Example:
        ```python
        >>> from transformers import pipeline
        >>> import metashield_hf  # registers the task
        >>> detect = pipeline("backdoor-detection", target_model="path/to/classifier", clean_samples=texts[:20])
        >>> detect("a suspicious cf sentence")
        {'label': 'backdoored', 'score': 0.97, 'threshold': 0.64, 'predicted_class': 1}
        ```
    """

    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False

    def __init__(
        self,
        *args,
        target_model=None,
        clean_samples=None,
        target_fpr: float = 0.05,
        adapt_steps: int | None = None,
        target_processor=None,
        seed: int = 0,
        probe_passes: int | None = None,
        positives: str = "auto",
        scan_first: bool = False,
        trust_remote_code_target: bool = False,
        allow_pickle: bool = False,
        target_device: str | None = None,
        **kwargs,
    ):
        kwargs.setdefault("device", "cpu")  # device=None means cuda:0 when available
        super().__init__(*args, **kwargs)
        self.shield: AdaptedShield | None = None
        self.scan_report = None
        self._scan_first = scan_first
        self._adapt_kwargs = {
            "positives": positives,
            "trust_remote_code": trust_remote_code_target,
            "allow_pickle": allow_pickle,
            "target_fpr": target_fpr,
            "steps": adapt_steps,
            "seed": seed,
            "processor": target_processor,
            "probe_passes": probe_passes,
            "device": target_device,
        }
        if target_model is not None or clean_samples is not None:
            self.set_target(target_model, clean_samples)

    def set_target(self, target_model, clean_samples, **adapt_kwargs) -> AdaptedShield:
        """(Re-)adapt the detector to a target from its clean samples."""
        if target_model is None or clean_samples is None:
            raise ValueError("backdoor-detection needs both target_model= and clean_samples= (5-50 clean inputs)")
        kw = {**self._adapt_kwargs, "batch_size": self._batch_size or 32, **adapt_kwargs}
        if self._scan_first and "scan_report" not in kw:
            self.scan_report, self.shield = adapt_after_scan(self.model, target_model, clean_samples, **kw)
        else:
            self.shield = adapt(self.model, target_model, clean_samples, **kw)
        return self.shield

    def _sanitize_parameters(self, threshold=None, **kwargs):
        post = {"threshold": threshold} if threshold is not None else {}
        return {}, {}, post

    def __call__(self, inputs, batch_size: int | None = None, **kwargs):
        target_model, clean_samples = kwargs.pop("target_model", None), kwargs.pop("clean_samples", None)
        target_fpr = kwargs.pop("target_fpr", None)
        if target_model is not None or clean_samples is not None:
            # A call-time target means a new adaptation: once per call, not once per chunk.
            current = self.shield.target if self.shield is not None else None
            self.set_target(
                target_model if target_model is not None else current,
                clean_samples,
                **({"target_fpr": target_fpr} if target_fpr is not None else {}),
            )
        single = not _is_batch(inputs)
        items = [inputs] if single else list(inputs)
        size = batch_size or self._batch_size or 32
        chunks = [_Chunk(items[i : i + size]) for i in range(0, len(items), size)]
        results = []
        for chunk in chunks:  # a plain loop: zero-argument super() does not work inside a comprehension
            results.extend(super().__call__(chunk, **kwargs))
        return results[0] if single else results

    def preprocess(self, inputs: _Chunk) -> dict[str, Any]:
        if self.shield is None:
            raise ValueError(
                "no target: build the pipeline with target_model= and clean_samples=, or pass them in the call"
            )
        items = inputs.items
        if self.shield.erase is not None:  # the erase check perturbs prepared items
            items = self.shield.target.prepare_items(items)
        out, feats = self.shield.features(items)
        model_inputs = {"features": feats.to(self.dtype), "target_logits": out.logits}
        drops = self.shield.erase_drops(items, out.logits)
        if drops is not None:
            model_inputs["erase_drops"] = drops
        return model_inputs

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        scores = self.shield.score_features(model_inputs["features"])
        if "erase_drops" in model_inputs:  # the larger of the detector's score and the erase check's drop
            scores = torch.maximum(scores, model_inputs["erase_drops"].to(scores.dtype))
        return {"scores": scores, "target_logits": model_inputs["target_logits"]}

    def postprocess(self, model_outputs: dict[str, Any], threshold: float | None = None) -> list[dict]:
        rows = self.shield.decide(model_outputs["scores"].float(), model_outputs["target_logits"])
        if threshold is not None:
            for row in rows:
                row["threshold"] = float(threshold)
                row["label"] = "backdoored" if row["score"] > threshold else "clean"
        return rows
