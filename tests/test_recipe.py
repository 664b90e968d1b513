"""Recipes: parsing and checking (errors name the file, the key and what is allowed), layer
overrides reaching the plugins, TOML round trip, and a chain through the CLI."""

import json

import pytest
from typer.testing import CliRunner

from surgeon import recipe as rc
from surgeon.cli import app
from surgeon.errors import UsageError
from tests.models import CNN, CNN_TEST, ROOT

runner = CliRunner()


def parse(text: str) -> rc.Recipe:
    import tomllib
    return rc.parse(tomllib.loads(text), "r.toml")


def test_parse_steps_options_overrides_and_gate():
    r = parse("""
[[steps]]
plugin = "tucker"
ratio = 0.5
[[steps.layers]]
match = "conv3"
ratio = 0.75
[[steps.layers]]
match = "conv1"
skip = true
[[steps]]
plugin = "svd"
select = "^fc1"
[gate]
max_drift = 0.05
""")
    assert [s.plugin for s in r.steps] == ["tucker", "svd"]
    assert r.steps[0].options == {"ratio": 0.5} and r.steps[1].select == "^fc1"
    per_layer, skip = r.steps[0].layer_options(["conv1", "conv2", "conv3"])
    assert per_layer == {"conv3": {"ratio": 0.75}} and skip == {"conv1"}
    assert r.gate == {"max_drift": 0.05}
    again = parse(rc.dumps(r))
    assert again.to_toml() == r.to_toml()


@pytest.mark.parametrize("text,message", [
    ('[[steps]]\nplugin = "nope"', "r.toml: steps[0].plugin: unknown plugin 'nope'; available:"),
    ('[[steps]]\nplugin = "tucker"\nratoi = 0.5', "r.toml: steps[0].ratoi: plugin 'tucker' has no option 'ratoi'; valid options:"),
    ('[[steps]]\nplugin = "tucker"\nratio = 2.0', "r.toml: steps[0]: plugin 'tucker': ratio must be in (0, 1]"),
    ('[[steps]]\nplugin = "tucker"\n[[steps.layers]]\nmatch = "c"\nratio = -1', "r.toml: steps[0].layers[0]: plugin 'tucker': ratio must be in (0, 1]"),
    ('[[steps]]\nplugin = "tucker"\n[[steps.layers]]\nratio = 0.5', "steps[0].layers[0]: needs 'match'"),
    ('[[steps]]\nplugin = "tucker"\n[[steps.layers]]\nmatch = "("', "steps[0].layers[0].match: bad regex"),
    ('[[steps]]\nplugin = "tucker"\n[gate]\nmax_drfit = 1', "r.toml: [gate]: unknown budget(s) max_drfit; budgets: max_drift"),
    ('[[steps]]\nplugin = "tucker"\n[gate]\nmin_agreement = 99', "min_agreement = 99 is out of range; it must be a fraction in (0, 1]"),
    ('[gate]\nmax_drift = 0.1', "r.toml: no [[steps]]"),
    ('[[steps]]\nplugin = "int8"\n[[steps.layers]]\nmatch = "c"\nper_channel = false',
     "steps[0].layers[0]: plugin 'int8' applies per_channel to the whole model; per layer it takes skip = true"),
    ('[[stepz]]\nplugin = "tucker"', "unknown top-level key(s) stepz"),
])
def test_recipe_errors_name_file_key_and_allowed(text, message):
    with pytest.raises(UsageError) as e:
        parse(text)
    assert message in str(e.value)


