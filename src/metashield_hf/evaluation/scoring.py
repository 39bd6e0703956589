"""The shared state of an evaluation run: episodes every method sees, methods, records, and their aggregation.

[`Evaluation`] draws one episode per ``(model, k, seed)`` with `meta.episodes.make_episode` (ψ computed once, with
every feature group), scores each [`Method`] on it and keeps one record per ``(method, model, k, seed)``, so protocols
that need the same numbers share them. [`aggregate`] is the mean over models within a seed, then mean ± std over
seeds. The protocols themselves are in ``protocols.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..baselines import BASELINES
from ..features import DEFAULT_GROUPS, build_reference
from ..meta.cache import TaskActivations, cache_path, load_task
from ..meta.episodes import make_episode
from ..meta.inner import make_pseudo_features
from ..modeling_metashield import MetaShieldDetector
from ..shield import adapt_from_activations
from .metrics import auroc, tpr_at_fpr
from .training import EpisodeBank, group_columns, train_on_bank

logger = logging.getLogger(__name__)

ROC_GRID = np.linspace(0.0, 1.0, 21)
METRICS = ("auroc", "tpr@5fpr", "tpr@1fpr", "fpr", "tpr", "control_auroc", "fpr_triggered")


def adaptation_of(detector: MetaShieldDetector, path: str | Path) -> tuple[int, float]:
    """``(inner steps, lr)`` the detector was meta-trained to adapt with: its config's ``adapt_steps``, or, for a
    detector saved before configs recorded it (``adapt_steps`` 0), the ``train_args.json`` of its training run."""
    steps, lr = detector.config.adapt_steps, detector.config.adapt_lr
    args_file = Path(path).parent / "train_args.json"
    if steps == 0 and args_file.exists():
        import json

        args = json.loads(args_file.read_text())
        if args.get("algorithm", "maml") != "pooled":
            steps, lr = int(args.get("inner_steps", 0)), float(args.get("inner_lr", lr))
    return steps, lr


@dataclass
class Method:
    """One scorer: a MetaShield detector (``detector`` + ``adapt_steps``) or a baseline (``baseline`` name).

    ``live``: the detector reads live evidence (``config.probes``): it is scored on the episode's live episode
    (`evaluation.live.live_episode`, computed from the zoo row and stored), not on cached ψ.
    """

    name: str
    detector: MetaShieldDetector | None = None
    adapt_steps: int = 0
    adapt_lr: float = 0.05
    oracle: bool = False
    baseline: str | None = None
    live: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        groups = self.detector.config.feature_groups if self.detector is not None else None
        return tuple(groups) if groups else DEFAULT_GROUPS


@dataclass
class EvalEpisode:
    """The shared episode: indices into the model's probe set, and ψ (all groups) for the MetaShield detectors."""

    task: TaskActivations
    k: int
    seed: int
    support: torch.Tensor  # (k,) clean probe rows
    query_clean: torch.Tensor  # (q_c,)
    query_triggered: torch.Tensor  # (q_t,)
    support_psi: torch.Tensor  # (k, F) leave-one-out ψ
    query_psi: torch.Tensor  # (q_c + q_t, F)
    pseudo_psi: torch.Tensor  # (m, F) deployable pseudo-anomalies
    oracle_psi: torch.Tensor  # (m', F) true triggered inputs for the oracle ablation (pseudo ones on clean models)


def firing_rows(task: TaskActivations, rows: torch.Tensor) -> torch.Tensor:
    """Which triggered probe rows the backdoor is meant to fire on: all, except for a source-specific trigger (TaCT),
    whose other classes' triggered inputs are cover inputs that keep their label, not backdoor activations."""
    return firing_rows_of(task.meta, task.labels, rows)


def firing_rows_of(meta: dict, labels, rows: torch.Tensor) -> torch.Tensor:
    """[`firing_rows`] from a model's metadata (``attack``, ``is_backdoored``, ``attack_params``) and its probe
    inputs' true labels, for callers that hold no cached task (the live episodes)."""
    import json

    params = json.loads(meta.get("attack_params") or "{}")
    backdoored = bool(meta.get("is_backdoored", meta.get("attack") != "none"))
    if not backdoored or "source_classes" not in params:
        return torch.ones(len(rows), dtype=torch.bool)
    return torch.isin(torch.as_tensor(labels)[rows], torch.tensor(params["source_classes"]))


