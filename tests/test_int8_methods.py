"""int8 methods of issue 12, each on a small graph where it must help, checked against a reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import surgeon
from surgeon.calibration import DataSet
from surgeon.plugins import int8_explain as ie
from surgeon.plugins import int8_gptq as gq
from tests.models import checked, init, make_model, rel_l2, run, tensor


# --- GPTQ -------------------------------------------------------------------------------------

def obq_reference(W: np.ndarray, s: np.ndarray, H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The OBQ/GPTQ update written the slow way (Frantar et al., eq. 2-3): quantize column j,
    spread its error over the later columns with the inverse Hessian, then remove j from H^-1 by
    Gaussian elimination. No Cholesky, no blocks."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    for j in range(W.shape[1]):
        q = np.clip(np.round(W[:, j] / s), -127, 127)
        Q[:, j] = q
        err = (W[:, j] - q * s) / Hinv[j, j]
        W[:, j + 1:] -= np.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def correlated_inputs(d: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3))
    return base @ rng.standard_normal((3, d)) + 0.05 * rng.standard_normal((n, d))  # nearly rank 3


def test_gptq_matches_the_obq_reference_and_beats_rounding_to_nearest():
    rng = np.random.default_rng(1)
    d, r = 300, 6  # more than one 128-column block
    X = correlated_inputs(d, 2000)
    H = X.T @ X / len(X)
    W = rng.standard_normal((r, d))
    s = np.abs(W).max(axis=1) / 127 * 8  # coarse grid: round-to-nearest error is large
    ours = gq.gptq_quantize(W[None], s[None], H[None])[0]
    np.testing.assert_array_equal(ours, obq_reference(W, s, H))
    rtn = np.clip(np.round(W / s[:, None]), -127, 127)
    e_rtn = gq.output_error(W[None], (rtn * s[:, None])[None], H[None])
    e_gptq = gq.output_error(W[None], (ours * s[:, None])[None], H[None])
    assert e_gptq < 0.5 * e_rtn


def test_gptq_two_columns_by_hand():
    """w = (0.6, 0.0), s = 1, H = [[1, 0.5], [0.5, 1]] (no damping): q1 = round(0.6) = 1 leaves
    error -0.4; OBQ moves it onto w2 with H^-1[0,1] / H^-1[0,0] = -0.5: w2 = 0 + 0.4 * -0.5... i.e.
    w2 -= (0.6 - 1) / Hinv00 * Hinv01 = 0.4 * (-0.5) = -0.2 -> round(-0.2) = 0. With w = (0.6, -0.4)
    w2 becomes -0.6 -> -1, where round-to-nearest gives 0."""
    H = np.array([[1.0, 0.5], [0.5, 1.0]])
    for w2, expect in ((0.0, [1, 0]), (-0.4, [1, -1])):
        W = np.array([[0.6, w2]])
        q = gq.gptq_quantize(W[None], np.ones((1, 1)), H[None], damp=0.0)[0]
        np.testing.assert_array_equal(q, [expect])


def correlated_conv_model(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    w[:, 0, 1, 1] += 4 * np.sign(rng.standard_normal(16)).astype(np.float32)  # one tap sets each row's scale
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                      [tensor("x", ["N", 8, 10, 10])], [tensor("y", ["N", 16, 10, 10])], [init("w", w)])


def correlated_conv_data(n: int = 32, seed: int = 0) -> DataSet:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 2, 10, 10))
    mix = rng.standard_normal((8, 2))
    x = np.einsum("nchw,dc->ndhw", base, mix) + 0.05 * rng.standard_normal((n, 8, 10, 10))
    return DataSet({"x": x.astype(np.float32)}, source="test")


@pytest.mark.parametrize("setting, bound", [(True, 64), (False, 127)])
def test_gptq_integers_stay_within_the_weight_range_reduce_range_sets(setting, bound):
    """7-bit weights are there so that u8 x s8 products cannot saturate: GPTQ's error feedback
    must not push an integer past them (with uniform weights it pushed one to 65 when it
    clamped at 127)."""
    w = np.random.default_rng(0).uniform(-1, 1, (16, 8, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 8, 10, 10])], [tensor("y", ["N", 16, 10, 10])], [init("w", w)])
    res = surgeon.apply(model, "int8", {"bias_correction": "off", "equalize": "off", "weight_rounding": "gptq",
                                        "reduce_range": setting}, data=correlated_conv_data())
    assert res.extras["weight_rounding"]["layers"] == 1 and res.extras["types"]["reduce_range"] is setting
    q = [onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer]
    q = [a.astype(np.int32) for a in q if a.dtype == np.int8]
    assert q and max(int(np.abs(a).max()) for a in q) == bound


def test_gptq_lowers_the_drift_of_a_conv_with_correlated_inputs():
    model = correlated_conv_model()
    data = correlated_conv_data()
    common = {"bias_correction": "off", "equalize": "off"}
    near = surgeon.apply(model, "int8", {**common, "weight_rounding": "nearest"}, data=data)
    gptq = surgeon.apply(model, "int8", {**common, "weight_rounding": "gptq", "gptq_max_inputs": 4096}, data=data)
    out = checked(gptq.model)
    assert gptq.extras["weight_rounding"]["layers"] == 1
    x = data.inputs
    d_near = rel_l2(run(model, x)[0], run(near.model, x)[0])
    d_gptq = rel_l2(run(model, x)[0], run(out, x)[0])
    assert gptq.extras["weight_rounding"]["median_layer_error_ratio"] < 0.7
    assert d_gptq < 0.9 * d_near, (d_gptq, d_near)  # the rest is activation rounding, the same in both
    # only the int8 values changed: same ops, same scales
    ops = lambda m: sorted(n.op_type for n in m.graph.node)
    assert ops(near.model) == ops(out)


def test_conv_columns_and_grams_match_an_explicit_im2col():
    """_conv_columns is im2col (pads, strides, dilations, groups) exactly; accumulate_grams sums
    X X^T over every image and, apart, over the held-out images (3 and 7 of 8)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    attrs = {"pads": [1, 0, 1, 2], "strides": [2, 1], "dilations": [1, 2]}
    layer = gq.Layer("c", "Conv", "x", w, np.ones(4), None, attrs, groups=2)
    x = rng.standard_normal((8, 4, 7, 6)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 2))).astype(np.float64)  # pads: top, left, bottom, right

    def im2col(n):
        cols = []
        for i in range(4):  # (9 - 2 - 1) // 2 + 1 output rows
            for j in range(4):  # (8 - 4 - 1) // 1 + 1 output columns
                patch = np.array([[xp[n, c, i * 2 + a, j + 2 * b] for a in range(3) for b in range(3)]
                                  for c in range(4)])  # (C, 9)
                cols.append(patch.reshape(2, 18))  # group g reads channels 2g, 2g+1
        return np.stack(cols, axis=-1)  # (G, D, P)

    got = list(gq._conv_columns(x, layer, 10_000, np.random.default_rng(0)))
    assert len(got) == 8
    for n, X in enumerate(got):
        np.testing.assert_array_equal(X, im2col(n))
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2, **attrs)],
                       [tensor("x", ["N", 4, 7, 6])], [tensor("y", ["N", 4, None, None])], [init("w", w)])
    gq.accumulate_grams(model, [layer], DataSet({"x": x}, source="test"), positions=10_000)

    def gram(images):
        X = np.concatenate([im2col(n) for n in images], axis=-1)
        return X @ np.swapaxes(X, 1, 2)

    # float32 sums: round-off, not 1e-10
    np.testing.assert_allclose(layer.gram, gram(range(8)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(layer.held, gram([3, 7]), rtol=1e-5, atol=1e-4)
    assert (layer.count, layer.held_count) == (128, 32)


def gemm_model(w: np.ndarray):
    return make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
                      [tensor("x", ["N", w.shape[0]])], [tensor("y", ["N", w.shape[1]])], [init("w", w)])


def test_gram_sums_switch_to_float64_before_float32_overflows():
    """Seeded model-zoo weights make activations of 1e19 and more (light_inception_v1): a
    float32 sum of their squares overflows. The sum moves to float64 first and stays finite
    and exact to round-off, for one group (syrk) and for grouped convs."""
    rng = np.random.default_rng(4)
    for groups in (1, 3):
        blocks = [rng.standard_normal((groups, 5, 40)).astype(np.float32) * scale for scale in (1.0, 1e19, 3e19)]
        total = gq.GramSum()
        for X in blocks:
            total.add(X)
        want = sum(X.astype(np.float64) @ np.swapaxes(X.astype(np.float64), 1, 2) for X in blocks)
        got = total.value()
        assert np.isfinite(got).all() and total.count == 120
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    W = rng.standard_normal((1, 3, 5))  # and the output errors on such an H (entries near 1e38)
    e = gq.output_errors(W, [np.round(W)], want[:1] / total.count)[0]
    assert np.isfinite(e) and 0 < e < 1


def test_held_out_grams_are_those_of_every_fourth_image():
    """accumulate_grams splits by image: H over all rows and over images 3, 7, 11, ... alone,
    across batches (70 images: batches of 64 and 6)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    x = rng.standard_normal((70, 6)).astype(np.float32)
    layer = gq.Layer("fc", "Gemm", "x", w, np.ones(3), None, {"transB": False})
    gq.accumulate_grams(gemm_model(w), [layer], DataSet({"x": x}, source="test"), positions=1)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(layer.gram[0], x64.T @ x64, rtol=1e-5, atol=1e-4)  # float32 sums
    held = x64[3::4]
    np.testing.assert_allclose(layer.held[0], held.T @ held, rtol=1e-5, atol=1e-4)  # float32 sums
    assert (layer.count, layer.held_count) == (70, 17)
    assert not gq.held_out_images(3).any()  # too few images to split: no check


def test_held_out_rows_of_a_sequence_first_matmul_are_found_by_the_batch_axis():
    """An OCR recognizer's MatMul reads (T, N, K): the held-out rows are those of images 3 and 7
    on axis 1, not rows 3 and 7 of axis 0; where the first axis is not the batch's and two others
    have its size, the layer gets no split (held count 0) rather than a guessed one."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    seq = make_model([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
                      helper.make_node("MatMul", ["xt", "w"], ["y"], name="mm")],
                     [tensor("x", ["N", 5, 6])], [tensor("y", [5, "N", 3])], [init("w", w)])
    x = rng.standard_normal((8, 5, 6)).astype(np.float32)
    layer = gq.Layer("mm", "MatMul", "xt", w, np.ones(3), None, {"transB": False})
    gq.accumulate_grams(seq, [layer], DataSet({"x": x}, source="test"), positions=1)
    rows = x.reshape(-1, 6).astype(np.float64)
    held = x[[3, 7]].reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(layer.gram[0], rows.T @ rows, rtol=1e-5, atol=1e-4)  # float32 sums
    np.testing.assert_allclose(layer.held[0], held.T @ held, rtol=1e-5, atol=1e-4)  # float32 sums
    assert (layer.count, layer.held_count) == (40, 10)
    # (5, N, 8, 6) with N = 8: two axes past the first have the batch's size; no split
    odd = make_model([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2, 3]),
                      helper.make_node("MatMul", ["xt", "w"], ["y"], name="mm")],
                     [tensor("x", ["N", 5, 8, 6])], [tensor("y", [5, "N", 8, 3])], [init("w", w)])
    layer = gq.Layer("mm", "MatMul", "xt", w, np.ones(3), None, {"transB": False})
    x4 = rng.standard_normal((8, 5, 8, 6)).astype(np.float32)
    gq.accumulate_grams(odd, [layer], DataSet({"x": x4}, source="test"), positions=1)
    assert (layer.count, layer.held_count) == (320, 0)


