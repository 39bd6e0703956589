"""The zoo's row format: ``datasets`` features, entry → row, row → checkpoint folder / probe / spec.

One row per model. Checkpoint files are stored inside the row (``checkpoint`` = list of ``{"path", "data"}``), so the
zoo is self-contained and a row becomes an HF-loadable folder again with :func:`write_checkpoint`. Probe inputs are
stored in one of two column pairs (``probe_*_image`` as ``List(Image())`` for vision and FL, ``probe_*_text`` as
``List(string)`` for text); the unused pair holds empty lists. JSON-valued columns are plain strings for
portability.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Features, Image, List, Value

from .spec import ModelSpec, ZooEntry

FEATURES = Features(
    {
        "model_id": Value("string"),
        "domain": Value("string"),
        "dataset": Value("string"),
        "family": Value("string"),
        "architecture": Value("string"),
        "attack": Value("string"),
        "attack_params": Value("string"),
        "is_backdoored": Value("bool"),
        "target_label": Value("int32"),
        "poison_rate": Value("float32"),
        "seed": Value("int64"),
        "recipe": Value("string"),
        "clean_accuracy": Value("float32"),
        "attack_success_rate": Value("float32"),
        "num_parameters": Value("int64"),
        "train_seconds": Value("float32"),
        "extra_metrics": Value("string"),
        "probe_attack_params": Value("string"),
        "probe_labels": List(Value("int32")),
        "probe_clean_image": List(Image()),
        "probe_triggered_image": List(Image()),
        "probe_clean_text": List(Value("string")),
        "probe_triggered_text": List(Value("string")),
        "checkpoint": List({"path": Value("string"), "data": Value("binary")}),
    }
)
HEAVY_COLUMNS = (
    "checkpoint",
    "probe_clean_image",
    "probe_triggered_image",
    "probe_clean_text",
    "probe_triggered_text",
)
METADATA_FEATURES = Features({k: v for k, v in FEATURES.items() if k not in HEAVY_COLUMNS})
SPEC_COLUMNS = (
    "domain",
    "dataset",
    "family",
    "architecture",
    "attack",
    "attack_params",
    "target_label",
    "poison_rate",
    "seed",
    "recipe",
    "probe_attack_params",
)


def entry_to_row(entry: ZooEntry) -> dict[str, Any]:
    """One dataset row (a dict matching :data:`FEATURES`) from a built entry; reads the checkpoint folder."""
    spec = entry.spec
    folder = Path(entry.checkpoint_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not any(p.name in ("config.json", "adapter_config.json") for p in files):
        raise ValueError(f"{spec.model_id}: checkpoint folder {folder} has no config.json/adapter_config.json")
    is_text = bool(entry.probe_clean) and isinstance(entry.probe_clean[0], str)
    n = len(entry.probe_labels)
    if len(entry.probe_clean) != n or len(entry.probe_triggered) != n:
        raise ValueError(
            f"{spec.model_id}: probe sizes differ (labels {n}, clean {len(entry.probe_clean)}, "
            f"triggered {len(entry.probe_triggered)})"
        )
    return {
        "model_id": spec.model_id,
        **{k: getattr(spec, k) for k in SPEC_COLUMNS},
        "is_backdoored": spec.is_backdoored,
        "clean_accuracy": float(entry.clean_accuracy),
        "attack_success_rate": float(entry.attack_success_rate),
        "num_parameters": int(entry.num_parameters),
        "train_seconds": float(entry.train_seconds),
        "extra_metrics": json.dumps(entry.extra_metrics, sort_keys=True),
        "probe_attack_params": entry.probe_attack_params,
        "probe_labels": [int(v) for v in entry.probe_labels],
        "probe_clean_image": [] if is_text else list(entry.probe_clean),
        "probe_triggered_image": [] if is_text else list(entry.probe_triggered),
        "probe_clean_text": list(entry.probe_clean) if is_text else [],
        "probe_triggered_text": list(entry.probe_triggered) if is_text else [],
        "checkpoint": [{"path": p.relative_to(folder).as_posix(), "data": p.read_bytes()} for p in files],
    }


def row_spec(row: dict[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` a row was built from (its ``model_id`` is checked against the stored one)."""
    d = {k: row[k] for k in SPEC_COLUMNS}
    # poison_rate is stored as float32; plan() rounds it to 4 decimals, so rounding restores the planned value.
    d["poison_rate"] = round(float(d["poison_rate"]), 4)
    spec = ModelSpec.from_dict(d)
    if "model_id" in row and spec.model_id != row["model_id"]:
        raise ValueError(f"row {row['model_id']!r} does not match its own spec columns (rebuilt id {spec.model_id!r})")
    return spec


