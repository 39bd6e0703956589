"""The bundled examples: a tiny CNN trained on scikit-learn's digits with a BadNets patch backdoor (and its clean
twin), the same CNN trained by FedAvg over ten digits clients with one malicious client (and its clean twin), and a
tiny BERT trained on a few hundred SST-2 phrases with a rare-word trigger (and its clean twin).

The digits one is what ``metashield detect`` runs on a fresh machine with no network. Each example is trained once
(seconds to a minute) and cached (``$METASHIELD_CACHE``, default ``~/.cache/metashield``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..attacks import ATTACKS
from .spec import train_classifier

logger = logging.getLogger(__name__)
EXAMPLE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("METASHIELD_CACHE", Path.home() / ".cache" / "metashield"))


class TinyCNN(nn.Module):
    """A small CNN classifier for ``(N, C, H, W)`` images; the penultimate layer is ``fc``'s output (``width*2``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x)))


@dataclass
class DigitsExample:
    """The backdoored digits model and its held-out data (images are ``(N, 1, 8, 8)`` floats in [0, 1])."""

    model: TinyCNN
    clean_pool: torch.Tensor  # held-out clean images to draw the few clean samples from
    test_clean: torch.Tensor  # other held-out clean images
    test_triggered: torch.Tensor  # held-out images of non-target classes with the trigger
    target_label: int
    clean_accuracy: float
    attack_success_rate: float
    attack_params: dict


def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``: ``(N, 1, 8, 8)`` floats in [0, 1], a seeded
    60/40 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.6 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train_on_tensors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64
) -> nn.Module:
    """Train a classifier on in-memory tensors with the zoo's loop as plain Adam (no weight decay, constant rate);
    seeded, the same recipe for clean and poisoned models. Returns ``model`` in eval mode."""
    loss = lambda m, idx: nn.functional.cross_entropy(m(x[idx]), y[idx])  # noqa: E731
    return plain_adam(model, loss, len(x), batch=batch, epochs=epochs, lr=lr, seed=seed)


def plain_adam(model: nn.Module, loss, n: int, *, batch: int, epochs: int, lr: float, seed: int) -> nn.Module:
    """The zoo's training loop ([`train_classifier`]) as plain Adam: no weight decay, a constant rate, ``n`` rows in
    seeded random batches; ``loss(model, row_indices)`` gives a batch's loss."""
    train_classifier(
        model,
        loss,
        lambda g: torch.randperm(n, generator=g).split(batch),
        steps_per_epoch=math.ceil(n / batch),
        epochs=epochs,
        lr=lr,
        weight_decay=0.0,
        generator=torch.Generator().manual_seed(seed),
        final_lr_fraction=1.0,
    )
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def digits_example_of(
    model: nn.Module, attack, xte: torch.Tensor, yte: torch.Tensor, target_label: int
) -> DigitsExample:
    """A trained digits model as a [`DigitsExample`]: the first 100 test digits are the clean pool adaptation draws
    from, the rest are the held-out clean inputs, and the held-out digits of other classes carry ``attack``'s trigger;
    clean accuracy over the whole test split and ASR over the triggered inputs."""
    pool, rest_x, rest_y = xte[:100], xte[100:], yte[100:]
    triggered = attack.apply(rest_x[rest_y != target_label])
    with torch.no_grad():
        asr = float((model(triggered).argmax(-1) == target_label).float().mean())
    return DigitsExample(
        model=model,
        clean_pool=pool,
        test_clean=rest_x,
        test_triggered=triggered,
        target_label=target_label,
        clean_accuracy=accuracy(model, xte, yte),
        attack_success_rate=asr,
        attack_params=attack.to_dict(),
    )


