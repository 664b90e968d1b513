"""Plugin `int8`: calibrated int8 quantization through onnxruntime.quantization, with better
ranges and an accuracy-aware fallback.

Static mode: x_q = clamp(round(x / s) + z) per activation tensor (U8, scale from calibration) and
per output channel for weights (S8, symmetric), written as QuantizeLinear/DequantizeLinear (QDQ)
pairs that onnxruntime fuses into integer kernels. Before quantizing, BatchNormalization is
folded into its conv, consecutive convs can be equalized (plugins/int8_graph.py) and conv/Gemm
biases corrected for the mean shift quantization adds (E[y_float - y_int8] per channel, measured
on the calibration data). With a budget, the fewest nodes are kept in float until it holds
(plugins/int8_fallback.py). Dynamic mode quantizes weights ahead and activations at run time;
`bits < 8` quantizes MatMul/Gemm weights block-wise only (MatMulNBits).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from surgeon.plugins import int8_cost as ic
from surgeon.plugins import int8_fallback as fb
from surgeon.plugins import int8_explain as ie
from surgeon.plugins import int8_gptq as gq
from surgeon.plugins import int8_graph as ig
from surgeon.plugins import int8_ort as io
from surgeon.plugins import int8_prepare as ip
from surgeon.plugins import int8_ranges as ir
from surgeon.plugins import int8_seqbias as sb
from surgeon.calibration import DataSet, synthesize
from surgeon.errors import SurgeonError, UsageError
from surgeon.model import to_graph, to_model
from surgeon.plugin import Context, LayerReport, ModelPlugin
from surgeon.rewrite import constant_value, input_or_none, replace_constant, shared_by, unique_name

log = logging.getLogger(__name__)

# Nodes that carry the arithmetic: reported per layer and eligible for the float fallback.
# LayerNormalization: onnxruntime puts Q/DQ around it, and its input is a transformer's residual
# stream, whose outlier channels (all-MiniLM-L6-v2: up to 223 where most stay within 10) an
# 8-bit grid loses; the fallback could not keep it in float before (budget drift <= 0.2 missed
# at 0.56 with every other node in float).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
               "GlobalAveragePool", "LayerNormalization")
HOLDOUT_MIN = 64  # with at least this many samples, a quarter is held out to measure drift


@dataclass
class Int8Options:
    mode: Literal["static", "dynamic"] = field(default="static", metadata={
        "help": "static: QDQ with calibrated activation ranges; dynamic: activation ranges at run time "
                "(MatMul, Gemm and LSTM weights; convs stay float unless dynamic_conv)"})
    # off since 7 Dec 2026: onnxruntime's ConvInteger made the shared models 2-11x slower than
    # float and drifted more (docs/int8.md, "Dynamic mode and convs")
    dynamic_conv: bool = field(default=False, metadata={
        "help": "mode=dynamic: quantize Conv too (ConvInteger; ran 2-11x slower than float Conv here)"})
    # minmax-or-percentile by default: percentile ranges lowered the held-out drift on the detector
    # (0.0627 -> 0.0392) and on EfficientNet-Lite0 (0.0570 -> 0.0552) but not on the digits networks
    # (docs/int8.md), so the default measures both and keeps the better
    calibration: Literal["minmax", "entropy", "percentile", "auto", "minmax-or-percentile"] = field(
        default="minmax-or-percentile", metadata={
            "help": "how activation ranges are computed from the calibration data; minmax-or-percentile tries both "
                    "for the whole model and keeps the lower drift; auto picks minmax, percentile or entropy per "
                    "tensor by quantization error, and is kept only if the drift drops"})
    percentile: float = field(default=99.999, metadata={"help": "percentile for --calibration percentile/auto"})
    entropy_bins: int = field(default=512, metadata={
        "help": "histogram bins for the entropy candidate of --calibration auto (more: finer, slower)"})
    per_channel: bool = field(default=True, metadata={"help": "one weight scale per output channel"})
    # auto since 6 Dec 2026: on an AVX2-only EPYC (no VNNI) full-range weights took the digits
    # CNN's drift from 0.0039 to 0.160 and the README's chain failed its gate; where products do
    # not saturate, 7-bit weights only cost accuracy (EfficientNet-Lite0 0.128 -> 0.262 on a VNNI
    # machine, docs/int8.md)
    reduce_range: bool | Literal["auto"] = field(default="auto", metadata={
        "help": "7-bit weights; auto: when onnxruntime on this CPU saturates 8-bit products (x86 without VNNI)"})
    activation_type: Literal["U8", "S8"] = field(default="U8", metadata={
        "help": "U8 runs fastest on x86 (S8 activations measured 1.7x slower, see docs/int8.md)"})
    weight_type: Literal["S8", "U8"] = field(default="S8", metadata={"help": "weight integer type"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated node names or op types to keep in float"})
    samples: int = field(default=128, metadata={"help": "calibration samples to use at most"})
    bits: int = field(default=8, metadata={
        "help": "8, or 4/2 for weight-only block-wise MatMul/Gemm quantization (MatMulNBits)"})
    block_size: int = field(default=32, metadata={"help": "block size for bits < 8"})
    max_drift: float | None = field(default=None, metadata={
        "help": "budget: relative L2 drift of the outputs; nodes are kept in float until it holds"})
    min_agreement: float | None = field(default=None, metadata={
        "help": "budget: top-1 agreement with the float model (0..1)"})
    fold_bn: bool = field(default=True, metadata={
        "help": "fold BatchNormalization, or its Mul + Add export, into the preceding conv"})
    equalize: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "cross-layer equalization of Conv->Relu/ReLU6->Conv; auto keeps it only if drift drops"})
    bias_correction: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "correct the per-channel mean shift of conv/Gemm outputs; auto keeps it only if drift drops"})
    sequential_bias: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "move each Conv/Gemm bias so its output mean on the quantized model matches the float model's, "
                "layer by layer in graph order (auto: kept if the drift drops)"})
    weight_rounding: Literal["auto", "gptq", "nearest"] = field(default="auto", metadata={
        "help": "nearest: round-to-nearest; gptq: integer weights minimising each layer's output error on the "
                "calibration inputs (GPTQ/OBQ, slower); auto: gptq, kept only if the drift drops"})
    # 4096 (every layer) since 5 Dec 2026, with GPTQ kept per layer only where it beats round-to-nearest
    # on held-out calibration images: on every layer without that check GPTQ was worse than on the small
    # ones (0.059-0.061 against 0.053 on EfficientNet-Lite0; its 7x7 layers fitted the 32 photos); with
    # it, 0.0499-0.0520 against 0.0528-0.0550 over three calibration splits and five seeds, the
    # detector 0.0381 -> 0.0373 (docs/int8.md)
    gptq_max_inputs: int = field(default=4096, metadata={
        "help": "GPTQ only on layers whose outputs read at most this many inputs (32: the depthwise and stem "
                "convs alone, faster on large models)"})
    gptq_positions: int = field(default=1024, metadata={"help": "im2col positions per image for GPTQ's Gram matrices"})
    gptq_damp: float = field(default=0.01, metadata={"help": "GPTQ damping, a fraction of the mean Hessian diagonal"})
    explain: bool = field(default=False, metadata={
        "help": "report where the error comes from: drift with only weights / only activations quantized, "
                "each activation tensor's and each layer's drift alone, range statistics of the worst tensors"})
    probe_limit: int = field(default=24, metadata={
        "help": "rank fallback candidates by measuring each in float when there are at most this many"})
    fallback_order: Literal["per-ms", "drift"] = field(default="per-ms", metadata={
        "help": "fallback: keep in float first the nodes that gain the most drift per millisecond of kernel "
                "time they lose (per-ms, measured with onnxruntime's profiler), or by drift alone"})

    def check(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError("bits must be 8, 4 or 2 (what onnxruntime's MatMulNBits supports)")
        if self.bits < 8 and self.mode == "dynamic":
            raise ValueError("bits < 8 is weight-only quantization; leave mode at its default")
        if self.samples < 1:
            raise ValueError("samples must be at least 1")
        if self.max_drift is not None and self.max_drift <= 0:
            raise ValueError("max_drift must be > 0")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise ValueError("min_agreement must be in (0, 1]")
        if self.entropy_bins < 256:
            raise ValueError("entropy_bins must be at least 256 (the KL search needs more bins than its 128 levels)")
        if self.gptq_max_inputs < 1 or self.gptq_positions < 1:
            raise ValueError("gptq_max_inputs and gptq_positions must be at least 1")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two >= 16")

    @property
    def budget(self) -> fb.Budget | None:
        if self.max_drift is None and self.min_agreement is None:
            return None
        return fb.Budget(self.max_drift, self.min_agreement)


class QuantizeInt8(ModelPlugin):
    """Replaces float Conv/Gemm/MatMul/... with int8 QDQ (or dynamic/n-bit) equivalents."""

    name = "int8"
    summary = "calibrated int8 quantization (onnxruntime) with BN folding, equalization, bias correction and fallback"
    Options = Int8Options
    per_layer_options = ()  # onnxruntime quantizes with one configuration: per layer only `skip = true`

    def run(self, model: onnx.ModelProto, ctx: Context, opts: Int8Options,
            layers: Callable[[str], bool]) -> tuple[onnx.ModelProto, list[LayerReport], dict[str, Any]]:
        extras: dict[str, Any] = {"mode": opts.mode if opts.bits == 8 else f"weight-only {opts.bits}-bit",
                                  "warnings": []}
        excluded = user_exclusions(model, opts, layers)
        data = calibration_data(model, ctx, opts, extras)
        prepared = ip.prepare_for_ort(model)
        for name, why in prepared.keep_float.items():
            excluded.keep_float(name, why, replace=False)
        if prepared.notes:
            extras["prepared"] = prepared.notes
        source, model = model, prepared.model
        with io.Workspace() as ws:
            if opts.bits < 8:
                out = run_nbits(model, data, ctx, opts, excluded, extras)
            elif opts.mode == "dynamic":
                out = run_dynamic(model, data, ctx, opts, excluded, extras, ws)
            else:
                out = run_static(model, data, ctx, opts, excluded, extras, ws)
        reports = layer_reports(source, out, opts, excluded, extras)
        if not extras["warnings"]:
            del extras["warnings"]
        return out, reports, extras

    def settled(self, extras: dict[str, Any]) -> dict[str, Any]:
        """The calibration method and the on/off of each step that `auto` kept or dropped in the
        run that wrote `extras`: reruns with these skip the comparisons (on the OCR recognizer
        a run took 29 s, 15 s of it calibrating with both minmax and percentile ranges)."""
        out: dict[str, Any] = {}
        calibration = str(extras.get("calibration", ""))
        for method in ("minmax", "percentile", "entropy"):
            if calibration.startswith(method):
                out["calibration"] = method
        for key, option, on, off in (("equalization", "equalize", "on", "off"),
                                     ("weight_rounding", "weight_rounding", "gptq", "nearest"),
                                     ("bias_correction", "bias_correction", "on", "off"),
                                     ("sequential_bias", "sequential_bias", "on", "off")):
            if isinstance(extras.get(key), dict) and "kept" in extras[key]:
                out[option] = on if extras[key]["kept"] else off
        return out


# --- inputs -----------------------------------------------------------------------------------

class Exclusions(dict):
    """Node name -> why it stays float. `ours` are the nodes int8 itself keeps in float (an op
    onnxruntime cannot quantize there, the fallback), which the report lists whatever their op."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ours: set[str] = set()

    def keep_float(self, name: str, why: str, *, replace: bool = True) -> None:
        if replace or name not in self:
            self[name] = f"kept in float: {why}"
            self.ours.add(name)


