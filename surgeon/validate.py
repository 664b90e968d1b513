"""What the surgery did, measured with onnxruntime: output drift and latency.

Latency runs both models interleaved (A, B, B, A, ...) after a warm-up, so that a machine
that speeds up or slows down during the run moves both the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from surgeon.calibration import DataSet
from surgeon.errors import ModelError, SurgeonError

log = logging.getLogger(__name__)


def session(model: onnx.ModelProto | bytes | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `threads` 0 lets onnxruntime pick (all cores)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load the model: {text}") from None


def run(sess: ort.InferenceSession, data: DataSet, batch_size: int = 32) -> list[np.ndarray]:
    """All outputs over the whole data set, concatenated along the batch axis."""
    outs: list[list[np.ndarray]] = []
    for feed in data.batches(batch_size):
        try:
            res = sess.run(None, feed)
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SurgeonError(f"onnxruntime failed to run the model: {text}") from None
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(r)
    return [np.concatenate(o) if o[0].ndim else np.stack(o) for o in outs]


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


def stream_tensors(model: onnx.ModelProto, tensors: Iterable[str], data: DataSet, *, batch: int = 8,
                   threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Run `model` over `data` batch by batch and yield {tensor: value} for the named tensors
    (graph inputs, intermediate tensors or outputs). Only one batch of activations is held at a
    time, so statistics over large calibration sets stay within memory: accumulate as you go."""
    tensors = list(dict.fromkeys(tensors))
    inputs = {i.name for i in model.graph.input}
    fetch = [t for t in tensors if t not in inputs]
    sess = session(with_outputs(model, fetch), threads)
    names = [o.name for o in sess.get_outputs()]
    for feed in data.batches(batch):
        try:
            res = dict(zip(names, sess.run(None, feed)))
        except Exception as exc:
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise SurgeonError(f"onnxruntime failed to run the model: {text}") from None
        res.update(feed)
        yield {t: res[t] for t in tensors}


def looks_like_scores(a: np.ndarray) -> bool:
    """Class scores: (N, C) with C > 1 (logits or probabilities)."""
    return a.ndim == 2 and a.shape[1] > 1


def drift_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r = ref.astype(np.float64).ravel()
    o = out.astype(np.float64).ravel()
    d = o - r
    nr = np.linalg.norm(r)
    no = np.linalg.norm(o)
    m = {
        "max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
        "mean_abs": float(np.mean(np.abs(d))) if d.size else 0.0,
        "rel_l2": float(np.linalg.norm(d) / nr) if nr > 0 else float(np.linalg.norm(d)),
        "cosine": float(r @ o / (nr * no)) if nr > 0 and no > 0 else float(nr == no),
    }
    if looks_like_scores(ref):
        m["top1_agreement"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
    return m


@dataclass
class Latency:
    median_ms: float
    p90_ms: float
    runs: int

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
    return Latency(float(np.median(ms)), float(np.percentile(ms, 90)), len(ms))


def _same_inputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    from surgeon.model import input_signature
    sa = [(n, len(d)) for n, d, _ in input_signature(a)]
    sb = [(n, len(d)) for n, d, _ in input_signature(b)]
    if sa != sb:
        show = lambda s: ", ".join(f"{n} (rank {r})" for n, r in s)
        raise ModelError(f"the models take different inputs: {show(sa)} vs {show(sb)}")


@dataclass
class Validation:
    data_source: str
    synthetic: bool
    samples: int
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    latency: dict[str, Any] | None = None

    @property
    def worst_rel_l2(self) -> float:
        return max((m["rel_l2"] for m in self.outputs.values()), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        vals = [m["top1_agreement"] for m in self.outputs.values() if "top1_agreement" in m]
        return min(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data_source, "synthetic_data": self.synthetic, "samples": self.samples,
                "outputs": self.outputs, "accuracy": self.accuracy, "latency": self.latency,
                "worst_rel_l2": self.worst_rel_l2, "top1_agreement": self.top1_agreement}


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
            v.accuracy = {"original": float(np.mean(a.argmax(1) == labels)),
                          "candidate": float(np.mean(b.argmax(1) == labels))}
    if latency:
        feed = data.first_batch(latency_batch)
        la, lb = latency_ab(sa, sb, feed, repeats=repeats, budget_s=budget_s)
        v.latency = {"batch": len(next(iter(feed.values()))), "threads": threads or "default",
                     "original": la.to_json(), "candidate": lb.to_json(),
                     "speedup": la.median_ms / lb.median_ms if lb.median_ms > 0 else None}
    return v
