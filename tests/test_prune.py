"""Plugin `prune`: structured pruning equals masking, dead channels change nothing, magnitude
sparsity is what was asked, the options are checked, and the CLI runs it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import surgeon
from surgeon import calibration
from surgeon.channel_removal import mask_channels
from surgeon.cli import app
from surgeon.engine import prepare
from surgeon.errors import UsageError
from surgeon.plugins.prune import zipped_size
from tests import models as M


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Node name -> shape of its weight (input 1)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input[1] in inits}


def removed_channels(result) -> dict[str, list[int]]:
    return {l.layer: l.details["removed_channels"] for l in result.layers if "removed_channels" in l.details}


def assert_equals_masked(model, result, feeds, tol: float = 1e-5, changed: bool = True) -> None:
    """The pruned model computes what the original computes with the removed channels zeroed
    (weights, bias and the BatchNormalization shift of each: see mask_channels)."""
    M.checked(result.model)
    masked = mask_channels(prepare(model), removed_channels(result))
    outs = M.run(result.model, feeds)
    for a, b, o in zip(M.run(masked, feeds), outs, M.run(model, feeds)):
        assert a.shape == b.shape == o.shape
        assert M.rel_l2(a, b) <= tol, f"pruned vs masked: {M.rel_l2(a, b):.3g}"
    if changed:  # something was pruned, so the test could fail
        assert max(M.rel_l2(o, b) for o, b in zip(M.run(model, feeds), outs)) > 1e-3


def structured(model, **opts):
    return surgeon.apply(model, "prune", {"method": "structured", **opts})


# --- structured --------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "activation"])
def test_sample_cnn_equals_masked(criterion):
    model = surgeon.load(M.CNN)
    calib = surgeon.load_data(M.CNN_CALIB, model)
    test = surgeon.load_data(M.CNN_TEST, model)
    opts = {"method": "structured", "ratio": 0.5, "criterion": criterion, "multiple": 1}
    res = surgeon.apply(model, "prune", {**opts, "compensate": "none"}, data=calib)
    shapes = weight_shapes(res.model)
    # half of every conv's and fc1's outputs, and the inputs that read them; the logits stay
    assert shapes["conv1"] == (16, 1, 3, 3) and shapes["conv2"] == (16, 16, 3, 3)
    assert shapes["conv5"] == (64, 32, 3, 3)
    assert shapes["fc1"] == (64, 64 * 4 * 4) and shapes["fc2"] == (10, 64)
    assert_equals_masked(model, res, test.first_batch(32))
    assert res.after.total_macs < 0.3 * res.before.total_macs
    # by default, with calibration data, the same channels go and the next layers predict them
    auto = surgeon.apply(model, "prune", opts, data=calib)
    assert auto.extras["compensate"] == "linear" and removed_channels(auto) == removed_channels(res)
    feeds = test.first_batch(64)
    ref = M.run(model, feeds)[0]
    assert M.rel_l2(ref, M.run(auto.model, feeds)[0]) < 0.5 * M.rel_l2(ref, M.run(res.model, feeds)[0])


def test_sample_cnn_default_multiple_rounds_up():
    model = surgeon.load(M.CNN)
    res = structured(model, ratio=0.25, criterion="l1")
    shapes = weight_shapes(res.model)
    # 32 - 8 = 24 rounds up to 32 (multiple 16); 64 -> 48; 128 -> 96
    assert [shapes[f"conv{i}"][0] for i in range(1, 6)] == [32, 32, 48, 48, 96]
    assert shapes["fc1"][0] == 96
    assert_equals_masked(model, res, M.random_feeds(model, 4))


@pytest.mark.parametrize("build,expect", [
    (M.prune_residual, {"stem": 8, "b1a": 8, "b1b": 16, "b1s": 16, "b2b": 16, "fc": 10}),
    (M.prune_concat_split, {"ca": 8, "cb": 4, "mix": 16, "p": 8, "r": 8, "head": 4}),
    (M.prune_se_depthwise, {"expand": 16, "dw": 16, "se.fc1": 4, "se.fc2": 16, "project": 8, "stem": 8}),
    (lambda: M.prune_se_depthwise(mult=2), {"expand": 16, "dw": 32, "se.fc2": 32}),
    (M.prune_decoder, {"enc": 8, "up2": 3}),
    (M.prune_flatten_gemm, {"conv": 4, "fc2": 10}),
    (M.prune_matmul_seq, {"fc1": 32, "fc2": 16}),
])
def test_graphs_equal_masked(build, expect):
    model = build()
    res = structured(model, ratio=0.5, criterion="l1", multiple=1)
    shapes = weight_shapes(res.model)
    out_axis = {"ConvTranspose": 1, "MatMul": 1}
    ops = {n.name: n.op_type for n in res.model.graph.node}
    for layer, count in expect.items():
        axis = out_axis.get(ops[layer], 0)
        assert shapes[layer][axis] == count, (layer, shapes[layer])
    assert_equals_masked(model, res, M.random_feeds(model, 2))
    assert res.after.total_params < res.before.total_params


@pytest.mark.parametrize("build", [M.prune_concat_add, M.prune_concat_split])
def test_high_ratio_leaves_every_layer_and_split_part_a_channel(build):
    model = build()
    res = structured(model, ratio=0.95, multiple=1)
    shapes = weight_shapes(res.model)
    assert all(s[0] >= 1 for s in shapes.values())
    if build is M.prune_concat_add:  # 8 channels at 0.95 keep 1, but a and b need one each
        assert shapes["a"][0] == 1 and shapes["b"][0] == 1 and shapes["c"][0] == 2
    assert_equals_masked(model, res, M.random_feeds(model, 2))


def test_mean_compensation_replaces_removed_channels_by_their_mean():
    """With compensate=mean, fc2 sees each removed hidden unit as its calibration mean: the same
    as the original with those inputs of fc2 overwritten by the mean (exact for a MatMul)."""
    from onnx import helper
    from surgeon.validate import with_outputs
    model = M.prune_matmul_seq()
    calib = surgeon.synthesize(model, samples=16, seed=3)
    res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1, "compensate": "mean"},
                        data=calib)
    gone = removed_channels(res)["fc1"]
    assert len(gone) == 32
    hidden = next(n for n in model.graph.node if n.name == "fc2").input[0]
    h = np.concatenate([M.run(with_outputs(model, [hidden]), feed)[-1] for feed in calib.batches(16)])
    assert len(h) == 16
    mean = h.reshape(-1, h.shape[-1]).astype(np.float64).mean(axis=0)
    keep = np.ones(h.shape[-1], np.float32)
    keep[gone] = 0
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.initializer.extend([M.init("keep", keep), M.init("fill", ((1 - keep) * mean).astype(np.float32))])
    ref.graph.node.extend([helper.make_node("Mul", [hidden, "keep"], ["h_kept"]),
                           helper.make_node("Add", ["h_kept", "fill"], ["h_filled"])])
    fc2 = next(n for n in ref.graph.node if n.name == "fc2")
    fc2.input[0] = "h_filled"
    from surgeon.model import to_graph, to_model
    ref = to_model(to_graph(ref), like=ref)  # toposort
    M.checked(res.model)
    feeds = M.random_feeds(model, 2, seed=9)
    M.assert_close_outputs(ref, res.model, feeds, rtol=1e-5)
    plain = structured(model, ratio=0.5, multiple=1)  # same channels, filled with zeros
    assert removed_channels(plain)["fc1"] == gone
    assert M.rel_l2(M.run(ref, feeds)[0], M.run(plain.model, feeds)[0]) > 1e-3


def test_linear_prediction_is_exact_for_dependent_channels_and_the_mean_for_independent_ones():
    from surgeon.channel_removal import linear_prediction
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 4)) + [1.0, -2.0, 0.5, 3.0]
    x = np.column_stack([x, x[:, :3] @ [0.5, -1.0, 2.0] + 0.7, rng.standard_normal(5000) + 4.0])  # 4: dependent, 5: not
    keep, gone = np.arange(4), np.array([4, 5])
    b, c = linear_prediction(x.mean(0), np.cov(x.T, bias=True), keep, gone, damp=1e-9)
    pred = c + x[:, keep] @ b
    np.testing.assert_allclose(pred[:, 0], x[:, 4], atol=1e-6)
    assert np.std(pred[:, 1]) < 0.05 and abs(np.mean(pred[:, 1]) - x[:, 5].mean()) < 1e-9


def _linear_chain(kind: str) -> onnx.ModelProto:
    """x -> layer a (16 channels, no bias) -> layer b: a's outputs span only its 4 (MatMul) or 3
    (1x1 conv) inputs, so the channels kept after pruning half of them predict the removed ones."""
    g = M._PruneGraph(5)
    if kind == "matmul":
        h = g.op("MatMul", "a", ["x", g.w("a.w", (4, 16), 0.5)])
        g.op("Add", "b.add", [g.op("MatMul", "b", [h, g.w("b.w", (16, 6), 0.3)]), g.w("b.b", (6,), 0.1)])
        g.nodes[-1].output[0] = "y"
        return g.model([M.tensor("x", [8, 4])], [M.tensor("y", [8, 6])])
    h = g.conv("a", "x", 3, 16, k=1, bias=False)
    g.conv("b", h, 16, 5, k=3)  # padded: a's outputs are zero there, and so is their prediction
    g.nodes[-1].output[0] = "y"
    return g.model([M.tensor("x", [2, 3, 6, 6])], [M.tensor("y", [2, 5, 6, 6])])


@pytest.mark.parametrize("kind", ["matmul", "conv"])
def test_linear_compensation_predicts_removed_channels_from_kept_ones(kind):
    """compensate=linear folds the least-squares prediction of each removed channel from the kept
    ones into the consumer's weights: where the kept channels span the removed ones the pruned
    model keeps the original's outputs (up to the ridge), which neither zeros nor means do."""
    model = _linear_chain(kind)
    calib = surgeon.synthesize(model, samples=32, seed=3)
    feeds = M.random_feeds(model, 2, seed=9)
    ref = M.run(model, feeds)[0]
    drift = {}
    for comp in ("none", "mean", "linear"):
        res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1, "compensate": comp},
                            data=calib)
        assert len(removed_channels(res)["a"]) == 8
        M.checked(res.model)
        drift[comp] = M.rel_l2(ref, M.run(res.model, feeds)[0])
    assert drift["linear"] < 0.05 and drift["mean"] > 0.2 and drift["none"] > 0.2, drift


