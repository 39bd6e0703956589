"""Finding the final classification ``nn.Linear`` of a classifier, and capturing its input (the penultimate layer).

The rule (checked on BERT, DistilBERT, RoBERTa, DeBERTa-v2, BART, GPT-2, ViT, ResNet, ConvNeXt, timm and
PEFT models):

1. rules keyed by ``config.model_type`` (RoBERTa's head is ``classifier.out_proj``, not the ``dense`` before it) or
   timm's own ``pretrained_cfg["classifier"]``;
2. candidates: every ``nn.Linear`` with ``out_features == num_classes``, excluding PEFT adapter internals
   (``lora_A``/``lora_B``/…, which would otherwise be picked: ``lora_B`` is ``Linear(r, C)``);
3. one dry-run forward with hooks on every candidate; the head is the **last executed** candidate whose output equals
   the model's logits (this skips PEFT's ``ModulesToSaveWrapper.original_module``, which exists but never runs);
4. ``(B, T, H)`` inputs of decoder ``score`` heads are reduced to the token whose head output equals the pooled logits.

Everything here is used by :mod:`metashield_hf.targets.base`, which re-exports the public names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

logger = logging.getLogger(__name__)

# model_type -> the head's path relative to the model (PEFT wrapper segments are stripped before matching).
MODEL_TYPE_HEADS: dict[str, str] = {
    "roberta": "classifier.out_proj",
    "xlm-roberta": "classifier.out_proj",
    "xlm-roberta-xl": "classifier.out_proj",
    "camembert": "classifier.out_proj",
    "data2vec-text": "classifier.out_proj",
    "longformer": "classifier.out_proj",
    "electra": "classifier.out_proj",
    "bart": "classification_head.out_proj",
    "mbart": "classification_head.out_proj",
    "bert": "classifier",
    "distilbert": "classifier",
    "deberta-v2": "classifier",
    "albert": "classifier",
    "gpt2": "score",
    "llama": "score",
    "vit": "classifier",
    "resnet": "classifier.1",
    "convnext": "classifier",
}
# Parts of PEFT module paths that are wrappers, not model structure: `classifier.modules_to_save.default.out_proj`
# is RoBERTa's `classifier.out_proj`.
_PEFT_SEGMENTS = re.compile(r"\.(modules_to_save\.[^.]+|original_module|base_layer)(?=\.|$)")
_ADAPTER_PART = re.compile(r"^(lora_|hada_|lokr_|oft_|boft_|vera_|ia3_|adalora_)")


@dataclass
class PenultimateCapture:
    """What :func:`capture_penultimate` recorded during one forward pass (the head's last call)."""

    inputs: torch.Tensor | None = None
    output: torch.Tensor | None = None
    calls: int = 0

    def penultimate(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input as ``(B, D)``; ``(B, T, D)`` inputs are reduced to the token that produced ``logits``."""
        if self.inputs is None:
            raise RuntimeError("the classification head did not run during the forward pass; nothing was captured")
        return select_tokens(self.inputs, self.output, logits)

    def head_output(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("the classification head did not run during the forward pass; nothing was captured")
        return select_tokens(self.output, self.output, logits)


def select_tokens(x: torch.Tensor, head_out: torch.Tensor | None, logits: torch.Tensor | None) -> torch.Tensor:
    """Reduce ``(B, T, ·)`` to ``(B, ·)`` by picking, per row, the token whose head output equals the pooled logits.

    Decoder classifiers (GPT-2, Llama) run ``score`` on every token and pool the last non-padding one afterwards, so
    the head's input is ``(B, T, H)`` while the logits are ``(B, C)``.
    """
    if x.dim() <= 2 or logits is None or head_out is None or head_out.dim() == logits.dim():
        return x
    out = head_out.reshape(head_out.shape[0], -1, head_out.shape[-1])
    idx = (out.float() - logits.float()[:, None]).abs().amax(-1).argmin(-1)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return flat[torch.arange(flat.shape[0], device=flat.device), idx.to(flat.device)]


@contextmanager
def capture_penultimate(model: nn.Module, head: nn.Module) -> Iterator[PenultimateCapture]:
    """Record the input (``args[0]``) and output of ``head`` while ``model`` runs inside the ``with`` block.

    Args:
        model: the classifier; ``head`` must be one of its submodules.
        head: the module to hook, usually the final classification ``nn.Linear``.

    Returns:
        A context manager yielding a [`PenultimateCapture`]; the hook is removed in ``finally``, also on errors.

    Example:
        ```python
        >>> with capture_penultimate(model, model.classifier) as cap:
        ...     logits = model(**inputs).logits
        >>> cap.penultimate(logits).shape
        torch.Size([2, 32])
        ```
    """
    if not any(m is head for m in model.modules()):
        raise ValueError(
            f"{type(head).__name__} is not a submodule of {type(model).__name__}; pass the model's own head"
        )
    holder = PenultimateCapture()

    def hook(_module, args, output):
        holder.inputs = args[0].detach()
        holder.output = output.detach() if isinstance(output, torch.Tensor) else None
        holder.calls += 1

    handle = head.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def call_model(model: nn.Module, inputs) -> torch.Tensor:
    """Run ``model`` on ``inputs`` (a dict of keyword tensors or one tensor) and return its logits tensor."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"{type(model).__name__} returned {type(out).__name__}; expected logits (a tensor or .logits)")


@dataclass
class HeadInfo:
    """The located head: ``module`` is what gets hooked, ``linear`` an ``nn.Linear`` equal to it (the same object
    unless the head is wrapped by a PEFT layer, in which case it is the merged equivalent)."""

    name: str
    module: nn.Module
    linear: nn.Linear
    num_classes: int
    logits_from_head: bool = False  # the model post-processes the head's output (e.g. log_softmax): use the head's
    tried: list[str] = field(default_factory=list)


def _is_adapter_internal(name: str) -> bool:
    return any(_ADAPTER_PART.match(part) for part in name.split("."))


def _linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a PEFT layer wrapping one (``lora.Linear`` is not an ``nn.Linear`` subclass)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.base_layer.out_features


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear-like modules, outermost wrapper only, adapter internals excluded."""
    found = [(n, m) for n, m in model.named_modules() if n and _linear_like(m) and not _is_adapter_internal(n)]
    wrapped = {id(m.base_layer) for _, m in found if not isinstance(m, nn.Linear)}
    return [(n, m) for n, m in found if id(m) not in wrapped]


def _rule(model: nn.Module) -> tuple[str | None, str | None]:
    """(rule source, head path) from ``config.model_type`` or timm's ``pretrained_cfg['classifier']``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in MODEL_TYPE_HEADS:
        return f"model_type {model_type!r}", MODEL_TYPE_HEADS[model_type]
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        return "timm pretrained_cfg['classifier']", cfg["classifier"]
    return None, None


def _matches(name: str, path: str) -> bool:
    clean = _PEFT_SEGMENTS.sub("", name)
    return clean == path or clean.endswith("." + path)


def effective_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same affine map as ``module`` (e.g. a PEFT LoRA/DoRA layer in eval mode).

    Probing with the identity costs one ``(in_features + 1)``-row forward; the copy does not follow later weight edits.
    """
    if isinstance(module, nn.Linear):
        return module
    base = module.base_layer
    w = base.weight
    with torch.no_grad():
        zero = torch.zeros(1, base.in_features, dtype=w.dtype, device=w.device)
        bias = module(zero)[0]
        weight = (module(torch.eye(base.in_features, dtype=w.dtype, device=w.device)) - bias).T
    linear = nn.Linear(base.in_features, base.out_features, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True)


def locate_head(
    model: nn.Module, num_classes: int | None = None, example_inputs=None, *, forward: Callable | None = None
) -> HeadInfo:
    """Find the final classification head of ``model`` (the rule in this module's docstring).

    Args:
        model: the classifier (transformers, timm, PEFT or plain torch).
        num_classes: expected number of classes; ``None`` takes it from the dry-run logits.
        example_inputs: one small batch of model inputs (dict or tensor) for the dry run; without it only a single
            unambiguous candidate can be chosen.
        forward: how to run the model on ``example_inputs`` (default [`call_model`]); returns the logits.

    Returns:
        A [`HeadInfo`].
    """
    tried: list[str] = []
    cls = type(model).__name__
    logits = None
    runs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    cands = _candidates(model)
    if example_inputs is not None:
        # Hook every linear-like module once: the dry run also tells num_classes when it is unknown.
        def make_hook(name):
            def hook(_m, _args, out):
                if isinstance(out, torch.Tensor):
                    runs[name] = out.detach()
                    order.append(name)

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in cands]
        try:
            with torch.no_grad():
                logits = (forward or partial(call_model, model))(example_inputs).detach()
        finally:
            for h in handles:
                h.remove()
        if num_classes is None:
            num_classes = int(logits.shape[-1])
    if num_classes is None:
        raise ValueError(f"cannot find the head of {cls} without num_classes or example inputs for a dry run")

    by_n = [(n, m) for n, m in cands if _out_features(m) == num_classes]
    layers = ", ".join(f"{n} ({getattr(m, 'in_features', '?')}→{_out_features(m)})" for n, m in cands[-8:]) or "none"
    tried.append(
        f"nn.Linear with out_features={num_classes}: {[n for n, _ in by_n] or 'none'} (last Linear layers: {layers})"
    )
    source, path = _rule(model)
    if path is not None:
        ruled = [(n, m) for n, m in by_n if _matches(n, path)]
        tried.insert(0, f"{source} rule → {path!r}: {'found' if ruled else 'not found'}")
        by_n = ruled or by_n

    def fail(reason: str) -> ValueError:
        return ValueError(
            f"no classification head found in {cls} ({reason}); tried: "
            + "; ".join(tried)
            + ". MetaShield needs a classifier whose last layer is nn.Linear(…, num_classes): load transformers "
            "checkpoints with AutoModelFor{Sequence,Image}Classification, or pass a model that ends in such a layer."
        )

    if not by_n:
        raise fail(f"no nn.Linear with {num_classes} outputs")
    if example_inputs is None:
        live = [(n, m) for n, m in by_n if ".original_module" not in n]
        if len(live) != 1:
            raise fail(f"{len(live)} candidates and no example inputs to run; call the adapter on inputs first")
        name, module = live[0]
        return HeadInfo(name, module, effective_linear(module), num_classes, tried=tried)

    names = {n for n, _ in by_n}
    executed = [n for n in dict.fromkeys(reversed(order)) if n in names]  # last executed first
    if not executed:
        raise fail(f"none of the candidates {sorted(names)} ran in a forward pass")
    matched = [n for n in executed if _close(select_tokens(runs[n], runs[n], logits), logits)]
    tried.append(f"dry run: executed {list(reversed(executed))}, output equal to the logits: {matched or 'none'}")
    modules = dict(by_n)
    if matched:
        name, from_head = matched[0], False
    elif len(executed) == 1:
        name, from_head = executed[0], True
        logger.warning(
            "%s post-processes the output of its head %r (e.g. log_softmax); the head's output is used as logits",
            cls,
            name,
        )
    else:
        # Two heads that both run (DeiT-distilled averages `head` and `head_dist`): no single penultimate exists.
        raise fail(f"several heads ran ({executed}) and none alone gives the logits")
    return HeadInfo(name, modules[name], effective_linear(modules[name]), num_classes, from_head, tried)


def find_head(model: nn.Module, num_classes: int | None = None, example_inputs=None) -> nn.Linear:
    """The final classification ``nn.Linear`` of ``model`` (see [`locate_head`] for the rule).

    Args:
        model: the classifier.
        num_classes: number of classes (``config.num_labels`` for transformers, ``model.num_classes`` for timm).
        example_inputs: a small batch of model inputs for the dry run that disambiguates candidates.

    Returns:
        The head as an ``nn.Linear``: ``head(penultimate) == logits``.

    Example:
        ```python
        >>> find_head(roberta_classifier, 3, tokenizer(["hi"], return_tensors="pt"))
        Linear(in_features=32, out_features=3, bias=True)     # classifier.out_proj
        ```
    """
    return locate_head(model, num_classes, example_inputs).linear
