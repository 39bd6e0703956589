"""Statistics of the clean reference set, computed once per adaptation and shared by every ψ feature group.

Everything a group compares an input against lives here, so that ψ of a batch costs only the batch's own work
(``O(B·N·D)``), and so that [`reference_without`] gives the same statistics with one clean sample left out (the
honest ψ of the clean set itself, see [`loo_features`]).

All statistics are float64: activations of real models span 1e-8 … 1e6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Reference",
    "build_reference",
    "cosine_distance",
    "ledoit_wolf",
    "mst_edge_lengths",
    "pairwise_distances",
    "reference_without",
]

# |z| beyond this carries no more information and would overflow float32 once squared and summed over D units.
Z_MAX = 1e4
# Floor of the Ledoit–Wolf shrinkage when it is used as a precision: with N < D and no shrinkage the covariance is
# singular, and directions the clean set never moved in would get an infinite distance.
MIN_SHRINKAGE = 1e-3


@dataclass
class Reference:
    """Statistics of the clean reference set (``N`` samples, width ``D``, ``C`` classes).

    Build it with [`build_reference`]; groups read the attributes below. ``z`` denotes the activation standardized with
    the clean per-unit mean/std and clipped to ``±1e4``.

    Attributes:
        penultimate: ``(N, D)`` float32, the clean activations as given.
        logits: ``(N, C)`` float32, the clean logits as given.
        head_weight: ``(C, D)`` float32 weight of the classification head, or ``None``.
        head_bias: ``(C,)`` float32 bias of the head, or ``None``.
        k: neighbours used by the kNN features (the requested ``k`` clipped to ``N - 1``).
        k_requested: the ``k`` asked for (kept so that [`reference_without`] clips it again).
        mean, std: ``(D,)`` per-unit mean and guarded population std (``std² + floor²``; a unit that is constant on
            the clean set is legal).
        abs_scale: mean ``|h|`` over the clean set (the "near zero" scale of the sparsity feature).
        z: ``(N, D)`` standardized clean set.
        loo_knn: ``(N,)`` mean distance of each clean sample to its ``k`` nearest *other* clean samples, in the
            space standardized without it (exactly how a new input is compared with the clean set).
        nn_dist: ``(N,)`` the same to the nearest other clean sample.
        mst: ``(N - 1,)`` sorted edge lengths of the clean set's Euclidean minimum spanning tree in ``z`` (= the death
            times of the 0-dim persistent homology of the Rips filtration).
        centroid: ``(D,)`` raw clean centroid; loo_cos: ``(N,)`` cosine distance of each clean sample to the centroid
            of the others.
        lw_shrinkage, lw_mu: Ledoit–Wolf shrinkage and ``trace(S)/D`` of ``z`` (as sklearn computes them).
        lw_location: ``(D,)`` mean of ``z``; maha_scale: ``a = max(shrinkage, 1e-3)·mu``; maha_kinv: ``(N, N)``
            ``(c·I + X Xᵀ)⁻¹`` for the Woodbury form of the shrunk precision (zeros when fully shrunk); maha_c: ``c``.
        loo_maha: ``(N,)`` Mahalanobis² of each clean sample, standardized without it, under the covariance of the
            others (closed form).
        order: ``(D,)`` unit order by clean mean (the axis of the activation landscape).
        margins: ``(N,)`` clean top-1 − top-2 logit margins; confidence: ``(N,)`` clean max-softmax;
            logit_norm: ``(N,)`` clean logit L2 norms; class_freq: ``(C,)`` Laplace-smoothed frequency of each class
            among the clean predictions.
    """

    penultimate: torch.Tensor
    logits: torch.Tensor
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None
    k: int
    k_requested: int
    mean: torch.Tensor
    std: torch.Tensor
    abs_scale: float
    z: torch.Tensor
    loo_knn: torch.Tensor
    nn_dist: torch.Tensor
    mst: torch.Tensor
    centroid: torch.Tensor
    loo_cos: torch.Tensor
    lw_shrinkage: float
    lw_mu: float
    lw_location: torch.Tensor
    maha_scale: float
    maha_c: float
    maha_kinv: torch.Tensor
    loo_maha: torch.Tensor
    order: torch.Tensor
    margins: torch.Tensor
    confidence: torch.Tensor
    logit_norm: torch.Tensor
    class_freq: torch.Tensor

    @property
    def num_samples(self) -> int:
        return self.penultimate.shape[0]

    @property
    def width(self) -> int:
        return self.penultimate.shape[1]

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def standardize(self, penultimate: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` activations → float64 z-scores against the clean per-unit mean/std, clipped to ``±1e4``."""
        return ((penultimate.double() - self.mean) / self.std).clamp(-Z_MAX, Z_MAX)

    def mahalanobis(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Ledoit–Wolf Mahalanobis distance of standardized rows ``z (B, D)`` to the clean set, ``(B,)``.

        Woodbury form of ``(a·I + b·XᵀX)⁻¹`` with ``X`` the centred clean ``z``: ``O(B·N·D)``, no ``D × D`` matrix.
        """
        x = z - self.lw_location
        proj = x @ self.centred_z().T  # (B, N)
        quad = (x * x).sum(1) - ((proj @ self.maha_kinv) * proj).sum(1)
        return quad.clamp_min(0) / self.maha_scale

    def centred_z(self) -> torch.Tensor:
        return self.z - self.lw_location

    def __repr__(self) -> str:
        head = "yes" if self.head_weight is not None else "no"
        return f"Reference(N={self.num_samples}, D={self.width}, C={self.num_classes}, k={self.k}, head={head})"


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(A, B)`` between rows of ``a`` and ``b`` (float64, via the Gram matrix, ``≥ 0``)."""
    a, b = a.double(), b.double()
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0).sqrt()


