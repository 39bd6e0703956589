"""Federated-learning zoo entries: a global model trained by FedAvg/FedProx, with or without malicious clients.

Settings (``spec.architecture``): ``"cnn_fedavg"`` and ``"cnn_fedprox"`` — the same tiny timm CNN
(``test_efficientnet_gn`` by default: GroupNorm, because BatchNorm statistics do not average well across non-IID
clients, Hsieh et al. 2020, https://arxiv.org/abs/1910.00189), trained with FedAvg or FedProx.
Data (``spec.dataset``): ``"mnist"`` (Dirichlet(α) label-skewed split), ``"femnist"`` (LEAF; each writer is a
client; 62 classes; dark ink on white) and ``"digits"`` (sklearn, for tiny tests).

Images are handled as in ``zoo/vision.py``: RGB ``uint8`` (grey replicated), normalized with mean = std = 0.5, saved
with ``timm.models.save_for_hf`` and a ``pretrained_cfg`` holding that preprocessing, so ``load_target(folder)``
scores the stored probe exactly as the model was trained. ``spec.poison_rate`` is the fraction of malicious clients.

The saved global model is the one after ``rounds`` (the last attack round by default); ``durability_rounds``
attack-free rounds are then run to measure how long the backdoor lasts (``extra_metrics["asr_durability"]``).
"""

from __future__ import annotations

import functools
import json
import logging
import string
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..attacks.federated import FederatedAttack
from ..fl.data import ClientData, dirichlet_partition, natural_partition
from ..fl.federation import FedConfig, run_federated
from .spec import ModelSpec, ZooEntry, attack_success_rate, seed_everything
from .vision import LABEL_NAMES, MEAN, STD, load_cv_arrays, make_cv_model, save_cv_model

logger = logging.getLogger(__name__)

FL_ARCHITECTURES = {"cnn_fedavg": "fedavg", "cnn_fedprox": "fedprox"}
FEMNIST_LABELS = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
# Per-dataset defaults; a spec's recipe overrides any key. Sized so one model builds in well under a minute on one
# core (the FL loop itself: rounds x clients_per_round x local_epochs x ~client size samples of SGD).
DEFAULT_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {"train_size": None, "test_size": 400, "num_clients": 10, "clients_per_round": 5, "rounds": 8,
               "local_epochs": 2, "lr": 0.05, "batch_size": 16, "dirichlet_alpha": 0.5, "partition": "dirichlet",
               "attack_rounds": None, "durability_rounds": 2},
    "mnist": {"train_size": 6000, "test_size": 2000, "num_clients": 20, "clients_per_round": 5, "rounds": 12,
              "local_epochs": 2, "lr": 0.05, "batch_size": 32, "dirichlet_alpha": 0.5, "partition": "dirichlet",
              "attack_rounds": None, "durability_rounds": 5},
    "femnist": {"train_size": None, "test_size": None, "num_clients": None, "clients_per_round": 10, "rounds": 15,
                "local_epochs": 2, "lr": 0.05, "batch_size": 32, "dirichlet_alpha": 0.5, "partition": "natural",
                "attack_rounds": None, "durability_rounds": 5},
}  # fmt: skip
_COMMON = {"mu": 0.01, "server_lr": 1.0, "probe_size": 128, "timm_model": "test_efficientnet_gn"}


