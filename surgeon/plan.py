"""`surgeon plan`: per-layer ratios with the largest measured latency reduction within a budget.

1. Curves (surgeon.sweep.per_layer): each candidate layer alone at each ratio of a grid, the
   rest untouched: its drift d_l(r), agreement and accuracy on the evaluation rows, and the
   milliseconds it saves, s_l(r), timed alone against the original node at its real shape
   (the latency guard's measurement; for a whole-model plugin, A/B of the whole model with
   only that layer changed). Settings that save no time are dropped.
2. Greedy path: from the untouched model, repeatedly take the move (one layer to a stronger
   setting) with the smallest drift cost per millisecond saved, (d_l(r') - d_l(r)) /
   (s_l(r') - s_l(r)), until every layer is at its strongest useful setting (or the
   `--target` on predicted MACs or latency is reached). Predicted effects of several layers:
   drifts add in quadrature, sqrt(sum_l d_l^2) (the output errors of different layers are
   roughly uncorrelated), disagreement sum_l (1 - agreement_l) and accuracy loss likewise
   (upper bounds).
3. Cut: the longest prefix of the path whose predicted effects stay within the budget.
4. Correction, measured end to end (`_correct`): the cut is verified on the evaluation rows,
   together with the uniform plans (every layer at one ratio). A bracket search along the path
   finds its longest prefix that passes: failing prefixes back off the layers added last (the
   costliest per ms); each probe aims where the prediction, rescaled by the last measurement,
   meets the budget. Then single moves from the best passing plan, cheapest first, each
   verified end to end (a move that fails is not tried again, nor anything stronger for that
   layer), until `max_verifications` rounds are spent.
5. Measured choice: every uniform plan that passed end to end is timed A/B against the plan
   and replaces it when it is measurably faster (per-layer savings timed alone do not add up
   inside the model, so the prediction can rank them wrong).
6. The final plan is built through the pipeline exactly as `surgeon apply --recipe` builds it
   and validated end to end (drift, agreement, accuracy, interleaved A/B latency); each
   chosen layer's measured effect in the final model is the drift/agreement change when that
   layer alone is put back (leave-one-out).

The plan is scored on the evaluation rows it was chosen on (like a gate would be): a
separate hold-out set, passed to `surgeon gate`, says how well it generalizes.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from surgeon import pipeline, recipe as _recipe
from surgeon.budgets import Budgets
from surgeon.calibration import DataSplit
from surgeon.errors import UsageError
from surgeon.sweep import (RATIO_REMOVES, Setup, SweepOptions, check_ratios, compression_order, kept_label,
                           layer_pattern, measure_ab, per_layer, setup)
from surgeon.sweep_backends import Config, make_backend
from surgeon.plugin import option_fields, registry

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

BUDGET_FORMS = {("agreement", ">="): "min_agreement", ("drift", "<="): "max_drift", ("accuracy", ">="): "min_accuracy"}
DEFAULT_RATIOS = {"keep": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75], "remove": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]}


def parse_budget(text: str) -> Budgets:
    """`agreement>=0.99`, `drift<=0.05`, `accuracy>=0.95`; several joined by commas."""
    values: dict[str, float] = {}
    for part in re.split(r"\s*(?:,|\band\b)\s*", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=)\s*([0-9.eE+-]+)\s*(%?)\s*", part)
        name = BUDGET_FORMS.get((m.group(1), m.group(2))) if m else None
        if name is None:
            raise UsageError(f"bad --budget {part!r}: use agreement>=A, drift<=D or accuracy>=A "
                             "(fractions, e.g. agreement>=0.99), joined by commas")
        try:
            v = float(m.group(3)) / (100 if m.group(4) else 1)
        except ValueError:
            raise UsageError(f"bad --budget {part!r}: {m.group(3)!r} is not a number") from None
        if name in values:
            raise UsageError(f"--budget sets {m.group(1)} twice")
        values[name] = v
    if not values:
        raise UsageError("--budget is empty; e.g. agreement>=0.99")
    return Budgets.from_mapping(values, where="--budget")


def parse_target(text: str | None) -> tuple[str, float] | None:
    """`macs=0.5` or `latency=0.6`: the fraction of the original to reach (then stop compressing)."""
    if not text:
        return None
    what, sep, value = text.partition("=")
    what = what.strip()
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not sep or what not in ("macs", "latency") or not (0 < v < 1):
        raise UsageError(f"bad --target {text!r}: use macs=F or latency=F with F in (0, 1), the fraction of "
                         "the original to reach")
    return what, v


@dataclass
class PlanOptions:
    plugin: str
    budgets: Budgets
    ratios: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    layers: str | None = None
    target: tuple[str, float] | None = None
    workers: int = 1
    backend: str = "processes"
    address: str | None = None
    latency_local: bool = False
    max_verifications: int = 12
    latency_budget_s: float = 3.0
    compare_uniform: bool = False
    attribution: bool = True  # leave-one-out effect of each chosen layer in the final model


@dataclass
class Option:
    """One setting of one layer, measured alone."""

    ratio: float
    drift: float
    disagreement: float
    accuracy_loss: float
    saved_ms: float
    macs_saved: int
    ranks: str
    has_agreement: bool = True  # False when no output looks like class scores (disagreement is then 0)


@dataclass
class PlanResult:
    model: str
    plugin: str
    budgets: dict[str, float]
    target: tuple[str, float] | None
    choices: list[dict[str, Any]]
    predicted: dict[str, Any]
    verifications: list[dict[str, Any]]
    final: dict[str, Any]
    checks: list[dict[str, Any]]
    status: str
    recipe: _recipe.Recipe
    curves: list[dict[str, Any]]
    timings: list[dict[str, Any]]
    original: dict[str, Any]
    uniform: list[dict[str, Any]] = field(default_factory=list)
    best_uniform: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pipeline_result: Any = None

    def recipe_text(self) -> str:
        lines = [f"surgeon plan: {self.plugin} on {Path(self.model).name}, budget "
                 + ", ".join(f"{k} {v:g}" for k, v in self.budgets.items()),
                 f"status: {self.status}; apply with: surgeon apply MODEL --recipe THIS_FILE --data ... (same data)"]
        for c in self.choices:
            lines.append(f"{c['layer']}: ratio {c['ratio']:g} ({kept_label(self.plugin)} {c['ranks'] or '-'}), predicted drift "
                         f"{c['predicted_drift']:.4g}, saves {c['predicted_saved_ms']:.4g} ms alone")
        return _recipe.dumps(self.recipe, header="\n".join(lines))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "plugin": self.plugin, "budgets": self.budgets, "target": self.target,
                "status": self.status, "choices": self.choices, "predicted": self.predicted,
                "verifications": self.verifications, "final": self.final, "checks": self.checks,
                "original": self.original, "uniform": self.uniform, "best_uniform": self.best_uniform,
                "recipe": self.recipe.to_toml(), "curves": self.curves, "timings": self.timings,
                "data": self.data, "notes": self.notes}


class _Budget:
    """The budget as allowed losses, and a prediction's use of it (1.0 = exactly at the budget)."""

    def __init__(self, b: Budgets, original_accuracy: float | None) -> None:
        self.original_accuracy = original_accuracy
        self.limits: dict[str, float] = {}
        if b.max_drift is not None:
            self.limits["drift"] = b.max_drift
        if b.min_agreement is not None:
            self.limits["disagreement"] = max(1.0 - b.min_agreement, 0.0)
        if b.min_accuracy is not None:
            if original_accuracy is None:
                raise UsageError("an accuracy budget needs labels in the --data file")
            self.limits["accuracy_loss"] = max(original_accuracy - b.min_accuracy, 0.0)

    def use(self, pred: dict[str, float]) -> float:
        out = 0.0
        for k, lim in self.limits.items():
            out = max(out, pred[k] / lim if lim > 0 else (math.inf if pred[k] > 1e-12 else 0.0))
        return out

    def measured(self, row: dict[str, Any]) -> float | None:
        """The budget use of an end-to-end measurement (None when it failed to run)."""
        if row.get("error") or row.get("drift") is None:
            return None
        agreement, accuracy = row.get("agreement"), row.get("accuracy")
        return self.use({"drift": row["drift"], "disagreement": 1.0 - agreement if agreement is not None else 0.0,
                         "accuracy_loss": (self.original_accuracy - accuracy) if accuracy is not None and
                         self.original_accuracy is not None else 0.0})

    @staticmethod
    def meets(b: Budgets, row: dict[str, Any]) -> bool:
        if row.get("error") or row.get("drift") is None:
            return False
        if b.max_drift is not None and not row["drift"] <= b.max_drift:
            return False
        if b.min_agreement is not None and not (row.get("agreement") is not None and row["agreement"] >= b.min_agreement):
            return False
        if b.min_accuracy is not None and not (row.get("accuracy") is not None and row["accuracy"] >= b.min_accuracy):
            return False
        return True


