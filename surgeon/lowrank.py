"""Low-rank building blocks shared by the factorizing plugins (tucker, svd).

Truncated SVD here goes through the Gram matrix: for A (m x n) with m <= n, the leading
eigenvectors of A A^T (m x m) are A's leading left singular vectors, and the eigenvalues its
squared singular values. For the wide unfoldings of conv kernels (512 x 4608) this is one
GEMM plus a small eigh, measured ~15x faster than numpy's SVD (0.29 s vs 4.6 s in float64
on a 2-core machine), and it is exact where we need it (full rank reproduces A).
Everything runs in float64: the weights are float32, but the factors are computed once.

Rank choice (ratio, energy, VBMF, rounding to a multiple) is here too, so that every
factorizing plugin offers the same options with the same meaning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np


def left_singular(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors of `a` (columns, descending) and the singular values.

    Signs are fixed (largest-magnitude entry of each vector positive) so the result does
    not depend on the LAPACK build's arbitrary choice.
    """
    a = np.asarray(a, dtype=np.float64)
    gram = a @ a.T
    with _single_blas_thread():
        evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    s = np.sqrt(np.clip(evals, 0.0, None))
    idx = np.argmax(np.abs(evecs), axis=0)
    signs = np.sign(evecs[idx, np.arange(evecs.shape[1])])
    signs[signs == 0] = 1.0
    return evecs * signs, s


def _single_blas_thread():
    """LAPACK's symmetric eigensolver (tridiagonal reduction) gains nothing from a second
    OpenBLAS thread at these sizes and loses a lot when the cores are busy: measured on the
    2-core machine, eigh of a 1024 x 1024 Gram took 0.26-0.52 s on one thread vs 0.97-2.3 s
    on two. threadpoolctl (optional) pins it to one; without it nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: the mode-n fibres as columns, shape (w.shape[mode], -1)."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


# --- ranks -------------------------------------------------------------------------------------

def rank_from_ratio(n: int, ratio: float) -> int:
    """R = round(ratio * n), at least 1, at most n."""
    return int(min(n, max(1, round(ratio * n))))


def rank_from_energy(s: np.ndarray, energy: float) -> int:
    """The smallest R whose leading singular values keep `energy` of the sum of squares."""
    sq = np.asarray(s, dtype=np.float64) ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(sq) / total
    return int(min(len(sq), np.searchsorted(kept, energy - 1e-12) + 1))


def round_to_multiple(r: int, multiple: int, cap: int) -> int:
    """Round up to a multiple (hardware-friendly channel counts), never past `cap`."""
    if multiple <= 1:
        return min(r, cap)
    return min(cap, int(math.ceil(r / multiple) * multiple))


def vbmf_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Rank estimated by empirical variational Bayesian matrix factorization (EVBMF).

    Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed
    variational Bayesian matrix factorization", JMLR 2013: with the noise variance estimated
    by minimizing the free energy, a component survives when its singular value exceeds
    sqrt(M sigma^2 (1 + tau)(1 + alpha / tau)). Needs only the singular values.
    """
    from scipy.optimize import minimize_scalar

    L, M = sorted(shape)
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1][:L]
    H = len(s)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0  # all L singular values are given, so nothing is left out
    # Singular values below 1e-6 of the largest are float32 round-off (and the Gram route
    # resolves them only to ~1e-8): they are zero, not noise to fit, so the estimate never
    # exceeds this numerical rank (and an exactly low-rank matrix gets its rank).
    numerical = int(max(1, np.sum(s > s[0] * 1e-6))) if H and s[0] > 0 else 1
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (np.sum(s**2) + residual) / (L * M)
    if eH_ub + 1 >= H:
        return min(H, numerical)
    lower = max(s[eH_ub + 1] ** 2 / (M * xubar), np.mean(s[eH_ub + 1:] ** 2) / M)
    if not (upper > lower > 0):
        return numerical

    def tau(x: np.ndarray) -> np.ndarray:
        return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))

    def free_energy(sigma2: float) -> float:
        x = s**2 / (M * sigma2)
        z1, z2 = x[x > xubar], x[x <= xubar]
        t1 = tau(z1)
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - t1) + np.sum(np.log((t1 + 1) / z1))
                     + alpha * np.sum(np.log(t1 / alpha + 1)) + residual / (M * sigma2) + (L - H) * np.log(sigma2))

    sigma2 = minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(min(numerical, max(1, np.sum(s > threshold))))


