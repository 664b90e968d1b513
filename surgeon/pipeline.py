"""The pipeline: a model, plugin steps, data and budgets in; models and one structured report out.

Every command is a thin layer over this module (`surgeon apply`, `--recipe`, `validate`,
`gate`, sweeps), and so is a Python user:

    steps = [Step("tucker", {"ratio": 0.5}), Step("int8")]
    result = pipeline.run("model.onnx", steps, RunOptions(data="test.npz", calib="calib.npz"),
                          Budgets(max_drift=0.05))
    pipeline.write_model(result, "model.small.onnx")

What happens, in order: load and check the model; read the data and keep the rows plugins fit
on apart from the rows validation scores (`calibration.split`); fold constants once; run each
step through the engine (per-layer overrides and skips from the recipe), measuring the drift
(and, for chains, the latency) after each step; validate the final model against the
original; evaluate the budgets. Nothing is written here: `write_model` and the report writers
do that, so a caller can decide not to write a model that failed its gate.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from surgeon import budgets as _budgets
from surgeon import calibration, engine, model as model_io
from surgeon.budgets import Budgets, Check
from surgeon.calibration import DataSet, DataSplit
from surgeon.engine import SurgeryResult
from surgeon.errors import ModelError, RuntimeLoadError, SurgeonError, UsageError
from surgeon.plugin import Plugin, registry
from surgeon.recipe import Recipe, Step, check_patterns, check_regex
from surgeon.validate import drift_metrics, latency_ab, run as run_model, session, validate, worst_output

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass
class RunOptions:
    """How to run: data, shapes, threads, seed, and what to measure."""

    data: str | Path | None = None  # validation data (.npz/.npy); calibrates too when no `calib`
    calib: str | Path | None = None
    labels: str = "labels"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calib_rows: int | None = None  # with only `data`: rows that calibrate (default a third)
    threads: int = 0
    seed: int = 0
    batch: int = 1  # latency batch
    validate: bool = True
    latency: bool = True
    repeats: int | None = None  # interleaved latency rounds (default: as many as fit in a few seconds)
    step_metrics: bool = True  # drift (and latency for chains) after each step
    guard_refresh: bool = False  # re-time the latency guard instead of reusing cached verdicts

    def check(self) -> None:
        """Range checks, before any work."""
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0 = onnxruntime's default), got {self.threads}")
        if self.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.batch}")
        if self.repeats is not None and self.repeats < 5:
            raise UsageError(f"--repeats must be >= 5 (a latency interval needs pairs), got {self.repeats}")
        if self.calib_rows is not None and self.calib_rows < 1:
            raise UsageError(f"--calib-rows must be >= 1, got {self.calib_rows}")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")


@dataclass
class StepReport:
    step: Step
    surgery: SurgeryResult
    drift: dict[str, Any] | None = None  # vs the original, on the evaluation rows
    latency_ms: float | None = None  # median, interleaved with the original
    original_ms: float | None = None
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step.to_toml(), **self.surgery.to_json(), "drift_after": self.drift,
                "latency_ms_after": self.latency_ms, "original_ms": self.original_ms,
                "size_bytes_after": self.size_bytes}


@dataclass
class NotValidated:
    """Why a run has no validation: skipped (no data, a model onnxruntime cannot run), or
    failed (the surgery broke a model that loaded before: never a pass)."""

    reason: str
    failed: bool = False

    def __str__(self) -> str:
        return f"{'failed' if self.failed else 'skipped'}: {self.reason}"


@dataclass
class Outcome:
    """The verdict of a run: budgets checked, plugin failures, what validation could not do."""

    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # a plugin failed on layers / its own budget
    not_validated: NotValidated | None = None

    @property
    def validation_skipped(self) -> str:
        """Why there is no validation, as the report says it ("skipped: ..."), or ""."""
        return str(self.not_validated) if self.not_validated else ""

    @property
    def status(self) -> str:
        if self.failures:
            return "fail"
        return _budgets.verdict(self.checks)


@dataclass
class PipelineResult:
    input: str
    original: onnx.ModelProto
    model: onnx.ModelProto
    steps: list[StepReport]
    split: DataSplit
    budgets: Budgets
    validation: dict[str, Any] | None
    outcome: Outcome
    reproduce: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.outcome.status

    def to_json(self) -> dict[str, Any]:
        rewritten = sum(len(s.surgery.rewritten) for s in self.steps)
        skipped = sum(len(s.surgery.skipped) for s in self.steps)
        return {"input": self.input, "status": self.status, "seconds": round(self.seconds, 3),
                "rewritten": rewritten, "skipped": skipped,
                "steps": [s.to_json() for s in self.steps],
                "data": self.split.to_json(), "validation": self.validation,
                "validation_skipped": self.outcome.validation_skipped or None,
                "budgets": self.budgets.to_json(), "checks": [c.to_json() for c in self.outcome.checks],
                "failures": self.outcome.failures, "warnings": self.warnings, "reproduce": self.reproduce}


# --- data --------------------------------------------------------------------------------------

def load_split(model: onnx.ModelProto, opts: RunOptions, needs_calibration: bool) -> tuple[DataSplit, dict]:
    """Read --data/--calib, split them, and take concrete input shapes from them (then --shape)."""
    fixed = calibration.static_batch(model)
    if opts.latency and fixed is not None and opts.batch not in (1, fixed):
        # (the latency was measured at the model's batch, and the table said so in small print)
        raise UsageError(f"--batch {opts.batch}: the model's batch dimension is fixed at {fixed}, so latency can "
                         f"only be measured at batch {fixed}; drop --batch")
    given = calibration.load_data(opts.data, model, labels_key=opts.labels) if opts.data else None
    calib = calibration.load_data(opts.calib, model, labels_key=opts.labels) if opts.calib else None
    if opts.labels != "labels" and given is not None and given.labels is None:
        raise UsageError(f"{opts.data}: no array named '{opts.labels}' (--labels); it has "
                         f"{', '.join(sorted(given.inputs))}")
    split = calibration.split(given, calib, needs_calibration=needs_calibration, calib_rows=opts.calib_rows)
    shapes = {**calibration.shapes_from_data(split.eval or split.calib), **opts.shapes}
    if split.eval is None or (needs_calibration and split.calib is None):
        concrete = concrete_shapes(model, shapes)
        if concrete is not None:
            try:
                synth_eval = calibration.synthesize(model, concrete, seed=opts.seed)
                synth_calib = calibration.synthesize(model, concrete, seed=opts.seed + 1)
            except UsageError as exc:  # string or sequence inputs: rewrites need no data
                log.info("no synthesized data: %s", exc)
                split.note = split.note or str(exc)
                split.unsynthesizable = str(exc)
            else:
                split = replace(split, calib=split.calib or (synth_calib if needs_calibration else None),
                                eval=split.eval or synth_eval)
    return split, shapes


def concrete_shapes(model: onnx.ModelProto, shapes: dict) -> dict | None:
    """Every input's concrete shape, or None when some stay dynamic (measurements then say so)."""
    known = calibration.resolve_shapes(model, shapes, required=False)
    return None if any(v is None for v in known.values()) else known


