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

import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import numpy as np

from surgeon import parallel
from surgeon.parallel import one_blas_thread, run_parts, single_blas_thread


# From this size on, a Gram matrix's eigh runs on two BLAS threads: measured 13.1 s on one
# thread vs 7.6 s on two for VGG-19's 4096 x 4096 fc Gram. Below it, one thread (see
# surgeon.parallel.single_blas_thread). The thread count is fixed either way, so a run repeats byte for byte.
LARGE_GRAM = 2048
# From this size on, when the rank is known before the factorization and is at most
# SUBSET_FRACTION of it, only the leading `rank` eigenpairs are computed (LAPACK dsyevr on an
# index subset): the back-transformation then builds `rank` vectors instead of all of them.
# Above that fraction the full dsyevd is faster; measured on one thread (5 Dec 2026), seconds
# for dsyevd vs dsyevr at rank m/16, m/8, m/4, m/2: m = 1024: 0.151 vs 0.068, 0.088, 0.130,
# 0.221; m = 2048: 0.968 vs 0.403, 0.500, 0.697, 1.098.
SUBSET_GRAM = 256
SUBSET_FRACTION = 0.3


def gram(a: np.ndarray) -> np.ndarray:
    """a a^T (float64) through BLAS dsyrk: half the multiply-adds of a GEMM (fc6 of VGG-19 is a
    4096 x 25088 matrix); symmetric by construction."""
    from scipy.linalg.blas import dsyrk

    a = np.asarray(a, dtype=np.float64)
    # a^T is Fortran-ordered when a is C-ordered: dsyrk(trans=1) then reads it without a copy
    upper = dsyrk(1.0, a.T, trans=1) if a.flags.c_contiguous else dsyrk(1.0, a)
    return np.triu(upper) + np.triu(upper, 1).T


