"""Score the round-cap candidates (``ScreenCalibration(round_cap=c)``, ``--family cap``) or the union candidates
(``ScreenCalibration(round_cap=c, single_round_union=True)``, ``--family union``) offline on saved evidence, and apply
the rule "Capping each round's evidence before it accumulates" or "The union of the single-round and the capped
accumulated screen" (benchmarks/fl/README.md) to the training side.

Reads ``run.py --save_evidence`` files (``<name>.evidence.json``, beside them the run's ``<name>.json`` for each
attack's undefended ASR and the live screen's per-client p-values). Every candidate is the shipped accumulated screen
(the three signals accumulated per client id, the last 5 measured calibration rounds, the running null, target FPR
0.10) with its cap; the cap-free candidate ``none`` is first checked against the run's live current default (every
client's decision in every screened round; p-values to the 4 decimals the run keeps). Where the run also scored the
candidates live (``run.py --variants margin+drift+point~acc~cap<c> ...``), their live figures are listed beside the
offline ones and the rule reads the live ones (the offline rescoring works from evidence rounded to 4 decimals).

    python benchmarks/fl/score_round_cap.py benchmarks/fl/results/screening_round_cap_mnist.evidence.json --rule --name screening_round_cap_mnist_rule
    python benchmarks/fl/score_round_cap.py benchmarks/fl/results/screening_null_match_femnist.evidence.json benchmarks/fl/results/screening_null_match_femnist_fedprox.evidence.json --name screening_round_cap_femnist_offline
    python benchmarks/fl/score_round_cap.py benchmarks/fl/results/screening_round_cap_mnist.evidence.json --family union --rule --name screening_union_mnist_rule
    python benchmarks/fl/score_round_cap.py benchmarks/fl/results/screening_null_match_femnist.evidence.json benchmarks/fl/results/screening_null_match_femnist_fedprox.evidence.json --family union --name screening_union_femnist_offline

Writes ``<out>/<name>.{json,md}`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration

SIGNALS = ("margin_gain", "trigger_drift", "point_margin_gain")
# each rule's candidates (ScreenCalibration settings), in its order of simplicity (the current default first, then the
# larger cap)
FAMILIES: dict[str, dict[str, dict]] = {
    "cap": {"none": {"round_cap": None}, **{f"cap{c}": {"round_cap": float(c)} for c in (6, 4, 3, 2)}},
    "union": {"none": {"round_cap": None},
              **{f"union{c}": {"round_cap": float(c), "single_round_union": True} for c in (6, 4, 3)}},
}  # fmt: skip
TITLES = {"cap": "Round cap", "union": "Union of the single-round and the capped accumulated screen"}
WINDOW = 5  # the shipped screen's calibration rounds (the last 5 measured)
TARGET_FPR = 0.10
RECIPE = "model_replacement_constrained_planted"
PLANTED_ASR = 0.10  # a row whose undefended ASR exceeds this plants a backdoor
MAX_FPR = 0.10  # pooled benign FPR over all rows, and benign FPR on a recipe row
CAUGHT = 0.90
TIE = 0.05
LIVE = "calibrated"  # the run's deployed calibrated screen: the current default in the runs read here
# each candidate's key in a run that scored it live (run.py's CAPPED_VARIANTS); "none" is the current default; the
# union candidates were never scored live
LIVE_KEYS = {"none": LIVE, **{n: f"calibrated:margin+drift+point~acc~{n}" for n in FAMILIES["cap"] if n != "none"}}


def evidence_of(saved: dict) -> ClientEvidence:
    return ClientEvidence.from_raw(saved["raw"])


def calibration(saved: dict, options: dict) -> ScreenCalibration:
    """The shipped screen on the last ``WINDOW`` measured calibration rounds, with a candidate's ``options``."""
    cal = ScreenCalibration(signals=SIGNALS, target_fpr=TARGET_FPR, accumulate=True, null_counts="running",
                            settings=EvidenceSettings(), **options)  # fmt: skip
    for r, rd in enumerate(saved["calibration"][-WINDOW:]):
        cal.update(evidence_of(rd), round_id=r, client_ids=rd["clients"])
    return cal


