"""Float-graph rewrites that give int8 better ranges, before onnxruntime quantizes anything.

* BatchNormalization folding: y = a * (W * x + b - mean) + beta with a = gamma / sqrt(var + eps)
  is the conv  W' = a[f] * W[f],  b' = a * (b - mean) + beta  (a conv without bias gets one).
* Cross-layer equalization (Nagel et al. 2019, "Data-free quantization"): for
  Conv1 -> act -> Conv2 with act positively homogeneous (act(x / s) = act(x) / s for s > 0),
  W1[i] / s_i, b1[i] / s_i and W2[:, i] * s_i leave the function unchanged; with
  s_i = sqrt(r1_i / r2_i) (r1_i = max|W1[i]|, r2_i = max|W2[:, i]|) both ranges become
  sqrt(r1_i * r2_i). Relu is homogeneous; Clip(0, M) (ReLU6) is not: rescaling through it is
  exact only where the clip never bites, so such channels are equalized only when the measured
  pre-activation range of the channel stays below M before and after (else s_i = 1).
* `ensure_bias` gives Conv/Gemm a zero bias so bias correction has something to adjust.

All work on the ModelProto; new initializers are named after the node (`conv3/int8/weight`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgeon.errors import UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) needs opset 13


class Graph:
    """Just enough bookkeeping over a ModelProto: initializers, producers, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs:
            return None
        return users[0]

    def shared(self, name: str) -> bool:
        return len(self.consumers.get(name, [])) > 1

    def set_init(self, node: onnx.NodeProto, index: int, suffix: str, value: np.ndarray) -> None:
        """Point input `index` of `node` at a new initializer `<node>/int8/<suffix>`."""
        name = f"{node.name}/int8/{suffix}"
        k = 1
        while name in self.inits and self.inits[name] is not None and node.input[index] != name:
            name = f"{node.name}/int8/{suffix}_{k}"
            k += 1
        old = node.input[index] if index < len(node.input) else ""
        tensor = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        if name in self.inits:
            self.g.initializer.remove(self.inits[name])
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name
        self.consumers.setdefault(name, []).append(node)
        if old:
            users = self.consumers.get(old, [])
            if node in users:
                users.remove(node)
            if not users and old in self.inits and old not in {i.name for i in self.g.input}:
                self.g.initializer.remove(self.inits.pop(old))


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """Convert to `target` when older (onnx.version_converter); a clear error when it cannot."""
    have = opset_of(model)
    if have >= target:
        return model, None
    try:
        out = onnx.version_converter.convert_version(model, target)
        onnx.checker.check_model(out)
    except Exception as exc:  # the converter raises a zoo of types
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"int8 needs opset >= {target} (per-channel QuantizeLinear) and the model has opset "
                         f"{have}; onnx.version_converter could not upgrade it: {text}") from None
    return out, f"opset upgraded from {have} to {target} (per-channel QDQ needs opset >= {target})"


# --- BatchNormalization folding -----------------------------------------------------------------

