"""The `surgeon` command: exit codes, output files, tables/JSON, third-party plugins."""

import json

import numpy as np

import pytest
from typer.testing import CliRunner

import surgeon.plugin
from surgeon.cli import app
from tests.models import CNN, CNN_TEST, MLP

runner = CliRunner()
FIXTURE = CNN.parent.parent / "tests" / "fixtures" / "relu_clip_plugin.py"


def install_package(site, monkeypatch, dist: str, module: str, source: str, entry_point: str):
    """Install a plugin package the way pip would leave it: a module plus a dist-info with
    an entry point in the `surgeon.plugins` group, found through sys.path."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[surgeon.plugins]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(surgeon.plugin, "_default", None)  # rediscover entry points


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    install_package(tmp_path / "site", monkeypatch, "surgeon-relu-clip", "relu_clip_plugin", FIXTURE.read_text(),
                    "relu-clip = relu_clip_plugin:PLUGINS")
    yield
    surgeon.plugin._default = None


def test_plugins_lists_builtins_and_third_party(third_party):
    r = runner.invoke(app, ["plugins", "--json", "-"])
    assert r.exit_code == 0, r.output
    plugins = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert "relu-clip" in plugins and "surgeon-relu-clip" in plugins["relu-clip"]["from"]
    assert plugins["relu-clip"]["options"][0]["name"] == "floor"


def test_apply_third_party_plugin_from_the_cli(third_party, cnn_copy, tmp_path):
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "relu-clip", "--data", str(CNN_TEST),
                            "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cnn.relu-clip.onnx"
    assert out.exists() and cnn_copy.read_bytes() == CNN.read_bytes()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["rewritten"] == 6 and rep["output"] == str(out)
    v = rep["validation"]
    assert v["worst_rel_l2"] == 0.0 and v["accuracy"]["original"] == v["accuracy"]["candidate"]
    assert v["latency"]["original"]["runs"] >= 10
    assert "relu1" in r.stdout and "accuracy" in r.stdout


def test_broken_third_party_plugin_is_named(tmp_path, monkeypatch):
    install_package(tmp_path / "site", monkeypatch, "surgeon-bad", "badplug", "import not_installed_dependency\n",
                    "bad = badplug:PLUGINS")
    r = runner.invoke(app, ["plugins"])
    assert r.exit_code == 0, r.output  # skipped with a warning; the others keep working
    assert "package 'surgeon-bad'" in r.stderr and "not_installed_dependency" in r.stderr
    assert "tucker" in r.stdout and "int8" in r.stdout
    assert "Traceback" not in r.output
    surgeon.plugin._default = None


@pytest.mark.parametrize("args,code,message", [
    (["--plugin", "nope"], 2, "unknown plugin 'nope'; available:"),
    (["--plugin", "relu-clip", "--option", "flor=1"], 2, "no option 'flor'; valid options: relu-clip: floor"),
    (["--plugin", "relu-clip", "--option", "floor=abc"], 2, "bad value 'abc' for option 'floor'"),
    (["--plugin", "relu-clip", "--option", "floor"], 2, "expected key=value"),
    (["--plugin", "relu-clip", "--layers", "("], 2, "--layers: bad regex"),
    (["--plugin", "relu-clip", "--shape", "input=1x2"], 2, "does not fit"),
])
def test_apply_bad_usage(third_party, cnn_copy, args, code, message):
    r = runner.invoke(app, ["apply", str(cnn_copy), *args, "--no-validate"])
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert sorted(p.name for p in cnn_copy.parent.iterdir()) == ["cnn.onnx", "site"]


def test_apply_refuses_to_write_over_the_input(third_party, cnn_copy):
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "relu-clip", "-o", str(cnn_copy)])
    assert r.exit_code == 2 and "overwrite the input" in r.stderr
    assert cnn_copy.read_bytes() == CNN.read_bytes()


@pytest.mark.parametrize("content", [b"", b"\x00garbage", None])
def test_unreadable_models_exit_2_with_one_line(tmp_path, content):
    p = tmp_path / "m.onnx"
    if content is None:
        p.write_bytes(CNN.read_bytes()[:30_000])
    else:
        p.write_bytes(content)
    for cmd in (["inspect", str(p)], ["apply", str(p), "--plugin", "tucker"], ["validate", str(p), str(CNN)]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.output


def test_inspect_table_and_json():
    r = runner.invoke(app, ["inspect", str(CNN)])
    assert r.exit_code == 0 and "conv5" in r.stdout and "total" in r.stdout
    r = runner.invoke(app, ["inspect", str(MLP), "--json", "-"])
    doc = json.loads(r.stdout)
    assert [l["name"] for l in doc["layers"]] == ["fc1", "fc2", "fc3"]
    assert doc["layers"][0]["macs"] == 64 * 256


def test_validate_budgets_set_the_exit_code(tmp_path):
    ok = runner.invoke(app, ["validate", str(CNN), str(CNN), "--data", str(CNN_TEST), "--max-drift", "1e-9",
                             "--min-agreement", "1", "--json", str(tmp_path / "v.json")])
    assert ok.exit_code == 0, ok.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["validation"]["accuracy"]["original"] > 0.97 and v["status"] == "pass"
    assert [c["status"] for c in v["checks"]] == ["pass", "pass"]
    # a budget that cannot be measured is an error, not a pass
    blind = runner.invoke(app, ["validate", str(CNN), str(CNN), "--max-latency-ratio", "0.01", "--no-latency"])
    assert blind.exit_code == 2 and "needs the latency measurement" in blind.stderr
    fail = runner.invoke(app, ["validate", str(CNN), str(CNN), "--max-latency-ratio", "0.01", "--repeats", "20"])
    assert fail.exit_code == 1 and "max_latency_ratio fail" in fail.stderr


def test_validate_rejects_models_with_different_outputs():
    r = runner.invoke(app, ["validate", str(CNN), str(MLP)])
    assert r.exit_code == 2, r.output


def test_plugin_options_as_flags(cnn_copy, tmp_path):
    """--energy 0.9 / --no-per-channel / --rank-method are plugin options written as flags."""
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "--energy", "0.9", "--multiple", "8",
                            "--guard=none", "--no-validate", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    step = json.loads((tmp_path / "r.json").read_text())["steps"][0]
    assert step["options"]["energy"] == 0.9 and step["options"]["guard"] == "none"
    assert all(l["details"]["R1"] % 8 == 0 for l in step["layers"] if l["status"] == "rewritten")
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "int8", "--no-per-channel", "--mode", "dynamic",
                            "--no-validate", "--json", str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q.json").read_text())["steps"][0]["options"]["per_channel"] is False


@pytest.mark.parametrize("args,message", [
    (["--enrgy", "0.9"], "no such option --enrgy (plugin options: activation, allow_growth,"),
    (["--energy"], "--energy needs a value"),
    (["--energy", "0.9", "--ratio", "0.5"], "choose one way to set ranks"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_plugin_flags(cnn_copy, args, message):
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", *args, "--no-validate"])
    assert r.exit_code == 2, r.output
    assert message in r.stderr


def test_a_bad_option_value_names_the_plugin_once(cnn_copy):
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "--option", "activation=bogus",
                            "--no-validate"])
    assert r.exit_code == 2, r.output
    assert "plugin 'tucker': bad value 'bogus' for option 'activation'" in r.stderr
    assert r.stderr.count("plugin 'tucker'") == 1
    assert r.stderr.count("through") == 1  # the choices once, not again as "(expected ...)"


def test_apply_on_a_raw_model_zoo_file(tmp_path):
    """The onnx package's light models keep their weights in ConstantOfShape nodes (ir_version 3):
    folding must cope, from the CLI, and the written model must pass the checker."""
    import onnx
    from surgeon import zoo
    src = tmp_path / "squeezenet.onnx"
    src.write_bytes(zoo.path("squeezenet").read_bytes())
    r = runner.invoke(app, ["apply", str(src), "--plugin", "tucker", "--guard", "none",
                            "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "squeezenet.tucker.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["rewritten"] > 10 and rep["validation"]["worst_rel_l2"] < 1e-3  # 0.02-filled kernels are rank one


def test_dynamic_dims_come_from_the_data(tmp_path):
    """A [N, D] input with D dynamic: --data fixes D; without data or --shape it is a clear error."""
    import numpy as np
    import onnx
    from onnx import helper
    from tests.models import make_model, tensor
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w")
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", ["N", "T", 16])],
                   [tensor("y", ["N", "T", 4])], [w])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((3, 5, 16)).astype(np.float32))
    r = runner.invoke(app, ["validate", str(p), str(p), "--no-latency"])
    assert r.exit_code == 2 and "has dynamic dimensions" in r.stderr and "--shape x=1x?x16" in r.stderr
    r = runner.invoke(app, ["validate", str(p), str(p), "--data", str(tmp_path / "d.npz"), "--no-latency"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["validate", str(p), str(p), "--shape", "x=2x7x16", "--no-latency"])
    assert r.exit_code == 0, r.output


def test_a_layer_the_plugin_fails_on_sets_exit_code_1(third_party, cnn_copy, monkeypatch):
    import relu_clip_plugin

    def broken(self, graph, cand, ctx, opts):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(relu_clip_plugin.ReluToClip, "rewrite", broken)
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "relu-clip", "--no-validate"])
    assert r.exit_code == 1, r.output
    assert "relu-clip failed on 6 layer(s)" in r.stderr and "kaboom" in r.stderr
    assert "0 rewritten, 0 skipped, 6 failed" in r.stdout


def test_json_report_never_overwrites_a_model(cnn_copy, tmp_path):
    before = cnn_copy.read_bytes()
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "--json", str(cnn_copy)])
    assert r.exit_code == 2 and "would overwrite the input model" in r.stderr
    r = runner.invoke(app, ["validate", str(cnn_copy), str(cnn_copy), "--no-latency", "--json", str(cnn_copy)])
    assert r.exit_code == 2 and "would overwrite the original model" in r.stderr
    r = runner.invoke(app, ["inspect", str(cnn_copy), "--json", str(tmp_path / "no" / "r.json")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert cnn_copy.read_bytes() == before


@pytest.mark.parametrize("name", ["small.toml", "small.json", "small.npz"])
def test_an_output_model_named_like_another_kind_of_file_is_refused(cnn_copy, tmp_path, name):
    out = tmp_path / name
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "-o", str(out)])
    assert r.exit_code == 2 and "but this command writes an ONNX model" in r.stderr and not out.exists()


def test_unmet_plugin_budget_writes_nothing_and_exits_1(cnn_copy, monkeypatch):
    """A plugin that reports its budget unmet (int8's fallback) exits 1 and leaves no file at the
    output path; --keep-rejected keeps the closest model at a separate, clearly named path."""
    from surgeon import engine
    real = engine.apply

    def unmet(*args, **kwargs):
        res = real(*args, **kwargs)
        res.extras["fallback"] = {"budget": "relative L2 drift <= 0.0001", "met": False}
        return res

    monkeypatch.setattr(engine, "apply", unmet)
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "--guard", "none", "--no-validate"])
    assert r.exit_code == 1, r.output
    assert "budget (relative L2 drift <= 0.0001) was not met" in r.stderr
    assert "nothing was written" in r.stderr and not (cnn_copy.parent / "cnn.tucker.onnx").exists()
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "tucker", "--guard", "none", "--no-validate",
                            "--keep-rejected"])
    assert r.exit_code == 1, r.output
    assert (cnn_copy.parent / "cnn.tucker.rejected.onnx").exists() and not (cnn_copy.parent / "cnn.tucker.onnx").exists()
    assert "kept at" in r.stderr


def test_plugins_show_effective_defaults():
    """A None default that means "decided from other options" shows what it decides to."""
    r = runner.invoke(app, ["plugins", "--json", "-"])
    opts = {p["name"]: {o["name"]: o["default"] for o in p["options"]} for p in json.loads(r.stdout)["plugins"]}
    assert opts["tucker"]["ratio"].startswith("0.5") and opts["svd"]["ratio"].startswith("0.25")
    assert "None" not in r.stdout


def test_help_keeps_bracketed_text():
    """Help texts name `surgeon[ray]` and `[tool.surgeon.gate]`; rich's markup mode took
    bracketed words for style tags and printed "pip install 'surgeon'" and "the recipe's , then"."""
    sweep = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    gate = runner.invoke(app, ["gate", "--help"], env={"COLUMNS": "200"})
    assert sweep.exit_code == gate.exit_code == 0
    assert "surgeon[ray]" in sweep.output
    assert "[gate]" in gate.output and "[tool.surgeon.gate]" in gate.output


@pytest.mark.parametrize("command", ["plugins", "inspect", "apply", "validate", "gate", "sweep", "plan"])
def test_help_at_80_columns_cuts_no_flag_or_text(command):
    """plan's --attribution/--no-attribution pair widened the flag column: at 80 columns
    '--max-verifications' and its default printed cut off with an ellipsis."""
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "\u2026" not in r.output, [l for l in r.output.splitlines() if "\u2026" in l]
    assert max(len(l) for l in r.output.splitlines()) <= 80


def test_progress_in_a_log_prints_every_phase_but_rate_limits_long_counts(monkeypatch):
    """In a CI log (stderr no terminal) each phase of a short count gets its line at once, so
    GPTQ's time is not shown under the equalization label; one label per layer of a long count
    is rate-limited to a line every few seconds."""
    import io

    from rich.console import Console

    import surgeon.cli as cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buf, width=80))
    with cli.ProgressReporter(every_s=60.0) as progress:
        for done, what in enumerate(["calibrating", "cross-layer equalization", "GPTQ weight rounding",
                                     "GPTQ weight rounding", "bias correction"]):
            progress(f"int8: {what}", min(done, 3), 4)
        for i in range(30):
            progress(f"tucker: Conv_{i}", i, 30)
            progress(f"tucker: fitting 4 layers at once (stage {i}): Conv_{i}", i % 4 + 1, 4)
    lines = buf.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines[:4]] == [
        "int8: calibrating (0/4)", "int8: cross-layer equalization (1/4)", "int8: GPTQ weight rounding (2/4)",
        "int8: bias correction (3/4)"]
    assert lines[4:] == [lines[4]] and "tucker: Conv_0 (0/30)" in lines[4]  # the stage change, then quiet


def test_progress_lines_in_a_log_fit_80_columns(monkeypatch):
    """EfficientNet-Lite0's layer names ran the per-stage lines to 83-85 characters; the name
    gives way in the middle, the label stays whole."""
    import io

    from rich.console import Console

    import surgeon.cli as cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buf, width=80))
    with cli.ProgressReporter() as progress:
        progress("tucker: fitting 1 layer (stage 12): /_blocks.10/_project_conv/Conv_with_a_longer_name", 1, 1)
        progress("svd: fitting 2 layers at once (stage 13): /_blocks.11/_expand_conv/Conv_longer_still", 1, 2)
        progress("short: phase", 0, 1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert "tucker: fitting 1 layer (stage 12): /_blocks.10/" in lines[0] and lines[0].endswith("_name")
    assert "svd: fitting 2 layers at once (stage 13): /_blocks" in lines[1] and lines[1].endswith("still (1/2)")
    assert lines[2].endswith("short: phase")


def test_a_plugins_notes_are_printed_once_each_with_the_layers_they_concern(tmp_path):
    """prune criterion=bn on a model without BatchNormalization scores by l2: said in the JSON
    only, until the notes went to stderr too (grouped: one line for every layer it concerns)."""
    r = runner.invoke(app, ["apply", str(MLP), "-p", "prune", "--method", "structured", "--criterion", "bn",
                            "--compensate", "none", "--ratio", "0.25", "--no-validate", "-o", str(tmp_path / "p.onnx")])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert sum(l.startswith("note: ") for l in lines) == 1 and all(len(l) <= 80 for l in lines), r.stderr
    assert "scored by l2 instead (2 layers: fc1, ...)" in " ".join(l.strip() for l in lines)


def test_a_plugin_that_finds_no_layer_says_so(tmp_path):
    """svd on a model of convs (the shared detector) printed only "0 rewritten, 0 skipped" and
    wrote the model unchanged: the note says what svd takes, and that nothing changed."""
    import onnx
    from tests.models import conv_model
    src = tmp_path / "convs.onnx"
    onnx.save(conv_model(), src)
    r = runner.invoke(app, ["apply", str(src), "-p", "svd", "--no-validate", "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    text = " ".join(l.strip() for l in r.stderr.splitlines())
    assert "note: svd found no layer it applies to in this model (fully connected layers" in text, r.stderr
    assert "the output is the input, unchanged" in text
    r = runner.invoke(app, ["apply", str(src), "-p", "tucker", "--no-validate", "-o", str(tmp_path / "t.onnx")])
    assert r.exit_code == 0 and "found no layer" not in r.stderr, r.stderr


def test_a_plugin_that_skips_every_layer_says_why(tmp_path):
    """int8 with mode=dynamic on a model of convs skipped all of them, and the output said only
    "0 rewritten, 2 skipped (-v shows which and why)": the note gives the reason without -v."""
    import onnx
    from tests.models import conv_model
    src = tmp_path / "convs.onnx"
    onnx.save(conv_model(), src)
    r = runner.invoke(app, ["apply", str(src), "-p", "int8", "-O", "mode=dynamic", "--no-validate",
                            "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    text = " ".join(l.strip() for l in r.stderr.splitlines())
    assert "note: int8 rewrote no layer: the one it looked at was skipped: mode=dynamic keeps convs float" \
        in text, r.stderr


def test_notes_about_dynamic_shapes_fit_80_columns(tmp_path):
    """On the OCR recognizer without --data (its width is dynamic) the latency-guard note and
    "validation skipped" were single lines of 193 and 150 characters in a log."""
    import onnx

    from tests.models import detector_model

    src = tmp_path / "det.onnx"
    onnx.save(detector_model(), src)
    r = runner.invoke(app, ["apply", str(src), "-p", "tucker", "-o", str(tmp_path / "t.onnx")])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert all(len(l) <= 80 for l in lines), r.stderr
    text = " ".join(l.strip() for l in lines)
    assert "note: latency guard not applied to" in text and "validation skipped: input 'images'" in text, text


def test_warnings_fit_80_columns(tmp_path):
    """Magnitude pruning's warning (zeros do not run faster) was one line of 250 characters in
    a log, where the notes beside it wrapped at the width."""
    import onnx
    from tests.models import conv_model
    src = tmp_path / "convs.onnx"
    onnx.save(conv_model(), src)
    r = runner.invoke(app, ["apply", str(src), "-p", "prune", "-O", "method=magnitude", "--ratio", "0.5",
                            "--no-validate", "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert all(len(l) <= 80 for l in lines), r.stderr
    assert "warning: prune: magnitude pruning only writes zeros" in " ".join(l.strip() for l in lines)


def test_a_plugin_warning_is_shown_once(tmp_path):
    """int8 without --data logged its synthetic-calibration warning, and the command printed
    the report's copy of it again ("warning: int8: int8 is calibrated on SYNTHESIZED ...")."""
    import onnx
    from tests.models import conv_model
    src = tmp_path / "convs.onnx"
    onnx.save(conv_model(), src)
    r = runner.invoke(app, ["apply", str(src), "-p", "int8", "--no-latency", "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("SYNTHESIZED") == 1, r.stderr
    assert "int8: calibrated on SYNTHESIZED" in r.stderr


def test_grouped_notes():
    from surgeon.cli import _grouped_notes

    assert _grouped_notes(["a: x", "b: x", "c: y", "free text: with a colon", "plain"], {"a", "b", "c"}) == \
        ["x (2 layers: a, ...)", "y (1 layer: c)", "free text: with a colon", "plain"]


def test_a_warning_about_the_data_prints_once_for_calib_and_data(cnn_copy, tmp_path):
    x = np.load(CNN_TEST)["input"]
    u8 = tmp_path / "u8.npz"
    np.savez(u8, input=np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8))
    r = runner.invoke(app, ["apply", str(cnn_copy), "--plugin", "svd", "--calib", str(u8), "--data", str(u8),
                            "-o", str(tmp_path / "out.onnx"), "--no-latency", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert r.output.count("is uint8") == 1
    data = json.loads((tmp_path / "r.json").read_text())["data"]
    assert [w for side in ("calibration", "evaluation") for w in data[side]["warnings"]] == \
        [f"{u8}: 'input' is uint8 (0..255); the model takes float32, so it is fed these values as they are, unscaled: "
         "apply the model's own preprocessing first if it expects normalised inputs"] * 2


def test_a_latency_batch_the_model_cannot_take_is_an_error(tmp_path):
    """--batch 4 on a model whose batch is fixed at 1 was measured at batch 1, said only in the
    latency table's title."""
    import onnx
    from tests.models import conv_model
    m = tmp_path / "fixed.onnx"
    onnx.save(conv_model(batch=1), str(m))
    for cmd in (["validate", str(m), str(m), "--batch", "4"],
                ["apply", str(m), "-p", "tucker", "--batch", "4", "-o", str(tmp_path / "out.onnx")]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2 and "the model's batch dimension is fixed at 1" in r.output, r.output
    assert not (tmp_path / "out.onnx").exists()
    r = runner.invoke(app, ["validate", str(m), str(m), "--batch", "4", "--no-latency"])
    assert r.exit_code == 0, r.output


def test_validate_without_data_for_a_dynamic_model_says_what_to_pass(tmp_path):
    import onnx
    from tests.models import make_model, tensor
    from onnx import helper
    m = tmp_path / "dyn.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1, 3, "W"])], [tensor("y", [1, 3, "W"])]),
              str(m))
    r = runner.invoke(app, ["validate", str(m), str(m)])
    assert r.exit_code == 2
    assert "error: cannot validate: input 'x'" in r.output and "skipped" not in r.output, r.output


def test_an_unsorted_model_is_rewritten_with_a_warning(tmp_path):
    import onnx
    from surgeon import model as model_io
    from tests.models import conv_model
    m = conv_model(c=32, f=32)
    m.graph.node.reverse()
    p = tmp_path / "unsorted.onnx"
    onnx.save(m, str(p))
    r = runner.invoke(app, ["apply", str(p), "-p", "tucker", "-O", "guard=none", "-o", str(tmp_path / "out.onnx"),
                            "--no-latency"])
    assert r.exit_code == 0, r.output
    assert r.output.count("not in topological order") == 1 and "1 rewritten" in r.output
    onnx.checker.check_model(model_io.load(tmp_path / "out.onnx"))
