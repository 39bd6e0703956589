"""Input-level baselines on the same few-shot episodes as MetaShield, one registry: [`BASELINES`].

Every baseline has the same interface: ``fit`` on the clean support, then ``score`` inputs (higher = more likely
triggered). All but STRIP need only activations, so they also run on cached activations:

```python
>>> from metashield_hf.baselines import BASELINES
>>> from metashield_hf.targets import load_target
>>> target = load_target(model)
>>> support = target(clean_inputs)                                  # TargetOutput(logits (N, C), penultimate (N, D))
>>> detector = BASELINES.build("mahalanobis").fit(support)
>>> scores = detector.score(target(test_inputs))                    # (B,) float64
>>> strip = BASELINES.build("strip", n_copies=20).fit(support, target=target, inputs=clean_inputs)
>>> scores = strip.score(inputs=test_inputs)                        # STRIP perturbs raw inputs
```

| name | paper | needs |
|---|---|---|
| ``strip`` | Gao et al. 2019 | the target adapter and raw clean inputs |
| ``scale_up`` | Guo et al. ICLR 2023 | the target adapter and raw inputs (images, tensors) |
| ``ibd_psc`` | Hou et al. ICML 2024 | the target adapter and raw inputs |
| ``ted`` | Mo et al. S&P 2024 | the target adapter (layer activations) and raw inputs |
| ``activation_clustering`` | Chen et al. 2018 | penultimate activations, predicted classes |
| ``spectral_signatures`` | Tran et al. 2018 | penultimate activations, predicted classes |
| ``mahalanobis`` | Lee et al. 2018 + Ledoit & Wolf 2004 | penultimate activations |
| ``isolation_forest_psi`` / ``_penultimate`` | Liu et al. 2008 | ψ features / penultimate activations |
| ``one_class_svm_psi`` / ``_penultimate`` | Schölkopf et al. 2001 | ψ features / penultimate activations |

``needs_note`` on a class says where the method was designed for more data than a few-shot clean support, so that a
report can say so. The pooled transfer-learning detector and Neural Cleanse (a model-level scan) live elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from .features import build_reference, compute_features, loo_features
from .probes import LiveEvidence
from .registry import Registry
from .targets.base import TargetAdapter, TargetOutput
from .targets.perturb import InputRange, superimpose

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "ActivationClustering",
    "Baseline",
    "IsolationForestPenultimate",
    "IsolationForestPsi",
    "Mahalanobis",
    "OneClassSVMPenultimate",
    "OneClassSVMPsi",
    "IbdPsc",
    "ScaleUp",
    "SpectralSignatures",
    "Strip",
    "Ted",
]


def _activations(outputs, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penultimate (N, D), logits (N, C))`` float32 CPU tensors of a `TargetOutput`-like object, checked."""
    pen, logits = getattr(outputs, "penultimate", None), getattr(outputs, "logits", None)
    if pen is None or logits is None:
        raise TypeError(
            f"{what} must be a TargetOutput (or any object with .penultimate (N, D) and .logits (N, C)), got "
            f"{type(outputs).__name__}; compute it with target(inputs)"
        )
    pen = torch.as_tensor(pen).detach().float().cpu()
    logits = torch.as_tensor(logits).detach().float().cpu()
    if pen.ndim != 2 or logits.ndim != 2 or pen.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{what}: penultimate must be (N, D) and logits (N, C) with the same N, got {tuple(pen.shape)} and "
            f"{tuple(logits.shape)}"
        )
    if not (torch.isfinite(pen).all() and torch.isfinite(logits).all()):
        raise ValueError(f"{what} has non-finite activations or logits; drop those rows (fp16 overflow?)")
    return pen, logits