def make_plan(model: str | Path | onnx.ModelProto, popts: PlanOptions, run_opts: pipeline.RunOptions | None = None,
              progress: Progress | None = None, *, split: DataSplit | None = None) -> PlanResult:
    """Search per-layer settings (see the module docstring); writes nothing."""
    run_opts = run_opts or pipeline.RunOptions()
    tick = progress or (lambda what, done, total: None)
    plug = registry().get(popts.plugin)
    if "ratio" not in {f.name for f in option_fields(plug)}:
        raise UsageError(f"plugin '{plug.name}' has no per-layer ratio to plan; plan works with tucker, svd and prune")
    b = popts.budgets
    if b.max_drift is None and b.min_agreement is None and b.min_accuracy is None:
        raise UsageError("--budget is required: agreement>=A, drift<=D or accuracy>=A")
    ratios = popts.ratios or DEFAULT_RATIOS["remove" if plug.name in RATIO_REMOVES else "keep"]
    check_ratios(plug.name, ratios)
    if popts.max_verifications < 1:
        raise UsageError(f"--max-verifications must be >= 1, got {popts.max_verifications}")
    parallel = popts.workers > 1 or popts.backend == "ray"
    threads = 1 if parallel else run_opts.threads
    backend = make_backend(popts.backend, popts.workers, popts.address, popts.latency_local)
    tick("loading", 0, 1)
    st = setup(model, plug.name, popts.options, run_opts, eval_threads=threads, parallel=parallel, split=split)
    if not st.original_metrics["has_drift"]:  # the plan ranks layers by their measured drift
        raise UsageError("plan needs a float output to measure drift on, and every output of this model is "
                         "integer (labels, ids); export it with its scores as an output too")
    if b.min_accuracy is not None and st.original_metrics["accuracy"] is None:
        raise UsageError("an accuracy budget needs labels in the --data file")
    if b.min_agreement is not None and st.original_metrics["agreement"] is None:  # before the per-layer sweep
        raise UsageError("an agreement budget needs an output that looks like class scores (N, C); "
                         "this model has none: use drift<=D")
    sopts = SweepOptions(plug.name, ratios, popts.options, popts.layers, per_layer=True, workers=popts.workers,
                         backend=popts.backend)
    budget = _Budget(b, st.original_metrics["accuracy"])
    notes: list[str] = []
    with backend:
        backend.start(st.payload)
        curves, timings = per_layer(st, backend, sopts, run_opts, tick)
        options = _options(st, curves, timings, ratios)
        tick("timing the original (alone)", 0, 1)
        lat, _ = backend.timed(measure_ab, st.payload.model, st.payload.model, st.split.eval.first_batch(run_opts.batch),
                               run_opts.threads, 1.0)
        base_ms = lat["original_ms"]
        path = _greedy_path(options, popts.target, st, base_ms, budget)
        cut = _predicted_cut(path, budget, options)
        verifications: list[dict[str, Any]] = []

        def verify(states: list[dict[str, float]], why: str) -> list[dict[str, Any]]:
            configs = [_config(st, s, f"{why} {i}") for i, s in enumerate(states)]
            rows = backend.map(configs, tick, f"verifying end to end ({why})")
            for s, row in zip(states, rows):
                row["plan"] = dict(s)
                row["meets"] = _Budget.meets(b, row)
                row["why"] = why
                verifications.append({k: v for k, v in row.items() if k not in ("layers",)})
            return rows

        seeds = [{n: r for n, opts in options.items() if any(o.ratio == r for o in opts)} for r in ratios]
        state, passed = _correct(path, cut, verify, options, popts, max(1, popts.workers), budget, seeds)
        if not passed:
            notes.append("no plan met the budget end to end, not even one layer; the plan leaves the model as it is")
        rivals = [(r, s) for r, s in zip(ratios, seeds) if s and s != state and any(
            v["meets"] and v["plan"] == s for v in verifications)]
        if state and rivals and run_opts.latency:
            state, why = _fastest_measured(st, state, rivals, run_opts, popts, tick)
            if why:
                notes.append(why)
        uniform_rows: list[dict[str, Any]] = []
        if popts.compare_uniform:
            cfgs = [Config(f"uniform {r:g}", {**st.base, "ratio": r}, popts.layers) for r in ratios]
            uniform_rows = backend.map(cfgs, tick, "uniform ratios")
            for r, row in zip(ratios, uniform_rows):
                row.update(ratio=r, meets=_Budget.meets(b, row))
        attribution = _attribution(st, state, backend, tick) if popts.attribution and state else {}

    rec = to_recipe(st, state, b)
    tick("final check", 0, 1)
    final_opts = pipeline.RunOptions(**{**run_opts.__dict__, "validate": True, "latency": True, "step_metrics": False})
    if split is None:
        final = pipeline.run(st.original, rec.steps, final_opts, b, progress=None)
    else:
        final = _run_with_split(st, rec, final_opts, b, split)
    tick("final check", 1, 1)
    best_uniform = None
    if uniform_rows:
        best_uniform = _best_uniform(st, uniform_rows, run_opts, popts, tick)
    choices = _choices(options, state, attribution)
    predicted = _predict(options, state)
    if base_ms:
        predicted["latency_ms_original"] = base_ms
        predicted["latency_ratio"] = (base_ms - predicted["saved_ms"]) / base_ms
    v = final.validation or {}
    edge = _edge_note(b, v)
    if edge:
        notes.append(edge)
    final_doc = {"validation": v, "params": final.steps[0].surgery.after.total_params,
                 "macs": final.steps[0].surgery.after.total_macs, "rewritten": [l.layer for l in final.steps[0].surgery.rewritten]}
    return PlanResult(st.source, plug.name, b.to_json(), popts.target, choices, predicted, verifications, final_doc,
                      [c.to_json() for c in final.outcome.checks], final.status, rec,
                      _rows(curves), timings, st.original_metrics, [_slim(r) for r in uniform_rows], best_uniform,
                      st.split.to_json(), notes + final.warnings, final)