def test_convtranspose_prunes_its_output_channels():
    model = M.prune_decoder()
    res = structured(model, ratio=0.5, multiple=1)
    shapes = weight_shapes(res.model)
    assert shapes["up1"] == (8, 16, 2, 2) and shapes["up2"] == (16, 3, 3, 3)


def test_untraceable_channels_are_kept_with_reasons():
    model = M.prune_untraceable()
    res = structured(model, ratio=0.5, multiple=1)
    why = {l.layer: (l.status, l.reason) for l in res.layers}
    assert why["a"][0] == "skipped" and "Reshape" in why["a"][1]
    assert why["b"][0] == "skipped" and "Gather" in why["b"][1]
    assert why["c"][0] == "skipped" and "Sigmoid" in why["c"][1]
    assert why["e"][0] == "rewritten"
    assert_equals_masked(model, res, M.random_feeds(model, 2))


def test_dead_channels_pruned_change_no_output():
    model = M.prune_dead_channels()
    calib = surgeon.synthesize(model, samples=16, seed=1)
    res = surgeon.apply(model, "prune", {"method": "structured", "criterion": "activation", "threshold": "dead",
                                          "multiple": 1}, data=calib)
    assert sorted(removed_channels(res)["c1"]) == [1, 5, 6, 11]
    assert weight_shapes(res.model)["c2"] == (16, 12, 3, 3)
    feeds = M.random_feeds(model, 2, seed=7)  # rows the statistics never saw
    for a, b in zip(M.run(model, feeds), M.run(res.model, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_activation_ranks_dead_channels_first():
    model = M.prune_dead_channels()
    calib = surgeon.synthesize(model, samples=16, seed=1)
    res = surgeon.apply(model, "prune", {"method": "structured", "criterion": "activation", "ratio": 0.25,
                                          "multiple": 1}, data=calib)
    assert sorted(removed_channels(res)["c1"]) == [1, 5, 6, 11]
    assert [l.details["apoz_removed"] for l in res.layers if l.layer == "c1"] == [1.0]


def test_outliers_threshold_removes_low_scores_only():
    model = M.prune_residual()
    w = next(t for t in model.graph.initializer if t.name == "stem.w")
    v = onnx.numpy_helper.to_array(w).copy()
    v[[2, 9]] *= 1e-3  # two channels with next to no weight: l1 outliers
    w.CopyFrom(onnx.numpy_helper.from_array(v, "stem.w"))
    res = structured(model, criterion="l1", threshold="outliers", multiple=1)
    gone = removed_channels(res)
    assert gone["stem"] == [2, 9]
    assert sum(map(len, gone.values())) < 8  # only outliers, not a ratio
    assert_equals_masked(model, res, M.random_feeds(model, 2), changed=False)  # they weighed ~nothing


def test_per_layer_ratio_and_min_channels():
    model = surgeon.load(M.CNN)
    res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1,
                                          "min_channels": 24}, per_layer={"conv3": {"ratio": 0.0}})
    shapes = weight_shapes(res.model)
    assert shapes["conv1"][0] == 24 and shapes["conv3"][0] == 64 and shapes["conv5"][0] == 64