class Baseline:
    """Base class: ``fit(support) -> self`` on clean samples, ``score(outputs) -> (B,)`` (higher = more triggered).

    A subclass sets ``name`` (its registry key), ``min_support``, ``modalities`` (the inputs it is defined for),
    ``needs_inputs`` (it perturbs raw inputs through the
    target adapter, so it cannot run from cached activations) and ``needs_note``, and implements ``_fit``/``_score``.

    Args:
        seed: seeds every random choice, so the same seed and data give identical scores.
    """

    name: ClassVar[str] = ""
    min_support: ClassVar[int] = 2
    needs_inputs: ClassVar[bool] = False
    needs_note: ClassVar[str | None] = None
    modalities: ClassVar[tuple[str, ...]] = ("image", "tensor", "text")

    def __init__(self, *, seed: int = 0):
        self.seed = seed
        self.target: TargetAdapter | None = None
        self.fitted = False

    def fit(
        self,
        support: TargetOutput | None = None,
        *,
        target: TargetAdapter | None = None,
        inputs=None,
        head_weight: torch.Tensor | None = None,
        head_bias: torch.Tensor | None = None,
    ) -> Baseline:
        """Fit on the clean support.

        Args:
            support: the target's outputs on the clean samples, ``logits (N, C)`` and ``penultimate (N, D)``; ``None``
                computes ``target(inputs)``.
            target: the target adapter (STRIP runs it; the ψ baselines take its head unless ``head_weight`` is given).
            inputs: the raw clean inputs behind ``support`` (STRIP superimposes them).
            head_weight, head_bias: ``(C, D)`` / ``(C,)`` classification head, for ψ's ``consistency`` group.

        Returns:
            ``self``.

        Raises:
            ValueError: fewer than ``min_support`` clean samples, or what the method needs is missing.
        """
        if support is None:
            if target is None or inputs is None:
                raise ValueError(f"{self.name}: pass the clean support (target(clean_inputs)), or target= and inputs=")
            support = target(inputs)
        pen, logits = _activations(support, "support")
        if pen.shape[0] < self.min_support:
            raise ValueError(
                f"{self.name} needs at least {self.min_support} clean samples, got {pen.shape[0]}; "
                "pass more clean inputs"
            )
        self.target = target
        self._fit(pen, logits, inputs=inputs, head_weight=head_weight, head_bias=head_bias)
        self.fitted = True
        return self

    def score(self, outputs: TargetOutput | None = None, *, inputs=None) -> np.ndarray:
        """Score inputs; higher = more likely triggered.

        Args:
            outputs: the target's outputs on the inputs (``logits (B, C)``, ``penultimate (B, D)``); ``None`` computes
                ``target(inputs)`` with the adapter given to ``fit``.
            inputs: the raw inputs (needed by STRIP; otherwise only to compute ``outputs``).

        Returns:
            ``(B,)`` float64, finite.
        """
        if not self.fitted:
            raise RuntimeError(f"{self.name} is not fitted: call .fit(support) first")
        if self.needs_inputs:
            if inputs is None:
                raise ValueError(f"{self.name} perturbs raw inputs: pass inputs= (the raw test inputs)")
            return self._score(None, None, inputs=inputs)
        if outputs is None:
            if inputs is None or self.target is None:
                raise ValueError(f"{self.name} scores activations: pass target(inputs), or fit with target= first")
            outputs = self.target(inputs)
        pen, logits = _activations(outputs, "outputs")
        return self._score(pen, logits, inputs=inputs)

    # ---- what subclasses provide ------------------------------------------------------------------------------------
    def _fit(self, pen: torch.Tensor, logits: torch.Tensor, *, inputs, head_weight, head_bias) -> None:
        raise NotImplementedError

    def _score(self, pen: torch.Tensor | None, logits: torch.Tensor | None, *, inputs) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed}, fitted={self.fitted})"


BASELINES: Registry[type[Baseline]] = Registry("baseline")


