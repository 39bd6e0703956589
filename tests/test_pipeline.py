"""The backdoor-detection pipeline end to end, for each model family, with tiny models built from configs."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import pipeline

import metashield_hf  # noqa: F401  (registers the task)
from builders import NUM_LABELS, SENTENCES, build_image_model, build_lora_model, build_text_model, build_timm_model
from metashield_hf import BackdoorDetectionPipeline, load_detector
from metashield_hf.zoo.examples import TinyCNN

WORDS = sorted({w for s in SENTENCES for w in s.replace(",", "").split()})


def clean_sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(6, 11))) for _ in range(n)]


def far_sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(["".join(rng.choice(list("#@~^%&"), 5)) for _ in range(12)]) for _ in range(n)]


def digit_images(n: int, offset: int) -> list:
    from PIL import Image
    from sklearn.datasets import load_digits

    imgs = load_digits().images[offset : offset + n] / 16.0
    return [Image.fromarray((np.kron(im, np.ones((4, 4))) * 255).astype(np.uint8)).convert("RGB") for im in imgs]


def noise_images(n: int, seed: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def _text_case(family, wordpiece_tokenizer, bpe_tokenizer):
    tok = bpe_tokenizer if family == "roberta" else wordpiece_tokenizer
    return (build_text_model(family, len(tok)), tok), clean_sentences(20, 0), far_sentences(10, 1)


def _image_case(family):
    model, processor = build_image_model(family)
    return (model, processor), digit_images(20, 0), noise_images(10, 1)


def _check(detect, clean_heldout, far):
    results = detect(clean_heldout + far)
    assert len(results) == len(clean_heldout) + len(far)
    thresholds = {r["threshold"] for r in results}
    assert len(thresholds) == 1 and 0.0 <= thresholds.pop() <= 1.0
    for r in results:
        assert set(r) == {"label", "score", "threshold", "predicted_class"}
        assert r["label"] in {"clean", "backdoored"} and math.isfinite(r["score"]) and 0.0 <= r["score"] <= 1.0
        assert r["label"] == ("backdoored" if r["score"] > r["threshold"] else "clean")
        assert 0 <= r["predicted_class"] < NUM_LABELS
    scores = np.array([r["score"] for r in results])
    n = len(clean_heldout)
    assert scores[n:].mean() > scores[:n].mean(), (scores[:n], scores[n:])
    single = detect(far[0])
    assert isinstance(single, dict) and single["score"] == pytest.approx(
        results[n]["score"], abs=1e-4
    )  # padding differs batched vs single


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_pipeline_transformers_text(family, wordpiece_tokenizer, bpe_tokenizer):
    (model, tok), clean, far = _text_case(family, wordpiece_tokenizer, bpe_tokenizer)
    detect = pipeline("backdoor-detection", target_model=model, target_processor=tok, clean_samples=clean[:10])
    assert isinstance(detect, BackdoorDetectionPipeline)
    _check(detect, clean[10:], far)


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_pipeline_transformers_image(family):
    (model, processor), clean, far = _image_case(family)
    detect = pipeline("backdoor-detection", target_model=model, target_processor=processor, clean_samples=clean[:10])
    _check(detect, clean[10:], far)


def test_pipeline_timm_folder(tmp_path):
    import timm

    timm.models.save_for_hf(build_timm_model(), tmp_path, safe_serialization=True)
    clean = digit_images(20, 0)
    detect = pipeline("backdoor-detection", target_model=str(tmp_path), clean_samples=clean[:10])
    _check(detect, clean[10:], noise_images(10, 1))


def test_pipeline_peft_lora(wordpiece_tokenizer):
    model = build_lora_model(
        build_text_model("bert", len(wordpiece_tokenizer)),
        seed=0,
        task_type="SEQ_CLS",
        target_modules=["query", "value"],
    )
    clean = clean_sentences(20, 0)
    detect = pipeline(
        "backdoor-detection", target_model=model, target_processor=wordpiece_tokenizer, clean_samples=clean[:10]
    )
    _check(detect, clean[10:], far_sentences(10, 1))


def test_pipeline_plain_torch_module():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = TinyCNN(num_classes=NUM_LABELS).eval()
    x = torch.tensor(load_digits().images[:20], dtype=torch.float32)[:, None] / 16.0
    far = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 4.0
    detect = pipeline("backdoor-detection", model=load_detector(), target_model=model, clean_samples=x[:10])
    _check(detect, list(x[10:]), list(far))


def test_pipeline_call_time_target_and_threshold(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    clean = clean_sentences(20, 0)
    detect = pipeline(
        "backdoor-detection", target_model=model, target_processor=wordpiece_tokenizer, clean_samples=clean[:10]
    )
    first = detect.shield
    out = detect(clean[10:12], clean_samples=clean[5:15])  # re-adapts once for the call
    assert detect.shield is not first and len(out) == 2
    forced = detect(clean[10:12], threshold=0.0)
    assert all(r["label"] == "backdoored" and r["threshold"] == 0.0 for r in forced)
    assert detect([]) == []


def test_pipeline_without_target_says_what_is_missing():
    detect = pipeline("backdoor-detection")  # the embedded default detector resolves offline
    with pytest.raises(ValueError, match="no target"):
        detect("text")
    with pytest.raises(ValueError, match="needs both target_model= and clean_samples="):
        detect.set_target(None, ["a"])


@pytest.mark.parametrize(
    "first", ["import metashield_hf", "from transformers import pipeline"], ids=["package_first", "pipeline_first"]
)
def test_the_task_and_auto_classes_register_whichever_is_imported_first(first):
    """``import metashield_hf`` registers lazily (when transformers loads its registries), so the order must not
    matter."""
    code = "\n".join(
        [
            first,
            "import metashield_hf",
            "from transformers import AutoConfig, AutoModel, pipeline",
            "from transformers.pipelines import PIPELINE_REGISTRY",
            "assert 'backdoor-detection' in PIPELINE_REGISTRY.get_supported_tasks()",
            "folder = str(metashield_hf.DEFAULT_DETECTOR_DIR)",
            "assert type(AutoConfig.from_pretrained(folder)).__name__ == 'MetaShieldConfig'",
            "assert type(AutoModel.from_pretrained(folder)) is metashield_hf.MetaShieldDetector",
            "assert type(pipeline('backdoor-detection')) is metashield_hf.BackdoorDetectionPipeline",
        ]
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
