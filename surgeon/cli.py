"""The `surgeon` command: parses options, calls the API, prints. No logic of its own.

Exit codes: 0 ok, 1 a budget was exceeded or a transform failed, 2 bad usage or unreadable input.
Tables go to stdout (or JSON with `--json -`); diagnostics and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from surgeon import calibration, engine, model as model_io, report
from surgeon.errors import BudgetExceeded, SurgeonError, UsageError
from surgeon.plugin import registry
from surgeon.profile import profile
from surgeon.validate import validate as run_validation

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Model surgery for ONNX: factorize, prune and quantize, then check drift and latency.")
out = Console()
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("surgeon")

JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the report as JSON to this file ('-' = stdout, no tables)")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option("--shape", help="concrete input shape NAME=1x3x224x224 (repeatable); a dynamic leading batch dim defaults to 1")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help=".npz (keys = input names, optional labels) or .npy (single input) for validation and calibration")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads (0 = all cores)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show skipped layers and why; more logging")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_time=False, show_path=False)], force=True)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Our errors become one line on stderr and an exit code; nothing else leaks a traceback
    unless SURGEON_DEBUG is set."""
    try:
        yield
    except typer.Exit:
        raise
    except SurgeonError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug, not bad input: say so plainly
        import os
        if os.environ.get("SURGEON_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set SURGEON_DEBUG=1 for a traceback)",
                  highlight=False)
        raise typer.Exit(1) from None


def _emit_json(dest: str | None, obj: dict, protect: tuple[Path, ...] = ()) -> None:
    if dest == "-":
        sys.stdout.write(json.dumps(report._jsonable(obj), indent=2) + "\n")
    elif dest:
        path = Path(dest)
        if any(p.exists() and path.exists() and path.resolve() == p.resolve() for p in protect):
            raise UsageError(f"--json {dest} would overwrite a model; choose another report path")
        if not path.parent.exists():
            raise UsageError(f"{path.parent}: report folder does not exist")
        report.write_json(path, obj)
        err.print(f"report written to {dest}")


def _synthesized(model, shapes, seed: int = 0):
    return calibration.synthesize(model, shapes, samples=calibration.DEFAULT_SYNTHETIC_SAMPLES, seed=seed)


def _shapes_of(ds) -> dict[str, tuple[int, ...]]:
    """Input shapes of one batch of a data set (the model's fixed batch, or 1)."""
    return {k: (ds.batch or 1,) + tuple(v.shape[1:]) for k, v in ds.inputs.items()} if ds is not None else {}


def _parse_kv(items: list[str] | None) -> dict[str, str]:
    opts = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"bad --option {item!r}: expected key=value")
        opts[key.strip().replace("-", "_")] = value.strip()
    return opts


def _parse_flags(args: list[str], plug) -> dict[str, str]:
    """Plugin options written as flags: `--key value`, `--key=value`, `--flag` / `--no-flag`
    for booleans. Anything else is a usage error that lists the plugin's options."""
    from surgeon.plugin import option_help
    kinds = {name: tp for name, tp, _, _ in option_help(plug)}
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
                raise UsageError(f"no such option --{key.replace('_', '-')} (plugin '{plug.name}' options: "
                                 f"{', '.join(sorted(kinds)) or 'none'}; see `surgeon plugins`)")
            if i + 1 >= len(args):
                raise UsageError(f"--{key.replace('_', '-')} needs a value")
            i += 1
            value = args[i]
        opts[key] = value
        i += 1
    return opts


@app.command("plugins")
def plugins_cmd(json_out: JsonOpt = None) -> None:
    """List the available plugins (built-in and installed) with their options."""
    with _errors():
        reg = registry()
        if json_out:
            from surgeon.plugin import option_help
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
        m = model_io.load(model)
        prepared = engine.prepare(m)
        shapes = calibration.resolve_shapes(prepared, calibration.parse_shapes(shape))
        prof = profile(prepared, shapes)
        prof.file_bytes = model.stat().st_size
        _emit_json(json_out, {"model": str(model), "input_shapes": shapes, **prof.to_json()}, protect=(model,))
        if json_out != "-":
            out.print(report.profile_table(prof, title=f"{model.name}"))
            out.print(f"size on disk: {report.human_bytes(prof.file_bytes)}")