def roc_curve_at(scores_neg: np.ndarray, scores_pos: np.ndarray, grid: np.ndarray = ROC_GRID) -> list[float]:
    """TPR at each FPR of ``grid`` (threshold = the clean-score quantile, as `tpr_at_fpr`); for averaged ROC plots."""
    s = np.r_[scores_neg, scores_pos]
    y = np.r_[np.zeros(len(scores_neg)), np.ones(len(scores_pos))]
    return [1.0 if f >= 1.0 else tpr_at_fpr(s, y, float(f)) for f in grid]


@dataclass
class Evaluation:
    """The state shared by the protocols of one run: models, split, methods, the episode and record caches.

    Args:
        cache_dir: the activation cache (one file per zoo model; read only).
        train_ids, test_ids: the fixed split (``split.json`` of the meta-training run): models added to the cache
            later are ignored, so a rerun scores the same models.
        detectors: ``name -> detector folder`` of pre-trained detectors: ``metashield`` (required), ``pooled``,
            ``oracle``, ``prior`` (each optional).
        out: run folder (protocol-trained detectors go to ``out/detectors``).
        seeds: episode seeds ``0..seeds-1``.
        k: support sizes of the protocols other than ``few_shot``.
        few_shot_k: support sizes of the few-shot curve.
        steps: outer steps of every detector a protocol trains.
        adapt_steps: inner-loop steps when adapting MetaShield (``None``: the detector's own ``adapt_steps``).
        baselines: registry names to compare (those needing the live model, STRIP, are skipped with a note).
        heldout_architectures: architectures held out by ``in_domain``'s second part (absent ones are ignored).
        bank_size: banked training episodes per model.
        n_query: clean and triggered query inputs each.
        zoo: the zoo folder (only the ``cost`` protocol loads live models from it).
        cost_per_domain: held-out models per domain whose forward pass ``cost`` times.
        adaptive_zoo: a zoo of adaptive attacks (``benchmarks/input_detection/configs/adaptive_zoo.yaml``) for the
            ``adaptive`` protocol; its activations are cached in ``out/adaptive_cache``.
    """

    cache_dir: str | Path
    train_ids: list[str]
    test_ids: list[str]
    detectors: dict[str, str]
    out: str | Path
    seeds: int = 5
    k: tuple[int, ...] = (10,)
    few_shot_k: tuple[int, ...] = (5, 10, 20, 50)
    steps: int = 150
    adapt_steps: int | None = None
    baselines: tuple[str, ...] = tuple(BASELINES.list())
    heldout_architectures: tuple[str, ...] = ("convnext", "bert")
    bank_size: int = 8
    n_query: int = 32
    zoo: str | None = None
    cost_per_domain: int = 2
    adaptive_zoo: str | None = None
    records: dict[tuple, dict] = field(default_factory=dict)
    trained: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        self.out = Path(self.out)
        if "metashield" not in self.detectors:
            raise ValueError("detectors needs a 'metashield' entry (the meta-trained detector folder)")
        missing = [m for m in [*self.train_ids, *self.test_ids] if not cache_path(self.cache_dir, m).exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} models of the split are not in the cache {self.cache_dir}: {missing[:3]}; build it "
                "with `metashield train --zoo ...` (it caches the activations first)"
            )
        self.live_baselines = tuple(b for b in self.baselines if BASELINES.get(b).needs_inputs)
        if self.live_baselines:
            self.notes.append(
                f"left out of the cached protocols: {', '.join(self.live_baselines)} (runs the live model on perturbed "
                "raw inputs, which the activation cache does not hold); protocol `live_baselines` runs it on the same "
                "episodes of the held-out models, loading each model from its zoo row"
            )
        self.baselines = tuple(b for b in self.baselines if not BASELINES.get(b).needs_inputs)
        self._live: tuple | None = None
        self._zoo_index: dict[str, tuple] | None = None
        self._tasks: dict[str, TaskActivations] = {}
        self._episodes: dict[tuple, EvalEpisode] = {}
        self._loaded: dict[str, MetaShieldDetector] = {}
        self.bank = EpisodeBank(self.task, size=self.bank_size, n_query=self.n_query)
        self.timing: dict[str, float] = defaultdict(float)

    # ---- data ---------------------------------------------------------------------------------------------------
    @property
    def all_ids(self) -> list[str]:
        return sorted({*self.train_ids, *self.test_ids})

    def task(self, model_id: str) -> TaskActivations:
        if model_id not in self._tasks:
            path = cache_path(self.cache_dir, model_id)
            if not path.exists() and self.adaptive_zoo is not None:
                path = cache_path(self.out / "adaptive_cache", model_id)
            self._tasks[model_id] = load_task(path)
        return self._tasks[model_id]

    def meta(self, model_id: str) -> dict:
        return self.task(model_id).meta

    def ids_where(self, ids: Sequence[str], **match) -> list[str]:
        """The ids whose metadata match, e.g. ``domain="cv"`` or ``attack=("blend", "wanet")``."""

        def ok(m: dict) -> bool:
            return all(m[k] in v if isinstance(v, (tuple, list, set)) else m[k] == v for k, v in match.items())

        return [i for i in ids if ok(self.meta(i))]

    def domains(self) -> list[str]:
        return sorted({self.meta(i)["domain"] for i in self.all_ids})

    def episode(self, model_id: str, k: int, seed: int) -> EvalEpisode:
        """The one episode of ``(model, k, seed)`` that every method sees."""
        key = (model_id, k, seed)
        if key not in self._episodes:
            t0 = time.perf_counter()
            task = self.task(model_id)
            ep = make_episode(task, k, seed=seed, n_query=self.n_query, inner_mode="oracle")
            c = task.clean
            ref = build_reference(
                c.penultimate[ep.support_index], c.logits[ep.support_index], task.head_weight, task.head_bias
            )
            # The same pseudo-anomalies as `adapt_from_activations` makes at deployment (max(k, 8), same seed).
            pseudo = make_pseudo_features(ref, max(len(ep.support_index), 8), None, seed)
            fires = firing_rows(task, ep.query_triggered_index)
            if not bool(fires.all()):  # a source-specific trigger: only its source classes' inputs are positives
                n_c = len(ep.query_clean_index)
                ep.query = torch.cat([ep.query[:n_c], ep.query[n_c:][fires]])
                ep.query_triggered_index = ep.query_triggered_index[fires]
            self._episodes[key] = EvalEpisode(
                task,
                len(ep.support_index),
                seed,
                ep.support_index,
                ep.query_clean_index,
                ep.query_triggered_index,
                ep.support,
                ep.query,
                pseudo,
                ep.inner_anomalies,
            )
            self.timing["episodes_s"] += time.perf_counter() - t0
        return self._episodes[key]

    # ---- methods ------------------------------------------------------------------------------------------------
    def detector(self, path: str | Path) -> MetaShieldDetector:
        path = str(path)
        if path not in self._loaded:
            self._loaded[path] = MetaShieldDetector.from_pretrained(path).eval()
        return self._loaded[path]

    def shield_method(self, name: str, path: str | Path, *, adapt: bool = True, oracle: bool = False) -> Method:
        det = self.detector(path)
        steps, lr = adaptation_of(det, path)
        steps = (steps if self.adapt_steps is None else self.adapt_steps) if adapt else 0
        return Method(name, det, adapt_steps=steps, adapt_lr=lr, oracle=oracle, live=bool(det.config.probes))

    def comparison_methods(self) -> list[Method]:
        """MetaShield, the pooled transfer detector (if given) and every cached baseline: the headline comparison."""
        methods = [self.shield_method("metashield", self.detectors["metashield"])]
        if "pooled" in self.detectors:
            methods.append(self.shield_method("pooled_transfer", self.detectors["pooled"]))
        return methods + [Method(b, baseline=b) for b in self.baselines]

    def train_detector(self, name: str, train_ids: Sequence[str], groups: Sequence[str] | None = None) -> Method:
        """A MetaShield detector meta-trained by a protocol on ``train_ids`` (bank episodes, ``steps`` steps)."""
        t0 = time.perf_counter()
        logger.info("training %s on %d models (%d steps)", name, len(train_ids), self.steps)
        folder, metrics = train_on_bank(
            self.out / "detectors" / name, train_ids, self.bank, cache_dir=self.cache_dir, groups=groups,
            steps=self.steps,
        )  # fmt: skip
        self.trained[name] = {**metrics, "train_models": len(train_ids), "groups": list(groups or DEFAULT_GROUPS)}
        self.timing["training_s"] += time.perf_counter() - t0
        return self.shield_method(f"metashield[{name}]", folder)

    def live(self, model_id: str) -> tuple:
        """``(adapter, clean probe inputs, triggered probe inputs, their true labels)`` of a zoo model (the last one is
        kept loaded)."""
        if self._live is None or self._live[0] != model_id:
            from ..zoo import load_zoo, row_probe, row_to_target

            if self._zoo_index is None:
                self._zoo_index = {}
                for zoo in (self.zoo, self.adaptive_zoo):
                    if zoo is not None:
                        ds = load_zoo(zoo)
                        self._zoo_index |= {
                            m: (ds, i) for i, m in enumerate(ds.select_columns(["model_id"])["model_id"])
                        }
            if model_id not in self._zoo_index:
                raise ValueError(
                    f"{model_id} is in no zoo given; baselines that perturb raw inputs (strip) need the live models: "
                    "pass --zoo (and --adaptive_zoo for the adaptive protocol)"
                )
            ds, i = self._zoo_index[model_id]
            row = ds[i]
            clean, triggered, labels = row_probe(row)
            self._live = (model_id, row_to_target(row, batch_size=256), clean, triggered, labels)
        return self._live[1:]

    def live_episode(self, method: Method, ep: EvalEpisode) -> dict:
        """The live episode of ``ep`` (its very rows) for a live detector's probes, computed once from the zoo row and
        stored under ``out/live_episodes/<probes>-<passes>/`` (a rerun reads it back)."""
        from .live import live_episode, live_episode_path, load_live_episode

        cfg = method.detector.config
        folder = self.out / "live_episodes" / f"{'+'.join(cfg.probes)}-{cfg.probe_passes}"
        mid = ep.task.model_id
        path = live_episode_path(folder, mid, ep.k, ep.seed)
        if path.exists():
            return load_live_episode(path)
        adapter, clean, triggered, labels = self.live(mid)
        live = live_episode(adapter, clean, triggered, labels, ep.task.meta, ep.k, ep.seed,
                            probes=cfg.probes, probe_passes=cfg.probe_passes, baselines=(),
                            rows=(ep.support, ep.query_clean, ep.query_triggered))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(live, path)
        return live

    # ---- scoring ------------------------------------------------------------------------------------------------
    def score(self, method: Method, ep: EvalEpisode) -> tuple[np.ndarray, np.ndarray, float | None]:
        """``(clean query scores, triggered query scores, calibrated threshold or None)`` of one method."""
        task, c, t = ep.task, ep.task.clean, ep.task.triggered
        if method.baseline is not None and BASELINES.get(method.baseline).needs_inputs:
            # Same episode on the live model: the cache's probe rows are the zoo row's probe inputs, in order.
            adapter, clean_in, trig_in, _ = self.live(task.model_id)
            base = BASELINES.build(method.baseline, seed=ep.seed)
            base.fit(c[ep.support], target=adapter, inputs=[clean_in[i] for i in ep.support.tolist()])
            neg = base.score(inputs=[clean_in[i] for i in ep.query_clean.tolist()])
            return neg, base.score(inputs=[trig_in[i] for i in ep.query_triggered.tolist()]), None
        if method.live:
            from .live import score_live_episode

            s, thr = score_live_episode(
                method.detector, self.live_episode(method, ep), steps=method.adapt_steps, lr=method.adapt_lr
            )
            n_c = len(ep.query_clean)
            return s[:n_c], s[n_c:], thr
        if method.baseline is not None:
            base = BASELINES.build(method.baseline, seed=ep.seed)
            base.fit(c[ep.support], head_weight=task.head_weight, head_bias=task.head_bias)
            return base.score(c[ep.query_clean]), base.score(t[ep.query_triggered]), None
        cols = group_columns(method.groups)
        anomalies = ep.oracle_psi if method.oracle else ep.pseudo_psi
        shield = adapt_from_activations(
            method.detector,
            c[ep.support],
            task.head_weight,
            task.head_bias,
            steps=method.adapt_steps,
            lr=method.adapt_lr,
            seed=ep.seed,
            reference_features=ep.support_psi[:, cols],
            anomaly_features=anomalies[:, cols],
        )
        s = shield.score_features(ep.query_psi[:, cols]).numpy()
        n_c = len(ep.query_clean)
        return s[:n_c], s[n_c:], shield.threshold

    def applies(self, method: Method, model_id: str) -> bool:
        """Whether a method is defined for the model's modality (SCALE-UP amplifies pixels: not text)."""
        if method.baseline is None:
            return True
        modality = "text" if self.meta(model_id)["domain"] == "nlp" else "image"
        return modality in BASELINES.get(method.baseline).modalities

    def record(self, method: Method, model_id: str, k: int, seed: int) -> dict:
        """The metrics of one method on one episode (computed once per run and reused by every protocol)."""
        key = (method.name, model_id, k, seed)
        if key in self.records:
            return self.records[key]
        ep = self.episode(model_id, k, seed)
        t0 = time.perf_counter()
        neg, pos, thr = self.score(method, ep)
        seconds = time.perf_counter() - t0
        self.timing[f"score_s/{method.name}"] += seconds
        m = ep.task.meta
        rec = {
            "method": method.name,
            **{f: m.get(f) for f in ("model_id", "domain", "dataset", "architecture", "attack")},
            "backdoored": ep.task.backdoored,
            "k": ep.k,
            "seed": seed,
            "support": ep.support.tolist(),  # the episode itself, so that a reader can check it is shared
            "query_clean": ep.query_clean.tolist(),
            "query_triggered": ep.query_triggered.tolist(),
            "seconds": seconds,
        }
        scores = np.r_[neg, pos]
        labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
        if ep.task.backdoored:
            rec.update(
                auroc=auroc(scores, labels),
                **{"tpr@5fpr": tpr_at_fpr(scores, labels, 0.05), "tpr@1fpr": tpr_at_fpr(scores, labels, 0.01)},
                roc=roc_curve_at(neg, pos),
            )
        else:
            rec["control_auroc"] = auroc(scores, labels)
        if thr is not None:
            rec["fpr"] = float((neg > thr).mean())
            rec["tpr" if ep.task.backdoored else "fpr_triggered"] = float((pos > thr).mean())
        self.records[key] = rec
        return rec

    def run(self, methods: Sequence[Method], model_ids: Sequence[str], ks: Sequence[int]) -> list[dict]:
        """Records of every method on every (model, k, seed) episode."""
        logger.info(
            "scoring %d methods x %d models x k=%s x %d seeds (%d records so far)",
            len(methods), len(model_ids), list(ks), self.seeds, len(self.records),
        )  # fmt: skip
        out = []
        for mid in model_ids:
            for k in ks:
                for seed in range(self.seeds):
                    out += [self.record(m, mid, k, seed) for m in methods if self.applies(m, mid)]
        return out


# ---- aggregation --------------------------------------------------------------------------------------------------
def aggregate(records: Sequence[dict], metric: str) -> tuple[float, float, int]:
    """``(mean, std, n_models)``: the mean over models within each seed, then mean and std over seeds."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    models = set()
    for r in records:
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            per_seed[r["seed"]].append(v)
            models.add(r["model_id"])
    if not per_seed:
        return float("nan"), float("nan"), 0
    means = [float(np.mean(v)) for v in per_seed.values()]
    return float(np.mean(means)), float(np.std(means)), len(models)


def table(records: Sequence[dict], by: str | None, metrics: Sequence[str] = ("auroc", "tpr@5fpr")) -> dict:
    """``{method: {group: {metric: (mean, std, n)}}}`` with ``group`` the values of ``by`` plus ``"all"``."""
    out: dict = {}
    methods = list(dict.fromkeys(r["method"] for r in records))
    for method in methods:
        rows = [r for r in records if r["method"] == method]
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if by is not None:
                groups[str(r[by])].append(r)
            groups["all"].append(r)
        out[method] = {g: {m: aggregate(v, m) for m in metrics} for g, v in sorted(groups.items())}
    return out
