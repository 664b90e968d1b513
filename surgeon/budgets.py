"""Budgets: what a candidate model must meet to pass the gate, and the verdict on each.

One name, one meaning, on every command (`apply`, `validate`, `gate`) and in a recipe's
`[gate]` table or `[tool.surgeon.gate]` of pyproject.toml:

    max_drift          worst relative L2 drift of any output            <= budget
    min_agreement      top-1 agreement with the original (0..1)         >= budget
    min_accuracy       accuracy on the data's labels (0..1)             >= budget
    max_latency_ratio  candidate / original latency (median of pairs)   <= budget
    max_size_mb        candidate file size in MB (10^6 bytes)           <= budget

A verdict is a field, not a message: `pass`, `fail` or `inconclusive` (a latency ratio whose
confidence interval straddles the budget). Non-finite outputs (NaN / Inf) fail every budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import onnx

from surgeon.errors import UsageError
from surgeon.validate import discrete

Status = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class Budgets:
    max_drift: float | None = None
    min_agreement: float | None = None
    min_accuracy: float | None = None
    max_latency_ratio: float | None = None
    max_size_mb: float | None = None

    # name -> (allowed range as text, check)
    RANGES = {
        "max_drift": ("a number > 0", lambda v: v > 0),
        "min_agreement": ("a fraction in (0, 1], e.g. 0.99 for 99%", lambda v: 0 < v <= 1),
        "min_accuracy": ("a fraction in (0, 1], e.g. 0.95 for 95%", lambda v: 0 < v <= 1),
        "max_latency_ratio": ("a number > 0 (candidate / original; 1.0 = no slower)", lambda v: v > 0),
        "max_size_mb": ("a number > 0 (megabytes)", lambda v: v > 0),
    }

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "budgets") -> "Budgets":
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise UsageError(f"{where}: unknown budget(s) {', '.join(unknown)}; budgets: {', '.join(cls.names())}")
        checked = {}
        for k, v in values.items():
            if v is None:
                continue
            allowed, ok = cls.RANGES[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise UsageError(f"{where}: {k} = {v!r} is out of range; it must be {allowed}")
            checked[k] = float(v)
        return cls(**checked)

    def merged(self, *lower: "Budgets") -> "Budgets":
        """These budgets, filled in from lower-priority sources where unset."""
        out = {n: getattr(self, n) for n in self.names()}
        for other in lower:
            for n in self.names():
                if out[n] is None:
                    out[n] = getattr(other, n)
        return Budgets(**out)

    def any(self) -> bool:
        return any(getattr(self, n) is not None for n in self.names())

    def to_json(self) -> dict[str, float]:
        return {n: getattr(self, n) for n in self.names() if getattr(self, n) is not None}


def from_pyproject(start: Path | None = None) -> tuple[Budgets, str | None]:
    """`[tool.surgeon.gate]` of the nearest pyproject.toml at or above `start` (the cwd)."""
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        p = folder / "pyproject.toml"
        if p.is_file():
            try:
                doc = tomllib.loads(p.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
                raise UsageError(f"{p}: cannot read it for [tool.surgeon.gate] ({exc})") from None
            table = doc.get("tool", {}).get("surgeon", {}).get("gate")
            if table is None:
                return Budgets(), None
            if not isinstance(table, dict):
                raise UsageError(f"{p}: [tool.surgeon.gate] must be a table of budgets")
            return Budgets.from_mapping(table, where=f"{p}: [tool.surgeon.gate]"), str(p)
    return Budgets(), None


@dataclass
class Check:
    """The verdict on one budget."""

    name: str
    value: float | None
    budget: float
    status: Status
    margin: float | None  # how far inside the budget (negative: outside)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "budget": self.budget, "status": self.status,
                "margin": self.margin, "detail": self.detail}


def unmeasurable(budgets: Budgets, *, latency: bool, labels: bool) -> list[str]:
    """Budgets that this run cannot measure (an error before any work, never a silent pass)."""
    out = []
    if budgets.max_latency_ratio is not None and not latency:
        out.append("max_latency_ratio needs the latency measurement (drop --no-latency)")
    if budgets.min_accuracy is not None and not labels:
        out.append("min_accuracy needs labels in the data (an array named by --labels in the --data .npz)")
    return out


def may_have_scores(model) -> bool:
    """Whether some graph output has an agreement, from the declared types and shapes: class
    scores (N, C) with C > 1, or an integer output (labels); an output of unknown rank might
    be scores; a (T, N, C) sequence or a feature map is not."""
    for o in model.graph.output:
        if not o.type.HasField("tensor_type"):
            continue
        t = o.type.tensor_type
        if t.elem_type and discrete(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)):
            return True
        if not t.HasField("shape"):
            return True
        dims = t.shape.dim
        if len(dims) == 2 and not (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
            return True
    return False


AGREEMENT_UNMEASURABLE = ("min_agreement cannot be measured: no output of the model looks like class scores (N, C) "
                          "or labels (an integer output); use max_drift")


def evaluate(budgets: Budgets, validation: dict[str, Any], size_bytes: int | None) -> list[Check]:
    """Verdicts for every budget that is set, from a validation report (Validation.to_json())."""
    checks: list[Check] = []
    broken = _non_finite(validation)

    def add(name: str, value: float | None, budget: float, upper: bool, detail: str = "") -> None:
        if broken:
            checks.append(Check(name, value, budget, "fail", None, broken))
            return
        if value is None or not math.isfinite(value):
            checks.append(Check(name, value, budget, "fail", None, detail or "not measured"))
            return
        margin = (budget - value) if upper else (value - budget)
        checks.append(Check(name, value, budget, "pass" if margin >= 0 else "fail", margin, detail))

    if budgets.max_drift is not None:
        floats = [m for m in (validation.get("outputs") or {}).values() if not m.get("discrete")]
        add("max_drift", validation.get("worst_rel_l2"), budgets.max_drift, True,
            "" if floats or not validation.get("outputs") else
            "every output is integer (labels, ids): no rel. L2 to measure; use min_agreement")
    if budgets.min_agreement is not None:
        value = validation.get("top1_agreement")
        if value is None and not broken:
            raise UsageError(AGREEMENT_UNMEASURABLE)
        add("min_agreement", value, budgets.min_agreement, False, _agreement_detail(validation))
    if budgets.min_accuracy is not None:
        acc = validation.get("accuracy") or {}
        if not acc and not broken:
            raise UsageError("min_accuracy cannot be measured: the data has no labels for a class-score output")
        add("min_accuracy", acc.get("candidate"), budgets.min_accuracy, False,
            f"original {acc['original']:.2%}" if acc.get("original") is not None else "")
    if budgets.max_latency_ratio is not None:
        checks.append(_latency_check(budgets.max_latency_ratio, validation.get("latency"), broken))
    if budgets.max_size_mb is not None:
        add("max_size_mb", None if size_bytes is None else size_bytes / 1e6, budgets.max_size_mb, True)
    return checks


def _latency_check(budget: float, lat: dict[str, Any] | None, broken: str) -> Check:
    if broken:
        return Check("max_latency_ratio", None, budget, "fail", None, broken)
    if not lat or not lat.get("ratio"):
        return Check("max_latency_ratio", None, budget, "fail", None, "latency not measured")
    ratio = lat["ratio"]
    lo, hi = lat.get("ratio_low", ratio), lat.get("ratio_high", ratio)
    detail = f"95% interval {lo:.3f}-{hi:.3f} over {lat['candidate']['runs']} interleaved pairs"
    if hi <= budget:
        status: Status = "pass"
    elif lo > budget:
        status = "fail"
    else:
        status = "inconclusive"
        detail += " straddles the budget"
    return Check("max_latency_ratio", ratio, budget, status, budget - ratio, detail)


def _agreement_detail(v: dict[str, Any]) -> str:
    outputs = v.get("outputs", {}).values()
    counted = [m["agreement_rows"] for m in outputs if m.get("agreement_rows") is not None and not m.get("discrete")]
    if counted:
        return f"over {min(counted)} rows with a unique top-1"
    return "equal values of the integer outputs" if any(m.get("discrete") for m in outputs) else ""


def _non_finite(v: dict[str, Any]) -> str:
    bad = [name for name, m in v.get("outputs", {}).items() if m.get("non_finite")]
    return f"non-finite outputs (NaN/Inf) in {', '.join(bad)}" if bad else ""


def verdict(checks: list[Check]) -> Status:
    if any(c.status == "fail" for c in checks):
        return "fail"
    if any(c.status == "inconclusive" for c in checks):
        return "inconclusive"
    return "pass"
