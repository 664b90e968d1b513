"""Plugin `tucker`: a Conv becomes a Tucker-2 triple on its channel modes.

A kernel W[f, c, *k] (f output channels, c input channels, any number of spatial dims) is
approximated on modes 0 and 1 only:

    W ~ core x_0 O x_1 I,    O (f x R2), I (c x R1) orthonormal,  core = W x_0 O^T x_1 I^T

with O and I the leading left singular vectors of the mode-0 and mode-1 unfoldings
(truncated HOSVD, through the Gram matrix: surgeon.lowrank), or refined by HOOI
(tensorly's partial_tucker, started from the HOSVD). Because convolution is linear in the
kernel, conv(x, W) = conv1x1(conv_k(conv1x1(x, I^T), core), O): three convs,

    in   1x1, c -> R1,  weight I^T, stride 1, no padding, no bias
    core k,   R1 -> R2, weight core, with the original strides / pads / auto_pad / dilations
    out  1x1, R2 -> f,  weight O, with the original bias

A 1x1 conv has no spatial mode to keep apart, so Tucker-2 collapses to a matrix SVD: it
becomes a two-conv pair (W ~ L R, rank R), the first conv keeping the original strides and
pads, the second adding the bias (`pointwise=svd`, the default), or is left alone
(`pointwise=skip`).

Parameters: c*R1 + K*R1*R2 + R2*f instead of K*c*f (K = prod(k)); the complexity ratio
K*c*f / (c*R1 + K*R1*R2 + R2*f) is reported per layer, next to the MACs at the real shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np
import onnx_graphsurgeon as gs

from surgeon import data_fit, layer_stats, lowrank, rank_choice
from surgeon.plugin import Candidate, Context, GraphPlugin, Rewrite, Skip
from surgeon.rewrite import (Chain, clip_after, constant_value, fold_affine_after, input_or_none,
                             not_constant, pointwise_weight, shared_by, spatial_attrs)

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.5


@dataclass
class TuckerOptions(rank_choice.RankOptions):
    """Ranks: one of --ratio, --energy, --ranks R1,R2 or rank_method=vbmf; none given means
    ratio 0.5."""

    ratio: float | None = field(default=None, metadata={
        "help": "rank = ratio x channels (0 < ratio <= 1); 0.5 when no rank option is given",
        "default_text": "0.5 (no rank option)"})
    ranks: tuple[int, int] | None = field(default=None, metadata={
        "help": "explicit ranks R1,R2 (input, output channels) for every selected layer"})
    rank_method: Literal["given", "vbmf"] = field(default="given", metadata={
        "help": "given: ranks from ratio / energy / ranks; vbmf: estimated per layer by EVBMF on the unfoldings"})
    method: Literal["hosvd", "hooi"] = field(default="hosvd", metadata={
        "help": "hosvd: truncated SVD of the two unfoldings; hooi: tensorly partial_tucker from the HOSVD"})
    iterations: int = field(default=20, metadata={"help": "HOOI iterations at most (method=hooi)"})
    pointwise: Literal["svd", "skip"] = field(default="svd", metadata={
        "help": "1x1 convs: svd = two-conv SVD pair, skip = leave them"})
    allow_growth: bool = field(default=False, metadata={
        "help": "rewrite even when neither parameters nor MACs shrink (e.g. ratio 1.0 checks)"})

    def check(self) -> None:
        self.check_common(self.ranks is not None, self.rank_method)
        if self.ranks is not None and min(self.ranks) < 1:
            raise ValueError(f"ranks must be >= 1, got {','.join(map(str, self.ranks))}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")

    @property
    def explicit(self) -> bool:
        """Ranks given as numbers (not derived from a ratio, energy or vbmf): never rounded by default."""
        return self.ranks is not None and self.rank_method != "vbmf"

    def describe(self) -> str:
        if self.rank_method == "vbmf":
            how = "vbmf"
        elif self.explicit:
            how = f"ranks {self.ranks[0]},{self.ranks[1]}"
        elif self.energy is not None:
            how = f"energy {self.energy:g}"
        else:
            how = f"ratio {self.ratio if self.ratio is not None else DEFAULT_RATIO:g}"
        return self.rank_choice(how, self.explicit)


def choose_ranks(opts: TuckerOptions, c: int, f: int, in_values: np.ndarray, out_values: np.ndarray,
                 in_shape: tuple[int, int], out_shape: tuple[int, int]) -> tuple[int, int]:
    """(R1, R2) for a kernel with c inputs, f outputs and the given unfolding spectra/shapes."""
    if opts.rank_method == "vbmf":
        r1, r2 = rank_choice.vbmf_rank(in_values, in_shape), rank_choice.vbmf_rank(out_values, out_shape)
    elif opts.ranks is not None:
        r1, r2 = opts.ranks
    elif opts.energy is not None:
        r1, r2 = rank_choice.rank_from_energy(in_values, opts.energy), rank_choice.rank_from_energy(out_values, opts.energy)
    else:
        ratio = opts.ratio if opts.ratio is not None else DEFAULT_RATIO
        r1, r2 = rank_choice.rank_from_ratio(c, ratio), rank_choice.rank_from_ratio(f, ratio)
    multiple = opts.rounding(opts.explicit)
    r1 = rank_choice.round_to_multiple(max(1, min(r1, c)), multiple, c)
    r2 = rank_choice.round_to_multiple(max(1, min(r2, f)), multiple, f)
    return r1, r2


class ConvToTucker(GraphPlugin):
    """Conv -> 1x1 (c->R1), core k (R1->R2), 1x1 (R2->f); a 1x1 conv -> an SVD pair."""

    name = "tucker"
    summary = "Conv -> Tucker-2 triple (1x1, kxk core, 1x1) on the channel modes; 1x1 convs -> SVD pair"
    Options = TuckerOptions

    def uses_data(self, opts: TuckerOptions) -> bool:
        """fit=data fits on the calibration rows (so they are not scored); fit=weights reads none."""
        return opts.fit == "data"

    def select(self, graph: gs.Graph, ctx: Context, opts: TuckerOptions) -> Iterable[Candidate | Skip]:
        for node in graph.nodes:
            if node.op == "ConvTranspose":
                yield Skip(node.name, node.op, "ConvTranspose is not factorized (only Conv)")
            elif node.op == "Conv":
                yield self._check(node, opts)

    def _check(self, node: gs.Node, opts: TuckerOptions) -> Candidate | Skip:
        def skip(reason: str) -> Skip:
            return Skip(node.name, node.op, reason)

        group = int(node.attrs.get("group", 1))
        if group != 1:
            return skip(f"grouped conv (group={group})")
        weight = input_or_none(node, 1)
        w = constant_value(weight) if weight is not None else None
        if w is None:
            return skip(not_constant(weight))
        if shared_by(weight, node):
            return skip(f"weight '{weight.name}' is shared with {', '.join(n.name for n in shared_by(weight, node))}")
        if w.ndim < 3:
            return skip(f"weight has rank {w.ndim}, expected (f, c, *kernel)")
        if not np.issubdtype(w.dtype, np.floating):
            return skip(f"weight is {w.dtype}, not floating point")
        if len(node.outputs) != 1:
            return skip("conv with more than one output")
        pointwise = all(k == 1 for k in w.shape[2:])
        if pointwise and opts.pointwise == "skip":
            return skip("1x1 conv (pointwise=skip; Tucker-2 of a 1x1 kernel is a plain SVD)")
        bias = input_or_none(node, 2)
        return Candidate(node, {"weight": w, "bias": bias, "pointwise": pointwise})

    def before_rewrites(self, graph: gs.Graph, candidates: list[Candidate], ctx: Context, opts: TuckerOptions) -> None:
        """What an exporter left after the conv and is part of its affine map is folded into the
        conv (exact), so the fit sees the Relu/Clip or the residual Add behind it and the mean
        shift lands in the bias:
        * a bias in an Add: EfficientNet-Lite0 with its biases as Adds drifted 0.510 at ratio 0.5
          (guard none), 0.4835 as exported;
        * with fit=data, an inference-mode BatchNormalization, or the per-channel Mul + Add
          torchvision's FrozenBatchNorm2d exports, so the fit aims at what the next layer
          reads: the digits CNN (Conv -> BatchNormalization -> Relu) at ratios 1/8, 1/4, 3/8
          drifted 0.2216, 0.0471, 0.0183 with its BNs apart, 0.1711, 0.0368, 0.0150 folded.
          The weight fit keeps its BNs apart: on folded weights it drifted 0.856, 0.353, 0.183
          against 1.01, 0.184, 0.0868 (a = gamma / sqrt(var) is largest on the channels that
          vary least, and the weight error weighs them the most)."""
        for cand in candidates:
            data = ctx.options_for(cand.layer, opts).fit_mode(ctx.data)[0] == "data"  # a recipe may set fit per layer
            folded = fold_affine_after(graph, cand.node, "tucker", scales=data)
            if folded:
                cand.data["weight"] = constant_value(cand.node.inputs[1])
                cand.data["bias"] = input_or_none(cand.node, 2)
                cand.data["folded"] = folded

    def rewrite(self, graph: gs.Graph, cand: Candidate, ctx: Context, opts: TuckerOptions) -> Rewrite | Skip:
        if cand.data["pointwise"]:
            return self._svd_pair(graph, cand, ctx, opts)
        return self._tucker(graph, cand, ctx, opts)

    # --- k x k: the Tucker-2 triple ------------------------------------------------------------

    def _tucker(self, graph: gs.Graph, cand: Candidate, ctx: Context, opts: TuckerOptions) -> Rewrite | Skip:
        node, w = cand.node, cand.data["weight"]
        f, c, kernel = w.shape[0], w.shape[1], w.shape[2:]
        K = math.prod(kernel)
        cost = _Cost(ctx, node, w)
        fit, note = opts.fit_mode(ctx.data)
        sample, fitted = self._data_fit(graph, node, ctx, opts) if fit == "data" else (None, None)
        if fit == "data" and fitted is None:
            fit, note = "weights", "no calibration rows reached this layer"
        if fit == "data":
            if fitted.skip:
                return Skip(node.name, node.op, fitted.skip)
            (r1, r2), (core, o, i), shift = fitted.ranks, fitted.factors, fitted.shift
        else:
            factors = lowrank.channel_factors(w)
            r1, r2 = choose_ranks(opts, c, f, factors.in_values, factors.out_values, (c, f * K), (f, c * K))
            saving = self._saves_nothing(cost, *_tucker_after(cost, c, f, K, r1, r2), f"ranks {r1},{r2}", opts)
            if saving is not None:
                return Skip(node.name, node.op, saving)
            core, o, i = self._weight_tucker(w, r1, r2, opts, factors)
            shift = None
        params_after, macs_after = _tucker_after(cost, c, f, K, r1, r2)
        approx = lowrank.tucker2_full(core, o, i)
        error = lowrank.relative_error(w, approx)

        nd = len(kernel)
        ones = [1] * nd
        chain = Chain(graph, node, "tucker")
        x = node.inputs[0]
        h = chain.op("Conv", "in", [x, chain.const("in/weight", pointwise_weight(i.T, nd), w.dtype)],
                     {"kernel_shape": ones}, dtype=w.dtype)
        h = chain.op("Conv", "core", [h, chain.const("core/weight", core, w.dtype)],
                     {**spatial_attrs(node), "kernel_shape": list(kernel)}, dtype=w.dtype)
        out_inputs = [h, chain.const("out/weight", pointwise_weight(o, nd), w.dtype)]
        bias, bias_note = _shifted_bias(chain, cand.data["bias"], shift, w.dtype)
        if bias is not None:
            out_inputs.append(bias)
        chain.op("Conv", "out", out_inputs, {"kernel_shape": ones}, dtype=node.outputs[0].dtype)
        details = {"form": "tucker2", "R1": r1, "R2": r2, "method": "data" if fit == "data" else opts.method,
                   "fit": fit, "rank_choice": opts.describe(),
                   "rel_error": error, "params_before": cost.params, "params_after": params_after,
                   "macs_before": cost.macs, "macs_after": macs_after if cost.known else None,
                   "complexity_ratio": (K * c * f) / (c * r1 + K * r1 * r2 + r2 * f)}
        if fit == "data":
            details.update(layer_stats.report(sample, fitted.out_error, fitted.kind, fitted.choice, fitted.through))
        if note or bias_note:
            details["fit_note"] = note or bias_note
        if "folded" in cand.data:
            details["folded"] = cand.data["folded"]
        log.debug("%s: Tucker-2 ranks %d,%d (%s fit) error %.3g", node.name, r1, r2, fit, error)
        return Rewrite(chain.nodes, details)

    @staticmethod
    def _weight_tucker(w: np.ndarray, r1: int, r2: int, opts: TuckerOptions,
                       factors: lowrank.ChannelFactors | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The weight-space Tucker-2 (fit=weights): HOSVD, or HOOI with method=hooi."""
        factors = factors or lowrank.channel_factors(w)
        if opts.method == "hooi":
            return lowrank.hooi_channels(w, r1, r2, factors, iterations=opts.iterations)
        return lowrank.hosvd_channels(w, r1, r2, factors)

    def _data_fit(self, graph: gs.Graph, node: gs.Node, ctx: Context, opts: TuckerOptions):
        """(sample, data_fit.LayerFit) of this conv on the graph as rewritten so far; the fits of
        a stage's convs run in parallel when its samples are drawn (layer_stats.layer_fit)."""
        def request(n: gs.Node):
            w = constant_value(n.inputs[1]) if len(n.inputs) > 1 else None
            return layer_stats.conv_request(n, tuple(w.shape[2:])) if w is not None and w.ndim >= 3 else None
        return layer_stats.layer_fit(graph, node.name, ctx, opts, request, "tucker",
                                     lambda n, sample, o: self._fit_job(graph, n, sample, ctx, o))

    def _fit_job(self, graph: gs.Graph, node: gs.Node, sample: layer_stats.Sample, ctx: Context,
                 opts: TuckerOptions):
        """The data-aware fit of one conv as a closure (None: the conv is not a candidate)."""
        cand = self._check(node, opts)
        if isinstance(cand, Skip) or opts.fit != "data":
            return None
        w = cand.data["weight"]
        f, c, K = w.shape[0], w.shape[1], math.prod(w.shape[2:])
        cost, bias = _Cost(ctx, node, w), _bias_values(cand.data["bias"], f)
        clip = clip_after(graph, node) if opts.activation == "through" else None
        # ranks from a ratio or explicit ranks need no spectrum: then only the chosen fit runs on all rows
        spectrum = opts.energy is not None or opts.rank_method == "vbmf"
        if cand.data["pointwise"]:  # y = a x: in the x W orientation W = a^T
            a = w.reshape(f, c).astype(np.float64)

            def refuse_rank(r):
                return self._saves_nothing(cost, *_pair_after(cost, c, f, r), f"rank {r}", opts)

            return lambda: data_fit.fit_linear(a.T, sample, lambda values: _pair_rank(opts, values, f, c),
                                              refuse=refuse_rank, damp=opts.damp, select=opts.select, bias=bias,
                                              spectrum=spectrum, clip=clip)

        def ranks_of(in_values, out_values):
            return choose_ranks(opts, c, f, in_values, out_values, (c, f * K), (f, c * K))

        def refuse(r1, r2):
            return self._saves_nothing(cost, *_tucker_after(cost, c, f, K, r1, r2), f"ranks {r1},{r2}", opts)

        return lambda: data_fit.fit_tucker(w, sample, ranks_of, refuse=refuse, damp=opts.damp, select=opts.select,
                                          bias=bias, spectrum=spectrum, clip=clip)

    # --- 1x1: the SVD pair ---------------------------------------------------------------------

    def _svd_pair(self, graph: gs.Graph, cand: Candidate, ctx: Context, opts: TuckerOptions) -> Rewrite | Skip:
        node, w = cand.node, cand.data["weight"]
        f, c, nd = w.shape[0], w.shape[1], w.ndim - 2
        a = w.reshape(f, c).astype(np.float64)
        cost = _Cost(ctx, node, w)
        fit, note = opts.fit_mode(ctx.data)
        sample, fitted = self._data_fit(graph, node, ctx, opts) if fit == "data" else (None, None)
        if fit == "data" and fitted is None:
            fit, note = "weights", "no calibration rows reached this layer"
        if fit == "data":
            if fitted.skip:
                return Skip(node.name, node.op, fitted.skip)
            (r,), (fa, fb), shift = fitted.ranks, fitted.factors, fitted.shift
            left, right = fb.T, fa.T  # x a^T ~ (x A) B, so a ~ B^T A^T
        else:
            factors = lowrank.matrix_factors(a)
            r = _pair_rank(opts, factors.values, f, c)
            saving = self._saves_nothing(cost, *_pair_after(cost, c, f, r), f"rank {r}", opts)
            if saving is not None:
                return Skip(node.name, node.op, saving)
            left, right = factors.pair(r)
            shift = None
        params_after, macs_after = _pair_after(cost, c, f, r)
        error = lowrank.relative_error(a, left @ right)

        chain = Chain(graph, node, "tucker")
        # Zero padding commutes with a bias-free 1x1 conv, so strides / pads / auto_pad move
        # to the first conv unchanged; the bias lands on the second.
        h = chain.op("Conv", "in", [node.inputs[0], chain.const("in/weight", pointwise_weight(right, nd), w.dtype)],
                     {**spatial_attrs(node), "kernel_shape": [1] * nd}, dtype=w.dtype)
        out_inputs = [h, chain.const("out/weight", pointwise_weight(left, nd), w.dtype)]
        bias, bias_note = _shifted_bias(chain, cand.data["bias"], shift, w.dtype)
        if bias is not None:
            out_inputs.append(bias)
        chain.op("Conv", "out", out_inputs, {"kernel_shape": [1] * nd}, dtype=node.outputs[0].dtype)
        details = {"form": "svd-pair", "R1": r, "R2": r, "method": "svd", "fit": fit, "rank_choice": opts.describe(),
                   "rel_error": error, "params_before": cost.params, "params_after": params_after,
                   "macs_before": cost.macs, "macs_after": macs_after if cost.known else None,
                   "complexity_ratio": (c * f) / (r * (c + f))}
        if fit == "data":
            details.update(layer_stats.report(sample, fitted.out_error, fitted.kind, fitted.choice, fitted.through))
        if note or bias_note:
            details["fit_note"] = note or bias_note
        if "folded" in cand.data:
            details["folded"] = cand.data["folded"]
        return Rewrite(chain.nodes, details)

    @staticmethod
    def _saves_nothing(cost: "_Cost", params_after: int, macs_after: int, what: str,
                       opts: TuckerOptions) -> str | None:
        if opts.allow_growth:
            return None
        fewer_params = params_after < cost.params
        fewer_macs = cost.known and macs_after < cost.macs
        if fewer_params or fewer_macs:
            return None
        macs = f", MACs {cost.macs} -> {macs_after}" if cost.known else ""
        return f"{what} save neither parameters nor MACs (params {cost.params} -> {params_after}{macs})"


