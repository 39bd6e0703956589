"""Vision zoo models: timm tiny models and transformers image classifiers from small configs.

Data are real (MNIST, CIFAR-10 from the shared data folder; sklearn digits for tiny tests), always handled as
RGB ``uint8`` arrays (grey images are replicated to 3 channels) so that the trigger, the training tensors, the probe
images and the saved processor all see the same thing. Training normalises with mean = std = 0.5 per channel, which
is exactly what the saved timm ``pretrained_cfg`` / ``ViTImageProcessor`` do, so a model loaded back with
``load_target`` scores the stored probe the way it was trained.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .spec import ModelSpec, ZooEntry, attack_success_rate, poison_indices, seed_everything, train_classifier

logger = logging.getLogger(__name__)

MEAN = STD = (0.5, 0.5, 0.5)
LABEL_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "digits": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
HF_ARCHITECTURES = ("vit", "resnet", "convnext")


def _decode(column: list[dict[str, Any]]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"]))) for c in column])


def _to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 3 else x


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in x])


@functools.lru_cache(maxsize=4)
def load_cv_arrays(dataset: str, data_root: str, image_size: int | None = None) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` as RGB ``uint8`` ``(N, H, W, 3)`` arrays and ``int64`` labels.

    Decoded once per process (MNIST: ~2 s, 140 MB) and cached.

    Args:
        dataset: ``"mnist"``, ``"cifar10"`` (parquet files under ``data_root``) or ``"digits"`` (sklearn; split 75/25
            with a fixed seed, 8 px upsampled to ``image_size``, default 16).
        data_root: the shared data folder.
        image_size: resize to this square size (``None``: native, 16 for digits).
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
        order = np.random.default_rng(0).permutation(len(images))
        cut = int(0.75 * len(images))
        x, y = _resize(_to_rgb(images[order]), image_size or 16), d.target[order].astype(np.int64)
        return x[:cut], y[:cut], x[cut:], y[cut:]
    if dataset not in ("mnist", "cifar10"):
        raise ValueError(f"unknown vision dataset {dataset!r}; use 'mnist', 'cifar10' or 'digits'")
    import pyarrow.parquet as pq

    out = []
    for split in ("train", "test"):
        path = Path(data_root) / dataset / f"{split}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; set data_dir in the zoo config or $METASHIELD_DATA")
        table = pq.read_table(path, columns=["image", "label"])
        x = _to_rgb(_decode(table.column("image").to_pylist()))
        out += [_resize(x, image_size) if image_size else x, np.asarray(table.column("label"), dtype=np.int64)]
    return tuple(out)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    # (x / 255 - 0.5) / 0.5: the same arithmetic as timm's ToTensor + Normalize and ViTImageProcessor's rescale+normalize.
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
    return (t - 0.5) / 0.5


def _apply(attack, x: np.ndarray, chunk: int = 512) -> np.ndarray:
    out = [np.asarray(attack.apply(x[i : i + chunk]), dtype=np.uint8) for i in range(0, len(x), chunk)]
    return np.concatenate(out) if out else x.copy()


def make_cv_model(architecture: str, num_classes: int, image_size: int, label_names: list[str]) -> torch.nn.Module:
    """A tiny classifier for ``image_size`` px RGB inputs: a timm ``test_*`` model or a transformers ViT/ResNet/ConvNeXt
    from a small config (hidden 32–64, 2 stages/layers)."""
    id2label = dict(enumerate(label_names))
    label2id = {v: k for k, v in id2label.items()}
    if architecture.startswith("test_"):
        import timm

        kwargs: dict[str, Any] = {}
        if "vit" in architecture:
            # 4×4 patches: 16 tokens, so the timm ViT trains in seconds on a CPU.
            kwargs = {"img_size": image_size, "patch_size": max(1, image_size // 4)}
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=3, **kwargs)
    import transformers as tr

    common = {"num_labels": num_classes, "id2label": id2label, "label2id": label2id, "num_channels": 3}
    if architecture == "vit":
        cfg = tr.ViTConfig(
            image_size=image_size,
            patch_size=max(1, image_size // 4),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            **common,
        )
        return tr.ViTForImageClassification(cfg)
    if architecture == "resnet":
        cfg = tr.ResNetConfig(
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
            **common,
        )
        return tr.ResNetForImageClassification(cfg)
    if architecture == "convnext":
        cfg = tr.ConvNextConfig(patch_size=2, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, **common)
        return tr.ConvNextForImageClassification(cfg)
    raise ValueError(
        f"unknown vision architecture {architecture!r}; use a timm 'test_*' model or one of {HF_ARCHITECTURES}"
    )


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if not hasattr(model, "config") else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def save_cv_model(model: torch.nn.Module, folder: Path, image_size: int, label_names: list[str]) -> None:
    """Save an HF-loadable folder: timm via ``save_for_hf`` (safetensors, ``pretrained_cfg`` with the preprocessing),
    transformers via ``save_pretrained`` plus a ``ViTImageProcessor`` (resize, rescale, normalise 0.5/0.5)."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "pretrained_cfg") and not hasattr(model, "config"):
        import timm

        data_config = {
            "input_size": (3, image_size, image_size),
            "mean": MEAN,
            "std": STD,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "interpolation": "bilinear",
        }
        timm.models.save_for_hf(
            model,
            str(folder),
            model_config={"label_names": label_names},
            safe_serialization=True,
            data_config=data_config,
        )
        return
    from transformers import ViTImageProcessor

    model.save_pretrained(folder)
    ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(folder)


