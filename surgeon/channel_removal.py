"""Removing channel slots that surgeon.channel_groups found: the graph edits of structured
pruning, and masking, the reference they are checked against.

Removing a slot deletes its output channel from every member (weight, bias, the following
BatchNormalization's four vectors, a per-channel constant of an Add/Mul), the matching input
channels of every consumer (next Conv's weight, Gemm / MatMul rows, channel x spatial blocks
after a Flatten), and fixes split sizes, slice bounds, Resize sizes and Reshape targets.

Masking zeroes a slot instead (`mask_channels`): its member's weight slice W[j] and bias b[j],
and gamma[j] and beta[j] of the BatchNormalization (or the constant of a per-channel Add / Sub)
that directly follows the member. Where the tracer let a slot be removed, removal == masking
(see channel_groups, "Exactness").
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.channel_groups import Analysis, Cut, Member, UnionFind
from surgeon.data_factors import regularised
from surgeon.rewrite import constant_value, input_or_none


def _keep(atoms: tuple[int, ...], removed: set[int], find: UnionFind) -> np.ndarray:
    return np.array([i for i, a in enumerate(atoms) if find(a) not in removed], dtype=np.int64)


def _set_input(node: gs.Node, index: int, values: np.ndarray) -> None:
    """Give `node` a new constant at `index`, leaving other readers of the old one untouched."""
    old = node.inputs[index]
    if len(old.outputs) == 1:
        old.values = np.ascontiguousarray(values)
    else:
        t = gs.Constant(f"{old.name}/pruned/{node.name}", np.ascontiguousarray(values))
        node.inputs[index] = t


def weight_out_axis(mem: Member) -> int:
    """The axis of the member's weight that holds its output channels."""
    if mem.kind in ("conv", "depthwise"):
        return 0
    if mem.kind == "convT":
        return 1
    if mem.kind == "gemm":
        return 0 if int(mem.node.attrs.get("transB", 0)) else 1
    return 1  # matmul [K, F]


def _bias_index(mem: Member) -> int | None:
    if mem.kind == "matmul":
        return None
    return 2 if input_or_none(mem.node, 2) is not None else None


