"""``benchmark.md`` and its PNG plots from the protocols' records (every number comes from a run; nothing typed in)."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..baselines import BASELINES
from .protocols import ROC_GRID, aggregate, table

NAMES = {"auroc": "AUROC", "tpr@5fpr": "TPR@5%FPR", "tpr@1fpr": "TPR@1%FPR", "fpr": "FPR (calibrated)"}


def fmt(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    return "–" if n == 0 or math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(
    records: Sequence[dict], by: str | None, metrics: Sequence[str] = ("auroc", "tpr@5fpr")
) -> list[str]:
    """Rows = methods, columns = values of ``by`` (+ all); a cell is ``metric1 / metric2`` mean ± std over seeds."""
    tab = table(records, by, metrics)
    found = {g for per in tab.values() for g in per} - {"all"}
    keys = sorted(found, key=lambda g: (0, int(g), "") if g.isdigit() else (1, 0, g)) + ["all"]
    if by is None:
        keys = ["all"]
    # a column with no value at all (e.g. clean models under AUROC, which needs triggered inputs) is left out
    keys = [k for k in keys if any(per.get(k, {}).get(m, (0, 0, 0))[2] for per in tab.values() for m in metrics)]
    head = " / ".join(NAMES.get(m, m) for m in metrics)
    lines = [f"| method | {' | '.join(f'{k}: {head}' for k in keys)} |", "|---|" + "---|" * len(keys)]
    for method, per in tab.items():
        cells = [" / ".join(fmt(per[k][m]) for m in metrics) if k in per else "–" for k in keys]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    n_models = len({r["model_id"] for r in records})
    seeds = len({r["seed"] for r in records})
    return lines + [
        "",
        f"*{n_models} models × {seeds} seeds; mean ± std over seeds of the per-seed mean over models.*",
    ]


def headline(records: Sequence[dict], k: int) -> tuple[list[str], dict]:
    """MetaShield vs the best baseline per domain (best = highest mean AUROC in that domain) at ``k``."""
    recs = [r for r in records if r["k"] == k]
    tab = table(recs, "domain", ("auroc", "tpr@5fpr"))
    domains = sorted({r["domain"] for r in recs}) + ["all"]
    lines = [
        "| domain | MetaShield TPR@5%FPR | MetaShield AUROC | best baseline | baseline TPR@5%FPR | baseline AUROC |",
        "|---|---|---|---|---|---|",
    ]
    data = {}
    for d in domains:
        ms = tab.get("metashield", {}).get(d)
        others = {m: per[d] for m, per in tab.items() if m != "metashield" and d in per}
        if not ms or not others:
            continue
        best = max(others, key=lambda m: others[m]["auroc"][0])
        b = others[best]
        lines.append(
            f"| {d} | {fmt(ms['tpr@5fpr'])} | {fmt(ms['auroc'])} | {best} | {fmt(b['tpr@5fpr'])} | {fmt(b['auroc'])} |"
        )
        data[d] = {"metashield": ms, "best_baseline": best, "baseline": b}
    return lines, data


# ---- plots ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_few_shot(records: Sequence[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in records))
    ks = sorted({r["k"] for r in records})
    for ax, metric in zip(axes, ("auroc", "tpr@5fpr"), strict=True):
        for m in methods:
            stats = [aggregate([r for r in records if r["method"] == m and r["k"] == k], metric) for k in ks]
            ax.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=m,
                        linewidth=2.5 if m == "metashield" else 1.2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib_null_formatter())
        ax.set_xlabel("clean samples k")
        ax.set_ylabel(NAMES[metric])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Few-shot curve, held-out models (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matplotlib_null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def plot_roc(records: Sequence[dict], path: Path, top: int = 3) -> None:
    """Mean ROC per domain (TPR averaged over models and seeds at each FPR), MetaShield and the best methods."""
    plt = _plt()
    recs = [r for r in records if "roc" in r]
    domains = sorted({r["domain"] for r in recs})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 4), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        rd = [r for r in recs if r["domain"] == d]
        by_m = defaultdict(list)
        for r in rd:
            by_m[r["method"]].append(r["roc"])
        ranked = sorted(by_m, key=lambda m: -np.mean([aggregate([r for r in rd if r["method"] == m], "auroc")[0]]))
        shown = ["metashield"] + [m for m in ranked if m != "metashield"][:top]
        for m in shown:
            if m in by_m:
                ax.plot(ROC_GRID, np.mean(by_m[m], 0), label=m, linewidth=2.5 if m == "metashield" else 1.2)
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_title(d)
        ax.set_xlabel("FPR (clean inputs)")
        ax.set_ylabel("TPR (triggered inputs)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(heat: dict[str, list[dict]], path: Path, metric: str = "auroc") -> np.ndarray:
    plt = _plt()
    rows = list(heat)
    cols = sorted({r["domain"] for recs in heat.values() for r in recs})
    mat = np.array([[aggregate([r for r in heat[a] if r["domain"] == c], metric)[0] for c in cols] for a in rows])
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(cols), 1 + 0.7 * len(rows)))
    im = ax.imshow(mat, cmap="viridis", vmin=np.nanmin(mat) - 0.02, vmax=1.0)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", color="w" if mat[i, j] < 0.9 else "k")
    ax.set_xticks(range(len(cols)), [f"test: {c}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"train: {r}" for r in rows])
    fig.colorbar(im, ax=ax, label=NAMES[metric])
    ax.set_title(f"Cross-domain {NAMES[metric]} (held-out models)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return mat


def plot_bars(sections: Sequence[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.2), squeeze=False)
    for ax, sec in zip(axes[0], sections, strict=True):
        methods = list(dict.fromkeys(r["method"] for r in sec["records"]))
        x = np.arange(len(methods))
        for i, metric in enumerate(("auroc", "tpr@5fpr")):
            st = [aggregate([r for r in sec["records"] if r["method"] == m], metric) for m in methods]
            ax.bar(x + (i - 0.5) * 0.38, [s[0] for s in st], 0.38, yerr=[s[1] for s in st], capsize=3,
                   label=NAMES[metric])  # fmt: skip
        ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(sec["title"], fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_group_transfer(rows: list[dict], path: Path) -> None:
    plt = _plt()
    groups = [r["group"] for r in rows]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(x - 0.2, [r["in_domain_drop"] for r in rows], 0.4, label="in-domain drop")
    ax.bar(
        x + 0.2, [r["cross_domain_drop"] for r in rows], 0.4, label="cross-domain drop (mean over held-out domains)"
    )
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(x, groups)
    ax.set_ylabel("AUROC drop when the group is removed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- analysis -------------------------------------------------------------------------------------------------------
def group_transfer(drops: Sequence[dict], ablation: Sequence[dict]) -> list[dict]:
    """Per ψ group: AUROC drop when removed, in-domain (ablation detectors) and on each held-out domain (LODO).

    The drop is ``AUROC(all groups) − AUROC(without the group)`` on the same models and episodes; positive = the
    group carries signal that the other groups do not.
    """
    ref_in = aggregate([r for r in ablation if r["method"] == "metashield[all_groups]"], "auroc")[0]
    out = []
    domains = sorted({r["heldout"] for r in drops})
    for g in sorted({r["dropped"] for r in drops} - {"none"}):
        row = {"group": g}
        row["in_domain_drop"] = ref_in - aggregate([r for r in ablation if r["method"] == f"metashield[drop_{g}]"],
                                                   "auroc")[0]  # fmt: skip
        per = []
        for d in domains:
            base = aggregate([r for r in drops if r["heldout"] == d and r["dropped"] == "none"], "auroc")[0]
            without = aggregate([r for r in drops if r["heldout"] == d and r["dropped"] == g], "auroc")[0]
            row[f"drop_{d}"] = base - without
            per.append(base - without)
        row["cross_domain_drop"] = float(np.mean(per))
        out.append(row)
    return out


def _analysis_text(rows: list[dict], domains: list[str]) -> list[str]:
    """Sentences that only restate the measured drops (signs and ranking), so they cannot drift from the numbers."""
    ranked = sorted(rows, key=lambda r: -r["cross_domain_drop"])
    lines = []
    carriers = [r for r in ranked if r["cross_domain_drop"] > 0.005]
    if carriers:
        lines.append(
            "Removing "
            + ", ".join(f"`{r['group']}` (−{r['cross_domain_drop']:.3f})" for r in carriers)
            + " lowers the AUROC on an unseen domain, averaged over the held-out domains: "
            + ("this group carries" if len(carriers) == 1 else "these groups carry")
            + " signal that transfers across domains, evidence for domain-invariant backdoor signatures in what "
            + ("it measures." if len(carriers) == 1 else "they measure.")
        )
    harmless = [r for r in ranked if r["cross_domain_drop"] <= 0.005]
    if harmless:
        lines.append(
            "Removing "
            + ", ".join(f"`{r['group']}` ({-r['cross_domain_drop']:+.3f})" for r in harmless)
            + " does not lower it (within 0.005, or it rises): on an unseen domain these groups add nothing the "
            "others lack, or are domain-specific."
        )
    for r in ranked:
        consistent = all(r[f"drop_{d}"] > 0 for d in domains)
        if consistent and r["cross_domain_drop"] > 0.005:
            lines.append(f"`{r['group']}` helps on every held-out domain ({', '.join(domains)}).")
    lines.append(
        "Caveats: one training seed per detector, short runs, and per-domain differences of a few thousandths "
        "are within the seed-to-seed spread of the episodes; the per-domain columns show where a group matters."
    )
    return lines


def write_report(results: dict, facts: dict, out: str | Path, md_paths: Sequence[str | Path] = ()) -> dict:
    """Write ``benchmark.md`` and the PNGs into ``out`` (and the markdown to ``md_paths`` too, image links
    rewritten relative to each). Returns the summary (also what ``summary.json`` holds)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, Path] = {}
    summary: dict = {"facts": facts}
    body: list[str] = []
    k0 = facts["k"][0]

    if "in_domain" in results:
        recs = results["in_domain"]["sections"][0]["records"]
        live = [s["records"] for s in results.get("live_baselines", {}).get("sections", [])]
        seen = {(r["method"], r["model_id"], r["k"], r["seed"]) for r in recs}
        extra = [r for rs in live for r in rs if (r["method"], r["model_id"], r["k"], r["seed"]) not in seen]
        lines, data = headline(recs + extra, k0)
        summary["headline"] = data
        body += [f"## Headline: MetaShield vs the best baseline per domain, k = {k0} clean samples", ""]
        body += [
            "Held-out models of the meta-training split; best baseline = the highest mean AUROC in that domain among "
            "the pooled transfer detector and every baseline (STRIP included when protocol `live_baselines` ran).",
            "",
            *lines,
            "",
        ]
        pngs["roc"] = out / "roc_curves.png"
        plot_roc([r for r in recs + extra if r["k"] == k0], pngs["roc"])
    body_sections = []
    for name, res in results.items():
        if name == "cost":
            continue
        body_sections += [f"## Protocol `{name}`", "", f"*{res.get('seconds', 0):.0f} s.*", ""]
        if res.get("note"):
            body_sections += [f"Note: {res['note']}.", ""]
        for sec in res.get("sections", []):
            metrics = sec.get("metrics", ("auroc", "tpr@5fpr"))
            body_sections += [f"### {sec['title']}", ""]
            if sec.get("note"):
                body_sections += [sec["note"], ""]
            body_sections += markdown_table(sec["records"], sec["by"], metrics) + [""]
            if sec.get("curve"):
                pngs["few_shot"] = out / "few_shot_curve.png"
                plot_few_shot(sec["records"], pngs["few_shot"])
                body_sections += ["![few-shot curve]({few_shot})", ""]
            if sec.get("headline"):
                body_sections += ["![ROC curves]({roc})", ""]
            clean = [r for r in sec["records"] if "control_auroc" in r]
            if clean and sec.get("headline"):
                body_sections += [
                    "Clean models (negative control: the trigger pattern without a backdoor; ideal AUROC 0.5):",
                    "",
                    *markdown_table(clean, None, ("control_auroc",)),
                    "",
                ]
        if name == "ablations":
            pngs["ablations"] = out / "ablation_bars.png"
            plot_bars(res["sections"], pngs["ablations"])
            body_sections += ["![ablations]({ablations})", ""]
        if name == "cross_domain":
            pngs["heatmap"] = out / "cross_domain_heatmap.png"
            mat = plot_heatmap(res["heatmap"], pngs["heatmap"])
            summary["cross_domain_heatmap"] = {"rows": list(res["heatmap"]), "auroc": mat.tolist()}
            body_sections += ["![cross-domain heat-map]({heatmap})", ""]
    if "cross_domain" in results and "ablations" in results:
        abl = results["ablations"]["sections"][1]["records"]
        rows = group_transfer(results["cross_domain"]["group_transfer"], abl)
        summary["group_transfer"] = rows
        domains = sorted({r["heldout"] for r in results["cross_domain"]["group_transfer"]})
        pngs["transfer"] = out / "group_transfer.png"
        plot_group_transfer(rows, pngs["transfer"])
        body += [
            "## Analysis: which ψ feature groups transfer across domains",
            "",
            "AUROC drop when one group is removed (detector retrained without it), k = "
            f"{k0}: in-domain (held-out models, all domains trained) and cross-domain (the held-out domain, trained on "
            "the other two). Positive = the group carries signal the others lack.",
            "",
            "| group | in-domain drop | "
            + " | ".join(f"cross-domain drop, unseen {d}" for d in domains)
            + " | mean cross-domain drop |",
            "|---|---:|" + "---:|" * len(domains) + "---:|",
        ]
        for r in rows:
            body.append(
                f"| {r['group']} | {r['in_domain_drop']:+.3f} | "
                + " | ".join(f"{r[f'drop_{d}']:+.3f}" for d in domains)
                + f" | {r['cross_domain_drop']:+.3f} |"
            )
        body += ["", *_analysis_text(rows, domains), "", "![group transfer]({transfer})", ""]
    if "adaptive" in results:
        body += render_adaptive(results["adaptive"]) + [""]
    if "cost" in results:
        body += render_cost(results["cost"]) + [""]
    body += body_sections
    body += ["## Baselines: where the few-shot support is less than the method was designed for", ""]
    body += [f"- `{n}`: {BASELINES.get(n).needs_note}" for n in BASELINES.list() if BASELINES.get(n).needs_note]
    body += [f"- {note}" for note in facts.get("notes", [])] + [""]

    head = [
        "# MetaShield benchmark",
        "",
        "Written by `metashield evaluate` from the runs listed below; every number and plot comes from them.",
        "",
        *[f"- {k}: {v}" for k, v in facts.items() if k not in ("notes", "k")],
        f"- k (protocols other than the few-shot curve): {', '.join(map(str, facts['k']))}",
        "",
        "Metrics per episode (one held-out model, k clean support samples, 32 clean + 32 triggered query inputs, "
        "identical for every method): `AUROC` triggered vs clean query; `TPR@5%FPR` detection rate on triggered "
        "inputs at the threshold that flags 5% of the clean query (separability, threshold-free); "
        "`FPR (calibrated)` MetaShield's false-positive rate at the threshold it sets from the k clean samples alone. "
        "Backdoored models only, except the clean-model control.",
        "",
    ]
    text = "\n".join(head + body) + "\n"
    summary["pngs"] = {k: p.name for k, p in pngs.items()}

    def render(at: Path) -> str:
        page = text
        for key in ("few_shot", "roc", "ablations", "heatmap", "transfer"):
            page = page.replace(
                f"]({{{key}}})", f"]({os.path.relpath(pngs[key], at.parent)})" if key in pngs else "]()"
            )
        return page

    (out / "benchmark.md").write_text(render(out / "benchmark.md"))
    for p in md_paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text(render(Path(p)))
    return summary