def test_layers_filter_leaves_groups_alone():
    model = M.prune_residual()
    res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1}, layers="^b1b$")
    why = {l.layer: l for l in res.layers}
    # b1b is coupled with b1s and b2b, which --layers did not select: the group stays
    assert why["b1b"].status == "skipped" and "--layers" in why["b1b"].reason
    assert weight_shapes(res.model)["b1b"][0] == 32


def test_layers_filter_consumers_follow_and_say_so():
    model = surgeon.load(M.CNN)
    res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1}, layers="^conv2$")
    why = {l.layer: l for l in res.layers}
    assert weight_shapes(res.model)["conv2"][0] == 16 and weight_shapes(res.model)["conv3"] == (64, 16, 3, 3)
    assert why["conv3"].status == "rewritten" and "--layers" in why["conv3"].details["inputs_only"]
    assert why["conv1"].status == "skipped" and weight_shapes(res.model)["conv1"][0] == 32
    assert_equals_masked(model, res, M.random_feeds(model, 2))


def test_structured_is_deterministic_and_leaves_input_alone():
    model = M.prune_se_depthwise()
    before = model.SerializeToString()
    a = structured(model, ratio=0.4, multiple=1).model.SerializeToString(deterministic=True)
    b = structured(model, ratio=0.4, multiple=1).model.SerializeToString(deterministic=True)
    assert a == b and model.SerializeToString() == before