def _fastest_measured(st: Setup, state: dict[str, float], rivals: list[tuple[float, dict[str, float]]],
                      run_opts: pipeline.RunOptions, popts: PlanOptions, tick) -> tuple[dict[str, float], str]:
    """The plan, or a uniform plan that met the budget end to end and runs measurably faster.

    The search ranks plans by predicted milliseconds, the savings of each layer timed alone; inside
    the model they do not add up (on the sample CNN the predicted latency ratio was 0.32-0.40 and
    the measured 0.66-0.88), so it can prefer a plan that runs slower than a uniform ratio it
    verified (measured there: 0.635 against 0.608). Each such uniform plan is timed against the
    plan (interleaved pairs) and replaces it only when the 95% interval of
    t_uniform / t_plan lies below 1: a tie keeps the plan."""
    import dataclasses

    from surgeon.sweep_backends import Evaluator

    evaluator = Evaluator(st.payload)
    feed = st.split.eval.first_batch(run_opts.batch)

    def build(s: dict[str, float], key: str) -> bytes:
        return evaluator.evaluate(dataclasses.replace(_config(st, s, key), keep_model=True))["model"]

    best, best_model, why = state, build(state, "plan"), ""
    for i, (ratio, s) in enumerate(rivals):
        tick("timing the plan against the uniform ratios that met the budget", i, len(rivals))
        model = build(s, f"uniform {ratio:g}")
        ab = measure_ab(best_model, model, feed, run_opts.threads, popts.latency_budget_s)
        if ab["ratio_high"] < 1.0:
            best, best_model = s, model
            why = (f"uniform ratio {ratio:g} ran faster than the searched plan end to end (time ratio "
                   f"{ab['ratio']:.3f}, 95% interval {ab['ratio_low']:.3f}-{ab['ratio_high']:.3f}): the plan is that "
                   "uniform ratio")
    return best, why