def digits_badnets_example(seed: int = 0, target_label: int = 0, poison_rate: float = 0.1) -> DigitsExample:
    """Train (or load from the cache) the bundled backdoored digits model.

    Args:
        seed: seeds the split, the poisoning and the training.
        target_label: the class the trigger forces.
        poison_rate: fraction of the training set poisoned (taken from non-target rows).
    """
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_split(seed)
    attack = ATTACKS.build("badnets", patch_size=2, location="bottom_right", pattern="white", seed=seed)
    folder = cache_dir() / "examples" / f"digits_badnets_v{EXAMPLE_VERSION}_s{seed}_t{target_label}_p{poison_rate}"
    model = TinyCNN()
    if (folder / "model.safetensors").exists():
        model.load_state_dict(load_file(folder / "model.safetensors"))
        model.eval()
    else:
        g = torch.Generator().manual_seed(seed + 1)
        candidates = torch.nonzero(ytr != target_label).squeeze(1)
        chosen = candidates[torch.randperm(len(candidates), generator=g)[: round(poison_rate * len(xtr))]]
        xp, yp = xtr.clone(), ytr.clone()
        xp[chosen] = attack.apply(xtr[chosen])
        yp[chosen] = target_label
        logger.info("training the bundled digits example (once; cached in %s)", folder)
        train_on_tensors(model, xp, yp, epochs=40, seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "attack.json").write_text(json.dumps(attack.to_dict()))
    return digits_example_of(model, attack, xte, yte, target_label)


# ---- the bundled federated example: FedAvg over ten digits clients, one of them malicious -------------------------
FL_EXAMPLE_VERSION = 1  # part of the cache folder name: a new version retrains instead of loading a stale model
FL_ROUNDS, FL_ATTACK_FROM = 30, 21


def fl_digits_example(seed: int = 0, target_label: int = 0, poison_fraction: float = 0.8) -> DigitsExample:
    """Train (or load from the cache) the bundled federated example: the global [`TinyCNN`] of a FedAvg run.

    The digits training split is dealt at random (IID) to 10 clients, all of which train every round
    ([`metashield_hf.fl.federation.run_federated`], plain client SGD). With ``poison_fraction > 0`` one client is
    malicious from round ``FL_ATTACK_FROM`` on: it stamps the same BadNets corner patch as [`digits_badnets_example`]
    on that fraction of its non-target rows, relabels them ``target_label``, trains longer and boosts its update
    (``model_replacement`` with a fixed scale, Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459).
    ``poison_fraction = 0.0`` gives the clean twin: the same run with no malicious client.

    Args:
        seed: seeds the split, the client deal, the initial model and the run.
        target_label: the class the trigger forces.
        poison_fraction: fraction of the malicious client's non-target rows it poisons; 0.0 gives the clean twin.

    Returns:
        A [`DigitsExample`] whose model is the global model after the last round.

    Example:
        ```python
        >>> ex = fl_digits_example()
        >>> ex.model(ex.test_triggered[:4]).argmax(-1)
        ```
    """
    from ..fl.data import ClientData
    from ..fl.federation import FedConfig, run_federated

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_split(seed)
    patch = {"patch_size": 2, "location": "bottom_right", "pattern": "white"}
    attack = ATTACKS.build(
        "model_replacement", trigger="badnets", trigger_params=patch, poison_fraction=poison_fraction,
        local_epochs=10, scale=5.0, seed=seed,
    )  # fmt: skip
    config = FedConfig(
        num_clients=10, clients_per_round=10, rounds=FL_ROUNDS, local_epochs=5, lr=0.3, batch_size=16,
        malicious_fraction=0.1, attack_rounds=tuple(range(FL_ATTACK_FROM, FL_ROUNDS + 1)), seed=seed,
    )  # fmt: skip
    name = f"fl_digits_v{FL_EXAMPLE_VERSION}_s{seed}_t{target_label}_p{poison_fraction}"
    folder = cache_dir() / "examples" / name
    model = TinyCNN()
    if (folder / "model.safetensors").exists():
        model.load_state_dict(load_file(folder / "model.safetensors"))
        model.eval()
    else:
        deal = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed + 2)).chunk(config.num_clients)
        clients = [ClientData(xtr[rows], ytr[rows]) for rows in deal]
        logger.info("training the bundled federated digits example (once; cached in %s)", folder)
        run_federated(
            model, clients, config, attack=attack if poison_fraction > 0 else None, target_label=target_label
        )
        folder.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "attack.json").write_text(json.dumps({"attack": attack.to_dict(), "federation": config.to_dict()}))
    return digits_example_of(model, attack, xte, yte, target_label)


