"""The CI examples in examples/ci run as written: compress, then gate; each exit code checked
(passing budget, failing budget, corrupt candidate, missing data file)."""

import os
import re
import shlex
import shutil

import pytest
from typer.testing import CliRunner

from surgeon.cli import app
from tests.models import ROOT

runner = CliRunner()
EXAMPLES = ROOT / "examples" / "ci"


def workflow_commands() -> list[str]:
    """The `surgeon ...` commands of the workflow's `run: >-` blocks, folded as YAML folds them."""
    lines = (EXAMPLES / "surgeon-gate.yml").read_text().splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.strip() == "run: >-":
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) < indent:
                    break
                block.append(nxt.strip())
            text = " ".join(b for b in block if b)
            if text.startswith("surgeon "):
                commands.append(text)
    return commands


def precommit_command() -> str:
    text = (EXAMPLES / "pre-commit-config.yaml").read_text()
    return re.search(r"entry: (surgeon .+)", text).group(1)


def run(command: str, **env) -> object:
    args = [os.path.expandvars(a) for a in shlex.split(command)][1:]
    return runner.invoke(app, args, env=env or None)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    (tmp_path / "build").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    return tmp_path


def test_workflow_and_precommit_commands(workdir):
    compress, gate = workflow_commands()
    r = run(compress)
    assert r.exit_code == 0, r.output
    assert (workdir / "build" / "digits_cnn.small.onnx").exists()

    # the gate as written passes (every budget holds), and writes JUnit + the job summary
    r = run(gate)
    assert r.exit_code in (0, 3), r.output  # 3 only if the runner is too noisy to decide latency
    junit = (workdir / "build" / "gate.xml").read_text()
    assert junit.count("<testcase") == 3 and 'failures="0"' in junit
    assert "| max_drift |" in (workdir / "summary.md").read_text()

    hook = precommit_command()
    assert run(hook).exit_code == 0

    # a failing budget: exit 1, and the JUnit report shows the failed check
    failing = hook.replace("--max-drift 0.05", "--max-drift 0.000001") + " --junit build/fail.xml"
    r = run(failing)
    assert r.exit_code == 1 and "max_drift fail" in r.stderr
    assert "<failure" in (workdir / "build" / "fail.xml").read_text()

    # a missing data file and a corrupt candidate: exit 2 with one line
    r = run(hook.replace("digits_cnn_test.npz", "missing.npz"))
    assert r.exit_code == 2 and "no such data file" in r.stderr
    (workdir / "build" / "digits_cnn.small.onnx").write_bytes(b"\x08\x07garbage")
    r = run(hook)
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "Traceback" not in r.output
