"""Weight rounding that minimises each layer's output error (GPTQ / OBQ, Frantar et al. 2022).

Round-to-nearest picks each integer weight on its own. For a layer y = W x with inputs X
(columns: calibration samples; for a conv, its im2col patches), the output error of integer
weights Q with per-row scale s is ||(W - s Q) X||_F^2, a quadratic in each row with Hessian
H = X X^T. GPTQ quantizes the columns of W one at a time and spreads each column's rounding error
over the columns not yet quantized, optimally for that quadratic:

    q_j = clamp(round(w_j / s), -127, 127),   e_j = (w_j - s q_j) / U_jj,
    w_{j+1:} -= e_j U_{j, j+1:}

where U is the upper Cholesky factor of H^-1 (float64), H damped by `damp` times its mean
diagonal. Updates are applied in blocks of 128 columns (the paper's lazy batch update).

The scales stay onnxruntime's (per output channel, symmetric S8): only the int8 values of the
weight initializers in the QDQ model change, so the model runs exactly as fast as before. H is
estimated from the float model's inputs to each layer on the calibration rows (at most
`positions` im2col rows per image, seeded), batch by batch. Grouped and depthwise convs get one
H per group. A layer gets GPTQ only where it also helps on calibration images it was not fitted
on (held_out_errors). What is not handled is reported with a reason and left as round-to-nearest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy.linalg.lapack import dtrtri
from threadpoolctl import threadpool_limits

from surgeon.calibration import DataSet
from surgeon.model import to_graph, to_model
from surgeon.validate import stream_tensors

log = logging.getLogger(__name__)

BLOCK = 128
INNER = 16
MAX_COLUMNS = 4096  # inputs per output row: H is MAX_COLUMNS^2 float64 (128 MiB) and its Cholesky O(D^3)


@dataclass
class Layer:
    name: str
    op: str
    x: str  # input activation tensor (float model)
    w: np.ndarray  # float weight (F, C/g, k...) or (K, N) for MatMul / Gemm
    scale: np.ndarray  # per output channel
    wq: gs.Constant  # int8 initializer in the QDQ model
    attrs: dict
    groups: int = 1
    gram: np.ndarray | None = None  # (G, D, D), over every calibration row
    count: int = 0
    held: np.ndarray | None = None  # (G, D, D), over the held-out images' rows alone
    held_count: int = 0
    # the largest |integer| onnxruntime wrote: 127, or 64 with reduce_range (7-bit weights, where
    # u8 x s8 products would saturate); GPTQ's integers stay within it
    qmax: int = 127


@dataclass
class GptqResult:
    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    rel_err_rtn: dict[str, float] = field(default_factory=dict)  # ||(W - Q)X|| / ||W X|| on the calibration H
    rel_err_gptq: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, tuple[float, float]] = field(default_factory=dict)  # (rtn, gptq) on held-out images
    seconds: float = 0.0

    def summary(self) -> dict:
        ratios = [self.rel_err_gptq[n] / self.rel_err_rtn[n] for n in self.layers if self.rel_err_rtn.get(n, 0) > 0]
        return {"layers": len(self.layers), "skipped": self.skipped,
                "held_out_error_rtn_gptq": {k: [round(a, 5), round(b, 5)] for k, (a, b) in self.held_out.items()},
                "median_layer_error_ratio": float(np.median(ratios)) if ratios else None,
                "seconds": round(self.seconds, 2)}


def gptq_quantize(weight_rows: np.ndarray, scale: np.ndarray, hessian: np.ndarray, damp: float = 0.01,
                  qmin: int = -127, qmax: int = 127) -> np.ndarray:
    """Integer weights for rows W (G, R, D) with per-row scale (G, R) and Hessians H (G, D, D)."""
    W = np.array(weight_rows, np.float64)
    H = np.array(hessian, np.float64)
    s = np.asarray(scale, np.float64)[..., None]  # (G, R, 1)
    G, R, D = W.shape
    diag = np.einsum("gii->gi", H)
    dead = diag <= 0
    idx = np.arange(D)
    H[:, idx, idx] += damp * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    H[:, idx, idx] += np.where(dead, 1.0, 0.0)
    W[np.broadcast_to(dead[:, None, :], W.shape)] = 0.0
    # Upper U with U^T U = H^-1 from one Cholesky: with P the index reversal, P H P = L L^T gives
    # H^-1 = (P L^-T P)(P L^-1 P), and P L^-1 P is upper triangular.
    L = np.linalg.cholesky(H[:, ::-1, ::-1])
    U = np.stack([_tri_inv(l) for l in L])[:, ::-1, ::-1]
    Q = np.zeros_like(W)
    s1 = s[..., 0]
    for i1 in range(0, D, BLOCK):
        i2 = min(i1 + BLOCK, D)
        W1 = W[:, :, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        # the same lazy update once more inside the block: column by column only within INNER
        # columns, the rest of the block by one product per INNER (the per-column numpy calls
        # on R x 128 slices were most of GPTQ's time on ResNet-50)
        for j1 in range(0, i2 - i1, INNER):
            j2 = min(j1 + INNER, i2 - i1)
            for i in range(j1, j2):
                w = W1[:, :, i]
                q = np.clip(np.round(w / s1), qmin, qmax)
                Q[:, :, i1 + i] = q
                err = (w - q * s1) / U1[:, i, i, None]
                W1[:, :, i + 1:j2] -= err[:, :, None] * U1[:, None, i, i + 1:j2]  # column i is done
                E1[:, :, i] = err
            W1[:, :, j2:] -= E1[:, :, j1:j2] @ U1[:, j1:j2, j2:]
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    return Q


def _tri_inv(lower: np.ndarray) -> np.ndarray:
    inv, info = dtrtri(lower, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
    return inv


def output_error(W: np.ndarray, Wq: np.ndarray, H: np.ndarray) -> float:
    """||(W - Wq) X||_F / ||W X||_F from H = X X^T, rows (G, R, D)."""
    return output_errors(W, [Wq], H)[0]


def output_errors(W: np.ndarray, candidates: list[np.ndarray], H: np.ndarray) -> list[float]:
    """output_error of each candidate Wq against the same W and H (||W X|| computed once; the
    products in float32, twice the speed of float64, good to about 1e-6; float64 when H's
    entries are too large for float32 products)."""
    dtype = np.float32 if float(np.max(np.abs(H), initial=0.0)) < 1e30 else np.float64
    Hc = np.asarray(H, dtype)
    den = float(np.sum((np.asarray(W, dtype) @ Hc) * W, dtype=np.float64))
    out = []
    for Wq in candidates:
        d = np.asarray(W - Wq, dtype)
        num = float(np.sum((d @ Hc) * d, dtype=np.float64))
        out.append(float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0)
    return out


def find_layers(float_model: onnx.ModelProto, qg: gs.Graph, res: GptqResult) -> list[Layer]:
    """Conv (2-D, explicit pads) and MatMul/Gemm (constant B) nodes whose weight Q reads through a
    symmetric int8 DequantizeLinear, matched by node name to the float model that was quantized."""
    fg = to_graph(float_model)
    fnodes = {n.name: n for n in fg.nodes}
    layers = []
    for n in qg.nodes:
        if n.op not in ("Conv", "Gemm", "MatMul") or n.name not in fnodes or len(n.inputs) < 2:
            continue
        fn = fnodes[n.name]
        t = n.inputs[1]
        if not t.inputs or t.inputs[0].op != "DequantizeLinear":
            continue
        dq = t.inputs[0]
        wq, sc, zp = dq.inputs[0], dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None
        if not isinstance(wq, gs.Constant) or not isinstance(sc, gs.Constant) or not isinstance(fn.inputs[1], gs.Constant):
            continue
        if np.asarray(wq.values).dtype != np.int8 or (zp is not None and np.any(np.asarray(zp.values) != 0)):
            res.skipped[n.name] = "weights are not symmetric int8"
            continue
        if len(wq.outputs) != 1 or len(t.outputs) != 1:
            res.skipped[n.name] = "quantized weight shared with another node"
            continue
        w = np.asarray(fn.inputs[1].values)
        scale = np.asarray(sc.values, np.float64).reshape(-1)
        qmax = max(int(np.abs(np.asarray(wq.values, np.int32)).max(initial=0)), 1)
        if n.op == "Conv":
            if w.ndim != 4 or fn.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                res.skipped[n.name] = "only 2-D convs with explicit pads"
                continue
            if scale.size not in (1, w.shape[0]) or dq.attrs.get("axis", 1) not in (0, -4) and scale.size > 1:
                res.skipped[n.name] = "weight scale is not per output channel"
                continue
            layers.append(Layer(n.name, "Conv", fn.inputs[0].name, w, np.broadcast_to(scale, (w.shape[0],)).copy(), wq,
                                dict(fn.attrs), int(fn.attrs.get("group", 1)), qmax=qmax))
        else:
            if n.op == "Gemm" and (fn.attrs.get("transA", 0) or float(fn.attrs.get("alpha", 1.0)) != 1.0):
                res.skipped[n.name] = "Gemm with transA or alpha != 1"
                continue
            trans_b = bool(fn.attrs.get("transB", 0)) if n.op == "Gemm" else False
            if w.ndim != 2:
                res.skipped[n.name] = "weight is not a matrix"
                continue
            rows = w.shape[0] if trans_b else w.shape[1]
            axis = dq.attrs.get("axis", 1)
            if scale.size > 1 and (axis % 2) != (0 if trans_b else 1):
                res.skipped[n.name] = "weight scale is not per output column"
                continue
            attrs = {"transB": trans_b}
            layers.append(Layer(n.name, n.op, fn.inputs[0].name, w, np.broadcast_to(scale, (rows,)).copy(), wq, attrs,
                                qmax=qmax))
    return layers


# float32 sums are safe while every entry stays below this (float32 overflows at 3.4e38): an
# entry of the sum is at most the sum over the blocks of P * max|x|^2
FLOAT32_SUM_BOUND = 1e36


class GramSum:
    """The sum of X X^T over blocks of columns X (G, D, P), accumulated in place in float32:
    BLAS syrk for one group (half a GEMM's multiply-adds, and no D x D temporary per image,
    whose float64 copies and additions took longer than the products on ResNet-50), a batched
    product for grouped convs (small D). Float32 sums over a few hundred thousand columns are
    good to about 1e-6, far below GPTQ's 1% damping; float64 on the way out. Activations large
    enough to overflow a float32 sum (seeded model-zoo weights reach 1e19) switch the sum to
    float64 before they are added."""

    def __init__(self) -> None:
        self.single: np.ndarray | None = None   # (D, D) Fortran order, upper triangle, G == 1
        self.batched: np.ndarray | None = None  # (G, D, D), G > 1
        self.count = 0
        self.bound = 0.0  # an upper bound of every entry of the sum
        self.dtype = np.float32

    def add(self, X: np.ndarray) -> None:
        from scipy.linalg.blas import dsyrk, ssyrk

        if X.shape[2] == 0:
            return
        self.count += X.shape[2]
        peak = max(float(X.max()), -float(X.min()))
        self.bound += X.shape[2] * peak * peak
        if self.dtype == np.float32 and not self.bound < FLOAT32_SUM_BOUND:  # (NaN too)
            self.dtype = np.float64
            self.single = None if self.single is None else self.single.astype(np.float64, order="F")
            self.batched = None if self.batched is None else self.batched.astype(np.float64)
        X = X.astype(self.dtype, copy=False)
        if X.shape[0] > 1:
            part = X @ np.swapaxes(X, 1, 2)
            self.batched = part if self.batched is None else np.add(self.batched, part, out=self.batched)
            return
        x, syrk = X[0], (ssyrk if self.dtype == np.float32 else dsyrk)
        if self.single is None:
            self.single = np.zeros((len(x), len(x)), self.dtype, order="F")
        if x.flags.c_contiguous:  # x^T is Fortran-ordered: trans=1 reads it without a copy
            self.single = syrk(1.0, x.T, beta=1.0, c=self.single, trans=1, overwrite_c=1)
        else:
            self.single = syrk(1.0, np.asfortranarray(x), beta=1.0, c=self.single, overwrite_c=1)

    def value(self) -> np.ndarray | None:
        """The sum as (G, D, D) float64; None when nothing was added."""
        if self.single is not None:
            u = self.single.astype(np.float64)  # syrk leaves the lower triangle at zero
            full = u + u.T
            full[np.diag_indices_from(full)] -= np.diagonal(u)
            return full[None]
        return None if self.batched is None else self.batched.astype(np.float64)


def _conv_columns(x: np.ndarray, layer: Layer, positions: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Each image's im2col columns X (G, D, P) float32 of a conv input, at most `positions`
    output positions per image (the same random ones for every image of the batch)."""
    kh, kw = layer.w.shape[2:]
    pads = list(layer.attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = layer.attrs.get("strides", [1, 1])
    dh, dw = layer.attrs.get("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    n, c = x.shape[:2]
    total = oh * ow
    pick = np.sort(rng.choice(total, positions, replace=False)) if total > positions else np.arange(total)
    pi, pj = pick // ow, pick % ow
    g = layer.groups
    for k in range(n):
        xk = xp[k]
        cols = np.empty((c, kh * kw, pick.size), np.float32)
        for a in range(kh):
            for b in range(kw):
                cols[:, a * kw + b, :] = xk[:, pi * sh + a * dh, pj * sw + b * dw]
        yield cols.reshape(g, (c // g) * kh * kw, pick.size)


def held_out_images(n: int) -> np.ndarray:
    """Calibration images whose rows only score GPTQ (every 4th, as the low-rank fits' held-out
    trials; none when there are fewer than 4 images: then the check uses every row)."""
    return np.arange(n) % 4 == 3 if n >= 4 else np.zeros(n, bool)


def _rows_per_image(x: np.ndarray, n: int) -> np.ndarray | None:
    """A MatMul/Gemm input as (images, rows, K): the images on the first axis if it has the
    batch's size n (the usual layout), else on the one other axis that has it (sequence models,
    e.g. an OCR recognizer's (T, N, C)); None when several do and the images cannot be told
    apart: such a layer gets no held-out check."""
    lead = x.shape[:-1]
    axes = [a for a, size in enumerate(lead) if size == n]
    if not axes or (len(axes) > 1 and axes[0] != 0):
        return None
    return np.moveaxis(np.asarray(x), axes[0], 0).reshape(n, -1, x.shape[-1])


def accumulate_grams(float_model: onnx.ModelProto, layers: list[Layer], data: DataSet, positions: int,
                     threads: int = 0, seed: int = 0) -> None:
    """Each layer's Gram matrix of its float inputs over every calibration image, and over the
    held-out images alone (held_out_images)."""
    rng = np.random.default_rng(seed)
    tensors = sorted({l.x for l in layers})
    first = next(iter(data.inputs))  # its rows count the images of each batch
    held_images = held_out_images(len(data))
    batch_rows = max(8, min(len(data), 64))  # fewer onnxruntime runs (a static batch dim keeps its size)
    sums = {l.name: (GramSum(), GramSum()) for l in layers}  # (the images fitted on, the held-out ones)
    offset = 0
    for batch in stream_tensors(float_model, [first, *tensors], data, batch=batch_rows, threads=threads):
        n = len(batch[first])
        held = held_images[offset:offset + n]
        for l in layers:
            fit, out = sums[l.name]
            x = np.asarray(batch[l.x])
            if l.op == "Conv":
                for k, X in enumerate(_conv_columns(x, l, positions, rng)):
                    (out if held[k] else fit).add(X)
                continue
            per_image = _rows_per_image(x, n)
            if per_image is None:  # no image split: every row is fitted on
                fit.add(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32).T[None])
                continue
            for images, dest in ((per_image[~held], fit), (per_image[held], out)):
                dest.add(np.ascontiguousarray(images.reshape(-1, x.shape[-1]), np.float32).T[None])
        offset += n
    for l in layers:
        fit, out = sums.pop(l.name)
        l.held, l.held_count = out.value(), out.count
        fitted = fit.value()
        l.gram = fitted if l.held is None else l.held if fitted is None else fitted + l.held
        l.count = fit.count + out.count


def _weight_rows(l: Layer) -> np.ndarray:
    """The weight as (G, R, D): rows are output channels, columns the inputs each row reads."""
    if l.op == "Conv":
        f = l.w.shape[0]
        return l.w.reshape(l.groups, f // l.groups, -1)
    return (l.w if l.attrs["transB"] else l.w.T)[None]


def _int_weight(l: Layer, q_rows: np.ndarray) -> np.ndarray:
    if l.op == "Conv":
        return q_rows.reshape(l.w.shape)
    q = q_rows[0]
    return q if l.attrs["transB"] else q.T


def apply_gptq(float_model: onnx.ModelProto, q: onnx.ModelProto, data: DataSet, *, damp: float = 0.01,
               positions: int = 256, threads: int = 0, seed: int = 0,
               max_inputs: int = MAX_COLUMNS) -> tuple[onnx.ModelProto, GptqResult]:
    """A copy of the QDQ model `q` whose int8 weights are GPTQ's instead of round-to-nearest, on
    the layers whose output rows read at most `max_inputs` inputs (C/g x kh x kw for a conv).
    A layer keeps round-to-nearest when GPTQ fitted on 3/4 of the images does not lower its output
    error on the other images (held_out_errors), or GPTQ on every image does not lower it on H."""
    return _apply_gptq(float_model, q, data, damp, positions, threads, seed, min(max_inputs, MAX_COLUMNS))


def held_out_errors(l: Layer, W: np.ndarray, s: np.ndarray, damp: float) -> tuple[float, float] | None:
    """(round-to-nearest, GPTQ) output errors on the held-out images' H, GPTQ fitted on the other
    images' H; None without a split.

    On its own H, GPTQ's error is never above round-to-nearest's; on images it did not see it can
    be: on EfficientNet-Lite0's 7x7 layers (49 rows per photo, 32 photos) GPTQ's held-out error
    was 2-5x round-to-nearest's, and those layers raised the weights-only drift from 0.033 to
    0.041. So a layer gets GPTQ (on every image's H) only if this check says it helps."""
    if not l.held_count or l.held_count >= l.count:
        return None
    fit, check = (l.gram - l.held) / (l.count - l.held_count), l.held / l.held_count
    rtn = np.clip(np.round(W / s[..., None]), -l.qmax, l.qmax)
    trial = gptq_quantize(W, s, fit, damp, -l.qmax, l.qmax)
    e_rtn, e_gptq = output_errors(W, [rtn * s[..., None], trial * s[..., None]], check)
    return e_rtn, e_gptq


def _apply_gptq(float_model, q, data, damp, positions, threads, seed, max_inputs):
    t0 = time.perf_counter()
    res = GptqResult()
    qg = to_graph(q)
    layers = find_layers(float_model, qg, res)
    if not layers:
        return q, res
    for l in layers:
        d = _weight_rows(l).shape[2]
        if d > max_inputs:
            res.skipped[l.name] = (f"{d} inputs per output: more than GPTQ's {MAX_COLUMNS}" if max_inputs == MAX_COLUMNS
                                   else f"{d} inputs per output: more than gptq_max_inputs={max_inputs}")
    layers = [l for l in layers if l.name not in res.skipped]
    if not layers:
        return q, res
    accumulate_grams(float_model, layers, data, positions, threads, seed)  # large GEMMs: every BLAS thread
    # many small factorizations: BLAS threads only add contention on 2 cores (2 threads on the
    # layers with 1024 inputs or more did not help either: dtrtri and the per-column updates
    # got slower than the Cholesky factor got faster)
    with threadpool_limits(1):
        _round_layers(layers, damp, res)
    res.seconds = time.perf_counter() - t0
    return to_model(qg, like=q), res


def _round_layers(layers: list[Layer], damp: float, res: GptqResult) -> None:
    """GPTQ's integers into each layer's int8 initializer, where the held-out check and the
    layer's own H say they beat round-to-nearest; the rest keep theirs, with the reason."""
    for l in layers:
        W = _weight_rows(l)
        G, R, _ = W.shape
        s = l.scale.reshape(G, R)
        H = l.gram / max(l.count, 1)
        rtn = np.clip(np.round(W / s[..., None]), -l.qmax, l.qmax)
        checked = held_out_errors(l, W, s, damp)
        if checked is not None:
            res.held_out[l.name] = checked
            if checked[1] >= checked[0]:
                res.skipped[l.name] = "GPTQ did not lower the layer's output error on held-out images"
                continue
        qi = gptq_quantize(W, s, H, damp, -l.qmax, l.qmax)
        e_rtn, e_gptq = output_errors(W, [rtn * s[..., None], qi * s[..., None]], H)
        res.rel_err_rtn[l.name], res.rel_err_gptq[l.name] = e_rtn, e_gptq
        if e_gptq >= e_rtn:
            res.skipped[l.name] = "GPTQ did not lower the layer's output error"
            continue
        l.wq.values = _int_weight(l, qi).astype(np.int8)
        res.layers.append(l.name)


def transplant(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    """`dst` (a re-quantization of the same float weights, e.g. after bias correction) with the
    int8 weights of `src` wherever a node of the same name has a weight of the same shape and
    scales: re-quantizing through onnxruntime would round to nearest again."""
    def weights(g: gs.Graph) -> dict[str, tuple[gs.Constant, np.ndarray]]:
        out = {}
        for n in g.nodes:
            if n.op in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1 and n.inputs[1].inputs \
                    and n.inputs[1].inputs[0].op == "DequantizeLinear":
                dq = n.inputs[1].inputs[0]
                if isinstance(dq.inputs[0], gs.Constant) and isinstance(dq.inputs[1], gs.Constant):
                    out[n.name] = (dq.inputs[0], np.asarray(dq.inputs[1].values))
        return out

    have = weights(to_graph(src))
    dg = to_graph(dst)
    changed = 0
    for name, (const, scale) in weights(dg).items():
        if name in have:
            sconst, sscale = have[name]
            if sconst.values.shape == const.values.shape and np.array_equal(sscale, scale):
                const.values = np.array(sconst.values)
                changed += 1
    return to_model(dg, like=dst) if changed else dst
