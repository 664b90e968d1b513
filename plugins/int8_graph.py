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
* Bias Add folding: Conv followed by Add(constant per output channel), the bias some exporters
  leave outside the conv, becomes the conv's bias. Left apart, the conv's output is quantized
  before the bias is added (another range, another rounding) and the Clip after the Add is no
  longer the conv's activation, so neither the fused range nor equalization applies:
  EfficientNet-Lite0 with its 49 biases as Adds kept 65.6% of the float answers (drift 0.59)
  against 96.9% (0.051) as exported. A 2-D MatMul followed by a bias Add (tf2onnx's Dense)
  becomes a Gemm, whose logits float_outputs then leaves in float.
* `ensure_bias` gives Conv a zero bias so bias correction has something to adjust.

The rewrites edit an onnx-graphsurgeon graph in place through surgeon/rewrite.py (new constants
are named after the node, `conv3/int8/weight`); int8.py converts to and from the ModelProto
that onnxruntime's quantizer takes. `upgrade_opset` works on the ModelProto, as the
version converter does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.errors import UsageError
from surgeon.rewrite import (clip_after, constant_value, fold_affine_after, input_or_none,
                             replace_constant, shared_by, sole_reader)

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) needs opset 13
TAG = "int8"


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


# --- folding a layer's affine tail (bias Add, Mul, BatchNormalization) ----------------------------

def _bias_or_zeros(node: gs.Node, out_channels: int) -> np.ndarray | None:
    """The node's constant bias, zeros when it has none, None when it is computed at run time."""
    bias = input_or_none(node, 2)
    return np.zeros(out_channels, np.float32) if bias is None else constant_value(bias)


def fold_affine(graph: gs.Graph, ranks: dict[str, int] | None = None, *, scales: bool = True) -> dict[str, str]:
    """Fold into each constant-weight Conv, and each MatMul whose input has rank 2 (`ranks`:
    tensor name -> rank), what an exporter left after it of its affine map (in place): bias Adds
    (a 2-D MatMul then becomes a Gemm) and, with `scales`, per-channel Muls and inference-mode
    BatchNormalizations (rewrite.fold_affine_after). Returns {folded node: layer}."""
    folded = {}
    for node in list(graph.nodes):
        if node.op in ("Conv", "MatMul"):
            rank = (ranks or {}).get(node.inputs[0].name)
            folded.update(dict.fromkeys(fold_affine_after(graph, node, TAG, rank, scales=scales), node.name))
    return folded


def ensure_bias(graph: gs.Graph, names: set[str] | None = None) -> list[str]:
    """Give constant-weight Conv nodes a zero bias; returns the nodes changed."""
    changed = []
    for n in graph.nodes:
        if n.op != "Conv" or (names is not None and n.name not in names) or input_or_none(n, 2) is not None:
            continue
        w = constant_value(n.inputs[1])
        if w is not None:
            replace_constant(graph, n, 2, TAG, "bias", np.zeros(w.shape[0], w.dtype))
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


def equalize_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, gs.Node]]:
    """Conv -> (Relu | Clip) -> Conv chains with no other reader in between."""
    pairs = []
    for c1 in graph.nodes:
        if c1.op != "Conv":
            continue
        act = sole_reader(graph, c1)
        if act is None or act.op not in ("Relu", "Clip"):
            continue
        c2 = sole_reader(graph, act)
        if c2 is None or c2.op != "Conv" or c2.inputs[0] is not act.outputs[0]:
            continue
        pairs.append((c1, act, c2))
    return pairs


def cross_layer_equalize(graph: gs.Graph, channel_max: dict[str, np.ndarray] | None = None,
                         margin: float = 0.9) -> EqualizeResult:
    """Equalize every Conv -> Relu/Clip(0, M) -> Conv pair in place.

    `channel_max` maps a first conv's output tensor to the per-channel maximum measured on the
    calibration data; Clip pairs are only rescaled on channels whose maximum stays below
    `margin * M` before and after the rescale (elsewhere s = 1)."""
    res = EqualizeResult()
    for c1, act, c2 in equalize_pairs(graph):
        why = _equalize_one(graph, c1, act, c2, channel_max or {}, margin, res)
        if why:
            res.skipped[c1.name] = why
    return res


def _equalize_one(graph: gs.Graph, c1: gs.Node, act: gs.Node, c2: gs.Node, channel_max, margin,
                  res: EqualizeResult) -> str | None:
    clip = clip_after(graph, c1)
    if clip is None:
        return f"Clip '{act.name}' has bounds computed at run time"
    if clip.lo != 0.0:
        return f"{act.op} '{act.name}' is not zero-based (min={clip.lo}), not positively homogeneous"
    hi = None if np.isinf(clip.hi) else clip.hi
    w1, w2 = constant_value(c1.inputs[1]), constant_value(c2.inputs[1])
    if w1 is None or w2 is None:
        return "weight is not constant"
    if shared_by(c1.inputs[1], c1) or shared_by(c2.inputs[1], c2):
        return "weight is shared with another node"
    b1 = _bias_or_zeros(c1, w1.shape[0])
    if b1 is None:
        return "bias is not constant"
    ch = w1.shape[0]
    group2 = c2.attrs.get("group", 1)
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
        m = channel_max.get(c1.outputs[0].name)
        if m is None:
            return f"Clip '{act.name}' (max={hi}) with no measured channel ranges"
        m = np.asarray(m, np.float64)
        safe = m <= margin * hi
        s = np.where(safe, np.maximum(s, m / (margin * hi)), 1.0)
    if np.allclose(s, 1.0):
        return "nothing to equalize (ranges already match, or every channel reaches the clip bound)"
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    replace_constant(graph, c1, 1, TAG, "weight", (w1 / s.reshape(shape1)).astype(w1.dtype))
    replace_constant(graph, c1, 2, TAG, "bias", (b1 / s).astype(w1.dtype))
    if group2 == 1:
        w2n = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
    else:
        w2n = w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))
    replace_constant(graph, c2, 1, TAG, "weight", w2n.astype(w2.dtype))
    spread_before = float(np.mean(np.maximum(r1, r2)[ok] / np.minimum(r1, r2)[ok])) if ok.any() else 1.0
    r1n, r2n = r1 / s, r2 * s
    spread_after = float(np.mean(np.maximum(r1n, r2n)[ok] / np.minimum(r1n, r2n)[ok])) if ok.any() else 1.0
    res.pairs.append(EqualizedPair(c1.name, c2.name, act.name, ch, int(np.sum(~np.isclose(s, 1.0))),
                                   spread_before, spread_after))
    return None