def write_checkpoint(row: dict[str, Any], folder: str | Path) -> Path:
    """Write a row's checkpoint files to ``folder``; returns the folder to pass to ``load_target``.

    PEFT rows hold the base model under ``base/``: ``adapter_config.json``'s ``base_model_name_or_path`` is rewritten
    to that folder's absolute path, because PEFT resolves it when loading.
    """
    folder = Path(folder)
    if not row.get("checkpoint"):
        raise ValueError(f"row {row.get('model_id')!r} has no checkpoint files; was it loaded from metadata/?")
    for item in row["checkpoint"]:
        rel = Path(item["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"row {row.get('model_id')!r}: unsafe checkpoint path {item['path']!r}")
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(item["data"])
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists() and (folder / "base").is_dir():
        cfg = json.loads(adapter_config.read_text())
        cfg["base_model_name_or_path"] = str((folder / "base").resolve())
        adapter_config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def row_probe(row: dict[str, Any]) -> tuple[list, list, list[int]]:
    """A row's probe set: ``(clean_inputs, triggered_inputs, labels)``; inputs are ``str`` or RGB ``PIL.Image``.

    Example:
        ```python
        clean, triggered, labels = row_probe(zoo[0])
        ```
    """
    if row.get("probe_clean_text"):
        return list(row["probe_clean_text"]), list(row["probe_triggered_text"]), list(row["probe_labels"])
    return list(row["probe_clean_image"]), list(row["probe_triggered_image"]), list(row["probe_labels"])


def row_labels(row: dict[str, Any]) -> dict[str, Any]:
    """What a zoo row is, as benchmark tables group and score it: ``attack`` (``"none"`` for a clean model),
    ``dataset``, ``architecture``, ``is_backdoored`` (a ``bool``) and ``target_label``.

    Example:
        ```python
        >>> row_labels({"attack": None, "dataset": "mnist", "architecture": "test_resnet", "is_backdoored": 0,
        ...             "target_label": -1, "checkpoint": b""})
        {'attack': 'none', 'dataset': 'mnist', 'architecture': 'test_resnet', 'is_backdoored': False, 'target_label': -1}
        ```
    """
    return {
        "attack": row["attack"] or "none",
        "dataset": row["dataset"],
        "architecture": row["architecture"],
        "is_backdoored": bool(row["is_backdoored"]),
        "target_label": row["target_label"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Dataset card and build report (markdown), generated by finalize_zoo()
# ----------------------------------------------------------------------------------------------------------------

COLUMN_DOCS = {
    "model_id": "stable key: `{domain}-{dataset}-{architecture}-{attack}-{hash of the spec}`",
    "domain": "`cv`, `nlp` or `fl`",
    "dataset": "training data (`mnist`, `cifar10`, `digits`, `sst2`, `mr`, `ag_news`, `femnist`)",
    "family": "target-adapter family that loads the checkpoint (`timm`, `transformers_image`, `transformers_text`, "
    "`peft`, `torch`)",
    "architecture": "model architecture (`test_resnet`, `vit`, `bert`, `bert_lora`, `cnn_fedavg`, ...)",
    "attack": "attack registry name, `none` for clean models",
    "attack_params": "JSON of the attack config (`metashield_hf.attacks.attack_from_dict` rebuilds it); `{}` if clean",
    "is_backdoored": "`attack != 'none'`",
    "target_label": "backdoor target class, -1 if clean",
    "poison_rate": "fraction of training rows poisoned",
    "seed": "seed of the data subset, initialisation, batch order and poisoned rows",
    "recipe": "JSON of the training recipe (identical for clean and poisoned models of a cell and architecture)",
    "clean_accuracy": "accuracy on clean test inputs, measured through `load_target` on the stored checkpoint",
    "attack_success_rate": "triggered probe inputs classified as the target; for clean models the largest such rate "
    "over classes (negative control)",
    "num_parameters": "parameters of the loaded model",
    "train_seconds": "wall seconds to build the model (train + save + measure)",
    "extra_metrics": "JSON of domain-specific metrics (e.g. FL backdoor durability)",
    "probe_attack_params": "JSON of the trigger applied to the probe (a sampled one for clean models)",
    "probe_labels": "true labels of the probe inputs (never the target)",
    "probe_clean_image": "clean probe images (vision / FL rows; empty for text)",
    "probe_triggered_image": "the same images with the trigger",
    "probe_clean_text": "clean probe sentences (text rows; empty for images)",
    "probe_triggered_text": "the same sentences with the trigger",
    "checkpoint": "the HF-loadable checkpoint folder as a list of `{path, data}` files (PEFT: adapter + `base/`)",
}


def _stats(values: list[float], fmt: str = "{:.3f}") -> str:
    import numpy as np

    if not values:
        return "–"
    v = np.asarray(values, dtype=float)
    return " / ".join(fmt.format(x) for x in (v.min(), np.median(v), v.max()))


def _group(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return dict(sorted(out.items()))


def _counts_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for (domain,), dom_rows in _group(rows, "domain").items():
        attacks = sorted({r["attack"] for r in dom_rows}, key=lambda a: (a == "none", a))
        lines += [
            f"**{domain}**",
            "",
            "| architecture | " + " | ".join(attacks) + " | total |",
            "|---|" + "---:|" * (len(attacks) + 1),
        ]
        for (arch,), arch_rows in _group(dom_rows, "architecture").items():
            cells = [str(sum(r["attack"] == a for r in arch_rows)) for a in attacks]
            lines.append(f"| {arch} | " + " | ".join(cells) + f" | {len(arch_rows)} |")
        lines.append("")
    return lines


def render_card(config, accepted: list[dict[str, Any]], rejects: list[dict[str, Any]]) -> str:
    """The dataset card (README.md with YAML: ``configs`` for the full rows and the light ``metadata`` view)."""
    from huggingface_hub import DatasetCardData

    n = len(accepted)
    size = "n<1K" if n < 1000 else "1K<n<10K"
    name = config.name if config else "zoo"
    task_of = {"cv": "image-classification", "fl": "image-classification", "nlp": "text-classification"}
    tasks = sorted({task_of[r["domain"]] for r in accepted})
    data = DatasetCardData(
        pretty_name=f"MetaShield model zoo ({name})",
        license="other",
        tags=["backdoor", "trojan", "model-zoo", "ai-safety", "safetensors", "metashield"],
        task_categories=tasks,
        size_categories=[size],
        configs=[
            {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}], "default": True},
            {"config_name": "metadata", "data_files": [{"split": "train", "path": "metadata/train.parquet"}]},
        ],
    )
    n_clean = sum(not r["is_backdoored"] for r in accepted)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# MetaShield model zoo: `{name}`",
        "",
        f"{n} small classifiers ({n - n_clean} backdoored, {n_clean} clean) for meta-training and evaluating backdoor "
        "detectors. Each row holds an HF-loadable checkpoint, its attack and training recipe, measured clean accuracy "
        "and attack success rate, and a probe set (clean test inputs whose label is not the target, and the same "
        "inputs with the trigger). Clean models are trained with exactly the same recipes as the poisoned ones.",
        "",
        "## Load",
        "",
        "```python",
        "from metashield_hf.zoo import load_zoo, row_to_target, row_probe",
        'zoo = load_zoo("<this folder or hub id>")          # datasets.load_dataset(..., split="train")',
        "target = row_to_target(zoo[0])                      # metashield_hf.targets.load_target on the checkpoint",
        "clean, triggered, labels = row_probe(zoo[0])",
        "logits = target(triggered).logits",
        "```",
        "",
        'The `metadata` config (`load_dataset(..., "metadata")`) has the same rows without checkpoints and probes.',
        "",
        "## Contents (accepted models)",
        "",
        *_counts_tables(accepted),
        "## Attacks",
        "",
        "| attack | models | example parameters |",
        "|---|---:|---|",
    ]
    for (attack,), rows in _group(accepted, "attack").items():
        lines.append(f"| {attack} | {len(rows)} | `{rows[0]['attack_params']}` |")
    lines += ["", "## Columns", "", "| column | description |", "|---|---|"]
    lines += [f"| `{k}` | {COLUMN_DOCS.get(k, '')} |" for k in FEATURES]
    lines += [
        "",
        f"Rejected at build time (missed a quality floor): {len(rejects)}. Source data: MNIST, CIFAR-10, "
        "FEMNIST (LEAF), SST-2, MR, AG News and sklearn digits, under their own licences.",
        "",
    ]
    return "\n".join(lines)


def _durability_table(accepted: list[dict[str, Any]]) -> list[str]:
    """FL backdoored rows: ASR right after the last malicious round and ``durability_rounds`` attack-free rounds later."""
    fl = []
    for r in accepted:
        if r["domain"] != "fl" or not r["is_backdoored"]:
            continue
        extra = json.loads(r.get("extra_metrics") or "{}")
        if "asr_after_attack" in extra and "asr_durability" in extra:
            fl.append({**r, "_after": extra["asr_after_attack"], "_later": extra["asr_durability"],
                       "_rounds": extra.get("durability_rounds")})  # fmt: skip
    if not fl:
        return []
    lines = [
        "",
        "## FL backdoor durability (min / median / max)",
        "",
        "ASR of the global model right after the last malicious round, and after N more rounds without any attacker.",
        "",
        "| dataset | attack | n | N | ASR after last attack | ASR N rounds later |",
        "|---|---|---:|---:|---|---|",
    ]
    for (ds, attack), rows in _group(fl, "dataset", "attack").items():
        ns = sorted({r["_rounds"] for r in rows if r["_rounds"] is not None})
        lines.append(
            f"| {ds} | {attack} | {len(rows)} | {'/'.join(map(str, ns)) or '?'} | "
            f"{_stats([r['_after'] for r in rows])} | {_stats([r['_later'] for r in rows])} |"
        )
    return lines


def render_report(
    config,
    accepted: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    planned: int | None = None,
) -> str:
    """The build report (``REPORT.md`` in the zoo folder; the standard zoo's is ``benchmarks/meta/results/standard_zoo.md``): counts, accuracy/ASR distributions, rejects, seconds per model."""
    n = len(accepted)
    n_clean = sum(not r["is_backdoored"] for r in accepted)
    secs = [r["train_seconds"] for r in accepted]
    lines = [
        f"# Zoo report: `{config.name if config else 'zoo'}`",
        "",
        f"- planned: {planned if planned is not None else '?'}; accepted: **{n}** ({n - n_clean} backdoored, "
        f"{n_clean} clean = {n_clean / max(n, 1):.0%}); rejected: {len(rejects)}; failed: {len(failures)}",
        "- per domain: " + ", ".join(f"{d}: {len(v)}" for (d,), v in _group(accepted, "domain").items()),
        f"- floors: ASR >= {config.asr_min if config else '?'} for backdoored models; clean accuracy >= median clean "
        f"model of the same dataset/architecture - {config.acc_margin if config else '?'}, and >= chance + "
        f"{config.chance_margin if config else '?'}",
        f"- build seconds per accepted model (min / median / max): {_stats(secs, '{:.1f}')}; total {sum(secs):.0f} s",
        "",
        "## Counts per domain × attack × architecture",
        "",
        *_counts_tables(accepted),
        "## Clean accuracy and attack success rate (min / median / max)",
        "",
        "For clean models the ASR column is the negative control: the trigger of a sampled attack, no backdoor.",
        "",
        "| domain | attack | n | clean accuracy | ASR |",
        "|---|---|---:|---|---|",
    ]
    for (dom, attack), rows in _group(accepted, "domain", "attack").items():
        lines.append(
            f"| {dom} | {attack} | {len(rows)} | {_stats([r['clean_accuracy'] for r in rows])} | "
            f"{_stats([r['attack_success_rate'] for r in rows])} |"
        )
    lines += [
        "",
        "| domain | dataset | architecture | n | clean accuracy | seconds per model |",
        "|---|---|---|---:|---|---|",
    ]
    for (dom, ds, arch), rows in _group(accepted, "domain", "dataset", "architecture").items():
        lines.append(
            f"| {dom} | {ds} | {arch} | {len(rows)} | {_stats([r['clean_accuracy'] for r in rows])} | "
            f"{_stats([r['train_seconds'] for r in rows], '{:.1f}')} |"
        )
    lines += _durability_table(accepted)
    lines += ["", f"## Rejects ({len(rejects)})", ""]
    if rejects:
        lines += ["| model_id | stage | reason |", "|---|---|---|"]
        lines += [f"| {r.get('model_id')} | {r.get('stage')} | {r.get('reason')} |" for r in rejects]
    lines += ["", f"## Failed builds ({len(failures)})", ""]
    lines += [f"- {f.get('model_id')}: {f.get('error')}" for f in failures]
    return "\n".join(lines) + "\n"