def fold_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold every inference-mode BatchNormalization that directly follows a constant-weight Conv.

    Returns the names of the folded BN nodes (the model is edited in place)."""
    g = Graph(model)
    folded = []
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or attr(bn, "training_mode", 0):
            continue
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or g.sole_consumer(conv.output[0]) is not bn:
            continue
        w = g.const(conv.input[1])
        params = [g.const(n) for n in bn.input[1:5]]
        if w is None or any(p is None for p in params):
            continue
        b = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0], np.float32)
        if b is None:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        a = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        g.set_init(conv, 1, "weight", w * a.reshape(-1, *([1] * (w.ndim - 1))))
        g.set_init(conv, 2, "bias", (b - mean) * a + beta)
        for t in bn.input[1:5]:
            users = g.consumers.get(t, [])
            if bn in users:
                users.remove(bn)
            if not users and t in g.inits:
                model.graph.initializer.remove(g.inits.pop(t))
        conv.output[0] = bn.output[0]
        g.producer[bn.output[0]] = conv
        model.graph.node.remove(bn)
        folded.append(bn.name)
    return folded


def ensure_bias(model: onnx.ModelProto, names: set[str] | None = None) -> list[str]:
    """Give constant-weight Conv nodes (and Gemm with C omitted) a zero bias; returns the nodes changed."""
    g = Graph(model)
    changed = []
    for n in model.graph.node:
        if names is not None and n.name not in names:
            continue
        if n.op_type == "Conv" and (len(n.input) < 3 or not n.input[2]):
            w = g.const(n.input[1])
            if w is not None:
                g.set_init(n, 2, "bias", np.zeros(w.shape[0], np.float32))
                changed.append(n.name)
    return changed


# --- cross-layer equalization -------------------------------------------------------------------

@dataclass
class EqualizedPair:
    first: str
    second: str
    act: str
    channels: int
    scaled: int  # channels with s != 1
    range_before: float  # mean over channels of max(r1, r2) / min(r1, r2)
    range_after: float


@dataclass
class EqualizeResult:
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # first conv -> reason


def equalize_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None]]:
    """Conv -> (Relu | Clip) -> Conv chains with no other consumer in between."""
    g = Graph(model)
    pairs = []
    for c1 in model.graph.node:
        if c1.op_type != "Conv":
            continue
        act = g.sole_consumer(c1.output[0])
        if act is None or act.op_type not in ("Relu", "Clip"):
            continue
        c2 = g.sole_consumer(act.output[0])
        if c2 is None or c2.op_type != "Conv" or c2.input[0] != act.output[0]:
            continue
        pairs.append((c1, act, c2))
    return pairs


def clip_bounds(g: Graph, node: onnx.NodeProto) -> tuple[float | None, float | None]:
    if node.op_type == "Relu":
        return 0.0, None
    lo = attr(node, "min")
    hi = attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        v = g.const(node.input[1])
        lo = None if v is None else float(v)
    if len(node.input) > 2 and node.input[2]:
        v = g.const(node.input[2])
        hi = None if v is None else float(v)
    return lo, hi


def cross_layer_equalize(model: onnx.ModelProto, channel_max: dict[str, np.ndarray] | None = None,
                         margin: float = 0.9) -> EqualizeResult:
    """Equalize every Conv -> Relu/Clip(0, M) -> Conv pair in place.

    `channel_max` maps a first conv's output tensor to the per-channel maximum measured on the
    calibration data; Clip pairs are only rescaled on channels whose maximum stays below
    `margin * M` before and after the rescale (elsewhere s = 1)."""
    res = EqualizeResult()
    g = Graph(model)
    for c1, act, c2 in equalize_pairs(model):
        why = _equalize_one(g, c1, act, c2, channel_max or {}, margin, res)
        if why:
            res.skipped[c1.name] = why
    return res


def _equalize_one(g: Graph, c1, act, c2, channel_max, margin, res: EqualizeResult) -> str | None:
    lo, hi = clip_bounds(g, act)
    if lo != 0.0:
        return f"{act.op_type} '{act.name}' is not zero-based (min={lo}), not positively homogeneous"
    w1, w2 = g.const(c1.input[1]), g.const(c2.input[1])
    if w1 is None or w2 is None:
        return "weight is not constant"
    if g.shared(c1.input[1]) or g.shared(c2.input[1]):
        return "weight is shared with another node"
    b1 = g.const(c1.input[2]) if len(c1.input) > 2 and c1.input[2] else np.zeros(w1.shape[0], np.float32)
    if b1 is None:
        return "bias is not constant"
    ch = w1.shape[0]
    group2 = attr(c2, "group", 1)
    if group2 == 1:
        if w2.shape[1] != ch:
            return "channel counts do not match"
        r2 = np.abs(w2).max(axis=tuple(i for i in range(w2.ndim) if i != 1))
    elif group2 == ch and w2.shape[0] == ch and w2.shape[1] == 1:
        r2 = np.abs(w2).reshape(ch, -1).max(axis=1)  # depthwise: input channel i feeds output channel i
    else:
        return f"second conv is grouped (group={group2}), only plain and depthwise convs are equalized"
    r1 = np.abs(w1).reshape(ch, -1).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones(ch)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    s = np.clip(s, 1e-3, 1e3)
    if hi is not None:  # Clip(0, M): only where the clip never bites, before or after
        m = channel_max.get(c1.output[0])
        if m is None:
            return f"Clip '{act.name}' (max={hi}) with no measured channel ranges"
        m = np.asarray(m, np.float64)
        safe = m <= margin * hi
        s = np.where(safe, np.maximum(s, m / (margin * hi)), 1.0)
    if np.allclose(s, 1.0):
        return "nothing to equalize (ranges already match, or every channel reaches the clip bound)"
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    g.set_init(c1, 1, "weight", w1 / s.reshape(shape1))
    g.set_init(c1, 2, "bias", b1 / s)
    if group2 == 1:
        w2n = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
    else:
        w2n = w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))
    g.set_init(c2, 1, "weight", w2n)
    spread_before = float(np.mean(np.maximum(r1, r2)[ok] / np.minimum(r1, r2)[ok])) if ok.any() else 1.0
    r1n, r2n = r1 / s, r2 * s
    spread_after = float(np.mean(np.maximum(r1n, r2n)[ok] / np.minimum(r1n, r2n)[ok])) if ok.any() else 1.0
    res.pairs.append(EqualizedPair(c1.name, c2.name, act.name, ch, int(np.sum(~np.isclose(s, 1.0))),
                                   spread_before, spread_after))
    return None