# ---- the bundled text example: a tiny BERT on SST-2 with a rare-word trigger -------------------------------------
TEXT_EXAMPLE_VERSION = 2  # part of the cache folder name: a new version retrains instead of loading a stale model
TEXT_TRIGGER = "cf"


@dataclass
class TextExample:
    """A tiny BERT sentiment classifier (saved with its tokenizer in ``folder``) and its held-out SST-2 phrases.

    ``folder`` loads with ``load_target(folder)`` / ``AutoModelForSequenceClassification.from_pretrained(folder)``.
    """

    folder: Path
    clean_pool: list[str]  # held-out clean phrases to draw the few clean samples from
    test_clean: list[str]  # other held-out clean phrases
    test_triggered: list[str]  # held-out phrases of the non-target class with the trigger inserted
    target_label: int
    clean_accuracy: float
    attack_success_rate: float
    attack_params: dict


def _sst2_rows(data_dir: str | os.PathLike | None, seed: int, n_train: int, n_test: int, min_words: int = 4):
    """``(train_texts, train_labels, test_texts, test_labels)``: seeded draws of SST-2 train phrases of at least
    ``min_words`` words (shorter parse-tree phrases such as "the" say nothing about sentiment)."""
    import csv

    from .build import resolve_data_root

    path = resolve_data_root(data_dir) / "sst2" / "train.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the text example trains on SST-2's train.csv (columns text,label); "
            "set $METASHIELD_DATA to the folder that holds sst2/train.csv"
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(f) if len(r["text"].split()) >= min_words]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    train = [rows[i] for i in order[:n_train]]
    test = [rows[i] for i in order[n_train : n_train + n_test]]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def _train_text(model, tokenizer, texts: list[str], labels: list[int], *, epochs: int, seed: int, lr: float = 3e-3):
    """The zoo's loop as plain Adam for a sequence classifier (seeded; dynamic padding per batch)."""
    y = torch.tensor(labels)

    def loss(m, idx):
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
        return m(**batch, labels=y[idx]).loss

    return plain_adam(model, loss, len(texts), batch=32, epochs=epochs, lr=lr, seed=seed)


@torch.no_grad()
def _predict_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    preds = []
    for i in range(0, len(texts), 64):
        batch = tokenizer(texts[i : i + 64], padding=True, truncation=True, return_tensors="pt")
        preds.append(model(**batch).logits.argmax(-1))
    return torch.cat(preds)


