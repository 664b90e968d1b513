"""Sweeps on the sample CNN: uniform, per layer, int8 fallback, reconstruction; backends agree."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from surgeon import engine, lowrank, model as model_io, pipeline, sweep
from surgeon.cli import app
from tests.models import CNN, CNN_CALIB, CNN_TEST, MLP

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def run_opts(**kw):
    return pipeline.RunOptions(data=CNN_TEST, calib=CNN_CALIB, **kw)


def test_uniform_sweep_writes_tables_csv_json_and_plots(tmp_path):
    out = tmp_path / "sw"
    r = runner.invoke(app, ["sweep", str(CNN), "-p", "tucker", "--ratios", "0.25:0.5:0.25", "--data", str(CNN_TEST),
                            "--calib", str(CNN_CALIB), "-O", "fit=weights", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "tucker sweep on digits_cnn.onnx" in r.stdout and "agreement" in r.stdout
    rows = list(csv.DictReader((out / "uniform.csv").open()))
    assert [float(x["ratio"]) for x in rows] == [0.25, 0.5]
    lo, hi = rows
    # fewer ranks: fewer MACs and params, more drift; every row measured (latency included)
    assert int(lo["macs"]) < int(hi["macs"]) < 28_869_888 and int(lo["params"]) < int(hi["params"])
    assert float(lo["drift"]) > float(hi["drift"]) > 0
    assert all(float(x["latency_ms"]) > 0 and float(x["original_ms"]) > 0 and x["latency_node"] for x in rows)
    assert all(float(x["accuracy"]) > 0.5 for x in rows)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["original"]["macs"] == 28_869_888 and doc["original"]["accuracy"] == pytest.approx(0.9978, abs=1e-3)
    assert doc["data"]["calibration"]["rows"] == 128 and doc["data"]["evaluation"]["rows"] == 450
    assert doc["options"]["guard"] == "none"  # the sweep times models itself; no guard skips layers
    assert [u["rewritten"] for u in doc["uniform"]] == [["conv2", "conv3", "conv4", "conv5"]] * 2
    for png in ("sweep_quality.png", "sweep_latency.png"):
        assert (out / png).read_bytes()[:8] == PNG
    # the table gives the speedup (original / candidate), as apply does, not the latency ratio
    speedup = 1 / float(lo["latency_ratio"])  # median over interleaved pairs, as apply's
    assert "ms (speedup)" in r.stdout and f"{float(lo['latency_ms']):.3f} ({speedup:.2f}x)" in r.stdout


def test_a_sweep_warns_when_calib_and_data_are_one_file(tmp_path):
    """apply warned; a sweep scored the rows its fits saw with the warning only in its JSON."""
    r = runner.invoke(app, ["sweep", str(CNN), "-p", "tucker", "--ratios", "0.5", "--calib", str(CNN_TEST),
                            "--data", str(CNN_TEST), "--no-latency", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert r.output.count("--calib and --data name the same file") == 1


def test_per_layer_sweep_changes_one_layer_at_a_time(tmp_path):
    so = sweep.SweepOptions("tucker", [0.25, 0.5], {"fit": "weights"}, per_layer=True, uniform=False)
    res = sweep.run_sweep(CNN, so, run_opts())
    rows = sweep.layer_rows(res)
    assert [(r["layer"], r["ratio"]) for r in rows] == [(f"conv{i}", r) for i in (2, 3, 4, 5) for r in (0.25, 0.5)]
    for row in res.per_layer:
        assert row["rewritten"] == [row["layer"]]  # everything else untouched
    # the same layer alone through the engine gives the same drift
    m = model_io.load(CNN)
    split, shapes = pipeline.load_split(m, run_opts(), True)
    alone = engine.apply(engine.prepare(m), "tucker", {"ratio": 0.25, "fit": "weights", "guard": "none"},
                         layers="^conv3$", data=split.calib, input_shapes=shapes)
    from surgeon.validate import drift_metrics, run, session
    d = drift_metrics(run(session(m), split.eval)[0], run(session(alone.model), split.eval)[0])["rel_l2"]
    assert next(r for r in rows if r["layer"] == "conv3" and r["ratio"] == 0.25)["drift"] == pytest.approx(d, rel=1e-6)
    # each layer was also timed alone, original vs rewrite
    assert {(t["layer"], t["ratio"]) for t in res.layer_latency} == {(r["layer"], r["ratio"]) for r in rows}
    assert all(t["original_ms"] > 0 and t["ms"] > 0 and t["how"] == "layer alone" for t in res.layer_latency)
    files = {f.name for f in sweep.write(res, tmp_path)}
    assert {"per_layer.csv", "per_layer.png", "per_layer_latency.png", "sweep.json"} <= files
    assert (tmp_path / "per_layer.png").read_bytes()[:8] == PNG


def test_layers_alone_are_timed_at_the_latency_batch(monkeypatch):
    """--batch sets the whole-model A/B's feed; the per-layer timings a plan adds up must
    describe the same workload (they were taken at batch 1 whatever --batch said)."""
    from surgeon import guard
    seen = []
    real = guard.time_rewrite

    def spy(node, chain, x_shape, *a, **kw):
        seen.append((node.name, tuple(x_shape)))
        return real(node, chain, x_shape, *a, **{**kw, "budget_s": 0.05, "refresh": True})

    monkeypatch.setattr(guard, "time_rewrite", spy)
    so = sweep.SweepOptions("tucker", [0.5], {"fit": "weights"}, per_layer=True, uniform=False, layers="^conv3$")
    res = sweep.run_sweep(CNN, so, run_opts(batch=4))
    assert seen and all(shape[0] == 4 for _, shape in seen), seen
    assert [t["layer"] for t in res.layer_latency] == ["conv3"]


def test_reconstruction_is_data_free_and_exact(tmp_path):
    out = tmp_path / "rec"
    r = runner.invoke(app, ["sweep", str(CNN), "-p", "tucker", "--reconstruction", "--out", str(out), "--json", "-"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["reconstruction"]
    assert (out / "reconstruction.png").read_bytes()[:8] == PNG
    w = next(t for t in model_io.load(CNN).graph.initializer if t.name.startswith("conv4") or "conv4" in t.name)
    from onnx import numpy_helper
    w = numpy_helper.to_array(w).astype(np.float64)
    for r1 in (1, 8, 33, 64):  # R1 varied, R2 full: the formula equals the HOSVD it predicts
        core, o, i = lowrank.hosvd_channels(w, r1, w.shape[0])
        want = lowrank.relative_error(w, lowrank.tucker2_full(core, o, i))
        got = next(x for x in rows if x["layer"] == "conv4" and x["mode"].startswith("R1") and x["rank"] == r1)
        assert got["rel_error"] == pytest.approx(want, abs=1e-9)
    for layer in ("conv2", "conv5"):
        for mode in {x["mode"] for x in rows if x["layer"] == layer}:
            errs = [x["rel_error"] for x in rows if x["layer"] == layer and x["mode"] == mode]
            assert errs == sorted(errs, reverse=True) and errs[-1] == 0.0  # never grows with rank; exact at full
    svd = sweep.run_sweep(MLP, sweep.SweepOptions("svd", uniform=False, reconstruction=True))
    assert {x["mode"] for x in svd.reconstruction} == {"rank"} and len({x["layer"] for x in svd.reconstruction}) == 3


def test_int8_fallback_sensitivity(tmp_path):
    so = sweep.SweepOptions("int8", layers="^(conv2|fc2)$")
    res = sweep.run_sweep(CNN, so, run_opts())
    rows = sweep.fallback_rows(res)
    assert [r["float_node"] for r in rows] == ["(none: all quantized)", "conv2", "fc2"]
    base, conv2, fc2 = res.fallback
    assert "conv2" not in conv2["rewritten"] and "conv2" in base["rewritten"]
    assert fc2["drift_reduction"] == pytest.approx(base["drift"] - fc2["drift"])
    assert fc2["drift"] < base["drift"]  # the classifier in float removes most of the drift (measured 0.017 -> 0.005)
    assert "fallback.png" in {f.name for f in sweep.write(res, tmp_path)}
    # the per-node runs made the first run's choices (its auto steps and ranges settled)
    settled = base["settled"]
    assert settled["calibration"] in ("minmax", "percentile")
    assert {"weight_rounding", "bias_correction", "sequential_bias"} <= set(settled)
    for row in (conv2, fc2):
        assert {k: v for k, v in row["settled"].items() if k in settled} == \
            {k: v for k, v in settled.items() if k in row["settled"]}


def test_int8_settles_its_auto_choices_from_a_runs_extras():
    from surgeon.plugin import registry

    int8 = registry().get("int8")
    extras = {"calibration": "percentile (99.999)", "equalization": {"kept": False},
              "weight_rounding": {"kept": True, "layers": 3}, "bias_correction": {"kept": True},
              "sequential_bias": {"kept": False, "skipped": "why"}}
    assert int8.settled(extras) == {"calibration": "percentile", "equalize": "off", "weight_rounding": "gptq",
                                    "bias_correction": "on", "sequential_bias": "off"}
    assert int8.settled({"calibration": "minmax (auto's per-tensor ranges did not lower the drift)"}) == \
        {"calibration": "minmax"}
    assert int8.settled({"calibration": "auto: per tensor minmax 3"}) == {}  # per-tensor ranges: chosen again
    assert registry().get("tucker").settled({"anything": 1}) == {}


@pytest.mark.parametrize("args, message", [
    (["-p", "tucker", "--ratios", "0:1:0.5"], "0 is out of range; tucker ratios must be in (0, 1]"),
    (["-p", "prune", "--ratios", "0.5,1"], "1 is out of range; prune ratios must be in [0, 1)"),
    (["-p", "tucker", "--ratios", "a:b"], "bad --ratios"),
    (["-p", "tucker", "--ratios", "0.5", "--workers", "0"], "--workers must be in 1..256"),
    (["-p", "int8", "--ratios", "0.5"], "has no ratio"),
    (["-p", "tucker", "--ratios", "0.5", "--workers", "2", "-O", "guard=latency"], "guard=latency"),
    (["-p", "tucker", "--ratios", "0.5", "--address", "x:1"], "--address is for --backend ray"),
    (["-p", "int8", "--reconstruction"], "--reconstruction is for tucker and svd"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    r = runner.invoke(app, ["sweep", str(CNN), "--data", str(CNN_TEST), *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output


def _small(backend, workers):
    so = sweep.SweepOptions("tucker", [0.25, 0.5], {"fit": "weights"}, workers=workers, backend=backend,
                            latency_budget_s=0.2, eval_threads=1)
    return sweep.run_sweep(CNN, so, run_opts())


def test_process_pool_gives_the_serial_results():
    a, b = _small("processes", 1), _small("processes", 2)
    assert b.backend["name"] == "processes" and a.backend["name"] == "serial"
    for x, y in zip(a.uniform, b.uniform):
        assert (x["drift"], x["agreement"], x["accuracy"], x["macs"]) == (y["drift"], y["agreement"], y["accuracy"], y["macs"])
        assert y["latency"]["ms"] > 0


def test_ray_gives_the_process_pool_results():
    pytest.importorskip("ray")
    pool, ray_res = _small("processes", 2), _small("ray", 2)
    assert ray_res.backend["name"] == "ray"
    for x, y in zip(pool.uniform, ray_res.uniform):
        assert x["ratio"] == y["ratio"]
        assert x["drift"] == y["drift"] and x["agreement"] == y["agreement"]  # exactly
        assert y["latency"]["ms"] > 0 and "ray node" in y["latency"]["node"]


def test_touched_node_timing_sees_only_the_nodes_a_prune_changes():
    """measure_touched sums onnxruntime's kernel times over the nodes whose shapes changed: a
    pruned conv pair (conv3 -> conv4 here) touches a handful of nodes, an unchanged model none."""
    m = model_io.load(CNN)
    res = engine.apply(m, "prune", {"ratio": 0.5}, layers="^conv3$")
    assert "conv3" in [l.layer for l in res.rewritten]
    feed = {"input": np.load(CNN_TEST)["input"][:1]}
    lat = sweep.measure_touched(m.SerializeToString(), res.model.SerializeToString(), feed, 1, 0.2)
    assert 2 <= lat["touched"] < len(m.graph.node)  # conv3 (fused with its Relu) and conv4 at least
    assert lat["original_ms"] > 0 and lat["ms"] > 0 and lat["pairs"] >= 10
    assert lat["ratio_low"] <= lat["ratio"] <= lat["ratio_high"]
    same = sweep.measure_touched(m.SerializeToString(), m.SerializeToString(), feed, 1, 0.1)
    assert same["touched"] == 0 and same["original_ms"] == same["ms"] == 0.0


def test_layer_savings_use_one_original_time_per_layer():
    """A busy moment inflates one measurement's absolute times, not its A/B ratio: the saving
    is the layer's median original time times (1 - ratio)."""
    t = [{"layer": "a", "ratio": 0.25, "original_ms": 2.0, "ms": 0.5},
         {"layer": "a", "ratio": 0.5, "original_ms": 8.0, "ms": 4.0},  # measured while busy
         {"layer": "a", "ratio": 0.75, "original_ms": 2.2, "ms": 1.65}]
    sweep._common_original_time(t)
    assert [round(x["saved_ms"], 6) for x in t] == [round(2.2 * 0.75, 6), round(2.2 * 0.5, 6), round(2.2 * 0.25, 6)]


