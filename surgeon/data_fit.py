"""One layer's data-aware fit: the candidates (sequential refit, data-aware on the rewritten
graph's inputs, aimed at a residual sum) fitted on part of the calibration samples and scored on
the rest, and the fit the layer gets, away from the graph (the plugins run these fits in
parallel and splice the results in)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from surgeon.data_factors import (DataChannelSpectra, DataLinear, Moments, WhitenedFactors, as_f32, centred, damping,
                                   data_linear, data_tucker2, eigh_desc, input_side, moments, output_error, output_side,
                                   patches_through, pooled, relative_norm, responses, spectra_of, through_pair)
from surgeon.lowrank import gram, unfold
from surgeon.parallel import one_blas_thread, run_parts


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
        v, vals = eigh_desc(m)
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
            return self._once(("in", source, rows.tobytes()), lambda: input_side(
                self.w, as_f32(self.sources[source][rows]), self.damp, mode1))
        y = self.responses(source)
        return self._once(("out", source, rows.tobytes()), lambda: output_side(y[rows]))

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
        return spectra_of(self.w, self.side("in", "rows", rows), self.side("out", self.AIM[kind], rows))

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
            return through_tucker2(fit.core, fit.out_factor, fit.in_factor), fit.shift, fit
        return trial

    trials = Trials({"data": tucker("data")}, shared=stats.parts)
    if target is not None:
        trials.update(sequential=tucker("sequential"))
        if stats.offset is not None:
            trials.update(residual=tucker("residual"))
    return trials


def through_tucker2(core: np.ndarray, out_factor: np.ndarray, in_factor: np.ndarray
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """x -> x W' for patch rows x (n, c*K, channel-major) and the Tucker-2 triple of W', in
    float32 like the sample: the patches through I at every kernel offset, then the core, then
    O. Forming W' (f x c*K) and x W' took twice the products on ResNet-50's 512-channel 3x3
    convs."""
    flat_core = as_f32(core.reshape(core.shape[0], -1)).T  # (R1*K, R2), R1-major like the patches through I
    o = as_f32(out_factor).T
    return lambda x: (patches_through(x, in_factor) @ flat_core) @ o


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
        if clip is None or not centered:  # (otherwise the error is taken after the refit, below)
            fitted = replace(fitted, out_error=output_error(w, through_pair(fitted.a, fitted.b), rows, target,
                                                            fitted.shift, bias, aim))
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
    if through.kept:
        error = output_error(w, through_pair(through.a, through.b), rows, target, shift, bias, aim)
    elif choice is not None and fitted is choice.fit:  # the winning trial's error, deferred above
        error = output_error(w, through_pair(fitted.a, fitted.b), rows, target, fitted.shift, bias, aim)
    else:
        error = fitted.out_error
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

    def known() -> np.ndarray:  # W p of the original model's patches, which the fits computed already
        return stats.responses("rows" if target is None else "target")

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
        if clip is None:  # (otherwise the error is taken after the refit, below)
            fitted = replace(fitted, out_error=output_error(
                flat, through_tucker2(fitted.core, fitted.out_factor, fitted.in_factor), rows, target, fitted.shift,
                bias, offset if kind == "residual" else None, known()))
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
    aim = offset if kind == "residual" else None
    if through.kept:
        error = output_error(flat, through_tucker2(core, out, fitted.in_factor), rows, target, shift, bias, aim,
                             known())
    elif choice is not None and fitted is choice.fit:  # the winning trial's error, deferred above
        error = output_error(flat, through_tucker2(fitted.core, fitted.out_factor, fitted.in_factor), rows, target,
                             fitted.shift, bias, aim, known())
    else:
        error = fitted.out_error
    return LayerFit((r1, r2), None, (core, out, fitted.in_factor), shift, error, kind, choice, through=through)