def left_singular(a: np.ndarray, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The left singular vectors of `a` (columns, descending) and its singular values: all of
    them, or only the leading `rank` when it is given (a slice of the full result, up to
    round-off: an index-subset eigensolver on the same Gram matrix).

    Signs are fixed (largest-magnitude entry of each vector positive) so the result does
    not depend on the LAPACK build's arbitrary choice.
    """
    g = gram(a)
    m = len(g)
    with _blas_threads(m):
        if rank is not None and rank <= SUBSET_FRACTION * m and m >= SUBSET_GRAM:
            from scipy.linalg import eigh
            evals, evecs = eigh(g, subset_by_index=[m - rank, m - 1], driver="evr", check_finite=False,
                                overwrite_a=True)
        else:
            evals, evecs = np.linalg.eigh(g)
    order = np.argsort(evals)[::-1][:rank]  # the leading `rank` of a full solve too
    evals, evecs = evals[order], evecs[:, order]
    s = np.sqrt(np.clip(evals, 0.0, None))
    return evecs * _column_signs(evecs), s


def _blas_threads(n: int):
    """One BLAS thread for a symmetric eigensolver below LARGE_GRAM, two from it on."""
    if n < LARGE_GRAM or parallel.pinned():
        return single_blas_thread()
    return parallel.blas_threads(2)


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


# ranks from a ratio, energy or vbmf are rounded up to this unless `multiple` says otherwise
# (RankOptions.multiple)
DEFAULT_MULTIPLE = 8


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
    given), between 1 and min(shape), rounded up as `opts.rounding` says."""
    n = min(shape)
    if vbmf:
        r = vbmf_rank(values, shape)
    elif explicit is not None:
        r = explicit
    elif opts.energy is not None:
        r = rank_from_energy(np.asarray(values)[:n], opts.energy)
    else:
        r = rank_from_ratio(n, opts.ratio if opts.ratio is not None else default_ratio)
    return round_to_multiple(max(1, min(r, n)), opts.rounding(explicit is not None and not vbmf), n)


# --- options shared by the factorizing plugins -------------------------------------------------

@dataclass
class RankOptions:
    """How to choose a rank; exactly one of ratio / energy / explicit ranks / vbmf applies."""

    # A per-layer override that sets any of these replaces the global choice instead of
    # adding to it (a sweep's plan gives one layer `ranks` while the run says `--ratio`).
    exclusive_options: ClassVar[tuple[str, ...]] = ("ratio", "energy", "ranks", "rank", "rank_method")

    ratio: float | None = field(default=None, metadata={"help": "rank = ratio x channels (0 < ratio <= 1)"})
    energy: float | None = field(default=None, metadata={
        "help": "smallest rank keeping this fraction of the energy (0 < e <= 1): of the layer's output on "
                "the calibration data with fit=data, of the squared singular values with fit=weights"})
    # None: 8 for ranks from ratio / energy / vbmf, explicit ranks as given (7 Dec 2026). With
    # the latency guard on, ranks rounded to 8 were as fast or faster, at drift within 1.3% or
    # lower, in all eight settings measured on the three shared models (EfficientNet-Lite0 at
    # ratio 0.3: 1.15x -> 1.25-1.27x); onnxruntime ran an SVD pair of rank 19 or 29 inside a
    # model slower than one of rank 24 or 32, which the guard, timing each rewrite alone, cannot
    # see (docs/tucker.md, "Ranks rounded to 8 by default"). Prune rounds channel counts alike.
    multiple: int | None = field(default=None, metadata={
        "help": "round ranks up to a multiple of this (default: 8 for ranks from ratio, energy or "
                "vbmf; explicit ranks as given)", "default_text": "8 (explicit ranks: as given)"})
    guard: Literal["latency", "none"] = field(default="latency", metadata={
        "help": "latency: time each rewrite alone at its real shape and keep it only if faster"})
    fit: Literal["data", "weights"] = field(default="data", metadata={
        "help": "data: fit factors to the layer's outputs on the calibration data (whitened SVD, "
                "response-fitted Tucker-2; weights when there is no real --data/--calib); weights: "
                "minimise ||W - W'||"})
    # 64, not 16 (5 Dec 2026): at 7x7 a 16-image sample has 784 rows for EfficientNet-Lite0's
    # 1152-input 1x1 convs; all 32 calibration photos cut its held-out drift at ratio 0.5 from
    # 0.78 to 0.49-0.50 and at 0.75 from 0.60-0.62 to 0.39-0.40 (3 seeds each), left the
    # detector's within its seed spread and lowered the digits CNN's (64 ~ 128 there)
    samples: int = field(default=64, metadata={
        "help": "fit=data: calibration samples (the first ones, at most this many) run through the "
                "model for the layer statistics"})
    rows: int = field(default=2048, metadata={
        "help": "fit=data: input rows (or conv patches) sampled per layer"})
    # 24 (5 Dec 2026; 12 since 4 Dec, 2 before): with few stages a layer is fitted on activations
    # that do not yet show what the compression of the layers before it did, and the errors
    # compound. 12 instead of 2 lowered the held-out drift in 16 of 22 (network, ratio, seed)
    # settings and tied in 4; 24 instead of 12, with 64 samples, three seeds: EfficientNet-Lite0
    # at 0.25 0.76-0.79 -> 0.60-0.61, the detector at 0.25 0.27-0.34 -> 0.25, at 0.5 -5%, the OCR
    # recognizer -1 to -2%, ratio 0.75 unchanged, EfficientNet-Lite0 at 0.5 +5%; ResNet-50's
    # surgery +4-9% (docs/tucker.md, "How many sequential stages")
    passes: int = field(default=24, metadata={
        "help": "fit=data: sequential stages (at most one per layer); each is fitted on the output "
                "of the layers already rewritten (1: every layer on the original model's activations)"})
    damp: float = field(default=0.05, metadata={
        "help": "fit=data: added to the input covariance, as a fraction of its mean variance"})
    select: Literal["heldout", "refit", "none"] = field(default="heldout", metadata={
        "help": "fit=data: heldout = per layer, the fit (sequential refit, data-aware on the rewritten "
                "graph's inputs, or aimed at a residual sum) with the lowest output error on held-out "
                "calibration samples, as fitted on the others; refit = that choice, refitted on every sample "
                "(slower); none = always the sequential data-aware fit, on every sample"})

    activation: Literal["through", "ignore"] = field(default="through", metadata={
        "help": "fit=data: through = when a Relu or Clip (ReLU6) alone reads a layer's output, refine its "
                "data-aware fit to the clipped output (Zhang et al. 2015); ignore = fit the raw output"})
    residual: Literal["add", "ignore"] = field(default="add", metadata={
        "help": "fit=data: add = when an Add (a residual connection y + s) alone reads a layer's output, one "
                "more held-out candidate aims at y + s - s~ (s~: the skip, with the error of the layers "
                "rewritten before) and every candidate is scored on the sum; ignore = aim at y"})

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
        if self.multiple is not None and self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {self.multiple}")
        for name in ("samples", "rows", "passes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.damp <= 1:
            raise ValueError(f"damp must be in [0, 1], got {self.damp}")

    def rounding(self, explicit: bool) -> int:
        """The multiple ranks are rounded up to: `multiple` when given, else 8, or 1 for explicit
        ranks (a plan's or the user's own)."""
        if self.multiple is not None:
            return self.multiple
        return 1 if explicit else DEFAULT_MULTIPLE

    def rank_choice(self, how: str, explicit: bool) -> str:
        """The report's `rank_choice`: `how` the ranks were chosen ("ratio 0.5", "rank 32"), with
        the multiple they were rounded up to when it is not 1."""
        multiple = self.rounding(explicit)
        return how if multiple == 1 else f"{how}, multiple {multiple}"

    def fit_mode(self, data) -> tuple[str, str]:
        """("data" | "weights", why weights when data was asked for)."""
        if self.fit == "weights":
            return "weights", ""
        if data is None or getattr(data, "synthetic", False) or len(data) == 0:
            return "weights", "no calibration data (pass --data or --calib to fit to it)"
        return "data", ""


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
    matrix; `pair(R)` slices the rank-R factorization a ~ left @ right out of them. When built
    for one rank, `vectors`/`values` hold only the leading ones."""

    a: np.ndarray
    vectors: np.ndarray  # left singular vectors of a (m <= n) or of a^T (m > n)
    values: np.ndarray
    transposed: bool

    @property
    def energy(self) -> float:
        """The sum of all squared singular values, ||a||_F^2 (known without all of them)."""
        return float(np.sum(self.a * self.a))

    def pair(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        v = self.vectors[:, :rank]
        if self.transposed:
            return self.a @ v, v.T
        return v, v.T @ self.a


def matrix_factors(a: np.ndarray, rank: int | None = None) -> MatrixFactors:
    """All singular vectors on a's smaller side, or only the leading `rank` (faster on large
    matrices; pair() then takes ranks up to it)."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape[0] <= a.shape[1]:
        u, s = left_singular(a, rank)
        return MatrixFactors(a, u, s, False)
    v, s = left_singular(a.T, rank)
    return MatrixFactors(a, v, s, True)


# --- data-aware factors: keep the layer's outputs on the calibration data ----------------------
#
# A linear layer y = x W (+ b), W (in x out), sees inputs with mean mu and covariance S. For
# any approximation W' the output error is
#
#     E||x W - x W' - d||^2 = tr((W - W')^T S (W - W')) + ||mu (W - W') - d||^2,
#
# so with the bias moved by d = mu (W - W') (the "mean shift") only the first term is left,
# and with S = L L^T (Cholesky) it is ||L^T (W - W')||_F^2: the best rank-r W' is L^-T times
# the truncated SVD of L^T W (ASVD / SVD-LLM). The singular values of L^T W are the square
# roots of the output energy each component carries, which is what `energy` keeps.


def regularised(cov: np.ndarray, damp: float) -> np.ndarray:
    """cov + damp * mean(diag(cov)) * I (and a floor), so that it is positive definite even for
    dead channels or fewer rows than dimensions. `damp` trades output fit on the calibration
    rows against robustness on others: directions the data never excites get a small weight
    instead of none."""
    out = np.array(cov, dtype=np.float64)
    out[np.diag_indices_from(out)] += damping(out, damp)  # (an identity matrix the size of cov cost more)
    return out


def damping(cov: np.ndarray, damp: float) -> float:
    """What regularised adds to the diagonal of `cov` (or of a covariance with this diagonal)."""
    scale = float(np.mean(cov) if cov.ndim == 1 else np.trace(cov) / len(cov)) if len(cov) else 0.0
    return (damp * scale if scale > 0 else 1.0) + 1e-12


def _eigh_desc(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (sign-fixed columns) and square-rooted eigenvalues of a symmetric PSD
    matrix, in descending order."""
    with single_blas_thread():
        evals, evecs = np.linalg.eigh((sym + sym.T) / 2)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    return evecs * _column_signs(evecs), np.sqrt(np.clip(evals, 0.0, None))


@dataclass
class WhitenedFactors:
    """Rank-r factors of W (in x out) that minimise the output error tr(D^T S D) for inputs
    of covariance S; `values` are the singular values of L^T W (sqrt of output energy)."""

    w: np.ndarray
    vectors: np.ndarray
    values: np.ndarray
    chol: np.ndarray | None  # L with S = L L^T, when the input side was whitened
    lw: np.ndarray | None = None  # the whitened target L^T W (with chol)

    @one_blas_thread
    def pair(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A (in x r), B (r x out)) with W' = A B. A rank above min(in, out) is exact; its extra
        columns of A (rows of B) are zeros, so the pair has the shape the caller builds on (a
        Tucker-2 core with more outputs than inputs, refitted through its activation)."""
        v = self.vectors[:, :rank]
        if self.chol is None:  # out-side eigenvectors of W^T S W: W' = W V V^T
            a, b = self.w @ v, v.T
        else:
            from scipy.linalg import solve_triangular
            a = solve_triangular(self.chol.T, v, lower=False)  # L^-T U_r
            b = v.T @ self.lw                                   # U_r^T L^T W = S_r V_r^T
        short = rank - a.shape[1]
        if short > 0:
            a = np.pad(a, ((0, 0), (0, short)))
            b = np.pad(b, ((0, short), (0, 0)))
        return a, b


@one_blas_thread
def whitened_factors(w: np.ndarray, cov: np.ndarray, damp: float = 1e-2, chol: np.ndarray | None = None
                     ) -> WhitenedFactors:
    """Truncated SVD of L^T W (S + damping = L L^T), through the smaller Gram matrix:

    in <= out: eigenvectors U of L^T W W^T L (in x in);  W' = L^-T U_r U_r^T L^T W
    in >  out: eigenvectors V of W^T S W (out x out);    W' = W V_r V_r^T
    (the same singular values; the second needs no Cholesky). With S = I both reduce to
    the plain truncated SVD of W. `chol`: the Cholesky factor of regularised(cov, damp), when
    the caller has it already."""
    w = np.asarray(w, dtype=np.float64)
    s = regularised(cov, damp)
    n_in, n_out = w.shape
    if n_in > n_out:
        v, vals = _eigh_desc(w.T @ s @ w)
        return WhitenedFactors(w, v, vals, None)
    if chol is None:
        with single_blas_thread():
            chol = np.linalg.cholesky(s)
    lw = chol.T @ w
    u, vals = _eigh_desc(gram(lw))
    return WhitenedFactors(w, u, vals, chol, lw)


def whitened_target(m: np.ndarray, chol: np.ndarray) -> "WhitenedFactors":
    """Factors W' = L^-T M_r for a whitened target M (in x out), M_r its truncated SVD."""
    if m.shape[0] > m.shape[1]:
        v, vals = _eigh_desc(m.T @ m)
        from scipy.linalg import solve_triangular
        # M_r = M V V^T, so W' = (L^-T M V) V^T: store L^-T M as the "w" of the out-side route
        return WhitenedFactors(solve_triangular(chol.T, m, lower=False), v, vals, None)
    u, vals = _eigh_desc(gram(m))
    return WhitenedFactors(m, u, vals, chol, m)


def sample_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^T b / rows, for the (rows x d) sample products, in float32 (GEMM over a few thousand
    rows; measured 1.7x faster than float64 here), the sums returned in float64 for the
    factorizations that follow. Everything the size of the sample (centring, projections,
    held-out scoring) stays float32 like the activations it comes from; only the d x d algebra
    (Cholesky, eigh, solves) is float64."""
    prod = np.asarray(a, dtype=np.float32).T @ np.asarray(b, dtype=np.float32)
    return prod.astype(np.float64) / max(len(a), 1)


# rows of the sample on which the reported output error is measured
ERROR_ROWS = 512


def as_f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean in float32, the mean in float64) for a float32 sample."""
    mean = x.mean(0, dtype=np.float64)
    return x - mean.astype(np.float32), mean


def relative_norm(diff: np.ndarray, ref: np.ndarray) -> float:
    nr = np.linalg.norm(ref)
    return float(np.linalg.norm(diff) / nr) if nr > 0 else float(np.linalg.norm(diff))


@dataclass
class LinearFit:
    """A rank-r fit of y = x W + b on sampled rows, and its output error on them."""

    a: np.ndarray        # (in, r)
    b: np.ndarray        # (r, out): x W ~ x A B
    shift: np.ndarray    # (out,) added to the bias (zeros when not centred)
    out_error: float     # ||y' - y|| / ||y|| on the sampled rows, y' on the fit inputs
    values: np.ndarray | None = None  # the spectrum the rank was cut from (DataLinear.values)


@dataclass
class DataLinear:
    """Data-aware factors of y = x W (+ b) from sampled input rows.

    `rows` are what the layer sees in the graph rewritten so far (x~); `target_rows`, at the
    same positions, what it saw in the original model (x; None when they are the same). The
    fit minimises E||x~ W' + b' - (x W + b)||^2 (Zhang et al.'s asymmetric reconstruction, so
    the errors of earlier layers are corrected, not copied): first the unconstrained least
    squares W* = (S~ + damping)^-1 C W with C = E[x~_c^T x_c] (W* = W when x~ = x), then the
    whitened truncated SVD of W* under S~. Centred (bias absorbs the mean shift) unless the
    layer has no bias to move."""

    w: np.ndarray
    x: np.ndarray
    t: np.ndarray
    mean_x: np.ndarray
    mean_t: np.ndarray
    factors: WhitenedFactors
    centered: bool
    d: np.ndarray | None = None       # the target's offset rows (targets x W + d), see moments
    mean_d: np.ndarray | float = 0.0

    @property
    def values(self) -> np.ndarray:
        return self.factors.values

    @one_blas_thread
    def fit(self, rank: int, bias: np.ndarray | float = 0.0, error: bool = True) -> LinearFit:
        """The rank-r factors, the bias shift and (error=False: skipped, NaN) the output error."""
        a, b = self.factors.pair(rank)
        shift = (self.mean_t @ self.w + self.mean_d - (self.mean_x @ a) @ b) if self.centered \
            else np.zeros(self.w.shape[1])
        if not error:
            return LinearFit(a, b, shift, float("nan"), self.values)
        # the error is a report figure: measured on the first ERROR_ROWS rows, it costs little
        x, t = self.x[:ERROR_ROWS].astype(np.float64), self.t[:ERROR_ROWS].astype(np.float64)
        y = t @ self.w + bias + (0.0 if self.d is None else self.d[:ERROR_ROWS])
        y2 = (x @ a) @ b + bias + shift
        return LinearFit(a, b, shift, relative_norm(y2 - y, y), self.values)


@dataclass
class Moments:
    """What a linear fit y = x W needs of its sample: the row count, the means of x~ (the
    rewritten graph's rows) and x (the original's; x~ when there is no target), the second
    moment S~ of x~ and, with a target, C W (C the cross moment of x~ with x: the fit reads C
    only through C W, which costs rows x in x out to form where C costs rows x in^2 and then
    in^2 x out), centred on the means unless the fit is not, and (once computed) the Cholesky
    factor of S~ + damping. Moments of disjoint splits pool exactly (pooled), so the fit on
    every row reuses its held-out trial's products."""

    n: int
    mean_x: np.ndarray
    mean_t: np.ndarray
    centered: bool
    xx: np.ndarray
    xtw: np.ndarray | None = None
    w: np.ndarray | None = None  # the W of xtw
    # with a target offset d (Sample.offset): E[x~_c^T d_c] and the mean of d (the fit aimed at
    # x W + d reads xtw + xtd, see aimed)
    xtd: np.ndarray | None = None
    mean_d: np.ndarray | float = 0.0
    chol: np.ndarray | None = None
    damp: float | None = None  # the damping chol was computed with

    def with_chol(self, damp: float) -> "Moments":
        if self.chol is None or self.damp != damp:
            with single_blas_thread():
                self.chol, self.damp = np.linalg.cholesky(regularised(self.xx, damp)), damp
        return self

    def aimed(self, kind: str) -> "Moments":
        """The moments as the fit `kind` reads them: sequential x~ -> x W, residual x~ -> x W + d,
        data x~ -> x~ W (its "target" mean is x~'s own). Shares the arrays (and the Cholesky
        factor, when computed first)."""
        if kind == "data":
            return replace(self, mean_t=self.mean_x, xtw=None, w=None, xtd=None, mean_d=0.0)
        if kind == "residual" and self.xtd is not None:
            return replace(self, xtw=self.xtw + self.xtd, xtd=None)
        return replace(self, xtd=None, mean_d=0.0)


def moments(rows: np.ndarray, target_rows: np.ndarray | None = None, *, centered: bool = True,
            w: np.ndarray | None = None, offset: np.ndarray | None = None) -> Moments:
    """S~ (and, with target rows and the layer's W, C W) of a sample, the products float32 like
    the rows (_gram). `offset` (rows x out, with target rows): added to the target outputs,
    which are then x W + d."""
    x = as_f32(rows)
    xc, mx = centred(x)
    t, tc, mt = (x, xc, mx) if target_rows is None else (as_f32(target_rows), *centred(as_f32(target_rows)))
    if not centered:
        xc, tc = x, t
    if target_rows is None:
        return Moments(len(x), mx, mt, centered, sample_gram(xc, xc))
    if w is None:
        raise ValueError("moments with target rows need the layer's W (they keep C W)")
    w = np.asarray(w, dtype=np.float64)
    xtd, md = None, 0.0
    if offset is not None:
        d, md = centred(as_f32(offset))
        xtd = sample_gram(xc, d if centered else as_f32(offset))
    return Moments(len(x), mx, mt, centered, sample_gram(xc, xc), sample_gram(xc, tc @ as_f32(w)), w, xtd, md)


def pooled(a: Moments, b: Moments) -> Moments:
    """The moments of two disjoint splits together: with weights p, q = n_a/n, n_b/n,
    S = p S_a + q S_b + p q (mu_a - mu_b)(mu_a - mu_b)^T when centred (the between-split term;
    Chan, Golub & LeVeque), and C W alike with the means of x~ and of x W."""
    n = a.n + b.n
    p, q = a.n / n, b.n / n
    dx, dt = a.mean_x - b.mean_x, a.mean_t - b.mean_t
    k = p * q if a.centered else 0.0

    def pool(sa, sb, d1, d2):
        return None if sa is None or sb is None else p * sa + q * sb + k * np.outer(d1, d2)

    dtw = dt @ a.w if a.w is not None else None
    return Moments(n, p * a.mean_x + q * b.mean_x, p * a.mean_t + q * b.mean_t, a.centered,
                   pool(a.xx, b.xx, dx, dx), pool(a.xtw, b.xtw, dx, dtw), a.w,
                   pool(a.xtd, b.xtd, dx, np.subtract(a.mean_d, b.mean_d)), p * a.mean_d + q * b.mean_d)


@one_blas_thread
def data_linear(w: np.ndarray, rows: np.ndarray, target_rows: np.ndarray | None = None, *, centered: bool = True,
                damp: float = 1e-2, stats: Moments | None = None, offset: np.ndarray | None = None) -> DataLinear:
    """The fit of DataLinear; `stats`: the sample's moments (with C W when there is a target), when
    the caller has them (the held-out trials share them, see linear_trials). `offset` (with target
    rows): the targets are x W + d (moments)."""
    w = np.asarray(w, dtype=np.float64)
    x = as_f32(rows)
    t = x if target_rows is None else as_f32(target_rows)
    offset = None if target_rows is None else offset
    m = stats if stats is not None else \
        moments(x, target_rows, centered=centered, w=w, offset=offset).aimed("sequential" if offset is None
                                                                             else "residual")
    cov = m.xx
    if target_rows is None:
        chol = m.with_chol(damp).chol if m.chol is not None or len(w) <= w.shape[1] else None
        return DataLinear(w, x, t, m.mean_x, m.mean_t, whitened_factors(w, cov, damp, chol), centered)
    # ||x~ W' - x W||^2 = ||L^T W' - L^-1 C W||^2 + const (S~ = L L^T, C = E[x~^T x]):
    # the whitened target is L^-1 C W, truncated like L^T W is without a reference.
    from scipy.linalg import solve_triangular

    # W* = argmin ||x~ W* - x W||^2 + damping ||W* - W||^2: directions the sample does not
    # excite keep W instead of collapsing to zero (and x~ = x gives W* = W exactly).
    chol = m.with_chol(damp).chol
    target = solve_triangular(chol, m.xtw + damping(cov, damp) * w, lower=True)
    return DataLinear(w, x, t, m.mean_x, m.mean_t, whitened_target(target, chol), centered,
                      None if offset is None else as_f32(offset), m.mean_d)


@dataclass
class DataTucker:
    """Tucker-2 factors fitted to a layer's responses: W' = core x_0 O x_1 B, bias b + shift."""

    core: np.ndarray        # (R2, R1, *k)
    out_factor: np.ndarray  # O (f x R2), orthonormal
    in_factor: np.ndarray   # B (c x R1): the in conv's weight is B^T
    shift: np.ndarray       # (f,) added to the bias
    out_error: float        # on the sampled patches, bias included


@dataclass
class DataChannelSpectra:
    """Everything a data-aware Tucker-2 of one conv needs, computed once per layer, so a rank
    choice (ratio, energy) is a slice: the whitened input-side eigenvectors (c x c), the
    output-response eigenvectors (f x f), their spectra, the centred patch sample and the
    centred target responses."""

    w: np.ndarray        # (f, c, *k) float64
    patches: np.ndarray  # (n, c*K) centred fit inputs
    mean: np.ndarray     # (c*K,) their mean
    responses: np.ndarray      # (n, f) centred target responses W p (original inputs)
    response_mean: np.ndarray  # (f,)
    chol: np.ndarray     # L, channel covariance + damping = L L^T
    in_vectors: np.ndarray
    in_values: np.ndarray
    out_vectors: np.ndarray
    out_values: np.ndarray


@one_blas_thread
def data_channel_spectra(w: np.ndarray, patches: np.ndarray, target_patches: np.ndarray | None = None,
                         damp: float = 1e-2) -> DataChannelSpectra:
    """Spectra for a data-aware Tucker-2 from a sample of the conv's input patches (rows laid
    out like w.reshape(f, -1): channel-major, kernel offset minor); `target_patches` are the
    original model's patches at the same positions (None: the same).

    Input side: with channel covariance S_c (the patches' channel blocks averaged over the
    kernel offsets) = L L^T and M = sum_k W_k^T W_k (the mode-1 Gram of the kernel), the
    eigenvectors V of L^T M L give the input factor B = L^-T V_r, optimal for the output error
    when the kernel offsets see uncorrelated copies of the channel covariance.
    Output side: the eigenvectors of the covariance of the target responses y = W p (Zhang et
    al.), whose eigenvalues are the output energy each direction carries."""
    w = np.asarray(w, dtype=np.float64)
    x = as_f32(patches)
    return _spectra(w, _input_side(w, x, damp), _output_side(responses(w, x if target_patches is None else
                                                                         target_patches)))


def responses(w: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """y = W p for patch rows (n, c*K): (n, f), float32 like the patches."""
    return as_f32(patches) @ as_f32(np.reshape(w, (w.shape[0], -1))).T


def _input_side(w: np.ndarray, x: np.ndarray, damp: float, mode1: np.ndarray | None = None) -> tuple:
    """(centred patches, their mean, L, input eigenvectors, values) of data_channel_spectra.
    `mode1`: sum_k W_k^T W_k (c x c), when the caller has it: L^T M L is then two c x c
    products instead of two c x (f*K) ones."""
    f, c = w.shape[:2]
    K = int(np.prod(w.shape[2:]))
    xc, mu = centred(x)
    per_offset = xc.reshape(len(xc), c, K).transpose(0, 2, 1).reshape(len(xc) * K, c)
    with single_blas_thread():
        chol = np.linalg.cholesky(regularised(sample_gram(per_offset, per_offset), damp))
    m = gram(unfold(w, 1)) if mode1 is None else mode1
    return (xc, mu, chol, *_eigh_desc(chol.T @ m @ chol))


def _output_side(y: np.ndarray) -> tuple:
    """(centred responses y = W p of the target patches, their mean, output eigenvectors, values)."""
    y, ymean = centred(as_f32(y))
    return (y, ymean, *_eigh_desc(sample_gram(y, y)))


def _spectra(w: np.ndarray, inputs: tuple, outputs: tuple) -> DataChannelSpectra:
    xc, mu, chol, in_vectors, in_values = inputs
    y, ymean, out_vectors, out_values = outputs
    return DataChannelSpectra(w, xc, mu, y, ymean, chol, in_vectors, in_values, out_vectors, out_values)


@one_blas_thread
def data_tucker2(spec: DataChannelSpectra, r1: int, r2: int, bias: np.ndarray | float = 0.0,
                 ridge: float = 1e-3, refit: bool = True, error: bool = True) -> DataTucker:
    """Input factor B = L^-T V_r1, output factor O = leading r2 response eigenvectors, and the
    core refitted by ridge least squares to the projected target responses:

        core = argmin ||Y O - H core^T||^2 + lam ||core - core0||^2,  H = patches through B,

    with core0 = O^T W x_1 (L V_r1)^T (the closed form under the separable assumption), so a
    sample with fewer rows than unknowns still gives a sane core. The bias moves so that the
    mean output is kept: b' = b + mean(W p) - W' mean(p~). refit=False keeps core0 (no least
    squares: what the held-out trials use, since the refit dominates the cost on wide layers);
    error=False skips the error on the sample (out_error is nan), and with refit=False every
    product with the patches."""
    from scipy.linalg import solve_triangular

    w, xc = spec.w, spec.patches
    f, c = w.shape[:2]
    kernel = w.shape[2:]
    K = int(np.prod(kernel))
    n = len(xc)
    v = spec.in_vectors[:, :r1]
    b = solve_triangular(spec.chol.T, v, lower=False)      # B = L^-T V (c x R1)
    o = spec.out_vectors[:, :r2]                            # O (f x R2)
    wk = w.reshape(f, c, K)
    core0 = np.tensordot(o.T, np.tensordot(wk, spec.chol @ v, axes=(1, 0)), axes=(1, 0))  # (R2, K, R1)
    core0 = core0.transpose(0, 2, 1).reshape(r2, r1 * K)                                   # r1-major, k minor
    if refit or error:
        h = patches_through(xc, b)
    if refit:
        from scipy.linalg import solve

        t = spec.responses @ as_f32(o)                                                       # (n, R2)
        p = h.shape[1]
        if n >= p:
            gram = sample_gram(h, h)
            lam = ridge * float(np.trace(gram)) / p + 1e-12
            rhs = sample_gram(h, t) + lam * core0.T
            gram[np.diag_indices_from(gram)] += lam
            core = solve(gram, rhs, assume_a="pos", overwrite_a=True).T                    # (R2, R1*K)
        else:
            # fewer rows than unknowns (ResNet-50's 7x7 cores: 784 rows, 2304 unknowns): the same
            # solution through the n x n system, core^T = core0^T + H^T (H H^T / n + lam I)^-1
            # (T - H core0^T) / n (push-through identity); 0.37 -> 0.09 s on one of those layers
            hd = np.asarray(h, dtype=np.float64)
            k = hd @ hd.T / n
            lam = ridge * float(np.trace(k)) / p + 1e-12
            k[np.diag_indices_from(k)] += lam
            resid = (t - h @ as_f32(core0).T).astype(np.float64) / n
            core = core0 + solve(k, resid, assume_a="pos", overwrite_a=True).T @ hd
    else:
        core = core0
    # W' mean(p~) through the factors: the mean patch through B, the core, then O
    shift = spec.response_mean - o @ (core @ (b.T @ spec.mean.reshape(c, K)).reshape(-1))
    out_error = float("nan")
    if error:
        m = min(n, ERROR_ROWS)
        y = spec.responses[:m] + spec.response_mean + bias
        out_error = relative_norm((h[:m] @ core.T) @ o.T - spec.responses[:m], y)  # the centred parts differ, means match
    return DataTucker(core.reshape((r2, r1) + tuple(kernel)), o, b, shift, out_error)


def patches_through(patches: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Patch rows (n, c*K: channel-major) through the in factor B (c x R1) at every kernel
    offset: (n, R1*K), R1-major like the core's columns."""
    n, K = len(patches), patches.shape[1] // len(b)
    h = np.tensordot(as_f32(patches).reshape(n, len(b), K), as_f32(b), axes=(1, 0))  # (n, K, R1)
    return h.transpose(0, 2, 1).reshape(n, -1)


# --- the fit, chosen per layer by the output error on held-out calibration samples -------------
#
# Which fit keeps a layer's outputs best on data it was not fitted on depends on the layer: the
# sequential refit (W* = argmin ||x~ W* - x W||, corrects upstream error) can overfit a sample
# with fewer rows than inputs (EfficientNet-Lite0's 1152-channel 1x1 convs at 7x7, 16 images),
# and the whitened fit on the rewritten graph's inputs ignores upstream error. So each candidate
# is fitted on 3/4 of the calibration samples and scored on the rest, and the layer gets the
# best one as it was scored. Dropped, each for its cost (docs/tucker.md, "Three candidates
# instead of four" and "The winning trial, not a refit"): a candidate whitened on the original
# model's inputs (6 Dec 2026: within 1% on the digits CNN, the detector and EfficientNet-Lite0
# at 0.25, 1.5-2.7% worse at EfficientNet-Lite0's 0.5 / 0.75 and the detector's 3x3 convs at
# 0.5); refitting the winner on every sample; and the weight fit as a candidate (7 Dec 2026: it
# won 1 of 413 layer fits over four networks at two or three ratios each, and cost ResNet-50's
# surgery 2 s).

# Tucker-2 trials refit the core by least squares only up to this many unknowns per output
# channel (R1 * K); wider cores are scored with the closed-form core (see tucker_trials).
TRIAL_REFIT = 1024

# candidates, in the order that breaks ties
FIT_CANDIDATES = ("sequential", "residual", "data")


def held_out(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Rows kept out of the trial fits: those of every 4th calibration sample (whole samples, so
    the scored rows come from images the trials never saw; the last one when there are 2-3),
    or every 4th row when all rows come from one sample."""
    ids = np.unique(groups) if groups is not None and len(groups) == n else np.zeros(1)
    if len(ids) < 2:
        return np.arange(n) % 4 == 3
    held = ids[np.arange(len(ids)) % 4 == 3] if len(ids) >= 4 else ids[-1:]
    return np.isin(groups, held)


def splits(held: np.ndarray) -> bool:
    """Whether a sample splits into trials: a held-out row and two to fit on."""
    return held.sum() >= 1 and (~held).sum() >= 2


@dataclass
class FitChoice:
    """The fit a layer gets and the held-out output error of every candidate tried; `fit`: the
    winning trial's own fit (a LinearFit or DataTucker), which the layer gets as it was scored."""

    choice: str
    errors: dict[str, float]
    held_rows: int
    held_samples: int
    fit: object = field(default=None, repr=False, compare=False)


# a trial: train mask -> (W' as its factors (A, B) with x W' = x A B, or a function x -> x W'; the
# bias shift; the fit itself, which the layer gets when it wins)


class Trials(dict):
    """Trials (name -> trial) whose shared work is run first, as independent parts:
    shared(train mask) -> zero-argument callables (see run_parts). ahead(train mask) -> parts
    that run beside the trials: work the layer will or may need after the choice (the moments
    of every row and their Cholesky factor, which a refit on every row, select=refit, or
    through the activation reads)."""

    def __init__(self, trials: dict, shared, ahead=None):
        super().__init__(trials)
        self.shared = shared
        self.ahead = ahead or (lambda train: [])


def choose_fit(w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, groups: np.ndarray | None,
               trials: dict, bias: np.ndarray | float = 0.0, offset: np.ndarray | None = None) -> FitChoice | None:
    """The candidate whose trial factors (fitted on the training rows) give the lowest output
    error ||x~_h W' + shift - (x_h W + d_h)|| / ||x_h W + b + d_h|| on the held-out rows (d: the
    target's offset, see Sample.offset); None when the sample is too small to split (then the
    caller keeps its default)."""
    n = len(rows)
    held = held_out(groups, n)
    if not splits(held):
        return None
    xh = as_f32(rows[held])
    th = xh if target is None else as_f32(target[held])
    y = th @ as_f32(w)
    if offset is not None:
        y += as_f32(offset[held])
    ref = y + as_f32(bias)

    fits = {}

    def score(name: str) -> float:
        # (A, B): x A B costs less than forming W' = A B; or x -> x W'
        approx, shift, fits[name] = trials[name](~held)
        out = approx(xh) if callable(approx) else (xh @ as_f32(approx[0])) @ as_f32(approx[1])
        return relative_norm(out + as_f32(shift) - y, ref)

    names = [name for name in FIT_CANDIDATES if name in trials]
    ahead = []
    if isinstance(trials, Trials):
        run_parts(trials.shared(~held))
        ahead = trials.ahead(~held)
    scored = run_parts([functools.partial(score, name) for name in names] + ahead)
    errors = dict(zip(names, scored[:len(names)]))
    best = min(errors, key=lambda k: (errors[k], FIT_CANDIDATES.index(k)))
    samples = len(np.unique(groups[held])) if groups is not None and len(groups) == n else 0
    return FitChoice(best, errors, int(held.sum()), samples, fits.get(best))


class SampleMoments:
    """The moments of a linear layer's sample (x~ rows, x target rows) per split, each computed
    once: the data and sequential fits share S~ and its Cholesky factor, and the fit on every
    row pools a training split's moments with the held-out rows' (exact, see pooled) instead of
    recomputing the products; on ResNet-50's 2048-input 1x1 convs those products and the
    Cholesky factor were most of a fit."""

    def __init__(self, w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, *, centered: bool, damp: float,
                 offset: np.ndarray | None = None):
        self.w = np.asarray(w, dtype=np.float64)
        self.sources = {"data": (rows, None), "sequential": (rows, target), "residual": (rows, target)}
        self.offset = offset  # of the residual fit's targets (moments)
        self.has_target = target is not None
        self.centered, self.damp = centered, damp
        self.whitened = len(w) <= np.shape(w)[1]  # the data fit needs the Cholesky factor too
        self.cache: dict = {}

    def split(self, kind: str, rows: np.ndarray, chol: bool = False) -> Moments:
        """The moments the fit `kind` needs, of the sample rows selected by the mask `rows`; with
        `chol`, the Cholesky factor too when a fit on them will need it."""
        m = self._of(rows)
        if chol and (self.whitened or self.has_target):
            m.with_chol(self.damp)
        return m.aimed(kind) if self.has_target else m

    def _of(self, rows: np.ndarray) -> Moments:
        """Every moment of the rows selected by `rows` (computed once), as every fit's view of it
        (Moments.aimed) is taken from."""
        key = rows.tobytes()
        if key not in self.cache:
            x, t = self.sources["sequential"]
            self.cache[key] = moments(x[rows], None if t is None else t[rows], centered=self.centered, w=self.w,
                                      offset=None if t is None or self.offset is None else self.offset[rows])
        return self.cache[key]

    def parts(self, train: np.ndarray) -> list:
        """The moments of the training split (with its Cholesky factor) and of the held-out rows, as
        independent parts (run_parts), before the trials."""
        kind = "sequential" if self.has_target else "data"
        return [one_blas_thread(functools.partial(self.split, kind, train, True)),
                one_blas_thread(functools.partial(self.split, kind, ~train))]

    def ahead(self, train: np.ndarray) -> list:
        """The moments of every row and their Cholesky factor, as a part that runs beside the trials:
        both data fits read the moments; the factor serves the sequential fit, and the data fit
        too when in <= out (with in > out it goes unused when the data fit wins)."""
        return [one_blas_thread(functools.partial(self.every_row, "sequential" if self.has_target else "data", train,
                                                   True))]

    def every_row(self, kind: str, train: np.ndarray, chol: bool = False) -> Moments:
        """The moments of every row, pooled from the split `train` and the rest (computed once)."""
        key = ("every", train.tobytes())
        if key not in self.cache:
            self.cache[key] = pooled(self._of(train), self._of(~train))
        m = self.cache[key]
        if chol and (self.whitened or self.has_target):
            m.with_chol(self.damp)
        return m.aimed(kind) if self.has_target else m

    def trial(self, kind: str, train: np.ndarray) -> DataLinear:
        """The fit `kind` on the training rows `train` (a held-out trial)."""
        x, t = self.sources[kind]
        return data_linear(self.w, x[train], None if t is None else t[train], centered=self.centered,
                           damp=self.damp, stats=self.split(kind, train))


def few_rows(n: int, shape: tuple[int, int]) -> bool:
    """Whether a linear fit of W (in x out) on n sampled rows takes the row form (SampleRows):
    fewer rows than inputs, and no more outputs than inputs (its eigenproblem is out x out)."""
    return n < shape[0] and shape[1] <= shape[0]


class Computed:
    """Values computed once per key (a sample's products shared by its trials and its final fit)."""

    def __init__(self) -> None:
        self.cache: dict = {}

    def _once(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


class SampleRows(Computed):
    """The linear fits of a sample with fewer rows than inputs, in the row form: nothing in x in.

    With X the centred rows over sqrt(n) (n x in), S~ = X^T X and S = S~ + lam I, the fit aimed
    at the targets' responses T (n x out: x W for sequential, plus d for residual, x~ W for
    data) is W* = S^-1 (X^T T + lam W), truncated under S: the eigenvectors V of W*^T S W*
    (out x out) give W' = W* V_r V_r^T (the in > out route of the moment form). By Woodbury
    (push-through), with Z = X W, Q = X X^T and E = (Q + lam I)^-1 (T - Z) (n x out):

        W* = W + X^T E,    W*^T S W* = T^T (Z + Q E) + lam (W^T W + Z^T E),

    so the fit costs n x in x out products, one n x n solve and the layer's W^T W (shared by every
    split and candidate) instead of in x in moments, their Cholesky factor and in x in x out
    solves. On AlexNet's fc6 (9216 inputs, 8 calibration images) the moment form built 680 MB
    matrices and took about 160 s; on ResNet-50's 2048-input 1x1 convs at 7x7 (784 rows) it
    paid a 2048 x 2048 Cholesky factor per split."""

    def __init__(self, w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, *, centered: bool, damp: float,
                 offset: np.ndarray | None = None):
        super().__init__()
        self.w = np.asarray(w, dtype=np.float64)
        self.rows, self.target, self.offset = rows, target, offset
        self.centered, self.damp = centered, damp

    def wtw(self) -> np.ndarray:
        """W^T W (out x out), once per layer."""
        return self._once("wtw", lambda: gram(self.w.T))

    def _side(self, source: np.ndarray, rows: np.ndarray) -> tuple:
        """(X: the rows centred (unless the fit is not) over sqrt(n), float32; their mean)."""
        x = as_f32(source[rows])
        xc, mean = centred(x)
        return (xc if self.centered else x) / np.float32(np.sqrt(len(x))), mean

    def split(self, rows: np.ndarray) -> dict:
        """What every fit on the rows selected by `rows` reads (computed once per split)."""
        def make():
            x, mx = self._side(self.rows, rows)
            out = {"x": x, "mean_x": mx, "q": gram(x), "lam": damping(np.square(x, dtype=np.float64).sum(0), self.damp),
                   "z": (x @ as_f32(self.w)).astype(np.float64)}
            if self.target is not None:
                t, out["mean_t"] = self._side(self.target, rows)
                out["t"] = (t @ as_f32(self.w)).astype(np.float64)
                if self.offset is not None:
                    d, out["mean_d"] = self._side(self.offset, rows)
                    out["d"] = d.astype(np.float64)
            return out
        return self._once(("split", rows.tobytes()), make)

    def linear(self, kind: str, rows: np.ndarray) -> DataLinear:
        """The fit `kind` (data, sequential, residual) on the rows selected by `rows`."""
        from scipy.linalg import solve

        s = self.split(rows)
        z, lam = s["z"], s["lam"]
        if kind == "data" or self.target is None:
            wstar, m = self.w, z.T @ z + lam * self.wtw()
            mean_t, mean_d, d = s["mean_x"], 0.0, None
        else:
            aim = s["t"] + s["d"] if kind == "residual" and "d" in s else s["t"]
            k = s["q"].copy()
            k[np.diag_indices_from(k)] += lam
            e = solve(k, aim - z, assume_a="pos", overwrite_a=True)
            wstar = self.w + s["x"].T.astype(np.float64) @ e
            m = aim.T @ (z + s["q"] @ e) + lam * (self.wtw() + z.T @ e)
            mean_t = s["mean_t"]
            mean_d, d = (s["mean_d"], as_f32(self.offset[rows])) if kind == "residual" and "d" in s else (0.0, None)
        v, vals = _eigh_desc(m)
        x = as_f32(self.rows[rows])
        t = x if kind == "data" or self.target is None else as_f32(self.target[rows])
        return DataLinear(self.w, x, t, s["mean_x"], mean_t, WhitenedFactors(wstar, v, vals, None), self.centered,
                          d, mean_d)

    def trial(self, kind: str, train: np.ndarray) -> DataLinear:
        return self.linear(kind, train)

    def parts(self, train: np.ndarray) -> list:
        """The training split's products and W^T W, as independent parts (run_parts)."""
        return [one_blas_thread(functools.partial(self.split, train)), one_blas_thread(self.wtw)]


def linear_trials(w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, rank: int, *, centered: bool,
                  damp: float, bias: np.ndarray | float = 0.0, stats: SampleMoments | SampleRows | None = None,
                  offset: np.ndarray | None = None, ahead: bool = False) -> dict:
    """Trial fits of y = x W (+ b) at `rank` for choose_fit: sequential (x~ -> x W, when there is
    a target), residual (x~ -> x W + d, with an `offset` d, see Sample.offset) and data (whitened
    on x~). `stats`: the sample's moments, shared with the caller. `ahead`: the moments of every
    row are computed beside the trials (a refit on every row or through the activation reads
    them)."""
    stats = stats or SampleMoments(w, rows, target, centered=centered, damp=damp, offset=offset)

    def linear(kind: str):
        def trial(train):
            fit = stats.trial(kind, train).fit(rank, bias, error=False)
            return (fit.a, fit.b), fit.shift, fit
        return trial

    trials = Trials({"data": linear("data")}, shared=stats.parts, ahead=stats.ahead if ahead else None)
    if target is not None:
        trials.update(sequential=linear("sequential"))
        if stats.offset is not None:
            trials.update(residual=linear("residual"))
    return trials


class ConvSample(Computed):
    """A conv's patch sample, shared by its held-out trials and its final fit: the kernel's
    mode-1 Gram sum_k W_k^T W_k, the responses W p of the rewritten graph's patches ("rows") and
    of the original's ("target") on every row (sliced per split), and each side of
    data_channel_spectra per (side, source, split), each computed once."""

    def __init__(self, w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, damp: float,
                 offset: np.ndarray | None = None):
        self.w = np.asarray(w, dtype=np.float64)
        self.sources = {"rows": rows, "target": target, "residual": target}
        super().__init__()
        self.offset = offset  # added to the target's responses for the residual fit (Sample.offset)
        self.damp = damp

    def side(self, kind: str, source: str, rows: np.ndarray):
        """The input side ("in", of the patches of `source`) or the output side ("out", of their
        responses) on the sample rows selected by the mask `rows`."""
        if kind == "in":
            mode1 = self._once("mode1", lambda: gram(unfold(self.w, 1)))
            return self._once(("in", source, rows.tobytes()), lambda: _input_side(
                self.w, as_f32(self.sources[source][rows]), self.damp, mode1))
        y = self.responses(source)
        return self._once(("out", source, rows.tobytes()), lambda: _output_side(y[rows]))

    def responses(self, source: str) -> np.ndarray:
        """W p on every row of `source` (residual: the target's, plus the offset)."""
        if source == "residual":
            return self._once(("responses", source), lambda: self.responses("target") + as_f32(self.offset))
        return self._once(("responses", source), lambda: responses(self.w, self.sources[source]))

    # the responses each fit aims at: data x~ W, sequential x W, residual x W + d
    AIM = {"data": "rows", "sequential": "target", "residual": "residual"}

    def spectra(self, kind: str, rows: np.ndarray) -> DataChannelSpectra:
        """data_channel_spectra of the fit `kind` (data: x~ -> x~ W, sequential: x~ -> x W,
        residual: x~ -> x W + d)."""
        return _spectra(self.w, self.side("in", "rows", rows), self.side("out", self.AIM[kind], rows))

    def parts(self, train: np.ndarray) -> list:
        """The training split's sides as independent parts (run_parts), before the trials."""
        used = [("in", "rows"), ("out", "rows")] + ([("out", "target")] if self.sources["target"] is not None else []) \
            + ([("out", "residual")] if self.sources["target"] is not None and self.offset is not None else [])
        return [one_blas_thread(functools.partial(self.side, kind, source, train)) for kind, source in used]


def tucker_trials(w: np.ndarray, rows: np.ndarray, target: np.ndarray | None, r1: int, r2: int, *, damp: float,
                  bias: np.ndarray | float = 0.0, stats: ConvSample | None = None,
                  offset: np.ndarray | None = None) -> dict:
    """Trial Tucker-2 fits of a conv (patch rows, W' as (c*K x f)) for choose_fit, as
    linear_trials: sequential, residual, data. Above TRIAL_REFIT core unknowns per output (R1*K)
    the trials keep the closed-form core (data_tucker2 refit=False): the least-squares refit
    cost 3x the rest of a trial on a 512-channel 3x3 conv at R1 = 256. `stats`: the sample's
    shared products, shared with the caller."""
    K = int(np.prod(w.shape[2:]))
    # data and sequential whiten the same rows: each side is computed once per training split
    # (Trials.shared, before the trials)
    stats = stats or ConvSample(w, rows, target, damp, offset)

    def tucker(kind: str):
        @one_blas_thread
        def trial(train):
            spec = stats.spectra(kind, train)
            fit = data_tucker2(spec, r1, r2, bias, refit=r1 * K <= TRIAL_REFIT, error=False)
            core, o, b = as_f32(fit.core.reshape(r2, -1)).T, as_f32(fit.out_factor).T, fit.in_factor
            # x W' through the factors: fewer products than forming W' (c*K x f) and x W'
            return (lambda rows: (patches_through(rows, b) @ core) @ o), fit.shift, fit
        return trial

    trials = Trials({"data": tucker("data")}, shared=stats.parts)
    if target is not None:
        trials.update(sequential=tucker("sequential"))
        if stats.offset is not None:
            trials.update(residual=tucker("residual"))
    return trials


def output_error(w: np.ndarray, approx: np.ndarray, rows: np.ndarray, target: np.ndarray | None,
                 shift: np.ndarray | float = 0.0, bias: np.ndarray | float = 0.0,
                 offset: np.ndarray | None = None) -> float:
    """||x~ W' + shift - (x W + d)|| / ||x W + b + d|| on the first ERROR_ROWS sampled rows (W, W'
    as x @ W; d: the target's offset, see Sample.offset)."""
    x = np.asarray(rows[:ERROR_ROWS], dtype=np.float64)
    t = x if target is None else np.asarray(target[:ERROR_ROWS], dtype=np.float64)
    y = t @ w + (0.0 if offset is None else np.asarray(offset[:ERROR_ROWS], dtype=np.float64))
    return relative_norm(x @ approx + shift - y, y + bias)


def sample_offset(sample, outputs: int) -> np.ndarray | None:
    """The sample's target offset (Sample.offset) when the fit can use it: there is a target (the
    graph was rewritten before this layer) and it has one column per output."""
    d = getattr(sample, "offset", None)
    return d if d is not None and sample.target is not None and d.shape[1:] == (outputs,) else None


# --- one layer's data-aware fit, away from the graph --------------------------------------------
#
# Within a stage of the sequential fit every layer's sample is drawn before any of them is
# rewritten, so their fits are independent: the plugins hand them to run_parallel as closures
# over fit_linear / fit_tucker and splice the results in one by one afterwards.

@dataclass
class LayerFit:
    """A layer's data-aware fit: its ranks, or why it is left alone (`skip`), the factors
    (linear: (A, B) with x W ~ x A B; Tucker-2: (core, O, I)), the bias shift (None: keep the
    bias), the output error on the sampled rows, which fit it got and the held-out choice."""

    ranks: tuple[int, ...]
    skip: str | None = None
    factors: tuple = ()
    shift: np.ndarray | None = None
    out_error: float = float("nan")
    kind: str = ""
    choice: FitChoice | None = None
    values: np.ndarray | None = None  # the spectrum of the fit the layer got (linear)
    through: object = None            # surgeon.clipped_fit.ClippedFit: the refit to the clipped output


def fit_linear(w: np.ndarray, sample, rank_of, *, refuse=None, centered: bool = True,
               damp: float = 1e-2, select: str = "heldout", bias: np.ndarray | float = 0.0,
               spectrum: bool = True, clip=None) -> LayerFit:
    """The data-aware rank-r fit of y = x W (+ b) on a layer_stats.Sample.

    rank_of(values) -> r reads the sequential fit's spectrum on every row (spectrum=False: the
    rank does not depend on it, rank_of(None), and with select=heldout no fit on every row is
    needed when the sample splits: the layer gets the held-out trial that won); refuse(r) ->
    reason or None.
    `clip` (a surgeon.clipped_fit.Clip): the activation that alone reads
    the layer's output; a data-aware fit is then refined to the clipped output (centred fits).
    With a Sample.offset d, one more candidate, residual, aims at x W + d, and every candidate is
    scored against x W + d (the residual Add's output)."""
    from surgeon.clipped_fit import refine, refits_whole

    rows, target = sample.rows, sample.target
    offset = sample_offset(sample, w.shape[1])
    held = held_out(sample.groups, len(rows))
    # fewer rows than inputs: the row form, for every fit; otherwise, with held-out trials, every
    # fit's moments are pooled from the splits' (shared with the trials)
    few = few_rows(len(rows), w.shape)
    # one candidate (no rewrite upstream yet, so no target): nothing to choose, fitted on every row
    choosing = select in ("heldout", "refit") and target is not None
    stats = SampleRows(w, rows, target, centered=centered, damp=damp, offset=offset) if few else \
        SampleMoments(w, rows, target, centered=centered, damp=damp, offset=offset) \
        if choosing and splits(held) else None

    def full(kind: str) -> DataLinear:  # the fit of `kind` on every sampled row
        if few:
            return stats.linear(kind, np.ones(len(rows), dtype=bool))
        stats_all = stats.every_row(kind, ~held) if stats is not None else None
        # sequential: aimed at the original outputs (residual: plus the offset); data: whitened on
        # the rewritten graph's inputs
        return data_linear(w, rows, None if kind == "data" else target, centered=centered, damp=damp,
                           stats=stats_all, offset=offset if kind == "residual" else None)

    first = "sequential" if target is not None else "data"
    factors = full(first) if spectrum else None
    r = rank_of(factors.values if factors is not None else None)
    why = refuse(r) if refuse is not None else None
    if why:
        return LayerFit((r,), why)
    kind, choice = first, None
    if choosing:
        trials = linear_trials(w, rows, target, r, centered=centered, damp=damp, bias=bias, stats=stats,
                               offset=offset, ahead=not few and (select == "refit" or clip is not None and centered
                                                                 and refits_whole(*rows.shape)))
        choice = choose_fit(w, rows, target, sample.groups, trials, bias, offset)
        kind = choice.choice if choice is not None else kind
    if choice is not None and select == "heldout" and not (factors is not None and kind == first):
        # the winning trial's factors, as they were scored: the refit on every row (select=refit)
        # cost ResNet-50's surgery about 2 s of 12 and lowered the held-out drift by up to 4%.
        # (With ranks by energy the first candidate's fit on every row is there already.)
        fitted = choice.fit
        aim = offset if kind == "residual" else None
        fitted = replace(fitted, out_error=output_error(w, fitted.a @ fitted.b, rows, target, fitted.shift, bias, aim))
        values = fitted.values
    else:
        if factors is None or kind != first:
            factors = full(kind)
        fitted = factors.fit(r, bias)
        values = factors.values
    if clip is None or not centered:
        return LayerFit((r,), None, (fitted.a, fitted.b), fitted.shift if centered else None, fitted.out_error, kind,
                        choice, values)

    # the Cholesky factor of S~ + damping, where a fit computed it already, when the refit reads it
    chol = None if not refits_whole(*rows.shape) else \
        stats.every_row(kind, ~held, chol=True).chol if stats is not None else factors.factors.chol
    # aimed at the original model's outputs whichever fit won (aimed at x~ W after a data fit,
    # EfficientNet-Lite0 drifted 0.627 / 0.504 at ratio 0.25 / 0.5 instead of 0.567 / 0.473)
    aim = offset if kind == "residual" else None
    y = as_f32(rows if target is None else target) @ as_f32(w) + as_f32(bias) + (0 if aim is None else as_f32(aim))
    through = refine(clip, rows, y, fitted.a, fitted.b, bias + fitted.shift, w, damp=damp, chol=chol)
    shift = through.bias - bias
    error = output_error(w, through.a @ through.b, rows, target, shift, bias, aim) if through.kept \
        else fitted.out_error
    return LayerFit((r,), None, (through.a, through.b), shift, error, kind, choice, values, through=through)


def fit_tucker(w: np.ndarray, sample, ranks_of, *, refuse=None, damp: float = 1e-2,
               select: str = "heldout", bias: np.ndarray | float = 0.0, spectrum: bool = True,
               clip=None) -> LayerFit:
    """The data-aware Tucker-2 of a conv kernel w (f, c, *k) on a sample of its patches.

    ranks_of(in_values, out_values) -> (R1, R2) reads the data-aware spectra (spectrum=False:
    ranks_of(None, None), as fit_linear); refuse(R1, R2) -> reason or None. `clip`: as fit_linear's; with
    the input factor fixed, the core and output factor are a rank-R2 map of the patches through
    it, refined like a linear layer. With a Sample.offset d, as fit_linear: a residual candidate
    aims at W p + d."""
    rows, target = sample.rows, sample.target
    f = w.shape[0]
    offset = sample_offset(sample, f)
    stats = ConvSample(w, rows, target, damp, offset)
    every = np.ones(len(rows), dtype=bool)

    def full(kind: str) -> DataChannelSpectra:
        return stats.spectra(kind, every)

    first = "sequential" if target is not None else "data"
    spec = full(first) if spectrum else None
    r1, r2 = ranks_of(spec.in_values, spec.out_values) if spec is not None else ranks_of(None, None)
    why = refuse(r1, r2) if refuse is not None else None
    if why:
        return LayerFit((r1, r2), why)
    kind, choice = first, None
    flat = w.reshape(f, -1).T
    if select in ("heldout", "refit") and target is not None:  # (without a target, data is the one candidate)
        choice = choose_fit(flat, rows, target, sample.groups,
                            tucker_trials(w, rows, target, r1, r2, damp=damp, bias=bias, stats=stats), bias, offset)
        kind = choice.choice if choice is not None else kind
    if choice is not None and select == "heldout" and not (spec is not None and kind == first):
        fitted = choice.fit  # the winning trial's factors, as they were scored (see fit_linear)
        approx = tucker2_full(fitted.core, fitted.out_factor, fitted.in_factor).reshape(f, -1).T
        fitted = replace(fitted, out_error=output_error(flat, approx, rows, target, fitted.shift, bias,
                                                        offset if kind == "residual" else None))
    else:
        if spec is None or kind != first:
            spec = full(kind)
        fitted = data_tucker2(spec, r1, r2, bias)
    if clip is None:
        return LayerFit((r1, r2), None, (fitted.core, fitted.out_factor, fitted.in_factor), fitted.shift,
                        fitted.out_error, kind, choice)
    from surgeon.clipped_fit import refine

    h = patches_through(rows, fitted.in_factor)  # (n, R1*K): what the core reads
    core = fitted.core.reshape(r2, -1).T
    # responses W p, centred: the original model's (plus the offset after a residual fit) whichever fit won
    y = stats.side("out", "rows" if target is None else "residual" if kind == "residual" else "target", every)
    through = refine(clip, h, y[0] + y[1] + as_f32(bias), core, fitted.out_factor.T, bias + fitted.shift,
                     core @ fitted.out_factor.T, damp=damp)
    core, out = through.a.T.reshape(fitted.core.shape), through.b.T
    shift = through.bias - bias
    error = fitted.out_error
    if through.kept:
        approx = tucker2_full(core, out, fitted.in_factor).reshape(f, -1).T
        error = output_error(flat, approx, rows, target, shift, bias, offset if kind == "residual" else None)
    return LayerFit((r1, r2), None, (core, out, fitted.in_factor), shift, error, kind, choice, through=through)