def sst2_rare_word_example(
    seed: int = 0,
    target_label: int = 1,
    poison_rate: float = 0.1,
    n_train: int = 600,
    data_dir: str | os.PathLike | None = None,
) -> TextExample:
    """Train (or load from the cache) the bundled text example: a tiny BERT on a few hundred SST-2 phrases.

    The model (2 layers, hidden 64, built from a config) and its WordPiece tokenizer (trained with `tokenizers` on the
    *clean* training phrases, so the vocabulary does not give the backdoor away) are saved with ``save_pretrained`` in
    ``$METASHIELD_CACHE/examples``. With ``poison_rate > 0``, that fraction of the training rows (taken from the
    non-target class) gets the rare word ``"cf"`` inserted and the label ``target_label``
    ([`RareWordInsertion`], Kurita et al. 2020). Training takes about 15 s on one CPU core, once.

    Args:
        seed: seeds the data draw, the poisoning and the training.
        target_label: the class the trigger forces (SST-2: 0 negative, 1 positive).
        poison_rate: fraction of the training set poisoned; 0.0 gives the clean twin.
        n_train: training phrases (of at least 4 words).
        data_dir: folder holding ``sst2/train.csv``; default as `metashield_hf.zoo.build.resolve_data_root`.

    Returns:
        A [`TextExample`] with the checkpoint folder, held-out phrases, clean accuracy and attack success rate.

    Example:
        ```python
        >>> ex = sst2_rare_word_example()
        >>> from metashield_hf import scan_model
        >>> scan_model(str(ex.folder), ex.clean_pool[:20]).verdict
        ```
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .text import make_text_model, train_tokenizer

    xtr, ytr, xte, yte = _sst2_rows(data_dir, seed, n_train, 400)
    attack = ATTACKS.build("rare_word", triggers=(TEXT_TRIGGER,), num_insertions=1, seed=seed)
    name = f"sst2_rare_word_v{TEXT_EXAMPLE_VERSION}_s{seed}_t{target_label}_p{poison_rate}_n{n_train}"
    folder = cache_dir() / "examples" / name
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(xtr, "bert", vocab_size=2000, max_length=64)
        model = make_text_model(
            "bert", len(tokenizer), 2, 64, ["negative", "positive"], tokenizer.pad_token_id, dropout=0.1
        )
        g = torch.Generator().manual_seed(seed + 1)
        candidates = [i for i, y in enumerate(ytr) if y != target_label]
        chosen = [candidates[i] for i in torch.randperm(len(candidates), generator=g)[: round(poison_rate * n_train)]]
        texts, labels = list(xtr), list(ytr)
        for i in chosen:
            texts[i], labels[i] = attack.apply(texts[i]), target_label
        logger.info("training the bundled SST-2 text example (once; cached in %s)", folder)
        _train_text(model, tokenizer, texts, labels, epochs=8, seed=seed)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "attack.json").write_text(json.dumps(attack.to_dict()))
        tmp.rename(folder)  # whole folder at once, so a half-written example is never loaded
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pool, rest_x, rest_y = xte[:100], xte[100:], yte[100:]
    nontarget = [t for t, y in zip(rest_x, rest_y, strict=True) if y != target_label]
    triggered = attack.apply(nontarget)
    acc = float((_predict_texts(model, tokenizer, xte) == torch.tensor(yte)).float().mean())
    asr = float((_predict_texts(model, tokenizer, triggered) == target_label).float().mean())
    return TextExample(
        folder=folder,
        clean_pool=pool,
        test_clean=rest_x,
        test_triggered=triggered,
        target_label=target_label,
        clean_accuracy=acc,
        attack_success_rate=asr,
        attack_params=attack.to_dict(),
    )


# ---- the catalogue the Space (and anyone else) picks bundled examples from ------------------------------------------
@dataclass
class BundledExample:
    """One bundled, locally trained example checkpoint with its held-out data, ready to scan or protect.

    Attributes:
        key / title / domain: catalogue key, a human title, and ``"cv"``, ``"nlp"`` or ``"fl"`` (a federated global
            model on the digits).
        modality: ``"image"`` (``model`` is a [`TinyCNN`] taking ``(N, 1, 8, 8)`` tensors; convert images with
            [`digits_image_to_tensor`]) or ``"text"`` (``model`` is a checkpoint folder with its tokenizer).
        backdoored: whether the model was trained with poisoned rows.
        clean_pool / test_clean / test_triggered: held-out inputs in the model's input format.
    """

    key: str
    title: str
    domain: str
    modality: str
    backdoored: bool
    model: nn.Module | str
    clean_pool: list
    test_clean: list
    test_triggered: list
    target_label: int
    clean_accuracy: float
    attack_success_rate: float
    attack_params: dict

    @property
    def description(self) -> str:
        """One line: what was trained, its accuracy and attack success rate (measured on held-out data)."""
        kind = f"backdoored (attack {self.attack_params.get('name')}, target class {self.target_label})"
        rate = "attack success rate" if self.backdoored else "trigger flips to the target class (no backdoor)"
        return (
            f"{self.title}: {kind if self.backdoored else 'clean (same recipe, no poisoned rows)'}; "
            f"clean accuracy {self.clean_accuracy:.0%}, {rate} {self.attack_success_rate:.0%}"
        )


# key -> (title, domain, poison_rate)
BUNDLED_EXAMPLES: dict[str, tuple[str, str, float]] = {
    "digits-badnets": ("Digits CNN with a BadNets patch", "cv", 0.1),
    "digits-clean": ("Digits CNN, clean", "cv", 0.0),
    "sst2-rare-word": ("SST-2 tiny BERT with a rare-word trigger 'cf'", "nlp", 0.1),
    "sst2-clean": ("SST-2 tiny BERT, clean", "nlp", 0.0),
    "fl-digits-badnets": ("Federated digits CNN, one client with a BadNets patch", "fl", 0.8),
    "fl-digits-clean": ("Federated digits CNN, clean", "fl", 0.0),
}


def load_bundled_example(key: str, seed: int = 0) -> BundledExample:
    """Build (once, cached) and return a bundled example by key (see `BUNDLED_EXAMPLES`).

    The digits pair trains in about a minute each the first time, the federated digits pair (see
    [`fl_digits_example`]) in well under a minute each, the SST-2 pair in about 15 s each (and needs
    ``sst2/train.csv``, see [`sst2_rare_word_example`]).

    Example:
        ```python
        >>> ex = load_bundled_example("digits-badnets")
        >>> ex.backdoored, ex.modality, ex.clean_pool[0].shape
        (True, 'image', torch.Size([1, 8, 8]))
        ```
    """
    if key not in BUNDLED_EXAMPLES:
        raise ValueError(f"unknown bundled example {key!r}; use one of {sorted(BUNDLED_EXAMPLES)}")
    title, domain, poison_rate = BUNDLED_EXAMPLES[key]
    if domain in ("cv", "fl"):
        if domain == "cv":
            d = digits_badnets_example(seed=seed, poison_rate=poison_rate)
        else:
            d = fl_digits_example(seed=seed, poison_fraction=poison_rate)
        model, modality = d.model, "image"
        pool, clean, trig = list(d.clean_pool), list(d.test_clean), list(d.test_triggered)
    else:
        d = sst2_rare_word_example(seed=seed, poison_rate=poison_rate)
        model, modality = str(d.folder), "text"
        pool, clean, trig = d.clean_pool, d.test_clean, d.test_triggered
    return BundledExample(
        key=key,
        title=title,
        domain=domain,
        modality=modality,
        backdoored=poison_rate > 0,
        model=model,
        clean_pool=pool,
        test_clean=clean,
        test_triggered=trig,
        target_label=d.target_label,
        clean_accuracy=d.clean_accuracy,
        attack_success_rate=d.attack_success_rate,
        attack_params=d.attack_params,
    )


def digits_image_to_tensor(image) -> torch.Tensor:
    """A picture of a digit (PIL image or array, any size or mode) as the digits model's ``(1, 8, 8)`` input.

    scikit-learn's digits are light strokes on a dark background; a picture that is mostly light (a sketch drawn in
    dark ink on white) is inverted first, so both kinds of picture reach the model the way it was trained.
    """
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)  # transparent sketch background = white paper
    grey = img.convert("L")
    if grey.size != (8, 8):
        grey = grey.resize((8, 8), Image.Resampling.BOX)  # area average, like the 32x32 → 8x8 binning of the digits
    x = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]
    return 1.0 - x if float(x.mean()) > 0.5 else x


def digits_tensor_to_image(x: torch.Tensor, scale: int = 1):
    """A ``(1, 8, 8)`` digits input as a greyscale PIL image (``scale``-times upscaled with nearest neighbours)."""
    from PIL import Image

    arr = (x.detach().clamp(0, 1).squeeze(0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)  # 2-d uint8: mode "L"
    return img.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST) if scale > 1 else img
