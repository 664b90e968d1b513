"""The `surgeon` command: parses options, calls the library (surgeon.pipeline), prints.

Exit codes: 0 ok, 1 a budget was exceeded or a transform failed, 2 bad usage or unreadable
input, 3 a latency check was inconclusive (its interval straddles the budget: re-run with more
--repeats or on a quieter machine). Tables go to stdout (or JSON with `--json -`); diagnostics
and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from surgeon import budgets as _budgets
from surgeon import calibration, engine, model as model_io, pipeline, recipe as _recipe, report
from surgeon.budgets import Budgets
from surgeon.errors import SurgeonError, UsageError
from surgeon.plugin import option_help, registry
from surgeon.profile import profile

# markdown, not rich markup: rich took "[ray]" and "[gate]" in help texts for style tags and dropped them
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",
                  help="Model surgery for ONNX: factorize, prune and quantize, then check drift and latency.")
out = Console()
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("surgeon")

EXIT_INCONCLUSIVE = 3

JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the report as JSON to this file ('-' = stdout, no tables)")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--shape", help="concrete input shape NAME=1x3x224x224 (repeatable); a dynamic leading batch dim defaults to 1")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help=".npz (keys = input names, optional labels) or .npy (single input): validation data; calibrates too when no --calib (then split)")]
CalibOpt = Annotated[Optional[Path], typer.Option("--calib", help="calibration data for the plugins (never scored)")]
CalibRowsOpt = Annotated[Optional[int], typer.Option("--calib-rows", help="with only --data: how many leading rows calibrate (default a third); the rest are scored")]
LabelsOpt = Annotated[str, typer.Option("--labels", help="key of the labels array in the --data .npz")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads (0 = onnxruntime's default)")]
BatchOpt = Annotated[int, typer.Option("--batch", help="batch size of the latency measurement")]
RepeatsOpt = Annotated[Optional[int], typer.Option("--repeats", help="interleaved latency rounds (default: as many as fit in ~4 s, 10 to 300)")]
NoLatencyOpt = Annotated[bool, typer.Option("--no-latency", help="skip the latency measurement")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed for synthesized data and randomized methods")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show skipped layers and why; more logging")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="write the budget checks as JUnit XML (one test case per check)")]
MarkdownOpt = Annotated[Optional[Path], typer.Option("--markdown", help="write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)")]
MaxDriftOpt = Annotated[Optional[float], typer.Option("--max-drift", help="budget: worst relative L2 drift of any output")]
MinAgreementOpt = Annotated[Optional[float], typer.Option("--min-agreement", help="budget: top-1 agreement with the original (0-1)")]
MinAccuracyOpt = Annotated[Optional[float], typer.Option("--min-accuracy", help="budget: accuracy on the --data labels (0-1)")]
MaxLatencyOpt = Annotated[Optional[float], typer.Option("--max-latency-ratio", help="budget: candidate / original latency (1.0 = no slower)")]
MaxSizeOpt = Annotated[Optional[float], typer.Option("--max-size-mb", help="budget: candidate file size in MB")]


# warnings the log has already shown (a plugin logs what it also puts in its report's warnings)
_logged_warnings: set[str] = set()


class _LogToConsole(logging.Handler):
    """Log records on stderr in the command's own words: "warning: ..." like the report's
    warnings (and remembered, so _print_apply does not repeat them), the rest as plain lines
    (-v); prose wraps at the width like the notes."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            if msg in _logged_warnings:  # once per command (--calib and --data may be one file)
                return
            _logged_warnings.add(msg)
            err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=False)
        else:
            err.print(escape(msg), highlight=False, soft_wrap=False)


