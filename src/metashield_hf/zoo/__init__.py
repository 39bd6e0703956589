"""The poisoned-model zoo: plan, build (resumable, sharded), store as a Hugging Face dataset, load back.

```python
>>> from metashield_hf.zoo import ZooConfig, build_zoo, finalize_zoo, load_zoo, row_to_target, row_probe
>>> config = ZooConfig.from_yaml("configs/zoo/tiny.yaml")
>>> build_zoo(config, "zoo_tiny"); finalize_zoo("zoo_tiny")
>>> zoo = load_zoo("zoo_tiny")                     # datasets.Dataset, one row per model
>>> target = row_to_target(zoo[0])                 # a TargetAdapter on the row's checkpoint
>>> clean, triggered, labels = row_probe(zoo[0])
```
``sweep_zoo_rows`` runs one measurement over every model of some zoos, resumably (the probes in benchmarks/).
Builders per domain: ``vision.build_cv_entry``, ``text.build_nlp_entry``, ``fl.build_fl_entry`` (same signature).
"""

from __future__ import annotations

from .build import BuildReport, build_zoo, finalize_zoo, load_zoo, resolve_data_root, row_to_target
from .schema import FEATURES, row_labels, row_probe, row_spec, write_checkpoint
from .spec import ModelSpec, ZooConfig, ZooEntry, attack_success_rate, plan
from .sweep import sweep_zoo_rows

__all__ = [
    "FEATURES",
    "BuildReport",
    "ModelSpec",
    "ZooConfig",
    "ZooEntry",
    "attack_success_rate",
    "build_zoo",
    "finalize_zoo",
    "load_zoo",
    "plan",
    "resolve_data_root",
    "row_labels",
    "row_probe",
    "row_spec",
    "row_to_target",
    "sweep_zoo_rows",
    "write_checkpoint",
]
