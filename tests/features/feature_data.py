"""Seeded activation sets for the ψ tests (a plain module, imported by name).

A ReLU "penultimate layer" with a linear head, as in a real model: ``logits = pen @ W.T + b`` exactly.
"""

from __future__ import annotations

import torch


def make_head(d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(c, d, generator=g) / d**0.5, 0.1 * torch.randn(c, generator=g)


def make_activations(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, d, generator=g) + 0.5)


def make_model_outputs(n: int, d: int, c: int, seed: int = 0):
    """``(pen (n, d), logits (n, c), W (c, d), b (c,))`` of a random ReLU layer and head."""
    w, b = make_head(d, c, seed)
    pen = make_activations(n, d, seed)
    return pen, pen @ w.T + b, w, b
