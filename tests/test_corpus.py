"""Every model the onnx package ships as backend test data, through every built-in plugin with
default options, through the CLI as a user runs it:

    surgeon apply MODEL --plugin P -o OUT --json REPORT

Each run ends in one of three outcomes, and never in a crash:

* rewritten: exit 0, OUT written, at least one layer rewritten;
* skipped: exit 0, nothing to rewrite, every layer the plugin looked at has a reason;
* refused: a non-zero exit with one clear error line (exit 1 or 2).

A crash is: a traceback or "internal error" in the output, another exit code, an output that
fails onnx.checker, a file left at OUT after a non-zero exit, or a modified input.

The default run takes a representative subset (convs, FC layers, odd ops, a model onnxruntime
cannot run); `pytest -m slow tests/test_corpus.py` sweeps all of them (issue 8 saw 121 of 660
runs write their output and then exit non-zero). `python -m tests.test_corpus` prints the counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from surgeon.cli import app
from surgeon.plugin import registry

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("light", "pytorch-converted", "pytorch-operator", "simple")


def corpus() -> list[Path]:
    """light/*.onnx, and */model.onnx in the other three folders."""
    out: list[Path] = []
    for kind in KINDS:
        folder = DATA / kind
        out += sorted(folder.glob("*.onnx")) + sorted(folder.glob("*/model.onnx"))
    return out


def model_id(path: Path) -> str:
    return path.stem if path.parent.name in KINDS else path.parent.name


BUILTINS = [p.name for p in registry() if registry().origin(p.name).startswith("built-in")]

# a representative subset for the default run: convs of several kinds, FC layers, a 3-D MatMul,
# ops onnxruntime does not implement, a model with no weights at all
SUBSET = ("test_Conv2d", "test_Conv2d_groups", "test_Conv1d", "test_ConvTranspose2d", "test_Linear",
          "test_operator_mm", "test_operator_addmm", "test_operator_conv", "test_Embedding",
          "test_operator_symbolic_override", "test_operator_non_float_params", "test_sequence_model1",
          "test_gradient_of_add", "test_strnorm_model_monday_empty_output", "test_single_relu_model")


@dataclass
class Outcome:
    model: str
    plugin: str
    kind: str  # rewritten | skipped | refused | crash
    code: int
    message: str


def run_one(model: Path, plugin: str, tmp: Path) -> Outcome:
    src = tmp / "in" / f"{model_id(model)}.onnx"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(model.read_bytes())
    out, rep = tmp / "out.onnx", tmp / "report.json"
    for p in (out, rep):
        if p.exists():
            p.unlink()
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    r = CliRunner().invoke(app, ["apply", str(src), "--plugin", plugin, "-o", str(out), "--json", str(rep)])
    text = (r.stdout or "") + (r.stderr or "")
    stderr = (r.stderr or "").strip()
    first = stderr.splitlines()[-1] if stderr else ""
    name = model_id(model)

    def crash(why: str) -> Outcome:
        return Outcome(name, plugin, "crash", r.exit_code, f"{why}: {first or text[-300:]}")

    if hashlib.sha256(src.read_bytes()).hexdigest() != before:
        return crash("input modified")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return crash(f"exception {type(r.exception).__name__}: {r.exception}")
    if "Traceback" in text or "internal error" in text:
        return crash("traceback")
    if r.exit_code not in (0, 1, 2):
        return crash(f"exit code {r.exit_code}")
    if r.exit_code != 0:
        if out.exists():
            return crash("output left behind after a non-zero exit")
        if not stderr.splitlines() or "error" not in first:
            return crash("no error line")
        return Outcome(name, plugin, "refused", r.exit_code, first)
    if not out.exists():
        return crash("exit 0 without output")
    try:
        onnx.checker.check_model(str(out))
    except Exception as exc:  # noqa: BLE001 - any checker failure is an invalid output
        return crash(f"invalid output: {str(exc).splitlines()[0][:200]}")
    doc = json.loads(rep.read_text())
    layers = doc["layers"] if "layers" in doc else [l for step in doc.get("steps", []) for l in step.get("layers", [])]
    if any(l["status"] != "rewritten" and not l.get("reason") for l in layers):
        return crash("a skipped layer without a reason")
    rewritten = doc.get("rewritten", sum(l["status"] == "rewritten" for l in layers))
    return Outcome(name, plugin, "rewritten" if rewritten else "skipped", 0,
                   "" if rewritten else "; ".join(sorted({l["reason"] for l in layers}))[:200])


def check(o: Outcome) -> None:
    assert o.kind != "crash", f"{o.model} x {o.plugin}: exit {o.code}: {o.message}"


CASES = [(m, p) for m in corpus() for p in BUILTINS]


@pytest.fixture(autouse=True)
def _quick_guard(monkeypatch):
    monkeypatch.setenv("SURGEON_GUARD_CACHE", os.environ.get("SURGEON_GUARD_CACHE", "1"))


def test_the_corpus_is_there():
    assert len(corpus()) > 100 and set(BUILTINS) >= {"tucker", "svd", "int8"}
    assert set(SUBSET) <= {model_id(m) for m in corpus()}


@pytest.mark.parametrize("model,plugin", [(m, p) for m, p in CASES if model_id(m) in SUBSET],
                         ids=lambda v: model_id(v) if isinstance(v, Path) else v)
def test_subset(model, plugin, tmp_path):
    check(run_one(model, plugin, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("model,plugin", CASES, ids=lambda v: model_id(v) if isinstance(v, Path) else v)
def test_full_sweep(model, plugin, tmp_path):
    check(run_one(model, plugin, tmp_path))


def main() -> None:  # pragma: no cover - the sweep with counts, for the report
    import sys
    import tempfile
    import time
    only = set(sys.argv[1:])
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        # the light zoo models (AlexNet, VGG-19, ResNet-50 ...) take longest: last
        for m, p in sorted(CASES, key=lambda c: c[0].parent.name == "light"):
            if only and model_id(m) not in only and p not in only:
                continue
            t0 = time.perf_counter()
            o = run_one(m, p, Path(tmp))
            outcomes.append(o)
            print(json.dumps({**o.__dict__, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    counts = Counter((o.plugin, o.kind) for o in outcomes)
    for plugin in BUILTINS:
        print(plugin, {k: counts[(plugin, k)] for k in ("rewritten", "skipped", "refused", "crash")})


if __name__ == "__main__":  # pragma: no cover
    main()
