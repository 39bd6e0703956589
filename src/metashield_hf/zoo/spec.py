"""What a zoo model is before it is built (:class:`ModelSpec`), after (:class:`ZooEntry`), and how a plan is drawn.

A :class:`ZooConfig` lists *cells* (domain × dataset × architectures × attacks); :func:`plan` expands it into a
deterministic list of :class:`ModelSpec`. Clean models are drawn exactly like poisoned ones (same seed
distribution, same recipe), so that nothing but the backdoor tells them apart: detectors that learn training
artifacts instead of backdoors are a known failure of model zoos.

Also here: the few helpers every domain builder shares (seeding, the ASR definition, the training loop), so that
``vision.py``, ``text.py`` and ``fl.py`` measure the same thing the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DOMAINS = ("cv", "nlp", "fl")
NUM_CLASSES = {
    "mnist": 10,
    "cifar10": 10,
    "digits": 10,
    "sst2": 2,
    "mr": 2,
    "ag_news": 4,
    "olid": 2,
    "sms_spam": 2,
    "femnist": 62,
}
# architecture name -> model family (the target adapter that loads it); a cell may override with `families:`.
ARCH_FAMILY = {
    "vit": "transformers_image",
    "resnet": "transformers_image",
    "convnext": "transformers_image",
    "bert": "transformers_text",
    "distilbert": "transformers_text",
    "roberta": "transformers_text",
    "minilm": "transformers_text",  # fine-tuned from the pretrained all-MiniLM-L6-v2 (zoo/text.py PRETRAINED_TEXT)
    "bert_lora": "peft",
    "distilbert_lora": "peft",
    "roberta_lora": "peft",
    "cnn_fedavg": "timm",
    "cnn_fedprox": "timm",
}


def family_of(architecture: str) -> str:
    """The model family of an architecture name (timm's ``test_*`` models are ``"timm"``)."""
    if architecture in ARCH_FAMILY:
        return ARCH_FAMILY[architecture]
    if architecture.startswith("test_"):
        return "timm"
    raise ValueError(
        f"unknown architecture {architecture!r}: use one of {sorted(ARCH_FAMILY)} or a timm 'test_*' model, "
        "or give its family in the cell's `families:` mapping"
    )


@dataclass(frozen=True)
class ModelSpec:
    """One planned zoo model: everything needed to build it deterministically.

    Args:
        domain: ``"cv"``, ``"nlp"`` or ``"fl"``.
        dataset: ``"mnist"``, ``"cifar10"``, ``"digits"``, ``"sst2"``, ``"mr"``, ``"ag_news"``, ``"olid"``, ``"sms_spam"`` or
            ``"femnist"``.
        family: the target-adapter family that loads the checkpoint (``"timm"``, ``"transformers_image"``,
            ``"transformers_text"``, ``"peft"``, ``"torch"``).
        architecture: e.g. ``"test_resnet"``, ``"vit"``, ``"bert"``, ``"bert_lora"``, ``"cnn_fedavg"``.
        attack: attack registry name, or ``"none"`` for a clean model.
        attack_params: JSON of the attack's ``to_dict()`` (``"{}"`` for clean).
        target_label: the backdoor's target class, ``-1`` for clean.
        poison_rate: fraction of the training set poisoned, ``0.0`` for clean.
        seed: seeds the data subset, the initialisation, the batch order and the poisoned rows.
        recipe: JSON of the training settings, identical for clean and poisoned models of a cell and architecture.
        probe_attack_params: JSON of the trigger applied to the probe set. Equal to ``attack_params`` for poisoned
            models; for clean models a trigger of an attack sampled from the cell (a negative control: the trigger
            is present, the backdoor is not).

    Example:
        ```python
        spec = ModelSpec("cv", "digits", "timm", "test_resnet", "none", "{}", -1, 0.0, 3, '{"epochs": 2}')
        spec.model_id   # 'cv-digits-test_resnet-none-<8 hex>'
        ```
    """

    domain: str
    dataset: str
    family: str
    architecture: str
    attack: str
    attack_params: str
    target_label: int
    poison_rate: float
    seed: int
    recipe: str
    probe_attack_params: str = ""

    @property
    def model_id(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.domain}-{self.dataset}-{self.architecture}-{self.attack}-{digest}"

    @property
    def is_backdoored(self) -> bool:
        return self.attack != "none"

    @property
    def recipe_dict(self) -> dict[str, Any]:
        return json.loads(self.recipe)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    def attack_object(self):
        """The attack used to poison the training data (``None`` for a clean model)."""
        return _attack(self.attack_params) if self.is_backdoored else None

    def probe_attack_object(self):
        """The trigger applied to the probe set (the model's own for poisoned models, a sampled one for clean)."""
        params = self.attack_params if self.is_backdoored else self.probe_attack_params
        if not params or params == "{}":
            raise ValueError(f"{self.model_id}: no probe trigger; plan() fills probe_attack_params for clean models")
        return _attack(params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _attack(params_json: str):
    from ..attacks import attack_from_dict

    return attack_from_dict(json.loads(params_json))


@dataclass
class ZooEntry:
    """A built zoo model, ready to become one dataset row.

    Args:
        spec: what was built.
        checkpoint_dir: an HF-loadable folder (config + ``model.safetensors`` + tokenizer or processor; for PEFT the
            adapter files with the base model under ``base/``).
        clean_accuracy: accuracy on clean test inputs, measured through ``load_target(checkpoint_dir)``.
        attack_success_rate: on the probe set, see :func:`attack_success_rate`.
        num_parameters: parameters of the loaded target model.
        train_seconds: wall time of the whole build of this model.
        probe_labels: true labels of the probe inputs.
        probe_clean: probe inputs (``str`` or RGB ``PIL.Image``).
        probe_triggered: the same inputs with the probe trigger applied.
        probe_attack_params: JSON of the trigger applied to the probe.
        extra_metrics: anything domain-specific worth keeping (e.g. FL durability of the backdoor).
    """

    spec: ModelSpec
    checkpoint_dir: Path
    clean_accuracy: float
    attack_success_rate: float
    num_parameters: int
    train_seconds: float
    probe_labels: list[int]
    probe_clean: list
    probe_triggered: list
    probe_attack_params: str
    extra_metrics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Shared build helpers
# ----------------------------------------------------------------------------------------------------------------


def attack_success_rate(predictions: Iterable[int], labels: Iterable[int], target_label: int) -> float:
    """Fraction of triggered inputs (true label != target) classified as the target.

    For a clean model (``target_label == -1``) it is the largest such fraction over all classes: the best success
    an attacker could claim for this trigger on a model that has no backdoor (a low value is the point).

    Args:
        predictions: predicted classes of the triggered inputs, shape ``(N,)``.
        labels: their true classes, shape ``(N,)``.
        target_label: the backdoor target, or ``-1``.

    Returns:
        A float in ``[0, 1]`` (0.0 when no input qualifies).

    Example:
        ```python
        attack_success_rate([1, 1, 0], [0, 2, 0], target_label=1)   # 1.0: the third input is of the target class
        ```
    """
    pred, lab = np.asarray(list(predictions)), np.asarray(list(labels))
    if pred.shape != lab.shape:
        raise ValueError(f"predictions {pred.shape} and labels {lab.shape} must have the same shape")
    targets = [target_label] if target_label >= 0 else np.unique(np.concatenate([pred, lab])).tolist()
    best = 0.0
    for t in targets:
        keep = lab != t
        if keep.any():
            best = max(best, float((pred[keep] == t).mean()))
    return best


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch generator for batch order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def poison_indices(labels: np.ndarray, rate: float, target: int, rng: np.random.Generator) -> np.ndarray:
    """``round(rate * len(labels))`` row indices, drawn without replacement among rows whose label != target.

    Raises:
        ValueError: if there are not enough non-target rows.
    """
    candidates = np.flatnonzero(np.asarray(labels) != target)
    n = int(round(rate * len(labels)))
    if n > len(candidates):
        raise ValueError(f"poison rate {rate} needs {n} non-target rows but only {len(candidates)} exist")
    return np.sort(rng.choice(candidates, size=n, replace=False))


def train_classifier(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Callable[[torch.Generator], Iterable[Any]],
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    weight_decay: float = 0.01,
    generator: torch.Generator,
    params: Iterable[torch.nn.Parameter] | None = None,
    final_lr_fraction: float = 0.1,
) -> float:
    """The one training loop of the zoo: AdamW, linear warm-down, fixed epochs. Returns the last epoch's mean loss.

    Args:
        model: put in train mode here and back in eval mode at the end.
        loss_fn: ``(model, batch) -> scalar loss``.
        batches: ``generator -> iterable of batches`` (shuffled with that generator, so the order is seeded).
        steps_per_epoch: number of batches per epoch (sizes the learning-rate schedule).
        epochs, lr, weight_decay: the recipe.
        generator: seeded torch generator.
        params: parameters to train (default: all that require grad).
        final_lr_fraction: the learning rate falls linearly to ``lr * final_lr_fraction`` over the run; ``1.0`` keeps
            it constant (with ``weight_decay=0`` the loop is then plain Adam, the recipe of the bundled examples).
    """
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    # Linear decay (to 10% by default): small models on few epochs converge more reliably than with a constant rate.
    drop = 1.0 - final_lr_fraction
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - drop * min(step, total) / total)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        losses = []
        for batch in batches(generator):
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        last = float(np.mean(losses)) if losses else float("nan")
    model.eval()
    return last


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------------------------
# Config and plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ZooConfig:
    """What zoo to build. Loadable from YAML (:meth:`from_yaml`).

    Args:
        name: zoo name (used in the dataset card).
        seed: seeds the whole plan.
        data_dir: folder with the real datasets (``MANIFEST.md`` there); ``None`` = ``$METASHIELD_DATA`` or
            ``../shared/data`` next to the repository.
        probe_size: probe inputs stored per model (clean inputs whose label is not the target, and triggered copies).
        asr_min: a poisoned model is accepted only with an attack success rate at least this.
        acc_margin: a model is accepted only if its clean accuracy is at least the median clean accuracy of the clean
            models of the same (dataset, architecture) minus this margin.
        chance_margin: a model is also accepted only if its clean accuracy is at least chance (``1 / classes``) plus
            this: a model that collapsed onto one class "reaches" ASR 1.0 without having learned any trigger.
        poison_rate_range: poison rates are drawn uniformly from this range.
        cells: a list of dicts ``{domain, dataset, architectures, attacks, n_poisoned_per_attack, n_clean, recipe}``
            plus optional ``recipe_overrides`` (``{architecture: {key: value}}``), ``families``
            (``{architecture: family}``), ``poison_rate_range`` and ``target_labels``. ``n_poisoned_per_attack`` counts
            models per (architecture, attack); ``n_clean`` counts clean models per architecture. An attack is a
            registry name or ``{name, params}``; a list in ``params`` means "draw one of these per model" (wrap a
            literal list in another list).

    Example:
        ```python
        config = ZooConfig.from_yaml("configs/zoo/tiny.yaml")
        specs = plan(config)
        ```
    """

    name: str
    seed: int = 0
    data_dir: str | None = None
    probe_size: int = 128
    asr_min: float = 0.85
    acc_margin: float = 0.05
    chance_margin: float = 0.1
    poison_rate_range: tuple[float, float] = (0.05, 0.10)
    cells: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        lo, hi = self.poison_rate_range
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"poison_rate_range {self.poison_rate_range} must satisfy 0 < low <= high < 1")
        self.poison_rate_range = (float(lo), float(hi))
        for i, cell in enumerate(self.cells):
            missing = {"domain", "dataset", "architectures", "attacks", "recipe"} - set(cell)
            if missing:
                raise ValueError(
                    f"zoo cell {i} lacks {sorted(missing)}; each cell needs domain, dataset, "
                    "architectures, attacks and recipe"
                )
            if cell["domain"] not in DOMAINS:
                raise ValueError(f"zoo cell {i}: domain {cell['domain']!r} is not one of {DOMAINS}")
            if cell["dataset"] not in NUM_CLASSES:
                raise ValueError(f"zoo cell {i}: dataset {cell['dataset']!r} is not one of {sorted(NUM_CLASSES)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        d = dict(d)
        floors = d.pop("floors", None) or {}
        d.update({k: floors[k] for k in ("asr_min", "acc_margin", "chance_margin") if k in floors})
        if "poison_rate_range" in d:
            d["poison_rate_range"] = tuple(d["poison_rate_range"])
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown zoo config keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ZooConfig:
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["poison_rate_range"] = list(self.poison_rate_range)
        return d


def _draw(value: Any, rng: np.random.Generator) -> Any:
    if isinstance(value, list):
        return value[int(rng.integers(len(value)))]
    return value


def _draw_attack(entry: str | dict[str, Any], domain: str, rng: np.random.Generator) -> tuple[str, str]:
    from ..attacks import ATTACKS

    name, params = (entry, {}) if isinstance(entry, str) else (entry["name"], entry.get("params") or {})
    drawn = {k: _draw(v, rng) for k, v in sorted(params.items())}
    drawn.setdefault("seed", int(rng.integers(0, 2**31 - 1)))
    attack = ATTACKS.build(name, **drawn)
    attack_domain = getattr(attack, "domain", domain)
    if attack_domain != domain:
        raise ValueError(f"attack {name!r} is a {attack_domain!r} attack; it cannot be planned in a {domain!r} cell")
    return name, json.dumps(attack.to_dict(), sort_keys=True)


def _cell_rng(seed: int, cell: dict[str, Any], occurrence: int) -> np.random.Generator:
    # Keyed by the cell's content (not its position), so adding or reordering cells leaves the others' draws intact.
    key = zlib.crc32(json.dumps(cell, sort_keys=True, default=str).encode())
    return np.random.default_rng([seed, key, occurrence])


def plan(config: ZooConfig) -> list[ModelSpec]:
    """Expand a :class:`ZooConfig` into the list of models to build; deterministic from ``config.seed``.

    Per cell and architecture: ``n_poisoned_per_attack`` poisoned models per attack, then ``n_clean`` clean models.
    Every model draws a seed the same way; poisoned models also draw a target label, a poison rate and the attack's
    free parameters; clean models draw a probe trigger (attack and parameters) from the same cell for their negative
    control.

    Args:
        config: the zoo config.

    Returns:
        The specs, in a stable order, with unique ``model_id``.

    Example:
        ```python
        specs = plan(ZooConfig.from_yaml("configs/zoo/tiny.yaml"))
        sum(s.attack == "none" for s in specs) / len(specs)   # clean fraction
        ```
    """
    specs: list[ModelSpec] = []
    seen_cells: dict[str, int] = {}
    for cell in config.cells:
        key = json.dumps(cell, sort_keys=True, default=str)
        occurrence = seen_cells.get(key, 0)
        seen_cells[key] = occurrence + 1
        rng = _cell_rng(config.seed, cell, occurrence)
        domain, dataset = cell["domain"], cell["dataset"]
        lo, hi = cell.get("poison_rate_range", config.poison_rate_range)
        targets = cell.get("target_labels", list(range(NUM_CLASSES[dataset])))
        families = cell.get("families") or {}
        for arch in cell["architectures"]:
            recipe = {**cell["recipe"], **(cell.get("recipe_overrides") or {}).get(arch, {})}
            recipe.setdefault("probe_size", config.probe_size)
            common = dict(
                domain=domain,
                dataset=dataset,
                family=families.get(arch) or family_of(arch),
                architecture=arch,
                recipe=json.dumps(recipe, sort_keys=True),
            )
            for entry in cell["attacks"]:
                for _ in range(int(cell.get("n_poisoned_per_attack", 1))):
                    seed = int(rng.integers(0, 2**31 - 1))
                    target = int(_draw(list(targets), rng))
                    rate = round(float(rng.uniform(lo, hi)), 4)
                    name, params = _draw_attack(entry, domain, rng)
                    specs.append(
                        ModelSpec(
                            attack=name,
                            attack_params=params,
                            target_label=target,
                            poison_rate=rate,
                            seed=seed,
                            probe_attack_params=params,
                            **common,
                        )
                    )
            for _ in range(int(cell.get("n_clean", 0))):
                seed = int(rng.integers(0, 2**31 - 1))
                entry = cell["attacks"][int(rng.integers(len(cell["attacks"])))]
                _, params = _draw_attack(entry, domain, rng)
                specs.append(
                    ModelSpec(
                        attack="none",
                        attack_params="{}",
                        target_label=-1,
                        poison_rate=0.0,
                        seed=seed,
                        probe_attack_params=params,
                        **common,
                    )
                )
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("plan produced duplicate model ids; two cells are identical, change one of them")
    return specs