def matrix_rank(opts: "RankOptions", values: np.ndarray, shape: tuple[int, int], *, explicit: int | None = None,
                vbmf: bool = False, default_ratio: float) -> int:
    """One rank for a matrix of `shape` with singular values `values`, as the options ask
    (VBMF, an explicit rank, energy, or ratio of min(shape), `default_ratio` when none is
    given), between 1 and min(shape), rounded up to `opts.multiple`."""
    n = min(shape)
    if vbmf:
        r = vbmf_rank(values, shape)
    elif explicit is not None:
        r = explicit
    elif opts.energy is not None:
        r = rank_from_energy(np.asarray(values)[:n], opts.energy)
    else:
        r = rank_from_ratio(n, opts.ratio if opts.ratio is not None else default_ratio)
    return round_to_multiple(max(1, min(r, n)), opts.multiple, n)


# --- options shared by the factorizing plugins -------------------------------------------------

@dataclass
class RankOptions:
    """How to choose a rank; exactly one of ratio / energy / explicit ranks / vbmf applies."""

    # A per-layer override that sets any of these replaces the global choice instead of
    # adding to it (a sweep's plan gives one layer `ranks` while the run says `--ratio`).
    exclusive_options: ClassVar[tuple[str, ...]] = ("ratio", "energy", "ranks", "rank", "rank_method")

    ratio: float | None = field(default=None, metadata={"help": "rank = ratio x channels (0 < ratio <= 1)"})
    energy: float | None = field(default=None, metadata={
        "help": "smallest rank keeping this fraction of the squared singular values (0 < e <= 1)"})
    multiple: int = field(default=1, metadata={"help": "round ranks up to a multiple of this"})
    guard: Literal["latency", "none"] = field(default="latency", metadata={
        "help": "latency: time each rewrite alone at its real shape and keep it only if faster"})

    def check_common(self, explicit: bool, method: str | None = None) -> None:
        chosen = [n for n, v in (("ratio", self.ratio), ("energy", self.energy)) if v is not None]
        if explicit:
            chosen.append("ranks")
        if method == "vbmf":
            chosen.append("rank_method=vbmf")
        if len(chosen) > 1:
            raise ValueError(f"choose one way to set ranks, got {' and '.join(chosen)}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")


# --- Tucker-2 on the channel modes of a conv kernel ---------------------------------------------

@dataclass
class ChannelFactors:
    """All left singular vectors of a kernel's two channel unfoldings (mode 0 = output
    channels, mode 1 = input channels), each with its singular values, in float64."""

    out_vectors: np.ndarray  # (f, f): columns span the output-channel space
    out_values: np.ndarray   # (f,)
    in_vectors: np.ndarray   # (c, c)
    in_values: np.ndarray    # (c,)


def channel_factors(w: np.ndarray) -> ChannelFactors:
    """Left singular vectors of unfold(w, 0) and unfold(w, 1), via their Gram matrices.

    Computed once per layer at full size, so every rank choice (ratio, energy, VBMF) reads
    the same singular values and the truncation is a slice.
    """
    w = np.asarray(w, dtype=np.float64)
    o, so = left_singular(unfold(w, 0))
    i, si = left_singular(unfold(w, 1))
    return ChannelFactors(o, so, i, si)