def score(saved: dict, run: dict, name: str, base: ScreenCalibration) -> tuple[dict, dict]:
    """Per attack, screened from the candidate's calibration ``base``: TPR / FPR with counts offline (``offline``)
    and live where the run scored the candidate (``live``); and how the live current default's decisions compare with
    the offline ones (``none`` only)."""
    rows, check = {}, {"decisions": 0, "differ": 0, "max_abs_p_diff": 0.0}
    for attack_name, attack in saved["attacks"].items():
        cal = ScreenCalibration.from_dict(base.to_dict())  # a fresh memory per trajectory, as in run.py
        malicious = set(attack["malicious"])
        live = run["attacks"][attack_name]["per_round_scores"]
        tp = fn = fp = tn = 0
        for t, rd in enumerate(attack["rounds"]):
            verdict = cal.assess(evidence_of(rd), client_ids=rd["clients"])
            for k, client in enumerate(rd["clients"]):
                bad, flag = client in malicious, bool(verdict.flagged[k])
                tp, fn = tp + (bad and flag), fn + (bad and not flag)
                fp, tn = fp + (not bad and flag), tn + (not bad and not flag)
                if name == "none":
                    p_live = live[t][f"{LIVE}:p"][client]
                    check["decisions"] += 1
                    check["differ"] += int((p_live <= TARGET_FPR) != flag)
                    check["max_abs_p_diff"] = max(check["max_abs_p_diff"], abs(p_live - float(verdict.p_value[k])))
        offline = {"tpr": tp / (tp + fn) if tp + fn else None, "fpr": fp / (fp + tn) if fp + tn else None,
                   "tp": tp, "fn": fn, "fp": fp, "tn": tn}  # fmt: skip
        key = LIVE_KEYS.get(name)
        rows[attack_name] = {"offline": offline,
                             "live": run["attacks"][attack_name]["detection"].get(key) if key else None}  # fmt: skip
    return rows, check


def figures(result: dict, source: str) -> dict:
    """candidate -> setting -> attack -> TPR / FPR with counts, from ``source`` (``"live"`` or ``"offline"``)."""
    return {n: {s: {a: d[source] for a, d in rows.items()} for s, rows in per.items()}
            for n, per in result["candidates"].items()}  # fmt: skip


def rule(result: dict, candidates: dict[str, dict]) -> tuple[list[dict], str | None, str]:
    """The rule over every setting of ``result``: per candidate its figures and why it is out; the winner; the
    figures it read (live where every candidate was scored live, else offline)."""
    live = all(d["live"] is not None for per in result["candidates"].values() for rows in per.values()
               for d in rows.values())  # fmt: skip
    source = "live" if live else "offline"
    every = figures(result, source)
    table = []
    for name in candidates:
        fp = tn = 0
        planted, tprs, why = [], [], []
        for setting, rows in every[name].items():
            for attack, d in rows.items():
                fp, tn = fp + d["fp"], tn + d["tn"]
                tprs.append(d["tpr"])
                if result["asr"][setting][attack] > PLANTED_ASR:
                    planted.append(d["tpr"])
                if attack == RECIPE and d["fpr"] > MAX_FPR:
                    why.append(f"recipe FPR {d['fpr']:.2f} ({setting})")
                d0 = every["none"][setting][attack]
                if d0["tpr"] >= CAUGHT and d["tpr"] < CAUGHT:
                    why.append(f"loses {setting}/{attack} ({d0['tpr']:.2f} -> {d['tpr']:.2f})")
        pooled = fp / (fp + tn)
        if pooled > MAX_FPR:
            why.append(f"pooled FPR {pooled:.3f}")
        table.append({"candidate": name, "pooled_fpr": pooled, "min_planted_tpr": min(planted),
                      "mean_tpr": float(np.mean(tprs)), "out": why})  # fmt: skip
    alive = [r for r in table if not r["out"]]
    if not alive:
        return table, None, source
    best = max(r["min_planted_tpr"] for r in alive)
    tied = [r for r in alive if r["min_planted_tpr"] >= best - TIE - 1e-9]
    order = list(candidates)
    tied.sort(key=lambda r: (-r["mean_tpr"], r["pooled_fpr"], order.index(r["candidate"])))
    return table, tied[0]["candidate"], source


def cell(d: dict | None) -> str:
    if d is None:
        return "–"
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    return f"{f(d['tpr'])} / {f(d['fpr'])}"


