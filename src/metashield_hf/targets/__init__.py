"""Target adapters: turn a classifier (transformers, PEFT, timm, plain torch) into logits + penultimate activations.

```python
>>> from metashield_hf.targets import load_target
>>> target = load_target("path/to/checkpoint")        # or a model object (+ tokenizer / image processor)
>>> out = target(inputs)                               # TargetOutput(logits (N, C), penultimate (N, D))
```
"""

from __future__ import annotations

from .base import TARGETS, TargetAdapter, TargetOutput, capture_penultimate, find_head, locate_head
from .loading import ADAPTER_ORDER, adapter_for, load_target, resolve_device, target_device
from .torch_models import TimmAdapter, TorchAdapter
from .transformers_models import PeftAdapter, TransformersImageAdapter, TransformersTextAdapter

__all__ = [
    "ADAPTER_ORDER",
    "PeftAdapter",
    "TARGETS",
    "TargetAdapter",
    "TargetOutput",
    "TimmAdapter",
    "TorchAdapter",
    "TransformersImageAdapter",
    "TransformersTextAdapter",
    "adapter_for",
    "capture_penultimate",
    "find_head",
    "load_target",
    "locate_head",
    "resolve_device",
    "target_device",
]
