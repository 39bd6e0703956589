"""Fit the scan head from the committed scan records, as shipped: ``src/metashield_hf/default_detector/scan_head.json``.

Reads ``configs/head.yaml`` and fits what it says with [`fit_head_from_spec`]: the image/tensor head and the text
parts on the train records of the standard zoo and of the train zoos; then each image variant part (``image/blend``,
``image/source``) chosen among its candidate signal sets and L2 strengths by repeated cross-validation on its train
records, with a verdict threshold that flags ``target_fpr`` of the train clean models. Held-out and check records play no part.
Writes the head (``--out``) and ``results/head_fit.md`` (the choices and their cross-validated AUROCs).

    python benchmarks/scan/fit_head.py                 # rebuild into results/, compare with the shipped head
    python benchmarks/scan/fit_head.py --ship          # and copy it over the shipped head
"""

from __future__ import annotations

import filecmp
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from metashield_hf.scan import DEFAULT_SCAN_HEAD, cv_head_c, fit_head_from_spec

HERE = Path(__file__).resolve().parent


@dataclass
class FitHeadArguments:
    config: str = field(default=str(HERE / "configs" / "head.yaml"), metadata={"help": "Which records fit what."})
    records: str = field(default=str(HERE / "results" / "records"), metadata={"help": "Folder of the records."})
    out: str = field(default=str(HERE / "results" / "scan_head.json"), metadata={"help": "Where the head goes."})
    report: str = field(default=str(HERE / "results" / "head_fit.md"), metadata={"help": "The choices, as markdown."})
    ship: bool = field(default=False, metadata={"help": "Copy the fitted head over the shipped one."})
    cv_report: bool = field(
        default=True,
        metadata={"help": "Also cross-validate the base head's C for the report (minutes; no effect on it)."},
    )


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(FitHeadArguments).parse_args_into_dataclasses(args=argv)
    spec = yaml.safe_load(Path(args.config).read_text())
    fit = fit_head_from_spec(spec, args.records)
    base, train = spec["base"], fit.train
    text_signals, large = tuple(base["text_signals"]), tuple(base["large_vocabulary_signals"])
    lines = [
        "# How the shipped scan head is fit",
        "",
        "Written by `python benchmarks/scan/fit_head.py` from the committed records and `configs/head.yaml`; only train "
        "models take part.",
        "",
        f"- image/tensor head and text parts: {len(train)} train records "
        f"({sum(r['is_backdoored'] for r in train)} backdoored), C={base['c']:g}, text parts on {list(text_signals)}, "
        f"large-vocabulary part on {list(large)}",
    ]
    if args.cv_report:
        lines.append(
            "- their C by cross-validation (mean AUROC per domain): "
            + "; ".join(
                f"C={c:g}: " + ", ".join(f"{d} {a:.3f}" for d, a in aucs.items())
                for c, aucs in cv_head_c(train, text_signals, large_signals=large).items()
            )
        )
    for name, choice in fit.parts.items():
        n = len(spec["parts"][name]["base"])
        lines += [
            "",
            f"## `image/{name}`",
            "",
            f"- {len(fit.part_rows[name])} train records; candidates (base + ...): "
            + "; ".join(f"{list(s)[n:]} C={c:g} {a:.3f}" for (s, c), a in choice.candidates.items()),
        ]
        if choice.criterion != "cv":
            lines += [
                f"- chosen by {choice.criterion} (mean AUROC over held-out attacks); per candidate: "
                + "; ".join(f"{list(s)[n:]} C={c:g} {a:.3f}" for (s, c), a in choice.scores.items()),
                "- per held-out attack, the chosen candidate: "
                + ", ".join(f"{k} {v:.3f}" for k, v in choice.per_attack[(choice.signals, choice.c)].items()),
            ]
        lines.append(
            f"- chosen: base + {list(choice.signals)[n:]} at C={choice.c:g} (cross-validated AUROC {choice.cv_auroc:.3f}"
            + (f", {choice.criterion} {choice.score:.3f}" if choice.criterion != "cv" else "")
            + f"); verdict threshold {choice.part.threshold:.3f} (flags {spec['parts'][name]['target_fpr']:.0%} of the "
            "train clean models)"
        )
        if name in fit.declined:
            lines.append(f"- **not in the head**: {fit.declined[name]}")
        if name in fit.targets:
            t = fit.targets[name]
            lines += [
                "- target chooser, leave-one-attack-out target accuracy (mean over attacks) per candidate: "
                + "; ".join(f"{list(s)} C={c:g} {a:.3f}" for (s, c), a in t.scores.items()),
                "- per held-out attack, the best candidate: "
                + ", ".join(f"{k} {v:.3f}" for k, v in t.per_attack[(t.names, t.c)].items()),
                f"- target chooser: {list(t.names)} at C={t.c:g} ({t.scores[(t.names, t.c)]:.3f} against "
                f"{t.baseline:.3f} for the anomaly index alone); "
                + (f"weights {t.weights}" if t.weights else "**not shipped** (gain below min_gain)"),
            ]
    head = fit.head
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head.save(out)
    same = filecmp.cmp(out, DEFAULT_SCAN_HEAD, shallow=False)
    lines += ["", f"The fitted head is {'byte-identical to' if same else 'DIFFERENT from'} the shipped one.", ""]
    Path(args.report).write_text("\n".join(lines))
    print("\n".join(lines))
    if args.ship and not same:
        shutil.copyfile(out, DEFAULT_SCAN_HEAD)
        print(f"copied to {DEFAULT_SCAN_HEAD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
