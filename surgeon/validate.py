"""What the surgery did, measured with onnxruntime: output drift and latency.

Drift cannot be fooled by broken outputs: NaN/Inf anywhere in an output is a field
(`non_finite`, the count), and every budget fails on it (surgeon.budgets); top-1 agreement
counts only the rows whose original scores have a unique maximum (a tie has no top-1) and
says how many (`agreement_rows`), a candidate row with a tied maximum counts as a
disagreement; an output that is the same value everywhere is flagged (`constant`).

Latency runs both models interleaved (A, B, B, A, ...) after a warm-up, so that a machine
that speeds up or slows down during the run moves both the same way; the latency ratio is the
median of the per-pair ratios t_candidate / t_original with its distribution-free 95%
interval (order statistics n/2 -+ 1.96 sqrt(n)/2 of the sorted ratios).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from surgeon.calibration import DataSet
from surgeon.errors import ModelError, RuntimeLoadError, SurgeonError

log = logging.getLogger(__name__)


def ort_message(exc: BaseException) -> str:
    """onnxruntime's exception as one readable line: without the "[ONNXRuntimeError] : 1 : FAIL :"
    prefix, the C++ source location and "Non-zero status code returned while running"."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    text = " ".join(text.split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ",
                  r"node '\2' (\1): ", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (\S+ )*?\S+\([^)]*\) ", "", text)
    return text[:300]


