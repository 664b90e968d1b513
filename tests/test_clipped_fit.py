"""surgeon.clipped_fit: low-rank fits refined to the output of the Relu / Clip after the layer.

The z step is checked against a brute-force minimisation, the refit against the linear fit it
starts from (a fixed point when the clip never bites, never worse on the sample otherwise),
and the plugins end to end: which layers get it, what they report, and that the clipped
output drifts less on held-out data than with activation=ignore.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import surgeon
from surgeon import data_factors
from surgeon.calibration import DataSet
from surgeon import clipped_fit
from surgeon.clipped_fit import Clip, refine, refit_through, through_clip
from surgeon.rewrite import clip_after
from tests.models import CNN, CNN_CALIB, checked, init, make_model, rel_l2, run, tensor
from tests.test_data_factors import anisotropic_rows

CLIPS = [Clip(0.0, 6.0), Clip(0.0, np.inf, "Relu"), Clip(-1.0, 1.0)]


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: c.describe())
@pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
def test_z_step_is_the_elementwise_minimiser(clip, lam):
    rng = np.random.default_rng(0)
    ry = clip(rng.normal(2, 4, 500)).astype(np.float32)
    u = rng.normal(2, 4, 500).astype(np.float32)
    z = through_clip(ry, u, lam, clip).astype(np.float64)
    cost = lambda zz: (ry[:, None] - clip(zz)) ** 2 + lam * (zz - u[:, None]) ** 2  # noqa: E731
    grid = np.linspace(-25, 25, 50001)  # step 1e-3
    best = cost(grid[None, :]).min(1)
    got = cost(z[:, None])[:, 0]
    assert np.all(got <= best + 1e-5)


def _layer(seed=0, n=1500, d=12, f=20, shift=1.0):
    rng = np.random.default_rng(seed)
    x = anisotropic_rows(n, d, seed=seed, spread=1e2)
    w = rng.standard_normal((d, f)) / np.sqrt(d)
    return x.astype(np.float32), w, rng.standard_normal(f) * shift


def test_a_clip_that_never_bites_keeps_the_linear_fit():
    x, w, bias = _layer()
    fit = data_factors.data_linear(w, x, damp=0.05).fit(4, bias)
    res = refit_through(Clip(-np.inf, np.inf), x, x @ w + bias, 4, fit.a, fit.b, bias + fit.shift, w, damp=0.05)
    np.testing.assert_allclose(res.a @ res.b, fit.a @ fit.b, atol=1e-5)
    np.testing.assert_allclose(res.bias, bias + fit.shift, atol=1e-5)


@pytest.mark.parametrize("clip", CLIPS[:2], ids=lambda c: c.describe())
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_the_refit_lowers_the_clipped_error_and_never_raises_it(clip, rank):
    """Half the outputs below zero (and some above 6): the clipped error falls at low ranks and
    never rises; with no iterations the starting fit comes back unchanged."""
    x, w, bias = _layer(seed=rank)
    y = x @ w + bias
    fit = data_factors.data_linear(w, x, damp=0.05).fit(rank, bias)
    res = refit_through(clip, x, y, rank, fit.a, fit.b, bias + fit.shift, w, damp=0.05)
    clipped = lambda a, b, c: rel_l2(clip(y), clip(x @ a @ b + c))  # noqa: E731
    assert res.before == pytest.approx(clipped(fit.a, fit.b, bias + fit.shift), rel=1e-4)
    assert res.after == pytest.approx(clipped(res.a, res.b, res.bias), rel=1e-4)
    assert res.after <= res.before
    if rank < 6:  # far from the layer's rank the clip leaves room (measured 2-6.5% lower here)
        assert res.kept and res.after < 0.99 * res.before
    assert np.linalg.matrix_rank(res.a @ res.b) <= rank
    # a schedule of no iterations cannot improve: the start comes back as it was
    same = refit_through(clip, x, y, rank, fit.a, fit.b, bias + fit.shift, w, damp=0.05, schedule=())
    assert not same.kept and same.after == same.before
    np.testing.assert_array_equal(same.a, fit.a)


@pytest.mark.parametrize("clip", CLIPS[:2], ids=lambda c: c.describe())
def test_the_layer_gets_the_iterate_with_the_lowest_clipped_error(clip):
    """On 300 rows at rank 5 the lam = 1 steps raise the clipped error again after a minimum
    (as on most of ResNet-50's layers): the layer gets that minimum, not the last iterate."""
    x, w, bias = _layer(seed=1, n=300)
    y = x @ w + bias
    fit = data_factors.data_linear(w, x, damp=0.05).fit(5, bias)
    res = refit_through(clip, x, y, 5, fit.a, fit.b, bias + fit.shift, w, damp=0.05)
    errors = np.array(res.errors)
    assert len(errors) == len(clipped_fit.SCHEDULE) + 1 and errors[0] == res.before
    best = int(errors.argmin())
    assert 0 < best < len(errors) - 1 and errors[-1] > 1.001 * errors[best]  # the case this test is about
    assert res.kept and res.after == errors[best]
    assert rel_l2(clip(y), clip(x @ res.a @ res.b + res.bias)) == pytest.approx(errors[best], rel=1e-4)


@pytest.mark.parametrize("why", ["wide", "few rows"])
def test_wide_or_thin_samples_refit_the_second_factor_only(why, monkeypatch):
    """Above WHOLE_REFIT inputs, or with fewer rows than inputs, A keeps its column space
    (A' = A R with R r x r) and the clipped error still does not rise."""
    x, w, bias = _layer(seed=3, n=1500 if why == "wide" else 10)
    if why == "wide":
        monkeypatch.setattr(clipped_fit, "WHOLE_REFIT", 8)
    clip = Clip(0.0, 6.0)
    fit = data_factors.data_linear(w, x, damp=0.05).fit(3, bias)
    res = refine(clip, x, x @ w + bias, fit.a, fit.b, bias + fit.shift, w, damp=0.05)
    q, _ = np.linalg.qr(fit.a)
    np.testing.assert_allclose(q @ (q.T @ res.a), res.a, atol=1e-8)
    assert res.after <= res.before
    if why == "wide":
        assert res.kept and res.after < res.before
    monkeypatch.setattr(clipped_fit, "WHOLE_REFIT", 512)
    whole = refine(clip, x, x @ w + bias, fit.a, fit.b, bias + fit.shift, w, damp=0.05)
    if why == "wide":  # the whole refit moves A's column space
        assert np.linalg.norm(q @ (q.T @ whole.a) - whole.a) > 1e-3


def _clip_graph(act: str, *, extra_reader=False, pre_is_output=False, runtime_bound=False, opset=17):
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv")]
    inits = [init("w", np.ones((4, 3, 1, 1), np.float32))]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="act"))
    elif opset < 11:
        nodes.append(helper.make_node("Clip", ["h"], ["y"], name="act", min=0.0, max=6.0))
    else:
        inits.append(init("lo", np.array(0.0, np.float32)))
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi" if runtime_bound else "top"], ["y"], name="act"))
        if not runtime_bound:
            inits.append(init("top", np.array(6.0, np.float32)))
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["h"], ["n"], name="neg"))
    outputs = [tensor("y", None)] + ([tensor("n", None)] if extra_reader else []) + \
        ([tensor("h", None)] if pre_is_output else [])
    inputs = [tensor("x", [1, 3, 4, 4])] + ([tensor("hi", [])] if runtime_bound else [])
    graph = gs.import_onnx(make_model(nodes, inputs, outputs, inits, opset=opset))
    return graph, [n for n in graph.nodes if n.name == "conv"][0]