def test_bn_falls_back_to_l2_without_batchnorm():
    model = M.prune_flatten_gemm()
    res = structured(model, ratio=0.5, criterion="bn", multiple=1)
    assert any("l2 instead" in n for n in res.extras.get("notes", []))
    l2 = structured(model, ratio=0.5, criterion="l2", multiple=1)
    assert removed_channels(res)["fc1"] == removed_channels(l2)["fc1"]


def test_resnet50_equals_masked(resnet50):
    from surgeon.validate import with_outputs
    res = structured(resnet50, ratio=0.5, criterion="l1")
    M.checked(res.model)
    assert len(res.rewritten) == 54
    shapes = weight_shapes(res.model)
    assert shapes["n0"][0] == 32  # conv1: 64 -> 32
    assert res.before.total_macs / res.after.total_macs > 3.5
    # compare the logits (before the softmax, which random weights saturate)
    logits = [n.output[0] for n in resnet50.graph.node if n.op_type == "Gemm"]
    masked = mask_channels(prepare(resnet50), removed_channels(res))
    feeds = M.random_feeds(resnet50, 1)
    a = M.run(with_outputs(masked, logits), feeds)[-1]
    b = M.run(with_outputs(res.model, logits), feeds)[-1]
    o = M.run(with_outputs(resnet50, logits), feeds)[-1]
    assert a.shape == b.shape == (1, 1000)
    assert M.rel_l2(a, b) < 1e-4 and M.rel_l2(o, b) > 1e-2


# --- magnitude ---------------------------------------------------------------------------------

