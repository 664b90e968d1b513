"""Bias correction measured on the quantized model, layer by layer in graph order.

The analytic correction (int8.bias_correct) cancels the mean shift a layer's *weight* rounding
adds, b -= (W_int8 - W) . E[x] with E[x] from the float model. It does not see the shifts that
activation quantization adds (clipped tails, rounding of skewed tensors) nor how the shifts of
earlier layers reach this one. Here the mean of each Conv/Gemm output is measured on the
quantized model itself, E[y_q], and its int32 bias moves by the difference to the float model's
E[y_f], one layer at a time in graph order, each measured after the corrections of the layers
before it (the quantized model's real inputs, the error of earlier layers included). Correcting
all layers from one measurement would make each layer also cancel the shifts that upstream
corrections remove, so they would compound.

One run per level: layers with no path between them (parallel branches, detection heads) cannot
change each other's inputs, so a level (1 + the deepest corrected layer upstream) is measured
and corrected at once, and the runs are as many as the longest chain of layers. The bias
initializers are declared graph inputs, so one onnxruntime session serves every run and a new
bias is a new feed (the unfused DequantizeLinear -> Conv path computes the same values as the
fused integer kernel, up to float rounding; onnxruntime runs the whole graph whatever outputs
are asked for, so the runs cost the same).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from surgeon.calibration import DataSet
from surgeon.plugins import int8_ort as io
from surgeon.plugins.int8_ort import with_outputs
from surgeon.model import to_graph, to_model
from surgeon.rewrite import constant_value, input_or_none, shared_by
from surgeon.validate import session

log = logging.getLogger(__name__)


# Calibration samples each level is measured on. Per-channel means over a few images' positions
# are stable: the detector's held-out drift was 0.0367 / 0.0370 / 0.0369 with 4 / 8 / 16 samples,
# and each sample costs one inference per level (55 levels there).
SAMPLES = 4


@dataclass
class SequentialResult:
    layers: list[str] = field(default_factory=list)
    moved: dict[str, float] = field(default_factory=dict)  # layer -> max |mean shift| removed
    runs: int = 0  # passes over the data (one per level)
    seconds: float = 0.0

    def summary(self) -> dict:
        worst = sorted(self.moved.items(), key=lambda kv: -kv[1])[:5]
        return {"layers": len(self.layers), "runs": self.runs, "largest_shifts": {k: round(v, 6) for k, v in worst},
                "seconds": round(self.seconds, 2)}


def _biased_layers(graph: gs.Graph) -> list[tuple[gs.Node, gs.Constant, np.ndarray]]:
    """(node, int32 bias constant, bias scale) of every Conv/Gemm whose bias is
    DequantizeLinear(int32 constant) that no other node reads, in graph order."""
    out = []
    for n in graph.nodes:
        bias = input_or_none(n, 2) if n.op in ("Conv", "Gemm") else None
        if bias is None or not bias.inputs or bias.inputs[0].op != "DequantizeLinear":
            continue
        d = bias.inputs[0]
        q_bias, scale = d.inputs[0], constant_value(d.inputs[1])
        if not isinstance(q_bias, gs.Constant) or scale is None or q_bias.dtype != np.int32 or shared_by(q_bias, d):
            continue
        out.append((n, q_bias, scale.astype(np.float64)))
    return out


def _levels(graph: gs.Graph, layers: list[str]) -> list[set[str]]:
    """The layers grouped by level, in order: a layer's level is 1 + the highest level among the
    layers upstream of it, so no two layers of a level are on one path."""
    wanted = set(layers)
    depth: dict[str, int] = {}
    level: dict[str, int] = {}
    for n in graph.nodes:  # topological order, as ONNX stores it
        d = max((depth.get(t.name, 0) for t in n.inputs if t.name), default=0)
        if n.name in wanted:
            d = level[n.name] = d + 1
        for t in n.outputs:
            depth[t.name] = d
    out: dict[int, set[str]] = {}
    for name, lv in level.items():
        out.setdefault(lv, set()).add(name)
    return [out[k] for k in sorted(out)]


def sequential_bias_correction(float_model: onnx.ModelProto, q: onnx.ModelProto, data: DataSet,
                               threads: int = 0, samples: int = SAMPLES) -> tuple[onnx.ModelProto, SequentialResult]:
    """`q` with each Conv/Gemm int32 bias moved so that its output's per-channel mean on `data`
    (the first `samples` rows) matches `float_model`'s, layer by layer in graph order."""
    t0 = time.perf_counter()
    res = SequentialResult()
    data = data.take(min(len(data), max(samples, getattr(data, "batch", None) or 1)))  # a static batch: one
    graph = to_graph(q)
    layers = _biased_layers(graph)
    float_out = io.node_outputs(float_model, [n.name for n, _, _ in layers])
    layers = [(n, b, s) for n, b, s in layers if n.name in float_out]
    if not layers:
        return q, res
    target = io.input_means(float_model, [float_out[n.name] for n, _, _ in layers], data, threads)

    probe = onnx.ModelProto()
    probe.CopyFrom(q)
    biases = {b.name: np.asarray(b.values).astype(np.int64) for _, b, _ in layers}
    for b in biases:  # an initializer that is also a graph input can be fed at run time
        probe.graph.input.append(helper.make_tensor_value_info(b, onnx.TensorProto.INT32, list(biases[b].shape)))
    sess = session(with_outputs(probe, [n.outputs[0].name for n, _, _ in layers]), threads)
    feeds = list(data.batches(8))
    for level in _levels(graph, [n.name for n, _, _ in layers]):
        group = [(n, b.name, scale) for n, b, scale in layers if n.name in level]
        means = io.channel_means(sess, [n.outputs[0].name for n, _, _ in group], feeds,
                                 {k: v.astype(np.int32) for k, v in biases.items()})
        for n, b, scale in group:
            shift = means[n.outputs[0].name] - target[float_out[n.name]]
            step = np.rint(shift / np.broadcast_to(scale, shift.shape)).astype(np.int64)
            biases[b] = np.clip(biases[b] - step, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
            res.layers.append(n.name)
            res.moved[n.name] = float(np.max(np.abs(shift)))
        res.runs += 1
    for _, b, _ in layers:
        b.values = biases[b.name].astype(np.int32)
    out = to_model(graph, like=q)
    res.seconds = time.perf_counter() - t0
    log.info("int8: sequential bias correction of %d layers in %.1f s", len(res.layers), res.seconds)
    return out, res

