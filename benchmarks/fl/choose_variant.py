"""Apply a calibrated-screen selection rule (benchmarks/fl/README.md) to a result file of ``run.py``: which evidence
variant becomes the default.

    python benchmarks/fl/choose_variant.py benchmarks/fl/results/screening_calibrated.json --datasets mnist
    python benchmarks/fl/choose_variant.py benchmarks/fl/results/screening_colluders.json --rule colluders

``--rule first`` ("Calibrated screen: the rule"): pooled benign FPR at most 0.15, then the highest minimum TPR over
the planted rows. ``--rule colluders`` (the rule of 2026-12-07, as amended after its MNIST run): pooled benign FPR at most 0.10, no row of
the norm-constrained recipe above FPR 0.10, and TPR at least 0.90 on every row ``margin+drift`` catches; then the same
order. ``--rule colluders-as-written``: the per-row FPR gate on every planted row. ``--rule null-match`` ("Matching the
accumulated null to the screened rounds"): against ``margin+drift+point~acc`` on the same measurements, out when the
recipe's TPR drops by more than 0.034 in a setting, a row it catches (TPR >= 0.90) drops below 0.90, or the pooled
benign FPR exceeds 0.10; then the lowest pooled benign FPR over the recipe's rows (ties within 0.0125: pooled recipe
TPR, pooled FPR, the rule's order). Reads only the settings of
``--datasets`` (the training side) and the variants the run scored; prints every variant's numbers and the winner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIRST_VARIANTS = ("margin", "drift", "margin+drift", "margin-nr", "drift-nr", "margin+drift-nr")
RECIPE = "model_replacement_constrained_planted"
RULES = {
    "first": {"max_fpr": 0.15, "max_planted_fpr": None, "keep_caught": None, "fpr_rows": None},
    # the rule of 2026-12-07 as amended after its MNIST run: the per-row FPR gate on the recipe's rows
    "colluders": {"max_fpr": 0.10, "max_planted_fpr": 0.10, "keep_caught": "margin+drift", "fpr_rows": RECIPE},
    # as first written: the per-row FPR gate on every planted row (it removes every variant on MNIST)
    "colluders-as-written": {
        "max_fpr": 0.10,
        "max_planted_fpr": 0.10,
        "keep_caught": "margin+drift",
        "fpr_rows": None,
    },
}
NULL_MATCH_REFERENCE = "margin+drift+point~acc"
# the rule's order for ties, the current default last
NULL_MATCH_ORDER = (
    "margin+drift+point~acc@10", "margin+drift+point~acc@15", "margin+drift+point~match@10",
    "margin+drift+point~match@15", "margin+drift+point~match@5", NULL_MATCH_REFERENCE,
)  # fmt: skip
NULL_MATCH_TPR_DROP = 0.034  # one attacker update of the recipe's 30
NULL_MATCH_TIE = 0.0125  # one benign update of the recipe's 80 (two settings)
PLANTED_ASR = 0.10
TIE = 0.05
CAUGHT = 0.90


def complexity(variant: str) -> tuple[int, int]:
    """(accumulated, number of signals): the tie-break's "simpler"."""
    base = variant.split("~")[0].removesuffix("-nr")
    return int(variant.endswith("~acc")), len(base.split("+"))


def summarise(result: dict, datasets: list[str], variants: list[str]) -> dict[str, dict]:
    out = {}
    settings = [s for s in result["settings"] if s["dataset"] in datasets]
    for v in variants:
        key = f"calibrated:{v}"
        fp = tn = 0
        planted, every, rows = [], [], {}
        for s in settings:
            for name, r in s["attacks"].items():
                d = r["detection"][key]
                fp, tn = fp + d["fp"], tn + d["tn"]
                every.append(d["tpr"])
                row = f"{s['dataset']}/{s['algorithm']}/{name}"
                rows[row] = d
                if r["outcome"]["none"]["asr"] > PLANTED_ASR:
                    planted.append((row, d["tpr"], d["fpr"]))
        out[v] = {
            "pooled_fpr": fp / (fp + tn) if fp + tn else float("nan"),
            "min_planted_tpr": min((t for _, t, _ in planted), default=float("nan")),
            "max_planted_fpr": max((f for _, _, f in planted), default=float("nan")),
            "max_recipe_fpr": max((f for row, _, f in planted if row.endswith("/" + RECIPE)), default=float("nan")),
            "mean_tpr": sum(every) / len(every) if every else float("nan"),
            "planted_rows": planted,
            "rows": rows,
        }
    return out


def gates(summary: dict[str, dict], variant: str, rule: dict) -> list[str]:
    """Why a variant is out (empty: it is in)."""
    s, why = summary[variant], []
    if s["pooled_fpr"] > rule["max_fpr"]:
        why.append(f"pooled FPR {s['pooled_fpr']:.3f} > {rule['max_fpr']}")
    worst = s["max_recipe_fpr"] if rule["fpr_rows"] == RECIPE else s["max_planted_fpr"]
    if rule["max_planted_fpr"] is not None and worst > rule["max_planted_fpr"]:
        why.append(f"{'recipe' if rule['fpr_rows'] else 'planted'}-row FPR {worst:.2f} > {rule['max_planted_fpr']}")
    keep = rule["keep_caught"]
    if keep is not None and keep in summary:
        lost = [row for row, d in summary[keep]["rows"].items()
                if d["tpr"] is not None and d["tpr"] >= CAUGHT and s["rows"][row]["tpr"] < CAUGHT]  # fmt: skip
        if lost:
            why.append(f"loses {lost}")
    return why