def _run_with_split(st: Setup, rec: _recipe.Recipe, opts: pipeline.RunOptions, b: Budgets, split: DataSplit):
    """pipeline.run for data given as arrays (benchmarks): the same steps, validation and budgets."""
    from surgeon import budgets as _budgets
    from surgeon import engine
    from surgeon.pipeline import Outcome, PipelineResult, StepReport, _validate, reproduce_info
    step = rec.steps[0]
    names = [n.name for n in st.prepared.graph.node]
    per, skip = step.layer_options(names)
    res = engine.apply(st.prepared, st.plugin, dict(step.options), layers=step.select, per_layer=per, skip=skip,
                       data=split.calib, input_shapes=st.shapes, threads=opts.threads, seed=opts.seed, prepared=True)
    outcome = Outcome()
    validation, outcome.not_validated = _validate(st.original, res.model, split, opts, lambda *a: None, st.source)
    outcome.checks = _budgets.evaluate(b, validation, res.model.ByteSize()) if validation else []
    return PipelineResult(st.source, st.original, res.model, [StepReport(step, res)], split, b, validation, outcome,
                          reproduce_info(st.original, rec.steps, opts, split))


# --- the search ------------------------------------------------------------------------------------

def _options(st: Setup, curves: list[dict[str, Any]], timings: list[dict[str, Any]],
             ratios: list[float]) -> dict[str, list[Option]]:
    """Per layer, its useful settings from mildest to strongest: measured alone and saving time.
    A setting that breaks the budget alone stays an option: effects need not add up. With
    data-aware sequential fits the layers after it are fitted to undo its error (on the sample
    CNN conv2 at 0.25 drifts 0.061 alone, every conv at 0.25 together 0.045), so only an
    end-to-end check can rule it out. The predicted cut never holds one (a plan's predicted
    drift is at least each layer's own); the bracket search and the single moves reach them."""
    saved = {(t["layer"], t["ratio"]): t for t in timings}
    orig_acc = st.original_metrics["accuracy"]
    order = compression_order(st.plugin.name, ratios)
    out: dict[str, list[Option]] = {}
    for row in curves:
        out.setdefault(row["layer"], [])
    for name in out:
        for r in order:
            row = next((c for c in curves if c["layer"] == name and c["ratio"] == r), None)
            t = saved.get((name, r))
            if row is None or not row.get("applied") or row.get("error") or t is None or t["saved_ms"] <= 0:
                continue
            if t.get("verdict") == "slower":
                continue
            d = (row.get("layers") or {}).get(name, {})
            macs_saved = (st.original_metrics["macs"] - row["macs"]) if row.get("macs") is not None and \
                st.original_metrics["macs"] is not None else 0
            ranks = f"{d['R1']},{d['R2']}" if "R1" in d else str(d.get("rank", d.get("channels_after", "")))
            out[name].append(Option(r, row["drift"], 1.0 - (row["agreement"] if row.get("agreement") is not None else 1.0),
                                    (orig_acc - row["accuracy"]) if orig_acc is not None and row.get("accuracy") is not None
                                    else 0.0, t["saved_ms"], macs_saved, ranks, row.get("agreement") is not None))
    return {k: v for k, v in out.items() if v}


