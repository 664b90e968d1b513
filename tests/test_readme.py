"""The README's two commands: the main job runs, and CI runs the same test command."""

import re
import shlex
import shutil

from typer.testing import CliRunner

from surgeon.cli import app
from tests.models import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    _, test_cmd = readme_commands()
    install_and_test = test_cmd.split("activate && ", 1)[1]
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_runs(tmp_path):
    main_cmd, _ = readme_commands()
    surgeon_part = next(p.strip() for p in main_cmd.split("&&") if p.strip().startswith("surgeon "))
    args = shlex.split(surgeon_part)[1:]
    for i, a in enumerate(args):
        if a.startswith("sample_models/"):
            shutil.copy(ROOT / a, tmp_path / a.split("/")[-1])
            args[i] = str(tmp_path / a.split("/")[-1])
        elif a.startswith("examples/"):
            args[i] = str(ROOT / a)
        elif a.endswith(".onnx"):  # the output
            args[i] = str(tmp_path / a)
    result = CliRunner().invoke(app, args + ["--json", str(tmp_path / "report.json"), "--no-latency"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "after each step" in result.stdout and "budgets: pass" in result.stdout
    assert (tmp_path / "digits_cnn.small.onnx").exists()