def _pair_rank(opts: TuckerOptions, values: np.ndarray | None, f: int, c: int) -> int:
    """The rank of a 1x1 conv's SVD pair (f x c weight), from its spectrum when the options need one."""
    return rank_choice.matrix_rank(opts, values, (f, c), vbmf=opts.rank_method == "vbmf",
                               explicit=min(opts.ranks) if opts.ranks else None, default_ratio=DEFAULT_RATIO)


def _pair_after(cost: "_Cost", c: int, f: int, r: int) -> tuple[int, int]:
    """(parameters, MACs) of the SVD pair at rank r: the first conv keeps the original strides,
    so both run at the output resolution."""
    return r * (c + f) + cost.bias, cost.macs_out(r * c + f * r)


def _tucker_after(cost: "_Cost", c: int, f: int, K: int, r1: int, r2: int) -> tuple[int, int]:
    """(parameters, MACs) of the Tucker-2 triple at ranks R1, R2: the in conv runs at the input
    resolution, the core and the out conv at the output's."""
    return c * r1 + K * r1 * r2 + r2 * f + cost.bias, cost.macs_in(c * r1) + cost.macs_out(K * r1 * r2 + r2 * f)


def _shifted_bias(chain: Chain, bias: gs.Tensor | None, shift: np.ndarray | None, dtype) -> tuple[gs.Tensor | None, str | None]:
    """The out conv's bias: the original one, moved by the fit's mean shift when there is one
    (a new initializer in the bias's dtype, or the weight's when the conv had none)."""
    if shift is None:
        return bias, None
    if bias is None:
        return chain.const("out/bias", shift, dtype), None
    value = constant_value(bias)
    if value is None:
        return bias, "bias computed at run time: the mean shift is not folded into it"
    return chain.const("out/bias", value.astype(np.float64) + shift, value.dtype), None