def user_exclusions(model: onnx.ModelProto, opts: Int8Options, layers: Callable[[str], bool]) -> Exclusions:
    """Node name -> why it stays float (--option exclude by name or op type, or --layers)."""
    names = {n.name for n in model.graph.node}
    ops = {n.op_type for n in model.graph.node}
    for item in opts.exclude:
        if item not in names and item not in ops:
            raise UsageError(f"int8: exclude entry '{item}' is neither a node name nor an op type in the model "
                             f"(op types: {', '.join(sorted(ops))})")
    out = Exclusions()
    for n in model.graph.node:
        if n.name in opts.exclude:
            out[n.name] = "excluded by --option exclude (name)"
        elif n.op_type in opts.exclude:
            out[n.name] = f"excluded by --option exclude (op type {n.op_type})"
        elif not layers(n.name):
            out[n.name] = "not matched by --layers (or the step's select)"
    return out


def calibration_data(model: onnx.ModelProto, ctx: Context, opts: Int8Options, extras: dict) -> dict[str, DataSet]:
    """Split the data into calibration rows and rows to measure drift on."""
    data = ctx.data
    if data is None:
        data = synthesize(model, samples=max(8, min(opts.samples, 32)), seed=ctx.seed)
    if data.synthetic:
        # dynamic mode computes activation ranges at run time; the data only measures drift
        msg = ("calibrated on SYNTHESIZED random inputs: ranges and accuracy will be poor; "
               "pass real calibration data with --data for real accuracy") if opts.mode == "static" and opts.bits == 8 else (
              "no --data given, so drift is measured on SYNTHESIZED random inputs")
        _warn(extras, msg)
    n = len(data)
    if n >= HOLDOUT_MIN:
        cut = n - n // 4
        calib, measure = data.rows(0, cut), data.rows(cut, n)
        extras["measured_on"] = f"{len(measure)} held-out samples (last quarter of {data.source or 'the data'})"
    else:
        calib, measure = data, data
        extras["measured_on"] = (f"the {n} calibration samples themselves (fewer than {HOLDOUT_MIN}, "
                                 "none held out)")
    if len(calib) > opts.samples:
        calib = calib.take(opts.samples)
    extras["calibration_samples"] = len(calib)
    return {"calib": calib, "measure": measure}