# --- running steps -----------------------------------------------------------------------------

def resolve_steps(steps: list[Step]) -> list[tuple[Step, Plugin]]:
    """Look up every step's plugin and check its options before any work."""
    reg = registry()
    out = []
    for i, s in enumerate(steps):
        plug = reg.get(s.plugin)
        where = f"step {i + 1} ({s.plugin})" if len(steps) > 1 else f"plugin '{s.plugin}'"
        try:
            plug.make_options(s.options)
        except UsageError as exc:
            # a single step's errors already name the plugin
            raise UsageError(str(exc) if len(steps) == 1 else f"{where}: {exc}") from None
        if s.select is not None:
            check_regex(s.select, f"{where}: select")
        for o in s.overrides:
            check_regex(o.match, f"{where}: layer override match")
        out.append((s, plug))
    return out


def needs_calibration(resolved: list[tuple[Step, Plugin]]) -> bool:
    return any(plug.uses_data(plug.make_options(step.options)) for step, plug in resolved)


def _scores_on(model: onnx.ModelProto, data: DataSet) -> bool:
    """Whether some output of `model`, run on the first sample of `data`, has an agreement:
    class scores (N, C) or an integer output (labels)."""
    from surgeon.validate import discrete, looks_like_scores

    return any(looks_like_scores(o) or discrete(o) for o in run_model(session(model, threads=1), data.take(1)))


