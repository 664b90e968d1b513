"""Apply a plugin to a model: fold constants, select, rewrite (behind the latency guard), check.

This is the only place that drives plugins, so every plugin gets the same bookkeeping:
a report line for every node it looked at, profiles before and after, and a checked model.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from surgeon import guard as _guard
from surgeon.calibration import DataSet, resolve_shapes, shape_hint, shapes_from_data
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
    # one line each about what could not be measured and what to pass (MACs, the latency guard)
    notes: list[str] = field(default_factory=list)
    # every tensor's static shape in `model`: the next step of a chain starts from these
    # instead of inferring them again
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def rewritten(self) -> list[LayerReport]:
        return [l for l in self.layers if l.status == "rewritten"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [l for l in self.layers if l.status != "rewritten"]

    @property
    def failed(self) -> list[LayerReport]:
        return [l for l in self.layers if l.status == "failed"]

    def to_json(self) -> dict[str, Any]:
        from surgeon.plugin import _jsonable
        return {"plugin": self.plugin, "options": _jsonable(self.options), "seconds": round(self.seconds, 3),
                "rewritten": len(self.rewritten), "skipped": len(self.skipped), "failed": len(self.failed),
                "layers": [l.to_json() for l in self.layers],
                "before": self.before.to_json(), "after": self.after.to_json(), "extras": _jsonable(self.extras),
                "notes": list(self.notes)}


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


def _why_none(plugin: str, reports: list[LayerReport]) -> str:
    """Why a plugin rewrote no layer: the most common reason by its gist (the words before its
    figures: "slower (2.33x the original's time ...)" is "slower"), with one layer's in full."""
    gist = [l.reason.split(" (")[0].split(": ")[0] for l in reports]
    top, count = Counter(gist).most_common(1)[0]
    first = reports[gist.index(top)]
    total = len(reports)
    which = ("the one it looked at was" if total == 1 else
             f"all {total} it looked at were" if count == total else f"{count} of the {total} it looked at were")
    same = len({l.reason for l, g in zip(reports, gist) if g == top}) == 1
    return f"{plugin} rewrote no layer: {which} skipped: " + (
        first.reason if same else f"{top}, e.g. {first.layer}: {first.reason} (-v shows each)")


def apply(model: onnx.ModelProto, plugin: str | Plugin, options: dict[str, Any] | None = None, *,
          layers: str | None = None, per_layer: dict[str, dict[str, Any]] | None = None,
          skip: set[str] | None = None, data: DataSet | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, threads: int = 0, seed: int = 0,
          progress: Callable[[int, int, str], None] | None = None, prepared: bool = False,
          before: Profile | None = None, guard_refresh: bool = False,
          shapes: dict[str, tuple[int, ...]] | None = None) -> SurgeryResult:
    """Run one plugin over a model and return the new model with its report.

    `options` are the plugin's options (strings are parsed); `per_layer` overrides them for
    named layers (e.g. ranks chosen by a sweep); `layers` is a regex on node names; `skip`
    names layers to leave alone (a recipe's `skip = true`). `prepared` says the model was
    already folded (a chain folds once), `before` reuses the previous step's profile and
    `shapes` its tensor shapes (`SurgeryResult.shapes`), so a chain infers each model's once.
    The input model is not modified.

    Input shapes come from `input_shapes` (--shape), else from `data`; the rewrites need none.
    What cannot be measured without them (MACs, the latency guard) is left out, with a line in
    `notes` saying what to pass. `guard_refresh` re-measures the latency guard's cached verdicts.
    """
    t0 = time.perf_counter()
    plug = default_registry().get(plugin) if isinstance(plugin, str) else plugin
    opts = plug.make_options(options)
    allowed = plug.per_layer_options
    for name, o in (per_layer or {}).items():
        if allowed is not None and set(o) - set(allowed):
            raise UsageError(f"plugin '{plug.name}' applies {', '.join(sorted(set(o) - set(allowed)))} to the whole "
                             f"model, not to layer '{name}'")
    layer_opts = {name: plug.make_options(merge_options(plug, options or {}, o))
                  for name, o in (per_layer or {}).items()}
    skip = set(skip or ())
    selected = layer_filter(layers)
    wanted = (lambda name: selected(name) and name not in skip) if skip else selected

    source = model if prepared else prepare(model)
    # dynamic dims nobody gave stay unknown (None): rewrites need no shapes, measurements say so
    known = resolve_shapes(source, {**shapes_from_data(data), **(input_shapes or {})}, required=False)
    ctx = Context(shapes=shapes if shapes is not None else tensor_shapes(source, known, data=data), data=data, threads=threads, seed=seed,
                  opset=_opset(source), progress=progress, layer_options=layer_opts, skip_layers=skip)
    before = before if before is not None else profile(source, known, data=data, shapes=ctx.shapes)

    with _guard.refreshing(guard_refresh):
        if isinstance(plug, ModelPlugin):
            out, reports, extras = plug.run(source, ctx, opts, wanted)
        elif isinstance(plug, GraphPlugin):
            out, reports = _apply_graph_plugin(plug, source, ctx, opts, layer_opts, wanted)
            extras = {}
        else:
            raise UsageError(f"plugin '{plug.name}' is neither a GraphPlugin nor a ModelPlugin")
    reports += subgraph_skips(source, plug)
    try:
        check_model(out, what=f"output of plugin '{plug.name}'")
    except ModelError as exc:  # the plugin's fault, not the input's: exit 1, not 2
        raise SurgeonError(str(exc)) from None
    after_shapes = tensor_shapes(out, known, data=data)
    after = profile(out, known, data=data, shapes=after_shapes)
    notes = [before.macs_note] if before.macs_note else []
    if not reports:  # e.g. svd on a detector made of convs: say so, not just "0 rewritten"
        notes.append(f"{plug.name} found no layer it applies to in this model ({plug.summary}); "
                     "the output is the input, unchanged")
    elif not any(l.status == "rewritten" for l in reports):  # why, without -v
        notes.append(_why_none(plug.name, reports))
    unguarded = [l.layer for l in reports if l.details.get("guard_skipped")]
    if unguarded:
        hint = shape_hint(source, known) or "their input shapes could not be resolved"
        notes.append(f"latency guard not applied to {len(unguarded)} layer(s), rewritten unguarded: {hint}")
    # a layer's own `hint` (e.g. too few calibration rows for its fit), as "layer: text"
    notes += [f"{l.layer}: {l.details['hint']}" for l in reports if l.status == "rewritten" and l.details.get("hint")]
    return SurgeryResult(out, plug.name, _options_dict(opts), reports, before, after,
                         time.perf_counter() - t0, extras, notes, after_shapes)


