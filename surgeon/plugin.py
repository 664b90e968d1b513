"""The plugin protocol, what plugins return, and the registry (built-ins + entry points).

Two kinds of plugin share one registry:

* a `GraphPlugin` looks at one node at a time: `select` yields a `Candidate` or a `Skip`
  (with a reason) for every node of the ops it handles, and `rewrite` returns the chain of
  nodes that should replace a candidate. The engine inserts the chain, can time it against
  the original first (the latency guard) and keeps the bookkeeping.
* a `ModelPlugin` needs the whole model at once (int8 through onnxruntime.quantization):
  `run` takes and returns a ModelProto plus its per-layer report.

Options are a dataclass per plugin (`Options`); they are parsed from strings and checked
before any work, and a wrong one lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata as md
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.errors import PluginLoadError, UsageError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "surgeon.plugins"
BUILTIN_MODULES = ("surgeon.plugins.tucker", "surgeon.plugins.svd", "surgeon.plugins.int8",
                   "surgeon.plugins.prune")


# --- what plugins produce ----------------------------------------------------------------------

@dataclass
class Candidate:
    """A node a plugin will rewrite, plus whatever it already looked up (weights, shapes)."""

    node: gs.Node
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> str:
        return self.node.name


@dataclass
class Skip:
    """A node a plugin will not touch, and why (shown with -v; always in the JSON report)."""

    layer: str
    op: str
    reason: str


@dataclass
class Rewrite:
    """The replacement for one node: `chain` consumes the node's inputs and its last node's
    single output takes over the original output tensor (same name, same consumers)."""

    chain: list[gs.Node]
    details: dict[str, Any] = field(default_factory=dict)
    # False when the plugin already decided with another layer's verdict (users of a shared
    # weight are rewritten together, or not at all), so the latency guard does not time it again
    timed: bool = True


@dataclass
class LayerReport:
    layer: str
    op: str
    # failed: the plugin raised on this layer, which was left as it was (a run with one fails)
    status: Literal["rewritten", "skipped", "reverted", "failed"]
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "op": self.op, "status": self.status, "reason": self.reason,
                "details": _jsonable(self.details)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --- what plugins are given --------------------------------------------------------------------

@dataclass
class Context:
    """What the engine knows about the model beyond the graph.

    `shapes` maps tensor names to static shapes (from shape inference with the batch size
    the user chose); `data` is the calibration/validation data set (may be synthesized).
    """

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data: Any = None  # surgeon.calibration.DataSet
    threads: int = 0
    seed: int = 0
    opset: int = 13
    progress: Any = None  # callable(done: int, total: int, description: str)
    selected: set[str] = field(default_factory=set)  # candidates that passed --layers
    outcomes: dict[str, str] = field(default_factory=dict)  # layer -> "rewritten" | "skipped", so far
    # per-layer options (a recipe's [[steps.layers]] or a plan), already parsed and merged over
    # the step's options; whole-model plugins read them through options_for()
    layer_options: dict[str, Any] = field(default_factory=dict)
    skip_layers: set[str] = field(default_factory=set)  # layers a recipe says to leave alone

    def options_for(self, layer: str, default: Any) -> Any:
        """The options that apply to one layer: its override, or the step's."""
        return self.layer_options.get(layer, default)

    def tick(self, done: int, total: int, description: str = "") -> None:
        """Report progress on long work (the CLI shows it as a bar)."""
        if self.progress is not None:
            self.progress(done, total, description)


class Plugin:
    """Common to both kinds: a CLI name, a one-line summary and an options dataclass."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = None  # a dataclass; fields' metadata["help"] documents them
    # options a recipe may override per layer (None: all of them); a plugin whose options only
    # make sense for the whole model says () and then takes only `skip = true` per layer
    per_layer_options: ClassVar[tuple[str, ...] | None] = None

    def make_options(self, values: dict[str, Any] | None = None) -> Any:
        return parse_options(self, values or {})

    def uses_data(self, opts: Any) -> bool:
        """Whether this plugin fits or calibrates on ctx.data with these options. The pipeline
        then keeps the rows it fits on out of the rows validation scores. True unless a plugin
        says otherwise, so a third-party plugin's fit is never scored as held-out."""
        return True

    def settled(self, extras: dict[str, Any]) -> dict[str, Any]:
        """Option values that repeat the choices a run made for itself (its "auto" options), read
        from that run's extras: a sweep that reruns the plugin many times with one thing changed
        (int8's per-node fallback) passes them, so every run makes the same choices without
        trying each one again. Nothing by default."""
        return {}


