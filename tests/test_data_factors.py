"""surgeon.data_factors (whitened SVD, data-aware Tucker-2) and the conv patches
surgeon.layer_stats samples for them.

Properties from issue 13: with white (identity-covariance) inputs the data-aware factors are
the weight-space ones; with a strongly anisotropic input covariance the data-aware output
error is never higher, at every rank, and matches a brute-force least-squares solution.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from surgeon import data_factors, lowrank, rank_choice
from surgeon.layer_stats import ConvWindow, patches_at
from tests.models import init, make_model, run, tensor


def white_rows(d: int) -> np.ndarray:
    """2d rows with mean 0 and covariance exactly I: +-sqrt(d) e_i."""
    return np.sqrt(d) * np.concatenate([np.eye(d), -np.eye(d)])


def anisotropic_rows(n: int, d: int, seed: int = 0, spread: float = 1e3) -> np.ndarray:
    """Rows whose covariance has eigenvalues spread over `spread` (a few directions dominate)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.sqrt(np.geomspace(spread, 1.0, d))
    return (rng.standard_normal((n, d)) * scales) @ q.T + rng.standard_normal(d)


def out_err(x: np.ndarray, w: np.ndarray, approx: np.ndarray, shift=0.0) -> float:
    """||x W - (x W' + shift)|| / ||x W|| (the bias cancels in the difference)."""
    return float(np.linalg.norm(x @ w - (x @ approx + shift)) / np.linalg.norm(x @ w))


def brute_force(x: np.ndarray, w: np.ndarray, r: int) -> np.ndarray:
    """argmin over rank-r W' of ||x_c W - x_c W'||, by another route than the code under test:
    x_c = Q R (QR), then W' = R^-1 times numpy's own truncated SVD of Q^T x_c W."""
    xc = x - x.mean(0)
    q, rr = np.linalg.qr(xc)
    u, sv, vt = np.linalg.svd(q.T @ xc @ w, full_matrices=False)
    return np.linalg.solve(rr, (u[:, :r] * sv[:r]) @ vt[:r])


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_whitened_svd_with_white_inputs_is_the_plain_truncated_svd(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape)
    fit = data_factors.data_linear(w, white_rows(shape[0]), damp=0.0)
    plain = lowrank.matrix_factors(w)
    np.testing.assert_allclose(fit.values, plain.values, rtol=1e-6, atol=1e-6)
    for r in range(1, min(shape) + 1):
        a, b = fit.factors.pair(r)
        pa, pb = plain.pair(r)
        np.testing.assert_allclose(a @ b, pa @ pb, atol=1e-5)
        np.testing.assert_allclose(fit.fit(r).shift, 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(10, 14), (14, 6)])
def test_whitened_svd_beats_weights_at_every_rank_and_matches_brute_force(shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape)
    x = anisotropic_rows(120, shape[0], seed=3)
    fit = data_factors.data_linear(w, x, damp=0.0)
    plain = lowrank.matrix_factors(w)
    xc = x - x.mean(0)
    for r in range(1, min(shape)):
        a, b = fit.factors.pair(r)
        pa, pb = plain.pair(r)
        data_err, weight_err = out_err(xc, w, a @ b), out_err(xc, w, pa @ pb)
        assert data_err <= weight_err + 1e-12
        best = out_err(xc, w, brute_force(x, w, r))
        assert data_err == pytest.approx(best, rel=1e-4, abs=1e-7)
        # the reported error (bias and mean shift included) is the same figure on uncentred rows
        res = fit.fit(r)
        assert res.out_error == pytest.approx(out_err(x, w, a @ b, res.shift), rel=1e-6)
    # strongly anisotropic: a clear win, not a tie, at a middle rank
    r = min(shape) // 2
    a, b = fit.factors.pair(r)
    pa, pb = plain.pair(r)
    assert out_err(xc, w, a @ b) < 0.75 * out_err(xc, w, pa @ pb)


def test_energy_rank_reads_the_output_energy():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 12))
    x = anisotropic_rows(500, 12, seed=5, spread=1e4)
    fit = data_factors.data_linear(w, x, damp=0.0)
    xc = x - x.mean(0)
    total = np.linalg.norm(xc @ w) ** 2
    for e in (0.5, 0.9, 0.99):
        r = rank_choice.rank_from_energy(fit.values, e)
        a, b = fit.factors.pair(r)
        kept = 1 - np.linalg.norm(xc @ w - xc @ a @ b) ** 2 / total
        assert kept >= e - 1e-9
        if r > 1:
            a, b = fit.factors.pair(r - 1)
            assert 1 - np.linalg.norm(xc @ w - xc @ a @ b) ** 2 / total < e