def _effects(o: Option) -> dict[str, float]:
    return {"drift": o.drift, "disagreement": o.disagreement, "accuracy_loss": o.accuracy_loss}


def _predict(options: dict[str, list[Option]], state: dict[str, float]) -> dict[str, Any]:
    chosen = [next(o for o in options[n] if o.ratio == r) for n, r in state.items()]
    disagreement = sum(o.disagreement for o in chosen)
    # the layers' top-1 losses add up (a first-order guess): past 100% it says no more than "none
    # left" (shown as 1 - sum, EfficientNet-Lite0's 28-layer plan read -469%)
    agreement = max(0.0, 1.0 - disagreement) if chosen and all(o.has_agreement for o in chosen) else None
    return {"drift": math.sqrt(sum(o.drift ** 2 for o in chosen)), "disagreement": disagreement,
            "agreement": agreement, "accuracy_loss": sum(o.accuracy_loss for o in chosen),
            "saved_ms": sum(o.saved_ms for o in chosen), "macs_saved": sum(o.macs_saved for o in chosen)}


def _greedy_path(options: dict[str, list[Option]], target: tuple[str, float] | None, st: Setup,
                 base_ms: float | None, budget: "_Budget | None" = None) -> list[dict[str, float]]:
    """States from untouched to strongest, one move at a time by cost per ms saved. The cost is
    the share of the budget the move uses alone, in the budget's own measure (top-1
    disagreement for an agreement budget), with the drift as a tie-break: disagreement on a few
    dozen rows moves in steps, so many moves would otherwise cost exactly 0; without a budget,
    the drift."""

    def cost(o: Option | None) -> float:
        if o is None:
            return 0.0
        return o.drift if budget is None else budget.use(_effects(o)) + 0.01 * o.drift

    state: dict[str, float] = {}
    level: dict[str, int] = {n: -1 for n in options}
    path = [dict(state)]
    while True:
        best = None
        for name, opts in options.items():
            cur = opts[level[name]] if level[name] >= 0 else None
            for j in range(level[name] + 1, len(opts)):
                o = opts[j]
                gain = o.saved_ms - (cur.saved_ms if cur else 0.0)
                if gain <= 0:
                    continue
                score = (cost(o) - cost(cur)) / gain
                if best is None or score < best[0]:
                    best = (score, name, j)
        if best is None:
            break
        _, name, j = best
        level[name] = j
        state[name] = options[name][j].ratio
        path.append(dict(state))
        if target is not None and _reached(options, state, target, st, base_ms):
            break
    return path


