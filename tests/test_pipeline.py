"""The pipeline and the commands over it: nothing half-done, honest data split, checked
arguments, progress in logs, a gate that NaN cannot pass. Each test is a case a user met."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from surgeon import pipeline
from surgeon.budgets import Budgets
from surgeon.cli import app
from surgeon.recipe import Step
from tests.models import CNN, CNN_CALIB, CNN_TEST, MLP, MLP_TEST, conv_model, init, make_model, tensor

runner = CliRunner()


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def cnn(cnn_copy):
    return cnn_copy


def custom_op_model(tmp_path):
    """A conv followed by an op of a custom domain: onnx checks it, onnxruntime cannot run it."""
    m = conv_model(relu=False)
    m.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], name="custom", domain="com.example"))
    m.graph.output[0].CopyFrom(tensor("z", [1, 32, 12, 12]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    return p


def test_a_model_onnxruntime_cannot_run_is_still_rewritten(tmp_path):
    p = custom_op_model(tmp_path)
    r = runner.invoke(app, ["apply", str(p), "--plugin", "tucker", "--guard", "none", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "skipped: onnxruntime cannot run this model" in r.stderr
    assert (tmp_path / "custom.tucker.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["validation_skipped"].startswith("skipped:")
    # with a budget the gate cannot be checked: a failure, and nothing written
    (tmp_path / "custom.tucker.onnx").unlink()
    r = runner.invoke(app, ["apply", str(p), "--plugin", "tucker", "--guard", "none", "--max-drift", "0.1"])
    assert r.exit_code == 1 and "budgets cannot be checked" in r.stderr
    assert not (tmp_path / "custom.tucker.onnx").exists()


def test_only_data_splits_calibration_rows_from_scored_rows(tmp_path):
    """int8 with only --data: the rows it calibrates on are never scored."""
    result = pipeline.run(CNN, [Step("int8")], pipeline.RunOptions(data=CNN_TEST, latency=False))
    d = result.split.to_json()
    assert d["calibration"]["rows"] == 150 and d["evaluation"]["rows"] == 300
    assert np.array_equal(result.split.calib.inputs["input"], np.load(CNN_TEST)["input"][:150])
    assert np.array_equal(result.split.eval.inputs["input"], np.load(CNN_TEST)["input"][150:])
    assert result.validation["samples"] == 300
    # a plugin that fits on nothing scores every row
    result = pipeline.run(CNN, [Step("tucker", {"fit": "weights", "guard": "none"})],
                          pipeline.RunOptions(data=CNN_TEST, latency=False))
    assert result.validation["samples"] == 450 and result.split.calib is None
    # --calib-rows moves the cut; too many rows for the file is a clear error
    result = pipeline.run(CNN, [Step("int8")], pipeline.RunOptions(data=CNN_TEST, calib_rows=50, latency=False))
    assert len(result.split.calib) == 50 and result.validation["samples"] == 400
    r = runner.invoke(app, ["apply", str(CNN), "-p", "int8", "--data", str(CNN_TEST), "--calib-rows", "450",
                            "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 2 and "cannot be split" in r.stderr and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flag", ["-o", "--json"])
@pytest.mark.parametrize("target", ["data", "calib"])
def test_no_output_may_be_an_input(cnn, tmp_path, flag, target):
    data, calib = tmp_path / "test.npz", tmp_path / "calib.npz"
    data.write_bytes(CNN_TEST.read_bytes())
    calib.write_bytes(CNN_CALIB.read_bytes())
    before = {p: p.read_bytes() for p in (cnn, data, calib)}
    out = {"data": data, "calib": calib}[target]
    r = runner.invoke(app, ["apply", str(cnn), "-p", "tucker", "--data", str(data), "--calib", str(calib), flag, str(out)])
    assert r.exit_code == 2 and "would overwrite the" in r.stderr, r.output
    assert all(p.read_bytes() == b for p, b in before.items())


def test_output_folder_gets_the_default_name(cnn, tmp_path):
    (tmp_path / "out").mkdir()
    r = runner.invoke(app, ["apply", str(cnn), "-p", "tucker", "--guard", "none", "--no-validate", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert files(tmp_path / "out") == ["cnn.tucker.onnx"]


@pytest.mark.parametrize("args,message", [
    (["--threads", "-3"], "--threads must be >= 0"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--repeats", "2"], "--repeats must be >= 5"),
    (["--min-agreement", "99"], "min_agreement = 99.0 is out of range; it must be a fraction in (0, 1]"),
    (["--max-drift", "-1"], "max_drift = -1.0 is out of range; it must be a number > 0"),
    (["--max-latency-ratio", "1", "--no-latency"], "max_latency_ratio needs the latency measurement"),
    (["--min-accuracy", "0.9", "--data", str(MLP_TEST), "--labels", "nope"], "no array named 'nope'"),
    (["--ratio", "0.5", "--option", "ratio=0.25"], "ratio is given twice"),
    (["--ratio", "0.5", "--energy", "0.9"], "choose one way to set ranks"),
    (["--option", "svd.rank=3"], "'svd' is not a plugin of this run"),
])
def test_arguments_are_checked_before_any_work(tmp_path, args, message):
    p = tmp_path / "mlp.onnx"
    p.write_bytes(MLP.read_bytes())
    r = runner.invoke(app, ["apply", str(p), "-p", "tucker", *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert files(tmp_path) == ["mlp.onnx"]


@pytest.mark.parametrize("args,message", [
    (["--batch", "-2"], "--batch must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--min-accuracy", "0.5"], "min_accuracy needs labels"),
])
def test_validate_checks_its_numbers(args, message):
    r = runner.invoke(app, ["validate", str(MLP), str(MLP), *args])
    assert r.exit_code == 2 and message in r.stderr, r.output


def test_progress_lines_when_stderr_is_not_a_terminal(cnn):
    r = runner.invoke(app, ["apply", str(cnn), "-p", "tucker", "--guard", "none", "--no-latency"])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.stderr.splitlines() if l.startswith("[")]
    assert any("tucker:" in l for l in lines) and any("validating" in l for l in lines)
    # the start and the end of the validation read as such, not as two validations
    assert sum(l.endswith("] validating") for l in lines) == 1
    assert lines[-1].endswith("validating: done"), lines


def nan_model(tmp_path) -> str:
    """The MLP with its last layer's bias set to NaN: every output is NaN."""
    m = onnx.load(str(MLP))
    for t in m.graph.initializer:
        if t.name == "fc3.bias":
            t.CopyFrom(init(t.name, np.full(tuple(t.dims), np.nan, np.float32)))
    p = tmp_path / "nan.onnx"
    onnx.save(m, p)
    return str(p)