@app.command("apply", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def apply_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="ONNX model to operate on (never modified)")],
    plugin: Annotated[str, typer.Option("--plugin", "-p", help="plugin name (see `surgeon plugins`)")],
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="shorthand for --option ratio=R")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", help="plugin option key=value (repeatable)")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="only nodes whose name matches this regex")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output path (default: MODEL.PLUGIN.onnx beside the input)")] = None,
    json_out: JsonOpt = None,
    data: DataOpt = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="calibration data for the plugin, if not --data")] = None,
    labels: Annotated[str, typer.Option("--labels", help="key of the labels array in the --data .npz")] = "labels",
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="skip drift and latency measurement")] = False,
    external_data: Annotated[bool, typer.Option("--external-data", help="save weights in a separate .data file")] = False,
    seed: Annotated[int, typer.Option("--seed", help="seed for synthesized data and randomized methods")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Apply a plugin, print what changed, then measure drift and latency.

    Plugin options can also be given as flags: `--energy 0.9`, `--rank-method vbmf`,
    `--ranks 8,16`, `--no-per-channel` are `--option energy=0.9` and so on.
    """
    _setup_logging(verbose)
    with _errors():
        reg = registry()
        plug = reg.get(plugin)
        opts = {**_parse_flags(ctx.args, plug), **_parse_kv(option)}
        if ratio is not None:
            opts["ratio"] = str(ratio)
        plug.make_options(opts)  # fail on a wrong option before any work
        target = output or model.with_name(f"{model.stem}.{plugin}.onnx")
        if target.exists() and model.exists() and target.resolve() == model.resolve():
            raise UsageError("the output would overwrite the input model; choose another path with -o")
        if json_out not in (None, "-") and Path(json_out).resolve() in (model.resolve(), target.resolve()):
            raise UsageError(f"--json {json_out} would overwrite a model; choose another report path")
        m = model_io.load(model)
        given = calibration.load_data(data, m, labels_key=labels) if data else None
        calib_data = calibration.load_data(calib, m, labels_key=labels) if calib else None
        # dynamic dims take the data's sizes unless --shape says otherwise
        shapes = {**_shapes_of(calib_data or given), **calibration.parse_shapes(shape)}
        concrete = calibration.resolve_shapes(m, shapes)
        synthetic = None if given and calib_data else _synthesized(m, concrete, seed)
        eval_data = given or synthetic
        plug_data = calib_data or eval_data

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=json_out == "-") as bar:
            task = bar.add_task(f"{plugin}", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=f"{plugin}: {what}"[:60])

            result = engine.apply(m, plug, opts, layers=layers, data=plug_data, input_shapes=shapes,
                                  threads=threads, seed=seed, progress=progress)
        model_io.save(result.model, target, external_data=external_data or None, protect=(model,))
        result.after.file_bytes = target.stat().st_size
        result.before.file_bytes = model.stat().st_size
        doc = {"input": str(model), "output": str(target), **result.to_json()}
        if json_out != "-":
            out.print(report.layers_table(result.layers, title=f"{plugin} on {model.name}"))
            if verbose and result.skipped:
                out.print(report.skipped_table(result.layers))
            out.print(f"{len(result.rewritten)} rewritten, {len(result.skipped)} skipped"
                      + ("" if verbose or not result.skipped else " (-v shows which and why)"))
            steps = report.steps_table(result.extras)
            if steps is not None:
                out.print(steps)
            out.print(report.totals_table(result.before, result.after))
            for w in result.extras.get("warnings", []):
                err.print(f"[yellow]warning:[/] {w}")
            out.print(f"wrote {target} in {result.seconds:.1f} s")
        if not no_validate:
            if eval_data.synthetic and json_out != "-":
                err.print("[yellow]note:[/] validating on synthesized inputs; pass --data for real drift and accuracy")
            v = run_validation(m, result.model, eval_data, threads=threads)
            doc["validation"] = v.to_json()
            if json_out != "-":
                for t in report.validation_tables(doc["validation"]):
                    out.print(t)
        _emit_json(json_out, doc, protect=(model, target))
        failed = [l for l in result.layers if l.reason.startswith("plugin error:")]
        if failed:
            raise SurgeonError(f"{plugin} failed on {len(failed)} layer(s), left as they were: "
                               + "; ".join(f"{l.layer}: {l.reason}" for l in failed[:3]))
        budget = result.extras.get("fallback") or {}
        if budget.get("met") is False:
            raise BudgetExceeded(f"{plugin}: the budget {budget.get('budget')} was not met; {target} holds the "
                                 "closest model found")


@app.command("validate")
def validate_cmd(
    original: Annotated[Path, typer.Argument(help="the reference model")],
    candidate: Annotated[Path, typer.Argument(help="the model after surgery")],
    data: DataOpt = None,
    labels: Annotated[str, typer.Option("--labels", help="key of the labels array in the --data .npz")] = "labels",
    json_out: JsonOpt = None,
    shape: ShapeOpt = None,
    threads: ThreadsOpt = 0,
    batch: Annotated[int, typer.Option("--batch", help="batch size for the latency measurement")] = 1,
    max_drift: Annotated[Optional[float], typer.Option("--max-drift", help="fail (exit 1) if any output's relative L2 drift exceeds this")] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="fail (exit 1) if top-1 agreement falls below this (0-1)")] = None,
    min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", help="fail (exit 1) if candidate speedup is below this (e.g. 1.0)")] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="skip the latency measurement")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Compare two models: output drift (and accuracy with labels), and interleaved A/B latency."""
    with _errors():
        a = model_io.load(original)
        b = model_io.load(candidate)
        given = calibration.load_data(data, a, labels_key=labels) if data else None
        concrete = calibration.resolve_shapes(a, {**_shapes_of(given), **calibration.parse_shapes(shape)})
        ds = given or _synthesized(a, concrete, seed)
        v = run_validation(a, b, ds, threads=threads, latency=not no_latency, latency_batch=batch).to_json()
        failures = []
        if max_drift is not None and v["worst_rel_l2"] > max_drift:
            failures.append(f"drift {v['worst_rel_l2']:.4g} > budget {max_drift}")
        if min_agreement is not None and (v["top1_agreement"] is None or v["top1_agreement"] < min_agreement):
            failures.append(f"top-1 agreement {v['top1_agreement']} < budget {min_agreement}")
        if min_speedup is not None and v["latency"] and v["latency"]["speedup"] < min_speedup:
            failures.append(f"speedup {v['latency']['speedup']:.3f} < budget {min_speedup}")
        v["budget_failures"] = failures
        if json_out != "-":
            for t in report.validation_tables(v):
                out.print(t)
        _emit_json(json_out, {"original": str(original), "candidate": str(candidate), **v},
                   protect=(original, candidate))
        if failures:
            raise BudgetExceeded("; ".join(failures))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
