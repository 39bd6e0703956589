"""Model-level scan: backdoored vs clean digits models, text models through embedding space, the model-level head,
and `metashield scan` with every clean-sample source and every bad input (exit code 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builders import NUM_LABELS, build_image_model, build_text_model, planted_digits_model
from metashield_hf.cli import main
from metashield_hf.scan import (
    AGNOSTIC,
    BLEND,
    BLEND_SIGNALS,
    DEFAULT_BLEND_STEPS,
    LARGE_VOCABULARY,
    NEURAL_CLEANSE_RULE_HEAD,
    SIGNALS,
    SOURCE,
    SOURCE_SIGNALS,
    ScanHead,
    ScanReport,
    anomaly_indices,
    chance_anomaly_index,
    class_count_signals,
    fit_scan_head,
    neural_cleanse_scan,
    scan_model,
)
from test_pipeline import clean_sentences

FAST = ["--steps", "5"]  # the CLI tests check plumbing, not detection quality


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, wordpiece_tokenizer):
    folder = tmp_path_factory.mktemp("scan") / "bert"
    build_text_model("bert", len(wordpiece_tokenizer)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    return folder


# ---- the scan itself ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scan_tells_backdoored_from_clean_digits(digits_models):
    backdoored, clean = digits_models
    assert backdoored.attack_success_rate > 0.9 and clean.attack_success_rate < 0.2
    bd = scan_model(backdoored.model, backdoored.clean_pool[:20], seed=0)
    ok = scan_model(clean.model, clean.clean_pool[:20], seed=0)
    assert bd.score > ok.score
    assert bd.suspected_target == backdoored.target_label
    assert bd.verdict == "backdoored" and ok.verdict == "clean"
    # the backdoor's target stands out more than any class of the clean twin; a clean model's easiest class can pass
    # Neural Cleanse's 2.0 by itself (3.9 with the digits model this environment trains), so the verdict is the head's
    assert bd.anomaly_index > max(2.0, ok.anomaly_index)
    assert bd.space == "pixels" and len(bd.per_class) == 10 and bd.n_clean_samples == 20
    target = bd.per_class[bd.suspected_target]
    assert target.reached and target.flip_rate >= 0.9
    assert target.trigger_size == min(c.trigger_size for c in bd.per_class)
    assert all(0.0 <= c.detector_score <= 1.0 for c in bd.per_class)
    # the blend synthesis, the max-margin statistic and the dormancy run by default on image models; the head's
    # image/agnostic part (the blend part's signals and the max-margin's) scores the scan
    timings = {"load_s", "synthesis_s", "detector_s", "blend_s", "max_margin_s", "dormancy_s", "total_s"}
    assert set(bd.timings) == timings
    assert all(0.0 < c.blend_size <= 1.0 for c in bd.per_class)
    part = ScanHead.load().by_modality[f"image/{AGNOSTIC}"]
    assert bd.score == pytest.approx(ScanHead(**part).score(bd.signals))
    again = json.loads(bd.to_json())
    assert again["verdict"] == "backdoored" and again["per_class"][0]["class_index"] == 0


@pytest.mark.slow
def test_neural_cleanse_baseline_on_the_same_models(digits_models):
    backdoored, clean = digits_models
    bd = neural_cleanse_scan(backdoored.model, backdoored.clean_pool[:20], seed=0)
    ok = neural_cleanse_scan(clean.model, clean.clean_pool[:20], seed=0)
    assert bd.method == "neural_cleanse" and bd.score == bd.anomaly_index and bd.threshold == 2.0
    assert bd.suspected_target == backdoored.target_label
    assert bd.anomaly_index > ok.anomaly_index
    assert bd.per_class[0].detector_score is None


def test_text_model_scans_by_token_search_and_on_request_in_embedding_space(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    clean = clean_sentences(12, 0)
    report = scan_model(model, clean, processor=wordpiece_tokenizer, steps=20, seed=0)
    # the shipped head's text part reads token signals only, so the embedding synthesis is skipped by default
    assert isinstance(report, ScanReport) and report.space == "tokens" and report.options["synthesis"] is False
    assert len(report.per_class) == NUM_LABELS and report.verdict in {"clean", "backdoored"}
    assert 0.0 <= report.score <= 1.0 and 0 <= report.suspected_target < NUM_LABELS
    assert report.anomaly_index is None and "synthesis_s" not in report.timings
    for c in report.per_class:
        assert c.trigger_size is None and c.anomaly_index is None and c.token_trigger
        assert c.flip_rate == c.token_flip_rates[-1] and 0.0 <= c.detector_score <= 1.0
    # the detector's strongest response to any class's token trigger, weighed by the share of samples it flips
    diverted = [c.detector_score * c.token_flip_rates[-1] for c in report.per_class]
    assert report.signals["token_detector"] == pytest.approx(max(diverted))
    assert report.suspected_target == int(np.argmax(diverted))
    full = scan_model(model, clean, processor=wordpiece_tokenizer, steps=20, seed=0, synthesis=True)
    assert full.space == "embeddings" and full.options["synthesis"] is True and "synthesis_s" in full.timings
    assert all(np.isfinite(c.trigger_size) and np.isfinite(c.anomaly_index) for c in full.per_class)
    # the detector reads the synthesized inputs too (detector_response), and still the token triggers: the same token
    # signals and token_detector, so the same score and target
    assert full.score == pytest.approx(report.score) and full.suspected_target == report.suspected_target
    assert set(report.signals) < set(full.signals) and "detector_response" in full.signals
    assert full.signals["token_detector"] == pytest.approx(report.signals["token_detector"])
    # without the detector its signals are 0, as documented, and the head still scores the token signals
    blind = scan_model(model, clean, processor=wordpiece_tokenizer, steps=20, seed=0, use_detector=False)
    assert blind.signals["token_detector"] == 0.0 and blind.signals["token_prob"] == report.signals["token_prob"]
    assert not any(p.grad is not None for p in model.parameters())  # the scans leave the model untouched
    with pytest.raises(ValueError, match="needs the token search"):
        scan_model(model, clean, processor=wordpiece_tokenizer, token_search=False, synthesis=False)


def test_scan_is_seeded(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    runs = [
        scan_model(model, clean_sentences(8, 1), processor=wordpiece_tokenizer, steps=10, seed=3) for _ in range(2)
    ]
    a, b = (json.loads(r.to_json()) for r in runs)
    for r in (a, b):
        r.pop("timings")
    assert a == b


def test_scan_refuses_too_few_samples_and_headless_models(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    with pytest.raises(ValueError, match="at least 5 clean samples"):
        scan_model(model, clean_sentences(4, 0), processor=wordpiece_tokenizer)
    with pytest.raises(ValueError, match="no classification head"):
        scan_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()), torch.rand(6, 1, 8, 8))


# ---- anomaly index and the model-level head ------------------------------------------------------------------------
def test_anomaly_index_known_answer():
    sizes = np.array([0.1, 0.5, 0.6, 0.4, 0.5])
    # median 0.5; |s - 0.5| = [0.4, 0, 0.1, 0.1, 0] → MAD 0.1 → scale 0.14826
    expected = (0.5 - sizes) / (1.4826 * 0.1)
    np.testing.assert_allclose(anomaly_indices(sizes), expected)
    assert np.all(anomaly_indices(np.full(4, 0.3)) == 0.0)  # all equal: no outlier, no NaN


def test_default_head_loads_and_scores():
    # the shipped head is either the Neural Cleanse prior or a head refit on the zoo (scripts/scan_benchmark.py)
    head = ScanHead.load()
    assert set(head.weights) <= set(SIGNALS) and 0.0 < head.threshold < 1.0
    assert 0.0 <= head.score(dict.fromkeys(SIGNALS, 0.0)) <= 1.0
    # Neural Cleanse's rule (the FL screen's head): anomaly index > 2 <=> score > 0.5, whatever the other signals
    rule = NEURAL_CLEANSE_RULE_HEAD
    others = {"log_size_ratio": -3.0, "detector_response": 0.9, "detector_response_gap": 0.5}
    assert rule.score({"anomaly_index": 3.0, **others}) > 0.5 > rule.score({"anomaly_index": 1.0, **others})
    assert rule.score({"anomaly_index": 2.0, **others}) == pytest.approx(0.5)


def test_fit_scan_head_on_synthetic_signals(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
    # backdoored: larger anomaly index, smaller triggers, higher detector response; one signal is pure noise
    x = np.c_[
        rng.normal(1.0, 0.6, n) + 2.5 * y,
        rng.normal(-0.2, 0.2, n) - 0.6 * y,
        rng.normal(0.5, 0.1, n),
        rng.normal(0.0, 0.05, n) + 0.1 * y,
    ]
    head = fit_scan_head(x, y)
    scores = np.array([head.score(dict(zip(head.weights, row, strict=True))) for row in x])
    assert ((scores > head.threshold) == y).mean() > 0.9
    assert head.weights["anomaly_excess"] > 0 and head.weights["log_size_z"] < 0
    head.save(tmp_path / "head.json")
    assert ScanHead.load(tmp_path / "head.json") == head
    with pytest.raises(ValueError, match="both 0"):
        fit_scan_head(x, np.ones(n, dtype=int))
    with pytest.raises(ValueError, match="4 values"):
        fit_scan_head(x[:, :3], y)


# ---- the CLI ----------------------------------------------------------------------------------------------------
def _scan(argv, capsys) -> tuple[int, str, str]:
    code = main(["scan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("source", ["txt", "csv", "jsonl", "parquet", "dataset"])
def test_cli_clean_sample_sources(source, bert_folder, tmp_path, capsys):
    import pandas as pd

    sentences = clean_sentences(10, 0)
    table = pd.DataFrame({"label": list(range(10)), "text": sentences})
    if source == "txt":
        spec = tmp_path / "clean.txt"
        spec.write_text("\n".join(sentences))
    elif source == "csv":
        spec = tmp_path / "clean.csv"
        table.to_csv(spec, index=False)
    elif source == "jsonl":
        spec = tmp_path / "clean.jsonl"
        table.to_json(spec, orient="records", lines=True)
    elif source == "parquet":
        spec = tmp_path / "clean.parquet"
        table.to_parquet(spec)
    else:
        (tmp_path / "ds").mkdir()
        table.to_csv(tmp_path / "ds" / "train.csv", index=False)
        spec = f"{tmp_path / 'ds'}:train:text"
    code, out, err = _scan([str(bert_folder), "--clean-samples", str(spec), "--n", "8", "--json", *FAST], capsys)
    assert code in (0, 1), err
    report = json.loads(out)
    assert report["n_clean_samples"] == 8 and report["space"] == "tokens"
    assert code == (1 if report["verdict"] == "backdoored" else 0) and "exit_code" not in report


def test_cli_image_folder_and_text_output(tmp_path, pil_images, capsys):
    model, processor = build_image_model("vit")
    model.save_pretrained(tmp_path / "vit")
    processor.save_pretrained(tmp_path / "vit")
    (tmp_path / "images").mkdir()
    for i in range(6):
        pil_images[i % len(pil_images)].save(tmp_path / "images" / f"{i}.png")
    argv = [str(tmp_path / "vit"), "--clean-samples", str(tmp_path / "images"), *FAST]
    code, out, err = _scan(argv, capsys)
    assert code in (0, 1), err
    assert "suspected target class" in out and "anomaly" in out and "pixels" in out
    # screen and refine: 2 steps for the 3 classes, then the most promising one to the full 5
    code, out, err = _scan([*argv, "--refine", "1", "--screen-steps", "2", "--json"], capsys)
    assert code in (0, 1), err
    report = json.loads(out)
    assert report["options"]["refine"] == 1 and report["options"]["screen_steps"] == 2


def test_cli_text_output_shows_the_token_triggers(bert_folder, tmp_path, capsys):
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(6, 0)))
    code, out, err = _scan([str(bert_folder), "--clean-samples", str(tmp_path / "clean.txt"), *FAST], capsys)
    assert code in (0, 1), err
    assert "anomaly index -;" in out and "tokens space" in out and "token trigger (class prob.)" in out
    rows = [line.split() for line in out.splitlines()[3:]]
    assert len(rows) == NUM_LABELS and all(r[2] == "-" and r[4] == "-" for r in rows)  # no size, no anomaly index


def test_cli_exit_code_1_when_backdoored(bert_folder, tmp_path, capsys):
    # A head that calls everything backdoored checks the exit-code plumbing without a real backdoor.
    ScanHead({"anomaly_index": 0.0}, 10.0, source="always").save(tmp_path / "head.json")
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(6, 0)))
    argv = [
        str(bert_folder),
        "--clean-samples",
        str(tmp_path / "clean.txt"),
        "--scan-head",
        str(tmp_path / "head.json"),
    ]
    code, out, _ = _scan([*argv, *FAST, "--neural-cleanse"], capsys)
    assert code == 1 and "BACKDOORED" in out and "Neural Cleanse" in out


def test_cli_bad_inputs_exit_2(bert_folder, tmp_path, capsys, wordpiece_tokenizer):
    from builders import build_headless_bert

    good = tmp_path / "clean.txt"
    good.write_text("\n".join(clean_sentences(8, 0)))
    cases = {}
    cases["missing"] = ([str(tmp_path / "missing"), "--clean-samples", str(good)], "does not exist")
    cases["no samples arg"] = ([str(bert_folder)], "--clean-samples is required")
    cases["no checkpoint"] = (["--clean-samples", str(good)], "name the checkpoint")
    cases["missing samples"] = ([str(bert_folder), "--clean-samples", str(tmp_path / "nope.txt")], "nope.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 20)
    cases["unreadable samples"] = ([str(bert_folder), "--clean-samples", str(tmp_path / "binary.txt")], "UTF-8")
    (tmp_path / "few.txt").write_text("\n".join(clean_sentences(3, 0)))
    cases["few samples"] = ([str(bert_folder), "--clean-samples", str(tmp_path / "few.txt")], "at least 5")
    cases["n below 5"] = ([str(bert_folder), "--clean-samples", str(good), "--n", "3"], "at least 5")
    cases["negative refine"] = ([str(bert_folder), "--clean-samples", str(good), "--refine", "-1"], "--refine")
    for option in ("--blend_steps", "--source_steps"):
        cases[f"negative {option}"] = ([str(bert_folder), "--clean-samples", str(good), option, "-1"], option)
    headless = tmp_path / "headless"
    build_headless_bert(len(wordpiece_tokenizer)).save_pretrained(headless)
    wordpiece_tokenizer.save_pretrained(headless)
    cases["no classification head"] = ([str(headless), "--clean-samples", str(good)], "not a classifier")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_folder / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    cases["pickle only"] = ([str(pickled), "--clean-samples", str(good)], "allow_pickle")
    for name, (argv, message) in cases.items():
        code, _, err = _scan([*argv, *FAST], capsys)
        assert code == 2, name
        assert message in err, (name, err)


def test_scan_head_parts_by_modality_round_trip(tmp_path):
    text = {"weights": {"token_prob": 2.0}, "bias": -1.0, "threshold": 0.5, "source": "text part"}
    head = ScanHead({"anomaly_index": 1.0}, 0.0, 0.5, "general", {"text": text})
    head.save(tmp_path / "head.json")
    back = ScanHead.load(tmp_path / "head.json")
    assert back == head and back.for_modality("image") is back
    part = back.for_modality("text")
    assert part.source == "text part" and part.score({"token_prob": 0.5}) == 0.5
    with pytest.raises(ValueError, match="needs signals"):
        part.score({"anomaly_index": 3.0})
    # a scan without the part's signals (text without the token search) is scored by the general head
    assert back.for_modality("text", {"anomaly_index": 3.0}) is back
    assert back.for_modality("text", {"token_prob": 0.5}) == part
    # no part for a variant: the modality's part scores it
    assert back.for_modality("text", {"token_prob": 0.5}, LARGE_VOCABULARY) == part


def test_scan_head_variant_part_for_large_vocabulary_scans(tmp_path):
    """A ``text/large_vocabulary`` part scores the text scans whose search prefiltered a large vocabulary; it falls
    back to the text part, then the general head, where the scan lacks the signals it weighs."""
    text = {"weights": {"token_prob": 2.0}, "bias": -1.0, "threshold": 0.5, "source": "text part"}
    large = {"weights": {"token_dominance_2": 4.0}, "bias": -2.0, "threshold": 0.5, "source": "large part"}
    head = ScanHead({"anomaly_index": 1.0}, 0.0, 0.5, "general", {"text": text, f"text/{LARGE_VOCABULARY}": large})
    head.save(tmp_path / "head.json")
    back = ScanHead.load(tmp_path / "head.json")
    signals = {"token_prob": 0.5, "token_dominance_2": 1.0}
    assert back == head and back.for_modality("text", signals, LARGE_VOCABULARY).source == "large part"
    assert back.for_modality("text", signals, LARGE_VOCABULARY).score(signals) == pytest.approx(1 / (1 + np.exp(-2)))
    assert back.for_modality("text", signals).source == "text part"  # a small vocabulary: the text part
    assert back.for_modality("text", {"token_prob": 0.5}, LARGE_VOCABULARY).source == "text part"
    assert back.for_modality("text", {"anomaly_index": 3.0}, LARGE_VOCABULARY) is back
    assert back.for_modality("image", {"anomaly_index": 3.0}, LARGE_VOCABULARY) is back


def test_class_count_correction_is_a_change_of_units_for_a_fixed_class_count():
    # with 2 classes the larger anomaly index is always 1 / 1.4826 (each size is one MAD from the median)
    assert chance_anomaly_index(2) == pytest.approx(1 / 1.4826, rel=1e-6)
    assert anomaly_indices(np.array([1.0, 2.0])).max() == pytest.approx(chance_anomaly_index(2), rel=1e-6)
    chance = [chance_anomaly_index(k) for k in (3, 10, 62)]
    assert chance == sorted(chance) and 1.5 < chance[1] < 2.3  # a maximum over more classes is larger by chance
    # for one K, anomaly_excess and log_size_z are affine in the raw signals (a head fit on 10-class models ranks
    # them as one fit on the raw signals would); across K, the same raw values count for less with more classes
    a = [class_count_signals(x, -x / 2, 10) for x in (1.0, 2.0, 3.0)]
    assert [s["anomaly_excess"] for s in a] == sorted(s["anomaly_excess"] for s in a)
    assert class_count_signals(3.0, -1.0, 62)["anomaly_excess"] < class_count_signals(3.0, -1.0, 10)["anomaly_excess"]
    assert class_count_signals(3.0, -1.0, 62)["log_size_z"] > class_count_signals(3.0, -1.0, 10)["log_size_z"]


@pytest.fixture(scope="module")
def digits_blend_model():
    """The bundled digits TinyCNN recipe poisoned with a whole-image Blend (alpha 0.2, 10% of rows, target 3)."""
    from metashield_hf.attacks import Blend

    return planted_digits_model(Blend(alpha=0.2, seed=0), 3)


@pytest.mark.slow
def test_blend_synthesis_finds_a_whole_image_trigger(digits_blend_model, digits_models):
    model, clean, target, asr = digits_blend_model
    assert asr > 0.9
    bd = scan_model(model, clean, seed=0, blend_steps=40)
    sizes = [c.blend_size for c in bd.per_class]
    assert int(np.argmin(sizes)) == target and 0.0 < min(sizes) < 1.0
    assert set(BLEND_SIGNALS) <= set(bd.signals) and "blend_s" in bd.timings and bd.options["blend_steps"] == 40
    ok = scan_model(digits_models[1].model, digits_models[1].clean_pool[:20], seed=0, blend_steps=40)
    assert bd.signals["blend_anomaly_excess"] > ok.signals["blend_anomaly_excess"]
    # on by default for image models, at DEFAULT_BLEND_STEPS; 0 turns it off: no blend signals, the same others
    default = scan_model(model, clean, seed=0)
    assert default.options["blend_steps"] == DEFAULT_BLEND_STEPS and set(BLEND_SIGNALS) <= set(default.signals)
    plain = scan_model(model, clean, seed=0, blend_steps=0)
    assert not set(BLEND_SIGNALS) & set(plain.signals) and plain.per_class[0].blend_size is None
    assert plain.options["blend_steps"] == 0 and plain.signals == {k: bd.signals[k] for k in plain.signals}
    # a head's image/blend part scores the scans with the blend signals; the others keep the image part
    # (the verdict compares with the part's threshold, not the head's)
    part = {"weights": {"blend_anomaly_excess": 1.0}, "bias": 0.0, "threshold": 0.999, "source": "test"}
    head = ScanHead({"anomaly_excess": 1.0}, 0.0, by_modality={f"image/{BLEND}": part})
    scored = scan_model(model, clean, seed=0, blend_steps=40, head=head)
    assert scored.score == pytest.approx(1 / (1 + np.exp(-bd.signals["blend_anomaly_excess"])))
    # a score above 0.5 but below the part's threshold: the verdict follows the part
    assert scored.threshold == 0.999 and 0.5 < scored.score < 0.999 and scored.verdict == "clean"
    assert scan_model(model, clean, seed=0, blend_steps=0, head=head).score == pytest.approx(
        1 / (1 + np.exp(-plain.signals["anomaly_excess"]))
    )
    with pytest.raises(ValueError, match="blend_steps"):
        scan_model(model, clean, blend_steps=-1)


def test_scan_head_source_scans_fall_back_to_the_blend_part():
    """An ``image/source`` part scores the scans with the source-specific synthesis; without one (or without its
    signals) such a scan, which also ran the default blend synthesis, is scored by the ``image/blend`` part, then by
    the plain image part."""
    image = {"weights": {"anomaly_excess": 1.0}, "bias": 0.0, "threshold": 0.5, "source": "image part"}
    blend = {"weights": {"blend_anomaly_excess": 1.0}, "bias": 0.0, "threshold": 0.5, "source": "blend part"}
    source = {"weights": {"source_log_size_z": -1.0}, "bias": 0.0, "threshold": 0.5, "source": "source part"}
    parts = {"image": image, f"image/{BLEND}": blend}
    head = ScanHead({"anomaly_index": 1.0}, 0.0, by_modality=parts)
    full = {"anomaly_excess": 1.0, "blend_anomaly_excess": 2.0, "source_log_size_z": -3.0}
    assert head.for_modality("image", full, SOURCE).source == "blend part"
    assert head.part_key("image", full, SOURCE) == f"image/{BLEND}" and head.part_key("text", full) is None
    assert (
        head.for_modality("image", {"anomaly_excess": 1.0, "source_log_size_z": -3.0}, SOURCE).source == "image part"
    )
    with_source = ScanHead({"anomaly_index": 1.0}, 0.0, by_modality={**parts, f"image/{SOURCE}": source})
    assert with_source.for_modality("image", full, SOURCE).score(full) == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert with_source.for_modality("image", full, BLEND).source == "blend part"


@pytest.mark.slow
def test_source_specific_synthesis_is_opt_in_and_reported(digits_models):
    from metashield_hf.scan import SOURCE_FLIP_THRESHOLD, SOURCE_LOSS_QUANTILE, prepare_clean_items
    from metashield_hf.scan.synthesis import synthesis_space, synthesize_triggers
    from metashield_hf.targets import load_target

    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    plain = scan_model(backdoored.model, clean, seed=0)
    assert not set(SOURCE_SIGNALS) & set(plain.signals) and plain.per_class[0].source_size is None
    report = scan_model(backdoored.model, clean, seed=0, source_steps=10)
    assert set(SOURCE_SIGNALS) <= set(report.signals) and report.options["source_steps"] == 10
    assert "source_s" in report.timings
    # the other signals are those of the scan without it
    assert {k: report.signals[k] for k in plain.signals} == plain.signals
    # per class: the sizes of a synthesis that counts half the samples flipped and weighs the easiest half
    adapter = load_target(backdoored.model)
    items = prepare_clean_items(adapter, clean, None, 0)
    torch.manual_seed(0)
    direct = synthesize_triggers(
        synthesis_space(adapter, items), adapter(items).logits.argmax(-1), 10, steps=10, seed=0,
        flip_threshold=SOURCE_FLIP_THRESHOLD, loss_quantile=SOURCE_LOSS_QUANTILE,
    )  # fmt: skip
    np.testing.assert_allclose([c.source_size for c in report.per_class], direct.sizes, rtol=1e-6)
    # the shipped head has no source part yet or has one: either way a part that reads the scan's signals scores it
    part = ScanHead.load().for_modality("image", report.signals, SOURCE)
    assert report.score == pytest.approx(part.score(report.signals))
    with pytest.raises(ValueError, match="source_steps"):
        scan_model(backdoored.model, clean, source_steps=-1)
