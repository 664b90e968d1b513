"""A low-rank fit of a layer refined to what the next layer sees: its output after a clip.

When a Relu or Clip(lo, hi) (ReLU6) alone reads a layer's output, the error that reaches the
rest of the network is r(x~ W' + b') - r(x W + b) with r the clip, not the pre-activation
error the linear fit minimises: a negative output the Relu zeroes can be missed at no cost, a
clipped one costs everything. Zhang et al. ("Accelerating Very Deep Convolutional Networks
for Classification and Detection", 2015, section 3.2) fit the rank-r M to the clipped responses
by relaxing

    min_M sum ||r(y) - r(x~ M + c)||^2   to   min_{M, z} sum ||r(y) - r(z)||^2 + lam ||z - (x~ M + c)||^2

and alternating: z elementwise in closed form (through_clip), then M by the same whitened
reduced-rank regression as the linear fit, aimed at z instead of y; lam grows so that z ends
on the layer's actual outputs. The refit starts from the layer's data-aware fit, and the layer
gets the iterate with the lowest clipped error on the sampled rows (the start when none is
lower), so it never does worse there. The error of each iterate comes free with the next z
step, which computes its outputs anyway. On ResNet-50 (seeded weights) 31 of 32 refits were best
after the lam = 0.01 steps, and the lam = 1 steps raised the error again (0.0851 -> 0.0890);
keeping the last iterate, EfficientNet-Lite0 drifted 0.5404 / 0.4835 at ratio 0.25 / 0.5
against 0.5358 / 0.4753 with the best.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from surgeon.data_factors import as_f32, centred, damping, regularised, sample_gram, whitened_target
from surgeon.parallel import one_blas_thread, run_parts, single_blas_thread

# lam per iteration: Zhang et al. use 25 at 0.01, then 25 at 1. Five of each measured as good on
# EfficientNet-Lite0 (6 Dec 2026, tucker, refitting its 1x1 convs, held-out drift at ratio 0.25 /
# 0.5 / energy 0.8: 5+5 0.567 / 0.473 / 0.642, 25+25 0.592 / 0.471 / 0.632, 3+3 0.562 / 0.475 /
# 0.645, no refit 0.602 / 0.528 / 0.756) at a fifth of the cost. Three of each since 7 Dec 2026,
# with the best iterate kept (below): EfficientNet-Lite0 at 0.25 over seeds 0 / 1 / 2 drifted
# 0.5367 / 0.5434 / 0.5485 against 0.5358 / 0.5560 / 0.5498 with 5+5, at 0.5 0.4757 against
# 0.4753, the digits CNN at 1/8 0.1729 against 0.1710, and ResNet-50's surgery took 13.4 s
# against 15.2 s. (5+0, 4+0, 3+1 and 2+2 were within 2% of these at 0.25.)
SCHEDULE = (0.01,) * 3 + (1.0,) * 3


@dataclass(frozen=True)
class Clip:
    """The elementwise clip after a layer: Relu is Clip(0, inf)."""

    lo: float
    hi: float
    op: str = "Clip"

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return np.clip(y, self.lo, self.hi)

    def describe(self) -> str:
        return "Relu" if self.op == "Relu" else f"Clip({self.lo:g}, {self.hi:g})"


def through_clip(ry: np.ndarray, u: np.ndarray, lam: float, clip: Clip) -> np.ndarray:
    """argmin_z (ry - r(z))^2 + lam (z - u)^2 for every element (ry = r(y) inside [lo, hi]).

    On [lo, hi] the minimiser is m = ry - k (ry - u), k = lam / (1 + lam), clipped to the
    interval. Below lo, r(z) = lo and the best z is min(u, lo): it can only win when u < lo,
    with z = u and cost (ry - lo)^2 against k (ry - u)^2 for m (or more, when m is clipped,
    which happens only if ry - lo < k (ry - u)); so z = u exactly where ry - lo < sqrt(k)
    (ry - u), which implies u < lo. Above hi likewise: z = u where hi - ry < sqrt(k) (u - ry).
    (Float32 and in place: this runs on every sampled output in every iteration.)"""
    k = np.float32(lam / (1 + lam))
    d = np.subtract(ry, u)
    z = d * -k
    z += ry
    np.clip(z, np.float32(clip.lo), np.float32(clip.hi), out=z)
    d *= np.sqrt(k)
    if np.isfinite(clip.lo):
        np.copyto(z, u, where=(ry - np.float32(clip.lo)) < d)
    if np.isfinite(clip.hi):
        np.negative(d, out=d)
        np.copyto(z, u, where=(np.float32(clip.hi) - ry) < d)
    return z


@dataclass
class ClippedFit:
    """A rank-r fit refined to the clipped output, and the clipped error before and after."""

    clip: Clip
    a: np.ndarray      # (in, r)
    b: np.ndarray      # (r, out): x W' = x A B
    bias: np.ndarray   # (out,) the layer's new bias
    before: float      # ||r(x~ W' + b') - r(x W + b)|| / ||r(x W + b)|| of the starting fit
    after: float       # the same for the result (<= before)
    kept: bool         # whether the refit was kept
    errors: tuple[float, ...] = ()  # the clipped error of every iterate, the start first


@one_blas_thread
def refit_through(clip: Clip, x: np.ndarray, y: np.ndarray, rank: int, a: np.ndarray, b: np.ndarray,
                  bias: np.ndarray, anchor: np.ndarray, *, damp: float, chol: np.ndarray | None = None,
                  schedule: tuple[float, ...] = SCHEDULE) -> ClippedFit:
    """Refine the rank-r fit x A B + bias of the pre-activation target y (rows x out, the
    original model's outputs; x: the rows the layer reads in the rewritten graph) to r(y).
    Each M step is the linear fit's problem with z for y, W* = (S~ + damping)^-1
    (E[x_c^T z_c] + damping anchor), truncated under S~ (S~ the covariance of x): with a clip
    that never bites z = y and the linear fit is a fixed point. `chol`: the Cholesky factor of
    regularised(S~, damp), when the caller has it."""
    from scipy.linalg import cho_solve, solve_triangular

    x = as_f32(x)
    ry = clip(as_f32(y))
    xc, mx = centred(x)
    n, d_in = x.shape
    lam_d = damping(np.square(xc, dtype=np.float64).mean(0), damp)
    anchor0 = np.asarray(anchor, dtype=np.float64)
    # At the rank of its inputs (the second factor's refit, see refine) the truncation keeps all
    # of W*, which needs no eigendecomposition (on AlexNet's fc6: ten of 1418 x 1418 per refit).
    # With fewer rows than inputs too, W* comes from the rows (push-through, as data_fit.SampleRows):
    # W* = A0 + X^T (X X^T + lam I)^-1 (Z - X A0), X and Z the centred rows over sqrt(n) (two
    # 1418 x 1418 x 4096 triangular solves per iteration there otherwise: 11 of 15 s).
    whole = rank == d_in
    rowform = whole and n < d_in
    if rowform:
        xs = xc.astype(np.float64) / np.sqrt(n)
        kk = xs @ xs.T
        kk[np.diag_indices_from(kk)] += lam_d
        with single_blas_thread():
            kchol = np.linalg.cholesky(kk)
        xa = xs @ anchor0
    elif chol is None:
        with single_blas_thread():
            chol = np.linalg.cholesky(regularised(sample_gram(xc, xc), damp))
    anchor = lam_d * anchor0

    def outputs(rows, a_, b_, c_):
        return (x[rows] @ as_f32(a_)) @ as_f32(b_) + as_f32(c_)

    def miss(rows, u):  # the squared clipped error of the outputs u on these rows
        return float(np.square(clip(u) - ry[rows], dtype=np.float64).sum())

    def z_step(rows, a_, b_, c_, lam):
        """-> (x_c^T z, sum z) (or (z, sum z) in the row form) on these rows, and the squared
        clipped error of the iterate (a_, b_, c_) there: its outputs are at hand."""
        u = outputs(rows, a_, b_, c_)
        z = through_clip(ry[rows], u, lam, clip)
        return z if rowform else xc[rows].T @ z, z.sum(0, dtype=np.float64), miss(rows, u)

    # the z step and its products on two fixed halves of the rows: parts an idle worker can take
    # (run_parts) when a stage's other fits are done, the same sums whichever thread runs them
    every = slice(None)
    halves = [slice(0, n // 2), slice(n // 2, n)]
    sum_x = xc.sum(0, dtype=np.float64)
    first = (a, b, np.asarray(bias, dtype=np.float64))
    scale = float(np.linalg.norm(ry)) or 1.0
    errors, iterates = [], []
    c = first[2]
    for lam in schedule:
        (p0, s0, m0), (p1, s1, m1) = run_parts([functools.partial(z_step, h, a, b, c, np.float32(lam))
                                                for h in halves])
        errors.append(np.sqrt(m0 + m1) / scale)  # of the iterate this step started from
        iterates.append((a, b, c))
        mz = (s0 + s1) / n
        if rowform:
            zc = (np.concatenate([p0, p1]).astype(np.float64) - mz) / np.sqrt(n)
            a, b = np.eye(d_in), anchor0 + xs.T @ cho_solve((kchol, True), zc - xa)
        else:
            cross = (p0.astype(np.float64) + p1 - np.outer(sum_x, mz)) / n  # E[x_c^T z_c]
            target = solve_triangular(chol, cross + anchor, lower=True)
            a, b = (np.eye(d_in), solve_triangular(chol.T, target, lower=False)) if whole else \
                whitened_target(target, chol).pair(rank)
        c = mz - (mx @ a) @ b
    errors.append(np.sqrt(miss(every, outputs(every, a, b, c))) / scale)  # the last iterate's
    iterates.append((a, b, c))
    # the iterate with the lowest clipped error on the sampled rows: the lam = 1 steps raised it
    # again on 31 of 32 of ResNet-50's refits (5 + 5 steps, their minimum after the lam = 0.01 ones)
    best = int(np.argmin(errors))
    errors = tuple(float(e) for e in errors)
    return ClippedFit(clip, *iterates[best], errors[0], errors[best], True, errors) if best > 0 else \
        ClippedFit(clip, *first, errors[0], errors[0], False, errors)


# The whole factorization is refitted when it reads at most this many inputs and the rows
# outnumber them (fewer rows than inputs leave the regression to the damping: ResNet-50's 7x7
# Tucker-2 cores, 784 rows for 2304 inputs, fell from 0.076 to 0.021 clipped error on the
# sample); otherwise only the second factor and the bias, on the first factor's outputs
# (rows x r x out per iteration instead of rows x in x out and in^2 x out). Measured 6 Dec 2026
# on ResNet-50 with its batch norms folded (onnxruntime's basic optimizations; 16 photos, tucker
# 0.5, random weights): data-aware surgery 18 s without the refit, 41 s refitting every
# factorization whole, 22 s refitting only second factors, 24 s with this limit.
# EfficientNet-Lite0 (every layer below it) drifted 0.556 / 0.473 / 0.641 at ratio 0.25 / 0.5 /
# energy 0.8 with whole refits, 0.560 / 0.477 / 0.676 with second factors only.
WHOLE_REFIT = 512


def refits_whole(n: int, d_in: int) -> bool:
    """Whether refine refits the whole factorization of a layer with `d_in` inputs on n rows."""
    return n >= d_in and d_in <= WHOLE_REFIT


def refine(clip: Clip, x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, bias: np.ndarray,
           anchor: np.ndarray, *, damp: float, chol: np.ndarray | None = None) -> ClippedFit:
    """refit_through on the whole rank-r factorization x A B + bias (`anchor`, `chol` as there),
    or, with more inputs than WHOLE_REFIT or fewer rows than inputs, on B and the bias alone
    with the rows through A: the result's A is then A A' (r x r A')."""
    r = b.shape[0]
    if refits_whole(*np.shape(x)):
        return refit_through(clip, x, y, r, a, b, bias, anchor, damp=damp, chol=chol)
    out = refit_through(clip, as_f32(x) @ as_f32(a), y, r, np.eye(r), b, bias, b, damp=damp)
    out.a = a @ out.a
    return out


__all__ = ["Clip", "ClippedFit", "SCHEDULE", "WHOLE_REFIT", "refine", "refits_whole", "refit_through", "through_clip"]