def merge_options(plug: Plugin, options: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
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
        elif item.layer in ctx.skip_layers:
            reports.append(LayerReport(item.layer, item.node.op, "skipped", "skip = true in the recipe"))
        elif not wanted(item.layer):
            reports.append(LayerReport(item.layer, item.node.op, "skipped", "not matched by --layers (or the step's select)"))
        else:
            candidates.append(item)
    ctx.selected = {c.layer for c in candidates}
    plug.before_rewrites(graph, candidates, ctx, opts)
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
        return LayerReport(cand.layer, op, "failed", f"plugin error: {type(exc).__name__}: {exc}")
    if isinstance(result, Skip):
        return LayerReport(cand.layer, op, "skipped", result.reason)
    details = dict(result.details)
    verdict = _guarded(cand.node, result, ctx, o, details) if result.timed else None
    if verdict is not None:
        details["guard"] = verdict.to_json()
        if not verdict.kept:  # slower, or not faster beyond the noise: the original stays
            detach(result.chain)
            return LayerReport(cand.layer, op, "skipped", verdict.describe(), details)
    replace_with_chain(graph, cand.node, result.chain)
    return LayerReport(cand.layer, op, "rewritten", "", details)


def _guarded(node: gs.Node, result: Rewrite, ctx: Context, opts: Any,
             details: dict[str, Any]) -> _guard.GuardResult | None:
    """Time the rewrite against the node when the plugin's options ask for the guard. When it
    cannot be timed (an input shape is unknown) the layer says so in `details["guard_skipped"]`
    and the rewrite goes in unguarded; the engine sums these up in one note."""
    if getattr(opts, "guard", "none") != "latency":
        return None
    shape = ctx.shapes.get(node.inputs[0].name)
    if not shape:
        details["guard_skipped"] = f"input '{node.inputs[0].name}' shape unknown"
        return None
    try:
        return _guard.time_rewrite(node, result.chain, shape, ctx.opset, ctx.threads, seed=ctx.seed, shapes=ctx.shapes)
    except _guard.GuardUnavailable as exc:
        details["guard_skipped"] = str(exc)
        return None
    except SurgeonError as exc:  # onnxruntime cannot build or run the two mini models
        details["guard_skipped"] = str(exc)
        return None


# --- control flow --------------------------------------------------------------------------------

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def subgraph_skips(model: onnx.ModelProto, plug: Plugin) -> list[LayerReport]:
    """A Skip for every weighted node inside an If/Loop/Scan body, at any depth.

    Plugins see the top-level graph only, so these weights are never rewritten (nor corrupted);
    saying so keeps the report honest about what was left alone."""
    from surgeon.profile import WEIGHTED_OPS
    out: list[LayerReport] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
                for sub in subs:
                    for inner in sub.node:
                        if inner.op_type in WEIGHTED_OPS:
                            out.append(LayerReport(
                                inner.name or f"{node.name}/{attr.name}/{inner.op_type}", inner.op_type, "skipped",
                                f"inside {'an' if node.op_type == 'If' else 'a'} {node.op_type} subgraph "
                                f"({node.name or node.op_type}, {attr.name}): not rewritten"))
                    walk(sub)

    walk(model.graph)
    return out