def test_gptq_is_refused_where_it_fits_its_images_but_not_the_held_out_ones():
    """Images 3, 7, 11, 15 (held out) excite input directions the others never do. GPTQ fitted on
    the others pushes rounding error into those directions freely, so on the held-out images it
    is worse than round-to-nearest: the layer keeps round-to-nearest (the same int8 weights as
    weight_rounding=nearest), and the recorded errors are the ones computed here by hand."""
    rng = np.random.default_rng(3)
    d, f, n = 24, 8, 16
    w = rng.standard_normal((d, f)).astype(np.float32)
    w[0] *= 6  # one large input row sets every column's scale: round-to-nearest error is large
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    held = gq.held_out_images(n)
    coef = rng.standard_normal((n, d)) * 0.01
    coef[~held, :4] += rng.standard_normal((int((~held).sum()), 4)) * 3  # the fitted images: 4 directions
    coef[held, 4:] += rng.standard_normal((int(held.sum()), d - 4))      # the held-out ones: the rest
    x = (coef @ basis.T).astype(np.float32)
    data = DataSet({"x": x}, source="test")
    common = {"bias_correction": "off", "equalize": "off", "sequential_bias": "off", "calibration": "minmax"}
    gptq = surgeon.apply(gemm_model(w), "int8", {**common, "weight_rounding": "gptq"}, data=data)
    near = surgeon.apply(gemm_model(w), "int8", {**common, "weight_rounding": "nearest"}, data=data)
    info = gptq.extras["weight_rounding"]
    assert info["layers"] == 0 and "held-out" in info["skipped"]["fc"]
    e_rtn, e_gptq = info["held_out_error_rtn_gptq"]["fc"]
    # by hand: the model's per-column scales, H of the fitted / held-out rows, the errors on the latter
    qi = {i.name: numpy_helper.to_array(i) for i in near.model.graph.initializer}
    wq = next(v for v in qi.values() if v.dtype == np.int8 and v.shape == w.shape)
    scale = next(v for k, v in qi.items() if v.shape == (f,) and v.dtype == np.float32 and "scale" in k)
    W, s = w.T.astype(np.float64)[None], scale.astype(np.float64)[None]
    x64 = x.astype(np.float64)
    h_fit, h_held = (x64[m].T @ x64[m] / m.sum() for m in (~held, held))
    trial = gq.gptq_quantize(W, s, h_fit[None], 0.01)
    rows = x64[held]
    by_hand = [np.linalg.norm(rows @ (w.T.astype(np.float64) - q[0] * s[0][:, None]).T) / np.linalg.norm(rows @ w)
               for q in (np.clip(np.round(W / s[..., None]), -127, 127), trial)]
    np.testing.assert_allclose([e_rtn, e_gptq], by_hand, atol=6e-6)  # the report rounds to 5 decimals
    assert e_gptq > e_rtn
    np.testing.assert_array_equal(wq.T, np.clip(np.round(w.T / scale[:, None]), -127, 127))  # onnxruntime's RTN
    ints = lambda m: sorted((i.name, numpy_helper.to_array(i).tobytes()) for i in m.graph.initializer
                            if i.data_type == onnx.TensorProto.INT8)
    assert ints(gptq.model) == ints(near.model)