def run(model: str | Path | onnx.ModelProto, steps: list[Step], opts: RunOptions | None = None,
        budgets: Budgets | None = None, progress: Progress | None = None) -> PipelineResult:
    """Apply the steps in order, measure, and check the budgets. Writes nothing."""
    t0 = time.perf_counter()
    opts = opts or RunOptions()
    opts.check()
    budgets = budgets or Budgets()
    tick = progress or (lambda what, done, total: None)
    resolved = resolve_steps(steps)
    problems = _budgets.unmeasurable(budgets, latency=opts.latency and opts.validate, labels=True)
    if budgets.any() and not opts.validate:
        problems.append("budgets need validation (drop --no-validate)")
    if problems:
        raise UsageError("; ".join(problems))

    source = str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>"
    original = model_io.load(model) if not isinstance(model, onnx.ModelProto) else model
    if budgets.min_agreement is not None and not _budgets.may_have_scores(original):  # before the surgery
        raise UsageError(_budgets.AGREEMENT_UNMEASURABLE)
    split, shapes = load_split(original, opts, needs_calibration(resolved))
    if budgets.min_agreement is not None and split.eval is not None and not _scores_on(original, split.eval):
        # declared shapes can lie (the OCR recognizer declares (1, seqlen) and returns (T, 1, 8210)):
        # one sample through the original settles it before minutes of surgery
        raise UsageError(_budgets.AGREEMENT_UNMEASURABLE)
    if budgets.min_accuracy is not None and (split.eval is None or split.eval.labels is None):
        raise UsageError(_budgets.unmeasurable(budgets, latency=True, labels=False)[0])
    warnings = [split.warning] if split.warning else []
    recipe_warnings = check_patterns(Recipe(steps, source="recipe"), [n.name for n in original.graph.node])
    warnings += [w.replace("recipe: ", "") for w in recipe_warnings]

    current = engine.prepare(original)  # folded once for the whole chain
    before, known_shapes = None, None  # each model state's shapes are inferred once
    reports: list[StepReport] = []
    eval_ref = None
    for i, (step, plug) in enumerate(resolved):
        label = f"step {i + 1}/{len(resolved)} {step.plugin}" if len(resolved) > 1 else step.plugin

        def step_progress(done: int, total: int, what: str, _label=label) -> None:
            tick(f"{_label}: {what}", done, total)

        names = [n.name for n in current.graph.node]
        per_layer, skip = step.layer_options(names)
        options = _with_budget_targets(plug, step, budgets, single=len(resolved) == 1)
        result = engine.apply(current, plug, options, layers=step.select, per_layer=per_layer, skip=skip,
                              data=split.calib, input_shapes=shapes, threads=opts.threads, seed=opts.seed,
                              progress=step_progress, prepared=True, before=before,
                              guard_refresh=opts.guard_refresh, shapes=known_shapes)
        current, before, known_shapes = result.model, result.after, result.shapes
        rep = StepReport(step, result, size_bytes=result.model.ByteSize())
        if opts.validate and opts.step_metrics and split.eval is not None and len(resolved) > 1:
            eval_ref = _step_metrics(rep, original, split.eval, opts, eval_ref, tick, label)
        reports.append(rep)
        warnings += [f"{step.plugin}: {w}" for w in result.extras.get("warnings", [])]

    outcome = Outcome(failures=_failures(reports))
    validation = None
    if opts.validate:
        validation, outcome.not_validated = _validate(original, current, split, opts, tick, source)
        if outcome.not_validated and outcome.not_validated.failed:
            outcome.failures.append(outcome.not_validated.reason)
    if budgets.any():
        if validation is None:
            outcome.failures.append(f"the budgets cannot be checked: {outcome.validation_skipped}")
        else:
            outcome.checks = _budgets.evaluate(budgets, validation, current.ByteSize())
    result = PipelineResult(source, original, current, reports, split, budgets, validation, outcome,
                            reproduce_info(original, steps, opts, split), warnings)
    result.seconds = time.perf_counter() - t0
    return result


