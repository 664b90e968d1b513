"""Data-aware low-rank factors: keep a layer's outputs on the calibration data, not its weights
(issue 13). Whitened truncated SVD for linear layers (ASVD / SVD-LLM), Tucker-2 with the input
factor from the input channels' covariance as the kernel sees them, the output factor from the
responses' covariance and the core refitted to the responses (Zhang et al. 2015), and the
sample moments these fits read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from surgeon.lowrank import column_signs, gram, unfold
from surgeon.parallel import one_blas_thread, single_blas_thread


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


def eigh_desc(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (sign-fixed columns) and square-rooted eigenvalues of a symmetric PSD
    matrix, in descending order."""
    with single_blas_thread():
        evals, evecs = np.linalg.eigh((sym + sym.T) / 2)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    return evecs * column_signs(evecs), np.sqrt(np.clip(evals, 0.0, None))


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
        v, vals = eigh_desc(w.T @ s @ w)
        return WhitenedFactors(w, v, vals, None)
    if chol is None:
        with single_blas_thread():
            chol = np.linalg.cholesky(s)
    lw = chol.T @ w
    u, vals = eigh_desc(gram(lw))
    return WhitenedFactors(w, u, vals, chol, lw)


def whitened_target(m: np.ndarray, chol: np.ndarray) -> "WhitenedFactors":
    """Factors W' = L^-T M_r for a whitened target M (in x out), M_r its truncated SVD."""
    if m.shape[0] > m.shape[1]:
        v, vals = eigh_desc(m.T @ m)
        from scipy.linalg import solve_triangular
        # M_r = M V V^T, so W' = (L^-T M V) V^T: store L^-T M as the "w" of the out-side route
        return WhitenedFactors(solve_triangular(chol.T, m, lower=False), v, vals, None)
    u, vals = eigh_desc(gram(m))
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


def output_error(w: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
                 target: np.ndarray | None, shift: np.ndarray | float = 0.0, bias: np.ndarray | float = 0.0,
                 offset: np.ndarray | None = None, responses: np.ndarray | None = None) -> float:
    """||x~ W' + shift - (x W + d)|| / ||x W + b + d|| on the first ERROR_ROWS sampled rows (W as
    x @ W; predict(x~) = x~ W' through the factors, which costs less than forming W'; d: the
    target's offset, see Sample.offset). `responses`: x W on the sampled rows (the first
    ERROR_ROWS are read) when the caller has them: a conv's ConvSample computed them for its fits. In float32 like the sample: it is a report
    figure, and on ResNet-50 (tucker 0.5, 16 photos) these errors took 1.1 s of the data-aware
    surgery's CPU in float64, 0.3 s now."""
    m = ERROR_ROWS
    x = as_f32(rows[:m])
    y = as_f32(responses[:m]) if responses is not None else as_f32(x if target is None else target[:m]) @ as_f32(w)
    if offset is not None:
        y = y + as_f32(offset[:m])
    return relative_norm(predict(x) + as_f32(shift) - y, y + as_f32(bias))


def through_pair(a: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """x -> x A B, in float32 like the sample."""
    a, b = as_f32(a), as_f32(b)
    return lambda x: (x @ a) @ b


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
        return LinearFit(a, b, shift, output_error(self.w, through_pair(a, b), self.x, self.t, shift, bias, self.d),
                         self.values)


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
    return spectra_of(w, input_side(w, x, damp), output_side(responses(w, x if target_patches is None else
                                                                         target_patches)))


def responses(w: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """y = W p for patch rows (n, c*K): (n, f), float32 like the patches."""
    return as_f32(patches) @ as_f32(np.reshape(w, (w.shape[0], -1))).T


def input_side(w: np.ndarray, x: np.ndarray, damp: float, mode1: np.ndarray | None = None) -> tuple:
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
    return (xc, mu, chol, *eigh_desc(chol.T @ m @ chol))


def output_side(y: np.ndarray) -> tuple:
    """(centred responses y = W p of the target patches, their mean, output eigenvectors, values)."""
    y, ymean = centred(as_f32(y))
    return (y, ymean, *eigh_desc(sample_gram(y, y)))


def spectra_of(w: np.ndarray, inputs: tuple, outputs: tuple) -> DataChannelSpectra:
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