@pytest.mark.parametrize("case, expected", [
    ({"act": "Relu"}, Clip(0.0, np.inf, "Relu")),
    ({"act": "Clip"}, Clip(0.0, 6.0)),
    ({"act": "Clip", "opset": 6}, Clip(0.0, 6.0)),
    ({"act": "Clip", "runtime_bound": True}, None),
    ({"act": "Relu", "extra_reader": True}, None),
    ({"act": "Relu", "pre_is_output": True}, None),
])
def test_which_activation_a_layer_is_fitted_through(case, expected):
    assert clip_after(*_clip_graph(**case)) == expected


def relu6_model(c=16, f=48, hw=6, seed=0):
    """x -> 1x1 Conv (c -> f) -> Clip(0, 6) -> y, its outputs spread so that both bounds bite."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((f, c, 1, 1)) * 1.5 / np.sqrt(c)).astype(np.float32)
    b = (rng.standard_normal(f) + 1.0).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="expand"),
             helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="relu6")]
    inits = [init("w", w), init("b", b), init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    return make_model(nodes, [tensor("x", ["n", c, hw, hw])], [tensor("y", ["n", f, hw, hw])], inits)


def relu6_data(n, c=16, hw=6, seed=1):
    x = anisotropic_rows(n * hw * hw, c, seed=seed, spread=1e2).reshape(n, hw, hw, c).transpose(0, 3, 1, 2)
    return DataSet({"x": np.ascontiguousarray(x, dtype=np.float32)})


def test_tucker_fits_a_pointwise_conv_through_its_relu6():
    """Fitted on one split, measured on another: the clipped output drifts less than with
    activation=ignore, and the report says what was fitted through and by how much."""
    m, calib, test = relu6_model(), relu6_data(24), relu6_data(16, seed=2)
    drift, runs = {}, {}
    for activation in ("through", "ignore"):
        r = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25, "multiple": 1, "activation": activation},
                          data=calib)
        checked(r.model)
        feeds = next(test.batches(len(test)))
        drift[activation] = rel_l2(run(m, feeds)[0], run(r.model, feeds)[0])
        runs[activation] = r.rewritten[0].details
    through, ignore = runs["through"], runs["ignore"]
    assert "activation" not in ignore
    assert through["activation"] == "Clip(0, 6)" and through["clipped_refit"]
    assert through["clipped_error"] < through["clipped_error_before"]
    assert (through["R1"], through["R2"]) == (ignore["R1"], ignore["R2"])
    assert drift["through"] < 0.97 * drift["ignore"], drift  # measured 0.944x


def test_select_none_refits_too():
    """Without the held-out choice the refit reuses the fit's Cholesky factor; it still runs."""
    r = surgeon.apply(relu6_model(), "tucker", {"guard": "none", "ratio": 0.25, "select": "none"},
                      data=relu6_data(24))
    d = r.rewritten[0].details
    assert d["clipped_refit"] and d["clipped_error"] < d["clipped_error_before"]


