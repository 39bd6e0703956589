"""`load_target`: an adapter from whatever the user has (adapter, model object, local folder or Hub id).

Loading is safe by default: safetensors only, pickle (``.bin``) weights only with ``allow_pickle=True`` (and then
read with ``weights_only=True`` by transformers/timm/peft), and ``trust_remote_code`` off unless asked for.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .base import TARGETS, TargetAdapter
from .transformers_models import auto_map_classes, config_classifier_kinds, is_transformers_model

logger = logging.getLogger(__name__)

# The order in which adapters are asked whether they accept a model object (most specific first).
ADAPTER_ORDER = ("peft", "transformers_text", "transformers_image", "timm", "torch")
_ADAPTER_HINTS = {
    "peft": "peft.PeftModel",
    "transformers_text": "transformers …ForSequenceClassification",
    "transformers_image": "transformers …ForImageClassification",
    "timm": "timm models",
    "torch": "plain torch.nn.Module (not a transformers model)",
}
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "preprocessor_config.json")


def adapter_for(model: nn.Module, processor=None, *, batch_size: int = 32, device=None) -> TargetAdapter:
    """The first registered adapter (in `ADAPTER_ORDER`, then any others) whose ``accepts(model)`` is True."""
    names = [n for n in ADAPTER_ORDER if n in TARGETS] + [n for n in TARGETS if n not in ADAPTER_ORDER]
    for name in names:
        cls = TARGETS.get(name)
        if cls.accepts(model):
            logger.debug("using the %s adapter for %s", name, type(model).__name__)
            return cls(model, processor, batch_size=batch_size, device=device)
    tried = ", ".join(f"{n} ({_ADAPTER_HINTS.get(n, 'custom')})" for n in names)
    hint = ""
    if is_transformers_model(model):
        hint = (
            f"; {type(model).__name__} is a transformers model without a sequence or image classification head: "
            "load it with AutoModelForSequenceClassification or AutoModelForImageClassification"
        )
    raise ValueError(f"no target adapter accepts {type(model).__name__}; tried {tried}{hint}")


#: Device types a target can run on; anything else (``meta``: no data, ``ipu``, ...) is refused by name.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a target runs on: ``device`` checked, or ``cuda`` when CUDA is present and ``cpu`` otherwise.

    Checked so that a typo or an absent accelerator fails at once with one line naming the value and the choices,
    not deep inside a forward pass (``meta`` holds no data, so no scan can run on it).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu"`` or a ``torch.device``; ``None`` picks the
            default.

    Returns:
        The ``torch.device``.

    Example:
        ```python
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ValueError: unknown device 'gpu'; use one of cpu, cuda, cuda:N, mps, xpu
        ```
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "use one of cpu, cuda, cuda:N, mps, xpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; {choices}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r} is not supported for running a target; {choices}")
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available[dev.type]():
        raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu (device='cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def target_device(target, device: str | torch.device | None = None) -> torch.device | None:
    """Where [`load_target`] puts ``target`` for the scan, [`adapt`] and the pipeline: ``device`` checked; without it,
    a checkpoint named by path or Hub id goes to CUDA when CUDA is present (else CPU), and a model object or adapter
    stays where it is (``None``), so that a caller's own model is never moved behind its back."""
    if device is not None:
        return resolve_device(device)
    return resolve_device(None) if isinstance(target, (str, os.PathLike)) else None


# How each option that is off by default is named where it is passed, and what turning it on means.
_OPTION_NAMES = {
    "allow_pickle": "--allow_pickle on the command line, allow_pickle=True in adapt, ScanConfig and the pipeline",
    "trust_remote_code": "--trust_remote_code on the command line, trust_remote_code=True in adapt and ScanConfig, "
    "trust_remote_code_target=True in the pipeline",
}
_OPTION_RISKS = {
    "allow_pickle": "if you trust the files (they are then read with torch.load(weights_only=True))",
    "trust_remote_code": "if you trust its code (it then runs on this machine)",
}
_warned_auto_maps: set[tuple[str, str]] = set()


def needs_option(what: str, option: str) -> str:
    """The one message for a checkpoint that only loads with an option that is off by default (``allow_pickle`` or
    ``trust_remote_code``), so that ``load_target``, ``scan_model``, ``adapt``, ``metashield scan/detect`` and the
    pipeline all refuse with the same words and name the flag in each of them.

    Args:
        what: the checkpoint and what it has, e.g. ``"/ckpt only has pickle weights (pytorch_model.bin)"``.
        option: ``"allow_pickle"`` or ``"trust_remote_code"``.

    Returns:
        The message.

    Example:
        ```python
        >>> needs_option("ckpt only has pickle weights (pytorch_model.bin)", "allow_pickle")
        'ckpt only has pickle weights (pytorch_model.bin); pass allow_pickle=True (--allow_pickle on the command ...'
        ```
    """
    if option not in _OPTION_NAMES:
        raise ValueError(f"unknown loading option {option!r}; use one of {', '.join(_OPTION_NAMES)}")
    return f"{what}; pass {option}=True ({_OPTION_NAMES[option]}) {_OPTION_RISKS[option]}"