def render_adaptive(res: dict) -> list[str]:
    """Detection on adaptive attacks next to plain BadNets: the drop security reviewers ask for first."""
    lines = ["## Adaptive attacks: how much detection drops", ""]
    if not res.get("drops"):
        return lines + [f"Not run: {res.get('note', 'no adaptive zoo')}.", ""]
    attacks = res["attacks"]
    lines += [
        "An attacker who knows MetaShield exists. Each cell: mean ± std over seeds, and in brackets the drop from "
        "plain BadNets with the same patch, data, architecture and recipe (positive = detection got worse). "
        f"k = {res['sections'][0]['records'][0]['k']}.",
        "",
    ]
    for metric in ("auroc", "tpr@5fpr"):
        lines += [
            f"| method | badnets {NAMES[metric]} | "
            + " | ".join(f"{a} {NAMES[metric]} (drop)" for a in attacks)
            + " |",
            "|---|---|" + "---|" * len(attacks),
        ]
        for row in res["drops"]:
            cells = [f"{fmt(row[f'{a} {metric}'])} ({row[f'{a} {metric} drop']:+.3f})" for a in attacks]
            lines.append(f"| {row['method']} | {fmt(row[f'badnets {metric}'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Models (attack success rate on the inputs the trigger is meant to fire on, clean accuracy):", ""]
    lines += [
        f"- `{z['model_id']}`: ASR {z['attack_success_rate']:.3f}, clean accuracy {z['clean_accuracy']:.3f}"
        for z in res.get("zoo", [])
    ]
    return lines + [""]