def _edge_note(b: Budgets, v: dict[str, Any]) -> str | None:
    """A warning when the drift budget lies inside the final drift's bootstrap interval over the
    evaluation rows. No warning is no guarantee: the search picks plans for passing on those
    rows, which biases them beyond the interval (ResNet-50, zoo, drift <= 0.8: 0.785, interval
    0.779-0.791 on the 8 rows it was verified on, 0.801 on 32 fresh ones)."""
    iv = v.get("worst_rel_l2_interval")
    if b.max_drift is None or not iv or not iv[0] <= b.max_drift <= iv[1]:
        return None
    return (f"the drift budget {b.max_drift:g} lies inside the final drift's 95% interval over the "
            f"{v.get('samples')} evaluation rows ({iv[0]:.4f}-{iv[1]:.4f}): on other data the plan may miss it; "
            "verify with more rows in --data, or plan to a lower budget for a margin")


def _reached(options, state, target, st: Setup, base_ms: float | None) -> bool:
    what, frac = target
    p = _predict(options, state)
    if what == "macs":
        macs = st.original_metrics["macs"]
        return bool(macs) and (macs - p["macs_saved"]) / macs <= frac
    if base_ms:
        return (base_ms - p["saved_ms"]) / base_ms <= frac
    return False


def _predicted_cut(path: list[dict[str, float]], budget: _Budget, options: dict[str, list[Option]]) -> int:
    """The last state of the path, from the start, whose predicted effects fit the budget."""
    cut = 0
    for k in range(1, len(path)):
        if budget.use(_predict(options, path[k])) > 1.0:
            break
        cut = k
    return cut