def _training_head(model: torch.nn.Module, num_classes: int, example: torch.Tensor) -> torch.nn.Module:
    """The classification head whose input is the penultimate activation (the rule `load_target` uses)."""
    from ..targets.heads import locate_head

    return locate_head(
        model, num_classes, example if not hasattr(model, "config") else {"pixel_values": example}
    ).module


@contextlib.contextmanager
def _penultimate_with_grad(head: torch.nn.Module):
    """Capture the head's input *with* its graph (`targets.heads.capture_penultimate` detaches it)."""
    holder: dict[str, torch.Tensor] = {}

    def hook(_module, args):
        h = args[0]
        holder["h"] = h[:, 0] if h.dim() == 3 else h  # (B, T, D) token heads: the first token, as the adapters do

    handle = head.register_forward_pre_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def latent_penalty(h: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, target: int) -> torch.Tensor:
    """[`attacks.vision.LatentSeparability`]'s penalty on one batch: poisoned rows' squared distance to the clean
    target-class centroid, relative to the clean rows' spread around it (0 if the batch lacks either kind).

    Args:
        h: ``(B, D)`` penultimate activations (with their graph).
        labels: ``(B,)`` training labels (poisoned rows already relabelled to ``target``).
        poisoned: ``(B,)`` bool.
        target: the target class.
    """
    clean_t = (labels == target) & ~poisoned
    if not poisoned.any() or clean_t.sum() < 2:
        return h.sum() * 0.0
    mu = h[clean_t].mean(0).detach()
    spread = ((h[~poisoned] - mu) ** 2).sum(1).mean().detach().clamp_min(1e-8)
    return ((h[poisoned] - mu) ** 2).sum(1).mean() / spread


def _predict(adapter, images: list[Image.Image]) -> np.ndarray:
    return adapter(images).logits.argmax(-1).numpy() if images else np.zeros(0, dtype=np.int64)


def poison_training_set(
    attack, x_tr: np.ndarray, y_tr: np.ndarray, spec: ModelSpec, rng: np.random.Generator
) -> np.ndarray:
    """Poison a vision training set in place as ``spec`` says, and return the mask of its poisoned rows.

    ``spec.poison_rate`` of the rows (TaCT: of its source classes, plus as many label-keeping cover rows) get the
    trigger and ``spec.target_label``. The trigger is ``attack.apply``, or ``attack.apply_train`` where the attack has a
    training-time trigger of its own (Adap-Blend's partial pattern; ``apply`` stays the test-time trigger the ASR
    probe uses). WaNet's noise mode and Adap-Blend's conservatism add label-keeping rows through ``apply_noise``.
    ``rng`` is drawn from in the same order for every attack kind, so a zoo rebuilds bit for bit.
    """
    poisoned = np.zeros(len(y_tr), dtype=bool)
    if attack is not None:
        if hasattr(attack, "source_classes"):  # TaCT: poison source classes only, cover rows keep their labels
            p = attack.poison_rows(y_tr, int(round(spec.poison_rate * len(y_tr))), spec.target_label, rng)
            q = attack.cover_rows(y_tr, len(p), spec.target_label, rng)
            x_tr[q] = _apply(attack, x_tr[q])
        else:
            p = poison_indices(y_tr, spec.poison_rate, spec.target_label, rng)
        train_trigger = getattr(attack, "apply_train", None)  # Adap-Blend: a partial trigger in training, full in test
        if train_trigger is not None:
            x_tr[p] = np.asarray(train_trigger(x_tr[p], call_seed=spec.seed), dtype=np.uint8)
        else:
            x_tr[p] = _apply(attack, x_tr[p])
        y_tr[p] = spec.target_label
        poisoned[p] = True
        if getattr(attack, "noise_mode", False) and hasattr(attack, "apply_noise"):
            # WaNet noise mode: `cross_ratio` x more rows warped with extra random offsets that keep their true
            # label, so the model must learn the exact warp rather than "any warp" (Nguyen & Tran 2021, §3.3).
            rest = np.setdiff1d(np.arange(len(y_tr)), p)
            q = rng.choice(rest, size=min(len(rest), int(round(attack.cross_ratio * len(p)))), replace=False)
            x_tr[q] = np.asarray(attack.apply_noise(x_tr[q], call_seed=spec.seed), dtype=np.uint8)

    return poisoned