# --- explain ----------------------------------------------------------------------------------

def outlier_channel_model(seed: int = 0):
    """x -> Conv1x1 -> h (channel 0 has a 50x larger range) -> Conv1x1 -> y."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32) * 0.5
    w1[0] *= 50.0
    w2 = rng.standard_normal((5, 6, 1, 1)).astype(np.float32) * 0.5
    w2[:, 0] /= 50.0  # the outlier channel matters as little as the others downstream
    return make_model([helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"),
                       helper.make_node("Conv", ["h", "w2"], ["y"], name="c2")],
                      [tensor("x", ["N", 4, 6, 6])], [tensor("y", ["N", 5, 6, 6])],
                      [init("w1", w1), init("w2", w2)])


def test_explain_finds_the_outlier_channel_and_one_tensor_drift_is_exact():
    model = outlier_channel_model()
    rng = np.random.default_rng(0)
    data = DataSet({"x": rng.standard_normal((24, 4, 6, 6)).astype(np.float32)}, source="test")
    res = surgeon.apply(model, "int8", {"explain": True, "weight_rounding": "nearest", "bias_correction": "off",
                                        "equalize": "off"}, data=data)
    ex = res.extras["explain"]
    assert ex["rows"] == 24
    assert ex["activations"][0]["tensor"] == "h"
    assert ex["activations"][0]["channel_spread"] > 10  # one channel sets the scale
    assert set(ex["drift"]) == {"int8", "weights_only", "activations_only"}
    # by hand: y with only h quantized = Conv2(dq(q(h))) with h's scale and zero point from the QDQ model
    acts, _ = ie.qdq_params(res.model)
    scale, zp = (np.asarray(v, np.float64) for v in acts["h"])
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)[:, :, 0, 0]
    w2 = onnx.numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)[:, :, 0, 0]
    x = data.inputs["x"].astype(np.float64)
    h = np.einsum("fc,nchw->nfhw", w1, x)
    hq = (np.clip(np.round(h / scale) + zp, 0, 255) - zp) * scale
    y, yq = (np.einsum("fc,nchw->nfhw", w2, a) for a in (h, hq))
    by_hand = np.linalg.norm(yq - y) / np.linalg.norm(y)
    assert ex["activations"][0]["drift_alone"] == pytest.approx(by_hand, rel=2e-3)


# --- minmax-or-percentile (the default calibration) -------------------------------------------

def outlier_input_model(width: int = 256, seed: int = 0):
    """y = x W + b (Gemm) with x ~ N(0, 1) except ONE value of 60: minmax spends 255 levels on
    [-60, 60]."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, 32)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="mm")]
    model = make_model(nodes, [tensor("x", ["N", width])], [tensor("y", ["N", 32])],
                       [init("w", w), init("b", np.full(32, 0.1, np.float32))])
    x = rng.standard_normal((48, width)).astype(np.float32)
    x[3, 17] = 60.0
    return model, DataSet({"x": x}, source="test")