class GraphPlugin(Plugin):
    def select(self, graph: gs.Graph, ctx: Context, opts: Any) -> Iterable[Candidate | Skip]:
        raise NotImplementedError

    def rewrite(self, graph: gs.Graph, cand: Candidate, ctx: Context, opts: Any) -> Rewrite | Skip:
        raise NotImplementedError

    def before_rewrites(self, graph: gs.Graph, candidates: list[Candidate], ctx: Context, opts: Any) -> None:
        """Exact edits around the layers that will be rewritten (those left after --layers, the
        recipe's skips), made before the first rewrite and before any calibration pass. None
        by default."""


class ModelPlugin(Plugin):
    def run(self, model: onnx.ModelProto, ctx: Context, opts: Any,
            layers: typing.Callable[[str], bool]) -> tuple[onnx.ModelProto, list[LayerReport], dict[str, Any]]:
        """Return the new model, a per-layer report and plugin-level extras for the report."""
        raise NotImplementedError


# --- options -----------------------------------------------------------------------------------

def option_fields(plugin: Plugin) -> list[dataclasses.Field]:
    return list(dataclasses.fields(plugin.Options)) if plugin.Options else []


def option_help(plugin: Plugin) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option, for `surgeon plugins`."""
    hints = typing.get_type_hints(plugin.Options) if plugin.Options else {}
    rows = []
    for f in option_fields(plugin):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        # a None default often means "decided from other options": the field can say how
        shown = f.metadata.get("default_text") or ("-" if default is None else repr(default))
        rows.append((f.name, _type_name(hints[f.name]), shown, f.metadata.get("help", "")))
    return rows


def parse_options(plugin: Plugin, values: dict[str, Any]) -> Any:
    """Check option names against the plugin's Options and convert string values to their types."""
    if plugin.Options is None:
        if values:
            raise UsageError(f"plugin '{plugin.name}' takes no options (got {', '.join(sorted(values))})")
        return None
    fields = {f.name: f for f in option_fields(plugin)}
    hints = typing.get_type_hints(plugin.Options)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"plugin '{plugin.name}' has no option {', '.join(repr(u) for u in unknown)}; "
                         f"valid options: {', '.join(sorted(fields)) or '(none)'}")
    kwargs = {}
    for key, raw in values.items():
        try:
            kwargs[key] = _convert(raw, hints[key])
        except (TypeError, ValueError) as exc:
            # a choice's error lists the choices already
            expected = "" if typing.get_origin(hints[key]) is Literal else f" (expected {_type_name(hints[key])})"
            raise UsageError(f"plugin '{plugin.name}': bad value {raw!r} for option '{key}'{expected}: {exc}") from None
    try:
        opts = plugin.Options(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"plugin '{plugin.name}': {exc}") from None
    check = getattr(opts, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise UsageError(f"plugin '{plugin.name}': {exc}") from None
    return opts


def _convert(raw: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(raw, a)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for a in args:
            if raw == a or (isinstance(raw, str) and str(a) == raw):
                return a
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        elem = args[0] if args else str
        out = [_convert(i.strip() if isinstance(i, str) else i, elem) for i in items if i != ""]
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(out):
            raise ValueError(f"expected {len(args)} comma-separated values")
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    if tp is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError("expected a whole number")
        return int(raw)
    if tp is float:
        return float(raw)
    if tp is str:
        return str(raw)
    return raw


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (
            " | none" if type(None) in args else "")
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (tuple, list):
        return "list of " + _type_name(args[0]) if args else "list"
    return getattr(tp, "__name__", str(tp))


# --- registry ----------------------------------------------------------------------------------

@dataclass
class PluginFailure:
    """A third-party plugin that could not be loaded, and why (the CLI prints these as warnings)."""

    name: str  # the entry point's name
    package: str
    entry_point: str  # "module:attr"
    error: str  # one line that names the plugin and its package

    def __str__(self) -> str:
        return f"{self.error}; skipped it, the other plugins work"


class Registry:
    """Name -> plugin. Built-ins register through the same path third parties use.

    A third-party plugin that fails to import, is not a plugin or reuses a taken name is
    skipped and recorded in `failures` (named, with its package); every other plugin keeps
    working. `strict=True` raises PluginLoadError instead (for plugin authors' tests)."""

    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._origin: dict[str, str] = {}
        self.failures: list[PluginFailure] = []

    def register(self, plugin: Plugin | type, origin: str = "built-in") -> Plugin:
        if isinstance(plugin, type):
            plugin = plugin()
        name = getattr(plugin, "name", None)
        if not isinstance(plugin, Plugin) or not name:
            raise PluginLoadError(f"{origin}: {plugin!r} is not a surgeon plugin (needs a name and "
                                  "to subclass surgeon.GraphPlugin or surgeon.ModelPlugin)")
        if name in self._plugins:
            raise PluginLoadError(f"two plugins are named '{name}': {self._origin[name]} and {origin}")
        if plugin.Options is not None and not dataclasses.is_dataclass(plugin.Options):
            raise PluginLoadError(f"{origin}: plugin '{name}' Options must be a dataclass")
        self._plugins[name] = plugin
        self._origin[name] = origin
        return plugin

    def get(self, name: str) -> Plugin:
        try:
            return self._plugins[name]
        except KeyError:
            failed = [f for f in self.failures if f.name == name]
            if failed:
                raise PluginLoadError(str(failed[0])) from None
            raise UsageError(f"unknown plugin '{name}'; available: {', '.join(sorted(self._plugins)) or '(none)'}") from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def __iter__(self):
        return (self._plugins[n] for n in self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._plugins

    def load_builtins(self) -> None:
        for module_name in BUILTIN_MODULES:
            module = importlib.import_module(module_name)
            for plugin in module.PLUGINS:
                self.register(plugin, origin=f"built-in ({module_name})")

    def load_entry_points(self, entry_points: Iterable[md.EntryPoint] | None = None, *, strict: bool = False) -> None:
        if entry_points is None:
            entry_points = md.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda e: e.name):
            package = _package_of(ep)
            try:
                try:
                    obj = ep.load()
                    # an entry point names a plugin class or instance, a list of them, or a factory
                    plugins = obj() if callable(obj) and not isinstance(obj, (type, Plugin)) else obj
                except Exception as exc:  # whatever a broken package raises on import (SyntaxError too)
                    raise PluginLoadError(f"plugin '{ep.name}' from package '{package}' failed to load "
                                          f"({ep.value}): {type(exc).__name__}: {_first_line(exc)}") from None
                if not isinstance(plugins, (list, tuple)):
                    plugins = [plugins]
                # all of an entry point's plugins, or none: check before registering any
                staged = Registry()
                staged._plugins, staged._origin = dict(self._plugins), dict(self._origin)
                for p in plugins:
                    staged.register(p, origin=f"package '{package}' (entry point {ep.name} = {ep.value})")
            except PluginLoadError as exc:
                if strict:
                    raise
                self.failures.append(PluginFailure(ep.name, package, ep.value, str(exc)))
                log.warning("%s", self.failures[-1])
                continue
            self._plugins, self._origin = staged._plugins, staged._origin


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _package_of(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return dist.metadata["Name"]
    return ep.value.split(":")[0].split(".")[0]


_default: Registry | None = None


def registry(entry_points: Iterable[md.EntryPoint] | None = None, *, fresh: bool = False,
             strict: bool = False) -> Registry:
    """The process-wide registry: built-ins plus installed entry points (loaded once).
    Third-party plugins that fail to load are skipped and listed in `.failures`."""
    global _default
    if _default is None or fresh or entry_points is not None or strict:
        reg = Registry()
        reg.load_builtins()
        reg.load_entry_points(entry_points, strict=strict)
        if entry_points is not None or fresh or strict:
            return reg
        _default = reg
    return _default
