"""Accuracy-aware fallback: keep the fewest nodes in float until a drift/agreement budget holds.

1. Rank the quantized nodes by how much they hurt. With few candidates (<= `probe_limit`) each
   one is left in float on its own and the drift is measured (exact, one quantization each);
   with many, the rank is the relative L2 error each node adds to its output over the error
   already present at its inputs (one float and one quantized run, matched by node name).
2. Leave the top-k in float for k = 1, 2, 4, ... until the budget holds, then bisect for the
   smallest such k.
3. Try putting each chosen node back (least harmful first); keep it quantized when the budget
   still holds. What remains is the fallback list.
Every trial model is measured on the same data, so the list is checked, not estimated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import onnx

log = logging.getLogger(__name__)

Metrics = dict[str, float]
PRUNE_LIMIT = 16  # beyond this many nodes, putting each back costs more trials than it is worth


@dataclass
class Budget:
    max_drift: float | None = None
    min_agreement: float | None = None

    def holds(self, m: Metrics) -> bool:
        if self.max_drift is not None and m["rel_l2"] > self.max_drift:
            return False
        if self.min_agreement is not None and m.get("top1_agreement", 0.0) < self.min_agreement:
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.max_drift is not None:
            parts.append(f"relative L2 drift <= {self.max_drift:g}")
        if self.min_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_agreement:g}")
        return " and ".join(parts)


@dataclass
class FallbackResult:
    kept_float: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    ranking: list[tuple[str, float]] = field(default_factory=list)
    ranking_method: str = ""
    before: Metrics = field(default_factory=dict)
    after: Metrics = field(default_factory=dict)
    met: bool = True
    trials: int = 0
    ms_lost: dict[str, float] = field(default_factory=dict)  # measured float cost per candidate


class Trials:
    """Quantize-and-measure with memoization on the set of nodes kept in float."""

    def __init__(self, quantize: Callable[[frozenset[str]], onnx.ModelProto],
                 measure: Callable[[onnx.ModelProto], Metrics], tick: Callable[[str], None] | None = None) -> None:
        self.quantize = quantize
        self.measure = measure
        self.tick = tick or (lambda _d: None)
        self.memo: dict[frozenset[str], tuple[onnx.ModelProto, Metrics]] = {}

    def __call__(self, kept: frozenset[str]) -> tuple[onnx.ModelProto, Metrics]:
        if kept not in self.memo:
            self.tick(f"trying {len(kept)} node(s) in float")
            model = self.quantize(kept)
            self.memo[kept] = (model, self.measure(model))
        return self.memo[kept]


def rank_by_probe(candidates: list[str], trials: Trials, base: Metrics) -> list[tuple[str, float]]:
    """Drift reduction when each node alone stays in float (larger = hurts more when quantized)."""
    scores = []
    for name in candidates:
        _, m = trials(frozenset([name]))
        scores.append((name, base["rel_l2"] - m["rel_l2"]))
    return sorted(scores, key=lambda t: (-t[1], t[0]))


def rank_by_added_error(candidates: list[str], node_error: dict[str, float],
                        inputs_of: dict[str, list[str]]) -> list[tuple[str, float]]:
    """Error a node adds: its output's relative error minus the largest at the nodes feeding it."""
    scores = []
    for name in candidates:
        if name not in node_error:
            continue
        upstream = [node_error[p] for p in inputs_of.get(name, []) if p in node_error]
        scores.append((name, node_error[name] - (max(upstream) if upstream else 0.0)))
    return sorted(scores, key=lambda t: (-t[1], t[0]))


def per_millisecond(ranking: list[tuple[str, float]], ms_lost: dict[str, float],
                    floor_ms: float = 0.005) -> list[tuple[str, float]]:
    """The ranking re-ordered by drift gained per millisecond lost: score / max(ms, floor_ms).
    A node whose cost was not measured is charged the median measured cost; nodes whose float
    version helps nothing (score <= 0) go last, in their old order."""
    known = [v for v in ms_lost.values()]
    typical = float(sorted(known)[len(known) // 2]) if known else 1.0
    helps = [(n, s / max(ms_lost.get(n, typical), floor_ms)) for n, s in ranking if s > 0]
    rest = [(n, 0.0) for n, s in ranking if s <= 0]
    return sorted(helps, key=lambda t: (-t[1], t[0])) + rest


def search(order: list[str], trials: Trials, budget: Budget, fixed: frozenset[str] = frozenset()) -> tuple[list[str], bool]:
    """Smallest prefix of `order` that meets the budget (grow by doubling, then bisect), then
    prune it by putting nodes back one at a time."""
    def ok(k: int) -> bool:
        return budget.holds(trials(fixed | frozenset(order[:k]))[1])

    if not order:
        return [], ok(0)
    hi = 1
    while hi < len(order) and not ok(hi):
        hi *= 2
    hi = min(hi, len(order))
    if not ok(hi):
        return list(order), False
    lo = hi // 2  # ok(lo) is False (or lo == 0, the unmodified start)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    chosen = list(order[:hi])
    for name in reversed(list(chosen) if len(chosen) <= PRUNE_LIMIT else []):  # least harmful first
        if len(chosen) == 1:
            break
        trial = [n for n in chosen if n != name]
        if budget.holds(trials(fixed | frozenset(trial))[1]):
            chosen = trial
    return chosen, True