def test_default_calibration_keeps_the_ranges_with_the_lower_drift():
    model, ds = outlier_input_model()
    common = {"equalize": "off", "bias_correction": "off", "weight_rounding": "nearest"}
    res = surgeon.apply(model, "int8", common, data=ds)
    choice = res.extras["calibration_choice"]
    # the two are close on this graph (float logits: 0.066136 vs 0.066135); the lower one is kept
    lower = min(("percentile", "minmax"), key=lambda k: choice[k]["rel_l2"])
    assert choice["percentile"]["rel_l2"] != choice["minmax"]["rel_l2"]
    assert choice["kept"].startswith(lower)
    # reference: onnxruntime's own calibration of that kind gives the same model
    ref = surgeon.apply(model, "int8", {**common, "calibration": lower}, data=ds)
    assert checked(res.model).SerializeToString(deterministic=True) == ref.model.SerializeToString(deterministic=True)
    x = ds.inputs
    fl = run(model, x)[0]
    mm = surgeon.apply(model, "int8", {**common, "calibration": "minmax"}, data=ds).model
    assert rel_l2(fl, run(res.model, x)[0]) == pytest.approx(choice[lower]["rel_l2"], rel=1e-5)
    assert rel_l2(fl, run(mm, x)[0]) == pytest.approx(choice["minmax"]["rel_l2"], rel=1e-5)