def _correct(path, cut, verify, options, popts: PlanOptions, width: int, budget: "_Budget",
             seeds: list[dict[str, float]] = ()) -> tuple[dict[str, float], bool]:
    """Verify end to end, at most `popts.max_verifications` rounds (a round verifies up to
    `width` plans in parallel).

    1. The predicted cut, and the seeds (every layer at one ratio of the grid: the uniform plans,
       restricted to settings that save time), so a plan is never worse than a uniform ratio
       the search could have tried.
    2. A bracket search along the greedy path for its longest prefix that passes: the shortest
       failing prefix bounds it from above (retreating from a failing cut backs off the layers
       added last, the costliest per ms), the longest passing one from below. The next probe is
       where the prediction, scaled by measured / predicted budget use at the last probe, reaches
       the budget: effects do not add up exactly, and one measurement corrects the scale.
    3. Single moves from the best passing plan, cheapest drift per ms first, each verified; a move
       that fails is not tried again, nor anything stronger for that layer."""
    if len(path) == 1:
        return {}, True  # nothing to choose from: the untouched model
    rounds = 0
    best: list = [None]  # (predicted ms saved, state) of the best plan that passed end to end

    def run(states: list[dict[str, float]], why: str) -> list[dict[str, Any]]:
        nonlocal rounds
        rows = verify(states, why) if states else []
        rounds += max(1, math.ceil(len(states) / width))
        for s, r in zip(states, rows):
            saved = _predict(options, s)["saved_ms"]
            if r["meets"] and (best[0] is None or saved > best[0][0]):
                best[0] = (saved, dict(s))
        return rows

    def predicted_use(k: int) -> float:
        return budget.use(_predict(options, path[k])) if path[k] else 0.0

    lo, hi = 0, len(path) - 1  # path[lo] passes (the empty plan does); path[hi + 1] fails
    first = [s for s in seeds if s and s != path[cut]]
    probes = [cut] if cut > 0 else ([1] if hi >= 1 else [])
    scale = 1.0
    while probes and rounds < popts.max_verifications:
        extra = first if rounds == 0 else []
        rows = run([path[p] for p in probes] + extra, "cut" if rounds == 0 else "bracket")
        for p, r in zip(probes, rows):
            if r["meets"]:
                lo = max(lo, p)
            else:
                hi = min(hi, p - 1)
        measured = [(p, budget.measured(r)) for p, r in zip(probes, rows)]
        p, m = max(measured, key=lambda pm: pm[0])
        if predicted_use(p) > 0 and m is not None and m > 0:
            scale = m / predicted_use(p)
        if lo >= hi:
            break
        aim = max((k for k in range(lo + 1, hi + 1) if scale * predicted_use(k) <= 1.0), default=lo + 1)
        probes = sorted({aim} | {lo + max(1, round((hi - lo) * (i + 1) / width)) for i in range(width - 1)})
        probes = [k for k in probes if lo < k <= hi][:width]
    if best[0] is None:
        return {}, False
    state = best[0][1]
    banned: dict[str, float] = {}  # layer -> the mildest ratio that failed
    while rounds < popts.max_verifications:
        moves, picked = [], set()
        for m in _moves(options, state, banned, budget):  # one move per layer and round
            if m[1] not in picked and len(moves) < width:
                moves.append(m)
                picked.add(m[1])
        if not moves:
            break
        trials = [{**state, name: o.ratio} for _, name, o in moves]
        rows = run(trials, "refine")
        for (_, name, o), r in zip(moves, rows):
            mildest = [x.ratio for x in options[name]].index
            if not r["meets"] and (name not in banned or mildest(o.ratio) < mildest(banned[name])):
                banned[name] = o.ratio
        state = best[0][1]
    return state, True