def _setup_logging(verbose: bool) -> None:
    _logged_warnings.clear()  # one command's
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[_LogToConsole()], force=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Our errors become one line on stderr and an exit code; nothing else leaks a traceback
    unless SURGEON_DEBUG is set."""
    try:
        yield
    except typer.Exit:
        raise
    except SurgeonError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug, not bad input: say so plainly
        if os.environ.get("SURGEON_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (set SURGEON_DEBUG=1 for a traceback)",
                  highlight=False)
        raise typer.Exit(1) from None


class ProgressReporter:
    """A bar on a terminal; elsewhere (CI logs) a plain line every few seconds, and one whenever
    the stage or a phase changes. A phase is a "plugin: phase" label of a short count (int8's
    four steps): a line per phase keeps the log from showing the last phase's label for the next
    phase's time (GPTQ's 9 s on EfficientNet-Lite0 were logged as "cross-layer equalization");
    per-layer labels ("plugin: layer" of a long count, "plugin: stage: layer") are rate-limited."""

    PHASES = 8  # counts up to this are phases

    def __init__(self, enabled: bool = True, every_s: float = 5.0) -> None:
        self.enabled = enabled
        self.tty = err.is_terminal
        self.every = every_s
        self.t0 = time.monotonic()
        self.last = -1e9
        self.last_what = ""
        self.last_phase = ""
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> "ProgressReporter":
        if self.enabled and self.tty:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=err, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total or None, description=what[:60])
            return
        now = time.monotonic()
        stage = what.split(":")[0]
        # "plugin: phase" of a short count; "plugin: phase: item" (a layer of a stage) is no phase
        phase = what if total and total <= self.PHASES and what.count(":") <= 1 else stage
        if now - self.last >= self.every or stage != self.last_what or phase != self.last_phase:
            count = f" ({done}/{total})" if total and total > 1 else ""
            head = f"[{now - self.t0:6.1f}s] "
            if ": " in what and len(head) + len(what) + len(count) > err.width:
                # one line per update in an 80-column log: the item (a long layer name) gives way
                # in the middle, the label before it stays whole
                label, item = what.rsplit(": ", 1)
                what = f"{label}: " + report.elide(item, max(12, err.width - len(head) - len(label) - 2 - len(count)))
            err.print(f"{head}{what}{count}", highlight=False, markup=False)
            self.last, self.last_what = now, stage
        self.last_phase = phase


# --- option parsing --------------------------------------------------------------------------------

def _parse_kv(items: list[str] | None, plugins: list[str]) -> dict[str | None, dict[str, str]]:
    """`--option key=value` (every step that has the option) or `plugin.key=value` (one step)."""
    opts: dict[str | None, dict[str, str]] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --option {item!r}: expected key=value (or plugin.key=value)")
        target, dot, name = key.strip().rpartition(".")
        if dot and target not in plugins:
            raise UsageError(f"--option {item!r}: '{target}' is not a plugin of this run ({', '.join(plugins)})")
        bucket = opts.setdefault(target if dot else None, {})
        name = name.replace("-", "_")
        if name in bucket:
            raise UsageError(f"--option {name} is given twice")
        bucket[name] = value.strip()
    return opts


def _parse_flags(args: list[str], plugs: list) -> dict[str, str]:
    """Plugin options written as flags: `--key value`, `--key=value`, `--flag` / `--no-flag`
    for booleans. A flag must name an option of at least one plugin of the run."""
    kinds: dict[str, str] = {}
    for p in plugs:
        for name, tp, _, _ in option_help(p):
            kinds.setdefault(name, tp)
    known = ", ".join(sorted(kinds)) or "none"
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq and key.startswith("no_") and kinds.get(key[3:]) == "bool":
            key, value = key[3:], "false"
        elif not eq and kinds.get(key) == "bool" and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            value = "true"
        elif not eq:
            if key not in kinds:
                raise UsageError(f"no such option --{key.replace('_', '-')} (plugin options: {known}; "
                                 "see `surgeon plugins`)")
            if i + 1 >= len(args):
                raise UsageError(f"--{key.replace('_', '-')} needs a value")
            i += 1
            value = args[i]
        if key not in kinds:
            raise UsageError(f"no such option --{key.replace('_', '-')} (plugin options: {known})")
        if key in opts:
            raise UsageError(f"--{key.replace('_', '-')} is given twice")
        opts[key] = value
        i += 1
    return opts


def _steps_from_cli(plugins: list[str], ratio: float | None, flags: list[str], options: list[str] | None,
                    layers: str | None) -> list[_recipe.Step]:
    reg = registry()
    plugs = [reg.get(p) for p in plugins]
    flag_opts = _parse_flags(flags, plugs)
    kv = _parse_kv(options, plugins)
    steps = []
    for p in plugs:
        valid = {name for name, *_ in option_help(p)}
        opts: dict[str, Any] = {}  # options for every step that has them
        for source in (flag_opts, kv.get(None, {})):
            for k, v in source.items():
                if k in valid:
                    if k in opts:
                        raise UsageError(f"plugin '{p.name}': option '{k}' is given twice (as a flag and as --option)")
                    opts[k] = v
        if ratio is not None:
            if "ratio" in valid:
                if "ratio" in opts:
                    raise UsageError(f"plugin '{p.name}': ratio is given twice (--ratio and an option)")
                opts["ratio"] = str(ratio)
            elif len(plugs) == 1:
                raise UsageError(f"plugin '{p.name}' has no ratio; its options: {', '.join(sorted(valid))}")
        own = kv.get(p.name, {})  # plugin.key=value: this step only, over the shared ones
        bad = sorted(set(own) - valid)
        if bad:
            raise UsageError(f"plugin '{p.name}' has no option '{bad[0]}'; valid options: {', '.join(sorted(valid))}")
        steps.append(_recipe.Step(p.name, engine.merge_options(p, opts, own), layers))
    unused = set(kv.get(None, {})) - {name for p in plugs for name, *_ in option_help(p)}
    if unused:
        valid = "; ".join(f"{p.name}: {', '.join(sorted(n for n, *_ in option_help(p))) or '(none)'}" for p in plugs)
        raise UsageError(f"no option {', '.join(repr(u) for u in sorted(unused))}; valid options: {valid}")
    if layers is not None:
        _recipe.check_regex(layers, "--layers")
    return steps


def _cli_budgets(**values: float | None) -> Budgets:
    return Budgets.from_mapping({k: v for k, v in values.items() if v is not None}, where="command line")


def _run_options(data, calib, labels, shape, calib_rows, threads, seed, batch, validate, latency, repeats):
    return pipeline.RunOptions(data=data, calib=calib, labels=labels, shapes=calibration.parse_shapes(shape),
                               calib_rows=calib_rows, threads=threads, seed=seed, batch=batch, validate=validate,
                               latency=latency, repeats=repeats)


def _check_paths(outputs: dict[str, Path | str | None], inputs: dict[str, Path | None]) -> None:
    """No output may be an input, and no two outputs may be the same file."""
    seen: dict[Path, str] = {}
    for what, p in inputs.items():
        if p is not None:
            seen.setdefault(Path(p).resolve(), what)
    for what, p in outputs.items():
        if p is None or str(p) == "-":
            continue
        rp = Path(p).resolve()
        if rp in seen:
            raise UsageError(f"{what} {p} would overwrite the {seen[rp]}; choose another path")
        if Path(p).is_dir():
            raise UsageError(f"{what} {p} is a directory; give a file path")
        if not Path(p).parent.exists():
            raise UsageError(f"{what} {p}: folder {Path(p).parent} does not exist")
        seen[rp] = what


def _check_kind(what: str, path: Path | None, writes: str, wrong: tuple[str, ...], fix: str) -> None:
    """An output whose suffix names another kind of file than the command writes (`plan -o
    plan.onnx` wrote a TOML recipe under a model's name) is a usage error, before any work."""
    if path is not None and path.suffix.lower() in wrong:
        raise UsageError(f"{what} {path} ends in {path.suffix}, but this command writes {writes}; {fix}")


def _default_target(model: Path, steps: list[_recipe.Step], recipe_path: Path | None) -> Path:
    tag = recipe_path.stem if recipe_path else "-".join(s.plugin for s in steps)
    return model.with_name(f"{model.stem}.{tag}.onnx")


def _emit_json(dest: str | None, obj: dict) -> None:
    if dest == "-":
        sys.stdout.write(json.dumps(report._jsonable(obj), indent=2) + "\n")
    elif dest:
        report.write_json(Path(dest), obj)
        err.print(f"report written to {dest}")


def _emit_gate_reports(junit: Path | None, markdown: Path | None, checks: list[dict], status: str, title: str,
                       extra: list[str]) -> None:
    if junit:
        report.write_text(junit, report.junit_xml(checks, suite=title))
        err.print(f"JUnit report written to {junit}")
    if markdown:
        text = report.markdown(checks, status, title=title, extra=extra)
        if _is_step_summary(markdown):
            # GitHub asks for appends: the step's other lines, or a second gate in the same step,
            # were lost when the summary file was replaced
            with open(markdown, "a") as f:
                f.write(("\n" if markdown.stat().st_size else "") + text)
            err.print(f"Markdown summary appended to {markdown} (GITHUB_STEP_SUMMARY)")
        else:
            report.write_text(markdown, text)
            err.print(f"Markdown summary written to {markdown}")


def _is_step_summary(path: Path) -> bool:
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    return bool(summary) and path.exists() and path.resolve() == Path(summary).resolve()


def _exit_for(status: str, message: str) -> None:
    if status == "fail":
        err.print(f"[bold red]failed:[/] {escape(message)}", highlight=False)
        raise typer.Exit(1)
    if status == "inconclusive":
        err.print(f"[yellow]inconclusive:[/] {escape(message)}", highlight=False)
        raise typer.Exit(EXIT_INCONCLUSIVE)


# --- commands ------------------------------------------------------------------------------------

@app.command("plugins")
def plugins_cmd(json_out: JsonOpt = None) -> None:
    """List the available plugins (built-in and installed) with their options."""
    with _errors():
        reg = registry()
        for f in getattr(reg, "failures", []):
            err.print(f"[yellow]warning:[/] {escape(str(f))}", highlight=False, soft_wrap=False)
        if json_out:
            _emit_json(json_out, {"plugins": [
                {"name": p.name, "summary": p.summary, "from": reg.origin(p.name),
                 "options": [dict(zip(("name", "type", "default", "help"), o)) for o in option_help(p)]}
                for p in reg]})
            if json_out == "-":
                return
        for t in report.plugins_tables(reg):
            out.print(t)


@app.command("inspect")
def inspect_cmd(model: Annotated[Path, typer.Argument(help="ONNX model")], json_out: JsonOpt = None,
                shape: ShapeOpt = None) -> None:
    """Per-layer parameters, MACs and bytes, with totals."""
    with _errors():
        _check_paths({"--json": json_out}, {"model": model})
        m = model_io.load(model)
        prepared = engine.prepare(m)
        shapes = pipeline.concrete_shapes(prepared, calibration.parse_shapes(shape))
        prof = profile(prepared, shapes)
        prof.file_bytes = model.stat().st_size
        _emit_json(json_out, {"model": str(model), "input_shapes": shapes, **prof.to_json()})
        if json_out != "-":
            out.print(report.profile_table(prof, title=f"{model.name}"))
            out.print(f"size on disk: {report.human_bytes(prof.file_bytes)}")


@app.command("apply", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def apply_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="ONNX model to operate on (never modified)")],
    plugin: Annotated[Optional[list[str]], typer.Option("--plugin", "-p", help="plugin name (repeat to chain; see `surgeon plugins`)")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="a TOML recipe: steps, per-layer overrides, [gate] budgets")] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="shorthand for --option ratio=R (every step that has a ratio)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", help="plugin option key=value, or plugin.key=value for one step (repeatable)")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="only nodes whose name matches this regex")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output path (default: MODEL.PLUGIN.onnx beside the input; a folder puts it there)")] = None,
    json_out: JsonOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    data: DataOpt = None,
    calib: CalibOpt = None,
    calib_rows: CalibRowsOpt = None,
    labels: LabelsOpt = "labels",
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 1,
    repeats: RepeatsOpt = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="skip drift and latency measurement")] = False,
    no_latency: NoLatencyOpt = False,
    external_data: Annotated[bool, typer.Option("--external-data", help="save weights in a separate .data file")] = False,
    seed: SeedOpt = 0,
    max_drift: MaxDriftOpt = None,
    min_agreement: MinAgreementOpt = None,
    min_accuracy: MinAccuracyOpt = None,
    max_latency_ratio: MaxLatencyOpt = None,
    max_size_mb: MaxSizeOpt = None,
    gate: Annotated[bool, typer.Option("--gate", help="also check the budgets of [tool.surgeon.gate] in pyproject.toml; write the model only if every budget holds")] = False,
    keep_rejected: Annotated[bool, typer.Option("--keep-rejected", help="when a budget fails, keep the model at OUT.rejected.onnx")] = False,
    guard_refresh: Annotated[bool, typer.Option("--guard-refresh", help="re-measure the latency guard instead of reusing cached verdicts")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Apply plugins (or a recipe), print what changed, then measure drift and latency.

    Plugin options can also be given as flags: `--energy 0.9`, `--rank-method vbmf`,
    `--ranks 8,16`, `--no-per-channel` are `--option energy=0.9` and so on. Budgets
    (`--max-drift`, ...) make the run a gate: if one fails, nothing is written at the output
    path and the exit code is 1.
    """
    _setup_logging(verbose)
    with _errors():
        if recipe and (plugin or ratio is not None or option or ctx.args or layers):
            raise UsageError("--recipe sets the steps and their options; do not combine it with --plugin, "
                             "--ratio, --option, --layers or plugin flags")
        if not recipe and not plugin:
            raise UsageError("give --plugin NAME (repeatable) or --recipe FILE")
        rec = _recipe.load(recipe) if recipe else None
        steps = rec.steps if rec else _steps_from_cli(plugin, ratio, ctx.args, option, layers)
        cli_b = _cli_budgets(max_drift=max_drift, min_agreement=min_agreement, min_accuracy=min_accuracy,
                             max_latency_ratio=max_latency_ratio, max_size_mb=max_size_mb)
        sources = [Budgets.from_mapping(rec.gate, where=str(recipe))] if rec and rec.gate else []
        if gate:
            py, _ = _budgets.from_pyproject()
            sources.append(py)
        budgets = cli_b.merged(*sources)
        if gate and not budgets.any():
            raise UsageError("--gate needs at least one budget (--max-drift, --min-agreement, --min-accuracy, "
                             "--max-latency-ratio, --max-size-mb, a [gate] table in the recipe, or "
                             "[tool.surgeon.gate] in pyproject.toml)")
        target = output or _default_target(model, steps, recipe)
        if output is not None and output.is_dir():
            target = output / _default_target(model, steps, recipe).name
        _check_paths({"output model": target, "output weights": target.with_name(target.name + ".data")
                      if external_data else None, "--json": json_out, "--junit": junit, "--markdown": markdown},
                     {"input model": model, "--data file": data, "--calib file": calib, "recipe": recipe})
        _check_kind("output model", output, "an ONNX model", (".toml", ".json", ".npz"),
                    "give a .onnx path (--recipe reads a recipe, --json writes the report)")
        opts = _run_options(data, calib, labels, shape, calib_rows, threads, seed, batch, not no_validate,
                            not no_latency, repeats)
        opts.guard_refresh = guard_refresh
        opts.check()
        with ProgressReporter(enabled=json_out != "-") as progress:
            result = pipeline.run(model, steps, opts, budgets, progress=progress)
        doc = result.to_json()
        status = result.status
        written = None
        if status == "pass":
            pipeline.write_model(result, target, external_data=external_data or None, protect=(model,))
            written = target
        elif keep_rejected:
            written = pipeline.rejected_path(target)
            pipeline.write_model(result, written, external_data=external_data or None, protect=(model,))
        doc["output"] = str(written) if written else None
        doc["output_requested"] = str(target)
        if json_out != "-":
            _print_apply(result, doc, written, verbose)
        _emit_json(json_out, doc)
        _emit_gate_reports(junit, markdown, doc["checks"], status, f"surgeon apply {model.name}",
                           [f"- {s.step.describe()}" for s in result.steps])
        if status != "pass":
            reasons = result.outcome.failures + [f"{c.name} {c.status}: {c.detail or c.value}"
                                                 for c in result.outcome.checks if c.status != "pass"]
            where = (f"; the model was kept at {written}" if written else
                     f"; nothing was written at {target} (--keep-rejected keeps it at {pipeline.rejected_path(target)})")
            _exit_for(status, "; ".join(reasons) + where)


def _grouped_notes(notes: list[str], layers: set[str]) -> list[str]:
    """A plugin's notes, once each: "layer: text" notes with the same text become "text (N
    layers: first, ...)" (prune's criterion=bn on a model whose BatchNormalizations were folded
    away fell back to l2 for 24 groups, said only in the JSON)."""
    grouped: dict[str, list[str]] = {}
    for note in notes:
        layer, sep, text = str(note).partition(": ")
        key, who = (text, layer) if sep and layer in layers else (str(note), "")
        grouped.setdefault(key, []).append(who)
    out = []
    for text, who in grouped.items():
        named = [w for w in who if w]
        out.append(text if not named else
                   f"{text} ({len(named)} layer{'s' if len(named) > 1 else ''}: {named[0]}"
                   + (", ..." if len(named) > 1 else "") + ")")
    return out


def _print_apply(result: pipeline.PipelineResult, doc: dict, written: Path | None, verbose: bool) -> None:
    for w in result.warnings:
        if w not in _logged_warnings:  # shown once: the log may have printed it while the plugin ran
            err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=False)  # prose, like the notes
    for step in result.steps:
        s = step.surgery
        title = f"{s.plugin} on {Path(result.input).name}"
        if s.rewritten:
            out.print(report.layers_table(s.layers, title=title))
        if verbose and s.skipped:
            out.print(report.skipped_table(s.layers))
        left = len(s.skipped) - len(s.failed)
        out.print(f"{len(s.rewritten)} rewritten, {left} skipped" + (f", {len(s.failed)} failed" if s.failed else "")
                  + ("" if verbose or not s.skipped else " (-v shows which and why)"))
        for table in (report.steps_table(s.extras), report.explain_table(s.extras)):
            if table is not None:
                out.print(table)
        # the MACs note is the totals table's caption
        notes = [n for n in getattr(s, "notes", []) if n != s.before.macs_note] + list(s.extras.get("notes", []))
        for note in _grouped_notes(notes, {l.layer for l in s.layers}):
            err.print(f"note: {note}", highlight=False, soft_wrap=False)  # prose: wrapped at the width
    first, last = result.steps[0].surgery, result.steps[-1].surgery
    before, after = first.before, last.after
    before.file_bytes = Path(result.input).stat().st_size if Path(result.input).exists() else before.file_bytes
    after.file_bytes = written.stat().st_size if written else result.model.ByteSize()
    out.print(report.totals_table(before, after))
    chain = report.chain_table(doc)
    if chain is not None:
        out.print(chain)
    d = doc["data"]
    if d.get("calibration") and d["calibration"]["rows"]:
        c = d["calibration"]
        rows = f"{c['rows']} row{'' if c['rows'] == 1 else 's'}"
        out.print(f"calibration: {rows} synthesized; pass --calib (or --data) for real ones" if c["synthetic"]
                  else f"calibration: {rows} of {c['source']}")
    if written:
        out.print(f"wrote {written} in {result.seconds:.1f} s")
    if result.outcome.validation_skipped:
        err.print(f"[yellow]validation {escape(result.outcome.validation_skipped)}[/]", highlight=False, soft_wrap=False)
    elif doc["validation"]:
        if doc["validation"]["synthetic_data"]:
            err.print("[yellow]note:[/] validating on synthesized inputs; pass --data for real drift and accuracy")
        for t in report.validation_tables(doc["validation"]):
            out.print(t)
    if doc["checks"]:
        out.print(report.checks_table(doc["checks"], title=f"budgets: {result.status}"))


def _check_command(original: Path, candidate: Path, opts: pipeline.RunOptions, budgets: Budgets, json_out, junit,
                   markdown, title: str) -> None:
    _check_paths({"--json": json_out, "--junit": junit, "--markdown": markdown},
                 {"original model": original, "candidate model": candidate, "--data file": opts.data})
    with ProgressReporter(enabled=json_out != "-") as progress:
        res = pipeline.check(original, candidate, opts, budgets, progress=progress)
    doc = res.to_json()
    if json_out != "-":
        for t in report.validation_tables(res.validation):
            out.print(t)
        if doc["checks"]:
            out.print(report.checks_table(doc["checks"], title=f"{title}: {res.status}"))
    _emit_json(json_out, doc)
    _emit_gate_reports(junit, markdown, doc["checks"], res.status, f"{title} {candidate.name}",
                       [f"data: {res.split.eval.source} ({len(res.split.eval)} rows)"] if res.split.eval else [])
    fails = [f"{c['name']} {c['status']}: value {c['value']}, budget {c['budget']}"
             + (f" ({c['detail']})" if c["detail"] else "") for c in doc["checks"] if c["status"] != "pass"]
    _exit_for(res.status, "; ".join(fails))


@app.command("validate")
def validate_cmd(
    original: Annotated[Path, typer.Argument(help="the reference model")],
    candidate: Annotated[Path, typer.Argument(help="the model after surgery")],
    data: DataOpt = None,
    labels: LabelsOpt = "labels",
    json_out: JsonOpt = None,
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 1,
    repeats: RepeatsOpt = None,
    no_latency: NoLatencyOpt = False,
    seed: SeedOpt = 0,
    max_drift: MaxDriftOpt = None,
    min_agreement: MinAgreementOpt = None,
    min_accuracy: MinAccuracyOpt = None,
    max_latency_ratio: MaxLatencyOpt = None,
    max_size_mb: MaxSizeOpt = None,
) -> None:
    """Compare two models: output drift (and accuracy with labels) and interleaved A/B latency;
    budgets set the exit code."""
    with _errors():
        budgets = _cli_budgets(max_drift=max_drift, min_agreement=min_agreement, min_accuracy=min_accuracy,
                               max_latency_ratio=max_latency_ratio, max_size_mb=max_size_mb)
        opts = _run_options(data, None, labels, shape, None, threads, seed, batch, True, not no_latency, repeats)
        _check_command(original, candidate, opts, budgets, json_out, None, None, "validate")


@app.command("gate")
def gate_cmd(
    original: Annotated[Path, typer.Argument(help="the reference model")],
    candidate: Annotated[Path, typer.Argument(help="the model to ship")],
    data: DataOpt = None,
    labels: LabelsOpt = "labels",
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="take budgets from this recipe's [gate] table")] = None,
    json_out: JsonOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 1,
    repeats: RepeatsOpt = None,
    no_latency: NoLatencyOpt = False,
    seed: SeedOpt = 0,
    max_drift: MaxDriftOpt = None,
    min_agreement: MinAgreementOpt = None,
    min_accuracy: MinAccuracyOpt = None,
    max_latency_ratio: MaxLatencyOpt = None,
    max_size_mb: MaxSizeOpt = None,
) -> None:
    """The pre-deployment gate: exit 0 when every budget holds, 1 when one fails, 2 on bad
    input, 3 when a latency check is inconclusive. Budgets from the command line, then the
    recipe's [gate], then [tool.surgeon.gate] in pyproject.toml."""
    with _errors():
        cli_b = _cli_budgets(max_drift=max_drift, min_agreement=min_agreement, min_accuracy=min_accuracy,
                             max_latency_ratio=max_latency_ratio, max_size_mb=max_size_mb)
        sources = []
        if recipe:
            rec = _recipe.load(recipe)
            sources.append(Budgets.from_mapping(rec.gate, where=str(recipe)))
        py, _ = _budgets.from_pyproject()
        budgets = cli_b.merged(*sources, py)
        if not budgets.any():
            raise UsageError("the gate has no budgets: give --max-drift, --min-agreement, --min-accuracy, "
                             "--max-latency-ratio or --max-size-mb, a recipe with [gate], or "
                             "[tool.surgeon.gate] in pyproject.toml")
        if data is None:
            raise UsageError("the gate needs --data (real inputs to compare the models on)")
        opts = _run_options(data, None, labels, shape, None, threads, seed, batch, True, not no_latency, repeats)
        _check_command(original, candidate, opts, budgets, json_out, junit, markdown, "gate")