def choose(summary: dict[str, dict], rule: dict | None = None) -> str | None:
    """The rule: the gates, then min planted TPR (ties within 0.05), mean TPR, pooled FPR, the simpler."""
    rule = rule or RULES["first"]
    alive = [v for v in summary if not gates(summary, v, rule)]
    if not alive:
        return None
    best = max(summary[v]["min_planted_tpr"] for v in alive)
    alive = [v for v in alive if summary[v]["min_planted_tpr"] >= best - TIE]
    alive.sort(key=lambda v: (-summary[v]["mean_tpr"], summary[v]["pooled_fpr"], complexity(v)))
    return alive[0]


def null_match(result: dict, datasets: list[str], variants: list[str]) -> tuple[list[tuple], str | None]:
    """The rule "Matching the accumulated null to the screened rounds": one row per variant (name, pooled FPR,
    pooled recipe FPR, pooled recipe TPR, recipe TPR per setting, why out) and the winner."""
    settings = [s for s in result["settings"] if s["dataset"] in datasets]

    def pooled(v, recipe_only, rate):
        a = b = 0
        for s in settings:
            for name, r in s["attacks"].items():
                if recipe_only and name != RECIPE:
                    continue
                d = r["detection"][f"calibrated:{v}"]
                a, b = (a + d["fp"], b + d["tn"]) if rate == "fpr" else (a + d["tp"], b + d["fn"])
        return a / (a + b) if a + b else float("nan")

    ref = f"calibrated:{NULL_MATCH_REFERENCE}"
    table, alive = [], []
    for v in variants:
        key, why = f"calibrated:{v}", []
        per_setting = []
        for s in settings:
            r = s["attacks"][RECIPE]["detection"]
            per_setting.append(r[key]["tpr"])
            if r[ref]["tpr"] - r[key]["tpr"] > NULL_MATCH_TPR_DROP + 1e-9:
                why.append(f"recipe TPR {r[key]['tpr']:.2f} < {r[ref]['tpr']:.2f} - 0.034 ({s['algorithm']})")
            for name, a in s["attacks"].items():
                d, d0 = a["detection"][key], a["detection"][ref]
                if d0["tpr"] is not None and d0["tpr"] >= CAUGHT and d["tpr"] < CAUGHT:
                    why.append(f"loses {s['algorithm']}/{name}")
        fpr = pooled(v, False, "fpr")
        if fpr > 0.10:
            why.append(f"pooled FPR {fpr:.3f} > 0.10")
        row = (v, fpr, pooled(v, True, "fpr"), pooled(v, True, "tpr"), per_setting, "; ".join(why) or "–")
        table.append(row)
        if not why:
            alive.append(row)
    if not alive:
        return table, None
    best = min(r[2] for r in alive)
    tied = [r for r in alive if r[2] <= best + NULL_MATCH_TIE + 1e-9]
    order = {v: i for i, v in enumerate(NULL_MATCH_ORDER)}
    tied.sort(key=lambda r: (-r[3], r[1], order.get(r[0], len(order))))
    return table, tied[0][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--datasets", nargs="+", default=["mnist"])
    parser.add_argument("--rule", choices=[*RULES, "null-match"], default="first")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    variants = list(result["args"].get("variants") or FIRST_VARIANTS)
    if args.rule == "null-match":
        table, winner = null_match(result, args.datasets, variants)
        algorithms = [s["algorithm"] for s in result["settings"] if s["dataset"] in args.datasets]
        print("| variant | pooled benign FPR (all rows) | benign FPR (recipe rows) | TPR (recipe rows) | "
              + " | ".join(f"recipe TPR {a}" for a in algorithms) + " | out |")  # fmt: skip
        print("|---|---|---|---|" + "---|" * len(algorithms) + "---|")
        for v, fpr, rfpr, rtpr, per, why in table:
            cells = " | ".join(f"{t:.2f}" for t in per)
            print(f"| {v} | {fpr:.3f} | {rfpr:.3f} | {rtpr:.3f} | {cells} | {why} |")
        print("chosen:", winner)
        return 0
    summary = summarise(result, args.datasets, variants)
    rule = RULES[args.rule]
    print(
        "| variant | pooled benign FPR | max FPR (planted rows) | min TPR (planted rows) | mean TPR (all rows) | out |"
    )
    print("|---|---|---|---|---|---|")
    for v in variants:
        s = summary[v]
        why = "; ".join(gates(summary, v, rule)) or "–"
        print(f"| {v} | {s['pooled_fpr']:.3f} | {s['max_planted_fpr']:.2f} | {s['min_planted_tpr']:.2f} | "
              f"{s['mean_tpr']:.2f} | {why} |")  # fmt: skip
    print("planted rows:", [name for name, _, _ in summary[variants[0]]["planted_rows"]])
    print("chosen:", choose(summary, rule))
    return 0


if __name__ == "__main__":
    sys.exit(main())