def _moves(options, state: dict[str, float], banned: dict[str, float],
           budget: "_Budget | None" = None) -> list[tuple[float, str, "Option"]]:
    """Every one-layer move to a stronger setting that saves more time, by drift cost per ms;
    settings that break the budget alone come after all the others (they pass only where the
    layers around them make up for them, and each try costs a verification round)."""
    out = []
    for name, opts in options.items():
        cur = next((o for o in opts if o.ratio == state.get(name)), None)
        start = opts.index(cur) + 1 if cur is not None else 0
        stop = len(opts)
        if name in banned:
            stop = min(stop, next((i for i, o in enumerate(opts) if o.ratio == banned[name]), stop))
        for o in opts[start:stop]:
            gain = o.saved_ms - (cur.saved_ms if cur else 0.0)
            if gain > 0:
                out.append(((o.drift - (cur.drift if cur else 0.0)) / gain, name, o))

    def over(o: Option) -> bool:
        return budget is not None and budget.use(_effects(o)) > 1.0

    return sorted(out, key=lambda m: (over(m[2]), m[0], m[1], m[2].ratio))


def _config(st: Setup, state: dict[str, float], key: str) -> Config:
    select = "|".join(layer_pattern(n) for n in sorted(state)) if state else "^$"
    return Config(key, dict(st.base), select, {n: {"ratio": r} for n, r in sorted(state.items())})


def _attribution(st: Setup, state: dict[str, float], backend, tick) -> dict[str, dict[str, Any]]:
    """Each chosen layer's effect in the final model: the plan with that layer put back."""
    full = backend.map([_config(st, state, "plan")], tick, "attribution")[0]
    names = sorted(state)
    rest = [_config(st, {k: v for k, v in state.items() if k != n}, f"without {n}") for n in names]
    rows = backend.map(rest, tick, "attribution (leave one out)")
    out = {}
    for n, row in zip(names, rows):
        if full.get("drift") is None or row.get("drift") is None:
            continue
        out[n] = {"drift": full["drift"] - row["drift"],
                  "agreement": (full["agreement"] - row["agreement"]) if full.get("agreement") is not None and
                  row.get("agreement") is not None else None}
    return out


def to_recipe(st: Setup, state: dict[str, float], b: Budgets) -> _recipe.Recipe:
    """The plan as a recipe: the chosen layers selected, each with its own ratio."""
    names = sorted(state)
    select = "|".join(layer_pattern(n) for n in names) if names else "^$"
    overrides = [_recipe.LayerOverride(layer_pattern(n), {"ratio": state[n]}) for n in names]
    return _recipe.Recipe([_recipe.Step(st.plugin.name, dict(st.base), select, overrides)], b.to_json())


def _choices(options, state, attribution) -> list[dict[str, Any]]:
    out = []
    for n in sorted(state):
        o = next(o for o in options[n] if o.ratio == state[n])
        a = attribution.get(n, {})
        out.append({"layer": n, "ratio": o.ratio, "ranks": o.ranks, "predicted_drift": o.drift,
                    "predicted_agreement": 1.0 - o.disagreement if o.has_agreement else None,
                    "predicted_saved_ms": o.saved_ms,
                    "macs_saved": o.macs_saved, "measured_drift_delta": a.get("drift"),
                    "measured_agreement_delta": a.get("agreement")})
    return out


def _best_uniform(st: Setup, rows, run_opts, popts: PlanOptions, tick) -> dict[str, Any] | None:
    """Of the uniform ratios that meet the budget, the fastest: each timed A/B against the
    original, one at a time (after every drift evaluation)."""
    from surgeon.sweep_backends import Evaluator
    ok = [r for r in rows if r["meets"] and r.get("rewritten")]
    if not ok:
        return None
    evaluator = Evaluator(st.payload)
    best = None
    for i, r in enumerate(ok):
        tick("timing the uniform ratios that meet the budget", i, len(ok))
        model = evaluator.evaluate(Config(f"uniform {r['ratio']:g}", {**st.base, "ratio": r["ratio"]}, popts.layers,
                                          keep_model=True))["model"]
        r["latency"] = measure_ab(st.original.SerializeToString(), model, st.split.eval.first_batch(run_opts.batch),
                                  run_opts.threads, popts.latency_budget_s)
        if best is None or r["latency"]["ratio"] < best["latency"]["ratio"]:
            best = r
    return _slim(best)


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("model", "layers")}


def _rows(curves):
    return [_slim(r) for r in curves]