# ---- STRIP ----------------------------------------------------------------------------------------------------------
@BASELINES.register("strip")
class Strip(Baseline):
    """STRIP: a triggered input keeps its (target) prediction when blended with clean inputs, so the predictions of
    its blended copies have low entropy.

    [Gao et al. 2019, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks"](
    https://arxiv.org/abs/1902.06531); text as in STRIP-ViTA, [Gao et al. 2021](https://arxiv.org/abs/1911.10312).
    Each input gets ``n_copies`` superimposed copies, each with a randomly drawn clean support input; the score is
    minus the mean over copies of each copy's prediction entropy ``-Σ_c p_c log₂ p_c`` (the paper's formula; IBM
    ART's STRIP computes the entropy across copies per class instead, which scores at chance).
    Superimposition per modality:

    - images (``(C, H, W)`` floats in ``[0, 1]`` after the adapter's conversion): ``clip(x + alpha·x_clean, 0, 1)``,
      the paper's saturating ``cv2.addWeighted(x, 1, x_clean, 1, 0)``; the clean image is resized to ``x``'s size.
    - tensors (plain torch models): the same sum, clipped to the value range of the clean support inputs.
    - text: each word replaced with probability ``text_mix`` by a word of the clean sentence ([`mix_words`]), as the
      paper's text variant does (MetaShield's own ``superimposition`` probe splices instead).

    Costs ``n_copies`` forward passes per input.

    Args:
        n_copies: superimposed copies per input (the paper uses 100; 20 already separates well).
        alpha: weight of the clean overlay for images and tensors.
        text_mix: fraction of words replaced for text.
        batch_size: copies per forward pass.
        seed: seeds the choice of overlays and replaced words.
    """

    name = "strip"
    needs_inputs = True
    needs_note = (
        "needs the target model and raw inputs (cannot run on cached activations); the paper draws overlays from a "
        "held-out clean set of ~100 inputs, here the few-shot support is reused"
    )

    def __init__(
        self, *, n_copies: int = 20, alpha: float = 1.0, text_mix: float = 0.5, batch_size: int = 256, seed: int = 0
    ):
        super().__init__(seed=seed)
        if n_copies < 1:
            raise ValueError(f"n_copies must be >= 1, got {n_copies}")
        if not 0.0 <= text_mix <= 1.0:
            raise ValueError(f"text_mix must be in [0, 1], got {text_mix}")
        self.n_copies, self.alpha, self.text_mix, self.batch_size = n_copies, alpha, text_mix, batch_size

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        if self.target is None or inputs is None:
            raise ValueError("strip superimposes raw clean inputs through the model: pass target= and inputs= to fit")
        self.modality = self.target.modality
        pool = self.target.prepare_items(inputs)
        if len(pool) < self.min_support:
            raise ValueError(f"strip needs at least {self.min_support} clean inputs, got {len(pool)}")
        if len(pool) != pen.shape[0]:
            raise ValueError(
                f"inputs has {len(pool)} items but the support has {pen.shape[0]} rows; pass the same ones"
            )
        self.pool = pool
        if self.modality == "tensor":  # the clip range of the saturating sum: what the clean inputs span
            bounds = self.target.input_range(pool)
            self.low, self.high = bounds.low, bounds.high

    def superimpose(self, x, clean, rng: np.random.Generator):
        """One perturbed copy of the prepared input ``x`` with the clean input ``clean``."""
        bounds = InputRange(self.low, self.high) if self.modality == "tensor" else InputRange()
        return superimpose(
            self.modality, x, clean, rng, alpha=self.alpha, text_mix=self.text_mix, text_mode="replace", bounds=bounds
        )

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        items = self.target.prepare_items(inputs)
        entropies = []
        per_call = max(1, self.batch_size // self.n_copies)  # inputs per adapter call, to bound memory
        for start in range(0, len(items), per_call):
            copies = [
                self.superimpose(x, self.pool[j], rng)
                for x in items[start : start + per_call]
                for j in rng.integers(len(self.pool), size=self.n_copies)
            ]
            p = self.target(copies, batch_size=self.batch_size).logits.double().softmax(-1)
            h = -(p * p.clamp_min(1e-300).log2()).sum(-1)  # per-copy prediction entropy (the paper's)
            entropies.append(h.reshape(-1, self.n_copies).mean(1))
        return -torch.cat(entropies).numpy()


# ---- the live probes' papers ---------------------------------------------------------------------------------------
class _ProbeBaseline(Baseline):
    """A published detector that is one live probe's statistic (`metashield_hf.probes`), scored as the paper does."""

    probe: ClassVar[str] = ""
    statistic: ClassVar[str] = ""
    needs_inputs = True

    def __init__(self, *, passes: int | None = None, seed: int = 0, **probe_options):
        super().__init__(seed=seed)
        self.passes, self.probe_options = passes, probe_options

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        if self.target is None or inputs is None:
            raise ValueError(
                f"{self.name} runs the live model: pass target= and inputs= (the raw clean inputs) to fit"
            )
        if self.target.modality not in self.modalities:
            raise ValueError(
                f"{self.name} is defined for {' and '.join(self.modalities)} inputs, not {self.target.modality}"
            )
        evidence = LiveEvidence(
            (self.probe,), probe_passes=10**6, passes={self.probe: self.passes} if self.passes is not None else None,
            options={self.probe: self.probe_options}, seed=self.seed,
        )  # fmt: skip
        self.evidence = evidence.fit(self.target, inputs, support=False)
        self.column = evidence.statistic_names.index(f"{self.probe}.{self.statistic}")

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        return self.evidence.statistics(inputs)[:, self.column].astype(np.float64)


@BASELINES.register("scale_up")
class ScaleUp(_ProbeBaseline):
    """SCALE-UP: a triggered image's prediction survives amplifying its pixel values; the score is the scaled prediction
    consistency, the fraction of the ``passes`` amplified copies (factors 3, 5, 7, …, clipped to the valid range)
    that keep the original prediction.

    [Guo et al., ICLR 2023, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled
    Prediction Consistency"](https://arxiv.org/abs/2302.03251). Images and plain tensors; ``passes`` forward passes
    per input (the paper's 5).
    """

    name = "scale_up"
    probe, statistic = "input_amplification", "spc"
    modalities = ("image", "tensor")
    needs_note = "needs the target model and raw inputs; images and tensors only (amplifying text is undefined)"


@BASELINES.register("ibd_psc")
class IbdPsc(_ProbeBaseline):
    """IBD-PSC: a triggered input's prediction survives amplifying the parameters of the model's last normalisation
    layers; the score is the mean probability of the original class over ``passes`` amplified models (factor 1.5,
    depths from the first one that changes 60% of the clean predictions).

    [Hou et al., ICML 2024, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency"](
    https://arxiv.org/abs/2405.09786). ``passes`` forward passes per input (the paper's 5).
    """

    name = "ibd_psc"
    probe, statistic = "parameter_amplification", "psc"
    needs_note = "needs the target model and raw inputs (it runs amplified copies of the model)"


@BASELINES.register("ted")
class Ted(_ProbeBaseline):
    """TED: at every layer, the rank of the nearest clean sample of the input's predicted class; a triggered input's
    rank trajectory (far from its predicted class early, inside it late) is an outlier among the clean samples'
    leave-one-out trajectories (mean squared z-score over layers).

    [Mo et al., S&P 2024, "Robust Backdoor Detection for Deep Learning via Topological Evolution Dynamics"](
    https://arxiv.org/abs/2312.02673). One forward pass per input, with the activations of up to 8 evenly spaced
    blocks (the paper uses every layer and PCA as the outlier detector, fitted on ~20 clean samples per class).
    """

    name = "ted"
    probe, statistic = "trajectory", "ted"
    needs_note = (
        "needs the layer activations of the live model; the paper fits its outlier detector on ~20 clean samples per "
        "class, here the few-shot support (often fewer than one per class)"
    )


# ---- activation-based ---------------------------------------------------------------------------------------------
def _class_index(pred: np.ndarray, min_per_class: int) -> dict[int, np.ndarray]:
    """Indices of the support rows per predicted class, for classes with at least ``min_per_class`` of them."""
    return {int(c): np.flatnonzero(pred == c) for c in np.unique(pred) if (pred == c).sum() >= min_per_class}


def two_means(x: np.ndarray, rng: np.random.Generator, n_init: int = 4, iters: int = 30) -> np.ndarray:
    """2-means (Lloyd, k-means++ starts, best of ``n_init``) of ``x (N, d)``: ``(N,)`` labels in {0, 1}.

    A few lines of numpy instead of `sklearn.cluster.KMeans`, whose per-call overhead (~30 ms) dominates when every
    scored input is clustered with the handful of support samples of its class.
    """
    n = len(x)
    best, best_inertia = np.zeros(n, dtype=int), np.inf
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    for _ in range(n_init):
        first = rng.integers(n)
        w = sq[first]
        second = rng.choice(n, p=w / w.sum()) if w.sum() > 0 else (first + 1) % n
        centres = x[[first, second]]
        for _ in range(iters):
            labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            if labels.min() == labels.max():  # a cluster emptied: keep the farthest point as its own cluster
                labels[sq[first].argmax()] = 1 - labels[0]
            new = np.stack([x[labels == k].mean(0) for k in (0, 1)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = ((x - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient of a 2-cluster partition (a singleton's own coefficient is 0, as in sklearn)."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() < 2:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = d[i, ~own].mean()
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


@BASELINES.register("activation_clustering")
class ActivationClustering(Baseline):
    """Activation Clustering: poisoned samples of a class form their own small, well-separated cluster.

    [Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering"](
    https://arxiv.org/abs/1811.03728). The paper reduces each class's activations (ICA, 10 dims), splits them with
    2-means and flags the smaller cluster when its relative size is small and the silhouette score high. Adapted to
    score one input ``x (D,)`` against the support: ``x`` joins the support's penultimate activations ``(N, D)`` of
    its predicted class (standardized per unit on the support, as MetaShield's reference does), the points are reduced
    together with PCA (``min(n_components, N_c)`` dims), 2-means splits them, and the score is
    ``silhouette · (1 − 2·r)`` with ``r`` the relative size of ``x``'s cluster: high when ``x`` sits alone in a
    well-separated cluster, negative when it belongs to the bulk. Row ``i`` depends only on row ``i``.

    Args:
        n_components: reduced dimension (the paper's 10).
        min_per_class: a predicted class with fewer support samples is compared with the whole support instead: a
            2-means split of a handful of points is noise (on the digits model, per-class clustering with 5 samples a
            class ranks triggered inputs *below* clean ones, AUROC 0.3).
        seed: seeds the 2-means starts.
    """

    name = "activation_clustering"
    min_support = 3
    needs_note = (
        "designed for the poisoned training set (hundreds of samples per class, the poison among them); with fewer "
        "than min_per_class=10 support samples of a class (every few-shot support) each input is clustered with the "
        "whole clean support, not its class"
    )

    def __init__(self, *, n_components: int = 10, min_per_class: int = 10, seed: int = 0):
        super().__init__(seed=seed)
        self.n_components, self.min_per_class = n_components, min_per_class

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        self.ref = build_reference(pen, logits)
        self.h = self.ref.z.numpy()
        self.groups = _class_index(logits.argmax(1).numpy(), self.min_per_class)

    def _reduce(self, pts: np.ndarray) -> np.ndarray:
        """PCA of the points to cluster (the class's support rows and ``x``) onto their top ``n_components``."""
        centred = pts - pts.mean(0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        d = min(self.n_components, len(s))
        return u[:, :d] * s[:d]

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        hs = self.ref.standardize(pen).numpy()
        pred = logits.argmax(1).numpy()
        scores = np.empty(len(hs))
        for i, (h, c) in enumerate(zip(hs, pred, strict=True)):
            rows = self.h[self.groups[c]] if int(c) in self.groups else self.h
            # Reduced together with x, as the paper reduces a class's activations poison included: a reduction fitted
            # on the clean rows alone would project out the very direction in which x differs.
            pts = self._reduce(np.vstack([rows, h[None]]))
            labels = two_means(pts, np.random.default_rng(self.seed))  # fresh per row: rows do not interact
            r = (labels == labels[-1]).mean()
            scores[i] = silhouette(pts, labels) * (1.0 - 2.0 * r)
        return scores


@BASELINES.register("spectral_signatures")
class SpectralSignatures(Baseline):
    """Spectral Signatures: poisoned samples stand out along the top singular direction of a class's activations.

    [Tran et al. 2018, "Spectral Signatures in Backdoor Attacks"](https://arxiv.org/abs/1811.00636). For the support
    rows of each predicted class (``(N_c, D)`` penultimate activations; the whole support for a class with fewer than
    ``min_per_class``), the mean ``μ_c`` and the top right singular vector ``v_c`` of the centred rows; an input
    ``x (D,)`` predicted ``c`` scores ``((x − μ_c)·v_c)²`` (the paper's outlier score).

    Args:
        min_per_class: support samples a predicted class needs for its own direction.
        seed: unused (the method is deterministic); kept for the common interface.
    """

    name = "spectral_signatures"
    min_support = 2
    needs_note = (
        "designed for the poisoned training set (the top direction is the poison's once a few percent of a class is "
        "poisoned); from a clean few-shot support it is the clean data's main direction of variance"
    )

    def __init__(self, *, min_per_class: int = 3, seed: int = 0):
        super().__init__(seed=seed)
        self.min_per_class = min_per_class

    @staticmethod
    def _direction(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = h.mean(0)
        return mu, np.linalg.svd(h - mu, full_matrices=False)[2][0]

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        h = pen.double().numpy()
        self.overall = self._direction(h)
        groups = _class_index(logits.argmax(1).numpy(), self.min_per_class)
        self.per_class = {c: self._direction(h[rows]) for c, rows in groups.items()}

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        h = pen.double().numpy()
        scores = np.empty(len(h))
        for i, c in enumerate(logits.argmax(1).tolist()):
            mu, v = self.per_class.get(c, self.overall)
            scores[i] = float((h[i] - mu) @ v) ** 2
        return scores


@BASELINES.register("mahalanobis")
class Mahalanobis(Baseline):
    """Mahalanobis distance of the penultimate activation to the clean support, Ledoit–Wolf shrunk covariance.

    [Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"](
    https://arxiv.org/abs/1807.03888) with the covariance of [Ledoit & Wolf 2004](
    https://doi.org/10.1016/S0047-259X(03)00096-4). Reuses MetaShield's clean reference (`build_reference`): units
    standardized on the support ``(N, D)``, then ``Reference.mahalanobis`` (Woodbury form, no ``D × D`` matrix).
    Score: the squared distance, ``(B,)``.
    """

    name = "mahalanobis"
    needs_note = (
        "Lee et al. fit class-conditional Gaussians (tied covariance) on the full training set; with a few-shot "
        "support, one Gaussian over all classes, shrunk because N < D"
    )

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        self.ref = build_reference(pen, logits)

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        return self.ref.mahalanobis(self.ref.standardize(pen)).numpy()


class _SklearnBaseline(Baseline):
    """A scikit-learn novelty detector on ψ features or on raw penultimate activations (``features`` below)."""

    features: ClassVar[str] = "psi"  # "psi" | "penultimate"

    def __init__(self, *, groups: Sequence[str] | None = None, seed: int = 0):
        super().__init__(seed=seed)
        self.groups = groups

    def _estimator(self):
        raise NotImplementedError

    def _fit(self, pen, logits, *, inputs, head_weight, head_bias) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if self.features == "psi":
            if head_weight is None and self.target is not None:  # ψ's consistency group perturbs the head
                head_weight, head_bias = self.target.head.weight.detach(), self.target.head.bias
                head_bias = None if head_bias is None else head_bias.detach()
            self.ref = build_reference(pen, logits, head_weight, head_bias)
            # Leave-one-out ψ, so the clean support is described as a new clean input would be.
            x = loo_features(self.ref, self.groups, seed=self.seed).double().numpy()
        else:
            x = pen.double().numpy()
        self.model = make_pipeline(StandardScaler(), self._estimator()).fit(x)

    def _score(self, pen, logits, *, inputs) -> np.ndarray:
        if self.features == "psi":
            x = compute_features(pen, logits, self.ref, self.groups, seed=self.seed).double().numpy()
        else:
            x = pen.double().numpy()
        return -self.model.decision_function(x).astype(np.float64)


class _IsolationForest(_SklearnBaseline):
    """Isolation Forest: anomalies are isolated by fewer random axis-aligned splits.

    [Liu, Ting & Zhou 2008, "Isolation Forest"](https://doi.org/10.1109/ICDM.2008.17), as
    `sklearn.ensemble.IsolationForest` (``n_estimators`` trees, each on all ``N ≤ 256`` support rows). Input:
    ``(N, F)`` ψ features (leave-one-out on the support) or ``(N, D)`` penultimate activations, standardized; score:
    minus sklearn's ``decision_function``, ``(B,)``.

    Args:
        n_estimators: trees.
        groups: ψ feature groups (default all); ignored on raw activations.
        seed: the forest's ``random_state``.
    """

    needs_note = "the paper subsamples 256 points per tree from a large training set; a few-shot support has N"

    def __init__(self, *, n_estimators: int = 200, groups: Sequence[str] | None = None, seed: int = 0):
        super().__init__(groups=groups, seed=seed)
        self.n_estimators = n_estimators

    def _estimator(self):
        from sklearn.ensemble import IsolationForest

        return IsolationForest(n_estimators=self.n_estimators, random_state=self.seed)


class _OneClassSVM(_SklearnBaseline):
    """One-Class SVM: the smallest RBF-kernel region holding a fraction ``1 − nu`` of the clean support.

    [Schölkopf et al. 2001, "Estimating the Support of a High-Dimensional Distribution"](
    https://doi.org/10.1162/089976601750264965), as `sklearn.svm.OneClassSVM` (``gamma="scale"``). Input: ``(N, F)``
    ψ features (leave-one-out on the support) or ``(N, D)`` penultimate activations, standardized; score: minus the
    signed distance to the boundary, ``(B,)``.

    Args:
        nu: upper bound on the fraction of support rows outside the region.
        groups: ψ feature groups (default all); ignored on raw activations.
        seed: unused (the solver is deterministic); kept for the common interface.
    """

    needs_note = "nu and the kernel width are not tuned: a few-shot episode has no validation data"

    def __init__(self, *, nu: float = 0.1, groups: Sequence[str] | None = None, seed: int = 0):
        super().__init__(groups=groups, seed=seed)
        if not 0.0 < nu <= 1.0:
            raise ValueError(f"nu must be in (0, 1], got {nu}")
        self.nu = nu

    def _estimator(self):
        from sklearn.svm import OneClassSVM

        return OneClassSVM(nu=self.nu, gamma="scale")


@BASELINES.register("isolation_forest_psi")
class IsolationForestPsi(_IsolationForest):
    __doc__ = _IsolationForest.__doc__
    name = "isolation_forest_psi"
    features = "psi"
    min_support = 3  # leave-one-out ψ keeps 2 samples


@BASELINES.register("isolation_forest_penultimate")
class IsolationForestPenultimate(_IsolationForest):
    __doc__ = _IsolationForest.__doc__
    name = "isolation_forest_penultimate"
    features = "penultimate"


@BASELINES.register("one_class_svm_psi")
class OneClassSVMPsi(_OneClassSVM):
    __doc__ = _OneClassSVM.__doc__
    name = "one_class_svm_psi"
    features = "psi"
    min_support = 3  # leave-one-out ψ keeps 2 samples


@BASELINES.register("one_class_svm_penultimate")
class OneClassSVMPenultimate(_OneClassSVM):
    __doc__ = _OneClassSVM.__doc__
    name = "one_class_svm_penultimate"
    features = "penultimate"