def test_override_reaches_the_plugin_and_skip_is_reported(tmp_path):
    (tmp_path / "r.toml").write_text("""
[[steps]]
plugin = "tucker"
ratio = 0.25
guard = "none"
[[steps.layers]]
match = "conv4"
ranks = [8, 8]
[[steps.layers]]
match = "conv2"
skip = true
[[steps.layers]]
match = "nothing_like_this"
ratio = 0.5
""")
    r = runner.invoke(app, ["apply", str(CNN), "--recipe", str(tmp_path / "r.toml"), "-o", str(tmp_path / "o.onnx"),
                            "--no-validate", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "matches no node" in r.stderr  # a pattern that matches nothing is a warning
    r = runner.invoke(app, ["apply", str(CNN), "-p", "tucker", "--layers", "nomatch", "-o", str(tmp_path / "n.onnx"),
                            "--no-validate"])
    assert r.exit_code == 0 and "(--layers) 'nomatch' matches no node of the model" in r.stderr
    layers = {l["layer"]: l for l in json.loads((tmp_path / "r.json").read_text())["steps"][0]["layers"]}
    assert (layers["conv4"]["details"]["R1"], layers["conv4"]["details"]["R2"]) == (8, 8)
    assert (layers["conv3"]["details"]["R1"], layers["conv3"]["details"]["R2"]) == (8, 16)  # ratio 0.25
    assert layers["conv2"]["status"] == "skipped" and "skip = true" in layers["conv2"]["reason"]


def test_recipe_conflicts_with_plugin_flags(tmp_path):
    (tmp_path / "r.toml").write_text('[[steps]]\nplugin = "tucker"\n')
    r = runner.invoke(app, ["apply", str(CNN), "--recipe", str(tmp_path / "r.toml"), "--ratio", "0.5"])
    assert r.exit_code == 2 and "do not combine it" in r.stderr


def test_repeated_plugin_chains_and_option_targets_one_step(tmp_path):
    out = tmp_path / "o.onnx"
    r = runner.invoke(app, ["apply", str(CNN), "-p", "tucker", "-p", "svd", "--ratio", "0.5",
                            "--option", "svd.rank=16", "--layers", "conv|fc1", "--guard", "none",
                            "--data", str(CNN_TEST), "--no-latency", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [s["plugin"] for s in doc["steps"]] == ["tucker", "svd"]
    assert doc["steps"][1]["options"]["rank"] == 16
    assert doc["steps"][1]["drift_after"]["rel_l2"] >= 0 and "after each step" in r.stdout
    assert doc["reproduce"]["input_sha256"] and doc["reproduce"]["versions"]["onnxruntime"]


def test_chain_of_every_plugin_through_one_recipe_and_gate(tmp_path):
    """prune + tucker + svd + int8 in one recipe on the sample CNN, gated on its test split."""
    src = ROOT / "examples" / "recipes" / "digits_cnn.toml"
    out = tmp_path / "small.onnx"
    r = runner.invoke(app, ["apply", str(CNN), "--recipe", str(src), "--calib", str(ROOT / "sample_models" / "digits_cnn_calib.npz"),
                            "--data", str(CNN_TEST), "--no-latency", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [s["plugin"] for s in doc["steps"]] == ["prune", "tucker", "svd", "int8"]
    assert all(s["rewritten"] > 0 for s in doc["steps"])
    assert [c["name"] for c in doc["checks"]] == ["max_drift", "min_accuracy"]
    assert doc["status"] == "pass" and out.exists()
    assert doc["data"]["calibration"]["rows"] == 128 and doc["data"]["evaluation"]["rows"] == 450
    g = runner.invoke(app, ["gate", str(CNN), str(out), "--data", str(CNN_TEST), "--recipe", str(src), "--no-latency"])
    assert g.exit_code == 0, g.output


def test_skip_reaches_a_whole_model_plugin(tmp_path):
    """Per-layer overrides reach int8 too: a skipped conv stays float."""
    (tmp_path / "r.toml").write_text('[[steps]]\nplugin = "int8"\n[[steps.layers]]\nmatch = "^conv2$"\nskip = true\n')
    r = runner.invoke(app, ["apply", str(CNN), "--recipe", str(tmp_path / "r.toml"), "--calib",
                            str(ROOT / "sample_models" / "digits_cnn_calib.npz"), "--no-validate",
                            "-o", str(tmp_path / "q.onnx"), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    layers = {l["layer"]: l for l in json.loads((tmp_path / "r.json").read_text())["steps"][0]["layers"]}
    assert layers["conv2"]["status"] == "skipped" and layers["conv3"]["status"] == "rewritten"
    import onnx
    q = onnx.load(str(tmp_path / "q.onnx"))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers.get(conv2.input[1]) != "DequantizeLinear"  # float weight


def test_whole_model_options_are_refused_per_layer_in_the_api():
    import surgeon
    with pytest.raises(UsageError, match="int8' applies per_channel to the whole model"):
        surgeon.apply(surgeon.load(CNN), "int8", per_layer={"conv2": {"per_channel": False}})