def mst_edge_lengths(dist: torch.Tensor) -> torch.Tensor:
    """Sorted edge lengths ``(N - 1,)`` of the minimum spanning tree of a complete graph with distances ``(N, N)``.

    These are exactly the finite death times of 0-dim persistent homology of the Rips (single-linkage) filtration.
    Prim's algorithm, ``O(N²)``; ``N - 1`` steps on numpy arrays (a torch op per step would cost 5x more for the
    ``N ≤ 50`` of a clean set, and leave-one-out runs it ``N`` times).
    """
    n = dist.shape[0]
    if n < 2:
        return dist.new_zeros(0)
    d = dist.detach().cpu().double().numpy()
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best = d[0].copy()
    edges = np.empty(n - 1)
    for step in range(n - 1):
        cand = np.where(in_tree, np.inf, best)
        j = int(cand.argmin())
        edges[step] = cand[j]
        in_tree[j] = True
        np.minimum(best, d[j], out=best)
    return torch.from_numpy(np.sort(edges)).to(dist.dtype)


def ledoit_wolf(x: torch.Tensor) -> tuple[float, float]:
    """Ledoit–Wolf shrinkage of the covariance of ``x (N, D)``, closed form, as `sklearn.covariance.LedoitWolf`.

    The shrunk covariance is ``(1 - s)·S + s·mu·I`` with ``S`` the biased sample covariance and ``mu = trace(S)/D``.
    [Ledoit & Wolf 2004, "A well-conditioned estimator for large-dimensional covariance matrices"](
    https://doi.org/10.1016/S0047-259X(03)00096-4). Costs ``O(N²·D)`` through the ``N × N`` Gram matrix.

    Returns:
        ``(shrinkage s, mu)``.
    """
    x = x.double()
    n, d = x.shape
    x = x - x.mean(0)
    x2 = x * x
    emp_cov_trace = x2.sum(0) / n
    mu = float(emp_cov_trace.sum() / d)
    if d == 1:
        return 0.0, mu
    beta_ = float((x2.sum(1) ** 2).sum())  # = sum(X2ᵀ X2)
    delta_ = float(((x @ x.T) ** 2).sum()) / n**2  # ||XᵀX||_F² = ||X Xᵀ||_F²
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * float(emp_cov_trace.sum()) + d * mu**2) / d
    beta = min(beta, delta)
    if beta == 0:
        return 0.0, mu
    if delta <= 0:  # every sample identical: any shrinkage gives the same (zero) covariance
        return 1.0, mu
    return beta / delta, mu


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, width), got {shape}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values in {int(bad.any(1).sum())} of {t.shape[0]} rows; "
            "drop those samples (NaN/inf activations usually mean fp16 overflow or broken weights)"
        )


def _honest_loo_std(centred: torch.Tensor, floor: float) -> torch.Tensor:
    """``(N, D)``: row ``i`` is the guarded per-unit std of the clean set without sample ``i``.

    From the centred values (no ``E[h²] − E[h]²`` cancellation for activations around 1e6).
    """
    n = centred.shape[0]
    sq = centred * centred
    var = (sq.sum(0)[None, :] - sq) / (n - 1) - (centred / (n - 1)) ** 2
    return (var.clamp_min(0) + floor**2).sqrt()


