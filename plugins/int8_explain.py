"""Where the int8 error comes from (`--option explain=true`).

Given the float model F that was quantized and its QDQ model Q (onnxruntime's quantize_static):

* weights only: F with every quantized weight replaced by dq(q(W)) as Q computes it;
* activations only: Q with every weight DequantizeLinear replaced by the float weight (guarded
  against onnxruntime's load-time weight quantization, plugins/int8_float.py, as is every
  single-tensor model below);
* one activation tensor t at a time: F with a single QuantizeLinear -> DequantizeLinear pair on t,
  using Q's scale and zero point for t; its drift is t's contribution with nothing else quantized;
* one weighted layer at a time: F with only that layer's weight rounded;
* range statistics of the worst tensors, from the float activations: min/max, the 99.99th
  percentile of |x| and the tail ratio max|x| / p99.99 (a long tail wastes levels on a few
  values), and the spread of the per-channel maxima (max over channels / median: one outlier
  channel sets the scale for all of them).

Every drift is the relative L2 distance of the outputs to F's on the same rows (the rows passed
in; the report says how many). Graph edits go through onnx-graphsurgeon.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.calibration import DataSet
from surgeon.model import to_graph, to_model
from surgeon.plugins.int8_float import keep_weights_float
from surgeon.rewrite import replace_constant
from surgeon.validate import stream_tensors

log = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TOP = 10


def qdq_params(q: onnx.ModelProto) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """From a QDQ model: activation tensor -> (scale, zero point) of its QuantizeLinear, and
    weighted node name -> its weight as Q computes it ((w_q - zp) * scale)."""
    qg = to_graph(q)
    acts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for n in qg.nodes:
        if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant):
            acts[n.inputs[0].name] = (np.asarray(n.inputs[1].values), np.asarray(n.inputs[2].values))
    weights: dict[str, np.ndarray] = {}
    for n in qg.nodes:
        if n.op not in WEIGHTED or len(n.inputs) < 2:
            continue
        for slot in (1, 0):
            w = dequantized_constant(n.inputs[slot])
            if w is not None:
                weights[n.name] = w
                break
    return acts, weights


def dequantized_constant(t: gs.Tensor) -> np.ndarray | None:
    """The value of DequantizeLinear(constant, scale, zp), or None if `t` is not one."""
    if not t.inputs or t.inputs[0].op != "DequantizeLinear":
        return None
    d = t.inputs[0]
    if not all(isinstance(x, gs.Constant) for x in d.inputs[:3]):
        return None
    wq, scale, zp = (np.asarray(x.values, np.float64) for x in d.inputs[:3])
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * wq.ndim
        shape[d.attrs.get("axis", 1)] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((wq - zp) * scale).astype(np.float32)


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with the named nodes' constant weight (slot 1, or slot 0 for MatMul(W, x)) replaced."""
    g = to_graph(model)
    for n in g.nodes:
        if n.name in weights:
            slot = 1 if isinstance(n.inputs[1], gs.Constant) else 0
            replace_constant(g, n, slot, "int8", "explain_weight", weights[n.name])
    return to_model(g, like=model)


