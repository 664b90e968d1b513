"""Low-rank building blocks shared by the factorizing plugins (tucker, svd).

Truncated SVD here goes through the Gram matrix: for A (m x n) with m <= n, the leading
eigenvectors of A A^T (m x m) are A's leading left singular vectors, and the eigenvalues its
squared singular values. For the wide unfoldings of conv kernels (512 x 4608) this is one
GEMM plus a small eigh, measured ~15x faster than numpy's SVD (0.29 s vs 4.6 s in float64
on a 2-core machine), and it is exact where we need it (full rank reproduces A).
Everything runs in float64: the weights are float32, but the factors are computed once.

Rank choice is in surgeon.rank_choice; factors fitted to calibration data are in
surgeon.data_factors and surgeon.data_fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from surgeon import parallel
from surgeon.parallel import single_blas_thread


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
    return evecs * column_signs(evecs), s


def _blas_threads(n: int):
    """One BLAS thread for a symmetric eigensolver below LARGE_GRAM, two from it on."""
    if n < LARGE_GRAM or parallel.pinned():
        return single_blas_thread()
    return parallel.blas_threads(2)


def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """Mode-n unfolding: the mode-n fibres as columns, shape (w.shape[mode], -1)."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


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
    so, si = column_signs(o2), column_signs(i2)
    o2, i2 = o2 * so, i2 * si
    core2 = tucker2_core(w, o2, i2)
    # keep HOOI only if it helped (it should; guard against a tolerance-induced step back)
    if relative_error(w, tucker2_full(core2, o2, i2)) <= relative_error(w, tucker2_full(core, o, i)):
        return core2, o2, i2
    return core, o, i


def column_signs(m: np.ndarray) -> np.ndarray:
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