def test_quality_plot_without_agreement_or_accuracy_shows_drift_alone(tmp_path):
    """An output without a class axis and no labels (the shared OCR recognizer's [time, 1, 8210])
    left an empty agreement panel, and matplotlib warned about its empty legend on stderr."""
    import warnings

    from surgeon import sweep_plots

    def width(png):  # the IHDR chunk's width, big-endian, right after the signature
        return int.from_bytes(png.read_bytes()[16:20], "big")

    rows = [{"ratio": r, "drift": d, "agreement": None, "accuracy": None} for r, d in ((0.25, 0.04), (0.5, 0.02))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one, = sweep_plots.uniform(tmp_path, rows, {"accuracy": None}, "t", removes=False)
        width_one = width(one)
        rows[0]["agreement"] = rows[1]["agreement"] = 0.9
        (tmp_path / "with").mkdir()
        two, = sweep_plots.uniform(tmp_path / "with", rows, {"accuracy": None}, "t", removes=False)
    assert 2 * width_one == width(two)  # one panel (5.2 in), then two
    # (other libraries' deprecation warnings, e.g. pyparsing's under the oldest matplotlib, are not ours)
    assert not [w for w in caught if "legend" in str(w.message)]


def test_a_per_layer_sweep_whose_layers_pattern_matches_nothing_says_so(tmp_path):
    r = runner.invoke(app, ["sweep", str(CNN), "-p", "svd", "--per-layer", "--ratios", "0.5", "--layers", ".*MatMul.*",
                            "--data", str(CNN_TEST), "--no-latency", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "rewrites no layer of this model among the nodes --layers '.*MatMul.*' matches" in r.stderr
    assert not (tmp_path / "sw").exists()


def test_prune_tables_name_what_a_layer_keeps_channels(tmp_path):
    """A per-layer prune sweep (and a prune plan) headed its kept-channel counts 'ranks'."""
    r = CliRunner().invoke(app, ["sweep", str(CNN), "-p", "prune", "--per-layer", "--ratios", "0.25", "--no-latency",
                                 "--data", str(CNN_TEST), "--out", str(tmp_path / "s")], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    head = next(l for l in r.stdout.splitlines() if "layer" in l and "ratio" in l)
    assert "channels" in head and "ranks" not in head, r.stdout
    assert sweep.kept_label("prune") == "channels" and sweep.kept_label("tucker") == "ranks"
