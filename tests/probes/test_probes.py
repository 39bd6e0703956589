"""Live probes: known answers, the pass budget, eval mode, and the bad inputs the issue lists."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from builders import build_text_model, build_timm_model
from metashield_hf.baselines import BASELINES
from metashield_hf.probes import (
    PROBES,
    LiveEvidence,
    ProbeError,
    amplifiable_layers,
    amplified,
    eval_mode,
    layer_ranks,
    standardise_against,
)
from metashield_hf.targets import load_target


class NormNet(nn.Module):
    """x → Linear → LayerNorm → bias-free head: amplifying the LayerNorm scales the logits, nothing else."""

    def __init__(self, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.drop = nn.Dropout(0.5)
        self.classifier = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        return self.classifier(self.drop(self.norm(self.body(x))))


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


class FailsOnSaturation(NoNorm):
    """Refuses a row with two values at the batch maximum (what clipping an amplified input produces)."""

    def forward(self, x):
        if bool(((x == x.max()).sum(1) >= 2).any()):
            raise RuntimeError("saturated input")
        return super().forward(x)


def data(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(seed))


def test_amplified_scales_and_restores_exactly_also_on_error():
    model = NormNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with amplified([model.norm], 1.5):
        assert torch.equal(model.norm.weight, before["norm.weight"] * 1.5)
    with pytest.raises(KeyError), amplified([model.norm], 3.0):
        raise KeyError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_amplifiable_layers_fall_back_to_weight_layers_and_say_so_once(caplog):
    assert amplifiable_layers(NormNet(), NormNet().classifier)[1] == "normalisation"
    model = NoNorm()
    with caplog.at_level(logging.WARNING, logger="metashield_hf.probes.parameters"):
        layers, kind = amplifiable_layers(model, model.classifier)
        amplifiable_layers(model, model.classifier)
    assert kind == "weight" and layers == [model.body]
    assert sum("no affine normalisation layers" in r.message for r in caplog.records) == 1


def test_ibd_psc_known_answer_on_a_layernorm_model():
    # Amplifying the only LayerNorm by w multiplies the bias-free logits by w: the prediction never changes, so the
    # adaptive depth is 1, there is one amplified model, and the score is softmax(w · logits)[argmax] exactly.
    target = load_target(NormNet())
    x = data()
    base = BASELINES.build("ibd_psc").fit(target=target, inputs=x[:8])
    logits = target(x[8:]).logits.double()
    expected = (1.5 * logits).softmax(1).amax(1).numpy()
    np.testing.assert_allclose(base.score(inputs=x[8:]), expected, rtol=1e-6)


def test_scale_up_known_answer_on_a_scale_invariant_model():
    # A bias-free linear model is scale-invariant: while the amplified copies (the paper's factors 3, 5, 7, 9, 11)
    # stay inside the clip range, none changes the prediction, so every consistency is 1.
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    target = load_target(model)
    wide = torch.tensor([[100.0] * 4, [-100.0] * 4])  # the clean range, and so the clip range, is [-100, 100]
    support, x = torch.cat([data()[:4], wide]), data(8, seed=1)  # x * 11 <= 11: never clipped
    ev = LiveEvidence(("input_amplification",))
    ev.fit(target, support)
    assert ev.probes[0].factors == (3.0, 5.0, 7.0, 9.0, 11.0)
    assert np.all(ev.statistics(x)[:, 0] == 1.0)
    scores = BASELINES.build("scale_up").fit(target=target, inputs=support).score(inputs=x)
    assert scores.shape == (8,) and np.all((scores >= 0) & (scores <= 1))
    assert np.all(scores == 1.0)
    # With a bias the prediction depends on scale: class 1 while sum(x) < 2.5, class 0 beyond. sum(x) = 0.6 keeps
    # class 1 at x3 (1.8) and flips at x5, x7, x9, x11: a consistency of exactly 1/5.
    biased = nn.Linear(4, 3)
    with torch.no_grad():
        biased.weight.zero_()
        biased.weight[0] = 1.0
        biased.bias.copy_(torch.tensor([0.0, 2.5, -10.0]))
    probe = BASELINES.build("scale_up").fit(target=load_target(nn.Sequential(biased)), inputs=support)
    np.testing.assert_allclose(probe.score(inputs=torch.full((2, 4), 0.15)), [0.2, 0.2])


def test_ted_rank_known_answer():
    # Two layers, support of classes 0,0,1,1. Query predicted 1: at layer 0 its nearest support rows are the two
    # class-0 ones (rank 2 of 4 → 0.5), at layer 1 a class-1 row is nearest (rank 0).
    s0 = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    s1 = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    pred = torch.tensor([0, 0, 1, 1])
    q0, q1 = torch.tensor([[0.05]]), torch.tensor([[5.05]])
    ranks, dists = layer_ranks([q0, q1], torch.tensor([1]), [s0, s1], pred)
    np.testing.assert_allclose(ranks, [[0.5, 0.0]])
    np.testing.assert_allclose(dists, np.log(np.array([[0.05, 0.05]]) + 1e-12), rtol=1e-5)
    loo, _ = layer_ranks([s0, s1], pred, [s0, s1], pred, leave_one_out=True)
    np.testing.assert_allclose(loo, np.zeros((4, 2)))  # every clean row's nearest other is of its class
    assert ((ranks - loo.mean(0)) ** 2).sum() > 0


def test_standardise_against_known_answer():
    ref = np.array([[1.0], [2.0], [3.0]])
    out = standardise_against(np.array([[2.0], [10.0]]), ref)
    np.testing.assert_allclose(out[:, 0], [2.0, 10.0])
    np.testing.assert_allclose(out[:, 1], [0.0, 8.0 / np.std([1.0, 2.0, 3.0])])
    np.testing.assert_allclose(out[:, 2], [0.5, 1.0])
    loo = standardise_against(ref, ref, leave_one_out=True)
    np.testing.assert_allclose(loo[:, 2], [0.0, 0.5, 1.0])


def test_budget_and_selection_errors():
    with pytest.raises(ValueError, match=r"need 16 extra forward passes .* probe_passes is 10"):
        LiveEvidence(probe_passes=10)
    with pytest.raises(ValueError, match="superimposition' needs at least 2 extra forward passes"):
        LiveEvidence(("superimposition",), passes={"superimposition": 1})
    with pytest.raises(KeyError, match="unknown probe 'nope'"):
        LiveEvidence(("nope",))
    with pytest.raises(ValueError, match="more than once"):
        LiveEvidence(("trajectory", "trajectory"))
    with pytest.raises(ValueError, match="not selected"):
        LiveEvidence(("trajectory",), passes={"superimposition": 4})
    none = LiveEvidence((), probe_passes=0)
    assert none.feature_names == [] and none.extra_passes == 0
    assert LiveEvidence(probe_passes=16).extra_passes == 16
    assert set(PROBES.list()) == {"input_amplification", "parameter_amplification", "superimposition", "trajectory"}


def test_eval_mode_is_used_and_restored():
    model = NormNet().train()
    target = load_target(model)
    model.train()  # the adapter puts it in eval; a user may put it back
    x = data()
    ev = LiveEvidence(seed=1).fit(target, x[:6])
    assert model.training and model.drop.training  # restored
    stats = ev.statistics(x[6:])
    assert model.training
    model.eval()
    np.testing.assert_array_equal(stats, LiveEvidence(seed=1).fit(target, x[:6]).statistics(x[6:]))  # no dropout
    with eval_mode(model.train()):
        assert not model.drop.training
    assert model.drop.training


def test_features_are_fixed_width_finite_and_seeded():
    target = load_target(NoNorm())
    x = data(20)
    ev = LiveEvidence(seed=3).fit(target, x[:10])
    f = ev(x[10:])
    assert f.shape == (10, len(ev.feature_names)) == (10, 36) and torch.isfinite(f).all()
    assert ev.support_features().shape == (10, 36)
    torch.testing.assert_close(f, LiveEvidence(seed=3).fit(target, x[:10])(x[10:]))


def test_a_target_that_fails_on_a_perturbed_input_names_the_probe():
    target = load_target(FailsOnSaturation())
    x = data() * 0.5
    with pytest.raises(ProbeError, match="probe 'input_amplification': the target failed on amplified inputs"):
        LiveEvidence(("input_amplification",)).fit(target, x[:6])


def test_text_of_one_token_and_no_input_amplification(wordpiece_tokenizer):
    adapter = load_target(build_text_model("bert", wordpiece_tokenizer.vocab_size), wordpiece_tokenizer)
    ev = LiveEvidence(seed=0).fit(adapter, ["good", "bad", "fine", "dull", "film"])
    f = ev(["great", "a b"])
    assert torch.isfinite(f).all() and ev.extra_passes == 11  # 5 + 6: amplification does not apply to text
    with pytest.raises(NotImplementedError, match="not for text"):
        adapter.perturb("good", "amplify", factor=3.0)
    with pytest.raises(ValueError, match="unknown perturbation"):
        adapter.perturb("good", "rotate")
    with pytest.raises(ValueError, match="scale_up is defined for image and tensor inputs, not text"):
        BASELINES.build("scale_up").fit(target=adapter, inputs=["good", "bad", "fine"])


def test_images_of_one_colour():
    adapter = load_target(build_timm_model())
    flat = [Image.new("RGB", (32, 32), c) for c in ["red", "white", "black", "blue", "green"]]
    ev = LiveEvidence(seed=0).fit(adapter, flat)
    assert torch.isfinite(ev(flat[:2])).all() and torch.isfinite(ev.support_features()).all()


def test_text_superimposition_splices_without_deleting_a_word(wordpiece_tokenizer):
    from metashield_hf.targets.perturb import splice_words

    rng = np.random.default_rng(0)
    for _ in range(20):  # every input word survives, in order; only overlay words are added
        out = splice_words("cf the film was dull", "a fine warm story", 0.5, rng).split()
        it = iter(out)
        assert all(w in it for w in "cf the film was dull".split())
        assert len(out) - 5 == sum(w in {"a", "fine", "warm", "story"} for w in out)
    assert splice_words("a b", "x y", 0.0, rng) == "a b" and sorted(splice_words("a", "x y", 1.0, rng).split()) == [
        "a", "x", "y"]  # fmt: skip
    adapter = load_target(build_text_model("bert", wordpiece_tokenizer.vocab_size), wordpiece_tokenizer)
    spliced = adapter.perturb("cf film", "superimpose", overlay="good bad", rng=rng, text_mix=1.0)
    replaced = adapter.perturb("cf film", "superimpose", overlay="good", rng=rng, text_mix=1.0, text_mode="replace")
    assert sorted(spliced.split()) == ["bad", "cf", "film", "good"] and replaced == "good good"
    with pytest.raises(ValueError, match="unknown text_mode"):
        adapter.perturb("cf", "superimpose", overlay="x", rng=rng, text_mode="shuffle")
    with pytest.raises(ValueError, match="text_mode must be one of"):
        PROBES.build("superimposition", text_mode="shuffle")