def markdown(result: dict) -> str:
    names = list(result["candidates"])
    family = result.get("family", "cap")
    options = ", ".join(f"{n} `{o}`" for n, o in result.get("options", {}).items())
    lines = [
        f"# {TITLES[family]}: every candidate, TPR / FPR ({', '.join(result['sources'])})", "",
        ("Each candidate: `ScreenCalibration(round_cap=c)`" if family == "cap"
         else f"Each candidate: `ScreenCalibration(**options)` ({options})")
        + ", otherwise the shipped accumulated screen (three signals, "
        f"last {WINDOW} calibration rounds, running null, target FPR {TARGET_FPR}); *offline*: rescored here from the "
        "saved raw evidence (4 decimals); *live*: scored in the run itself (where it scored the candidate).", "",
    ]  # fmt: skip
    for setting, check in result["reproduction"].items():
        lines.append(f"- {setting}: offline `none` against the live current default: {check['differ']} of "
                     f"{check['decisions']} decisions differ, largest p-value difference {check['max_abs_p_diff']:.4f}")  # fmt: skip
    lines.append("")
    for setting, asr in result["asr"].items():
        lines += [f"## {setting}", "", "| attack | undefended ASR | " + " | ".join(f"{n} offline | {n} live" for n in names)
                  + " |", "|---|---|" + "---|---|" * len(names)]  # fmt: skip
        for attack in asr:
            cells = [f"{cell(d['offline'])} | {cell(d['live'])}"
                     for d in (result["candidates"][n][setting][attack] for n in names)]  # fmt: skip
            lines.append(f"| {attack} | {asr[attack]:.2f} | " + " | ".join(cells) + " |")
        th = result["thresholds"][setting]
        lines += ["", "Thresholds at count 1 (offline): " + ", ".join(f"{n} {th[n]:.2f}" for n in names)]
        single = result.get("single_round_thresholds", {}).get(setting, {})
        if single:
            lines.append("Thresholds of the single-round half (unions, at half the target FPR): "
                         + ", ".join(f"{n} {v:.2f}" for n, v in single.items()))  # fmt: skip
        lines.append("")
    if result.get("rule"):
        lines += [f"## The rule (training side; {result['rule']['source']} figures)", "",
                  "| candidate | pooled benign FPR | min TPR (planted rows) | mean TPR (all rows) | out |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in result["rule"]["table"]:
            lines.append(f"| {r['candidate']} | {r['pooled_fpr']:.3f} | {r['min_planted_tpr']:.2f} | "
                         f"{r['mean_tpr']:.3f} | {'; '.join(r['out']) or '–'} |")  # fmt: skip
        lines += ["", f"Chosen: `{result['rule']['chosen']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evidence", type=Path, nargs="+", help="<name>.evidence.json files of run.py")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cap", help="which rule's candidates")
    parser.add_argument("--rule", action="store_true", help="apply the rule (the training side)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/fl/results"))
    args = parser.parse_args(argv)
    candidates = FAMILIES[args.family]
    result: dict = {"family": args.family, "options": candidates, "sources": [],
                    "candidates": {n: {} for n in candidates}, "asr": {}, "reproduction": {}, "thresholds": {},
                    "single_round_thresholds": {}}  # fmt: skip
    for path in args.evidence:
        result["sources"].append(path.as_posix())
        run_file = path.with_name(path.name.replace(".evidence.json", ".json"))
        runs = {f"{s['dataset']}/{s['algorithm']}": s for s in json.loads(run_file.read_text())["settings"]}
        for setting, saved in json.loads(path.read_text()).items():
            run = runs[setting]
            result["asr"][setting] = {a: run["attacks"][a]["outcome"]["none"]["asr"] for a in saved["attacks"]}
            result["thresholds"][setting] = {}
            for name, options in candidates.items():
                cal = calibration(saved, options)
                rows, check = score(saved, run, name, cal)
                result["candidates"][name][setting] = rows
                result["thresholds"][setting][name] = cal.threshold()
                if cal.single_round_union:
                    single = result["single_round_thresholds"].setdefault(setting, {})
                    single[name] = cal.threshold(single_round=True)
                if name == "none":
                    result["reproduction"][setting] = check
    if args.rule:
        table, chosen, source = rule(result, candidates)
        result["rule"] = {"table": table, "chosen": chosen, "source": source}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
