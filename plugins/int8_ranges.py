"""Per-tensor choice of the activation range (`calibration=auto`).

For every activation tensor t that onnxruntime calibrates, three candidate ranges come from
onnxruntime's own calibration code on the same calibration data:

* minmax: the range in the MinMax calibration cache (what plain quantize_static uses);
* percentile: onnxruntime's HistogramCollector, |x| histogram, [-p, p] clipped to [min, max];
* entropy: onnxruntime's HistogramCollector, KL-optimal threshold (TensorRT's method).

Each candidate is scored by the quantization error it causes on t's actual calibration values,
MSE(t) = mean((dq(q(x)) - x)^2) with q the asymmetric U8 (or S8) quantizer onnxruntime derives
from that range (`compute_scale_zp`), and t gets the range with the smallest MSE (minmax on ties).
The chosen ranges are written as a MinMax calibration cache, so the quantization itself is still
onnxruntime's quantize_static. numpy only measures. The activations are streamed batch by batch,
so memory holds one batch at a time: one pass builds the histograms, a second measures the MSE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from surgeon.plugins.int8_ort import quiet, with_outputs
from surgeon.calibration import DataSet
from surgeon.validate import session

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy")  # preference order on equal error
BATCH = 8


@dataclass
class RangeChoice:
    method: dict[str, str] = field(default_factory=dict)  # tensor -> chosen method
    ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # tensor -> method -> range
    rel_mse: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> method -> MSE / mean(x^2)
    seconds: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {m: sum(1 for v in self.method.values() if v == m) for m in METHODS}

    def summary(self) -> dict:
        """For the JSON report: counts per method, each tensor's method and its error per candidate."""
        return {
            "counts": self.counts(),
            "tensors": dict(sorted(self.method.items())),
            "clipped": {t: {"method": m, "range": [round(float(v), 6) for v in self.ranges[t][m]],
                            "minmax": [round(float(v), 6) for v in self.ranges[t]["minmax"]],
                            "rel_mse": {k: float(f"{e:.4g}") for k, e in self.rel_mse[t].items()}}
                        for t, m in sorted(self.method.items()) if m != "minmax"},
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _quantizer(activation_type: str):
    from onnxruntime.quantization.quant_utils import QuantType, compute_scale_zp, get_qmin_qmax_for_qType
    qtype = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}[activation_type].tensor_type
    qmin, qmax = get_qmin_qmax_for_qType(qtype)

    def scale_zp(lo: float, hi: float) -> tuple[float, float, float, float]:
        zp, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), qmin, qmax)
        return float(scale), float(zp), float(qmin), float(qmax)

    return scale_zp


def _sq_error(x: np.ndarray, scale: float, zp: float, qmin: float, qmax: float) -> float:
    """Sum of squared error of QuantizeLinear -> DequantizeLinear (round half to even, saturate),
    in place on one float32 buffer (22x faster than the naive float64 expression, same sum to 1e-6)."""
    q = np.divide(x, np.float32(scale), dtype=np.float32).ravel()
    np.round(q, out=q)
    q += np.float32(zp)
    np.clip(q, qmin, qmax, out=q)
    q -= np.float32(zp)
    q *= np.float32(scale)
    q -= x.ravel()
    return float(np.dot(q, q))