def _with_budget_targets(plug: Plugin, step: Step, budgets: Budgets, single: bool) -> dict[str, Any]:
    """A plugin that can steer toward a budget (int8's fallback) gets it as its target, unless
    the step sets it. Only for a single step: in a chain, the budget is on the whole chain's
    output, which one step alone cannot see."""
    options = dict(step.options)
    if not single:
        return options
    from surgeon.plugin import option_fields
    have = {f.name for f in option_fields(plug)}
    for name in ("max_drift", "min_agreement"):
        if name in have and name not in options and getattr(budgets, name) is not None:
            options[name] = getattr(budgets, name)
    return options


def _step_metrics(rep: StepReport, original: onnx.ModelProto, data: DataSet, opts: RunOptions, ref,
                  tick: Progress, label: str):
    """Drift of this step's model against the original, and its latency interleaved with it."""
    tick(f"{label}: measuring", 0, 1)
    try:
        sa = session(original, opts.threads)
        sb = session(rep.surgery.model, opts.threads)
        ref = ref if ref is not None else run_model(sa, data)
        outs = run_model(sb, data)
        metrics = [drift_metrics(a, b) for a, b in zip(ref, outs)]
        # discrete outputs have an agreement only: the least agreeing one when all are
        rep.drift = worst_output(metrics) or min(metrics, key=lambda m: m["top1_agreement"])
        if opts.latency:
            la, lb = latency_ab(sa, sb, data.first_batch(opts.batch), repeats=opts.repeats, budget_s=2.0)
            rep.original_ms, rep.latency_ms = la.median_ms, lb.median_ms
    except SurgeonError as exc:
        log.info("%s: not measured (%s)", label, exc)
    return ref


def _failures(reports: list[StepReport]) -> list[str]:
    out = []
    for r in reports:
        failed = r.surgery.failed
        if failed:
            out.append(f"{r.step.plugin} failed on {len(failed)} layer(s), left as they were: "
                       + "; ".join(f"{l.layer}: {l.reason}" for l in failed[:3]))
        fb = r.surgery.extras.get("fallback") or {}
        if fb.get("met") is False:
            out.append(f"{r.step.plugin}: its budget ({fb.get('budget')}) was not met even with every "
                       "candidate node in float")
    return out


def _loads(model: onnx.ModelProto) -> bool:
    try:
        session(model, threads=1)
    except ModelError:
        return False
    return True


