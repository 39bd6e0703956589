"""Adapters for transformers sequence and image classifiers, and for PEFT-wrapped models."""

from __future__ import annotations

import inspect
import logging
import os
import sys
from functools import lru_cache

import torch
from torch import nn

from .base import TARGETS, TargetAdapter, model_name
from .inputs import check_text, to_chw

logger = logging.getLogger(__name__)

# Families whose position ids start after padding_idx, so max_position_embeddings overstates the usable length.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers/timm/torch model under a ``PeftModel`` (the model itself otherwise)."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


@lru_cache(maxsize=1)
def _class_names() -> tuple[frozenset[str], frozenset[str]]:
    from transformers.models.auto import modeling_auto as auto

    def flat(mapping) -> frozenset[str]:
        names = set()
        for value in mapping.values():
            names.update(value if isinstance(value, (tuple, list)) else [value])
        return frozenset(names)

    return (
        flat(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        flat(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
    )


def classifier_kind(class_name: str) -> str | None:
    """``"text"`` for a sequence classifier class name, ``"image"`` for an image classifier, else ``None``."""
    seq, img = _class_names()
    if class_name in seq or class_name.endswith("ForSequenceClassification"):
        return "text"
    if class_name in img or class_name.endswith("ForImageClassification"):
        return "image"
    return None


#: The ``auto_map`` keys that declare a checkpoint's own classifier class, and the kind of each.
AUTO_MAP_KINDS = {"AutoModelForSequenceClassification": "text", "AutoModelForImageClassification": "image"}


def auto_map_classes(config) -> dict[str, str]:
    """``{auto_map key: "module.Class"}`` for the classifier classes a config (object or ``config.json`` dict) maps
    to its own code; a Hub reference ``"org/repo--module.Class"`` keeps its ``org/repo--`` prefix."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else getattr(config, "auto_map", None)
    found = {}
    for key in AUTO_MAP_KINDS:
        ref = (auto_map or {}).get(key)
        ref = ref[0] if isinstance(ref, (list, tuple)) and ref else ref
        if isinstance(ref, str):
            found[key] = ref
    return found


def config_classifier_kinds(config) -> set[str]:
    """The classifier kinds (``"text"``, ``"image"``) a config (object or dict) names: by its ``architectures``, else
    by the classifier classes its ``auto_map`` declares (a custom class need not end in ``For…Classification``)."""
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    kinds = {k for k in map(classifier_kind, archs or []) if k}
    return kinds or {AUTO_MAP_KINDS[key] for key in auto_map_classes(config)}


def model_classifier_kind(model: nn.Module) -> str | None:
    """The classifier kind of a model object: by its class or any base class (so a checkpoint's own
    ``class MyClassifier(BertForSequenceClassification)`` counts), else by the ``auto_map`` entry of its config that
    names its class (a custom classifier the checkpoint itself declares as one)."""
    for klass in type(model).__mro__:
        kind = classifier_kind(klass.__name__)
        if kind is not None:
            return kind
    name = type(model).__name__
    for key, ref in auto_map_classes(getattr(model, "config", None)).items():
        if ref.rsplit(".", 1)[-1] == name:
            return AUTO_MAP_KINDS[key]
    return None


def is_transformers_model(model) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _local_source(model: nn.Module, files: tuple[str, ...]) -> str | None:
    """The folder the model was loaded from, if it is local and holds one of ``files``."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in files):
        return path
    return None


class _TransformersAdapter(TargetAdapter):
    def expected_num_classes(self) -> int | None:
        return int(self.model.config.num_labels)


@TARGETS.register("transformers_text")
class TransformersTextAdapter(_TransformersAdapter):
    """transformers sequence classifiers (BERT, DistilBERT, RoBERTa, …): ``str`` inputs, tokenized with padding.

    Args:
        model: an ``AutoModelForSequenceClassification`` model.
        processor: its tokenizer (or a processor with a ``.tokenizer``); ``None`` loads it from the local folder the
            model came from.
        max_length: truncation length; default: the smaller of the tokenizer's and the model's position limit.
    """

    name = "transformers_text"
    modality = "text"

    def __init__(self, model, processor=None, *, batch_size=32, device=None, max_length: int | None = None):
        super().__init__(model, processor, batch_size=batch_size, device=device)
        self.tokenizer = self._resolve_tokenizer(processor)
        self.max_length = max_length or self._default_max_length()
        params = inspect.signature(unwrap(model).forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._input_names = None if takes_any else set(params)  # DistilBERT has no token_type_ids
        self._find_head()  # fail at construction for a model without a usable head

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return is_transformers_model(model) and model_classifier_kind(model) == "text"

    def _resolve_tokenizer(self, processor):
        from transformers import PreTrainedTokenizerBase

        tok = processor
        if processor is not None and not isinstance(processor, PreTrainedTokenizerBase):
            tok = getattr(processor, "tokenizer", processor)  # a multimodal ProcessorMixin
        if tok is None:
            folder = _local_source(self.model, _TOKENIZER_FILES)
            if folder is None:
                raise ValueError(
                    f"{model_name(self.model)} needs its tokenizer: pass processor=AutoTokenizer.from_pretrained(...)"
                )
            from transformers import AutoTokenizer

            logger.info("loading the tokenizer from %s", folder)
            tok = AutoTokenizer.from_pretrained(folder)
        if not isinstance(tok, PreTrainedTokenizerBase):
            raise ValueError(f"processor must be a tokenizer for a text classifier, got {type(tok).__name__}")
        return tok

    def _default_max_length(self) -> int | None:
        config = unwrap(self.model).config
        limits = []
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 100_000:
            limits.append(int(self.tokenizer.model_max_length))
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
                positions -= (getattr(config, "pad_token_id", None) or 0) + 1
            limits.append(positions)
        return min(limits) if limits else None

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        who = model_name(self.model)
        texts = [check_text(x, who) for x in items]
        if self.tokenizer.pad_token is None and len(texts) > 1:
            raise ValueError(
                f"the tokenizer of {who} has no pad token, so batches cannot be padded; set "
                "tokenizer.pad_token = tokenizer.eos_token (and model.config.pad_token_id), or use batch_size=1"
            )
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if self._input_names is None or k in self._input_names}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self.preprocess(["a short example sentence"])


@TARGETS.register("transformers_image")
class TransformersImageAdapter(_TransformersAdapter):
    """transformers image classifiers (ViT, ResNet, ConvNeXt, …): PIL images, arrays or tensors.

    Images are converted to float ``(C, H, W)`` in ``[0, 1]`` with ``config.num_channels`` channels (grey → RGB as
    PIL's ``convert("RGB")`` does), then resized and normalized by the image processor (``do_rescale=False``).

    Args:
        model: an ``AutoModelForImageClassification`` model.
        processor: its image processor (or a processor with an ``.image_processor``); ``None`` loads it from the local
            folder the model came from.
    """

    name = "transformers_image"
    modality = "image"

    def __init__(self, model, processor=None, *, batch_size=32, device=None):
        super().__init__(model, processor, batch_size=batch_size, device=device)
        self.image_processor = self._resolve_processor(processor)
        self.channels = int(getattr(unwrap(model).config, "num_channels", 3) or 3)
        self._find_head()

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return is_transformers_model(model) and model_classifier_kind(model) == "image"

    def _resolve_processor(self, processor):
        from transformers import ImageProcessingMixin

        proc = processor
        if processor is not None and not isinstance(processor, ImageProcessingMixin):
            proc = getattr(processor, "image_processor", processor)  # a multimodal ProcessorMixin
        if proc is None:
            folder = _local_source(self.model, ("preprocessor_config.json",))
            if folder is None:
                raise ValueError(
                    f"{model_name(self.model)} needs its image processor: pass "
                    "processor=AutoImageProcessor.from_pretrained(...)"
                )
            from transformers import AutoImageProcessor

            logger.info("loading the image processor from %s", folder)
            proc = AutoImageProcessor.from_pretrained(folder)
        if not isinstance(proc, ImageProcessingMixin):
            raise ValueError(
                f"processor must be an image processor for an image classifier, got {type(proc).__name__}"
            )
        return proc

    def preprocess(self, items: list) -> dict[str, torch.Tensor]:
        who = model_name(self.model)
        images = [to_chw(x, self.channels, who) for x in items]
        if all(x.dtype == torch.uint8 for x in images):  # exactly what the processor does for PIL images
            out = self.image_processor(images=images, return_tensors="pt")
        else:  # float images are already in [0, 1]: rescaling them by 1/255 again would be wrong
            images = [x.float() / 255.0 if x.dtype == torch.uint8 else x for x in images]
            out = self.image_processor(images=images, return_tensors="pt", do_rescale=False)
        return {"pixel_values": out["pixel_values"]}

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self.preprocess([torch.full((self.channels, 32, 32), 0.5)])


@TARGETS.register("peft")
class PeftAdapter(TargetAdapter):
    """PEFT-wrapped models (LoRA, …): the base model's family adapter runs the ``PeftModel`` itself.

    The head rule skips adapter internals (``lora_B`` is a ``Linear(r, C)``) and PEFT's unused ``original_module``;
    a LoRA on the head itself is merged into an equivalent ``nn.Linear`` so that ``head(penultimate) == logits``.
    ``modality`` is the base family's.
    """

    name = "peft"
    modality = "auto"  # replaced per instance by the base family's modality
    _families = ("transformers_text", "transformers_image", "timm", "torch")

    def __init__(self, model, processor=None, *, batch_size=32, device=None):
        if not self.accepts(model):
            raise TypeError(f"PeftAdapter needs a peft.PeftModel, got {type(model).__name__}")
        base = model.get_base_model()
        family = next((TARGETS.get(f) for f in self._families if f in TARGETS and TARGETS.get(f).accepts(base)), None)
        if family is None:
            raise ValueError(
                f"no adapter for the base model {type(base).__name__} of this PeftModel; tried {list(self._families)}"
            )
        self.inner = family(model, processor, batch_size=batch_size, device=device)
        super().__init__(model, self.inner.processor, batch_size=batch_size, device=device)
        self.modality = self.inner.modality  # type: ignore[misc]
        self._head = self.inner._head

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        peft = sys.modules.get("peft")
        return peft is not None and isinstance(model, peft.PeftModel)

    def iter_items(self, inputs):
        return self.inner.iter_items(inputs)

    def preprocess(self, items: list):
        return self.inner.preprocess(items)

    def example_inputs(self):
        return self.inner.example_inputs()

    def expected_num_classes(self) -> int | None:
        return self.inner.expected_num_classes()

    def forward(self, model_inputs) -> torch.Tensor:
        return self.inner.forward(model_inputs)

    def _find_head(self, example=None):
        self._head = self.inner._find_head(example)
        return self._head