def choose_ranges(model: onnx.ModelProto, minmax: dict[str, tuple[float, float]], data: DataSet, *,
                  activation_type: str = "U8", percentile: float = 99.999, entropy_bins: int = 512,
                  threads: int = 0) -> RangeChoice:
    """Pick, for each tensor of `minmax` (tensor -> MinMax range), the candidate range with the
    smallest quantization MSE on that tensor's values over `data`."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    tensors = sorted(minmax)
    graph_inputs = {i.name for i in model.graph.input}
    sess = session(with_outputs(model, [t for t in tensors if t not in graph_inputs]), threads)
    out_names = [o.name for o in sess.get_outputs()]

    def activations():
        for feed in data.batches(BATCH):
            res = dict(zip(out_names, sess.run(None, feed)))
            res.update(feed)
            yield {t: np.asarray(res[t], np.float32) for t in tensors}

    res = RangeChoice()
    # Same settings as onnxruntime's create_calibrator defaults, except the entropy histogram: with
    # quantize_static's 128 bins for 128 quantized bins, the KL search has one candidate (min/max).
    pct = HistogramCollector("percentile", True, 2048, 128, percentile, "same")
    ent = HistogramCollector("entropy", False, entropy_bins, 128, percentile, "same")
    t0 = time.perf_counter()
    with quiet():  # the collector prints progress
        for batch in activations():
            pct.collect(batch)
            ent.collect(batch)
        res.seconds["histograms"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        p_ranges = pct.compute_collection_result()
        res.seconds["percentile"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        e_ranges = ent.compute_collection_result()
        res.seconds["entropy"] = time.perf_counter() - t1
    for t in tensors:
        res.ranges[t] = {"minmax": tuple(float(v) for v in minmax[t]),
                         "percentile": (float(p_ranges[t][0]), float(p_ranges[t][1])),
                         "entropy": (float(e_ranges[t][0]), float(e_ranges[t][1]))}

    t1 = time.perf_counter()
    scale_zp = _quantizer(activation_type)
    params = {t: {m: scale_zp(*r) for m, r in res.ranges[t].items()} for t in tensors}
    err = {t: dict.fromkeys(METHODS, 0.0) for t in tensors}
    energy = dict.fromkeys(tensors, 0.0)
    for batch in activations():
        for t in tensors:
            x = batch[t]
            energy[t] += float(np.dot(x.ravel(), x.ravel()))
            done: dict[tuple, float] = {}
            for m in METHODS:
                p = params[t][m]
                if p not in done:  # identical ranges give identical errors
                    done[p] = _sq_error(x, *p)
                err[t][m] += done[p]
    res.seconds["mse"] = time.perf_counter() - t1
    for t in tensors:
        res.rel_mse[t] = {m: err[t][m] / max(energy[t], 1e-30) for m in METHODS}
        res.method[t] = min(METHODS, key=lambda m: (err[t][m], METHODS.index(m)))
    log.info("calibration=auto: %s in %.1f s", res.counts(), sum(res.seconds.values()))
    return res


def load_minmax(cache: str) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data
    td = load_tensors_data(cache)
    # ReduceMin/ReduceMax keep a length-1 axis: the cache holds shape-(1,) arrays
    return {t: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1]))) for t, d in td.items()}


# A range reaching this far holds a sentinel, not a measurement: float32's lowest value is what
# older transformers exports fill an attention mask with (no activation of a network comes near).
SENTINEL = 1e30


def unbounded(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[str, float, float]]:
    """{node: (tensor, lo, hi)} for each node of `model` that reads or writes a tensor whose
    calibrated range is infinite, or reaches a sentinel (|x| >= SENTINEL): an attention mask
    filled with -inf (torch's scaled dot product attention as exported) or float32's lowest
    value, and the scores it is added to. The 8-bit grid of such a range has an infinite (NaN)
    or 1e36 step, so every value on it is lost: on all-MiniLM-L6-v2 quantizing them took the
    drift to 1.08."""
    bad = {t: r for t, r in ranges.items() if not (np.isfinite(r).all() and np.abs(r).max() < SENTINEL)}
    out = {}
    for node in model.graph.node:
        hit = next((t for t in (*node.input, *node.output) if t in bad), None)
        if hit is not None:
            out[node.name] = (hit, *bad[hit])
    return out


def write_cache(choice: RangeChoice, path: str) -> str:
    """The chosen ranges as a MinMax calibration cache that quantize_static reads instead of calibrating."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data
    data = {t: TensorData(lowest=np.array(choice.ranges[t][m][0], np.float32),
                          highest=np.array(choice.ranges[t][m][1], np.float32))
            for t, m in sorted(choice.method.items())}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
    return path