def test_magnitude_ratio_zero_is_the_original():
    model = surgeon.load(M.CNN)
    res = surgeon.apply(model, "prune", {"method": "magnitude", "ratio": 0.0})
    feeds = M.random_feeds(model, 4)
    for a, b in zip(M.run(model, feeds), M.run(res.model, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scope,normalize", [("layer", False), ("global", False), ("global", True)])
def test_magnitude_sparsity_is_the_ratio(scope, normalize):
    model = surgeon.load(M.CNN)
    res = surgeon.apply(model, "prune", {"method": "magnitude", "ratio": 0.6, "scope": scope,
                                          "normalize": normalize})
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    ws = [inits[n.input[1]] for n in res.model.graph.node if n.op_type in ("Conv", "Gemm")]
    total = sum(w.size for w in ws)
    zeros = sum(w.size - np.count_nonzero(w) for w in ws)
    assert abs(zeros - round(0.6 * total)) <= (0 if scope == "global" else len(ws))
    assert res.extras["sparsity"] == pytest.approx(zeros / total)
    if scope == "layer":
        for l in res.rewritten:
            assert l.details["sparsity"] == pytest.approx(0.6, abs=1e-3)
    z = res.extras["zipped_bytes"]
    assert z["after"] < z["before"] and "no faster" in res.extras["note"]
    # the kept weights are the largest
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in prepare(model).graph.initializer}
    conv2 = next(n.input[1] for n in res.model.graph.node if n.name == "conv2")
    w, w0 = inits[conv2], orig[conv2]
    if scope == "layer":
        assert np.abs(w0[w == 0]).max() <= np.abs(w0[w != 0]).min()


def test_magnitude_global_normalize_spreads_sparsity():
    model = surgeon.load(M.CNN)
    plain = surgeon.apply(model, "prune", {"method": "magnitude", "ratio": 0.5, "scope": "global"})
    norm = surgeon.apply(model, "prune", {"method": "magnitude", "ratio": 0.5, "scope": "global", "normalize": True})
    spread = lambda r: np.std([l.details["sparsity"] for l in r.rewritten])
    assert spread(norm) < spread(plain)


def test_zipped_size_is_deterministic():
    model = surgeon.load(M.CNN)
    assert zipped_size(model) == zipped_size(model) < model.ByteSize()


# --- options and CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize("opts,needle", [
    ({"ratio": 1.0}, "[0, 1)"), ({"ratio": -0.1}, "[0, 1)"), ({"multiple": 0}, "multiple must be in [1, 4096]"),
    ({"min_channels": 0}, "min_channels"), ({"threshold": "dead"}, "criterion=activation"),
    ({"method": "magnitude", "criterion": "bn"}, "structured only"), ({"criterion": "l3"}, "choose one of auto, l1, l2"),
])
def test_options_are_range_checked(opts, needle):
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        surgeon.apply(M.prune_residual(), "prune", opts)


def test_cli_structured(tmp_path):
    out = tmp_path / "cnn.pruned.onnx"
    r = CliRunner().invoke(app, ["apply", str(M.CNN), "--plugin", "prune", "--method", "structured", "--ratio",
                                 "0.25", "--criterion", "l1", "--no-validate", "-o", str(out)])
    assert r.exit_code == 0, r.output
    model = surgeon.load(out)
    assert weight_shapes(model)["conv5"][0] == 96
    assert "rewritten" in r.output


def test_cli_bad_ratio_exits_2(tmp_path):
    r = CliRunner().invoke(app, ["apply", str(M.CNN), "--plugin", "prune", "--ratio", "1.5", "--no-validate",
                                 "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "[0, 1)" in r.output


def test_compensation_gives_a_bias_to_convs_without_one():
    """The sample CNN's convs feed BatchNormalizations and have no bias: compensation adds one
    (of the weights' dtype: a float64 bias made onnxruntime refuse the model), and the linear
    prediction keeps the model far closer to the original than zeros do."""
    model = surgeon.load(M.CNN)
    calib = calibration.load_data(M.CNN_CALIB, model)
    test = calibration.load_data(M.CNN_TEST, model).take(64)
    feeds = {k: v for k, v in test.inputs.items()}
    ref = M.run(model, feeds)[0]
    drift = {}
    for comp in ("none", "mean", "linear"):
        res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "compensate": comp}, data=calib)
        M.checked(res.model)
        drift[comp] = M.rel_l2(ref, M.run(res.model, feeds)[0])
    assert drift["linear"] < 0.5 * drift["none"], drift


def test_auto_compensation_needs_real_calibration_data():
    """compensate=auto is linear only with real data: without any, or with synthesized inputs, the
    pruned model equals the masked one and the report says why nothing was predicted."""
    model = M.prune_matmul_seq()
    for data in (None, surgeon.synthesize(model, samples=8, seed=1)):
        res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.5, "multiple": 1}, data=data)
        assert res.extras["compensate"].startswith("none (no calibration data")
        assert res.extras["criterion"] == "l1"  # criterion=auto: redundancy needs the prediction
        assert any(n.startswith("removed channels are zeros (no calibration data") for n in res.extras["notes"])
        assert_equals_masked(model, res, M.random_feeds(model, 2))