def _check_auto_map(folder: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse a config whose class only exists in the checkpoint's own code unless ``trust_remote_code``; otherwise
    log once per folder and class that its ``auto_map`` classifier is ignored for the built-in class of its
    ``model_type`` (what transformers does silently)."""
    if trust_remote_code or not isinstance(config.get("auto_map"), dict):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        custom = config["auto_map"].get("AutoConfig", f"model_type {model_type!r}")
        raise ValueError(
            needs_option(f"{folder} needs its own code ({custom} in config.json's auto_map)", "trust_remote_code")
        )
    from transformers.models.auto import modeling_auto as auto

    builtin = {
        "AutoModelForSequenceClassification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "AutoModelForImageClassification": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    }
    for key, ref in auto_map_classes(config).items():
        if (str(folder), ref) in _warned_auto_maps:
            continue
        _warned_auto_maps.add((str(folder), ref))
        instead = builtin[key].get(model_type, f"the built-in {key.removeprefix('AutoModel')} class")
        logger.warning(
            "%s/config.json maps %s to its own class %s (auto_map), which is ignored because trust_remote_code is "
            "off: %s (model_type %r) is loaded instead; pass trust_remote_code=True (--trust_remote_code) to run "
            "the checkpoint's own class if you trust its code",
            folder,
            key,
            ref,
            instead,
            model_type,
        )


def _weights(folder: Path, stem: str, allow_pickle: bool) -> str:
    """``"safetensors"`` or ``"pickle"``; raises when there are no weights or only refused pickle weights."""
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.safetensors.index.json").exists():
        return "safetensors"
    pickles = [
        p.name
        for p in (
            folder / f"{'pytorch_model' if stem == 'model' else stem}.bin",
            folder / "pytorch_model.bin.index.json",
        )
        if p.exists()
    ]
    if pickles:
        if not allow_pickle:
            raise ValueError(needs_option(f"{folder} only has pickle weights ({', '.join(pickles)})", "allow_pickle"))
        return "pickle"
    raise ValueError(
        f"{folder} has no weights ({stem}.safetensors); is it a complete checkpoint folder? (Hub repos with only "
        "pickle weights download them with allow_pickle=True, if you trust them)"
    )


def _has_processor_files(folder: Path) -> bool:
    return any((folder / f).exists() for f in _PROCESSOR_FILES)


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a folder: Hub ids are ``name`` or ``org/name``; anything else (absolute, ``./``,
    ``~``, ``a/b/c``, a backslash) names a folder, so a missing one is a path error rather than a Hub lookup."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path


def resolve_folder(path: str | os.PathLike, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """A local folder for ``path``: the folder itself, or a snapshot of the Hub repo ``path`` (cached)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"{str(path)!r} is a file; pass the checkpoint folder that contains it")
    if looks_local(str(path)):
        raise FileNotFoundError(f"no folder {str(path)!r}: it does not exist (check the path)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken"]
    patterns += ["*.bin"] if allow_pickle else []
    patterns += ["*.py"] if trust_remote_code else []
    try:
        return Path(snapshot_download(str(path), allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, invalid id, gated: one clear message, the cause chained
        raise OSError(
            f"{str(path)!r} is not a local folder and could not be loaded from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the path or the Hub id; "
            "offline (HF_HUB_OFFLINE=1) only models already in the cache can be loaded."
        ) from e


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e


def _load_transformers(folder: Path, processor, *, trust_remote_code: bool, allow_pickle: bool):
    """(model, processor) for a transformers sequence or image classifier folder."""
    from transformers import AutoConfig

    _weights(folder, "model", allow_pickle)
    _check_auto_map(folder, _read_json(folder / "config.json"), trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    kinds = config_classifier_kinds(config)
    if not archs and not kinds:
        # Without `architectures` only model_type can tell; a BertModel folder (no head) still names its class there,
        # so it is refused above instead of silently getting a random classifier.
        kinds = _model_type_kinds(config.model_type)
        logger.warning("%s/config.json has no 'architectures'; guessing from model_type %r", folder, config.model_type)
    if len(kinds) != 1:
        raise ValueError(
            f"{folder} holds {archs or config.model_type!r}, which is not a classifier MetaShield can load; tried "
            "sequence classification (…ForSequenceClassification) and image classification (…ForImageClassification), "
            "by architectures and by the auto_map entries AutoModelFor{Sequence,Image}Classification"
        )
    kind = kinds.pop()
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if kind == "text":
        from transformers import AutoModelForSequenceClassification as auto_model
        from transformers import AutoTokenizer as auto_processor
    else:
        from transformers import AutoImageProcessor as auto_processor
        from transformers import AutoModelForImageClassification as auto_model
    model = auto_model.from_pretrained(folder, **kwargs)
    if processor is None:
        try:
            processor = auto_processor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            what = "tokenizer" if kind == "text" else "image processor"
            raise ValueError(f"{folder} has no {what}; pass processor= ({type(e).__name__}: {e})") from e
    return model, processor


def _model_type_kinds(model_type: str) -> set[str]:
    from transformers.models.auto import modeling_auto as auto

    kinds = set()
    if model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        kinds.add("text")
    if model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        kinds.add("image")
    return kinds


def _load_timm(folder: Path, processor, *, allow_pickle: bool):
    import timm

    _weights(folder, "model", allow_pickle)
    # pretrained=True is what loads the weights: without it timm builds the architecture with random weights.
    return timm.create_model(f"local-dir:{folder}", pretrained=True), processor


def _load_peft(folder: Path, processor, *, trust_remote_code: bool, allow_pickle: bool):
    from peft import PeftModel

    _weights(folder, "adapter_model", allow_pickle)
    base_id = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base_id:
        raise ValueError(
            f"{folder}/adapter_config.json has no base_model_name_or_path (the base was built from a config); load "
            "the base yourself and pass PeftModel.from_pretrained(base, adapter_folder) to load_target"
        )
    base_folder = resolve_folder(base_id, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    own = processor if processor is not None else _processor_from(folder)
    base, processor = _load_folder_model(
        base_folder, own, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False), processor


def _processor_from(folder: Path):
    """The tokenizer/image processor saved next to an adapter, if any (otherwise the base model's is used)."""
    if not _has_processor_files(folder):
        return None
    if (folder / "preprocessor_config.json").exists():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _load_folder_model(folder: Path, processor, *, trust_remote_code: bool, allow_pickle: bool):
    if (folder / "adapter_config.json").exists():
        return _load_peft(folder, processor, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if not (folder / "config.json").exists():
        raise ValueError(
            f"{folder} has neither config.json nor adapter_config.json; tried PEFT adapter, timm and transformers "
            "layouts. Save models with save_pretrained / timm.models.save_for_hf, or pass the model object"
        )
    config = _read_json(folder / "config.json")
    if "model_type" not in config and ("architecture" in config or "pretrained_cfg" in config):
        return _load_timm(folder, processor, allow_pickle=allow_pickle)
    return _load_transformers(folder, processor, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def load_target(
    model_or_path,
    processor=None,
    *,
    trust_remote_code: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
) -> TargetAdapter:
    """Wrap a classifier in the right target adapter.

    Args:
        model_or_path: a [`TargetAdapter`] (returned as is), an ``nn.Module`` (transformers, PEFT, timm or plain
            torch), a local checkpoint folder (transformers ``save_pretrained``, timm ``save_for_hf``, or a PEFT
            adapter folder whose ``base_model_name_or_path`` is loadable), or a Hub id.
        processor: tokenizer / image processor / transform; default: the one saved with the checkpoint.
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        batch_size: inputs per forward pass.
        device: where the model runs (``None``: where it is; CPU for loaded checkpoints); checked by
            [`resolve_device`], so an unknown or absent device is a ``ValueError`` naming it.
        allow_pickle: accept ``pytorch_model.bin``/``adapter_model.bin`` weights when no safetensors exist.

    Returns:
        A [`TargetAdapter`]: ``adapter(inputs)`` → [`TargetOutput`] with ``logits`` and ``penultimate``.

    Example:
        ```python
        >>> target = load_target("path/to/sst2-bert")            # tokenizer from the folder
        >>> out = target(["a gripping film", "dull"])
        >>> out.logits.shape, out.penultimate.shape
        (torch.Size([2, 2]), torch.Size([2, 768]))
        ```
    """
    if device is not None:
        device = resolve_device(device)
    if isinstance(model_or_path, TargetAdapter):
        have = model_or_path.device
        if device is not None and (device.type != have.type or device.index not in (None, have.index)):
            raise ValueError(
                f"the target adapter runs on {have}, not {device}; pass device=None or load the "
                f"model again with device={str(device)!r}"
            )
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        return adapter_for(model_or_path, processor, batch_size=batch_size, device=device)
    if isinstance(model_or_path, (str, os.PathLike)):
        folder = resolve_folder(model_or_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        model, processor = _load_folder_model(
            folder, processor, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        return adapter_for(model, processor, batch_size=batch_size, device=device)
    raise TypeError(
        f"load_target takes a model, a folder or a Hub id, got {type(model_or_path).__name__}; "
        "pass a torch.nn.Module, a checkpoint folder path or a Hub id string"
    )