def fl_recipe(dataset: str, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The effective recipe: defaults of ``dataset`` overridden by ``recipe``."""
    if dataset not in DEFAULT_RECIPES:
        raise ValueError(f"unknown FL dataset {dataset!r}; use one of {sorted(DEFAULT_RECIPES)}")
    out = {**_COMMON, **DEFAULT_RECIPES[dataset], **(recipe or {})}
    unknown = sorted(set(out) - set(_COMMON) - set(DEFAULT_RECIPES[dataset]))
    if unknown:
        raise ValueError(f"unknown FL recipe keys {unknown}; valid: {sorted({**_COMMON, **DEFAULT_RECIPES[dataset]})}")
    return out


@functools.lru_cache(maxsize=2)
def load_fl_arrays(dataset: str, data_root: str) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, groups_train, x_test, y_test)``: RGB ``uint8`` ``(N, H, W, 3)``, ``int64`` labels, and
    the natural client of each training sample (FEMNIST writer; ``None`` for MNIST and digits). Cached per process.
    """
    if dataset in ("mnist", "digits"):
        x_tr, y_tr, x_te, y_te = load_cv_arrays(dataset, data_root, None)
        return x_tr, y_tr, None, x_te, y_te
    if dataset != "femnist":
        raise ValueError(f"unknown FL dataset {dataset!r}; use 'mnist', 'femnist' or 'digits'")
    import datasets

    files = {s: str(Path(data_root) / "femnist" / f"{s}.parquet") for s in ("train", "test")}
    missing = [f for f in files.values() if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"{missing} not found; set data_dir in the zoo config or $METASHIELD_DATA")
    out: list[Any] = []
    for split in ("train", "test"):
        ds = datasets.load_dataset("parquet", data_files={split: files[split]}, split=split)
        # Grey, dark ink on white (255): kept as is, only replicated to RGB like every other zoo image.
        x = np.stack([np.asarray(img.convert("L")) for img in ds["image"]])
        x = np.repeat(x[..., None], 3, axis=-1)
        out += [x, np.asarray(ds["label"], dtype=np.int64)]
        if split == "train":
            out.append(np.asarray(ds["writer"]))
    return tuple(out)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in ``[0, 1]`` (triggers are applied in this space)."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # The saved pretrained_cfg's Normalize(MEAN, STD): training and load_target see the same numbers.
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def _predict(model: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    model.load_state_dict(state)
    model.eval()
    return torch.cat([model(_normalize(x[i : i + 512])).argmax(-1) for i in range(0, len(x), 512)]).numpy()


def _clients(spec: ModelSpec, r: dict[str, Any], rng: np.random.Generator) -> tuple[list[ClientData], str]:
    x_all, y_all, groups, _, _ = load_fl_arrays(spec.dataset, r["_data_root"])
    n = len(y_all) if r["train_size"] is None else min(int(r["train_size"]), len(y_all))
    idx = np.sort(rng.choice(len(y_all), size=n, replace=False))
    x, y = _tensor(x_all[idx]), torch.from_numpy(y_all[idx])
    if r["partition"] == "natural":
        if groups is None:
            raise ValueError(f"dataset {spec.dataset!r} has no natural clients; use partition 'dirichlet'")
        parts = natural_partition(groups[idx])
    else:
        parts = dirichlet_partition(y.numpy(), int(r["num_clients"]), float(r["dirichlet_alpha"]), seed=spec.seed)
    return [ClientData(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts], r["partition"]


def build_fl_entry(spec: ModelSpec, data_root: Path, workdir: Path) -> ZooEntry:
    """Train one federated global model (clean or attacked), save it, and measure it.

    Recipe keys (``spec.recipe``, see ``DEFAULT_RECIPES``): ``train_size`` (``None``: all), ``test_size``,
    ``probe_size``, ``num_clients`` (Dirichlet split; a natural split has one client per writer),
    ``clients_per_round``, ``rounds``, ``local_epochs``, ``lr``, ``batch_size``, ``mu`` (FedProx), ``server_lr``,
    ``partition``, ``dirichlet_alpha``, ``attack_rounds`` (``None``: the last half of ``rounds``),
    ``durability_rounds``, ``timm_model``.

    Args:
        spec: the planned model (``domain == "fl"``; ``attack`` an ``fl`` attack or ``"none"``; ``poison_rate`` is
            the fraction of malicious clients).
        data_root: the shared data folder.
        workdir: the checkpoint is written to ``workdir / spec.model_id``.

    Returns:
        The entry. ``clean_accuracy`` and ``attack_success_rate`` are measured through ``load_target`` on the saved
        folder; ``extra_metrics`` holds the ASR right after the last malicious round and ``durability_rounds``
        later, the clients and rounds of the attack, and the FL seconds.

    Example:
        ```python
        spec = ModelSpec("fl", "digits", "timm", "cnn_fedavg", "dba", json.dumps(DBA(seed=0).to_dict()), 3, 0.2, 0,
                         "{}")
        entry = build_fl_entry(spec, Path("../shared/data"), Path("/tmp/zoo"))
        entry.attack_success_rate, entry.extra_metrics["asr_durability"]
        ```
    """
    from ..targets import load_target

    start = time.perf_counter()
    if spec.domain != "fl":
        raise ValueError(f"build_fl_entry builds domain 'fl' models, got {spec.domain!r} ({spec.model_id})")
    if spec.architecture not in FL_ARCHITECTURES:
        raise ValueError(f"unknown FL architecture {spec.architecture!r}; use one of {sorted(FL_ARCHITECTURES)}")
    r = fl_recipe(spec.dataset, spec.recipe_dict)
    r["_data_root"] = str(data_root)
    attack = spec.attack_object()
    if attack is not None and not isinstance(attack, FederatedAttack):
        raise ValueError(f"{spec.model_id}: attack {spec.attack!r} is not an 'fl' attack (domain {attack.domain!r})")
    rng = np.random.default_rng(spec.seed)
    seed_everything(spec.seed)
    clients, partition = _clients(spec, r, rng)
    config = FedConfig(
        num_clients=len(clients), clients_per_round=min(int(r["clients_per_round"]), len(clients)),
        rounds=int(r["rounds"]), local_epochs=int(r["local_epochs"]), lr=float(r["lr"]),
        batch_size=int(r["batch_size"]), algorithm=FL_ARCHITECTURES[spec.architecture], mu=float(r["mu"]),
        server_lr=float(r["server_lr"]), partition=partition, dirichlet_alpha=float(r["dirichlet_alpha"]),
        malicious_fraction=float(spec.poison_rate) if attack is not None else 0.0,
        attack_rounds=r["attack_rounds"], durability_rounds=int(r["durability_rounds"]), seed=spec.seed,
    )  # fmt: skip
    _, _, _, x_te, y_te = load_fl_arrays(spec.dataset, str(data_root))
    names = FEMNIST_LABELS if spec.dataset == "femnist" else LABEL_NAMES[spec.dataset]
    torch.manual_seed(spec.seed)
    model = make_cv_model(r["timm_model"], spec.num_classes, x_te.shape[1], names)
    result = run_federated(
        model, clients, config, attack=attack, target_label=max(spec.target_label, 0), preprocess=_normalize
    )
    folder = Path(workdir) / spec.model_id
    model.load_state_dict(result.state)
    save_cv_model(model, folder, x_te.shape[1], names)

    # Clean accuracy on a fixed test subset, and the probe, both through the saved folder as a zoo user sees them.
    adapter = load_target(folder, batch_size=256)
    test_size = len(y_te) if r["test_size"] is None else min(int(r["test_size"]), len(y_te))
    test_idx = np.random.default_rng(0).permutation(len(y_te))[:test_size]
    preds = adapter([Image.fromarray(a) for a in x_te[test_idx]]).logits.argmax(-1).numpy()
    clean_acc = float((preds == y_te[test_idx]).mean())
    probe_attack = spec.probe_attack_object()
    pool = np.flatnonzero(y_te != spec.target_label)
    probe = np.sort(rng.choice(pool, size=min(int(r["probe_size"]), len(pool)), replace=False))
    probe_clean = [Image.fromarray(a) for a in x_te[probe]]
    probe_triggered = [img.convert("RGB") for img in probe_attack.apply(probe_clean)]
    asr = attack_success_rate(adapter(probe_triggered).logits.argmax(-1).numpy(), y_te[probe], spec.target_label)

    # Durability: the same probe scored in memory on the snapshots (same arithmetic as the saved preprocessing).
    x_trig = _tensor(np.stack([np.asarray(img) for img in probe_triggered]))
    x_test = _tensor(x_te[test_idx])
    last_attack = max(result.attack_rounds) if result.attack_rounds else config.rounds
    final_round = config.rounds + config.durability_rounds

    def measure(rnd: int) -> tuple[float, float]:
        state = result.snapshots[rnd]
        trig_asr = attack_success_rate(_predict(model, state, x_trig), y_te[probe], spec.target_label)
        return trig_asr, float((_predict(model, state, x_test) == y_te[test_idx]).mean())

    asr_after, acc_after = measure(last_attack)
    asr_final, acc_final = measure(final_round)
    asr_saved, _ = measure(config.rounds)
    if abs(asr_saved - asr) > 1e-9:
        logger.warning("%s: in-memory ASR %.4f != load_target ASR %.4f", spec.model_id, asr_saved, asr)
    extra = {
        "asr_after_attack": asr_after, "clean_accuracy_after_attack": acc_after, "last_attack_round": last_attack,
        "asr_durability": asr_final, "clean_accuracy_durability": acc_final,
        "durability_rounds": config.durability_rounds, "attack_rounds": list(result.attack_rounds),
        "malicious_clients": list(result.malicious_clients), "num_clients": config.num_clients,
        "fl_config": config.to_dict(), "timm_model": r["timm_model"], "fl_seconds": result.seconds,
    }  # fmt: skip
    logger.info(
        "%s: acc %.3f, ASR %.3f (after %d benign rounds: %.3f), %.1f s",
        spec.model_id, clean_acc, asr, config.durability_rounds, asr_final, time.perf_counter() - start,
    )  # fmt: skip
    return ZooEntry(
        spec=spec, checkpoint_dir=folder, clean_accuracy=clean_acc, attack_success_rate=asr,
        num_parameters=sum(p.numel() for p in adapter.model.parameters()),
        train_seconds=time.perf_counter() - start, probe_labels=y_te[probe].tolist(), probe_clean=probe_clean,
        probe_triggered=probe_triggered, probe_attack_params=json.dumps(probe_attack.to_dict(), sort_keys=True),
        extra_metrics=extra,
    )  # fmt: skip