def tucker2_core(w: np.ndarray, out_factor: np.ndarray, in_factor: np.ndarray) -> np.ndarray:
    """core = w x_0 O^T x_1 I^T, shape (R2, R1, *kernel). Two tensordots (BLAS GEMMs): a
    three-operand einsum without a contraction order is orders of magnitude slower."""
    w = np.asarray(w, dtype=np.float64)
    t = np.tensordot(out_factor.T, w, axes=(1, 0))        # (R2, c, *k)
    t = np.tensordot(in_factor.T, t, axes=(1, 1))          # (R1, R2, *k)
    return np.swapaxes(t, 0, 1)                           # (R2, R1, *k)


def tucker2_full(core: np.ndarray, out_factor: np.ndarray, in_factor: np.ndarray) -> np.ndarray:
    """The kernel a Tucker-2 triple computes: core x_0 O x_1 I, shape (f, c, *kernel)."""
    t = np.tensordot(out_factor, core, axes=(1, 0))         # (f, R1, *k)
    t = np.tensordot(in_factor, t, axes=(1, 1))             # (c, f, *k)
    return np.swapaxes(t, 0, 1)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """||w - approx|| / ||w|| in float64 (0 for an all-zero w reproduced exactly)."""
    w = np.asarray(w, dtype=np.float64)
    nw = np.linalg.norm(w)
    diff = np.linalg.norm(w - approx)
    return float(diff / nw) if nw > 0 else float(diff)


def hosvd_channels(w: np.ndarray, r1: int, r2: int, factors: ChannelFactors | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated HOSVD on modes 0 and 1: (core (R2, R1, *k), O (f, R2), I (c, R1))."""
    factors = factors or channel_factors(w)
    o = factors.out_vectors[:, :r2]
    i = factors.in_vectors[:, :r1]
    return tucker2_core(w, o, i), o, i


def hooi_channels(w: np.ndarray, r1: int, r2: int, factors: ChannelFactors | None = None,
                  iterations: int = 20, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 by higher-order orthogonal iteration (tensorly's partial_tucker) on modes 0
    and 1, started from our HOSVD: never worse than the HOSVD it starts from."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    w = np.asarray(w, dtype=np.float64)
    core, o, i = hosvd_channels(w, r1, r2, factors)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # tensorly warns when a rank exceeds the other side of a thin unfolding; it clips it
        warnings.simplefilter("ignore", UserWarning)
        (core2, (o2, i2)), _ = partial_tucker(w, rank=[r2, r1], modes=[0, 1], init=(core, [o.copy(), i.copy()]),
                                              n_iter_max=iterations, tol=tol)
    o2, i2 = np.asarray(o2, dtype=np.float64), np.asarray(i2, dtype=np.float64)
    # Sign-fix the factors like left_singular does, so results do not depend on LAPACK's choice
    so, si = _column_signs(o2), _column_signs(i2)
    o2, i2 = o2 * so, i2 * si
    core2 = tucker2_core(w, o2, i2)
    # keep HOOI only if it helped (it should; guard against a tolerance-induced step back)
    if relative_error(w, tucker2_full(core2, o2, i2)) <= relative_error(w, tucker2_full(core, o, i)):
        return core2, o2, i2
    return core, o, i


def _column_signs(m: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(m), axis=0)
    signs = np.sign(m[idx, np.arange(m.shape[1])])
    signs[signs == 0] = 1.0
    return signs


@dataclass
class MatrixFactors:
    """Singular vectors of a matrix a (m x n), computed on its smaller side through the Gram
    matrix; `pair(R)` slices the rank-R factorization a ~ left @ right out of them."""

    a: np.ndarray
    vectors: np.ndarray  # left singular vectors of a (m <= n) or of a^T (m > n)
    values: np.ndarray
    transposed: bool

    def pair(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        v = self.vectors[:, :rank]
        if self.transposed:
            return self.a @ v, v.T
        return v, v.T @ self.a


def matrix_factors(a: np.ndarray) -> MatrixFactors:
    a = np.asarray(a, dtype=np.float64)
    if a.shape[0] <= a.shape[1]:
        u, s = left_singular(a)
        return MatrixFactors(a, u, s, False)
    v, s = left_singular(a.T)
    return MatrixFactors(a, v, s, True)