def session(model: onnx.ModelProto | bytes | str, threads: int = 0, profile_dir: str | None = None,
            initializers: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A CPU session; `threads` 0 lets onnxruntime pick (all cores). With `profile_dir`,
    onnxruntime writes each kernel's time there (`end_profiling()` gives the file).
    `initializers`: the values of initializers the model declares as external data
    (surgeon.model.detach_large), handed over in memory."""
    so = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(v) for v in (initializers or {}).values()]
    if values:
        so.add_external_initializers(list(initializers), values)
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "profile")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # fatal only: a failed run becomes our one-line error, not a red log line
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads that spin after a run steal the cores from the next session's run: with two
    # sessions timed interleaved (A/B, the guard) a 37 ms detector measured 62 ms and the 95%
    # interval of its ratio to itself was 0.65-1.63; without spinning, 37.5 ms and 0.99-1.02.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RuntimeLoadError(f"onnxruntime cannot load the model: {ort_message(exc)}") from None
    sess._surgeon_initializers = values  # the session reads them: they live as long as it does
    return sess


def run(sess: ort.InferenceSession, data: DataSet, batch_size: int = 32) -> list[np.ndarray]:
    """All outputs over the whole data set, one row per sample (axis 0; see by_sample)."""
    outs: list[list[np.ndarray]] = []
    counts: list[int] = []
    for feed in data.batches(batch_size):
        try:
            res = sess.run(None, feed)
        except Exception as exc:
            raise SurgeonError(f"onnxruntime failed to run the model: {ort_message(exc)}") from None
        if not outs:
            outs = [[] for _ in res]
        counts.append(1 if data.stacked else len(next(iter(feed.values()))))
        for acc, r in zip(outs, res):
            acc.append(r)
    return [by_sample(o, counts) for o in outs]


def by_sample(parts: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """One output's values from consecutive runs (run i fed counts[i] samples) joined with the
    samples along axis 0, so that a row is a sample: the bootstrap over rows then resamples
    samples. The sample axis is axis 0 when its size is the sample count in every run; else the
    one other axis that is (the OCR recognizer's per-step scores [T, 1, C] become [N, T, C]:
    concatenated along axis 0, 32 lines made 1024 rows of time steps, and their drift interval
    was a quarter as wide as over the lines); else, when every run is one sample, the runs are
    stacked (an output without a batch axis). An output that fits none of these (a reduction
    over the batch) is concatenated along axis 0, as it comes."""
    shapes = [p.shape for p in parts]
    if not parts[0].ndim:
        return np.stack(parts)
    if all(s[0] == n for s, n in zip(shapes, counts)):
        return np.concatenate(parts)
    axes = [k for k in range(1, parts[0].ndim) if all(len(s) > k and s[k] == n for s, n in zip(shapes, counts))]
    if len(axes) == 1:
        return np.concatenate([np.moveaxis(p, axes[0], 0) for p in parts])
    if all(n == 1 for n in counts) and len(set(shapes)) == 1:
        return np.stack(parts)
    return np.concatenate(parts)


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate `tensors` (types left to onnxruntime)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))  # onnxruntime fills in type and shape
            have.add(t)
    return m


# rows per onnxruntime run when streaming activations (data without a batch of its own): enough
# to amortise a run, few enough that one batch of a detector's activations stays small
STREAM_BATCH = 8


def stream_tensors(model: onnx.ModelProto, tensors: Iterable[str], data: DataSet, *, batch: int = STREAM_BATCH,
                   threads: int = 0, initializers: dict[str, np.ndarray] | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Run `model` over `data` batch by batch and yield {tensor: value} for the named tensors
    (graph inputs, intermediate tensors or outputs). Only one batch of activations is held at a
    time, so statistics over large calibration sets stay within memory: accumulate as you go.
    `initializers`: as session's."""
    tensors = list(dict.fromkeys(tensors))
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    sess = session(with_outputs(model, fetch), threads, initializers=initializers)
    names = [o.name for o in sess.get_outputs()]
    for feed in data.batches(batch):
        try:
            res = dict(zip(names, sess.run(None, feed)))
        except Exception as exc:
            raise SurgeonError(f"onnxruntime failed to run the model: {ort_message(exc)}") from None
        res.update(feed)
        yield {t: res[t] for t in tensors}


def as_scores(a: np.ndarray) -> np.ndarray | None:
    """Class scores (N, C) with C > 1 (logits or probabilities), also when a conv classifier
    returns them as (N, C, 1, 1) (SqueezeNet: its trailing axes are dropped); None otherwise.
    Only trailing size-1 axes go: (T, 1, C), a sequence model's per-step scores, is no (N, C)."""
    a = np.asarray(a)
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a.reshape(a.shape[:-1])
    return a if a.ndim == 2 and a.shape[1] > 1 else None


def looks_like_scores(a: np.ndarray) -> bool:
    """Whether `a` is class scores (as_scores)."""
    return as_scores(a) is not None


def unique_top1(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax per row, whether that maximum is unique): a row with a tie has no top-1."""
    s = as_scores(scores)
    top = s.argmax(1)
    best = s.max(1, keepdims=True)
    unique = ((s == best).sum(1) == 1) & np.all(np.isfinite(s), axis=1)
    return top, unique


def drift_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Drift of `out` from `ref`: max/mean |d|, ||d||/||ref|| (rel_l2), cosine; for class
    scores, top-1 agreement over the rows where `ref` has a unique maximum.

    Flags (fields, never strings to parse): `non_finite` counts NaN/Inf in `out` (the other
    metrics are then NaN, and worst_rel_l2 reports inf), `non_finite_original` the same in
    `ref`, `constant` is True when `out` holds one value everywhere (a dead model) and
    `constant_original` likewise."""
    with np.errstate(all="ignore"):  # NaN/Inf are reported as flags below, not as warnings
        return _drift_metrics(ref, out)


BOOTSTRAP_RESAMPLES = 1000


def rel_l2_interval(ref: np.ndarray, out: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the relative L2 drift over the rows (axis 0, the samples):
    how much the figure moves when the rows are resampled. It is a floor on the uncertainty, not
    a bound: a model chosen among many for passing on these rows (a plan's search) is biased
    beyond it, and few rows understate it (ResNet-50, zoo, drift <= 0.8 plan: 0.785, interval
    0.779-0.791 on its 8 rows, 0.801 on 32 fresh ones). Seeded, so a report repeats byte for byte."""
    if ref.ndim < 1 or len(ref) < 2:
        return None
    e = np.square(out.astype(np.float64) - ref.astype(np.float64)).reshape(len(ref), -1).sum(1)
    r = np.square(ref.astype(np.float64)).reshape(len(ref), -1).sum(1)
    rng, n = np.random.default_rng(0), len(ref)
    step = max(1, (1 << 22) // n)  # resamples per block: at most ~4M indices in memory at once
    num, den = [], []
    for start in range(0, BOOTSTRAP_RESAMPLES, step):
        idx = rng.integers(0, n, size=(min(step, BOOTSTRAP_RESAMPLES - start), n))
        num.append(e[idx].sum(1))
        den.append(r[idx].sum(1))
    num, den = np.concatenate(num), np.concatenate(den)
    rel = np.sqrt(np.divide(num, den, out=np.full_like(num, np.inf), where=den > 0))
    lo, hi = np.quantile(rel, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def discrete(a: np.ndarray | np.dtype) -> bool:
    """An integer or boolean output (class labels, token ids, counts, masks), or such a dtype."""
    dtype = np.dtype(getattr(a, "dtype", a))
    return np.issubdtype(dtype, np.integer) or dtype == np.bool_


def worst_drift(metrics: Iterable[dict[str, Any]]) -> float | None:
    """The largest relative L2 drift over the float outputs; inf when any output holds NaN/Inf;
    None when every output is discrete (a rel. L2 of class indices means nothing: those are
    compared by agreement)."""
    metrics = list(metrics)
    if any(m.get("non_finite") for m in metrics):
        return float("inf")
    values = [m["rel_l2"] for m in metrics if m.get("rel_l2") is not None]
    return max(values) if values else None


def worst_output(metrics: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The metrics of the float output with the largest rel. L2 drift; None when every output
    is discrete."""
    floats = [m for m in metrics if m.get("rel_l2") is not None]
    return max(floats, key=lambda m: m["rel_l2"]) if floats else None


def least_agreement(metrics: Iterable[dict[str, Any]]) -> float | None:
    """The smallest agreement over the outputs that have one (class scores' top-1, a discrete
    output's equal values); 0 when any output holds NaN/Inf."""
    metrics = list(metrics)
    values = [m["top1_agreement"] for m in metrics if m.get("top1_agreement") is not None]
    if values and any(m.get("non_finite") for m in metrics):
        return 0.0
    return min(values) if values else None


def _discrete_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """A discrete output agrees or not, value by value: a class index 3 against 4 is no smaller
    a change than 3 against 900, so there is no rel. L2 or cosine, and its agreement is the
    fraction of equal values (for a label per sample, the top-1 agreement)."""
    d = np.abs(out.astype(np.float64) - ref.astype(np.float64)).ravel()
    same = (ref == out) if ref.shape == out.shape else np.zeros(ref.shape, bool)
    return {"max_abs": float(d.max()) if d.size else 0.0, "mean_abs": float(d.mean()) if d.size else 0.0,
            "rel_l2": None, "cosine": None, "non_finite": 0, "non_finite_original": 0,
            "constant": bool(out.size > 1 and np.all(out == out.ravel()[0])),
            "constant_original": bool(ref.size > 1 and np.all(ref == ref.ravel()[0])),
            "discrete": True, "agreement_rows": int(len(ref)) if ref.ndim else 1,
            "top1_agreement": float(same.mean()) if same.size else 1.0}


def _drift_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    if discrete(ref):
        return _discrete_metrics(ref, out)
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    d = o - r
    nr = np.linalg.norm(r)
    no = np.linalg.norm(o)
    m: dict[str, Any] = {
        "max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
        "mean_abs": float(np.mean(np.abs(d))) if d.size else 0.0,
        "rel_l2": float(np.linalg.norm(d) / nr) if nr > 0 else float(np.linalg.norm(d)),
        "cosine": float(r @ o / (nr * no)) if nr > 0 and no > 0 else float(nr == no),
        "non_finite": int(np.count_nonzero(~np.isfinite(o))),
        "non_finite_original": int(np.count_nonzero(~np.isfinite(r))),
        "constant": bool(o.size > 1 and np.all(o == o[0])),
        "constant_original": bool(r.size > 1 and np.all(r == r[0])),
    }
    if m["non_finite"]:
        m["rel_l2"] = m["max_abs"] = m["mean_abs"] = m["cosine"] = float("nan")
    else:
        m["rel_l2_interval"] = rel_l2_interval(ref, out)
    if looks_like_scores(ref):
        top_r, ok_r = unique_top1(ref)
        top_o, ok_o = unique_top1(out)
        rows = int(ok_r.sum())
        m["agreement_rows"] = rows
        agree = (top_r == top_o) & ok_o & ok_r
        m["top1_agreement"] = float(agree.sum() / rows) if rows else None
    return m


def median_interval(ratios, z: float = 1.96) -> tuple[float, float, float]:
    """(median, low, high): the distribution-free confidence interval of a median from order
    statistics, ranks n/2 -+ z sqrt(n)/2 of the sorted values (normal approximation to the
    binomial). With fewer than 6 values it is the whole range."""
    r = np.sort(np.asarray(ratios, dtype=np.float64))
    n = len(r)
    half = z * math.sqrt(n) / 2
    j = max(int(math.floor(n / 2 - half)), 0)
    k = min(int(math.ceil(n / 2 + half)), n - 1)
    return float(np.median(r)), float(r[j]), float(r[k])


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    times_ms: list[float] = field(default_factory=list, repr=False)  # each run, in order (pairs line up)

    def to_json(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "runs": self.runs}


def latency_ab(sess_a: ort.InferenceSession, sess_b: ort.InferenceSession, feed: dict[str, np.ndarray],
               warmup: int = 3, repeats: int | None = None, budget_s: float = 4.0) -> tuple[Latency, Latency]:
    """Interleaved A/B timing. Without `repeats`, runs as many rounds as fit in `budget_s`
    (at least 10, at most 300)."""
    for _ in range(warmup):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    i = 0
    while True:
        pair = ((sess_a, ta), (sess_b, tb)) if i % 2 == 0 else ((sess_b, tb), (sess_a, ta))
        for s, acc in pair:
            t0 = time.perf_counter()
            s.run(None, feed)
            acc.append(time.perf_counter() - t0)
        i += 1
        if repeats is not None:
            if i >= repeats:
                break
        elif (i >= 10 and time.perf_counter() - start > budget_s) or i >= 300:
            break
    return _summary(ta), _summary(tb)


def _summary(times: list[float]) -> Latency:
    ms = np.asarray(times) * 1e3
    return Latency(float(np.median(ms)), float(np.percentile(ms, 90)), len(ms), ms.tolist())


def _same_inputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """The same input names and ranks, and no fixed size after the batch axis that differs (a
    gate run on two different networks got onnxruntime's dimension error for one of them, not
    saying which)."""
    from surgeon.model import input_signature
    ia, ib = input_signature(a), input_signature(b)
    sa = [(n, len(d)) for n, d, _ in ia]
    sb = [(n, len(d)) for n, d, _ in ib]
    if sa != sb:
        show = lambda s: ", ".join(f"{n} (rank {r})" for n, r in s)
        raise ModelError(f"the models take different inputs: {show(sa)} vs {show(sb)}")
    for (name, da, _), (_, db, _) in zip(ia, ib):
        if any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(da[1:], db[1:])):
            show = lambda d: "x".join("?" if not isinstance(v, int) else str(v) for v in d)
            raise ModelError(f"the models take different input shapes: '{name}' is {show(da)} in the original, "
                             f"{show(db)} in the candidate")


@dataclass
class Validation:
    data_source: str
    synthetic: bool
    samples: int
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    latency: dict[str, Any] | None = None

    @property
    def worst_rel_l2(self) -> float | None:
        """The largest relative L2 drift over the float outputs; inf when any output holds NaN/Inf
        (no budget can pass it); None when every output is discrete (worst_drift)."""
        return worst_drift(self.outputs.values()) if self.outputs else 0.0

    @property
    def worst_rel_l2_interval(self) -> list[float] | None:
        """The 95% bootstrap interval over samples (rows) of the output with the largest drift."""
        worst = worst_output(self.outputs.values())
        return None if self.non_finite_outputs or worst is None else worst.get("rel_l2_interval")

    @property
    def top1_agreement(self) -> float | None:
        return least_agreement(self.outputs.values())

    @property
    def agreement_rows(self) -> int | None:
        rows = [m["agreement_rows"] for m in self.outputs.values() if m.get("agreement_rows") is not None]
        return min(rows) if rows else None

    @property
    def non_finite_outputs(self) -> list[str]:
        return [n for n, m in self.outputs.items() if m.get("non_finite")]

    @property
    def constant_outputs(self) -> list[str]:
        """Outputs that are one value everywhere in the candidate but not in the original."""
        return [n for n, m in self.outputs.items() if m.get("constant") and not m.get("constant_original")]

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data_source, "synthetic_data": self.synthetic, "samples": self.samples,
                "outputs": self.outputs, "accuracy": self.accuracy, "latency": self.latency,
                "worst_rel_l2": self.worst_rel_l2, "worst_rel_l2_interval": self.worst_rel_l2_interval,
                "top1_agreement": self.top1_agreement,
                "agreement_rows": self.agreement_rows, "non_finite_outputs": self.non_finite_outputs,
                "constant_outputs": self.constant_outputs}


def validate(original: onnx.ModelProto, candidate: onnx.ModelProto, data: DataSet, *, threads: int = 0,
             latency: bool = True, latency_batch: int = 1, repeats: int | None = None,
             budget_s: float = 4.0) -> Validation:
    """Drift of every output over `data`, accuracy when it has labels, and A/B latency."""
    _same_inputs(original, candidate)
    sa, sb = session(original, threads), session(candidate, threads)
    names_a = [o.name for o in sa.get_outputs()]
    names_b = [o.name for o in sb.get_outputs()]
    if names_a != names_b:
        raise ModelError(f"the models' outputs differ: {names_a} vs {names_b}")
    ra, rb = run(sa, data), run(sb, data)
    v = Validation(data.source, data.synthetic, len(data))
    for name, a, b in zip(names_a, ra, rb):
        if a.shape != b.shape:
            raise ModelError(f"output '{name}' has shape {list(a.shape)} in the original, {list(b.shape)} after")
        v.outputs[name] = drift_metrics(a, b)
    if data.labels is not None:
        scores = [(a, b) for a, b in zip(ra, rb) if looks_like_scores(a)]
        if scores:
            a, b = scores[0]
            labels = data.labels[: len(a)]
            # a tied or non-finite maximum is no prediction: it counts as wrong
            v.accuracy = {name: float(np.mean((top == labels) & ok))
                          for name, (top, ok) in (("original", unique_top1(a)), ("candidate", unique_top1(b)))}
    if latency:
        feed = data.first_batch(latency_batch)
        la, lb = latency_ab(sa, sb, feed, repeats=repeats, budget_s=budget_s)
        v.latency = {"batch": len(next(iter(feed.values()))), "threads": threads or "default",
                     "original": la.to_json(), "candidate": lb.to_json(),
                     "speedup": la.median_ms / lb.median_ms if lb.median_ms > 0 else None}
        if la.times_ms and min(la.times_ms) > 0:  # candidate / original, pair by pair
            ratio, low, high = median_interval(np.divide(lb.times_ms, la.times_ms))
            v.latency.update(ratio=ratio, ratio_low=low, ratio_high=high)
    return v