def test_sequential_target_corrects_upstream_error():
    """With a reference (the original inputs x) the fit aims at x W from the perturbed x~,
    and beats fitting x~ W at every rank."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((10, 10))
    x = anisotropic_rows(600, 10, seed=7)
    drift = np.eye(10) + 0.3 * rng.standard_normal((10, 10))
    xt = x @ drift  # what an upstream approximation hands this layer
    seq = data_factors.data_linear(w, xt, x, damp=0.0)
    plain = data_factors.data_linear(w, xt, damp=0.0)
    for r in range(1, 10):
        e_seq = np.linalg.norm(seq.fit(r).out_error)
        e_plain_target = plain.fit(r)
        a, b = e_plain_target.a, e_plain_target.b
        e_plain = np.linalg.norm(xt @ a @ b + e_plain_target.shift - x @ w) / np.linalg.norm(x @ w)
        assert e_seq <= e_plain + 1e-9


def kernel_rows(n, c, K, seed, white=False):
    if white:
        return white_rows(c * K)
    return anisotropic_rows(n, c * K, seed=seed, spread=1e3)


def test_data_tucker_with_white_patches_is_the_hosvd():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 5, 3, 3))
    spec = data_factors.data_channel_spectra(w, white_rows(5 * 9), damp=0.0)
    hosvd = lowrank.channel_factors(w)
    np.testing.assert_allclose(spec.in_values, hosvd.in_values, rtol=1e-6)
    # output responses of white patches: covariance W W^T, the mode-0 Gram
    np.testing.assert_allclose(spec.out_values, hosvd.out_values / np.sqrt(1.0), rtol=1e-6)
    for r1, r2 in [(1, 1), (2, 3), (4, 5), (5, 6)]:
        fitted = data_factors.data_tucker2(spec, r1, r2, ridge=0.0)
        core, o, i = lowrank.hosvd_channels(w, r1, r2, hosvd)
        np.testing.assert_allclose(lowrank.tucker2_full(fitted.core, fitted.out_factor, fitted.in_factor),
                                   lowrank.tucker2_full(core, o, i), atol=1e-5)


def test_data_tucker_beats_hosvd_on_anisotropic_patches():
    rng = np.random.default_rng(9)
    f, c, K = 8, 6, 9
    w = rng.standard_normal((f, c, 3, 3))
    x = kernel_rows(3000, c, K, seed=10)
    spec = data_factors.data_channel_spectra(w, x)
    hosvd = lowrank.channel_factors(w)
    xc = x - x.mean(0)
    wf = w.reshape(f, -1).T
    for r in range(1, 6):
        fitted = data_factors.data_tucker2(spec, r, r)
        approx = lowrank.tucker2_full(fitted.core, fitted.out_factor, fitted.in_factor).reshape(f, -1).T
        core, o, i = lowrank.hosvd_channels(w, r, r, hosvd)
        plain = lowrank.tucker2_full(core, o, i).reshape(f, -1).T
        assert out_err(xc, wf, approx) < out_err(xc, wf, plain)
        # the reported error is the output error on the sample (bias and shift included)
        assert fitted.out_error == pytest.approx(out_err(x[:data_factors.ERROR_ROWS], wf, approx, fitted.shift), rel=1e-4)


def test_full_rank_data_tucker_is_exact():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((5, 4, 3, 3))
    spec = data_factors.data_channel_spectra(w, kernel_rows(500, 4, 9, seed=12))
    fitted = data_factors.data_tucker2(spec, 4, 5)
    # exact up to the float32 sample products (and the ridge toward the exact closed-form core)
    assert lowrank.relative_error(w, lowrank.tucker2_full(fitted.core, fitted.out_factor, fitted.in_factor)) < 1e-4
    np.testing.assert_allclose(fitted.shift, 0.0, atol=1e-3)


CONV_CASES = [
    ({"pads": [1, 1, 1, 1]}, (3, 3)),
    ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, (3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 3)),
    ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (3, 2)),
    ({"pads": [0, 0, 0, 0], "dilations": [2, 2]}, (3, 3)),
    ({"auto_pad": "VALID"}, (2, 2)),
    ({}, (1, 1)),
    ({"strides": [2, 2]}, (1, 1)),
]


@pytest.mark.parametrize("attrs,kernel", CONV_CASES)
def test_patches_reproduce_the_conv(attrs, kernel):
    """Every sampled patch times the kernel is the conv's output there (onnxruntime)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 4) + kernel).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), **attrs)
    model = make_model([node], [tensor("x", list(x.shape))], [tensor("y", None)], [init("w", w)])
    y = run(model, {"x": x})[0]
    window = ConvWindow.of(gs.Node("Conv", attrs={"kernel_shape": list(kernel), **attrs}), kernel)
    _, _, out = window.resolve(x.shape[2:])
    assert out == y.shape[2:]
    picks = np.arange(np.prod((2,) + out))
    p = patches_at(x, window, picks)
    got = (p @ w.reshape(5, -1).T).reshape((2,) + out + (5,)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, atol=1e-4)
    some = np.array([0, 7, len(picks) - 1])
    np.testing.assert_array_equal(patches_at(x, window, some), p[some])
