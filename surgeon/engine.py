"""Apply a plugin to a model: fold constants, select, rewrite (behind the latency guard), check.

This is the only place that drives plugins, so every plugin gets the same bookkeeping:
a report line for every node it looked at, profiles before and after, and a checked model.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from surgeon import guard as _guard
from surgeon.calibration import DataSet, resolve_shapes
from surgeon.errors import ModelError, SurgeonError, UsageError
from surgeon.model import check_model, fold_constants, to_graph, to_model
from surgeon.plugin import (Candidate, Context, GraphPlugin, LayerReport, ModelPlugin, Plugin, Rewrite, Skip,
                            registry as default_registry)
from surgeon.profile import Profile, profile, tensor_shapes
from surgeon.rewrite import detach, replace_with_chain

log = logging.getLogger(__name__)


@dataclass
class SurgeryResult:
    model: onnx.ModelProto
    plugin: str
    options: dict[str, Any]
    layers: list[LayerReport]
    before: Profile
    after: Profile
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[LayerReport]:
        return [l for l in self.layers if l.status == "rewritten"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [l for l in self.layers if l.status != "rewritten"]

    def to_json(self) -> dict[str, Any]:
        from surgeon.plugin import _jsonable
        return {"plugin": self.plugin, "options": _jsonable(self.options), "seconds": round(self.seconds, 3),
                "rewritten": len(self.rewritten), "skipped": len(self.skipped),
                "layers": [l.to_json() for l in self.layers],
                "before": self.before.to_json(), "after": self.after.to_json(), "extras": _jsonable(self.extras)}


def layer_filter(pattern: str | None) -> Callable[[str], bool]:
    if not pattern:
        return lambda name: True
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"bad --layers regex {pattern!r}: {exc}") from None
    return lambda name: rx.search(name) is not None


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """The form every plugin sees: Constant nodes and constant subgraphs folded into initializers."""
    return fold_constants(model)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def apply(model: onnx.ModelProto, plugin: str | Plugin, options: dict[str, Any] | None = None, *,
          layers: str | None = None, per_layer: dict[str, dict[str, Any]] | None = None,
          data: DataSet | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
          threads: int = 0, seed: int = 0, progress: Callable[[int, int, str], None] | None = None) -> SurgeryResult:
    """Run one plugin over a model and return the new model with its report.

    `options` are the plugin's options (strings are parsed); `per_layer` overrides them for
    named layers (e.g. ranks chosen by a sweep); `layers` is a regex on node names.
    The input model is not modified.
    """
    t0 = time.perf_counter()
    plug = default_registry().get(plugin) if isinstance(plugin, str) else plugin
    opts = plug.make_options(options)
    layer_opts = {name: plug.make_options(_merge(plug, options or {}, o)) for name, o in (per_layer or {}).items()}
    wanted = layer_filter(layers)

    source = prepare(model)
    concrete = resolve_shapes(source, input_shapes)
    ctx = Context(shapes=tensor_shapes(source, concrete), data=data, threads=threads, seed=seed,
                  opset=_opset(source), progress=progress, layer_options=layer_opts)
    before = profile(source, concrete)

    if isinstance(plug, ModelPlugin):
        out, reports, extras = plug.run(source, ctx, opts, wanted)
    elif isinstance(plug, GraphPlugin):
        out, reports = _apply_graph_plugin(plug, source, ctx, opts, layer_opts, wanted)
        extras = {}
    else:
        raise UsageError(f"plugin '{plug.name}' is neither a GraphPlugin nor a ModelPlugin")
    try:
        check_model(out, what=f"output of plugin '{plug.name}'")
    except ModelError as exc:  # the plugin's fault, not the input's: exit 1, not 2
        raise SurgeonError(str(exc)) from None
    after = profile(out, concrete)
    return SurgeryResult(out, plug.name, _options_dict(opts), reports, before, after,
                         time.perf_counter() - t0, extras)


def _merge(plug: Plugin, options: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Per-layer options over the global ones; an override of one of the plugin's mutually
    exclusive options (e.g. ranks vs ratio) drops the others from the global set."""
    exclusive = set(getattr(plug.Options, "exclusive_options", ()))
    if exclusive & set(override):
        options = {k: v for k, v in options.items() if k not in exclusive}
    return {**options, **override}


def _options_dict(opts: Any) -> dict[str, Any]:
    import dataclasses
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}


def _apply_graph_plugin(plug: GraphPlugin, source: onnx.ModelProto, ctx: Context, opts: Any,
                        layer_opts: dict[str, Any], wanted: Callable[[str], bool]):
    graph = to_graph(source)
    reports: list[LayerReport] = []
    candidates: list[Candidate] = []
    for item in plug.select(graph, ctx, opts):
        if isinstance(item, Skip):
            reports.append(LayerReport(item.layer, item.op, "skipped", item.reason))
        elif not wanted(item.layer):
            reports.append(LayerReport(item.layer, item.node.op, "skipped", "not matched by --layers"))
        else:
            candidates.append(item)
    ctx.selected = {c.layer for c in candidates}
    for i, cand in enumerate(candidates):
        ctx.tick(i, len(candidates), cand.layer)
        rep = _rewrite_one(plug, graph, cand, ctx, layer_opts.get(cand.layer, opts))
        ctx.outcomes[cand.layer] = rep.status
        reports.append(rep)
    ctx.tick(len(candidates), len(candidates), "done")
    return to_model(graph, like=source), reports


def _rewrite_one(plug: GraphPlugin, graph: gs.Graph, cand: Candidate, ctx: Context, o: Any) -> LayerReport:
    """Ask the plugin for a rewrite, time it if asked, splice it in; say what happened."""
    op = cand.node.op
    try:
        result = plug.rewrite(graph, cand, ctx, o)
    except SurgeonError:
        raise
    except Exception as exc:  # a plugin bug must not lose the whole run: report it on the layer
        log.exception("plugin %s failed on %s", plug.name, cand.layer)
        return LayerReport(cand.layer, op, "skipped", f"plugin error: {type(exc).__name__}: {exc}")
    if isinstance(result, Skip):
        return LayerReport(cand.layer, op, "skipped", result.reason)
    details = dict(result.details)
    verdict = _guarded(cand.node, result, ctx, o) if result.timed else None
    if verdict is not None:
        details["guard"] = verdict.to_json()
        if verdict.speedup <= 1.0:
            detach(result.chain)
            return LayerReport(cand.layer, op, "skipped", f"slower ({1 / verdict.speedup:.2f}x the original's time)",
                               details)
    replace_with_chain(graph, cand.node, result.chain)
    return LayerReport(cand.layer, op, "rewritten", "", details)


def _guarded(node: gs.Node, result: Rewrite, ctx: Context, opts: Any) -> _guard.GuardResult | None:
    if getattr(opts, "guard", "none") != "latency":
        return None
    shape = ctx.shapes.get(node.inputs[0].name)
    if not shape:
        log.info("%s: input shape unknown, latency guard not applied", node.name)
        return None
    try:
        return _guard.time_rewrite(node, result.chain, shape, ctx.opset, ctx.threads, seed=ctx.seed, shapes=ctx.shapes)
    except _guard.GuardUnavailable as exc:
        log.info("%s: latency guard not applied (%s)", node.name, exc)
        return None
