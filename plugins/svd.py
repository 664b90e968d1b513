"""Plugin svd: a fully connected layer becomes a low-rank pair of matmuls.

A fully connected layer computes y = x W (+ bias) with a constant W of shape (in, out). Its
truncated SVD W ~ U_r S_r V_r^T is the best rank-r approximation (Eckart-Young), and
splitting it as

    W ~ A B,   A (in x r),  B (r x out)

turns one (rows x in x out) product into two with rows x r x (in + out) multiply-accumulates
and r (in + out) weights instead of in x out; the pair saves something only while
r < in out / (in + out).

The singular vectors come from `surgeon.lowrank.left_singular` (the Gram route, float64) on
the smaller side of W, so the factors are a projection onto the leading singular subspace:

    in <= out:  U_r = leading left singular vectors of W     A = U_r,      B = U_r^T W
    in >  out:  V_r = leading right singular vectors of W    A = W V_r,    B = V_r^T

Both are exactly U_r S_r V_r^T; at full rank U_r U_r^T = I and the pair reproduces W.

What is rewritten (ONNX Gemm: Y = alpha A' B' + beta C, A' = A^T if transA, B' = B^T if transB):

    Gemm(x, W, C)   ->  MatMul(x, A) -> Gemm(h, B, C')   alpha folded into B, beta into C'
    MatMul(x, W)    ->  MatMul(x, A) -> MatMul(h, B)     x may be N-D ([batch, seq, hidden])

A bias added after a MatMul (the MatMul + Add that PyTorch exports) stays where it is, after
the second MatMul. For 2-D Gemm inputs, MatMul -> Gemm and MatMul -> MatMul -> Add timed the
same in onnxruntime (within noise); MatMul -> MatMul is the only form that broadcasts over
leading dims, hence the MatMul case. A shared (tied) weight is factorized once and its users
share A and B, but only if all of them read it the same way and all are rewritten (later
users follow the first one's guard verdict): factorizing some of them would add weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from surgeon import data_fit, layer_stats
from surgeon.lowrank import MatrixFactors, matrix_factors
from surgeon.plugin import Candidate, Context, GraphPlugin, Rewrite, Skip
from surgeon.rank_choice import RankOptions, matrix_rank
from surgeon.rewrite import Chain, clip_after, constant_value, fold_bias_add, input_or_none, not_constant, shared_by

log = logging.getLogger(__name__)

# Used when no ratio, rank or energy is given: a square layer keeps half its weights.
DEFAULT_RATIO = 0.25


@dataclass
class SvdOptions(RankOptions):
    """Rank options shared with tucker, plus an explicit rank and an escape from the savings check."""

    ratio: float | None = field(default=None, metadata={
        "help": "rank = ratio x min(in, out) (0 < ratio <= 1); 0.25 when no rank option is given",
        "default_text": "0.25 (no rank option)"})
    rank: int | None = field(default=None, metadata={
        "help": "the same rank for every layer (capped at min(in, out)); default: ratio 0.25"})
    allow_growth: bool = field(default=False, metadata={
        "help": "rewrite even when the pair has at least as many weights as the layer "
                "(full rank, to check that the factorization is exact)"})

    def check(self) -> None:
        self.check_common(explicit=self.rank is not None)
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def describe(self) -> str:
        if self.rank is not None:
            how = f"rank {self.rank}"
        elif self.energy is not None:
            how = f"energy {self.energy:g}"
        else:
            how = f"ratio {self.ratio if self.ratio is not None else DEFAULT_RATIO:g}"
        return self.rank_choice(how, self.rank is not None)


@dataclass
class Factors:
    """W ~ A @ B, with the leading singular values of W (descending; all of them, or at least
    the first r) and the sum of all of them squared."""

    a: np.ndarray  # (in, r)
    b: np.ndarray  # (r, out)
    s: np.ndarray
    energy: float | None = None  # sum of all squared singular values; None: sum(s^2)


def factorize(w: np.ndarray, rank: int, factors: MatrixFactors | None = None) -> Factors:
    """Rank-`rank` truncated SVD of W (in x out) as A (in x r) @ B (r x out), in float64. Without
    precomputed factors only the leading `rank` singular vectors are computed."""
    factors = factors if factors is not None else matrix_factors(w, rank)
    a, b = factors.pair(rank)  # U_r (U_r^T W), or (W V_r) V_r^T when in > out
    return Factors(a, b, factors.values, factors.energy)


class GemmToSvd(GraphPlugin):
    """Gemm / MatMul with a constant 2-D weight -> MatMul(x, A) then Gemm or MatMul with B."""

    name = "svd"
    summary = "fully connected layers (Gemm, MatMul x @ W) -> low-rank pair of matmuls (truncated SVD)"
    Options = SvdOptions

    def uses_data(self, opts: SvdOptions) -> bool:
        """fit=data fits on the calibration rows (so they are not scored); fit=weights reads none."""
        return opts.fit == "data"

    def before_rewrites(self, graph: gs.Graph, candidates: list[Candidate], ctx: Context, opts: SvdOptions) -> None:
        """A 2-D MatMul whose bias an exporter left in an Add after it (tf2onnx's Dense, a Linear
        exported as MatMul + Add) becomes Gemm(x, W, bias), exactly, as onnxruntime fuses it on
        load: the data-aware fit then centres its rows, moves the mean shift into the bias and
        sees the Relu/Clip behind it. The digits MLP in that form, ratio 1/8 and 1/4, guard
        none: drift 0.8588 and 0.6639 before, 0.6729 and 0.5496 (its Gemm form) with the fold.
        A MatMul over more than two axes keeps its Add (no Gemm takes it)."""
        for cand in candidates:
            node, shape = cand.node, ctx.shapes.get(cand.node.inputs[0].name)
            if node.op != "MatMul" or len(cand.data["group"]) > 1 or shape is None:
                continue
            add = fold_bias_add(graph, node, "svd", input_rank=len(shape))
            if add is not None:
                cand.data["folded"] = [add]

    # --- which nodes -------------------------------------------------------------------------

    def select(self, graph: gs.Graph, ctx: Context, opts: SvdOptions) -> Iterable[Candidate | Skip]:
        for node in graph.nodes:
            if node.op == "Gemm":
                yield self._select_gemm(node)
            elif node.op == "MatMul":
                yield self._select_matmul(node)

    def _select_gemm(self, node: gs.Node) -> Candidate | Skip:
        # ONNX Gemm: Y = alpha * A' * B' + beta * C, A' = transpose(A) if transA, B' likewise
        if node.attrs.get("transA", 0):
            return Skip(node.name, node.op, "transA=1 (the input is transposed; not a fully connected layer)")
        weight = node.inputs[1]
        value = constant_value(weight)
        if value is None:
            return Skip(node.name, node.op, not_constant(weight, f"weight '{weight.name}'"))
        refusal = _refuse_weight(node, weight, value)
        if refusal:
            return refusal
        w = value.T if node.attrs.get("transB", 0) else value  # (in, out)
        return Candidate(node, {"w": w, "weight": weight.name, "alpha": float(node.attrs.get("alpha", 1.0)),
                                "beta": float(node.attrs.get("beta", 1.0)), "group": _users(node, weight)})

    def _select_matmul(self, node: gs.Node) -> Candidate | Skip:
        left, right = node.inputs[0], node.inputs[1]
        lv, rv = constant_value(left), constant_value(right)
        if lv is not None and rv is not None:
            return Skip(node.name, node.op, "both inputs are constant (nothing to factorize at run time)")
        if rv is None:
            if lv is not None:
                return Skip(node.name, node.op, f"the constant '{left.name}' is on the left (W @ x); "
                                                "only x @ W is factorized")
            return Skip(node.name, node.op, "no constant weight (both inputs computed at run time)")
        refusal = _refuse_weight(node, right, rv)
        if refusal:
            return refusal
        return Candidate(node, {"w": rv, "weight": right.name, "alpha": 1.0, "beta": 1.0,
                                "group": _users(node, right)})

    # --- the rewrite -------------------------------------------------------------------------

    def rewrite(self, graph: gs.Graph, cand: Candidate, ctx: Context, opts: SvdOptions) -> Rewrite | Skip:
        node = cand.node
        bias = input_or_none(node, 2) if node.op == "Gemm" else None
        w = cand.data["w"]
        n_in, n_out = w.shape
        n = min(n_in, n_out)
        alpha, beta = cand.data["alpha"], cand.data["beta"]
        fit, note = opts.fit_mode(ctx.data)
        if fit == "data" and len(cand.data["group"]) > 1:
            fit, note = "weights", "weight shared by several layers: fitted to the weights"
        sample, fitted = self._data_fit(graph, node, ctx, opts) if fit == "data" else (None, None)
        if fit == "data" and fitted is None:
            fit, note = "weights", "no calibration rows reached this layer"
        shift, out_error = None, None
        if fit == "data":
            if fitted.skip:
                return Skip(node.name, node.op, fitted.skip)
            r = fitted.ranks[0]
            fa, fb = fitted.factors
            a, b = fa.astype(w.dtype), fb.astype(w.dtype)  # alpha is in W already
            shift = fitted.shift
            f = Factors(fa, fb / alpha if alpha else fb, fitted.values)
            out_error = fitted.out_error
        else:  # a rank from ratio or rank= needs no spectrum: then only r vectors are computed, below
            factors = matrix_factors(w) if opts.energy is not None else None
            r = matrix_rank(opts, factors.values if factors is not None else np.zeros(0), w.shape, explicit=opts.rank,
                            default_ratio=DEFAULT_RATIO)
            refusal = _saves_nothing(r, n_in, n_out, opts)
            if refusal:
                return Skip(node.name, node.op, refusal)
            f = factorize(w, r, factors)
            a = f.a.astype(w.dtype)
            b = (alpha * f.b).astype(w.dtype)  # alpha folded into the second factor
        before, after = n_in * n_out, r * (n_in + n_out)
        c_value = constant_value(bias) if bias is not None else None

        chain = Chain(graph, node, "svd")
        x = node.inputs[0]
        shared = self._shared_factors(graph, cand, ctx)
        if isinstance(shared, Skip):
            return shared
        if shared is None:
            const_a, const_b = chain.const("A", a), chain.const("B", b)
            if len(cand.data["group"]) > 1:  # the first user of a shared weight makes the factors for all
                graph.__dict__.setdefault("_svd_shared", {})[cand.data["weight"]] = (node.name, const_a, const_b)
        else:
            const_a, const_b = shared
        h = chain.op("MatMul", "down", [x, const_a], dtype=w.dtype)
        if node.op == "Gemm":
            inputs, attrs = [h, const_b], {}
            if shift is not None:  # C' = beta C + mean shift, in C's dtype (the weight's when there was none)
                dtype = c_value.dtype if c_value is not None else w.dtype
                c_new = (beta * c_value.astype(np.float64) if c_value is not None else 0.0) + shift
                inputs.append(chain.const("C", np.asarray(c_new), dtype))
            elif bias is not None:
                if beta == 1.0:
                    inputs.append(bias)
                elif c_value is not None:  # fold beta: the pair's Gemm has beta = 1
                    inputs.append(chain.const("C", (beta * c_value.astype(np.float64)).astype(c_value.dtype)))
                else:
                    inputs.append(bias)
                    attrs["beta"] = beta
            chain.op("Gemm", "up", inputs, attrs, dtype=w.dtype)
        else:
            chain.op("MatMul", "up", [h, const_b], dtype=w.dtype)

        details = self._details(ctx, x, w, a, b, alpha, f.s, f.energy, r, before, after)
        if "folded" in cand.data:
            details["folded"] = cand.data["folded"]
        details["fit"] = fit
        details["rank_choice"] = opts.describe()
        if fit == "data":
            details.update(layer_stats.report(sample, out_error, fitted.kind, fitted.choice, fitted.through))
        if note:
            details["fit_note"] = note
        log.debug("%s: rank %d of %d (%s fit), rel. error %.3g", node.name, r, n, fit, details["rel_error"])
        if shared is not None:
            details["shared_with"] = graph.__dict__["_svd_shared"][cand.data["weight"]][0]
        # later users of a shared weight follow the first one's guard verdict
        return Rewrite(chain.nodes, details, timed=shared is None)

    def _data_fit(self, graph: gs.Graph, node: gs.Node, ctx: Context, opts: SvdOptions):
        """(sample, data_fit.LayerFit) of this layer on the graph as rewritten so far; the fits of
        a stage's layers run in parallel when its samples are drawn (layer_stats.layer_fit)."""
        return layer_stats.layer_fit(graph, node.name, ctx, opts, layer_stats.fc_request, "svd",
                                     lambda n, sample, o: self._fit_job(graph, n, sample, o))

    def _fit_job(self, graph: gs.Graph, node: gs.Node, sample: layer_stats.Sample, opts: SvdOptions):
        """The data-aware fit of one layer as a closure (None: not a candidate, or a shared weight)."""
        cand = self._select_gemm(node) if node.op == "Gemm" else self._select_matmul(node) if node.op == "MatMul" \
            else None
        if not isinstance(cand, Candidate) or opts.fit != "data" or len(cand.data["group"]) > 1:
            return None
        w, alpha, beta = cand.data["w"], cand.data["alpha"], cand.data["beta"]
        n_in, n_out = w.shape
        bias = input_or_none(node, 2) if node.op == "Gemm" else None
        # The mean shift moves into Gemm's C when there is a constant C or none; otherwise
        # (MatMul, a C computed at run time) the fit is uncentred and needs no bias.
        c_value = constant_value(bias) if bias is not None else None
        centered = node.op == "Gemm" and (bias is None or (c_value is not None and c_value.size in (1, n_out)))
        c_row = beta * c_value.astype(np.float64).reshape(-1) if centered and c_value is not None else 0.0

        return lambda: data_fit.fit_linear(
            alpha * w.astype(np.float64), sample,
            lambda values: matrix_rank(opts, values, w.shape, explicit=opts.rank, default_ratio=DEFAULT_RATIO),
            refuse=lambda r: _saves_nothing(r, n_in, n_out, opts), centered=centered, damp=opts.damp,
            select=opts.select, bias=c_row, spectrum=opts.energy is not None,
            clip=clip_after(graph, node) if opts.activation == "through" else None)

    @staticmethod
    def _shared_factors(graph: gs.Graph, cand: Candidate, ctx: Context):
        """For a weight shared by several users: None for the first (it makes the factors),
        the first one's (A, B) constants for the others, or a Skip when they cannot all be
        rewritten (factorizing only some users would add parameters)."""
        group = cand.data["group"]
        if len(group) < 2:
            return None
        node, weight = cand.node, cand.data["weight"]
        left_out = [n for n in group if n not in ctx.selected]
        if left_out:
            return Skip(node.name, node.op, f"weight '{weight}' is shared with {', '.join(left_out)}, which this run "
                                            "does not rewrite (--layers); factorizing only some users would add "
                                            "parameters")
        first = graph.__dict__.get("_svd_shared", {}).get(weight)
        if first is None:
            return None
        first_layer, const_a, const_b = first
        if ctx.outcomes.get(first_layer) != "rewritten":
            return Skip(node.name, node.op, f"weight '{weight}' is shared with {first_layer}, which was not rewritten")
        return const_a, const_b

    @staticmethod
    def _details(ctx: Context, x: gs.Tensor, w: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float,
                 s: np.ndarray, energy: float | None, r: int, before: int, after: int) -> dict[str, Any]:
        n_in, n_out = w.shape
        target = alpha * w.astype(np.float64)
        norm = np.linalg.norm(target)
        err = np.linalg.norm(target - a.astype(np.float64) @ b.astype(np.float64))
        sq = s.astype(np.float64) ** 2
        total = float(sq.sum()) if energy is None else energy
        shape = ctx.shapes.get(x.name)
        rows = math.prod(shape[:-1]) if shape else None
        return {
            "rank": r, "in": n_in, "out": n_out,
            "rel_error": float(err / norm) if norm > 0 else float(err),
            "energy_kept": min(1.0, float(sq[:r].sum() / total)) if total > 0 else 1.0,
            "params_before": before, "params_after": after,
            "macs_before": rows * before if rows is not None else None,
            "macs_after": rows * after if rows is not None else None,
        }


