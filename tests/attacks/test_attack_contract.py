"""Contract tests run over every registered attack: a new attack is tested the moment it registers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metashield_hf.attacks import ATTACKS, NOISE_COLUMN, POISONED_COLUMN, Attack, attack_from_dict

EXPECTED = {
    "badnets",
    "blend",
    "trojan_watermark",
    "wanet",
    "sig",
    "filter",
    "bpp",
    "low_frequency",
    "ftrojan",
    "refool",
    "rare_word",
    "char_substitution",
    "syntactic_template",
}
EXPECTED_FL = {
    "fl_data_poisoning",
    "dba",
    "model_replacement",
    "model_replacement_constrained",
    "neurotoxin",
    "targeted_weight_modification",
}
CV = [n for n in ATTACKS.list() if ATTACKS.get(n).domain == "cv"]
NLP = [n for n in ATTACKS.list() if ATTACKS.get(n).domain == "nlp"]
# fl attacks train malicious clients, but what a model is probed with is their cv trigger: ``apply`` and ``poison``
# take images, so every vision contract below holds for them too.
FL = [n for n in ATTACKS.list() if ATTACKS.get(n).domain == "fl"]
IMAGE = CV + FL
ALL = IMAGE + NLP


def _images(seed: int = 0, shape: tuple[int, ...] = (4, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _inputs(name: str, sentences: list[str]):
    return _images() if name in IMAGE else list(sentences[:6])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, Image.Image):
        return a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_registry_holds_the_issue_attacks():
    assert EXPECTED | EXPECTED_FL <= set(ATTACKS.list())
    assert set(CV) | set(NLP) >= EXPECTED
    assert set(FL) >= EXPECTED_FL
    assert set(ALL) == set(ATTACKS.list()), "every attack must be in a domain the contract tests cover"
    for name in EXPECTED | EXPECTED_FL:
        cls = ATTACKS.get(name)
        assert issubclass(cls, Attack) and cls.name == name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


@pytest.mark.parametrize("name", ALL)
def test_frozen_and_validated(name):
    attack = ATTACKS.build(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.seed = 3
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ATTACKS.build(name, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        ATTACKS.build(name, seed=1.5)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed(name, sentences):
    x = _inputs(name, sentences)
    out = ATTACKS.build(name, seed=3).apply(x)
    assert _same(out, ATTACKS.build(name, seed=3).apply(x))
    assert not _same(out, x), "the default trigger must change the input"
    other = ATTACKS.build(name, seed=4).apply(x)
    assert _same(out, other) != ATTACKS.build(name, seed=3).seed_dependent


@pytest.mark.parametrize("name", ALL)
def test_batch_equals_items(name, sentences):
    attack = ATTACKS.build(name, seed=1)
    x = _inputs(name, sentences)
    batch = attack.apply(x)
    if name in IMAGE:
        items = torch.stack([attack.apply(x[i]) for i in range(len(x))])
        torch.testing.assert_close(batch, items, atol=1e-6, rtol=0)
        torch.testing.assert_close(attack.apply(x.flip(0)), batch.flip(0), atol=1e-6, rtol=0)
    else:
        assert batch == [attack.apply(t) for t in x]
        assert attack.apply(x[::-1]) == batch[::-1]  # the same text gets the same trigger in any batch order


@pytest.mark.parametrize("name", IMAGE)
def test_vision_types_shapes_and_range(name):
    attack = ATTACKS.build(name, seed=2)
    for x in (_images(), _images(1, (2, 1, 12, 20)), _images(2, (3, 16, 16)), _images(3, (1, 3, 16, 16)).double()):
        y = attack.apply(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
    x8 = (_images(4) * 255).to(torch.uint8)
    assert attack.apply(x8).dtype == torch.uint8 and attack.apply(x8).shape == x8.shape
    arrays = [np.asarray(x8[0].permute(1, 2, 0)), np.asarray(x8.permute(0, 2, 3, 1)), np.asarray(x8[0, 0])]
    for a in arrays:  # (H, W, C), (N, H, W, C), (H, W)
        b = attack.apply(a)
        assert isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.shape == a.shape
    rgb = Image.fromarray(arrays[0])
    gray = Image.fromarray(np.asarray(x8[1, 0, :, :12]))  # non-square
    rgba = rgb.convert("RGBA")
    for im in (rgb, gray, rgba, rgb.convert("P")):
        out = attack.apply(im)
        assert isinstance(out, Image.Image) and out.mode == im.mode and out.size == im.size
    assert np.array_equal(np.asarray(attack.apply(rgba))[..., 3], np.asarray(rgba)[..., 3])  # alpha kept
    outs = attack.apply([rgb, gray])  # a list of images of different sizes and modes
    assert isinstance(outs, list) and [(o.mode, o.size) for o in outs] == [("RGB", (16, 16)), ("L", (12, 16))]
    assert _same(outs[0], attack.apply(rgb))


@pytest.mark.parametrize("name", NLP)
def test_text_types(name, sentences):
    attack = ATTACKS.build(name)
    assert isinstance(attack.apply(sentences[0]), str)
    out = attack.apply(tuple(sentences[:3]))
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(t, str) for t in out)
    assert attack.apply([]) == []
    with pytest.raises(TypeError, match="str or a list of str"):
        attack.apply(["ok", 3])
    with pytest.raises(TypeError, match="str or a list of str"):
        attack.apply(_images())


@pytest.mark.parametrize("name", ALL)
def test_to_dict_round_trip(name):
    attack = ATTACKS.build(name, seed=7)
    params = attack.to_dict()
    assert params["name"] == name and params["seed"] == 7
    text = json.dumps(params)
    assert attack_from_dict(json.loads(text)) == attack
    assert attack_from_dict(text) == attack
    assert hash(attack_from_dict(text)) == hash(attack)
    with pytest.raises(ValueError, match="unknown parameters"):
        attack_from_dict({**params, "bogus": 1})


def test_attack_from_dict_errors():
    with pytest.raises(ValueError, match="need a 'name' key"):
        attack_from_dict({"seed": 1})
    with pytest.raises(KeyError, match="unknown attack 'nope'"):
        attack_from_dict({"name": "nope"})


@pytest.mark.parametrize("name", ALL)
def test_poison_contract(name, digits_dataset, sentences_dataset):
    ds = digits_dataset if name in IMAGE else sentences_dataset
    column = "image" if name in IMAGE else "text"
    attack = ATTACKS.build(name, seed=5)
    rate, target = 0.25, 1
    out = attack.poison(ds, rate=rate, target=target)

    extra = {POISONED_COLUMN} | ({NOISE_COLUMN} if getattr(attack, "noise_mode", False) else set())
    assert set(out.column_names) == set(ds.column_names) | extra
    assert all(out.features[c] == ds.features[c] for c in ds.column_names)
    poisoned = np.asarray(out[POISONED_COLUMN])
    labels, new_labels = np.asarray(ds["label"]), np.asarray(out["label"])
    assert poisoned.sum() == round(rate * len(ds)) == 5
    assert (new_labels[poisoned] == target).all()
    assert (labels[poisoned] != target).all()
    assert (new_labels[~poisoned] == labels[~poisoned]).all()

    noise = np.asarray(out[NOISE_COLUMN]) if NOISE_COLUMN in out.column_names else np.zeros(len(ds), dtype=bool)
    raw_in = ds.cast_column(column, type(ds.features[column])(decode=False)) if name in IMAGE else ds
    raw_out = out.cast_column(column, type(ds.features[column])(decode=False)) if name in IMAGE else out
    for i in np.flatnonzero(~poisoned & ~noise):  # untouched rows are stored exactly as before
        assert raw_out[int(i)][column] == raw_in[int(i)][column]
    for i in np.flatnonzero(poisoned):  # poisoned rows hold exactly the trigger applied to the original input
        assert _same(out[int(i)][column], attack.apply(ds[int(i)][column]))

    again = ATTACKS.build(name, seed=5).poison(ds, rate=rate, target=target)
    assert again[POISONED_COLUMN] == out[POISONED_COLUMN]
    other = ATTACKS.build(name, seed=6).poison(ds, rate=rate, target=target)
    assert other[POISONED_COLUMN] != out[POISONED_COLUMN]  # the rows picked depend on the seed


@pytest.mark.parametrize("name", [CV[0], NLP[0], FL[0]])
def test_poison_errors(name, digits_dataset, sentences_dataset):
    ds, wrong = (digits_dataset, sentences_dataset) if name in IMAGE else (sentences_dataset, digits_dataset)
    attack = ATTACKS.build(name)
    eligible = 18 if name in IMAGE else 10
    with pytest.raises(ValueError, match=f"only {eligible} of 20 rows have a label other than target=1"):
        attack.poison(ds, rate=0.95, target=1)
    with pytest.raises(ValueError, match="rate must be a finite number in"):
        attack.poison(ds, rate=1.5, target=1)
    with pytest.raises(ValueError, match="target=10 is not a class"):
        attack.poison(ds, rate=0.1, target=10)
    with pytest.raises(ValueError, match="needs a (Image|string) column"):
        attack.poison(wrong, rate=0.1, target=1)
    with pytest.raises(ValueError, match="label column 'y' not in"):
        attack.poison(ds, rate=0.1, target=1, label_column="y")
    with pytest.raises(ValueError, match="already has a 'poisoned' column"):
        attack.poison(attack.poison(ds, rate=0.1, target=1), rate=0.1, target=1)
    assert attack.poison(ds, rate=0.0, target=1)[POISONED_COLUMN] == [False] * len(ds)