def test_the_refit_is_deterministic():
    m, calib = relu6_model(), relu6_data(12)
    a = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=calib).model
    b = surgeon.apply(m, "tucker", {"guard": "none", "ratio": 0.25}, data=calib).model
    assert a.SerializeToString() == b.SerializeToString()


def test_svd_fits_the_sample_cnn_hidden_layer_through_its_relu():
    m = surgeon.load(CNN)
    calib = surgeon.load_data(CNN_CALIB, m)
    r = surgeon.apply(m, "svd", {"guard": "none", "ratio": 0.25}, data=calib)
    by_act = {l.details.get("activation"): l.details for l in r.rewritten}
    assert set(by_act) == {"Relu", None}  # the hidden Gemm feeds a Relu, the logits layer nothing
    hidden = by_act["Relu"]
    assert hidden["clipped_error"] <= hidden["clipped_error_before"]
    assert hidden["clipped_refit"]


def test_a_matmul_without_a_bias_to_move_is_not_refitted():
    """MatMul -> Relu: the fit is uncentred (no bias to carry the refit's intercept), so it is
    left as fitted and the report says nothing about the activation."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 24)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="linear"),
             helper.make_node("Relu", ["m"], ["y"], name="relu")]
    m = make_model(nodes, [tensor("x", ["n", 16])], [tensor("y", ["n", 24])], [init("w", w)])
    data = DataSet({"x": anisotropic_rows(400, 16, seed=4).astype(np.float32)})
    r = surgeon.apply(m, "svd", {"guard": "none", "ratio": 0.25}, data=data)
    assert r.rewritten and "activation" not in r.rewritten[0].details
    assert r.rewritten[0].details["fit"] == "data"


def test_a_core_with_more_outputs_than_inputs_is_refitted_whole():
    """A stem conv (3 input channels, 3x3) at R1=1, R2=12: the core maps R1*K = 9 inputs to 12
    outputs, a rank above its input count. The refit through the ReLU6 used to return 9-column
    factors that could not be reshaped into the core (EfficientNet-Lite0's stem in `surgeon
    plan`: "cannot reshape array of size 81 into shape (12,1,3,3)"); the pair keeps its rank."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 3, 3, 3)) / 3).astype(np.float32)
    b = (rng.standard_normal(32) + 1.0).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="relu6")]
    inits = [init("w", w), init("b", b), init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    m = make_model(nodes, [tensor("x", ["n", 3, 16, 16])], [tensor("y", ["n", 32, 8, 8])], inits)
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    r = surgeon.apply(m, "tucker", {"guard": "none", "ranks": (1, 12), "select": "none"}, data=DataSet({"x": x}))
    checked(r.model)
    (layer,) = r.rewritten
    assert (layer.details["R1"], layer.details["R2"]) == (1, 12) and layer.details["activation"] == "Clip(0, 6)"
    out = run(r.model, {"x": x[:4]})[0]
    assert out.shape == (4, 32, 8, 8) and np.isfinite(out).all()
    # the padded pair is the same map: x A B with A's extra columns (B's extra rows) zero
    fit = data_factors.data_linear(rng.standard_normal((9, 32)), rng.standard_normal((200, 9)))
    a, bb = fit.factors.pair(12)
    a9, b9 = fit.factors.pair(9)
    assert a.shape == (9, 12) and bb.shape == (12, 32) and not a[:, 9:].any() and not bb[9:].any()
    np.testing.assert_allclose(a @ bb, a9 @ b9)


@pytest.mark.parametrize("n", [12, 60], ids=["fewer-rows-than-inputs", "more-rows"])
def test_a_second_factor_refit_step_is_the_ridge_solution(n):
    """At the rank of its inputs (refine's second-factor refit) one M step is the closed form
    W* = (S + lam I)^-1 (E[x_c^T z_c] + lam A0), by the row form when rows < inputs and by the
    Cholesky factor otherwise; both against numpy's solve of that d x d system."""
    rng = np.random.default_rng(7)
    d, o, lam_z = 30, 20, 0.01
    x = (rng.standard_normal((n, d)) * np.geomspace(3, 0.3, d)).astype(np.float32)
    w = rng.standard_normal((d, o))
    y = (x @ w + 0.5 * rng.standard_normal((n, o))).astype(np.float32)
    a0 = w + 0.3 * rng.standard_normal((d, o))
    clip, bias = Clip(0.0, 6.0), rng.standard_normal(o)
    res = refit_through(clip, x, y, d, np.eye(d), a0, bias, a0, damp=0.05, schedule=(lam_z,))
    z = through_clip(clip(y), x @ a0.astype(np.float32) + bias.astype(np.float32), lam_z, clip).astype(np.float64)
    xc, zc = x - x.mean(0, dtype=np.float64), z - z.mean(0)
    s = xc.T @ xc / n
    lam = data_factors.damping(np.diag(s), 0.05)
    expect = np.linalg.solve(s + lam * np.eye(d), xc.T @ zc / n + lam * a0)
    np.testing.assert_allclose(res.a @ res.b, expect, rtol=0, atol=1e-4 * np.abs(expect).max())
    np.testing.assert_allclose(res.a, np.eye(d))