def test_default_calibration_keeps_minmax_when_percentile_cannot_run():
    """onnxruntime's histogram calibrator fails on this two-input model (numpy "inhomogeneous
    shape"); the default then says why and returns exactly the minmax model."""
    from tests.test_int8 import two_input_model
    model = two_input_model()
    rng = np.random.default_rng(2)
    ds = DataSet({"x": rng.standard_normal((20, 16)).astype(np.float32),
                  "y": rng.standard_normal((20, 12)).astype(np.float32) * 3}, source="test")
    common = {"equalize": "off", "bias_correction": "off", "weight_rounding": "nearest"}
    res = surgeon.apply(model, "int8", common, data=ds)
    mm = surgeon.apply(model, "int8", {**common, "calibration": "minmax"}, data=ds)
    choice = res.extras["calibration_choice"]
    assert "quantize_static failed" in choice["percentile"] and choice["kept"] == "minmax"
    assert res.model.SerializeToString(deterministic=True) == mm.model.SerializeToString(deterministic=True)


def test_default_calibration_compares_after_bias_correction():
    """With bias correction on, the choice is made on the corrected models: the report carries
    both drifts and the kept one is the lower."""
    model, ds = outlier_input_model()
    res = surgeon.apply(model, "int8", {"equalize": "off", "weight_rounding": "nearest"}, data=ds)
    after = res.extras["calibration_choice"]["after_bias_correction"]
    kept = "percentile" if after["percentile"] < after["minmax"] else "minmax"
    assert res.extras["calibration_choice"]["kept"].startswith(kept)


# --- sequential bias correction on the quantized model ------------------------------------------

