"""The bundled example: a tiny CNN trained on scikit-learn's digits with a BadNets patch backdoor.

It is what ``metashield detect`` runs on a fresh machine with no network: the package trains it once (seconds) and
caches it (``$METASHIELD_CACHE``, default ``~/.cache/metashield``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .attacks import ATTACKS

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


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.6 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64
) -> nn.Module:
    """Plain Adam training loop (seeded); the same recipe for clean and poisoned models."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


def digits_badnets_example(seed: int = 0, target_label: int = 0, poison_rate: float = 0.1) -> DigitsExample:
    """Train (or load from the cache) the bundled backdoored digits model.

    Args:
        seed: seeds the split, the poisoning and the training.
        target_label: the class the trigger forces.
        poison_rate: fraction of the training set poisoned (taken from non-target rows).
    """
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = _digits(seed)
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
        train_classifier(model, xp, yp, epochs=40, seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), folder / "model.safetensors")
        (folder / "attack.json").write_text(json.dumps(attack.to_dict()))
    n_pool = 100
    pool, rest_x, rest_y = xte[:n_pool], xte[n_pool:], yte[n_pool:]
    nontarget = rest_x[rest_y != target_label]
    triggered = attack.apply(nontarget)
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