def _validate(original, candidate, split: DataSplit, opts: RunOptions, tick: Progress, source: str
              ) -> tuple[dict[str, Any] | None, NotValidated | None]:
    if split.eval is None:
        if split.unsynthesizable:
            return None, NotValidated(f"{split.unsynthesizable}; pass --data")
        hint = calibration.shape_hint(original, calibration.resolve_shapes(original, opts.shapes, required=False))
        return None, NotValidated(hint or "no data to validate on; pass --data")
    tick("validating", 0, 1)
    try:
        v = validate(original, candidate, split.eval, threads=opts.threads, latency=opts.latency,
                     latency_batch=opts.batch, repeats=opts.repeats)
    except RuntimeLoadError as exc:
        if _loads(original):  # the surgery broke it: never a pass
            return None, NotValidated(f"the rewritten model does not load in onnxruntime, the original does ({exc})",
                                      failed=True)
        return None, NotValidated(f"onnxruntime cannot run this model ({exc})")
    except ModelError:
        raise  # the two models cannot be compared (other inputs, outputs of another shape): never a skip
    except SurgeonError as exc:
        return None, NotValidated(str(exc))
    # its own label: a rate-limited repeat of "validating" read like a second validation
    tick("validating: done", 1, 1)
    return v.to_json(), None


# --- checking two models (validate, gate) --------------------------------------------------------

@dataclass
class CheckResult:
    original: str
    candidate: str
    split: DataSplit
    budgets: Budgets
    validation: dict[str, Any]
    outcome: Outcome
    size_bytes: int

    @property
    def status(self) -> str:
        return self.outcome.status

    def to_json(self) -> dict[str, Any]:
        return {"original": self.original, "candidate": self.candidate, "status": self.status,
                "data": self.split.to_json(), "validation": self.validation, "budgets": self.budgets.to_json(),
                "checks": [c.to_json() for c in self.outcome.checks], "size_bytes": self.size_bytes}


def check(original: str | Path, candidate: str | Path, opts: RunOptions | None = None,
          budgets: Budgets | None = None, progress: Progress | None = None) -> CheckResult:
    """Validate a candidate against the original on data, and check the budgets."""
    opts = opts or RunOptions()
    opts.check()
    budgets = budgets or Budgets()
    problems = _budgets.unmeasurable(budgets, latency=opts.latency, labels=True)
    if problems:
        raise UsageError("; ".join(problems))
    a = model_io.load(original)
    b = model_io.load(candidate)
    split, _ = load_split(a, opts, needs_calibration=False)
    if budgets.min_accuracy is not None and (split.eval is None or split.eval.labels is None):
        raise UsageError(_budgets.unmeasurable(budgets, latency=True, labels=False)[0])
    outcome = Outcome()
    validation, outcome.not_validated = _validate(a, b, split, opts, progress or (lambda *a: None), str(original))
    if validation is None:
        raise UsageError(f"cannot validate: {outcome.not_validated.reason}")
    size = Path(candidate).stat().st_size
    outcome.checks = _budgets.evaluate(budgets, validation, size)
    return CheckResult(str(original), str(candidate), split, budgets, validation, outcome, size)


# --- writing -----------------------------------------------------------------------------------

def write_model(result: PipelineResult, target: str | Path, *, external_data: bool | None = None,
                protect: tuple[str | Path, ...] = ()) -> Path:
    """Save the final model atomically; `protect` lists paths that must never be overwritten."""
    return model_io.save(result.model, target, external_data=external_data, protect=protect)


def rejected_path(target: Path) -> Path:
    """Where a model that failed its budgets goes when the user asks to keep it."""
    return target.with_name(f"{target.stem}.rejected{target.suffix or '.onnx'}")


# --- reproducibility ---------------------------------------------------------------------------

def reproduce_info(model: onnx.ModelProto, steps: list[Step], opts: RunOptions, split: DataSplit) -> dict[str, Any]:
    """Everything needed to run the same surgery again and get the same bytes."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    import surgeon
    digest = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    return {
        "input_sha256": digest,
        "steps": [s.to_toml() for s in steps],
        "seed": opts.seed, "threads": opts.threads, "shapes": {k: list(v) for k, v in opts.shapes.items()},
        "calibration_rows": len(split.calib) if split.calib is not None else 0,
        "evaluation_rows": len(split.eval) if split.eval is not None else 0,
        "versions": {"surgeon": surgeon.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "onnx_graphsurgeon": gs.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