def _saves_nothing(r: int, n_in: int, n_out: int, opts: SvdOptions) -> str | None:
    """Why a rank-r pair is not worth it (no fewer weights), or None."""
    before, after = n_in * n_out, r * (n_in + n_out)
    if after < before or opts.allow_growth:
        return None
    return (f"rank {r} saves no parameters: {r} x ({n_in} + {n_out}) = {after} >= {n_in} x {n_out} = {before} "
            f"(needs rank < {before / (n_in + n_out):.1f})")


def _refuse_weight(node: gs.Node, weight: gs.Tensor, value: np.ndarray) -> Skip | None:
    """Reasons a constant weight cannot be factorized; None when it can."""
    if value.ndim != 2:
        return Skip(node.name, node.op, f"weight '{weight.name}' is {value.ndim}-D {list(value.shape)}; "
                                        "only a 2-D weight is factorized")
    if not np.issubdtype(value.dtype, np.floating):
        return Skip(node.name, node.op, f"weight '{weight.name}' is {value.dtype}, not floating point")
    if min(value.shape) < 2:
        return Skip(node.name, node.op, f"weight '{weight.name}' {list(value.shape)} has rank at most 1")
    others = shared_by(weight, node)
    differ = [o for o in others if _usage(o, weight) != _usage(node, weight)]
    if differ:
        names = ", ".join(sorted(o.name for o in differ))
        return Skip(node.name, node.op, f"weight '{weight.name}' is shared with {len(differ)} node(s) that use it "
                                        f"differently ({names}); factorizing one user would add parameters")
    return None


def _usage(node: gs.Node, weight: gs.Tensor) -> tuple:
    """How a node uses a weight: users with the same usage can share one factorization."""
    attrs = node.attrs
    return (node.op, tuple(i for i, t in enumerate(node.inputs) if t is weight),
            attrs.get("transA", 0), attrs.get("transB", 0), float(attrs.get("alpha", 1.0)))


def _users(node: gs.Node, weight: gs.Tensor) -> list[str]:
    """Every node that reads the weight (itself included), in graph order of their names."""
    return sorted({node.name, *(o.name for o in shared_by(weight, node))})


PLUGINS = [GemmToSvd]