def test_activation_statistics_are_read_once_per_model_and_data(monkeypatch):
    """A plan or sweep prunes one model many ways: the calibration pass runs once, and the models
    are the bytes a fresh pass gives; other data runs it again."""
    from surgeon.plugins import prune
    model = surgeon.load(M.CNN)
    calib = calibration.load_data(M.CNN_CALIB, model)
    monkeypatch.setattr(prune, "_last_stats", None)
    fresh = [surgeon.apply(model, "prune", {"ratio": r}, data=calib).model.SerializeToString() for r in (0.25, 0.5)]
    runs = []
    real = prune._activation_stats
    monkeypatch.setattr(prune, "_activation_stats", lambda *a: runs.append(1) or real(*a))
    monkeypatch.setattr(prune, "_last_stats", None)
    again = [surgeon.apply(model, "prune", {"ratio": r}, data=calib).model.SerializeToString() for r in (0.25, 0.5)]
    assert again == fresh and len(runs) == 1
    surgeon.apply(model, "prune", {"ratio": 0.5}, data=calib.take(32))
    assert len(runs) == 2


def _duplicated_hidden() -> onnx.ModelProto:
    """x (8, 12) -> MatMul a -> 16 hidden -> MatMul b -> y: hidden 12-15 copy 0-3 (redundant),
    8-11 are small but independent and read with large weights (they matter)."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((12, 16)).astype(np.float32)
    a[:, 8:12] *= 0.1
    a[:, 12:16] = a[:, 0:4]
    b = (rng.standard_normal((16, 6)) * 0.3).astype(np.float32)
    b[0:4] *= 3.0
    b[8:12] *= 10.0
    g = M._PruneGraph(0)
    h = g.op("MatMul", "a", ["x", g.const("a.w", a)])
    g.op("MatMul", "b", [h, g.const("b.w", b)])
    g.nodes[-1].output[0] = "y"
    return g.model([M.tensor("x", [8, 12])], [M.tensor("y", [8, 6])])


def test_redundancy_removes_channels_the_others_predict():
    """criterion=redundancy scores a channel by what its consumers lose when it alone goes and is
    predicted from the rest: the copies go (and are predicted back), where the activation
    criterion removes the small channels nothing else can stand in for."""
    model = _duplicated_hidden()
    calib = surgeon.synthesize(model, samples=64, seed=3)
    calib = calibration.DataSet(dict(calib.inputs), source="calib", batch=calib.batch)  # as if real
    feeds = M.random_feeds(model, 2, seed=9)
    ref = M.run(model, feeds)[0]
    drift, gone = {}, {}
    for criterion in ("redundancy", "activation"):
        res = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.25, "multiple": 1,
                                             "criterion": criterion}, data=calib)
        assert res.extras["compensate"] == "linear"
        M.checked(res.model)
        gone[criterion] = removed_channels(res)["a"]
        drift[criterion] = M.rel_l2(ref, M.run(res.model, feeds)[0])
    assert gone["redundancy"] == [12, 13, 14, 15] and gone["activation"] == [8, 9, 10, 11], gone
    default = surgeon.apply(model, "prune", {"method": "structured", "ratio": 0.25, "multiple": 1}, data=calib)
    assert default.extras["criterion"] == "redundancy" and removed_channels(default)["a"] == gone["redundancy"]
    assert any("criterion=auto: redundancy" in n for n in default.extras["notes"])  # said, not only done
    assert drift["redundancy"] < 0.01 and drift["activation"] > 0.1, drift


def test_the_calibration_pass_reports_progress(monkeypatch):
    from surgeon.plugins import prune
    monkeypatch.setattr(prune, "_last_stats", None)
    model = surgeon.load(M.CNN)
    calib = calibration.load_data(M.CNN_CALIB, model)
    seen = []
    surgeon.apply(model, "prune", {"ratio": 0.25}, data=calib, progress=lambda done, total, what: seen.append(
        (done, total, what)))
    ticks = [(d, t) for d, t, w in seen if "activation statistics" in w]
    assert ticks[0] == (0, 8) and ticks[-1] == (8, 8), seen  # 64 samples in batches of 8