def with_float_weights(q: onnx.ModelProto, float_weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The QDQ model with each weight DequantizeLinear bypassed by the float weight."""
    g = to_graph(q)
    for n in g.nodes:
        if n.name in float_weights and n.op in WEIGHTED:
            for slot in (1, 0):
                if dequantized_constant(n.inputs[slot]) is not None:
                    replace_constant(g, n, slot, "int8", "explain_float", float_weights[n.name])
                    break
    # onnxruntime would quantize those float weights per tensor at load time (plugins/int8_float.py)
    return keep_weights_float(to_model(g, like=q))[0]


def with_qdq(model: onnx.ModelProto, tensor: str, scale: np.ndarray, zp: np.ndarray) -> onnx.ModelProto:
    """`model` with one QuantizeLinear -> DequantizeLinear pair on `tensor` (all its readers see dq)."""
    g = to_graph(model)
    t = g.tensors()[tensor]
    readers = list(t.outputs)
    q_out = gs.Variable(f"{tensor}/int8/explain_q", dtype=np.asarray(zp).dtype)
    dq_out = gs.Variable(f"{tensor}/int8/explain_dq", dtype=np.float32)
    s = gs.Constant(f"{tensor}/int8/explain_scale", np.asarray(scale))
    z = gs.Constant(f"{tensor}/int8/explain_zp", np.asarray(zp))
    g.nodes.append(gs.Node("QuantizeLinear", f"{tensor}/int8/explain_Q", inputs=[t, s, z], outputs=[q_out]))
    g.nodes.append(gs.Node("DequantizeLinear", f"{tensor}/int8/explain_DQ", inputs=[q_out, s, z], outputs=[dq_out]))
    for r in readers:
        for k, x in enumerate(list(r.inputs)):
            if x is t:
                r.inputs[k] = dq_out
    if t in g.outputs:
        g.outputs[g.outputs.index(t)] = dq_out
    # a float conv reading dq would get per-tensor int8 weights from onnxruntime (plugins/int8_float.py)
    return keep_weights_float(to_model(g, like=model))[0]


def weight_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    g = to_graph(model)
    out = {}
    for n in g.nodes:
        if n.op in WEIGHTED and len(n.inputs) > 1:
            for slot in (1, 0):
                if isinstance(n.inputs[slot], gs.Constant):
                    out[n.name] = np.asarray(n.inputs[slot].values)
                    break
    return out


def range_stats(model: onnx.ModelProto, tensors: list[str], data: DataSet, threads: int = 0) -> dict[str, dict]:
    """Float statistics of `tensors` over `data` (all rows held only one batch at a time, except
    the |x| samples kept for the percentile: at most 200k values per tensor)."""
    acc: dict[str, dict[str, Any]] = {t: {"min": np.inf, "max": -np.inf, "cmax": None, "sample": []} for t in tensors}
    rng = np.random.default_rng(0)
    for batch in stream_tensors(model, tensors, data, batch=8, threads=threads):
        for t in tensors:
            x = np.asarray(batch[t], np.float32)
            a = acc[t]
            a["min"], a["max"] = min(a["min"], float(x.min())), max(a["max"], float(x.max()))
            ch = np.abs(np.moveaxis(x, 1 if x.ndim > 2 else x.ndim - 1, 0).reshape(x.shape[1 if x.ndim > 2 else -1], -1))
            cm = ch.max(axis=1)
            a["cmax"] = cm if a["cmax"] is None else np.maximum(a["cmax"], cm)
            flat = np.abs(x).ravel()
            a["sample"].append(flat if flat.size <= 50_000 else rng.choice(flat, 50_000, replace=False))
    out = {}
    for t, a in acc.items():
        s = np.concatenate(a["sample"])
        p = float(np.percentile(s, 99.99))
        amax = max(abs(a["min"]), abs(a["max"]))
        med = float(np.median(a["cmax"]))
        out[t] = {"min": a["min"], "max": a["max"], "p99.99_abs": p, "tail_ratio": amax / p if p > 0 else None,
                  "channels": int(a["cmax"].size),
                  "channel_spread": float(a["cmax"].max() / med) if med > 0 else None}
    return out


def explain(float_model: onnx.ModelProto, q: onnx.ModelProto, data: DataSet,
            evaluate: Callable[[onnx.ModelProto], dict[str, float]], threads: int = 0,
            tick: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report: drift with only weights / only activations quantized, each tensor's and each
    layer's drift alone (largest first), range statistics of the worst tensors."""
    tick = tick or (lambda _s: None)
    t0 = time.perf_counter()
    acts, qweights = qdq_params(q)
    fweights = weight_of(float_model)
    qweights = {k: v for k, v in qweights.items() if k in fweights and fweights[k].shape == v.shape}
    report: dict[str, Any] = {"rows": len(data), "drift": {
        "int8": evaluate(q),
        "weights_only": evaluate(with_weights(float_model, qweights)),
        "activations_only": evaluate(with_float_weights(q, fweights)),
    }}
    have = set(to_graph(float_model).tensors())
    per_tensor = []
    for i, (t, (s, z)) in enumerate(sorted(acts.items())):
        if t not in have:
            continue
        tick(f"explain: activation {i + 1}/{len(acts)}")
        per_tensor.append((t, evaluate(with_qdq(float_model, t, s, z))["rel_l2"]))
    per_tensor.sort(key=lambda x: (-x[1], x[0]))
    per_layer = []
    for i, (name, w) in enumerate(sorted(qweights.items())):
        tick(f"explain: weight {i + 1}/{len(qweights)}")
        per_layer.append((name, evaluate(with_weights(float_model, {name: w}))["rel_l2"]))
    per_layer.sort(key=lambda x: (-x[1], x[0]))
    worst = [t for t, _ in per_tensor[:TOP]]
    stats = range_stats(float_model, worst, data, threads) if worst else {}
    total_a = sum(d for _, d in per_tensor) or 1.0
    total_w = sum(d for _, d in per_layer) or 1.0
    report["activations"] = [{"tensor": t, "drift_alone": d, "share": d / total_a,
                              "scale": float(np.asarray(acts[t][0]).max()), **stats.get(t, {})}
                             for t, d in per_tensor[:TOP]]
    report["weights"] = [{"layer": n, "drift_alone": d, "share": d / total_w} for n, d in per_layer[:TOP]]
    report["counts"] = {"activation_tensors": len(per_tensor), "weighted_layers": len(per_layer)}
    report["top_share"] = {"activations_top3": sum(d for _, d in per_tensor[:3]) / total_a,
                           "weights_top3": sum(d for _, d in per_layer[:3]) / total_w}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