def test_nan_outputs_fail_every_budget(tmp_path):
    bad = nan_model(tmp_path)
    r = runner.invoke(app, ["gate", str(MLP), bad, "--data", str(MLP_TEST), "--max-drift", "0.05", "--min-accuracy",
                            "0.01", "--max-size-mb", "100", "--no-latency", "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 1, r.output
    checks = json.loads((tmp_path / "g.json").read_text())["checks"]
    assert [c["status"] for c in checks] == ["fail", "fail", "fail"]
    assert all("non-finite" in c["detail"] for c in checks)


def test_gate_takes_budgets_from_pyproject(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.surgeon.gate]\nmax_drift = 0.000001\n")
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.onnx"
    m = onnx.load(str(MLP))
    for t in m.graph.initializer:
        if t.name == "fc3.bias":
            t.CopyFrom(init(t.name, onnx.numpy_helper.to_array(t) + 0.5))
    onnx.save(m, other)
    r = runner.invoke(app, ["gate", str(MLP), str(other), "--data", str(MLP_TEST), "--no-latency"])
    assert r.exit_code == 1 and "max_drift fail" in r.stderr
    r = runner.invoke(app, ["gate", str(MLP), str(other), "--data", str(MLP_TEST), "--no-latency", "--max-drift", "1"])
    assert r.exit_code == 0, r.output  # the command line wins
    (tmp_path / "pyproject.toml").write_text("[tool.surgeon.gate]\nmax_drfit = 1\n")
    r = runner.invoke(app, ["gate", str(MLP), str(other), "--data", str(MLP_TEST), "--no-latency"])
    assert r.exit_code == 2 and "unknown budget(s) max_drfit" in r.stderr


def test_inconclusive_latency_exits_3(monkeypatch):
    """A latency interval that straddles the budget is neither pass nor fail."""
    from surgeon.validate import validate as real

    def straddling(*args, **kwargs):
        out = real(*args, **kwargs)
        out.latency.update(ratio=1.0, ratio_low=0.9, ratio_high=1.1)
        return out

    monkeypatch.setattr(pipeline, "validate", straddling)
    r = runner.invoke(app, ["gate", str(MLP), str(MLP), "--data", str(MLP_TEST), "--max-latency-ratio", "1.0",
                            "--repeats", "10"])
    assert r.exit_code == 3 and "inconclusive" in r.stderr


def test_apply_gate_writes_only_a_passing_model(cnn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["apply", str(cnn), "-p", "tucker", "--guard", "none", "--data", str(CNN_TEST), "--no-latency", "--gate"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--gate needs at least one budget" in r.stderr
    r = runner.invoke(app, args + ["--max-drift", "0.000001", "--junit", str(tmp_path / "j.xml")])
    assert r.exit_code == 1
    assert "cnn.tucker.onnx" not in files(tmp_path) and "<failure" in (tmp_path / "j.xml").read_text()
    (tmp_path / "pyproject.toml").write_text("[tool.surgeon.gate]\nmax_drift = 0.5\nmin_accuracy = 0.9\n")
    r = runner.invoke(app, args + ["--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "cnn.tucker.onnx" in files(tmp_path)
    assert [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["checks"]] == ["max_drift", "min_accuracy"]


def test_same_command_same_bytes(cnn, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        r = runner.invoke(app, ["apply", str(cnn), "-p", "tucker", "-p", "int8", "--guard", "none",
                                "--calib", str(CNN_CALIB), "--data", str(CNN_TEST), "--no-latency", "-o", str(out)])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_budgets_api_ranges():
    with pytest.raises(Exception, match="out of range"):
        Budgets.from_mapping({"max_size_mb": 0})
    assert Budgets(max_drift=0.1).merged(Budgets(max_drift=0.2, min_agreement=0.9)).to_json() == {
        "max_drift": 0.1, "min_agreement": 0.9}


def test_nothing_is_written_to_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's helpers like to drop temporary files in the cwd (symbolic shape inference
    writes sym_shape_infer_temp.onnx when it gives up); a run leaves only what it was asked for."""
    from tests.models import detector_model
    work = tmp_path / "work"
    work.mkdir()
    src = tmp_path / "det.onnx"
    onnx.save(detector_model(), src)
    monkeypatch.chdir(work)
    for plugin in ("tucker", "int8"):
        r = runner.invoke(app, ["apply", str(src), "-p", plugin, "--no-latency", "--shape", "images=1x3x32x48",
                                "-o", str(tmp_path / f"{plugin}.onnx")])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(src)])
    assert r.exit_code == 0, r.output
    custom = custom_op_model(tmp_path)  # symbolic inference gives up on its unknown op
    for args in (["inspect", str(custom)], ["apply", str(custom), "-p", "tucker", "--guard", "none",
                                             "-o", str(tmp_path / "c.onnx")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    assert files(work) == []


def test_an_agreement_budget_is_refused_before_the_surgery_when_declared_shapes_lie(monkeypatch, tmp_path):
    """The OCR recognizer declares a (1, seqlen) output and returns (T, 1, 8210): the declared
    shape says class scores, one sample through the model says otherwise, before any plugin runs."""
    from surgeon import engine
    from surgeon.errors import UsageError

    w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Unsqueeze", ["h", "axes"], ["y"], name="seq")]
    lying = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", [1, "T"])],
                       [init("w", w), init("axes", np.array([1], np.int64))])
    ran = []
    monkeypatch.setattr(engine, "apply", lambda *a, **k: ran.append(1))
    np.savez(tmp_path / "d.npz", x=np.ones((4, 8), np.float32))
    opts = pipeline.RunOptions(data=tmp_path / "d.npz", latency=False)
    with pytest.raises(UsageError, match="min_agreement cannot be measured"):
        pipeline.run(lying, [Step("svd", {"ratio": 0.5})], opts, Budgets(min_agreement=0.9))
    assert not ran


def test_an_agreement_budget_without_class_scores_is_refused_before_the_surgery(monkeypatch):
    """A feature-map output (and a (T, N, C) sequence) has no top-1: refused up front, before
    a plugin runs; a model whose output rank is unknown is left to the measurement."""
    from surgeon import budgets as _budgets, engine
    from surgeon.errors import UsageError

    ran = []
    monkeypatch.setattr(engine, "apply", lambda *a, **k: ran.append(1))
    with pytest.raises(UsageError, match="min_agreement cannot be measured"):
        pipeline.run(conv_model(), [Step("tucker", {"ratio": 0.5})], pipeline.RunOptions(latency=False),
                     Budgets(min_agreement=0.9))
    assert not ran
    seq = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [5, "N", 10])],
                     [tensor("y", [5, "N", 10])])
    assert not _budgets.may_have_scores(seq)
    assert _budgets.may_have_scores(onnx.load(CNN))
    unknown = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", ["N", 10])],
                         [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    assert _budgets.may_have_scores(unknown)


def test_a_rewritten_model_onnxruntime_cannot_load_fails_instead_of_skipping_validation(monkeypatch):
    """A plugin defect that leaves a model onnxruntime refuses (here a float64 bias on a float
    conv, what prune's compensation once wrote on a conv without a bias) is a failure, never a
    pass with the validation skipped; the original loads, so the surgery is to blame."""
    from surgeon import channel_removal
    real = channel_removal._add_bias
    monkeypatch.setattr(channel_removal, "_add_bias", lambda node, index, delta, dtype: real(node, index, delta, np.float64))
    result = pipeline.run(CNN, [Step("prune", {"ratio": 0.5, "compensate": "mean"})],
                          pipeline.RunOptions(data=CNN_TEST, latency=False))
    assert result.status == "fail"
    assert result.outcome.not_validated.failed
    assert any("the rewritten model does not load in onnxruntime, the original does" in f
               for f in result.outcome.failures), result.outcome.failures


def test_models_that_cannot_be_compared_are_an_error_not_a_skipped_validation(monkeypatch):
    """A rewrite that changed an output's shape must not pass with validation skipped."""
    from surgeon.errors import ModelError

    def differ(*args, **kwargs):
        raise ModelError("output 'logits' has shape [1, 10] in the original, [1, 9] after")
    monkeypatch.setattr(pipeline, "validate", differ)
    with pytest.raises(ModelError, match="has shape"):
        pipeline.run(CNN, [Step("prune", {"ratio": 0.5})], pipeline.RunOptions(data=CNN_TEST, latency=False))


def test_the_same_file_for_calib_and_data_is_a_warning_not_a_split_note():
    result = pipeline.run(CNN, [Step("prune", {"ratio": 0.5})],
                          pipeline.RunOptions(data=CNN_TEST, calib=CNN_TEST, latency=False))
    assert result.split.warning.startswith("--calib and --data name the same file")
    assert result.split.warning in result.warnings
    apart = pipeline.run(CNN, [Step("prune", {"ratio": 0.5})],
                         pipeline.RunOptions(data=CNN_TEST, calib=CNN_CALIB, latency=False))
    assert apart.split.warning == "" and not apart.warnings


def test_validation_of_a_model_whose_inputs_cannot_be_synthesized_says_why(tmp_path):
    """A string input: nothing to synthesize, so validation is skipped with the reason and what
    to pass, and the run is not failed for it."""
    m = make_model([helper.make_node("Identity", ["s"], ["t"]), helper.make_node("Relu", ["x"], ["y"])],
                   [helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [1]), tensor("x", [1, 4])],
                   [helper.make_tensor_value_info("t", onnx.TensorProto.STRING, [1]), tensor("y", [1, 4])])
    p = tmp_path / "strings.onnx"
    onnx.save(m, p)
    result = pipeline.run(p, [Step("prune", {"ratio": 0.5})], pipeline.RunOptions(latency=False))
    assert result.split.unsynthesizable.startswith("cannot synthesize inputs")
    assert not result.outcome.not_validated.failed and result.status == "pass"
    assert result.outcome.validation_skipped.endswith("; pass --data")


def test_the_github_step_summary_is_appended_to(tmp_path, monkeypatch):
    """GitHub asks for appends to $GITHUB_STEP_SUMMARY: replacing it dropped what the step wrote
    before (a heading, a second gate). Any other --markdown file is replaced."""
    summary = tmp_path / "step_summary"
    summary.write_text("## Model checks\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    args = ["gate", str(MLP), str(MLP), "--data", str(MLP_TEST), "--max-drift", "0.01", "--no-latency"]
    for _ in range(2):
        r = runner.invoke(app, args + ["--markdown", str(summary)])
        assert r.exit_code == 0, r.output
    text = summary.read_text()
    assert text.startswith("## Model checks\n") and text.count("max_drift") == 2
    other = tmp_path / "gate.md"
    for _ in range(2):
        assert runner.invoke(app, args + ["--markdown", str(other)]).exit_code == 0
    assert other.read_text().count("max_drift") == 1