def _loo_distances(centred: torch.Tensor, loo_std: torch.Tensor) -> torch.Tensor:
    """``(N, N)``: ``d[i, j] = ‖(h_i − h_j) / std₋ᵢ‖`` (the mean cancels), ``inf`` on the diagonal.

    Sample ``i`` is standardized with the statistics of the others, exactly as a new input is standardized with the
    statistics of the whole clean set: without this, in-sample distances are a few percent short, which in 768
    dimensions (where distances concentrate) shifts a clean input's rank among them from ½ to ~0.8.
    """
    n = centred.shape[0]
    w = loo_std.pow(-2)
    sq = (w * centred * centred).sum(1)[:, None] - 2.0 * (w * centred) @ centred.T + w @ (centred * centred).T
    d = sq.clamp_min(0).sqrt()
    return d + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))


def _leave_one_out_maha(
    z: torch.Tensor, z_loo: torch.Tensor, shrinkage: float, mu: float
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Woodbury pieces of the floored Ledoit–Wolf precision, and each clean sample's Mahalanobis² under the others.

    ``Σ = a·I + b·XᵀX`` with ``X`` the centred clean ``z``, ``a = s·mu``, ``b = (1 − s)/N``; then
    ``Σ⁻¹ = (I − Xᵀ K⁻¹ X)/a`` with ``K = c·I + X Xᵀ`` and ``c = a/b``. Leaving row ``i`` out of ``X`` only needs
    ``(K₋ᵢ,₋ᵢ)⁻¹ = K⁻¹₋ᵢ,₋ᵢ − K⁻¹₋ᵢ,ᵢ K⁻¹ᵢ,₋ᵢ / K⁻¹ᵢᵢ`` (block inverse), so all N leave-one-out distances cost one
    ``N × N`` inverse. Sample ``i`` itself is ``z_loo[i]``, standardized without it; the shrinkage is not refitted.
    """
    n = z.shape[0]
    loc = z.mean(0)
    x = z - loc
    xi = z_loo - loc
    gram = x @ x.T
    s = min(max(shrinkage, MIN_SHRINKAGE), 1.0)
    a = max(s * mu, 1e-12)  # mu = 0 only for a constant clean set: every clean z is then 0
    b = (1.0 - s) / n
    sq = (xi * xi).sum(1)
    if b <= 0:
        return a, float("inf"), torch.zeros(n, n, dtype=torch.float64), sq / a
    c = a / b
    kinv = torch.cholesky_inverse(torch.linalg.cholesky(gram + c * torch.eye(n, dtype=torch.float64)))
    proj = (xi @ x.T).fill_diagonal_(0.0)  # row i: X₋ᵢ x_i, with the i-th entry zeroed
    quad = ((proj @ kinv) * proj).sum(1) - (proj * kinv).sum(1) ** 2 / kinv.diagonal()
    return a, c, kinv, (sq - quad).clamp_min(0) / a


def build_reference(
    penultimate: torch.Tensor,
    logits: torch.Tensor,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    *,
    k: int = 5,
) -> Reference:
    """Compute the clean reference statistics once per adaptation.

    Args:
        penultimate: ``(N, D)`` clean activations at the penultimate layer (the head's input).
        logits: ``(N, C)`` clean logits.
        head_weight: ``(C, D)`` weight of the classification head (needed by the ``consistency`` group; ``None``
            gives neutral constants there).
        head_bias: ``(C,)`` bias of the head, or ``None``.
        k: neighbours of the kNN features; clipped to ``N - 1``.

    Returns:
        [`Reference`].

    Raises:
        ValueError: fewer than 2 samples, mismatched shapes, or non-finite values.

    Example:
        ```python
        >>> ref = build_reference(torch.randn(20, 64), torch.randn(20, 10), k=5)
        >>> ref
        Reference(N=20, D=64, C=10, k=5, head=no)
        ```
    """
    _check_2d("penultimate", penultimate)
    _check_2d("logits", logits)
    n, d = penultimate.shape
    if logits.shape[0] != n:
        raise ValueError(f"penultimate has {n} rows but logits has {logits.shape[0]}; pass one row per clean sample")
    if n < 2:
        raise ValueError(f"need at least 2 clean samples, got {n}; pass more clean inputs")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_finite("penultimate", penultimate)
    _check_finite("logits", logits)
    c = logits.shape[1]
    if head_weight is not None:
        if tuple(head_weight.shape) != (c, d):
            raise ValueError(
                f"head_weight must be (C={c}, D={d}) like the logits and activations, got {tuple(head_weight.shape)}"
            )
        head_weight = head_weight.detach().float().cpu()
        _check_finite("head_weight", head_weight)
    if head_bias is not None:
        if tuple(head_bias.shape) != (c,):
            raise ValueError(f"head_bias must be (C={c},), got {tuple(head_bias.shape)}")
        head_bias = head_bias.detach().float().cpu()
    pen32 = penultimate.detach().float().cpu()
    log32 = logits.detach().float().cpu()
    h = pen32.double()
    lg = log32.double()

    mean = h.mean(0)
    std = h.std(0, unbiased=False)
    # Floor: 1% of the typical unit's std (a unit dead on the clean set that fires gets z ~ 100, not 1e12), plus a
    # scale-relative and an absolute term for a constant clean set.
    floor = 1e-2 * float(std.mean()) + 1e-6 * float(h.pow(2).mean().sqrt()) + 1e-12
    std = (std**2 + floor**2).sqrt()
    z = ((h - mean) / std).clamp(-Z_MAX, Z_MAX)

    kk = min(k, n - 1)
    centred = h - mean
    loo_std = _honest_loo_std(centred, floor)
    loo_dist = _loo_distances(centred, loo_std)
    nearest = loo_dist.topk(kk, dim=1, largest=False).values  # (N, k), ascending
    loo_knn = nearest.mean(1)
    nn_dist = nearest[:, 0]
    mst = mst_edge_lengths(pairwise_distances(z, z))

    centroid = h.mean(0)
    loo_centroids = (n * centroid[None, :] - h) / (n - 1)
    loo_cos = cosine_distance(h, loo_centroids)

    shrinkage, mu = ledoit_wolf(z)
    z_loo = (centred * (n / (n - 1)) / loo_std).clamp(-Z_MAX, Z_MAX)  # h_i − mean₋ᵢ = c_i·N/(N−1)
    maha_a, maha_c, kinv, loo_maha = _leave_one_out_maha(z, z_loo, shrinkage, mu)

    top2 = lg.topk(min(2, c), dim=1).values
    margins = top2[:, 0] - top2[:, 1] if c >= 2 else torch.zeros(n, dtype=torch.float64)
    confidence = lg.softmax(1).max(1).values
    counts = torch.bincount(lg.argmax(1), minlength=c).double()
    class_freq = (counts + 1.0) / (n + c)

    return Reference(
        penultimate=pen32, logits=log32, head_weight=head_weight, head_bias=head_bias,
        k=kk, k_requested=k, mean=mean, std=std, abs_scale=float(h.abs().mean()), z=z,
        loo_knn=loo_knn, nn_dist=nn_dist, mst=mst, centroid=centroid, loo_cos=loo_cos,
        lw_shrinkage=shrinkage, lw_mu=mu, lw_location=z.mean(0), maha_scale=maha_a, maha_c=maha_c,
        maha_kinv=kinv, loo_maha=loo_maha, order=torch.argsort(mean, stable=True),
        margins=margins, confidence=confidence, logit_norm=lg.norm(dim=1), class_freq=class_freq,
    )  # fmt: skip


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``1 − cos(a_i, b_i)`` (or against one vector ``b (D,)``), ``1`` where either vector is zero."""
    a = a.double()
    b = b.double()
    if b.ndim == 1:
        b = b[None, :]
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    ok = den > 0
    cos = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
    return 1.0 - cos.clamp(-1.0, 1.0)


def reference_without(ref: Reference, i: int) -> Reference:
    """The same statistics with clean sample ``i`` left out (``N - 1`` samples, ``k`` clipped again).

    Args:
        ref: a reference with at least 3 samples (the result must keep 2).
        i: index of the sample to leave out (negative indices count from the end).

    Returns:
        [`Reference`] built from the other ``N - 1`` samples and the same head.
    """
    n = ref.num_samples
    if n < 3:
        raise ValueError(
            f"leave-one-out needs at least 3 clean samples (2 must remain), got {n}; pass more clean inputs"
        )
    if not -n <= i < n:
        raise IndexError(f"sample index {i} out of range for a reference of {n} samples")
    keep = torch.ones(n, dtype=torch.bool)
    keep[i] = False
    return build_reference(ref.penultimate[keep], ref.logits[keep], ref.head_weight, ref.head_bias, k=ref.k_requested)
