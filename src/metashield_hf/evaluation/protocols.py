"""Evaluation protocols on cached activations, one registry: [`PROTOCOLS`].

Every protocol scores methods on *episodes*: one held-out zoo model, a support of ``k`` clean probe inputs and a
query of 32 other clean and 32 triggered inputs, drawn by `meta.episodes.make_episode` from ``(model, k, seed)`` alone.
Every method — MetaShield and its variants, the pooled transfer detector and each activation baseline of
`baselines.BASELINES` — is fitted on that support and scores that query, so all methods see exactly the same episodes
([`Evaluation.episode`] caches one per key, and records carry its indices). The triggered rows that the ``oracle``
ablation shows its inner loop are drawn first and left out of every method's query.

| protocol | question | detectors it trains (bank, ``--steps``) |
|---|---|---|
| ``in_domain`` | held-out models of seen architectures; held-out architectures | one without the held-out architectures |
| ``few_shot`` | the curve over k = 5, 10, 20, 50 | none |
| ``cross_domain`` | leave one domain out; which ψ groups transfer | one per domain, and per (domain, dropped group) |
| ``novel_attacks`` | leave one attack group out | one per attack group |
| ``ablations`` | drop each ψ group; oracle vs deployable; MAML vs pooled vs zero-shot | all groups, and one per dropped group |
| ``live_baselines`` | STRIP, SCALE-UP, IBD-PSC, TED (need the live model: loaded from its zoo row) on the same episodes | none |
| ``live`` | a detector reading live probes (``--live_detector``) vs the one-pass detector and every baseline | none |
| ``cost`` | detection overhead vs the forward pass, adaptation time, episodes/s, zoo s/model | none |
| ``adaptive`` | latent-separability and source-specific (TaCT) attacks vs plain BadNets | none |

Metrics per episode: ``auroc`` and ``tpr@5fpr``/``tpr@1fpr`` (triggered vs clean query, threshold-free), and for
MetaShield ``fpr``/``tpr`` at the threshold it calibrates on the support alone. Aggregation: mean over models per seed,
then mean ± std over seeds. A clean model has no triggered input to detect: its ``control_auroc`` (triggered-pattern
inputs vs clean inputs, ideal 0.5) says whether a method flags the pattern rather than a backdoor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..features import DEFAULT_GROUPS
from ..registry import Registry
from .scoring import ROC_GRID, Evaluation, Method, aggregate, firing_rows, table

__all__ = [
    "ATTACK_GROUPS",
    "ORDER",
    "PROTOCOLS",
    "ROC_GRID",
    "Evaluation",
    "Method",
    "aggregate",
    "firing_rows",
    "parse_protocols",
    "run_protocols",
    "table",
]

logger = logging.getLogger(__name__)

PROTOCOLS: Registry[Callable[[Evaluation], dict]] = Registry("protocol")
# Leave-one-attack-out groups: attacks of one mechanism go out together, so that a held-out "novel" attack has no
# near-twin in training (and six runs instead of twelve). Attacks missing from this table form their own group.
ATTACK_GROUPS = {
    "cv_patch": ("badnets", "trojan_watermark"),
    "cv_blend_warp": ("blend", "wanet"),
    "nlp_token": ("rare_word", "char_substitution"),
    "nlp_syntactic": ("syntactic_template",),
    "fl_data_poisoning": ("fl_data_poisoning", "dba"),
    "fl_model_poisoning": ("model_replacement", "model_replacement_constrained", "neurotoxin"),
}


def _section(title: str, records: list[dict], by: str | None, note: str = "", **extra) -> dict:
    return {"title": title, "by": by, "note": note, "records": records, **extra}


# ---- the protocols ------------------------------------------------------------------------------------------------
@PROTOCOLS.register("in_domain")
def in_domain(ev: Evaluation) -> dict:
    """Held-out models (the meta-training split's test side), then held-out architectures (trained without them)."""
    methods = ev.comparison_methods()
    sections = [
        _section(
            f"Held-out models ({len(ev.test_ids)}), per domain",
            ev.run(methods, ev.test_ids, ev.k),
            "domain",
            "Architectures and attacks of these models also occur in training (the split is stratified by domain and "
            "attack), the models themselves do not.",
            headline=True,
        )
    ]
    sections.append(_section("Held-out models, per attack", sections[0]["records"], "attack"))
    held = ev.ids_where(ev.all_ids, architecture=tuple(ev.heldout_architectures))
    if held:
        train = [i for i in ev.train_ids if i not in set(held)] + [
            i for i in ev.test_ids if i not in set(held)
        ]  # every other model trains: only the architecture is new
        det = ev.train_detector("arch_holdout", sorted(train))
        archs = sorted({ev.meta(i)["architecture"] for i in held})
        sections.append(
            _section(
                f"Held-out architectures ({', '.join(archs)}; {len(held)} models)",
                ev.run([det] + [m for m in methods if m.baseline], held, ev.k),
                "architecture",
                f"`metashield[arch_holdout]` is meta-trained ({ev.steps} steps) on the {len(train)} models of the other "
                "architectures; baselines need no training.",
            )
        )
    return {"sections": sections}


@PROTOCOLS.register("few_shot")
def few_shot(ev: Evaluation) -> dict:
    """Every comparison method on the held-out models at each k of the few-shot curve."""
    records = ev.run(ev.comparison_methods(), ev.test_ids, ev.few_shot_k)
    return {"sections": [_section("Few-shot curve (held-out models)", records, "k", curve=True)]}


def _all_groups_detector(ev: Evaluation) -> Method:
    """The reference for every retrained variant: same split, same steps and bank, all ψ groups."""
    return ev.train_detector("all_groups", ev.train_ids)


@PROTOCOLS.register("cross_domain")
def cross_domain(ev: Evaluation) -> dict:
    """Leave one domain out: meta-train on the other domains' training models, test on the held-out domain.

    Each leave-one-domain-out detector is scored on every domain's held-out models (the heat-map); the in-domain
    reference is the detector trained the same way on all domains. Then, per held-out domain and ψ group, a detector
    trained without that group: the cross-domain drop when a group is removed says whether what it measures transfers.
    """
    ref = _all_groups_detector(ev)
    heat = {"all domains": ev.run([ref], ev.test_ids, ev.k)}
    cross, drops = [], []
    for d in ev.domains():
        train = [i for i in ev.train_ids if ev.meta(i)["domain"] != d]
        det = ev.train_detector(f"lodo_{d}", train)
        heat[f"without {d}"] = recs = ev.run([det], ev.test_ids, ev.k)
        test_d = ev.ids_where(ev.test_ids, domain=d)
        cross += [dict(r, method="metashield (domain unseen)") for r in recs if r["domain"] == d]
        cross += [dict(r, method="metashield (all domains)") for r in heat["all domains"] if r["domain"] == d]
        for g in DEFAULT_GROUPS:
            keep = [x for x in DEFAULT_GROUPS if x != g]
            det_g = ev.train_detector(f"lodo_{d}_drop_{g}", train, keep)
            drops += [dict(r, heldout=d, dropped=g) for r in ev.run([det_g], test_d, ev.k)]
        drops += [dict(r, heldout=d, dropped="none") for r in recs if r["domain"] == d]
    baselines = ev.run([m for m in ev.comparison_methods() if m.name != "metashield"], ev.test_ids, ev.k)
    return {
        "sections": [
            _section(
                "Cross-domain: leave one domain out (held-out domain's test models)",
                cross + baselines,
                "domain",
                f"Both MetaShield rows are trained by this protocol ({ev.steps} steps, same bank episodes): "
                "'all domains' on every domain's training models, 'domain unseen' without any model of the column's "
                "domain. "
                "Baselines need no training, so their numbers are their in-domain ones.",
            )
        ],
        "heatmap": {name: recs for name, recs in heat.items()},
        "group_transfer": drops,
    }


@PROTOCOLS.register("novel_attacks")
def novel_attacks(ev: Evaluation) -> dict:
    """Leave one attack group out: train without any model of those attacks, test on their held-out models."""
    attacks = sorted({ev.meta(i)["attack"] for i in ev.all_ids} - {"none"})
    groups = {g: tuple(a for a in members if a in attacks) for g, members in ATTACK_GROUPS.items()}
    groups = {g: m for g, m in groups.items() if m}
    grouped = {a for m in groups.values() for a in m}
    groups.update({a: (a,) for a in attacks if a not in grouped})
    ref = _all_groups_detector(ev)
    baselines = [m for m in ev.comparison_methods() if m.baseline or m.name == "pooled_transfer"]
    records = []
    for g, members in sorted(groups.items()):
        test = ev.ids_where(ev.test_ids, attack=members)
        if not test:
            continue
        train = [i for i in ev.train_ids if ev.meta(i)["attack"] not in members]
        det = ev.train_detector(f"loao_{g}", train)
        for r in ev.run([det, ref, *baselines], test, ev.k):
            name = {det.name: "metashield (attack unseen)", ref.name: "metashield (attack seen)"}.get(r["method"])
            records.append(dict(r, attack_group=g, method=name or r["method"]))
    return {
        "sections": [
            _section(
                "Novel attacks: leave one attack group out (held-out models of that group)",
                records,
                "attack_group",
                "Groups: "
                + "; ".join(f"`{g}` = {', '.join(m)}" for g, m in sorted(groups.items()))
                + f". Both MetaShield rows are trained by this protocol ({ev.steps} steps, same bank): 'seen' on every "
                "training model, 'unseen' without any model of the group. The pooled detector saw every attack.",
            )
        ]
    }


@PROTOCOLS.register("ablations")
def ablations(ev: Evaluation) -> dict:
    """Drop each ψ group (retrained); deployable vs oracle inner loop; MAML vs pooled vs zero-shot."""
    variants = [ev.shield_method("maml + adaptation (metashield)", ev.detectors["metashield"])]
    variants.append(ev.shield_method("maml, zero-shot (no adaptation)", ev.detectors["metashield"], adapt=False))
    if "pooled" in ev.detectors:
        variants.append(ev.shield_method("pooled, no meta-learning", ev.detectors["pooled"], adapt=False))
    if "oracle" in ev.detectors:
        variants.append(ev.shield_method("oracle inner loop (true trigger)", ev.detectors["oracle"], oracle=True))
    if "prior" in ev.detectors:
        variants.append(ev.shield_method("untrained prior", ev.detectors["prior"], adapt=False))
    training = ev.run(variants, ev.test_ids, ev.k)
    groups = [_all_groups_detector(ev)]
    for g in DEFAULT_GROUPS:
        groups.append(ev.train_detector(f"drop_{g}", ev.train_ids, [x for x in DEFAULT_GROUPS if x != g]))
    feats = ev.run(groups, ev.test_ids, ev.k)
    return {
        "sections": [
            _section(
                "Ablation: inner loop and meta-learning (pre-trained detectors)",
                training,
                "domain",
                "The oracle row shows its inner loop true triggered inputs (never available at deployment).",
                metrics=("auroc", "tpr@5fpr", "fpr"),
                bars=True,
            ),
            _section(
                "Ablation: drop one ψ feature group (retrained without it)",
                feats,
                "domain",
                f"Each row is a detector meta-trained ({ev.steps} steps) on the same bank episodes with that group's "
                "columns removed: retraining, not zeroing, because a detector trained with a group and evaluated "
                "without it measures its reliance on the group, not the group's information.",
                bars=True,
            ),
        ]
    }


@PROTOCOLS.register("live_baselines")
def live_baselines(ev: Evaluation) -> dict:
    """Baselines that run the live model (STRIP) on the held-out models' episodes, next to MetaShield."""
    if not ev.live_baselines:
        return {"sections": [], "note": "no live baseline selected"}
    if ev.zoo is None:
        return {"sections": [], "note": "not run: pass --zoo (the live models are loaded from its rows)"}
    methods = [ev.comparison_methods()[0], *(Method(b, baseline=b) for b in ev.live_baselines)]
    records = ev.run(methods, ev.test_ids, ev.k)
    return {
        "sections": [
            _section(
                f"Live-model baselines ({', '.join(ev.live_baselines)}), held-out models",
                records,
                "domain",
                "The same episodes as the other protocols, scored through the model loaded from its zoo row (STRIP "
                "superimposes the raw inputs: 20 copies per input, overlays drawn from the k clean support inputs).",
            )
        ]
    }


@PROTOCOLS.register("live")
def live(ev: Evaluation) -> dict:
    """A detector that reads live evidence (``--live_detector``) next to the one-pass detector and every baseline,
    cached and live, on the same episodes of the held-out models."""
    if "live" not in ev.detectors:
        return {"sections": [], "note": "not run: pass --live_detector (a detector whose config lists probes)"}
    if ev.zoo is None:
        return {"sections": [], "note": "not run: pass --zoo (the live models are loaded from its rows)"}
    live_method = ev.shield_method("metashield_live", ev.detectors["live"])
    if not live_method.live:
        raise ValueError(f"--live_detector {ev.detectors['live']} reads no live probe (its config.probes is empty)")
    methods = [ev.comparison_methods()[0], live_method, *(Method(b, baseline=b) for b in ev.baselines)]
    methods += [Method(b, baseline=b) for b in ev.live_baselines]
    records = ev.run(methods, ev.test_ids, ev.k)
    probes = ", ".join(live_method.detector.config.probes)
    return {
        "sections": [
            _section(
                "Live evidence, held-out models",
                records,
                "domain",
                f"metashield_live reads ψ and the probes {probes} (at most {live_method.detector.config.probe_passes} "
                "extra forward passes per input), computed on the live model loaded from its zoo row and stored per "
                "episode; metashield is the one-pass detector on cached ψ. Same episodes for every method.",
            )
        ]
    }


@PROTOCOLS.register("cost")
def cost(ev: Evaluation) -> dict:
    """Detection overhead vs the target's forward pass (live zoo models), adaptation time, meta-training episodes/s,
    zoo build seconds per model."""
    from .cost import measure_costs, training_throughput, zoo_seconds

    dirs = {n: d for n, d in ev.detectors.items() if n != "prior"}
    one_proc = Path(ev.detectors["metashield"]).parent.parent / "throughput-1proc" / "detector"
    if one_proc.exists():
        dirs["metashield, 1 process (10 steps)"] = str(one_proc)
    training = {f"{n} (metashield train: ψ computed per episode)": t for n, t in training_throughput(dirs).items()}
    res: dict = {"training": training}
    if ev.trained:  # bank runs: episodes precomputed, so this is the meta-update alone
        runs = [m for m in ev.trained.values() if m["seconds"] > 0]
        rates = sorted(m["episodes_per_s"] for m in runs)
        if rates:
            training[f"{len(runs)} protocol-trained detectors, median (bank episodes: meta-update only)"] = {
                "episodes_per_s": float(np.median(rates)),
                "num_processes": 1,
                "episodes": int(np.median([m["episodes"] for m in runs])),
                "seconds": float(np.median([m["seconds"] for m in runs])),
            }
        res["bank_seconds"] = ev.bank.seconds
    if ev.zoo is None:
        res["note"] = (
            "No --zoo given: the per-input overhead and zoo seconds need the live models and were not measured."
        )
        return res
    models = [m for d in ev.domains() for m in ev.ids_where(ev.test_ids, domain=d)[: ev.cost_per_domain]]
    res["overhead"] = measure_costs(ev.zoo, models, ev.detectors["metashield"])
    res["zoo"] = zoo_seconds(ev.zoo)
    return res


@PROTOCOLS.register("adaptive")
def adaptive(ev: Evaluation) -> dict:
    """Adaptive attacks (``benchmarks/input_detection/configs/adaptive_zoo.yaml``): how much detection drops against
    plain BadNets with the same patch, data, architecture and recipe. MetaShield is the detector under test, not retrained on these attacks."""
    if ev.adaptive_zoo is None:
        return {"sections": [], "note": "not run: pass --adaptive_zoo (build it with scripts/benchmark_adaptive.sh)"}
    from ..meta.cache import cache_activations
    from ..zoo import load_zoo

    paths = cache_activations(load_zoo(ev.adaptive_zoo), ev.out / "adaptive_cache", progress=False)
    ids = sorted(p.stem for p in paths)
    # STRIP too (live models from the adaptive zoo's rows): TaCT's covers are designed against input-perturbation tests
    recs = ev.run([*ev.comparison_methods(), *(Method(b, baseline=b) for b in ev.live_baselines)], ids, ev.k)
    attacks = sorted({r["attack"] for r in recs if r["backdoored"]} - {"badnets"})
    drops = []
    for method in dict.fromkeys(r["method"] for r in recs):
        row = {"method": method}
        for metric in ("auroc", "tpr@5fpr"):
            base = aggregate([r for r in recs if r["method"] == method and r["attack"] == "badnets"], metric)
            row[f"badnets {metric}"] = base
            for a in attacks:
                st = aggregate([r for r in recs if r["method"] == method and r["attack"] == a], metric)
                row[f"{a} {metric}"] = st
                row[f"{a} {metric} drop"] = base[0] - st[0]
        drops.append(row)
    return {
        "sections": [
            _section(
                f"Adaptive attacks ({len(ids)} models of configs/adaptive.yaml)",
                [r for r in recs if r["backdoored"]],
                "attack",
                "`badnets` is the non-adaptive control (same 3×3 patch). For `tact` the positives are triggered inputs "
                "of its source classes; triggered inputs of the other classes are cover inputs (no backdoor fires) "
                "and are left out of the query. Detectors are the ones of the other protocols, not retrained.",
            )
        ],
        "drops": drops,
        "attacks": attacks,
        "zoo": [
            {f: ev.meta(i).get(f) for f in ("model_id", "attack", "attack_success_rate", "clean_accuracy")}
            for i in ids
        ],  # fmt: skip
    }


def run_protocols(ev: Evaluation, names: Sequence[str]) -> dict[str, dict]:
    """Run the named protocols in order; the records they share are computed once."""
    results = {}
    for name in names:
        t0 = time.perf_counter()
        logger.info("protocol %s ...", name)
        results[name] = PROTOCOLS.get(name)(ev)
        results[name]["seconds"] = time.perf_counter() - t0
        logger.info("protocol %s done in %.0f s", name, results[name]["seconds"])
    return results


def parse_protocols(text: str) -> list[str]:
    """``"all"`` or a comma-separated list of registered names (in registry order for ``all``).

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(ORDER)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(
            f"unknown protocol {', '.join(map(repr, unknown)) or repr(text)}; choose from "
            f"{', '.join(PROTOCOLS.list())} or 'all'"
        )
    return names


# Cheap protocols first, so that a partial run has the headline numbers; the trained detectors are shared.
ORDER = (
    "in_domain", "few_shot", "ablations", "cross_domain", "novel_attacks", "live_baselines", "live", "cost", "adaptive",
)  # fmt: skip