# --- static -----------------------------------------------------------------------------------

def reduce_range(opts: Int8Options, activation_type: str) -> tuple[bool, str]:
    """7-bit weights or 8, and why: `auto` asks whether onnxruntime's kernels here would saturate."""
    if opts.reduce_range != "auto":
        return bool(opts.reduce_range), "set by reduce_range"
    if io.products_saturate(activation_type, opts.weight_type):
        return True, ("onnxruntime on this CPU saturates 8-bit products (x86 without VNNI): 7-bit weights; "
                      "quantize on the deployment CPU, or set reduce_range=false for a VNNI target")
    return False, "onnxruntime on this CPU does not saturate 8-bit products: full-range weights"


def run_static(model, data, ctx, opts: Int8Options, excluded: Exclusions, extras: dict, ws: io.Workspace):
    seven_bit, why = reduce_range(opts, opts.activation_type)
    cfg = io.StaticConfig(opts.per_channel, seven_bit, opts.activation_type, opts.weight_type,
                          opts.calibration, opts.percentile)
    extras["types"] = {"activations": opts.activation_type, "weights": opts.weight_type,
                       "why": "U8 activations with S8 weights: the fast x86 path (S8 activations measured "
                              "about 1.7x slower on this project's benchmark machine)",
                       "reduce_range": seven_bit, "reduce_range_why": why}
    extras["calibration"] = opts.calibration + (f" ({opts.percentile})" if opts.calibration == "percentile" else "")
    if opts.calibration in ("auto", "entropy", "minmax-or-percentile"):
        # minmax-or-percentile: minmax first, then percentile ranges if they lower the drift.
        # auto: minmax is the baseline; per-tensor ranges replace its cache if they help.
        # entropy: quantize_static gives onnxruntime's entropy calibrator 128 histogram bins for
        # 128 levels, which leaves its KL search one candidate, the min/max range; so the entropy
        # ranges come from our own 512-bin histograms (plugins/int8_ranges.py) instead.
        cfg.calibration = "minmax"
    float_model, note = ig.upgrade_opset(_copy(model))
    if note:
        extras["opset"] = note
    graph = to_graph(float_model)
    extras["folded"] = ig.fold_affine(graph, {t: len(s) for t, s in ctx.shapes.items() if s is not None},
                                      scales=opts.fold_bn)
    if opts.bias_correction != "off":
        ig.ensure_bias(graph)
    float_model = to_model(graph, like=float_model)
    evaluate = io.Evaluator(float_model, data["measure"], ctx.threads)
    if opts.min_agreement is not None and not evaluate.has_scores:
        raise UsageError("int8: --option min_agreement needs a model output of class scores (N, C); "
                         "use max_drift instead")
    steps: list[tuple[str, float]] = []
    ctx.tick(0, 4, "calibrating")

    def prepared(m: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
        return io.pre_process(m, ws), str(ws.path("ranges")).replace(".onnx", ".json")

    pre, cache = prepared(float_model)
    base_excl = frozenset(excluded)
    q = io.quantize_static(pre, data["calib"], cfg, base_excl, ws, cache)
    unbounded = {k: v for k, v in ir.unbounded(pre, ir.load_minmax(cache)).items() if k not in excluded}
    if unbounded:  # (the ranges come from the cache now: quantizing again calibrates nothing)
        for name, (tensor, lo, hi) in unbounded.items():
            excluded.keep_float(name, f"tensor '{tensor}' ranges {lo:g}..{hi:g} on the calibration data: "
                                      "8 bits cannot hold an unbounded range")
        extras["unbounded"] = {name: tensor for name, (tensor, _, _) in unbounded.items()}
        base_excl = frozenset(excluded)
        q = io.quantize_static(pre, data["calib"], cfg, base_excl, ws, cache)
    m = evaluate(q)
    steps.append(("quantize_static", m["rel_l2"]))
    extras["drift_plain"] = m

    if opts.calibration == "minmax-or-percentile":
        cfg, cache, q, m = choose_minmax_or_percentile(pre, q, m, data["calib"], cfg, cache, base_excl, ws, evaluate,
                                                      opts, ctx.threads, extras)
        if cfg.calibration == "percentile":
            steps.append((f"percentile ranges ({opts.percentile})", m["rel_l2"]))

    # Per-tensor calibration method: new ranges for the same float model.
    auto_kept = False

    def auto_ranges(pre_x: onnx.ModelProto, minmax_cache: str) -> tuple[str, ir.RangeChoice]:
        choice = ir.choose_ranges(pre_x, ir.load_minmax(minmax_cache), data["calib"],
                                  activation_type=opts.activation_type, percentile=opts.percentile,
                                  entropy_bins=opts.entropy_bins, threads=ctx.threads)
        if opts.calibration == "entropy":
            choice.method = dict.fromkeys(choice.method, "entropy")
        return ir.write_cache(choice, minmax_cache.replace(".json", "-auto.json")), choice

    if opts.calibration == "entropy":
        cache, _ = auto_ranges(pre, cache)
        q = io.quantize_static(pre, data["calib"], cfg, base_excl, ws, cache)
        m = evaluate(q)
        steps.append(("entropy ranges (512-bin histograms)", m["rel_l2"]))

    if opts.calibration == "auto":
        ctx.tick(0, 4, "choosing a calibration method per tensor")
        t0 = time.perf_counter()
        cache_auto, choice = auto_ranges(pre, cache)
        q_auto = io.quantize_static(pre, data["calib"], cfg, base_excl, ws, cache_auto)
        m_auto = evaluate(q_auto)
        auto_kept = m_auto["rel_l2"] < m["rel_l2"]
        info = choice.summary()
        info.update(drift_minmax=m, drift_auto=m_auto, kept=auto_kept,
                    seconds_total=round(time.perf_counter() - t0, 2))
        extras["calibration_auto"] = info
        extras["calibration"] = ("auto: per tensor " + ", ".join(f"{k} {v}" for k, v in info["counts"].items())
                                 if auto_kept else "minmax (auto's per-tensor ranges did not lower the drift)")
        if auto_kept:
            cache, q, m = cache_auto, q_auto, m_auto
            steps.append(("per-tensor calibration (auto)", m["rel_l2"]))

    # Cross-layer equalization: a new float model, so new ranges.
    if opts.equalize != "off":
        ctx.tick(1, 4, "cross-layer equalization")
        eq_graph = to_graph(float_model)
        conv_outs = {c1.name for c1, _, _ in ig.equalize_pairs(eq_graph)}
        stats = io.paired_stats(float_model, None, conv_outs, data["calib"], ctx.threads) if conv_outs else {}
        tensor_of = io.node_outputs(float_model, conv_outs)
        res = ig.cross_layer_equalize(eq_graph, {tensor_of[n]: s["max"] for n, s in stats.items()})
        eq_model = to_model(eq_graph, like=float_model)
        info: dict[str, Any] = {"pairs": len(res.pairs), "skipped": res.skipped,
                                "channels_rescaled": sum(p.scaled for p in res.pairs)}
        if res.pairs:
            pre_eq, cache_eq = prepared(eq_model)
            q_eq = io.quantize_static(pre_eq, data["calib"], cfg, base_excl, ws, cache_eq)
            if auto_kept or opts.calibration == "entropy":  # the equalized model gets its own ranges too
                cache_eq, _ = auto_ranges(pre_eq, cache_eq)
                q_eq = io.quantize_static(pre_eq, data["calib"], cfg, base_excl, ws, cache_eq)
            m_eq = evaluate(q_eq)
            keep = opts.equalize == "on" or m_eq["rel_l2"] < m["rel_l2"]
            info.update(drift_before=m["rel_l2"], drift_after=m_eq["rel_l2"], kept=keep)
            if keep:
                float_model, pre, cache, q, m = eq_model, pre_eq, cache_eq, q_eq, m_eq
                steps.append(("cross-layer equalization", m["rel_l2"]))
        else:
            info["kept"] = False
        extras["equalization"] = info

    pre_uncorrected, q_uncorrected = pre, q

    # Weight rounding that minimises each layer's output error (the scales stay onnxruntime's).
    gptq_from = None
    if opts.weight_rounding != "nearest":
        ctx.tick(2, 4, "GPTQ weight rounding")
        q_g, gres = gq.apply_gptq(pre, q, data["calib"], damp=opts.gptq_damp, threads=ctx.threads, seed=ctx.seed,
                                  max_inputs=opts.gptq_max_inputs, positions=opts.gptq_positions)
        m_g = evaluate(q_g) if gres.layers else m
        keep = bool(gres.layers) and (opts.weight_rounding == "gptq" or m_g["rel_l2"] < m["rel_l2"])
        extras["weight_rounding"] = {**gres.summary(), "drift_before": m, "drift_after": m_g, "kept": keep}
        if keep:
            q, m, gptq_from = q_g, m_g, q_g
            steps.append(("GPTQ weight rounding", m["rel_l2"]))

    # Bias correction on top of whichever float model won.
    if opts.bias_correction != "off":
        ctx.tick(2, 4, "bias correction")
        pre_bc, n_fixed = bias_correct(pre, q, data["calib"], ctx.threads)
        info = {"nodes": n_fixed}
        if n_fixed:
            q_bc = io.quantize_static(pre_bc, data["calib"], cfg, base_excl, ws, cache)
            if gptq_from is not None:
                q_bc = gq.transplant(gptq_from, q_bc)
            m_bc = evaluate(q_bc)
            keep = opts.bias_correction == "on" or m_bc["rel_l2"] < m["rel_l2"]
            info.update(drift_before=m["rel_l2"], drift_after=m_bc["rel_l2"], kept=keep)
            if keep:
                pre, q, m = pre_bc, q_bc, m_bc
                steps.append(("bias correction", m["rel_l2"]))
        else:
            info["kept"] = False
        extras["bias_correction"] = info

    # Bias correction measured on the quantized model itself, layer by layer (int8_seqbias.py).
    if opts.sequential_bias != "off":
        ctx.tick(2, 4, "sequential bias correction")
        try:
            q_s, sres = sb.sequential_bias_correction(pre_uncorrected, q, data["calib"], ctx.threads)
            m_s = evaluate(q_s) if sres.layers else m
        except Exception as exc:  # noqa: BLE001 - a refinement that cannot run must not lose the model
            log.warning("int8: sequential bias correction skipped: %s", exc)
            extras["sequential_bias"] = {"kept": False, "skipped": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            keep = bool(sres.layers) and (opts.sequential_bias == "on" or m_s["rel_l2"] < m["rel_l2"])
            extras["sequential_bias"] = {**sres.summary(), "drift_before": m, "drift_after": m_s, "kept": keep}
            if keep:
                q, m = q_s, m_s
                steps.append(("sequential bias correction", m["rel_l2"]))

    corrected = m

    # Accuracy-aware fallback.
    budget = opts.budget
    if budget is not None:
        ctx.tick(3, 4, "fallback")
        original_bias = {n.name: constant_value(n.inputs[2]) for n in to_graph(pre_uncorrected).nodes
                         if n.op in ("Conv", "Gemm") and input_or_none(n, 2) is not None}

        def quantize_keeping(kept: frozenset[str]) -> onnx.ModelProto:
            # a node kept in float gets its uncorrected bias back: the correction was for its int8 weight
            model_k = pre
            restore = [n for n in kept if original_bias.get(n) is not None]
            if restore:
                gk = to_graph(pre)
                for n in gk.nodes:
                    if n.name in restore and input_or_none(n, 2) is not None:
                        replace_constant(gk, n, 2, ig.TAG, "bias", original_bias[n.name])
                model_k = to_model(gk, like=pre)
            qk = io.quantize_static(model_k, data["calib"], cfg, base_excl | kept, ws, cache)
            # (no sequential bias correction: it was measured with every node int8, and a layer's
            # shift changes when an upstream node goes float)
            return gq.transplant(gptq_from, qk) if gptq_from is not None else qk

        trials = fb.Trials(quantize_keeping, evaluate, lambda d: ctx.tick(3, 4, d))
        trials.memo[frozenset()] = (q, m)
        result = fallback(pre, q, m, trials, budget, excluded, data["calib"], opts, ctx)
        if not result.met:  # return the best model tried, not the one with everything in float
            best = min(trials.memo, key=lambda k: (trials.memo[k][1]["rel_l2"], len(k), sorted(k)))
            result.kept_float = [n for n in result.kept_float if n in best] if best else []
        q, m = trials(frozenset(result.kept_float))
        extras["fallback"] = {
            "budget": budget.describe(), "met": result.met, "kept_float": result.kept_float,
            "drift_before": result.before, "drift_after": m, "ranking_method": result.ranking_method,
            "ranking": result.ranking[:10], "trials": len(trials.memo),
            "float_ms_lost": {n: result.ms_lost[n] for n in result.kept_float if n in result.ms_lost}}
        if result.kept_float:  # what the float nodes cost, against the same quantization with none
            from surgeon.sweep import measure_ab
            lat = measure_ab(q_uncorrected.SerializeToString(), q.SerializeToString(),
                             data["calib"].first_batch(1), ctx.threads, 2.0)
            extras["fallback"]["latency_vs_all_int8"] = lat
            log.info("int8 fallback: %d node(s) in float; latency %.3fx of the all-int8 model (95%% interval "
                     "%.3f-%.3f, batch 1)", len(result.kept_float), lat["ratio"], lat["ratio_low"], lat["ratio_high"])
        if not result.met:
            _warn(extras, f"the budget ({budget.describe()}) is not met even with every candidate node in float; "
                          f"returning the best model found ({_show(m)})")
        steps.append(("fallback", m["rel_l2"]))
        for name in result.kept_float:
            excluded.keep_float(name, f"fallback, drift {_show(corrected)} -> {_show(m)}")
    extras["drift"] = m
    extras["steps"] = [{"step": s, "rel_l2": d} for s, d in steps]
    if opts.explain:
        # the quantization before any correction of the float weights: `pre_uncorrected` computes
        # exactly the float function, so each single-tensor drift is that tensor's alone
        extras["explain"] = ie.explain(pre_uncorrected, q_uncorrected, data["measure"], evaluate, ctx.threads,
                                       lambda d: ctx.tick(4, 5, d))
        extras["explain"]["rows_are"] = extras["measured_on"]
    ctx.tick(4, 4, "done")
    return _finish(q, model)


def fallback(pre, q, m, trials: fb.Trials, budget: fb.Budget, excluded, calib, opts: Int8Options, ctx) -> fb.FallbackResult:
    res = fb.FallbackResult(before=m)
    if budget.holds(m):
        res.after = m
        return res
    candidates = [n.name for n in pre.graph.node if n.op_type in COMPUTE_OPS and n.name not in excluded
                  and is_quantized(q, n.name, n.op_type)]
    if len(candidates) <= opts.probe_limit:
        res.ranking_method = "drift measured with each node alone in float"
        res.ranking = fb.rank_by_probe(candidates, trials, m)
    else:
        res.ranking_method = "relative error each node adds to its output (float vs quantized run)"
        stats = io.paired_stats(pre, q, candidates, calib, ctx.threads)
        res.ranking = fb.rank_by_added_error(candidates, {k: v["rel_err"] for k, v in stats.items()},
                                             nearest_candidates(pre, set(candidates)))
    if opts.fallback_order == "per-ms":
        feed = calib.first_batch(1)
        res.ms_lost = ic.float_costs(pre, q, feed, ctx.threads, [n for n, _ in res.ranking])
        res.ranking = fb.per_millisecond(res.ranking, res.ms_lost)
        res.ranking_method += ", per millisecond of kernel time the node loses in float (onnxruntime profile)"
    order = [n for n, _ in res.ranking]
    res.kept_float, res.met = fb.search(order, trials, budget)
    res.after = trials(frozenset(res.kept_float))[1]
    return res


def choose_minmax_or_percentile(pre, q, m, calib: DataSet, cfg: io.StaticConfig, cache: str, exclude, ws,
                                evaluate, opts: Int8Options, threads: int, extras: dict):
    """Activation ranges for the whole model: onnxruntime's minmax or its percentile, whichever
    gives the lower drift. With bias correction on, both are compared after it: the correction
    depends only on the weights and the float inputs, so one corrected float model serves both,
    and minmax's wider ranges can look better before it than after (EfficientNet-Lite0: 0.1227 vs
    0.1241 before, 0.0572 vs 0.0542 after). Returns (cfg, cache, q, m) of the choice, uncorrected."""
    cfg_p = io.StaticConfig(cfg.per_channel, cfg.reduce_range, cfg.activation_type, cfg.weight_type,
                            "percentile", opts.percentile)
    cache_p = str(ws.path("ranges-percentile")).replace(".onnx", ".json")
    try:
        q_p = io.quantize_static(pre, calib, cfg_p, exclude, ws, cache_p)
    except SurgeonError as exc:  # onnxruntime's histogram calibrator fails on some multi-input models
        extras["calibration"] = "minmax"
        extras["calibration_choice"] = {"percentile": str(exc), "kept": "minmax"}
        return cfg, cache, q, m
    m_p = evaluate(q_p)
    info: dict[str, Any] = {"minmax": m, "percentile": m_p}
    score, score_p = m["rel_l2"], m_p["rel_l2"]
    if opts.bias_correction != "off":
        pre_bc, n_fixed = bias_correct(pre, q, calib, threads)
        if n_fixed:
            score = evaluate(io.quantize_static(pre_bc, calib, cfg, exclude, ws, cache))["rel_l2"]
            score_p = evaluate(io.quantize_static(pre_bc, calib, cfg_p, exclude, ws, cache_p))["rel_l2"]
            info["after_bias_correction"] = {"minmax": score, "percentile": score_p}
    keep = score_p < score
    extras["calibration"] = f"percentile ({opts.percentile})" if keep else "minmax"
    info["kept"] = extras["calibration"]
    extras["calibration_choice"] = info
    return (cfg_p, cache_p, q_p, m_p) if keep else (cfg, cache, q, m)


def bias_correct(pre: onnx.ModelProto, q: onnx.ModelProto, calib: DataSet, threads: int) -> tuple[onnx.ModelProto, int]:
    """Cancel the mean output shift that weight quantization adds, node by node:
    E[y_int8 - y_float] = (W_int8 - W) . E[x] per output channel (E[x] per input channel, measured
    on the float model), so b -= that. Each node's own shift only, so corrections do not compound."""
    graph = to_graph(pre)
    dq = dequantized_weights(q)
    targets = []
    for n in graph.nodes:
        if n.op not in ("Conv", "Gemm") or input_or_none(n, 2) is None or n.name not in dq:
            continue
        w, b = constant_value(n.inputs[1]), constant_value(n.inputs[2])
        if w is None or b is None or b.ndim != 1 or dq[n.name].shape != w.shape:
            continue
        if n.op == "Gemm" and (n.attrs.get("transA", 0) or n.attrs.get("alpha", 1.0) != 1.0):
            continue
        targets.append((n, w, b))
    if not targets:
        return pre, 0
    means = io.input_means(pre, [n.inputs[0].name for n, _, _ in targets], calib, threads)
    for n, w, b in targets:
        dw = dq[n.name].astype(np.float64) - w
        ex = means[n.inputs[0].name]
        if n.op == "Conv":
            groups = n.attrs.get("group", 1)
            d = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(axis=2)  # (F, C/g)
            ex_g = ex.reshape(groups, -1)  # (g, C/g)
            shift = np.einsum("fc,fc->f", d, np.repeat(ex_g, dw.shape[0] // groups, axis=0))
        else:
            d = dw if n.attrs.get("transB", 0) else dw.T  # (N, K)
            shift = d @ ex
        replace_constant(graph, n, 2, ig.TAG, "bias", (b - shift).astype(b.dtype))
    return to_model(graph, like=pre), len(targets)


def dequantized_weights(q: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name -> its weight as the QDQ model computes it, (w_q - zero_point) * scale."""
    out = {}
    for n in to_graph(q).nodes:
        if n.op not in ("Conv", "Gemm") or len(n.inputs) < 2 or not n.inputs[1].inputs:
            continue
        d = n.inputs[1].inputs[0]
        consts = [constant_value(t) for t in d.inputs[:3]]
        if d.op != "DequantizeLinear" or len(consts) < 3 or any(c is None for c in consts):
            continue
        wq, scale, zp = (c.astype(np.float64) for c in consts)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * wq.ndim
            shape[d.attrs.get("axis", 1)] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[n.name] = (wq - zp) * scale
    return out


def nearest_candidates(model: onnx.ModelProto, candidates: set[str]) -> dict[str, list[str]]:
    """For each candidate, the nearest candidate nodes upstream (through Relu, pooling, ...)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.name not in candidates:
            continue
        found, stack, seen = [], list(n.input), set()
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            if p.name in candidates:
                found.append(p.name)
            else:
                stack.extend(p.input)
        out[n.name] = sorted(found)
    return out


# --- dynamic and n-bit --------------------------------------------------------------------------

DYNAMIC_CONV_WHY = ("mode=dynamic keeps convs float: onnxruntime's ConvInteger ran 2-11x slower than float Conv "
                    "(use mode=static for convs, or dynamic_conv=true)")
DYNAMIC_OPS = ("MatMul", "Gemm", "Conv", "LSTM")  # what the report lists in dynamic mode

def run_dynamic(model, data, ctx, opts: Int8Options, excluded: Exclusions, extras: dict, ws: io.Workspace):
    float_model, note = ig.upgrade_opset(_copy(model), 11)
    if note:
        extras["opset"] = note
    float_model, converted = _as_matmul(float_model, excluded)
    if converted:
        extras["gemm_as_matmul"] = converted
    if not opts.dynamic_conv:
        for n in float_model.graph.node:
            if n.op_type == "Conv" and n.name not in excluded:
                excluded[n.name] = DYNAMIC_CONV_WHY
    seven_bit, why = reduce_range(opts, "U8")
    extras["types"] = {"activations": "U8 (dynamic)", "weights": opts.weight_type,
                       "reduce_range": seven_bit, "reduce_range_why": why}
    evaluate = io.Evaluator(model, data["measure"], ctx.threads)
    q = io.quantize_dynamic(float_model, opts.per_channel, seven_bit, opts.weight_type, excluded, ws)
    m = evaluate(q)
    budget = opts.budget
    if budget is not None and not budget.holds(m):
        trials = fb.Trials(lambda kept: io.quantize_dynamic(float_model, opts.per_channel, seven_bit,
                                                            opts.weight_type, set(excluded) | kept, ws), evaluate)
        trials.memo[frozenset()] = (q, m)
        cands = [n.name for n in float_model.graph.node if n.name not in excluded and is_dynamic_quantized(q, n)]
        ranking = fb.rank_by_probe(cands, trials, m)
        kept, met = fb.search([n for n, _ in ranking], trials, budget)
        q, m2 = trials(frozenset(kept))
        extras["fallback"] = {"budget": budget.describe(), "met": met, "kept_float": kept,
                              "drift_before": m, "drift_after": m2, "ranking": ranking[:10]}
        for name in kept:
            excluded.keep_float(name, f"fallback, drift {_show(m)} -> {_show(m2)}")
        m = m2
    extras["drift"] = m
    return _finish(q, model)


def run_nbits(model, data, ctx, opts: Int8Options, excluded: Exclusions, extras: dict):
    float_model, converted = _as_matmul(_copy(model), excluded)  # the quantizer edits what it is given
    if converted:
        extras["gemm_as_matmul"] = converted
    q = io.quantize_nbits(float_model, opts.bits, opts.block_size, excluded)
    extras["size_bytes"] = {"before": model.ByteSize(), "after": q.ByteSize()}
    extras["block_size"] = opts.block_size
    extras["drift"] = io.Evaluator(model, data["measure"], ctx.threads)(q)
    return _finish(q, model)


def gemm_to_matmul(graph: gs.Graph, excluded: dict[str, str]) -> list[str]:
    """Gemm(x, B, C) with constant B, alpha = beta = 1, transA = 0 -> MatMul(x, B') + C, in place.
    The MatMul keeps the Gemm's name, so reports and exclusions still find it."""
    done = []
    for n in list(graph.nodes):
        if n.op != "Gemm" or n.name in excluded:
            continue
        if n.attrs.get("alpha", 1.0) != 1.0 or n.attrs.get("beta", 1.0) != 1.0 or n.attrs.get("transA", 0):
            continue
        b = constant_value(n.inputs[1])
        if b is None or shared_by(n.inputs[1], n):
            continue
        w = b.T if n.attrs.get("transB", 0) else b
        c = input_or_none(n, 2)
        n.op, n.attrs = "MatMul", {}
        replace_constant(graph, n, 1, ig.TAG, "weight", w)
        while len(n.inputs) > 2:
            n.inputs.pop()
        if c is not None:  # y = (x @ B') + C, C broadcast as Gemm broadcasts it
            out = n.outputs[0]
            product = gs.Variable(unique_name(graph, f"{n.name}/{ig.TAG}/matmul"), dtype=out.dtype)
            n.outputs[0] = product
            add = gs.Node("Add", unique_name(graph, f"{n.name}/{ig.TAG}/bias_add"), inputs=[product, c], outputs=[out])
            graph.nodes.insert(graph.nodes.index(n) + 1, add)
        done.append(n.name)
    return done


# --- report -----------------------------------------------------------------------------------

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def is_quantized(q: onnx.ModelProto, name: str, op: str) -> bool:
    """In QDQ form: a weighted node is quantized when its weight comes out of a DequantizeLinear;
    any other node when all its inputs do and its output feeds a QuantizeLinear."""
    producer = {o: n for n in q.graph.node for o in n.output}
    node = next((n for n in q.graph.node if n.name == name and n.op_type == op), None)
    if node is None:
        return False

    def from_dq(t: str) -> bool:
        return t in producer and producer[t].op_type == "DequantizeLinear"

    if op in WEIGHTED_OPS:
        return len(node.input) > 1 and from_dq(node.input[1])
    feeds_q = any(n.op_type == "QuantizeLinear" and node.output[0] in n.input for n in q.graph.node)
    return feeds_q and all(from_dq(i) for i in node.input if i)


def is_dynamic_quantized(q: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    if node.op_type not in ("MatMul", "Conv", "Gather", "Attention", "LSTM"):
        return False
    return not any(n.name == node.name and n.op_type == node.op_type for n in q.graph.node)


def layer_reports(model: onnx.ModelProto, out: onnx.ModelProto, opts: Int8Options, excluded: Exclusions,
                  extras: dict) -> list[LayerReport]:
    reports = []
    folded_into = extras.get("folded", {})
    ops = {n.name: n.op_type for n in model.graph.node}
    # a 2-D MatMul with its bias Add is a Gemm now
    as_gemm = {layer for name, layer in folded_into.items() if ops.get(name) == "Add" and ops.get(layer) == "MatMul"}
    matmuls = set(extras.get("gemm_as_matmul", []))
    nbits_done = {n.name for n in out.graph.node if n.op_type in ("MatMulNBits",)} | {
        n.name[: -len("_Q4")] for n in out.graph.node if n.name.endswith(("_Q4", "_Q2", "_Q8"))}
    for n in model.graph.node:
        if n.name in folded_into:
            reports.append(LayerReport(n.name, n.op_type, "rewritten", f"folded into {folded_into[n.name]}"))
            continue
        # other ops are reported only when kept in float for a cause of ours (the output Softmax)
        reported = DYNAMIC_OPS if opts.mode == "dynamic" else COMPUTE_OPS
        if n.op_type not in reported and n.name not in excluded.ours:
            continue
        if n.name in excluded:
            reports.append(LayerReport(n.name, n.op_type, "skipped", excluded[n.name]))
            continue
        if opts.bits < 8:
            if n.op_type in ("MatMul", "Gemm") and (n.name in nbits_done or _renamed(out, n)):
                reports.append(LayerReport(n.name, n.op_type, "rewritten", "",
                                           {"bits": opts.bits, "block_size": opts.block_size}))
            else:
                reports.append(LayerReport(n.name, n.op_type, "skipped",
                                           "weight-only n-bit covers MatMul/Gemm with a constant weight only"))
            continue
        if opts.mode == "dynamic":
            op = "MatMul" if n.name in matmuls else n.op_type
            probe = helper.make_node(op, [], [], name=n.name)
            if is_dynamic_quantized(out, probe):
                reports.append(LayerReport(n.name, n.op_type, "rewritten", "", {"mode": "dynamic"}))
            else:
                reports.append(LayerReport(n.name, n.op_type, "skipped",
                                           "dynamic quantization covers MatMul, Gemm (as MatMul), LSTM and Conv "
                                           "with constant weights only"))
            continue
        if is_quantized(out, n.name, "Gemm" if n.op_type == "MatMul" and n.name in as_gemm else n.op_type):
            reports.append(LayerReport(n.name, n.op_type, "rewritten", "",
                                       {"activations": opts.activation_type, "weights": opts.weight_type}))
        else:
            reports.append(LayerReport(n.name, n.op_type, "skipped",
                                       "onnxruntime left it in float (no quantized input around it)"))
    return reports


def _renamed(out: onnx.ModelProto, n: onnx.NodeProto) -> bool:
    return not any(o.name == n.name and o.op_type in ("MatMul", "Gemm") for o in out.graph.node)


def _finish(q: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """Deterministic metadata: keep the source's producer, drop onnxruntime's timestamps."""
    q.producer_name = like.producer_name or "surgeon"
    q.producer_version = like.producer_version
    del q.metadata_props[:]
    q.metadata_props.extend(like.metadata_props)
    return q


def _as_matmul(model: onnx.ModelProto, excluded: dict[str, str]) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with its Gemm layers as MatMul (gemm_to_matmul), and the names of those layers."""
    graph = to_graph(model)
    converted = gemm_to_matmul(graph, excluded)
    return (to_model(graph, like=model), converted) if converted else (model, [])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _warn(extras: dict, msg: str) -> None:
    """A warning, logged now and kept for the report (which prefixes the plugin's name, as here)."""
    log.warning("int8: %s", msg)
    extras["warnings"].append(msg)


def _show(m: dict[str, float]) -> str:
    s = f"{m['rel_l2']:.3g}"
    if "top1_agreement" in m:
        s += f" (agreement {m['top1_agreement']:.1%})"
    return s


PLUGINS = [QuantizeInt8]