def render_cost(cost: dict) -> list[str]:
    lines = [
        "## Cost",
        "",
        f"Measured by `{cost.get('command', 'metashield evaluate --protocol cost')}`, on a machine whose 2 cores were "
        "shared with other jobs: absolute times are pessimistic; each overhead ratio compares two timings of the same "
        "run.",
        "",
    ]
    rows = cost.get("overhead", [])
    if rows:
        lines += [
            "Per-input detection cost (ψ against the clean reference + detector) next to the target's own forward "
            "pass (adapter call: preprocessing, forward, penultimate hook), same process, best of 3, batch of "
            f"{rows[0]['n_inputs']} inputs; adaptation = reference, 3 inner steps and threshold from 10 clean samples "
            "(their forward pass included).",
            "",
            "| model | domain | forward ms/input | detection ms/input | overhead ratio | adaptation s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['model_id']} | {r['domain']} | {r['forward_ms_per_input']:.3f} | {r['detect_ms_per_input']:.3f} | "
            f"{r['overhead_ratio']:.2f} | {r['adapt_s']:.2f} |"
            for r in rows
        ]
        lines.append("")
    thr = cost.get("training", {})
    if thr:
        lines += ["Meta-training throughput:", "", "| run | episodes/s | processes | episodes | seconds |"]
        lines += ["|---|---:|---:|---:|---:|"]
        lines += [
            f"| {n} | {t['episodes_per_s']:.2f} | {t['num_processes']} | {t['episodes']} | {t['seconds']:.1f} |"
            for n, t in thr.items()
        ]
        lines.append("")
    zoo = cost.get("zoo", {})
    if zoo:
        lines += ["Zoo build seconds per accepted model (`train_seconds` in the zoo metadata):", ""]
        lines += ["| domain | models | median s/model | total s |", "|---|---:|---:|---:|"]
        lines += [f"| {d} | {z['n']} | {z['median_s']:.1f} | {z['total_s']:.0f} |" for d, z in zoo.items()]
        lines.append("")
    if cost.get("note"):
        lines += [cost["note"], ""]
    return lines