def skewed_two_conv_model(seed: int = 5):
    """x -> conv1 (3x3) -> Relu -> conv2 (1x1) -> y, on inputs with a long positive tail: clipped
    activation ranges shift conv2's output mean, which the weight-only correction cannot see."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((6, 8, 1, 1)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2")]
    inits = [init("w1", w1), init("b1", np.full(8, 0.1, np.float32)), init("w2", w2),
             init("b2", np.zeros(6, np.float32))]
    model = make_model(nodes, [tensor("x", ["N", 4, 10, 10])], [tensor("y", ["N", 6, 10, 10])], inits)
    x = rng.exponential(1.0, (24, 4, 10, 10)).astype(np.float32) ** 2  # long tail
    return model, DataSet({"x": x}, source="test")


def test_sequential_bias_levels_group_parallel_layers():
    from surgeon.plugins import int8_seqbias as sb
    from surgeon.model import to_graph
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="A"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="B"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wc"], ["c"], name="C"),
             helper.make_node("Conv", ["a", "wd"], ["d"], name="D")]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("c", None), tensor("d", None)])
    assert sb._levels(to_graph(model), ["A", "B", "C", "D"]) == [{"A", "B"}, {"C", "D"}]


def test_sequential_bias_correction_cancels_the_mean_shift_of_each_layer():
    """After the correction, each conv output's per-channel mean on the quantized model (fused
    integer kernels, run here independently) matches the float model's to about one bias step,
    where before it was off by much more; the drift drops with it."""
    model, ds = skewed_two_conv_model()
    common = {"equalize": "off", "bias_correction": "off", "weight_rounding": "nearest",
              "calibration": "percentile", "percentile": 99.0}
    before = surgeon.apply(model, "int8", {**common, "sequential_bias": "off"}, data=ds)
    after = surgeon.apply(model, "int8", {**common, "sequential_bias": "on"}, data=ds)
    info = after.extras["sequential_bias"]
    assert info["layers"] == 2 and info["runs"] == 2 and info["kept"]
    from surgeon.plugins.int8_seqbias import SAMPLES
    rows = {"x": ds.inputs["x"][:SAMPLES]}  # the rows the correction measured on
    fl = run(model, rows)[0].mean(axis=(0, 2, 3))
    err_before = np.abs(run(before.model, rows)[0].mean(axis=(0, 2, 3)) - fl)
    err_after = np.abs(run(checked(after.model), rows)[0].mean(axis=(0, 2, 3)) - fl)
    # measured here (4 samples): before 0.10-1.28 per channel (5 output steps at worst), after
    # <= 0.127, the worst channel saturating at its output range; the median drops 90-fold
    out_scale = [float(numpy_helper.to_array(t)) for t in after.model.graph.initializer if t.name.startswith("y_scale")]
    assert out_scale, "the model output should be quantized"
    assert err_before.max() > 3 * out_scale[0]
    assert err_after.max() < 0.15 * err_before.max()
    assert np.median(err_after) < 0.05 * np.median(err_before)
    assert after.extras["drift"]["rel_l2"] < before.extras["drift"]["rel_l2"]


def test_sequential_bias_correction_that_cannot_run_is_skipped_with_the_reason(monkeypatch):
    from surgeon.plugins import int8_seqbias as sb

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime cannot load the probe model")
    monkeypatch.setattr(sb, "sequential_bias_correction", broken)
    model, ds = skewed_two_conv_model()
    res = surgeon.apply(model, "int8", {"equalize": "off"}, data=ds)
    info = res.extras["sequential_bias"]
    assert not info["kept"] and "cannot load the probe model" in info["skipped"]
    assert "sequential bias correction" not in [s["step"] for s in res.extras["steps"]]
    checked(res.model)


def test_the_cli_prints_where_the_error_comes_from(tmp_path):
    """explain=true filled the JSON report only; the terminal showed nothing of it."""
    from typer.testing import CliRunner

    from surgeon.cli import app
    model = outlier_channel_model()
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((24, 4, 6, 6)).astype(np.float32))
    r = CliRunner().invoke(app, ["apply", str(src), "-p", "int8", "-O", "explain=true", "--calib", str(calib),
                                 "--no-validate", "-o", str(tmp_path / "q.onnx")], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "where the error comes from" in r.stdout
    assert "weights only" in r.stdout and "activations only" in r.stdout
    assert "tensor h alone" in r.stdout and "weight of c1 alone" in r.stdout


def test_the_explain_table_shows_a_tensor_without_a_tail_ratio():
    """A tensor whose 99.99th percentile of |x| is 0 or not a number (an attention mask of 0 and
    -inf) has no tail ratio; the terminal table crashed on it (internal error: TypeError)."""
    from surgeon.report import explain_table
    extras = {"explain": {"drift": {"int8": {"rel_l2": 1.08}}, "activations": [
        {"tensor": "mask", "min": float("-inf"), "max": 0.0, "tail_ratio": None, "drift_alone": 0.44}]}}
    rows = [cells[0] for cells, _ in explain_table(extras).rows]
    assert "tensor mask alone (range -inf..0, tail ratio -)" in rows