def _take_last(v: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    """Slice a per-channel constant on `axis` (from the end); a broadcast dim of 1 stays."""
    pos = v.ndim + axis
    if pos < 0 or v.shape[pos] == 1:
        return v
    return np.take(v, keep, axis=pos)


def prune_channels(graph: gs.Graph, analysis: Analysis, removed: set[int], opset: int = 13,
                   fill: dict[str, np.ndarray] | None = None, cov: dict[str, np.ndarray] | None = None
                   ) -> list[str]:
    """Delete the slots in `removed` (slot ids) from `graph`: members' outputs, consumers'
    inputs, and every constant or attribute that counts them. Stale tensor shapes are cleared.

    `fill` (tensor consumed by a channel-dropping layer -> one value per channel position)
    replaces each removed input channel by that constant instead of zero: the consumer's bias
    takes b[o] += sum_k W[o, p, k] * fill[p] over removed positions p (Gemm: alpha / beta
    folded in; MatMul: an Add after it). Exact for a constant channel read by a Gemm, MatMul or
    unpadded conv; at a padded conv's border the constant was partly outside the image.
    `cov` (tensor -> the covariance of its channel positions, with `fill` their means): a removed
    channel is replaced by its least-squares prediction from the kept ones instead of by its
    mean (linear_prediction), folded into the consumer's kept weights and its bias.
    Returns the consumers that could not take a fill (ConvTranspose: strided taps differ)."""
    find = analysis.find
    removed = {find(s) for s in removed}
    unfilled: list[str] = []
    for mem in analysis.members:
        keep = _keep(mem.atoms, removed, find)
        if len(keep) == len(mem.atoms):
            continue
        node = mem.node
        w = constant_value(node.inputs[1])
        _set_input(node, 1, np.take(w, keep, axis=weight_out_axis(mem)))
        b = _bias_index(mem)
        if b is not None:
            _set_input(node, b, _take_last(constant_value(node.inputs[b]), keep, -1))
        if mem.kind == "depthwise":
            node.attrs["group"] = len(keep) // (len(mem.atoms) // int(node.attrs["group"]))
    for cut in analysis.cuts:
        keep = _keep(cut.atoms, removed, find)
        if len(keep) == len(cut.atoms):
            continue
        node = cut.node
        if cut.kind == "in":
            values = None if fill is None else fill.get(cut.extra["tensor"])
            c = None if cov is None else cov.get(cut.extra["tensor"])
            if values is not None and not _fill_consumer(graph, node, cut, keep, values, c):
                unfilled.append(node.name)
            _set_input(node, 1, np.take(constant_value(node.inputs[1]), keep, axis=cut.axis))
        elif cut.kind == "const":
            _set_input(node, cut.index, _take_last(constant_value(node.inputs[cut.index]), keep, cut.axis))
        elif cut.kind == "split":
            bounds = np.cumsum([0] + cut.extra["sizes"])
            sizes = [int(np.sum((keep >= a) & (keep < b))) for a, b in zip(bounds[:-1], bounds[1:])]
            if input_or_none(node, 1) is not None:
                _set_input(node, 1, np.asarray(sizes, dtype=np.int64))
            elif opset < 13:  # sizes were an attribute before opset 13, an input since
                node.attrs["split"] = sizes
            else:
                node.attrs.pop("num_outputs", None)
                sizes_t = gs.Constant(f"{node.name}/pruned/split", np.asarray(sizes, dtype=np.int64))
                node.inputs[1:] = [sizes_t]
        elif cut.kind == "slice":
            s, e = cut.extra["start"], cut.extra["end"]
            new_s = int(np.sum(keep < s))
            new_e = int(np.sum(keep < e))
            for idx, val in ((1, new_s), (2, new_e)):
                v = np.array(constant_value(node.inputs[idx]))
                v.ravel()[cut.index] = val
                _set_input(node, idx, v)
        elif cut.kind == "resize":
            v = np.array(constant_value(node.inputs[3]))
            v.ravel()[cut.axis] = len(keep)
            _set_input(node, 3, v)
        elif cut.kind == "reshape":
            v = np.array(constant_value(node.inputs[1]))
            v.ravel()[1] = len(keep) * cut.extra["block"]
            _set_input(node, 1, v)
    inputs_outputs = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in inputs_outputs:
            t.shape = None  # channel counts changed; onnxruntime infers the rest
    return unfilled


# ridge of the kept channels' covariance in linear_prediction, as a fraction of its mean variance
PREDICTION_DAMP = 1e-2


def linear_prediction(mean: np.ndarray, cov: np.ndarray, keep: np.ndarray, gone: np.ndarray,
                      damp: float = PREDICTION_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(B, c) of the least-squares prediction x_gone ~ c + B^T x_keep of removed channels from the
    kept ones (per position, from the channel means and covariance S): B = (S_kk + damping)^-1
    S_kg with S the covariance, c = mean_gone - B^T mean_keep. A removed channel that is a linear
    combination of kept ones is predicted exactly; one uncorrelated with them gets its mean."""
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    kk = regularised(cov[np.ix_(keep, keep)], damp)
    b = np.linalg.solve(kk, cov[np.ix_(keep, gone)])
    return b, mean[gone] - b.T @ mean[keep]


def _fill_consumer(graph: gs.Graph, node: gs.Node, cut: Cut, keep: np.ndarray, values: np.ndarray,
                   cov: np.ndarray | None = None) -> bool:
    """Add the removed input channels' constant contribution to `node`'s bias (see prune_channels);
    with `cov`, their linear prediction from the kept channels: W_keep += B W_gone (Conv with
    one group, Gemm, MatMul: the consumer is linear in each input position) and the constant c."""
    gone = np.setdiff1d(np.arange(len(cut.atoms)), keep)
    dtype = np.asarray(constant_value(node.inputs[1])).dtype
    dtype = dtype if dtype.kind == "f" else np.dtype(np.float32)
    w = np.asarray(constant_value(node.inputs[1]), np.float64)
    taps = np.moveaxis(np.take(w, gone, axis=cut.axis), cut.axis, 0)  # [removed, ...]
    v = np.asarray(values, np.float64)[gone]
    if cov is not None and node.op in ("Conv", "Gemm", "MatMul") and int(node.attrs.get("group", 1)) == 1:
        b, v = linear_prediction(values, cov, keep, gone)
        mixed = np.moveaxis(w, cut.axis, 0).copy()
        mixed[keep] += np.tensordot(b, taps, axes=(1, 0))
        _set_input(node, 1, np.moveaxis(mixed, 0, cut.axis).astype(dtype))
    if node.op == "Conv":
        delta = np.einsum("p,po->o", v, taps.reshape(taps.shape[0], taps.shape[1], -1).sum(axis=2))
        _add_bias(node, 2, delta, dtype)
    elif node.op == "Gemm":
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        if beta == 0:
            return False
        delta = np.einsum("p,po->o", v, taps.reshape(len(gone), -1)) * alpha / beta
        _add_bias(node, 2, delta, np.float32)
    elif node.op == "MatMul":
        delta = np.einsum("p,po->o", v, taps.reshape(len(gone), -1))
        out = node.outputs[0]
        inner = gs.Variable(f"{out.name}/pruned/unfilled", dtype=out.dtype)
        node.outputs[0] = inner
        const = gs.Constant(f"{node.name}/pruned/fill", delta.astype(np.float32))
        graph.nodes.append(gs.Node("Add", f"{node.name}/pruned/fill", inputs=[inner, const], outputs=[out]))
    else:
        return False
    return True


def _add_bias(node: gs.Node, index: int, delta: np.ndarray, dtype) -> None:
    b = input_or_none(node, index)
    if b is None:  # no bias yet (a conv before a BatchNormalization): give it one
        t = gs.Constant(f"{node.name}/pruned/bias", delta.astype(dtype))
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        if len(node.inputs) == index:
            node.inputs.append(t)
        else:  # an omitted optional input ("")
            node.inputs[index] = t
    else:
        old = np.asarray(constant_value(b))
        _set_input(node, index, (old + delta).astype(old.dtype))


def head_of(graph_node: gs.Node, graph: gs.Graph) -> list[gs.Node]:
    """The per-channel affine chain masked with a layer: the BatchNormalization, or an Add / Sub
    of a constant, reading the layer's output as its sole consumer (and so on, one after another)."""
    chain = []
    node = graph_node
    outputs = {t.name for t in graph.outputs}
    while True:
        t = node.outputs[0]
        if len(t.outputs) != 1 or t.name in outputs:
            return chain
        nxt = t.outputs[0]
        if nxt.op == "BatchNormalization" and nxt.inputs[0] is t:
            chain.append(nxt)
        elif nxt.op in ("Add", "Sub", "Mul", "Div") and len(nxt.inputs) == 2 and \
                any(isinstance(i, gs.Constant) for i in nxt.inputs) and not (nxt.op == "Div" and nxt.inputs[1] is t):
            chain.append(nxt)
        else:
            return chain
        node = nxt


def mask_channels(model: onnx.ModelProto, removed: dict[str, list[int]]) -> onnx.ModelProto:
    """The reference for structured pruning: the same model with the named output channels
    zeroed. For layer L and channel j: W_L[j] = 0 and b_L[j] = 0, and in L's head (see
    `head_of`) gamma[j] = beta[j] = 0 for a BatchNormalization and c[j] = 0 for an added
    constant, so the channel's output is exactly 0. Nothing else changes."""
    from surgeon.model import to_graph, to_model
    graph = to_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    for name, chans in removed.items():
        node = nodes[name]
        chans = np.asarray(chans, dtype=np.int64)
        if not len(chans):
            continue
        kind = {"Conv": "conv", "ConvTranspose": "convT", "Gemm": "gemm", "MatMul": "matmul"}[node.op]
        axis = weight_out_axis(Member(node, kind, ()))
        w = np.array(constant_value(node.inputs[1]))
        idx = [slice(None)] * w.ndim
        idx[axis] = chans
        w[tuple(idx)] = 0
        _set_input(node, 1, w)
        if kind != "matmul" and input_or_none(node, 2) is not None:
            b = np.array(constant_value(node.inputs[2]))
            if b.ndim and b.shape[-1] > 1:
                b[..., chans] = 0
                _set_input(node, 2, b)
        for h in head_of(node, graph):
            if h.op == "BatchNormalization":
                for i in (1, 2):
                    v = np.array(constant_value(h.inputs[i]))
                    v[chans] = 0
                    _set_input(h, i, v)
            elif h.op in ("Add", "Sub"):
                i = 0 if isinstance(h.inputs[0], gs.Constant) else 1
                v = np.array(constant_value(h.inputs[i]))
                pos = v.ndim + (-1 if kind in ("gemm", "matmul") else -(w.ndim - 1))
                if pos >= 0 and v.shape[pos] > 1:
                    idx = [slice(None)] * v.ndim
                    idx[pos] = chans
                    v[tuple(idx)] = 0
                    _set_input(h, i, v)
    return to_model(graph, like=model)
