"""Sweeps: one plugin at many settings, measured; per-layer sensitivity; reconstruction curves.

* uniform (`sweep`): the plugin at each ratio over the whole model. Per ratio: params, MACs,
  output drift (worst relative L2 over the outputs, ||y' - y|| / ||y||), top-1 agreement with
  the original, accuracy when the data has labels, and latency (median of interleaved A/B
  pairs against the original, with the 95% interval of the per-pair ratio t'/t).
* per layer (`per_layer=True`): one layer at a time at each ratio, everything else untouched;
  the drift of each is that layer's sensitivity. With a plugin that times rewrites (the
  latency guard of tucker/svd) each layer is also timed alone, original vs rewrite, at its
  real input shape (`guard.time_rewrite`), which gives the milliseconds it saves.
* int8 (no ratio): per-node fallback sensitivity: the drift with every node quantized, and
  with each node alone left in float (`exclude`); the drop is what quantizing that node costs.
  The runs after the first make the choices the first made for itself (Plugin.settled: the
  calibration method, each auto step on or off).
* reconstruction (`reconstruction`, tucker/svd): data-free, from the singular values alone.
  Truncated HOSVD with one mode at full rank is an orthogonal projection of one unfolding,
  so the relative error at rank r of that mode is exactly

      e(r) = sqrt(sum_{j > r} s_j^2) / ||W||_F

  with s the singular values of that unfolding (mode 1 = input channels, R1 varied with R2
  full; mode 0 = output channels, R2 varied with R1 full); a 1x1 conv or an FC layer has one
  matrix, the same formula on its singular values.

Drift evaluations fan out over a backend (surgeon.sweep_backends: processes or Ray); every
latency measurement runs afterwards, one at a time, with nothing else of ours running.
Ratios are what the plugin calls `ratio`: the fraction of ranks kept for tucker/svd (lower
compresses more), the fraction of channels removed for prune (higher compresses more).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass, field
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from surgeon import calibration, engine, model as model_io, pipeline
from surgeon.calibration import DataSet, DataSplit, shapes_from_data
from surgeon.errors import UsageError
from surgeon.plugin import GraphPlugin, Plugin, option_fields, registry
from surgeon.sweep_backends import Backend, Config, Payload, make_backend, score

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# plugins whose `ratio` is the fraction removed (the others keep `ratio` of their ranks)
RATIO_REMOVES = {"prune"}
LATENCY_BUDGET_S = 2.0  # interleaved A/B per configuration


def kept_label(plugin: str) -> str:
    """What a layer keeps, as tables and plans name it: prune keeps channels, tucker/svd ranks
    (the JSON's field stays `ranks` for both)."""
    return "channels" if plugin in RATIO_REMOVES else "ranks"


def parse_ratios(text: str) -> list[float]:
    """`0.125:1:0.125` (start:stop:step, stop included) or `0.25,0.5,0.75`."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise UsageError(f"--ratios {text}: needs start <= stop and a step > 0")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            if n > 1000:
                raise UsageError(f"--ratios {text}: {n} ratios; at most 1000")
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"bad --ratios {text!r}: expected start:stop:step (e.g. 0.125:1:0.125) "
                         "or a comma-separated list (e.g. 0.25,0.5)") from None
    if not values:
        raise UsageError("--ratios is empty")
    return sorted(set(values))


def check_ratios(plugin: str, ratios: list[float]) -> None:
    removes = plugin in RATIO_REMOVES
    bad = [r for r in ratios if not ((0 <= r < 1) if removes else (0 < r <= 1))]
    if bad:
        allowed = "in [0, 1) (the fraction removed)" if removes else "in (0, 1] (the fraction of ranks kept)"
        raise UsageError(f"--ratios: {bad[0]:g} is out of range; {plugin} ratios must be {allowed}")


def compression_order(plugin: str, ratios: list[float]) -> list[float]:
    """The ratios from the mildest to the strongest compression."""
    return sorted(ratios, reverse=plugin not in RATIO_REMOVES)


@dataclass
class SweepOptions:
    plugin: str
    ratios: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # other plugin options, for every configuration
    layers: str | None = None  # only nodes whose name matches
    per_layer: bool = False
    uniform: bool = True
    reconstruction: bool = False
    latency: bool = True
    latency_budget_s: float = LATENCY_BUDGET_S
    workers: int = 1
    backend: str = "processes"
    address: str | None = None
    latency_local: bool = False
    eval_threads: int | None = None  # onnxruntime threads per evaluation (default: 1 with workers, else --threads)


@dataclass
class Setup:
    """The model, data and reference outputs every sweep and plan starts from."""

    source: str
    original: onnx.ModelProto
    prepared: onnx.ModelProto
    plugin: Plugin
    split: DataSplit
    shapes: dict[str, tuple[int, ...]]
    base: dict[str, Any]  # plugin options shared by every configuration
    payload: Payload
    original_metrics: dict[str, Any]

    @property
    def has_ratio(self) -> bool:
        return "ratio" in {f.name for f in option_fields(self.plugin)}

    @property
    def times_layers(self) -> bool:
        """Whether the plugin can time one rewrite alone (the latency guard)."""
        return isinstance(self.plugin, GraphPlugin) and "guard" in {f.name for f in option_fields(self.plugin)}


def setup(model: str | Path | onnx.ModelProto, plugin: str, options: dict[str, Any], run_opts: pipeline.RunOptions,
          *, eval_threads: int, parallel: bool, split: DataSplit | None = None) -> Setup:
    """Load, fold, split the data (calibration rows apart from scored rows) and run the original once."""
    from surgeon.profile import profile as _profile_fn
    from surgeon.validate import run, session
    run_opts.check()
    plug = registry().get(plugin)
    have = {f.name for f in option_fields(plug)}
    base = dict(options)
    if "ratio" in base:
        raise UsageError("the sweep sets the ratio itself: give --ratios, not a ratio option")
    if "guard" in have and "guard" not in base:
        base["guard"] = "none"  # the sweep measures latency itself, serially; a guard would skip layers
    if base.get("guard") == "latency" and parallel:
        raise UsageError("guard=latency times every layer while the other workers run, so its verdicts would be "
                         "noise; use guard=none (the default in sweeps) or --workers 1")
    plug.make_options(base)  # checked before any work
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>"
    original = model_io.load(model) if not isinstance(model, onnx.ModelProto) else model
    if split is None:
        split, shapes = pipeline.load_split(original, run_opts, needs_calibration=plug.uses_data(plug.make_options(base)))
        if split.warning:  # (apply puts it in its report's warnings; a sweep has only its notes in the JSON)
            log.warning(split.warning)
    else:
        shapes = {**shapes_from_data(split.eval), **run_opts.shapes}
    if split.eval is None:
        raise UsageError("a sweep needs data to score on: " + (calibration.shape_hint(
            original, calibration.resolve_shapes(original, {}, required=False)) or "pass --data"))
    prepared = engine.prepare(original)
    reference = run(session(original, eval_threads), split.eval)
    payload = Payload(prepared.SerializeToString(), plug.name, split.calib, split.eval, reference, shapes,
                      eval_threads, run_opts.seed)
    prof = _profile_fn(prepared, shapes, data=split.calib)
    itself = score(reference, reference, split.eval.labels)  # agreement None: no output looks like class scores
    metrics = {"params": prof.total_params, "macs": prof.total_macs, "size_bytes": original.ByteSize(),
               "accuracy": itself["accuracy"], "agreement": itself["agreement"], "rows": len(split.eval),
               "has_drift": itself["drift"] is not None}  # False: every output is integer (labels)
    return Setup(source, original, prepared, plug, split, shapes, base, payload, metrics)


# --- latency (always one at a time, see sweep_backends) ---------------------------------------

def measure_ab(original: bytes, candidate: bytes, feed: dict[str, np.ndarray], threads: int,
               budget_s: float) -> dict[str, Any]:
    """Interleaved A/B latency of a candidate against the original: medians and the median of
    the per-pair ratios t_candidate / t_original with its 95% interval."""
    from surgeon.validate import latency_ab, median_interval, session
    sa, sb = session(original, threads), session(candidate, threads)
    la, lb = latency_ab(sa, sb, feed, budget_s=budget_s)
    ratio, low, high = median_interval(np.divide(lb.times_ms, la.times_ms))
    return {"original_ms": la.median_ms, "ms": lb.median_ms, "ratio": ratio, "ratio_low": low,
            "ratio_high": high, "pairs": lb.runs}


def kernel_times(profile_json: str) -> list[dict[str, tuple[str, float]]]:
    """Per run: node -> (its input/output shapes, kernel milliseconds), from an onnxruntime profile."""
    import bisect
    import json
    events = json.loads(Path(profile_json).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    starts = [r[0] for r in runs]
    out: list[dict[str, tuple[str, float]]] = [{} for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue
        args = e.get("args", {})
        key = json.dumps([args.get("input_type_shape"), args.get("output_type_shape")], sort_keys=True)
        name = e["name"][: -len("_kernel_time")]
        shape, ms = out[i].get(name, (key, 0.0))
        out[i][name] = (shape, ms + e["dur"] / 1e3)
    return out


def measure_touched(original: bytes, candidate: bytes, feed: dict[str, np.ndarray], threads: int,
                    budget_s: float) -> dict[str, Any]:
    """The time a rewrite saves in the nodes it touched, from onnxruntime's per-node profile of both
    models run interleaved: nodes (after onnxruntime's fusions) whose input or output shapes
    changed, or that exist in one model only. Whole-model A/B differences of a small change drown
    in the noise of every other node; the touched nodes' kernel times do not. Per run pair the
    ratio of the touched sums gives a median and its 95% interval, as in measure_ab."""
    import tempfile
    from surgeon.validate import median_interval, session
    with tempfile.TemporaryDirectory(prefix="surgeon-profile-") as tmp:
        dirs = [Path(tmp, side) for side in "ab"]  # onnxruntime names the file by the time: one folder each
        for d in dirs:
            d.mkdir()
        sa, sb = (session(m, threads, profile_dir=str(d)) for m, d in zip((original, candidate), dirs))
        for _ in range(3):
            sa.run(None, feed)
            sb.run(None, feed)
        start, i = time.perf_counter(), 0
        while (i < 10 or time.perf_counter() - start < budget_s) and i < 300:
            for s in ((sa, sb) if i % 2 == 0 else (sb, sa)):
                s.run(None, feed)
            i += 1
        ra, rb = kernel_times(sa.end_profiling())[3:], kernel_times(sb.end_profiling())[3:]
    shapes_a = {n: v[0] for n, v in ra[0].items()}
    shapes_b = {n: v[0] for n, v in rb[0].items()}
    touched_a = [n for n in shapes_a if shapes_b.get(n) != shapes_a[n]]
    touched_b = [n for n in shapes_b if shapes_a.get(n) != shapes_b[n]]
    ta = np.array([sum(r[n][1] for n in touched_a if n in r) for r in ra])
    tb = np.array([sum(r[n][1] for n in touched_b if n in r) for r in rb])
    k = min(len(ta), len(tb))
    if not touched_a or k == 0 or not np.all(ta[:k] > 0):
        return {"original_ms": 0.0, "ms": 0.0, "ratio": 1.0, "ratio_low": 1.0, "ratio_high": 1.0, "pairs": k,
                "touched": 0}
    ratio, low, high = median_interval(tb[:k] / ta[:k])
    return {"original_ms": float(np.median(ta)), "ms": float(np.median(tb)), "ratio": ratio, "ratio_low": low,
            "ratio_high": high, "pairs": k, "touched": len(touched_a)}


def layer_timings(model: bytes, plugin: str, options: dict[str, Any], layers: str | None,
                  shapes: dict[str, tuple[int, ...]], threads: int, seed: int) -> dict[str, dict[str, Any]]:
    """Each selected layer's rewrite timed alone against the original node at its real input
    shape (the latency guard, whose verdicts are cached per machine): layer -> original_ms,
    rewrite_ms, speedup, verdict."""
    m = onnx.load_from_string(model)
    plug = registry().get(plugin)
    opts = {**options, "guard": "latency"}
    if "fit" in {f.name for f in option_fields(plug)}:
        opts["fit"] = "weights"  # the timing depends on the shapes (ranks), not on the fitted values
    res = engine.apply(m, plug, opts, layers=layers, input_shapes=shapes, threads=threads, seed=seed, prepared=True)
    return {l.layer: l.details["guard"] for l in res.layers if "guard" in l.details}


# --- the sweep ---------------------------------------------------------------------------------

@dataclass
class SweepResult:
    model: str
    plugin: str
    options: dict[str, Any]
    original: dict[str, Any]
    data: dict[str, Any]
    backend: dict[str, Any]
    uniform: list[dict[str, Any]] = field(default_factory=list)
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    layer_latency: list[dict[str, Any]] = field(default_factory=list)
    fallback: list[dict[str, Any]] = field(default_factory=list)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def run_sweep(model: str | Path | onnx.ModelProto, sopts: SweepOptions, run_opts: pipeline.RunOptions | None = None,
              progress: Progress | None = None, *, split: DataSplit | None = None) -> SweepResult:
    """Run the sweeps asked for in `sopts` and return every measurement (writes nothing)."""
    run_opts = run_opts or pipeline.RunOptions()
    tick = progress or (lambda what, done, total: None)
    plug = registry().get(sopts.plugin)
    has_ratio = "ratio" in {f.name for f in option_fields(plug)}
    fallback_mode = not has_ratio and "exclude" in {f.name for f in option_fields(plug)}
    if not has_ratio and not fallback_mode:
        raise UsageError(f"plugin '{plug.name}' has no ratio to sweep (and no per-node fallback); "
                         "sweeps work for tucker, svd, prune and int8")
    if has_ratio and (sopts.uniform or sopts.per_layer):
        if not sopts.ratios:
            raise UsageError("give --ratios, e.g. 0.125:1:0.125")
        check_ratios(plug.name, sopts.ratios)
    elif sopts.ratios and not has_ratio:
        raise UsageError(f"plugin '{plug.name}' has no ratio; its sweep is the per-node fallback sensitivity "
                         "(drop --ratios)")
    if sopts.reconstruction and plug.name not in ("tucker", "svd"):
        raise UsageError("--reconstruction is for tucker and svd (their error follows from singular values)")
    if sopts.reconstruction and not (sopts.uniform or sopts.per_layer):  # data-free: no data, no backend
        original = model_io.load(model) if not isinstance(model, onnx.ModelProto) else model
        plug.make_options(sopts.options)
        result = SweepResult(str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>",
                             plug.name, dict(sopts.options), {}, {}, {})
        result.reconstruction = reconstruction(engine.prepare(original), plug, sopts.options, sopts.layers)
        if not result.reconstruction:
            raise UsageError(f"plugin '{plug.name}' finds no layer to factorize in this model")
        return result
    parallel = sopts.workers > 1 or sopts.backend == "ray"
    threads = sopts.eval_threads if sopts.eval_threads is not None else (1 if parallel else run_opts.threads)
    backend = make_backend(sopts.backend, sopts.workers, sopts.address, sopts.latency_local)
    tick("loading", 0, 1)
    st = setup(model, plug.name, sopts.options, run_opts, eval_threads=threads, parallel=parallel, split=split)
    result = SweepResult(st.source, plug.name, st.base, st.original_metrics, st.split.to_json(),
                         {"name": backend.name, "workers": sopts.workers, "eval_threads": threads,
                          "latency_threads": run_opts.threads, "latency_local": sopts.latency_local})
    if sopts.reconstruction:
        result.reconstruction = reconstruction(st.prepared, plug, st.base, sopts.layers)
    with backend:
        backend.start(st.payload)
        if fallback_mode:
            result.fallback = fallback_sensitivity(st, backend, sopts.layers, tick)
        else:
            if sopts.uniform:
                result.uniform = uniform(st, backend, sopts, run_opts, tick)
            if sopts.per_layer:
                result.per_layer, result.layer_latency = per_layer(st, backend, sopts, run_opts, tick)
    return result


def uniform(st: Setup, backend: Backend, sopts: SweepOptions, run_opts: pipeline.RunOptions,
            tick: Progress) -> list[dict[str, Any]]:
    configs = [Config(f"ratio={r:g}", {**st.base, "ratio": r}, sopts.layers, keep_model=sopts.latency)
               for r in sopts.ratios]
    rows = backend.map(configs, tick, "evaluating ratios")
    for r, row in zip(sopts.ratios, rows):
        row["ratio"] = r
        row["macs_ratio"] = (row["macs"] / st.original_metrics["macs"]
                             if row.get("macs") is not None and st.original_metrics["macs"] else None)
    if sopts.latency:
        timed = [row for row in rows if "model" in row]
        original = st.original.SerializeToString()
        feed = st.split.eval.first_batch(run_opts.batch)
        for i, row in enumerate(timed):
            tick("timing (one at a time)", i, len(timed))
            lat, node = backend.timed(measure_ab, original, row["model"], feed, run_opts.threads,
                                      sopts.latency_budget_s)
            row["latency"] = {**lat, "node": node}
        tick("timing (one at a time)", len(timed), len(timed))
    for row in rows:
        row.pop("model", None)
    return rows


def eligible_layers(st: Setup, ratios: list[float], layers: str | None) -> list[str]:
    """The layers the plugin rewrites at the strongest ratio of the sweep (one data-free apply)."""
    strongest = compression_order(st.plugin.name, ratios)[-1]
    opts = {**st.base, "ratio": strongest}
    if "fit" in {f.name for f in option_fields(st.plugin)}:
        opts["fit"] = "weights"
    res = engine.apply(st.prepared, st.plugin, opts, layers=layers, data=st.split.calib, input_shapes=st.shapes,
                       threads=st.payload.threads, seed=st.payload.seed, prepared=True)
    # prune reports every member of a channel group it shrank; the group is chosen through its
    # name, so the other members would only repeat (or not change) the same configuration
    return [l.layer for l in res.rewritten if l.details.get("group", l.layer) == l.layer]


def latency_shapes(data: DataSet, batch: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of the feed latency is measured on (`first_batch(batch)`)."""
    return {k: tuple(v.shape) for k, v in data.first_batch(batch).items()}


def layer_pattern(name: str) -> str:
    return f"^{re.escape(name)}$"


def per_layer(st: Setup, backend: Backend, sopts: SweepOptions, run_opts: pipeline.RunOptions,
              tick: Progress) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One layer at a time at each ratio: drift/agreement/accuracy, and each layer's time alone."""
    names = eligible_layers(st, sopts.ratios, sopts.layers)
    if not names:
        among = f" among the nodes --layers {sopts.layers!r} matches" if sopts.layers else ""
        raise UsageError(f"plugin '{st.plugin.name}' rewrites no layer of this model{among} at these ratios")
    timed_alone = st.times_layers
    configs = [Config(f"{n}@{r:g}", {**st.base, "ratio": r}, layer_pattern(n),
                      keep_model=sopts.latency and not timed_alone)
               for n in names for r in sopts.ratios]
    rows = backend.map(configs, tick, "evaluating layers")
    for cfg, row in zip(configs, rows):
        name, _, r = cfg.key.rpartition("@")
        row.update(layer=name, ratio=float(r))
        row["applied"] = name in row.get("rewritten", [])
    timings: list[dict[str, Any]] = []
    if sopts.latency:
        if timed_alone:
            pattern = "|".join(layer_pattern(n) for n in names)
            # at the shapes the whole-model latency is measured at (--batch), so a plan's
            # per-layer savings and its end-to-end timing describe the same workload
            shapes = {**st.shapes, **latency_shapes(st.split.eval, run_opts.batch)}
            for i, r in enumerate(sopts.ratios):
                tick("timing layers alone (one at a time)", i, len(sopts.ratios))
                per, node = backend.timed(layer_timings, st.payload.model, st.plugin.name, {**st.base, "ratio": r},
                                          pattern, shapes, run_opts.threads, run_opts.seed)
                for n in names:
                    if n in per:
                        g = per[n]
                        timings.append({"layer": n, "ratio": r, "original_ms": g["original_ms"],
                                        "ms": g["rewrite_ms"], "saved_ms": g["original_ms"] - g["rewrite_ms"],
                                        "verdict": g["verdict"], "how": "layer alone", "node": node})
            _common_original_time(timings)
        else:  # a whole-model plugin: the model with this one layer changed, against the original
            original = st.original.SerializeToString()
            feed = st.split.eval.first_batch(run_opts.batch)
            todo = [row for row in rows if "model" in row and row["applied"]]  # unchanged: nothing to time
            for i, row in enumerate(todo):
                tick("timing (one at a time)", i, len(todo))
                lat, node = backend.timed(measure_touched, original, row["model"], feed, run_opts.threads,
                                          min(sopts.latency_budget_s, 1.0))
                timings.append({"layer": row["layer"], "ratio": row["ratio"], "original_ms": lat["original_ms"],
                                "ms": lat["ms"], "saved_ms": lat["original_ms"] - lat["ms"],
                                "verdict": "faster" if lat["ratio_high"] < 1 else (
                                    "slower" if lat["ratio_low"] > 1 else "inconclusive"),
                                "how": f"the {lat['touched']} nodes it changes, onnxruntime profile", "node": node})
    for row in rows:
        row.pop("model", None)
    return rows, timings


def _common_original_time(timings: list[dict[str, Any]]) -> None:
    """saved_ms from one original time per layer. Each ratio's timing is its own interleaved
    A/B, whose ratio rewrite/original is robust to what else the machine does, but whose
    absolute times are not: on a busy machine one layer's original node read 1.2 to 5.2 ms
    in five measurements. Saved = median original time x (1 - rewrite / original)."""
    by_layer: dict[str, list[float]] = {}
    for t in timings:
        by_layer.setdefault(t["layer"], []).append(t["original_ms"])
    for t in timings:
        if t["original_ms"] > 0:
            t["saved_ms"] = float(np.median(by_layer[t["layer"]])) * (1.0 - t["ms"] / t["original_ms"])


def fallback_sensitivity(st: Setup, backend: Backend, layers: str | None, tick: Progress) -> list[dict[str, Any]]:
    """int8: drift with every node quantized, then with each quantized node alone kept in float."""
    base_excl = tuple(st.plugin.make_options(st.base).exclude)
    first = backend.map([Config("all quantized", st.base, layers)], tick, "quantizing")[0]
    if "error" in first:
        raise UsageError(f"{st.plugin.name} failed on this model: {first['error']}")
    rx = re.compile(layers) if layers else None
    nodes = [n for n in first["rewritten"] if rx is None or rx.search(n)]
    # layers folded into another (BatchNormalization into its conv) are not nodes of their own any more
    folded = {n.name for n in st.prepared.graph.node if n.op_type == "BatchNormalization"}
    nodes = [n for n in nodes if n not in folded]
    # every run makes the choices the first one made for itself (int8's calibration method and
    # each auto step on or off): the drift then moves with the node kept in float alone, and no run tries each choice again
    settled = first.get("settled") or {}
    configs = [Config(f"float:{n}", {**st.base, **settled, "exclude": base_excl + (n,)}, layers) for n in nodes]
    rows = [dict(first, layer=None)] + backend.map(configs, tick, "each node in float")
    for cfg, row in zip([None] + configs, rows):
        if cfg is not None:
            row["layer"] = cfg.key.removeprefix("float:")
            if row.get("drift") is not None and first.get("drift") is not None:
                row["drift_reduction"] = first["drift"] - row["drift"]
    return rows


# --- reconstruction ------------------------------------------------------------------------------

def reconstruction(prepared: onnx.ModelProto, plug: Plugin, base: dict[str, Any], layers: str | None
                   ) -> list[dict[str, Any]]:
    """Relative reconstruction error vs rank for every candidate layer, from singular values."""
    from surgeon.model import to_graph
    from surgeon.plugin import Candidate, Context
    graph = to_graph(prepared)
    opts = plug.make_options(base)
    rx = re.compile(layers) if layers else None
    rows: list[dict[str, Any]] = []
    for item in plug.select(graph, Context(), opts):
        if not isinstance(item, Candidate) or (rx is not None and not rx.search(item.layer)):
            continue
        w = item.data.get("weight") if plug.name == "tucker" else item.data.get("w")
        if not isinstance(w, np.ndarray):
            continue
        w = np.asarray(w, np.float64)
        if w.ndim > 2 and any(k != 1 for k in w.shape[2:]):
            curves = {"R1 (input channels), R2 full": _spectrum(w, 1), "R2 (output channels), R1 full": _spectrum(w, 0)}
        else:
            curves = {"rank": np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)}
        norm = float(np.linalg.norm(w))
        for mode, s in curves.items():
            tail = np.sqrt(np.maximum(np.cumsum((s ** 2)[::-1])[::-1], 0.0))  # tail[r] = ||s[r:]||
            for r in range(1, len(s) + 1):
                err = float(tail[r] / norm) if r < len(s) and norm > 0 else 0.0
                rows.append({"layer": item.layer, "mode": mode, "rank": r, "full": len(s),
                             "fraction": r / len(s), "rel_error": err})
    return rows


def _spectrum(w: np.ndarray, mode: int) -> np.ndarray:
    """Singular values of the mode-`mode` unfolding (through its Gram matrix, like lowrank)."""
    from surgeon.lowrank import unfold
    a = unfold(w, mode)
    vals = np.linalg.eigvalsh(a @ a.T)[::-1]
    return np.sqrt(np.maximum(vals, 0.0))


# --- writing -------------------------------------------------------------------------------------

UNIFORM_COLUMNS = ["ratio", "params", "macs", "macs_ratio", "latency_ms", "original_ms", "latency_ratio",
                   "latency_ratio_low", "latency_ratio_high", "drift", "agreement", "accuracy", "latency_node", "error"]


def uniform_rows(res: SweepResult) -> list[dict[str, Any]]:
    out = []
    for row in res.uniform:
        lat = row.get("latency") or {}
        out.append({"ratio": row["ratio"], "params": row.get("params"), "macs": row.get("macs"),
                    "macs_ratio": row.get("macs_ratio"), "latency_ms": lat.get("ms"),
                    "original_ms": lat.get("original_ms"), "latency_ratio": lat.get("ratio"),
                    "latency_ratio_low": lat.get("ratio_low"), "latency_ratio_high": lat.get("ratio_high"),
                    "drift": row.get("drift"), "agreement": row.get("agreement"), "accuracy": row.get("accuracy"),
                    "latency_node": lat.get("node"), "error": row.get("error")})
    return out


def layer_rows(res: SweepResult) -> list[dict[str, Any]]:
    times = {(t["layer"], t["ratio"]): t for t in res.layer_latency}
    out = []
    for row in res.per_layer:
        t = times.get((row["layer"], row["ratio"]), {})
        d = (row.get("layers") or {}).get(row["layer"], {})
        out.append({"layer": row["layer"], "ratio": row["ratio"], "applied": row.get("applied"),
                    "ranks": _ranks(d), "drift": row.get("drift"), "agreement": row.get("agreement"),
                    "accuracy": row.get("accuracy"), "params": row.get("params"), "macs": row.get("macs"),
                    "layer_ms": t.get("original_ms"), "rewrite_ms": t.get("ms"), "saved_ms": t.get("saved_ms"),
                    "timing": t.get("how"), "error": row.get("error")})
    return out


def fallback_rows(res: SweepResult) -> list[dict[str, Any]]:
    return [{"float_node": r["layer"] or "(none: all quantized)", "drift": r.get("drift"),
             "drift_reduction": r.get("drift_reduction"), "agreement": r.get("agreement"),
             "accuracy": r.get("accuracy"), "error": r.get("error")} for r in res.fallback]


def _ranks(d: dict[str, Any]) -> str:
    if "R1" in d:
        return f"{d['R1']},{d['R2']}"
    if "rank" in d:
        return str(d["rank"])
    if "channels_after" in d:
        return f"{d['channels_after']}/{d['channels_before']} ch"
    return ""


def to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write(res: SweepResult, out_dir: str | Path) -> list[Path]:
    """CSV + JSON + PNG plots of every part that was run, in `out_dir`; returns the files."""
    from surgeon import report
    from surgeon import sweep_plots as plots
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [report.write_json(out / "sweep.json", res.to_json())]
    title = f"{res.plugin} on {Path(res.model).name}"
    parts = [("uniform", uniform_rows(res), UNIFORM_COLUMNS), ("per_layer", layer_rows(res), None),
             ("fallback", fallback_rows(res), None), ("reconstruction", res.reconstruction, None)]
    for name, rows, cols in parts:
        if rows:
            files.append(report.write_text(out / f"{name}.csv", to_csv(rows, cols)))
    if res.uniform:
        files += plots.uniform(out, uniform_rows(res), res.original, title, res.plugin in RATIO_REMOVES)
    if res.per_layer:
        files += plots.per_layer(out, layer_rows(res), title, res.plugin in RATIO_REMOVES)
    if res.fallback:
        files += plots.fallback(out, res.fallback, title)
    if res.reconstruction:
        files += plots.reconstruction(out, res.reconstruction, title)
    return files
