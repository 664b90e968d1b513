"""Rank choice shared by the factorizing plugins (tucker, svd): by ratio, by energy, by VBMF,
rounded up to a multiple, and the options that select among them, so that every factorizing
plugin offers the same options with the same meaning."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np


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
