"""Recipes: several plugins in order, with per-layer overrides and the budgets of the gate.

A recipe is a TOML file (the same format `surgeon plan` writes, so a found plan is applied as
it is). Plugin options are written inline, in the step and in its layer overrides:

    [[steps]]
    plugin = "tucker"
    ratio = 0.5                  # the step's options
    select = "^conv"             # optional: only nodes whose name matches (like --layers)

    [[steps.layers]]             # overrides, in order; a later match wins
    match = "conv3.*"            # regex on node names
    ratio = 0.75

    [[steps.layers]]
    match = "conv1"
    skip = true                  # leave these layers alone in this step

    [[steps]]
    plugin = "int8"

    [gate]                       # budgets (the command line wins)
    max_drift = 0.05
    min_agreement = 0.99

Everything is checked before any work: an unknown plugin, an unknown option, a bad value
or an unknown budget is an error that names the file, the key and what is allowed; a layer
pattern that matches nothing is a warning (the model is needed to tell, see `check_patterns`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from surgeon.errors import UsageError
from surgeon.plugin import Registry, registry as default_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STEP_KEYS = ("plugin", "select", "layers")
OVERRIDE_KEYS = ("match", "skip")


@dataclass
class LayerOverride:
    """Options for the layers whose names match `match` (or `skip` them)."""

    match: str
    options: dict[str, Any] = field(default_factory=dict)
    skip: bool = False

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match}
        if self.skip:
            out["skip"] = True
        out.update(self.options)
        return out


@dataclass
class Step:
    """One plugin run: its options, an optional node filter and per-layer overrides."""

    plugin: str
    options: dict[str, Any] = field(default_factory=dict)
    select: str | None = None
    overrides: list[LayerOverride] = field(default_factory=list)

    def layer_options(self, names: Iterable[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Per-layer options and the layers to skip, for the nodes present in a model."""
        per_layer: dict[str, dict[str, Any]] = {}
        skip: set[str] = set()
        for name in names:
            for o in self.overrides:
                if re.search(o.match, name):
                    if o.skip:
                        skip.add(name)
                    else:
                        skip.discard(name)
                        per_layer.setdefault(name, {}).update(o.options)
        return per_layer, skip

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        extra = f", {len(self.overrides)} layer override(s)" if self.overrides else ""
        return f"{self.plugin}" + (f" ({opts}{extra})" if opts or extra else "")

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plugin": self.plugin}
        if self.select:
            out["select"] = self.select
        out.update(self.options)
        if self.overrides:
            out["layers"] = [o.to_toml() for o in self.overrides]
        return out


@dataclass
class Recipe:
    steps: list[Step]
    gate: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": [s.to_toml() for s in self.steps]}
        if self.gate:
            out["gate"] = dict(self.gate)
        return out


def load(path: str | Path, reg: Registry | None = None) -> Recipe:
    """Read and check a recipe file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such recipe file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a valid TOML recipe ({exc})") from None
    return parse(doc, str(path), reg)


def parse(doc: dict[str, Any], source: str = "recipe", reg: Registry | None = None) -> Recipe:
    """Build a Recipe from a parsed TOML document, checking every key and value."""
    from surgeon.budgets import Budgets
    reg = reg or default_registry()
    unknown = sorted(set(doc) - {"steps", "gate"})
    if unknown:
        raise UsageError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; a recipe has [[steps]] and [gate]")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f"{source}: no [[steps]]; a recipe needs at least one step with a plugin")
    steps = [_parse_step(s, f"{source}: steps[{i}]", reg) for i, s in enumerate(raw_steps)]
    gate = doc.get("gate", {})
    if not isinstance(gate, dict):
        raise UsageError(f"{source}: [gate] must be a table of budgets")
    Budgets.from_mapping(gate, where=f"{source}: [gate]")  # checks names and ranges
    return Recipe(steps, dict(gate), source)


def _parse_step(raw: Any, where: str, reg: Registry) -> Step:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a step must be a table")
    name = raw.get("plugin")
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: missing 'plugin' (one of {', '.join(reg.names())})")
    if name not in reg:
        raise UsageError(f"{where}.plugin: unknown plugin '{name}'; available: {', '.join(reg.names())}")
    plug = reg.get(name)
    select = raw.get("select")
    if select is not None:
        check_regex(select, f"{where}.select")
    options = {k: v for k, v in raw.items() if k not in STEP_KEYS}
    _check_options(plug, options, where)
    overrides = []
    layers = raw.get("layers", [])
    if not isinstance(layers, list):
        raise UsageError(f"{where}.layers: must be an array of tables ([[steps.layers]]) with 'match'")
    for j, o in enumerate(layers):
        w = f"{where}.layers[{j}]"
        if not isinstance(o, dict) or not isinstance(o.get("match"), str):
            raise UsageError(f"{w}: needs 'match', a regex on node names")
        check_regex(o["match"], f"{w}.match")
        skip = o.get("skip", False)
        if not isinstance(skip, bool):
            raise UsageError(f"{w}.skip: must be true or false")
        opts = {k: v for k, v in o.items() if k not in OVERRIDE_KEYS}
        if skip and opts:
            raise UsageError(f"{w}: 'skip = true' takes no options (got {', '.join(sorted(opts))})")
        allowed = plug.per_layer_options
        if allowed is not None and set(opts) - set(allowed):
            raise UsageError(f"{w}: plugin '{plug.name}' applies {', '.join(sorted(set(opts) - set(allowed)))} to the "
                             "whole model; per layer it takes " + (", ".join(allowed) + " or " if allowed else "")
                             + "skip = true")
        _check_options(plug, {**options, **opts}, w, exclusive_over=options, override=opts)
        overrides.append(LayerOverride(o["match"], opts, skip))
    return Step(name, options, select, overrides)


def _check_options(plug, options: dict[str, Any], where: str, exclusive_over: dict | None = None,
                   override: dict | None = None) -> None:
    from surgeon.plugin import option_fields
    valid = {f.name for f in option_fields(plug)}
    bad = sorted(set(override if override is not None else options) - valid)
    if bad:
        raise UsageError(f"{where}.{bad[0]}: plugin '{plug.name}' has no option '{bad[0]}'; valid options: "
                         f"{', '.join(sorted(valid)) or '(none)'}")
    if override is not None and exclusive_over is not None:
        from surgeon.engine import merge_options
        options = merge_options(plug, exclusive_over, override)
    try:
        plug.make_options(options)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def check_regex(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise UsageError(f"{where}: must be a string (a regex on node names)")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{where}: bad regex {pattern!r}: {exc}") from None


def check_patterns(recipe: Recipe, names: list[str]) -> list[str]:
    """Warnings for patterns that match no node of the model."""
    warnings = []
    for i, s in enumerate(recipe.steps):
        if s.select and not any(re.search(s.select, n) for n in names):
            # (--layers on the command line is the step's select)
            warnings.append(f"{recipe.source}: steps[{i}].select (--layers) {s.select!r} matches no node of the model")
        for j, o in enumerate(s.overrides):
            if not any(re.search(o.match, n) for n in names):
                warnings.append(f"{recipe.source}: steps[{i}].layers[{j}].match {o.match!r} matches no node")
    return warnings


def dumps(recipe: Recipe, header: str = "") -> str:
    """The recipe as TOML text (what `surgeon plan` writes)."""
    import tomli_w
    text = tomli_w.dumps(recipe.to_toml())
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n" + text
    return text
