"""Learned query inputs and a meta-classifier of the model's answers (MNTD), trained on a zoo of models.

MNTD (Xu, Wang, Li, Borisov, Gunter and Li, "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021,
https://arxiv.org/abs/1910.03137): a fixed set of query inputs is fed to the model under test and a small classifier
reads its answers; queries and classifier are trained together ("query tuning") on shadow models, backdoored and
clean, so the queries become inputs on which backdoored models answer differently, whatever their trigger. The zoo
is the shadow set, and the probe is the proposal's meta-learning idea at model level: it learns what a backdoor does
to a model's function from many models, instead of searching one model for one trigger shape.

Two choices make one probe serve every image model:

- **Queries in units of the clean samples' range.** A query is ``Q`` values in ``[0, 1]`` at ``side x side`` with 3
  channels; it is resized (bilinear) to the model's input size, averaged over channels for 1-channel inputs, and
  mapped into the per-channel range of the clean samples in the model's own input space (the scan's synthesis space,
  [`synthesis_space`], so preprocessing and normalisation are the model's). Models with another input size, channel
  count or normalisation get the same queries in their own units.
- **Answers read without class identities.** The target class of a backdoor can be any class, and models have any
  number of classes, so the meta-classifier reads features that do not change when classes are permuted
  ([`query_features`]): the class that draws the most probability over the queries (the *attractor*), each query's
  log-probability of it, each query's own top log-probability, and the sorted top class masses.

The probe applies to image models (inputs ``C, H, W``), not to text. It is a peer method for comparison and for users
with a large zoo of their own, not a source of the default scan: trained on the scan's train zoos (152 image and FL
models, 13 attacks) it does not generalise to attacks it was not trained on (``benchmarks/scan/README.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..targets.base import TargetAdapter
from .synthesis import MAX_SYNTHESIS_SIDE, synthesis_space

__all__ = [
    "QueryProbe",
    "QueryProbeConfig",
    "QuerySpace",
    "query_features",
    "query_space",
    "train_query_probe",
]

#: The probe's file name in a folder (its weights), beside ``query_probe.json`` (its config).
WEIGHTS_NAME = "query_probe.safetensors"
CONFIG_NAME = "query_probe.json"
#: How many of the sorted class masses the meta-classifier reads.
TOP_MASSES = 3


@dataclass
class QueryProbeConfig:
    """Shape and training settings of a [`QueryProbe`].

    Attributes:
        queries: ``Q``, the number of learned query inputs.
        side: the queries' height and width before they are resized to a model's input size.
        hidden: width of the meta-classifier's hidden layer (0: a linear classifier).
        epochs / lr / weight_decay: Adam over the training models, one model per step, in a seeded order.
        tune_queries: train the queries with the classifier (MNTD's query tuning); ``False`` keeps them at their
            seeded random start and trains the classifier alone (MNTD's ablation).
        seed: seeds the queries' start and the order.
    """

    queries: int = 16
    side: int = 16
    hidden: int = 0
    epochs: int = 25
    lr: float = 0.02
    weight_decay: float = 1e-3
    tune_queries: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("queries", "side", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QueryProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"QueryProbeConfig needs hidden >= 0, lr > 0, weight_decay >= 0; got {self.hidden}, {self.lr}, "
                f"{self.weight_decay}"
            )


def num_features(queries: int) -> int:
    """Length of [`query_features`]'s vector for ``queries`` queries."""
    return 2 * queries + TOP_MASSES + 1


def query_features(logits: torch.Tensor) -> torch.Tensor:
    """Permutation-invariant features of a model's answers ``(Q, K)`` on the queries (differentiable).

    With ``p = softmax(logits)`` and the attractor ``a = argmax_c mean_q p[q, c]``:
    ``[log p[q, a] for q] + [log max_c p[q, c] for q] + top TOP_MASSES of sorted mean_q p[q, :] + [mean entropy / log K]``.
    Fewer than ``TOP_MASSES`` classes are padded with zeros.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"query_features needs (Q, K >= 2) logits, got {tuple(logits.shape)}")
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    mass = p.mean(0)
    attractor = int(mass.argmax())
    top = mass.sort(descending=True).values[:TOP_MASSES]
    if len(top) < TOP_MASSES:
        top = torch.cat([top, top.new_zeros(TOP_MASSES - len(top))])
    entropy = -(p * logp).sum(1).mean() / np.log(logits.shape[1])
    return torch.cat([logp[:, attractor], logp.amax(1), top, entropy[None]])


@dataclass
class QuerySpace:
    """A model's input space for the queries: ``run(u)`` maps queries ``u`` ``(Q, 3, side, side)`` in ``[0, 1]`` to
    the model's logits ``(Q, K)`` (differentiable in ``u``); ``shape`` is the model's ``(C, H, W)`` they are
    resized to."""

    run: Callable[[torch.Tensor], torch.Tensor]
    shape: tuple[int, ...]


def query_space(adapter: TargetAdapter, items: list) -> QuerySpace | None:
    """The space in which [`QueryProbe`] queries ``adapter``'s model; ``None`` where its inputs are not images.

    Args:
        adapter: the target (its synthesis space must be ``"pixels"``: ``(C, H, W)`` float inputs).
        items: clean items; their per-channel range in the model's input space bounds the queries.
    """
    if not items:
        raise ValueError("query_space needs at least one clean item (its range bounds the queries)")
    with torch.no_grad():  # a torch model's head is found on its first batch
        adapter(items[:1])
    bounds = synthesis_space(adapter, items)
    if bounds.kind != "pixels":
        return None
    space = synthesis_space(adapter, items[:1])
    if space.downsized is not None:  # large images: queried at the synthesis's own size, as the other sources
        space = space.downsized(MAX_SYNTHESIS_SIDE) or space
    low, high = bounds.low.float(), bounds.high.float()
    span = high - low
    shape = tuple(space.pattern_shape[1:])
    channels, size = shape[0], shape[1:]

    def run(u: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
        if channels != x.shape[1]:
            x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels != 1 else x.mean(1, keepdim=True)
        ones = torch.ones((len(u), *space.mask_shape[1:]), device=space.device)
        logits, _ = space.run(ones, (low + span * x).to(space.device), len(u))
        return logits.float().cpu()

    return QuerySpace(run, shape)


class QueryProbe(nn.Module):
    """``Q`` learned query inputs and a meta-classifier of a model's answers on them (see the module docstring).

    ``probe.score(space)`` is the meta-classifier's logit: large = the model answers the queries as the training
    zoo's backdoored models did. Saved as safetensors (``save`` / ``load``), a few tens of kilobytes.
    """

    def __init__(self, config: QueryProbeConfig | None = None) -> None:
        super().__init__()
        self.config = config or QueryProbeConfig()
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        # the queries as logits of [0, 1] values; the start is random (standard normal logits), as MNTD's
        self.query_logits = nn.Parameter(
            torch.randn((c.queries, 3, c.side, c.side), generator=gen), requires_grad=c.tune_queries
        )
        n = num_features(c.queries)
        self.norm = nn.LayerNorm(n, elementwise_affine=False)
        # the classifier's start is seeded too, without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            if c.hidden:
                self.classifier = nn.Sequential(nn.Linear(n, c.hidden), nn.ReLU(), nn.Linear(c.hidden, 1))
            else:
                self.classifier = nn.Sequential(nn.Linear(n, 1))

    def queries(self) -> torch.Tensor:
        """The queries ``(Q, 3, side, side)`` in ``[0, 1]``."""
        return torch.sigmoid(self.query_logits)

    def forward(self, space: QuerySpace) -> torch.Tensor:
        """The meta-classifier's logit (a 0-dim tensor, differentiable in the probe's parameters)."""
        return self.classifier(self.norm(query_features(space.run(self.queries()))))[0]

    @torch.no_grad()
    def score(self, space: QuerySpace) -> float:
        """The meta-classifier's logit for one model, as a float."""
        return float(self(space))

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``query_probe.safetensors`` and ``query_probe.json`` to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> QueryProbe:
        """Read a probe that [`save`] wrote (safetensors only)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
        probe = cls(QueryProbeConfig(**json.loads((folder / CONFIG_NAME).read_text())))
        probe.load_state_dict(load_file(folder / WEIGHTS_NAME))
        return probe.eval()


@dataclass
class TrainLog:
    """Per-epoch mean training loss of [`train_query_probe`]."""

    losses: list[float] = field(default_factory=list)


def train_query_probe(
    spaces: list[QuerySpace],
    labels: list[int],
    config: QueryProbeConfig | None = None,
    *,
    log: TrainLog | None = None,
) -> QueryProbe:
    """Train queries and meta-classifier together on models with known labels (1 = backdoored).

    Each step feeds the queries to one model (the models are frozen: only the probe's parameters get gradients) and
    takes the binary cross-entropy of the meta-classifier's logit, with the classes weighted to equal total weight.

    Args:
        spaces: [`query_space`] of each training model.
        labels: 1 for backdoored, 0 for clean; both must occur.
        config: the probe's settings.
        log: filled with the per-epoch mean loss.
    """
    if len(spaces) != len(labels) or not spaces:
        raise ValueError(
            f"train_query_probe needs as many labels as models (>= 1), got {len(labels)} and {len(spaces)}"
        )
    y = np.asarray(labels, dtype=np.float64)
    if set(np.unique(y)) != {0.0, 1.0}:
        raise ValueError("train_query_probe needs both backdoored (1) and clean (0) models")
    probe = QueryProbe(config)
    c = probe.config
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    rng = np.random.default_rng(c.seed)
    for _ in range(c.epochs):
        total = 0.0
        for i in rng.permutation(len(spaces)):
            with torch.enable_grad():
                logit = probe(spaces[i])
                loss = float(weight[i]) * F.binary_cross_entropy_with_logits(logit, torch.tensor(float(y[i])))
                # autograd.grad into the probe's parameters only (each step overwrites their .grad): the models' own
                # parameters must not accumulate .grad
                for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                    p.grad = g
            opt.step()
            total += float(loss.detach())
        if log is not None:
            log.losses.append(total / len(spaces))
    return probe.eval()