def _bias_values(bias: gs.Tensor | None, f: int) -> np.ndarray:
    """The bias as f floats (zeros when absent or computed at run time)."""
    value = constant_value(bias) if bias is not None else None
    return np.zeros(f) if value is None else np.broadcast_to(value.astype(np.float64).reshape(-1), (f,))


class _Cost:
    """Parameters and MACs of the original conv, and MACs of 1x1 stages at its input and
    output resolution, from the shapes shape inference gave (batch included, as in
    surgeon.profile). `known` is False when the shapes are not static."""

    def __init__(self, ctx: Context, node: gs.Node, w: np.ndarray) -> None:
        bias = input_or_none(node, 2)
        self.bias = int(np.prod(bias.shape)) if bias is not None and bias.shape is not None else 0
        self.params = int(w.size) + self.bias
        self.in_shape = ctx.shapes.get(node.inputs[0].name)
        self.out_shape = ctx.shapes.get(node.outputs[0].name)
        self.known = bool(self.in_shape) and bool(self.out_shape)
        self.macs = self.macs_out(int(np.prod(w.shape[1:])) * w.shape[0]) if self.known else 0

    def _positions(self, shape: tuple[int, ...] | None) -> int:
        # every (batch, spatial) position of an NC... tensor
        return int(shape[0] * math.prod(shape[2:])) if shape else 0

    def macs_in(self, per_position: int) -> int:
        return self._positions(self.in_shape) * per_position

    def macs_out(self, per_position: int) -> int:
        return self._positions(self.out_shape) * per_position


PLUGINS = [ConvToTucker]