# --- sweep and plan (issue 11) ---

WorkersOpt = Annotated[int, typer.Option("--workers", help="evaluate configurations in this many parallel processes (or Ray actors); latency is always measured one at a time afterwards")]
BackendOpt = Annotated[str, typer.Option("--backend", help="processes (this machine) or ray (a Ray cluster; pip install 'surgeon[ray]')")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="--backend ray: the cluster (HOST:PORT or ray://...); without it a local Ray runtime starts")]
LatencyLocalOpt = Annotated[bool, typer.Option("--latency-local", help="--backend ray: time latency on this machine while drift evaluations fan out")]
SweepOptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-O", help="plugin option key=value for every configuration (repeatable)")]


def _sweep_plugin_options(plugin: str, option: list[str] | None) -> dict[str, str]:
    kv = _parse_kv(option, [plugin])
    return {**kv.get(None, {}), **kv.get(plugin, {})}


def _check_workers(workers: int, backend: str) -> None:
    if not 1 <= workers <= 256:
        raise UsageError(f"--workers must be in 1..256, got {workers}")
    if backend not in ("processes", "ray"):
        raise UsageError(f"--backend must be processes or ray, got {backend!r}")


@app.command("sweep")
def sweep_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model (never modified)")],
    plugin: Annotated[str, typer.Option("--plugin", "-p", help="tucker, svd or prune (a ratio), or int8 (per-node fallback sensitivity)")],
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="start:stop:step (stop included), e.g. 0.125:1:0.125, or a list 0.25,0.5")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="one layer at a time at each ratio (sensitivity), instead of the whole model")] = False,
    reconstruction: Annotated[bool, typer.Option("--reconstruction", help="tucker/svd: reconstruction error vs rank per layer, data-free")] = False,
    option: SweepOptionOpt = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="only nodes whose name matches this regex")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="folder for CSV, JSON and PNG files (default sweep-MODEL-PLUGIN)")] = None,
    json_out: JsonOpt = None,
    data: DataOpt = None,
    calib: CalibOpt = None,
    calib_rows: CalibRowsOpt = None,
    labels: LabelsOpt = "labels",
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 1,
    no_latency: NoLatencyOpt = False,
    seed: SeedOpt = 0,
    workers: WorkersOpt = 1,
    backend: BackendOpt = "processes",
    address: AddressOpt = None,
    latency_local: LatencyLocalOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Apply a plugin at many ratios (or one layer at a time) and measure each: params, MACs,
    latency, drift, agreement, accuracy. Writes CSV, JSON and PNG plots."""
    from surgeon import sweep as _sweep
    _setup_logging(verbose)
    with _errors():
        _check_workers(workers, backend)
        if address and backend != "ray":
            raise UsageError("--address is for --backend ray")
        parsed = _sweep.parse_ratios(ratios) if ratios else []
        target = out_dir or Path(f"sweep-{model.stem}-{plugin}")
        if target.exists() and not target.is_dir():
            raise UsageError(f"--out {target} is a file; give a folder")
        _check_paths({"--json": json_out}, {"model": model, "--data file": data, "--calib file": calib})
        sopts = _sweep.SweepOptions(plugin, parsed, _sweep_plugin_options(plugin, option), layers,
                                    per_layer=per_layer, uniform=not (per_layer or reconstruction),
                                    reconstruction=reconstruction, latency=not no_latency, workers=workers,
                                    backend=backend, address=address, latency_local=latency_local)
        opts = _run_options(data, calib, labels, shape, calib_rows, threads, seed, batch, True, not no_latency, None)
        with ProgressReporter(enabled=json_out != "-") as progress:
            res = _sweep.run_sweep(model, sopts, opts, progress=progress)
        files = _sweep.write(res, target)
        if json_out != "-":
            for t in _sweep_tables(res):
                out.print(t)
            # names only, wrapped between them: four paths on one line ran past 80 columns
            names = ", ".join(f.name if f.parent == Path(target) else str(f) for f in files)
            err.print(f"wrote to {target}: {names}", highlight=False, soft_wrap=False)
        _emit_json(json_out, res.to_json())


def _sweep_tables(res) -> list:
    from surgeon import sweep as _sweep
    name = Path(res.model).name
    tables = []
    if res.uniform:
        rows = []
        for r in _sweep.uniform_rows(res):
            # the speedup, original / candidate, as apply prints it (the JSON keeps latency_ratio)
            lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.3f}" + (
                f" ({1 / r['latency_ratio']:.2f}x)" if r.get("latency_ratio") else "")
            rows.append([f"{r['ratio']:g}", report.human(r["params"]), report.human(r["macs"]), lat,
                         _fmt(r["drift"], "{:.4f}"), _fmt(r["agreement"], "{:.2%}"), _fmt(r["accuracy"], "{:.2%}")
                         if not r.get("error") else r["error"][:40]])
        orig = res.original
        tables.append(report.table(f"{res.plugin} sweep on {name} (original: {report.human(orig.get('params'))} params, "
                                   f"{report.human(orig.get('macs'))} MACs"
                                   + (f", accuracy {orig['accuracy']:.2%}" if orig.get("accuracy") is not None else "")
                                   + ")", ["ratio", "params", "MACs", "ms (speedup)", "drift", "agreement",
                                          "accuracy"], rows, optional=NO_SCORES))
    if res.per_layer:
        all_rows = _sweep.layer_rows(res)
        # a layer the plugin rewrote at no ratio (not a group's leader, or too small) has no curve
        shown = {r["layer"] for r in all_rows if r["applied"]}
        rows = [[r["layer"], f"{r['ratio']:g}", r["ranks"] or ("not rewritten" if not r["applied"] else ""),
                 _fmt(r["drift"], "{:.4f}"), _fmt(r["agreement"], "{:.2%}"), _fmt(r["accuracy"], "{:.2%}"),
                 _fmt(r["saved_ms"], "{:.4f}")] for r in all_rows if r["layer"] in shown]
        hidden = len({r["layer"] for r in all_rows} - shown)
        tables.append(report.table(f"{res.plugin}: one layer at a time on {name}",
                                   ["layer", "ratio", _sweep.kept_label(res.plugin), "drift", "agreement", "accuracy",
                                    "ms saved\nalone"], rows,
                                   first="wrap", group=True, caption=f"{hidden} layer(s) rewritten at no ratio are left out (see the JSON)"
                                   if hidden else None, optional=NO_SCORES))
    if res.fallback:
        rows = [[r["float_node"], _fmt(r["drift"], "{:.4f}"), _fmt(r["drift_reduction"], "{:+.4f}"),
                 _fmt(r["agreement"], "{:.2%}"), _fmt(r["accuracy"], "{:.2%}")] for r in _sweep.fallback_rows(res)]
        tables.append(report.table(f"{res.plugin}: drift with one node kept in float, {name}",
                                   ["node in float", "drift", "drift reduction", "agreement", "accuracy"], rows,
                                   optional=NO_SCORES))
    if res.reconstruction:
        rows = []
        for (layer, mode), pts in _group(res.reconstruction).items():
            at = lambda f: min(pts, key=lambda p: abs(p["fraction"] - f))["rel_error"]
            rows.append([layer, mode, str(pts[0]["full"]), f"{at(0.25):.3f}", f"{at(0.5):.3f}", f"{at(0.75):.3f}"])
        tables.append(report.table(f"reconstruction error ||W - W_r|| / ||W||, {name}",
                                   ["layer", "rank varied", "full", "at 1/4", "at 1/2", "at 3/4"], rows))
    return tables


# columns a model without class scores (a detector, a recognizer) or labels leaves empty
NO_SCORES = ("agreement", "accuracy")


def _group(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["layer"], r["mode"]), []).append(r)
    return out


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


@app.command("plan")
def plan_cmd(
    model: Annotated[Path, typer.Argument(help="ONNX model (never modified)")],
    plugin: Annotated[str, typer.Option("--plugin", "-p", help="tucker, svd or prune")],
    budget: Annotated[str, typer.Option("--budget", help="agreement>=A, drift<=D or accuracy>=A (fractions), comma-separated")],
    target: Annotated[Optional[str], typer.Option("--target", help="stop at this fraction of the original: macs=0.5 or latency=0.6")] = None,
    ratios: Annotated[Optional[str], typer.Option("--ratios", help="the per-layer ratio grid (start:stop:step or a list; default 0.125:0.75:0.125)")] = None,
    option: SweepOptionOpt = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="only nodes whose name matches this regex")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="the plan as a recipe (default MODEL.PLUGIN.plan.toml in the current folder)")] = None,
    json_out: JsonOpt = None,
    data: DataOpt = None,
    calib: CalibOpt = None,
    calib_rows: CalibRowsOpt = None,
    labels: LabelsOpt = "labels",
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: BatchOpt = 1,
    seed: SeedOpt = 0,
    workers: WorkersOpt = 1,
    backend: BackendOpt = "processes",
    address: AddressOpt = None,
    latency_local: LatencyLocalOpt = False,
    max_verifications: Annotated[int, typer.Option("--max-verifications", help="end-to-end verification rounds at most (1-100)")] = 12,
    compare_uniform: Annotated[bool, typer.Option("--compare-uniform", help="also find the fastest uniform ratio meeting the budget, for comparison")] = False,
    # one flag, not --attribution/--no-attribution: the pair widened help's flag column until
    # the descriptions wrapped to a word a line at 80 columns
    no_attribution: Annotated[bool, typer.Option("--no-attribution", help="skip measuring each chosen layer's effect in the final plan (one end-to-end evaluation per layer)")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Choose per-layer ratios with the largest measured latency reduction within a budget;
    write them as a recipe for `surgeon apply --recipe`. Exit 1 when the final model misses
    the budget end to end."""
    from surgeon import plan as _plan
    from surgeon import sweep as _sweep
    _setup_logging(verbose)
    with _errors():
        _check_workers(workers, backend)
        if not 1 <= max_verifications <= 100:
            raise UsageError(f"--max-verifications must be in 1..100, got {max_verifications}")
        if address and backend != "ray":
            raise UsageError("--address is for --backend ray")
        if data is None:
            raise UsageError("plan needs --data (the rows the budget is checked on)")
        budgets = _plan.parse_budget(budget)
        popts = _plan.PlanOptions(plugin, budgets, _sweep.parse_ratios(ratios) if ratios else [],
                                  _sweep_plugin_options(plugin, option), layers, _plan.parse_target(target),
                                  workers, backend, address, latency_local, max_verifications,
                                  compare_uniform=compare_uniform, attribution=not no_attribution)
        dest = output or Path(f"{model.stem}.{plugin}.plan.toml")
        _check_paths({"--output": dest, "--json": json_out}, {"model": model, "--data file": data, "--calib file": calib})
        _check_kind("--output", output, "the plan as a recipe (TOML)", (".onnx",),
                    "give a .toml path, then apply the plan with surgeon apply MODEL --recipe PATH")
        opts = _run_options(data, calib, labels, shape, calib_rows, threads, seed, batch, True, True, None)
        with ProgressReporter(enabled=json_out != "-") as progress:
            res = _plan.make_plan(model, popts, opts, progress=progress)
        report.write_text(dest, res.recipe_text())
        doc = {**res.to_json(), "output": str(dest)}
        if json_out != "-":
            _print_plan(res)
            # the command on a line of its own, whole (it is copied, not read): 169 characters in
            # one sentence on EfficientNet-Lite0
            err.print(f"wrote the plan to {dest}; apply it with:", highlight=False)
            paths = [model, "--recipe", dest, "--data", data] + (["--calib", calib] if calib else [])
            err.print("  surgeon apply " + " ".join(shlex.quote(str(p)) for p in paths), highlight=False)
        _emit_json(json_out, doc)
        if res.status != "pass":
            fails = [f"{c['name']} {c['status']}: value {c['value']}, budget {c['budget']}" for c in res.checks
                     if c["status"] != "pass"]
            _exit_for(res.status, "the plan misses the budget end to end: " + "; ".join(fails + res.notes))


