"""plugins/tucker.py: Conv -> Tucker-2 triple (and 1x1 conv -> SVD pair).

Every transform test runs both models in onnxruntime and the result through
onnx.checker (full); skipped nodes must carry a reason and leave the graph as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import surgeon
from surgeon.plugins.tucker import ConvToTucker, TuckerOptions
from surgeon import guard as guard_module
from surgeon import lowrank
from surgeon.errors import UsageError
from tests.models import CNN, CNN_TEST, assert_close_outputs, checked, init, make_model, op_counts, random_feeds
from tests.models import conv_model as _conv_model
from tests.models import rel_l2, run, tensor

FULL = {"ratio": 1.0, "allow_growth": True, "guard": "none"}


def shaped(model: onnx.ModelProto) -> onnx.ModelProto:
    """Golden graphs declare outputs without a shape, which onnx 1.23's checker refuses;
    shape inference fills them in, so models before and after both pass the checker."""
    return onnx.shape_inference.infer_shapes(model)


def conv_model(**kw) -> onnx.ModelProto:
    return shaped(_conv_model(**kw))


def apply(model, **options):
    options.setdefault("guard", "none")
    return surgeon.apply(model, "tucker", options)


def layer(result, name="conv"):
    return next(l for l in result.layers if l.layer == name)


def ranks_of(model, **options) -> tuple[int, int]:
    rep = layer(apply(model, **options))
    return rep.details["R1"], rep.details["R2"]


def weight_of(model, name="w"):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def conv_nd(nd: int, c=6, f=10, k=3, size=9, seed=0, **attrs) -> onnx.ModelProto:
    """A Conv over `nd` spatial dims (Conv1d / Conv3d) with bias."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((f, c) + (k,) * nd).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k] * nd,
                            pads=[k // 2] * (2 * nd), **attrs)
    return shaped(make_model([node], [tensor("x", [2, c] + [size] * nd)], [tensor("y", None)],
                             [init("w", w), init("b", b)]))


def with_weight(model: onnx.ModelProto, w: np.ndarray) -> onnx.ModelProto:
    """The same model with the conv weight `w` replaced (to compare against a known kernel)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == "w":
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    return m


def expected_kernel(w: np.ndarray, r1: int, r2: int) -> np.ndarray:
    """Truncated HOSVD by numpy's own SVD (independent of lowrank's Gram route)."""
    f, c = w.shape[:2]
    u0 = np.linalg.svd(w.reshape(f, -1).astype(np.float64), full_matrices=False)[0][:, :r2]
    u1 = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1).astype(np.float64), full_matrices=False)[0][:, :r1]
    core = np.einsum("fckl,fr,cs->rskl", w, u0, u1, optimize=True)
    return np.einsum("rskl,fr,cs->fckl", core, u0, u1, optimize=True)


# --- structure and numerics ----------------------------------------------------------------------

def test_full_rank_triple_structure_and_numerics():
    model = conv_model(c=16, f=24, k=3, hw=10)
    result = apply(model, **FULL)
    out = checked(result.model)
    assert op_counts(out) == {"Conv": 3, "Relu": 1}
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["conv/tucker/in", "conv/tucker/core", "conv/tucker/out"]
    # the activation still follows the last conv, which keeps the original output tensor name and the bias
    assert out.graph.node[-1].op_type == "Relu" and convs[-1].output[0] == out.graph.node[-1].input[0] == "h"
    assert convs[-1].input[2] == "b" and len(convs[0].input) == 2 and len(convs[1].input) == 2
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes["conv/tucker/in/weight"] == (16, 16, 1, 1)
    assert shapes["conv/tucker/core/weight"] == (24, 16, 3, 3)
    assert shapes["conv/tucker/out/weight"] == (24, 24, 1, 1)
    assert_close_outputs(model, out, random_feeds(model), rtol=1e-5)
    rep = layer(result)
    assert rep.status == "rewritten" and rep.details["rel_error"] < 1e-6


@pytest.mark.parametrize("case", [
    dict(strides=(2, 2)),
    dict(dilations=(2, 2), pads=(2, 2, 2, 2)),
    dict(auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(auto_pad="VALID"),
    dict(pads=(0, 1, 2, 0), bias=False),
    dict(k=5, hw=13),
], ids=["stride2", "dilation2", "same_upper_stride2", "valid", "asym_pads_nobias", "k5"])
def test_triple_equals_conv_with_truncated_kernel(case):
    """At ratio 0.5 the triple computes exactly the conv with the HOSVD kernel What (multiple 1:
    the ranks as the ratio gives them)."""
    params = dict(c=16, f=24, k=3, hw=11, relu=False)
    params.update(case)
    model = conv_model(**params)
    result = apply(model, ratio=0.5, multiple=1)
    rep = layer(result)
    assert rep.status == "rewritten", rep.reason
    r1, r2 = rep.details["R1"], rep.details["R2"]
    assert (r1, r2) == (8, 12)
    out = checked(result.model)
    w = weight_of(model)
    w_hat = expected_kernel(w, r1, r2)
    assert rep.details["rel_error"] == pytest.approx(np.linalg.norm(w - w_hat) / np.linalg.norm(w), rel=1e-6)
    feeds = random_feeds(model)
    assert_close_outputs(with_weight(model, w_hat), out, feeds, rtol=1e-5)
    assert rel_l2(run(model, feeds)[0], run(out, feeds)[0]) > 1e-3  # really truncated


@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_conv3d(nd):
    model = conv_nd(nd, size=7 if nd == 3 else 15)
    full = apply(model, **FULL)
    assert op_counts(checked(full.model)) == {"Conv": 3}
    assert_close_outputs(model, full.model, random_feeds(model), rtol=1e-5)
    half = apply(model, ratio=0.5, multiple=1)
    rep = layer(half)
    assert rep.status == "rewritten" and (rep.details["R1"], rep.details["R2"]) == (3, 5)
    core = next(t for t in half.model.graph.initializer if t.name == "conv/tucker/core/weight")
    assert tuple(core.dims) == (5, 3) + (3,) * nd
    ones = [n for n in half.model.graph.node if n.name in ("conv/tucker/in", "conv/tucker/out")]
    assert all(list(helper.get_attribute_value(a)) == [1] * nd for n in ones for a in n.attribute
               if a.name == "kernel_shape")
    w = weight_of(model)
    f, c = w.shape[:2]
    u0 = np.linalg.svd(w.reshape(f, -1).astype(np.float64))[0][:, :5]
    u1 = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(c, -1).astype(np.float64))[0][:, :3]
    w_hat = np.tensordot(u0 @ u0.T, np.moveaxis(np.tensordot(u1 @ u1.T, w, axes=(1, 1)), 0, 1), axes=(1, 0))
    assert_close_outputs(with_weight(model, w_hat), checked(half.model), random_feeds(model), rtol=1e-5)


def test_pointwise_becomes_svd_pair():
    model = conv_model(c=32, f=48, k=1, hw=9, strides=(2, 2), pads=(1, 1, 1, 1))
    full = apply(model, **FULL)
    out = checked(full.model)
    assert op_counts(out) == {"Conv": 2, "Relu": 1}
    assert [n.name for n in out.graph.node if n.op_type == "Conv"] == ["conv/tucker/in", "conv/tucker/out"]
    # strides and pads move to the first conv, the bias to the second: padded positions still give the bias
    assert_close_outputs(model, out, random_feeds(model), rtol=1e-5)
    half = apply(model, ratio=0.5)
    rep = layer(half)
    assert rep.details["form"] == "svd-pair" and rep.details["R1"] == 16
    a = weight_of(model).reshape(48, 32).astype(np.float64)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    assert rep.details["rel_error"] == pytest.approx(np.sqrt(np.sum(s[16:] ** 2) / np.sum(s ** 2)), rel=1e-6)
    a_hat = (u[:, :16] * s[:16]) @ vt[:16]
    assert_close_outputs(with_weight(model, a_hat.reshape(48, 32, 1, 1)), checked(half.model),
                         random_feeds(model), rtol=1e-5)


# --- what is skipped, and why ----------------------------------------------------------------------

def _shared_weight_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1] * 4),
             helper.make_node("Conv", ["h", "w"], ["y"], name="conv_b", pads=[1] * 4)]
    return shaped(make_model(nodes, [tensor("x", [1, 8, 6, 6])], [tensor("y", None)], [init("w", w)]))


def _weight_input_model():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)
    return shaped(make_model([node], [tensor("x", [1, 8, 6, 6]), tensor("w", [8, 8, 3, 3])], [tensor("y", None)]))


def _conv_transpose_model():
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="conv", strides=[2, 2])
    return shaped(make_model([node], [tensor("x", [1, 8, 5, 5])], [tensor("y", None)], [init("w", w)]))


@pytest.mark.parametrize("build,options,reason", [
    (lambda: conv_model(c=16, f=16, group=4), {}, "grouped conv (group=4)"),
    (lambda: conv_model(c=16, f=16, group=16), {}, "grouped conv (group=16)"),
    (_weight_input_model, {}, "weight is not constant"),
    (_shared_weight_model, {}, "weight 'w' is shared with conv_b"),
    (_conv_transpose_model, {}, "ConvTranspose is not factorized"),
    (lambda: conv_model(c=16, f=16, k=1), {"pointwise": "skip"}, "1x1 conv (pointwise=skip"),
    (lambda: conv_model(c=16, f=16), {"ratio": 1.0}, "ranks 16,16 save neither parameters nor MACs"),
    (lambda: conv_model(c=16, f=16, k=1), {"ratio": 0.5}, "rank 8 save neither parameters nor MACs"),
], ids=["grouped", "depthwise", "weight_input", "shared", "conv_transpose", "pointwise_skip", "no_saving",
        "pointwise_no_saving"])
def test_skips_with_reason_and_leaves_graph(build, options, reason):
    model = build()
    result = apply(model, **options)
    reports = {l.layer: l for l in result.layers}
    assert reports["conv"].status == "skipped"
    assert reports["conv"].reason.startswith(reason), reports["conv"].reason
    assert all(l.reason for l in result.skipped)
    out = checked(result.model)
    assert op_counts(out) == op_counts(model)
    if model.graph.input[-1].name != "w":
        assert_close_outputs(model, out, random_feeds(model), rtol=0)


# --- ranks -------------------------------------------------------------------------------------------

def test_error_falls_as_rank_grows_on_one_layer():
    model = conv_model(c=24, f=32, k=3, hw=8, relu=False)
    feeds = random_feeds(model)
    ref = run(model, feeds)[0]
    errors, drifts = [], []
    for r in range(1, 25):
        result = apply(model, ranks=f"{r},{min(32, round(r * 32 / 24))}", allow_growth=True)
        errors.append(layer(result).details["rel_error"])
        drifts.append(rel_l2(ref, run(result.model, feeds)[0]))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert all(b <= a + 1e-5 for a, b in zip(drifts, drifts[1:])), drifts
    assert errors[0] > 0.5 and errors[-1] < 1e-6


def test_explicit_ranks_and_per_layer_ranks():
    model = conv_model(c=16, f=24, k=3, hw=8)
    result = apply(model, ranks="5,7")
    rep = layer(result)
    assert (rep.details["R1"], rep.details["R2"]) == (5, 7)
    shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert shapes["conv/tucker/in/weight"] == (5, 16, 1, 1)
    assert shapes["conv/tucker/core/weight"] == (7, 5, 3, 3)
    assert shapes["conv/tucker/out/weight"] == (24, 7, 1, 1)
    assert rep.details["params_after"] == 16 * 5 + 9 * 5 * 7 + 7 * 24 + 24
    assert rep.details["params_before"] == 24 * 16 * 9 + 24
    assert rep.details["macs_before"] == 8 * 8 * 24 * 16 * 9
    assert rep.details["macs_after"] == 8 * 8 * (16 * 5 + 9 * 5 * 7 + 7 * 24)
    assert rep.details["complexity_ratio"] == pytest.approx(9 * 16 * 24 / (16 * 5 + 9 * 5 * 7 + 7 * 24))
    # per-layer ranks (as a sweep's plan sets them) are kept as given; other layers keep the
    # default ratio 0.5, rounded up to a multiple of 8 (24 x 0.5 = 12 -> 16)
    two = _two_conv_model()
    per = surgeon.apply(two, "tucker", {"guard": "none"}, per_layer={"conv_b": {"ranks": "3,4"}})
    assert [(l.layer, l.details["R1"], l.details["R2"]) for l in per.rewritten] == [("conv", 8, 16), ("conv_b", 3, 4)]
    assert op_counts(checked(per.model)) == {"Conv": 6, "Relu": 1}
    assert_close_outputs(two, per.model, random_feeds(two), rtol=1.0)  # runs; the drift is real


def _two_conv_model():
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((20, 24, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv_b", pads=[1] * 4)]
    return shaped(make_model(nodes, [tensor("x", [1, 16, 8, 8])], [tensor("y", None)],
                             [init("w1", w1), init("w2", w2)]))


def test_stride2_macs_count_the_first_conv_at_input_resolution():
    model = conv_model(c=16, f=24, k=3, hw=8, strides=(2, 2))
    rep = layer(apply(model, ranks="4,6"))
    assert rep.details["macs_before"] == 4 * 4 * 24 * 16 * 9
    assert rep.details["macs_after"] == 8 * 8 * 16 * 4 + 4 * 4 * (9 * 4 * 6 + 6 * 24)


def test_energy_picks_smallest_ranks_keeping_the_energy():
    model = conv_model(c=16, f=24, k=3, hw=8)
    w = weight_of(model).astype(np.float64)
    rep = layer(apply(model, energy=0.8, multiple=1))

    def smallest(a):
        sq = np.linalg.svd(a, compute_uv=False) ** 2
        return int(np.argmax(np.cumsum(sq) / sq.sum() >= 0.8) + 1)

    assert rep.details["R1"] == smallest(np.moveaxis(w, 1, 0).reshape(16, -1))
    assert rep.details["R2"] == smallest(w.reshape(24, -1))
    assert rep.details["R1"] < 16 and rep.details["R2"] < 24


def test_vbmf_finds_the_ranks_of_a_noisy_low_rank_kernel():
    rng = np.random.default_rng(0)
    f, c, r1, r2 = 48, 32, 4, 6
    o = np.linalg.qr(rng.standard_normal((f, r2)))[0]
    i = np.linalg.qr(rng.standard_normal((c, r1)))[0]
    w = lowrank.tucker2_full(rng.standard_normal((r2, r1, 3, 3)), o, i)
    w += 0.05 * rng.standard_normal(w.shape) * np.linalg.norm(w) / np.sqrt(w.size)
    model = with_weight(conv_model(c=c, f=f, k=3, hw=8), w)
    rep = layer(apply(model, rank_method="vbmf", multiple=1))
    assert (rep.details["R1"], rep.details["R2"]) == (r1, r2)
    assert ranks_of(model, rank_method="vbmf") == (8, 8)  # estimated ranks are rounded up by default
    assert rep.details["rel_error"] < 0.1


def test_multiple_rounds_ranks_up():
    model = conv_model(c=40, f=56, k=3, hw=6)
    rep = layer(apply(model, ratio=0.3, multiple=8))
    assert (rep.details["R1"], rep.details["R2"]) == (16, 24)  # round(12) -> 16, round(16.8)=17 -> 24


def test_default_is_ratio_half_rounded_up_to_8():
    model = conv_model(c=16, f=24, k=3, hw=8)
    rep = layer(apply(model))
    assert (rep.details["R1"], rep.details["R2"]) == (8, 16) and rep.details["rank_choice"] == "ratio 0.5, multiple 8"
    assert [layer(apply(model, **o)).details["rank_choice"] for o in ({"multiple": 1}, {"ranks": "5,7"})] \
        == ["ratio 0.5", "ranks 5,7"]
    # 0.3 x 16 = 4.8 -> 5 -> 8 and 0.3 x 24 = 7.2 -> 7 -> 8; multiple 1 keeps the ratio's own
    # ranks; explicit ranks are rounded only when multiple is given
    assert ranks_of(model, ratio=0.3) == (8, 8)
    assert ranks_of(model, ratio=0.3, multiple=1) == (5, 7)
    assert ranks_of(model, energy=0.8) == tuple(-(-r // 8) * 8 for r in ranks_of(model, energy=0.8, multiple=1))
    assert ranks_of(model, ranks="5,7") == (5, 7)
    assert ranks_of(model, ranks="5,7", multiple=4) == (8, 8)


def test_hooi_is_no_worse_than_hosvd():
    model = surgeon.load(CNN)
    hosvd = apply(model, ratio=0.25)
    hooi = apply(model, ratio=0.25, method="hooi")
    pairs = [(a.details["rel_error"], b.details["rel_error"]) for a, b in zip(hosvd.layers, hooi.layers)
             if a.status == "rewritten"]
    assert len(pairs) == 4
    assert all(b <= a + 1e-12 for a, b in pairs), pairs
    assert any(b < a - 1e-4 for a, b in pairs), pairs
    assert all(l.details["method"] == "hooi" for l in hooi.rewritten)
    checked(hooi.model)
    assert_close_outputs(model, hooi.model, random_feeds(model), rtol=0.5)


@pytest.mark.parametrize("options,message", [
    ({"ratio": 0.5, "energy": 0.9}, "choose one way to set ranks"),
    ({"ratio": 0.5, "rank_method": "vbmf"}, "choose one way to set ranks"),
    ({"ranks": "4"}, "expected 2 comma-separated values"),
    ({"ranks": "0,4"}, "ranks must be >= 1"),
    ({"ratio": 1.5}, "ratio must be in (0, 1]"),
    ({"method": "cp"}, "choose one of hosvd, hooi"),
    ({"rank": 3}, "valid options"),
])
def test_bad_options(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("]", r"\]")):
        ConvToTucker().make_options(options)


def test_options_parse_from_strings():
    opts = ConvToTucker().make_options({"ranks": "8,4", "method": "hooi", "multiple": "4", "guard": "none",
                                        "allow_growth": "true", "pointwise": "skip"})
    assert opts == TuckerOptions(ranks=(8, 4), method="hooi", multiple=4, guard="none", allow_growth=True,
                                 pointwise="skip")


# --- the latency guard ---------------------------------------------------------------------------

def test_guard_reverts_a_slower_layer(monkeypatch):
    timed = []

    def slower(node, chain, shape, opset, threads=0, **kw):
        timed.append((node.name, tuple(shape), [n.name for n in chain]))
        return guard_module.GuardResult(original_ms=1.0, chain_ms=1.6)

    monkeypatch.setattr(guard_module, "time_rewrite", slower)
    model = conv_model(c=16, f=24, k=3, hw=8)
    result = surgeon.apply(model, "tucker", {"ratio": 0.5})  # guard=latency is the default
    assert timed == [("conv", (1, 16, 8, 8), ["conv/tucker/in", "conv/tucker/core", "conv/tucker/out"])]
    rep = layer(result)
    assert rep.status == "skipped" and rep.reason.startswith("slower (1.60x")
    assert rep.details["guard"]["speedup"] == pytest.approx(1 / 1.6, rel=1e-3)
    assert not any(t.name.startswith("conv/tucker") for t in result.model.graph.initializer)
    assert op_counts(checked(result.model)) == op_counts(model)
    assert_close_outputs(model, result.model, random_feeds(model), rtol=0)


def test_guard_keeps_a_faster_layer(monkeypatch):
    monkeypatch.setattr(guard_module, "time_rewrite",
                        lambda *a, **k: guard_module.GuardResult(original_ms=2.0, chain_ms=1.0))
    model = conv_model(c=16, f=24, k=3, hw=8)
    result = surgeon.apply(model, "tucker", {"ratio": 0.5})
    rep = layer(result)
    assert rep.status == "rewritten" and rep.details["guard"]["speedup"] == 2.0
    assert op_counts(checked(result.model)) == {"Conv": 3, "Relu": 1}


# --- real models ---------------------------------------------------------------------------------

def test_sample_cnn_full_rank_reproduces_outputs_and_accuracy():
    model = surgeon.load(CNN)
    result = apply(model, **FULL)
    assert [l.layer for l in result.rewritten] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    out = checked(result.model)
    assert op_counts(out)["Conv"] == 15
    data = surgeon.load_data(CNN_TEST, model)
    v = surgeon.validate(model, out, data, latency=False)
    assert v.worst_rel_l2 < 1e-5 and v.accuracy["candidate"] == v.accuracy["original"]


def test_sample_cnn_half_ratio_keeps_accuracy():
    model = surgeon.load(CNN)
    result = apply(model, ratio=0.5)
    assert layer(result, "conv1").reason.startswith("ranks 1,16 save neither")  # 1 input channel
    assert len(result.rewritten) == 4
    assert result.after.total_params < result.before.total_params
    assert result.after.total_macs < result.before.total_macs
    v = surgeon.validate(model, checked(result.model), surgeon.load_data(CNN_TEST, model), latency=False)
    assert v.accuracy["candidate"] >= v.accuracy["original"] - 0.02
    assert 1e-4 < v.worst_rel_l2 < 0.5


def test_resnet50_full_rank_reproduces_outputs(resnet50):
    result = apply(resnet50, **FULL)
    forms = [l.details["form"] for l in result.rewritten]
    assert len(result.rewritten) == 53 and forms.count("tucker2") == 17 and forms.count("svd-pair") == 36
    out = checked(result.model)
    assert op_counts(out)["Conv"] == 17 * 3 + 36 * 2
    assert_close_outputs(resnet50, out, random_feeds(resnet50, samples=1), rtol=1e-4)


def test_two_runs_are_byte_identical():
    model = surgeon.load(CNN)
    a = apply(model, ratio=0.375, method="hooi", iterations=3)
    b = apply(model, ratio=0.375, method="hooi", iterations=3)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    c = apply(model, rank_method="vbmf")
    d = apply(model, rank_method="vbmf")
    assert c.model.SerializeToString() == d.model.SerializeToString()


# --- issue 13 / 8: data-aware fit and fp16 ------------------------------------------------------

from surgeon.calibration import DataSet  # noqa: E402
from tests.models import fp16_conv_model, float_types  # noqa: E402
from onnx import TensorProto  # noqa: E402


def _real(model, samples=16, seed=0):
    return DataSet(random_feeds(model, samples=samples, seed=seed), source="test", batch=2)


@pytest.mark.parametrize("fit", ["weights", "data"])
def test_fp16_model_stays_fp16(fit):
    from tests.models import run as run_model
    m = fp16_conv_model()
    r = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 1.0, "allow_growth": True, "fit": fit},
                      data=_real(m))
    assert [l.status for l in r.layers] == ["rewritten", "rewritten"]
    assert all(l.details["fit"] == fit for l in r.layers)
    checked(r.model)
    assert float_types(r.model) == {TensorProto.FLOAT16}
    feeds = random_feeds(m, samples=2, seed=5)
    a, b = run_model(m, feeds)[0], run_model(r.model, feeds)[0]
    assert b.dtype == np.float16
    assert rel_l2(a, b) < 2e-2  # full rank: fp16 rounding (and float32 sample sums for fit=data)


def test_report_flags_layers_short_of_calibration_rows():
    """A 1x1 conv with 64 inputs at 2x2 sees 4 positions per sample: 8 samples give 32 rows,
    fewer than 2 per input, and the fit takes every one; 64 samples give 256, enough."""
    m = _conv_model(c=64, f=64, k=1, hw=2, batch="N")
    few = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=_real(m, samples=8))
    (l,) = few.rewritten
    assert (l.details["calib_rows"], l.details["calib_positions"], l.details["calib_inputs"]) == (32, 32, 64)
    assert l.details["hint"].startswith("few calibration rows: every position of the 8 calibration samples")
    assert f"{l.layer}: {l.details['hint']}" in few.notes
    enough = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=_real(m, samples=64))
    assert "hint" not in enough.rewritten[0].details
    assert not any("few calibration rows" in n for n in enough.notes)


def test_data_fit_needs_real_data():
    m = fp16_conv_model()
    for data in (None, surgeon.synthesize(m, samples=4)):
        r = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.5}, data=data)
        for l in r.rewritten:
            assert l.details["fit"] == "weights"
            assert "no calibration data" in l.details["fit_note"]


def test_data_fit_cuts_drift_on_the_sample_cnn():
    """Fitted on the calibration split, measured on the test split: at equal ranks the
    data-aware factors drift at least 2x less than the weight-space ones."""
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    test = surgeon.load_data(CNN_TEST, m)
    drift, ranks = {}, {}
    for fit in ("weights", "data"):
        r = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25, "fit": fit}, data=calib)
        ranks[fit] = [(l.details["R1"], l.details["R2"]) for l in r.rewritten]
        drift[fit] = surgeon.validate(m, r.model, test, latency=False).worst_rel_l2
        if fit == "data":
            assert all(l.details["out_error"] >= 0 and l.details["calib_rows"] > 0 for l in r.rewritten)
            assert any(l.details["sequential"] for l in r.rewritten)
    assert ranks["data"] == ranks["weights"]
    assert drift["data"] * 2 <= drift["weights"], drift


def test_data_fit_is_deterministic():
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    a = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=calib).model
    b = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=calib).model
    assert a.SerializeToString() == b.SerializeToString()


def test_energy_on_output_spectrum_gives_per_layer_ranks():
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    lo = surgeon.apply(m, "tucker", {"guard": "none", "energy": 0.8}, data=calib)
    hi = surgeon.apply(m, "tucker", {"guard": "none", "energy": 0.99}, data=calib)
    rank = lambda r: {l.layer: (l.details["R1"], l.details["R2"]) for l in r.rewritten}
    for layer, (r1, r2) in rank(lo).items():
        if layer in rank(hi):
            assert rank(hi)[layer][0] >= r1 and rank(hi)[layer][1] >= r2


def test_held_out_choice_is_what_each_layer_gets():
    """fit=data (default select=heldout): each layer with a rewrite upstream reports every
    candidate's held-out error and gets the lowest; a layer of the first stage has one candidate
    (data: no upstream error to correct) and no trial; select=none (always the sequential fit)
    tries nothing."""
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    opts = {"guard": "none", "ratio": 0.25}
    r = surgeon.apply(m, "tucker", opts, data=calib)
    choices, chosen = [], 0
    for l in r.rewritten:
        errors = l.details.get("heldout_errors")
        choices.append(l.details["fit_choice"])
        if errors is None:
            assert l.details["fit_choice"] == "data"
            continue
        chosen += 1
        assert l.details["fit_choice"] == min(errors, key=errors.get)
        assert set(errors) <= {"sequential", "residual", "data"} and "data" in errors and "sequential" in errors
        assert l.details["heldout_samples"] >= 1 and l.details["heldout_rows"] >= 1
    assert chosen >= 2 and len(r.rewritten) > chosen  # the first stage's layer(s) had nothing to choose
    plain = surgeon.apply(m, "tucker", {**opts, "select": "none"}, data=calib)
    assert all("heldout_errors" not in l.details for l in plain.rewritten)
    # here every layer's winner is the default fit (data in the first stage, sequential after)
    assert [l.details["fit_choice"] for l in plain.rewritten] == choices


def test_a_bias_exported_as_an_add_is_folded_into_the_conv_before_the_fit():
    """paddle2onnx and some TensorFlow converters put a conv's bias in an Add after it; the fit
    must still see the Relu behind it (the refit through the activation) and move the bias."""
    from tests.models import biases_as_adds
    m = _conv_model(c=16, f=32, k=3, hw=8, batch="N")
    split = biases_as_adds(m)
    data = _real(m, samples=16)
    opts = {"guard": "none", "ratio": 0.25}
    plain, folded = surgeon.apply(m, "tucker", opts, data=data), surgeon.apply(split, "tucker", opts, data=data)
    (l,) = folded.rewritten
    assert l.details["folded"] == ["conv_add"] and l.details["activation"] == "Relu"
    assert "Add" not in op_counts(checked(folded.model))
    feeds = random_feeds(m, samples=4, seed=3)
    np.testing.assert_allclose(run(folded.model, feeds)[0], run(plain.model, feeds)[0], rtol=1e-5, atol=1e-5)
    # a conv that --layers leaves alone keeps its Add
    untouched = surgeon.apply(split, "tucker", opts, data=data, layers="nothing")
    assert op_counts(untouched.model)["Add"] == 1


def test_a_data_fit_folds_the_batchnorm_after_the_conv_and_fits_through_the_relu():
    """The digits CNN is Conv -> BatchNormalization -> Relu: folded, the fit aims at what the
    next layer reads and refits through the Relu (measured at ratio 1/4 on the test digits:
    0.0471 drift with the BNs apart, 0.0368 folded). Full rank still reproduces the model;
    the weight fit keeps the BNs apart (on folded weights it drifted 0.353 against 0.184)."""
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    test = surgeon.load_data(CNN_TEST, m).take(200)
    full = surgeon.apply(m, "tucker", {**FULL, "fit": "data"}, data=calib)
    assert [l.details["folded"] for l in full.rewritten] == [[f"bn{k}"] for k in range(1, 6)]
    assert "BatchNormalization" not in op_counts(checked(full.model))
    assert surgeon.validate(m, full.model, test, latency=False).worst_rel_l2 < 1e-4
    fitted = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25, "multiple": 1}, data=calib)
    assert all(l.details["activation"] == "Relu" for l in fitted.rewritten)
    weights = surgeon.apply(m, "tucker", {**FULL, "fit": "weights"}, data=calib)
    assert op_counts(weights.model)["BatchNormalization"] == 5 and "folded" not in weights.rewritten[0].details
    mixed = surgeon.apply(m, "tucker", FULL, data=calib, per_layer={"conv2": {"fit": "weights"}})  # a recipe's
    assert op_counts(mixed.model)["BatchNormalization"] == 1 and "folded" not in layer(mixed, "conv2").details


def test_a_data_fit_folds_a_batchnorm_exported_as_mul_plus_add_as_it_folds_the_batchnorm():
    """torchvision's FrozenBatchNorm2d exports as Conv -> Mul(a) -> Add(c) -> Relu: the same fit
    as with the BatchNormalization (ratio 1/4 on the test digits: 0.0471 drift with the Mul and
    Add left apart, 0.0368 folded, as with the BNs)."""
    from tests.models import batchnorms_as_mul_add
    m = surgeon.load(CNN)
    split = batchnorms_as_mul_add(m)
    calib = surgeon.load_data(CNN.with_name("digits_cnn_calib.npz"), m)
    test = surgeon.load_data(CNN_TEST, m).take(200)
    opts = {"guard": "none", "ratio": 0.25, "multiple": 1}
    fitted, ref = surgeon.apply(split, "tucker", opts, data=calib), surgeon.apply(m, "tucker", opts, data=calib)
    assert [l.layer for l in fitted.rewritten] == [l.layer for l in ref.rewritten] == [f"conv{k}" for k in range(2, 6)]
    assert [l.details["folded"] for l in fitted.rewritten] == [[f"bn{k}_mul", f"bn{k}_add"] for k in range(2, 6)]
    assert all(l.details["activation"] == "Relu" for l in fitted.rewritten)
    drift = surgeon.validate(split, checked(fitted.model), test, latency=False).worst_rel_l2
    assert drift == pytest.approx(surgeon.validate(m, ref.model, test, latency=False).worst_rel_l2, rel=0.02)
    weights = surgeon.apply(split, "tucker", {**opts, "fit": "weights"}, data=calib)  # scales kept apart, as BNs
    assert op_counts(weights.model)["Mul"] == 5 and "folded" not in weights.rewritten[0].details