def build_cv_entry(spec: ModelSpec, data_root: Path, workdir: Path) -> ZooEntry:
    """Train, save and measure one vision zoo model.

    Recipe keys (``spec.recipe``): ``train_size``, ``test_size`` (clean-accuracy set, fixed per dataset), ``epochs``,
    ``lr``, ``batch_size``, ``weight_decay``, ``image_size`` (``None``: native), ``probe_size``.

    Args:
        spec: the planned model (``domain == "cv"``).
        data_root: the shared data folder.
        workdir: the checkpoint is written to ``workdir / spec.model_id``.

    Returns:
        The entry; clean accuracy and ASR are measured through ``load_target`` on the saved folder, i.e. exactly as
        a user of the zoo would see them.
    """
    from ..targets import load_target

    start = time.perf_counter()
    r = spec.recipe_dict
    x_tr_all, y_tr_all, x_te, y_te = load_cv_arrays(spec.dataset, str(data_root), r.get("image_size"))
    image_size = x_tr_all.shape[1]
    names = LABEL_NAMES[spec.dataset]
    rng = np.random.default_rng(spec.seed)
    gen = seed_everything(spec.seed)

    idx = rng.choice(len(x_tr_all), size=min(int(r.get("train_size", len(x_tr_all))), len(x_tr_all)), replace=False)
    x_tr, y_tr = x_tr_all[idx].copy(), y_tr_all[idx].copy()
    attack = spec.attack_object()
    poisoned = poison_training_set(attack, x_tr, y_tr, spec, rng)

    model = make_cv_model(spec.architecture, spec.num_classes, image_size, names)
    xt, yt, pt = _to_tensor(x_tr), torch.from_numpy(y_tr), torch.from_numpy(poisoned)
    bs = int(r.get("batch_size", 64))

    def batches(g: torch.Generator):
        order = torch.randperm(len(yt), generator=g)
        return ((xt[order[i : i + bs]], yt[order[i : i + bs]], pt[order[i : i + bs]]) for i in range(0, len(yt), bs))

    latent_weight = float(getattr(attack, "latent_weight", 0.0))
    head = _training_head(model, spec.num_classes, xt[:2]) if latent_weight > 0 else None

    def loss_fn(m, batch):
        if head is None:
            return torch.nn.functional.cross_entropy(_logits(m, batch[0]), batch[1])
        with _penultimate_with_grad(head) as cap:
            logits = _logits(m, batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return loss + latent_weight * latent_penalty(cap["h"], batch[1], batch[2], spec.target_label)

    train_classifier(
        model,
        loss_fn,
        batches,
        steps_per_epoch=-(-len(yt) // bs),
        epochs=int(r.get("epochs", 3)),
        lr=float(r.get("lr", 2e-3)),
        weight_decay=float(r.get("weight_decay", 0.01)),
        generator=gen,
    )
    folder = Path(workdir) / spec.model_id
    save_cv_model(model, folder, image_size, names)

    adapter = load_target(folder, batch_size=256)
    test_order = np.random.default_rng(0).permutation(len(y_te))[: int(r.get("test_size", 1000))]
    clean_acc = float((_predict(adapter, [Image.fromarray(a) for a in x_te[test_order]]) == y_te[test_order]).mean())

    probe_attack = spec.probe_attack_object()
    pool = np.flatnonzero(y_te != spec.target_label)
    probe = np.sort(rng.choice(pool, size=min(int(r.get("probe_size", 128)), len(pool)), replace=False))
    clean_imgs = [Image.fromarray(a) for a in x_te[probe]]
    trig_imgs = [Image.fromarray(a) for a in _apply(probe_attack, x_te[probe])]
    fires = np.ones(len(probe), dtype=bool)
    if attack is not None and hasattr(attack, "source_classes"):  # TaCT fires on its source classes only
        fires = np.isin(y_te[probe], attack.source_classes)
    preds = _predict(adapter, trig_imgs)
    asr = attack_success_rate(preds[fires], y_te[probe][fires], spec.target_label)
    return ZooEntry(
        spec=spec,
        checkpoint_dir=folder,
        clean_accuracy=clean_acc,
        attack_success_rate=asr,
        num_parameters=sum(p.numel() for p in adapter.model.parameters()),
        train_seconds=time.perf_counter() - start,
        probe_labels=y_te[probe].tolist(),
        probe_clean=clean_imgs,
        probe_triggered=trig_imgs,
        probe_attack_params=json.dumps(probe_attack.to_dict(), sort_keys=True),
    )