def _print_plan(res) -> None:
    from surgeon.sweep import kept_label
    rows = [[c["layer"], f"{c['ratio']:g}", c["ranks"], f"{c['predicted_drift']:.4f}",
             _fmt(c["predicted_agreement"], "{:.2%}"), f"{c['predicted_saved_ms']:.4f}",
             _fmt(c["measured_drift_delta"], "{:+.4f}"), _fmt(c["measured_agreement_delta"], "{:+.2%}")]
            for c in res.choices]
    out.print(report.table(f"plan: {res.plugin} on {Path(res.model).name}, {len(res.choices)} layer(s)",
                           ["layer", "ratio", kept_label(res.plugin), "drift\nalone", "top-1\nalone", "ms saved\nalone",
                            "drift\nin plan", "top-1\nin plan"], rows, first="wrap",
                           optional=("top-1\nalone", "top-1\nin plan")))
    v = res.final.get("validation") or {}
    lat = v.get("latency") or {}
    p = res.predicted
    summary = [["drift", _fmt(p.get("drift"), "{:.4f}") + " (quadrature)", _fmt(v.get("worst_rel_l2"), "{:.4f}")],
               ["agreement", _fmt(p.get("agreement"), "{:.2%}"), _fmt(v.get("top1_agreement"), "{:.2%}")],
               ["latency vs original", _fmt(p.get("latency_ratio"), "{:.3f}"), _fmt(lat.get("ratio"), "{:.3f}")],
               ["MACs", "-", report.human(res.final.get("macs"))]]
    summary = [r for r in summary if r[0] != "agreement" or r[1:] != ["-", "-"]]
    if v.get("accuracy"):
        summary.append(["accuracy", "-", f"{v['accuracy']['original']:.2%} -> {v['accuracy']['candidate']:.2%}"])
    out.print(report.table("plan: predicted (layers alone, combined) vs measured end to end", ["", "predicted", "measured"],
                           summary))
    if res.best_uniform:
        u = res.best_uniform
        out.print(f"fastest uniform ratio meeting the budget: {u['ratio']:g}, latency ratio "
                  f"{u['latency']['ratio']:.3f}, drift {u['drift']:.4f}, agreement {_fmt(u.get('agreement'), '{:.2%}')}")
    if res.checks:
        out.print(report.checks_table(res.checks, title=f"budgets: {res.status}"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
