"""surgeon.data_fit: the candidates fitted on part of the calibration samples and scored on the
rest, the fit each layer gets, and the same fits run in parallel."""

from __future__ import annotations

import numpy as np
import pytest

from surgeon import data_factors, data_fit, lowrank, parallel
from tests.test_data_factors import anisotropic_rows, kernel_rows


# --- the fit chosen per layer on held-out calibration samples -----------------------------------

def test_held_out_takes_whole_samples():
    groups = np.repeat(np.arange(8), 5)
    held = data_fit.held_out(groups, len(groups))
    assert set(groups[held]) == {3, 7}  # every 4th sample, all of its rows
    assert not set(groups[held]) & set(groups[~held])
    assert data_fit.held_out(np.repeat([0, 1], 4), 8).sum() == 4  # two samples: the last one
    assert data_fit.held_out(np.zeros(8, int), 8).tolist() == [False, False, False, True] * 2  # one sample: rows


def overfitting_case(seed=20):
    """A layer whose sequential refit overfits: 60 rows in 40 dims from 12 samples, and a target
    that differs from the inputs by per-row noise (upstream error no linear map can undo)."""
    rng = np.random.default_rng(seed)
    d, out = 40, 30
    w = rng.standard_normal((d, out))
    x = anisotropic_rows(60, d, seed=seed, spread=1e2)
    xt = x + 2.0 * rng.standard_normal(x.shape)  # what the rewritten graph hands the layer
    groups = np.repeat(np.arange(12), 5)
    return w, xt, x, groups


def test_choice_is_the_lowest_held_out_error():
    w, xt, x, groups = overfitting_case()
    r = 10
    trials = data_fit.linear_trials(w, xt, x, r, centered=True, damp=0.01)
    choice = data_fit.choose_fit(w, xt, x, groups, trials)
    assert set(choice.errors) == set(data_fit.FIT_CANDIDATES) - {"residual"}  # no Add after the layer
    assert choice.choice == min(choice.errors, key=choice.errors.get)
    # the sequential least squares, fitted on 45 rows of 40 dims, is not what wins here
    assert choice.choice != "sequential"
    assert choice.errors[choice.choice] < 0.9 * choice.errors["sequential"]
    assert choice.held_samples == 3 and choice.held_rows == 15
    # recomputed by hand: the held-out rows scored against the original outputs
    held = data_fit.held_out(groups, len(groups))
    fit = data_factors.data_linear(w, xt[~held], x[~held]).fit(r)
    expect = np.linalg.norm(xt[held] @ fit.a @ fit.b + fit.shift - x[held] @ w) / np.linalg.norm(x[held] @ w)
    # (scored in float32, like the activations: the sample-sized products are float32)
    assert choice.errors["sequential"] == pytest.approx(expect, rel=1e-5)


def test_sequential_wins_when_upstream_error_is_linear():
    """When the rewritten graph hands the layer a linear distortion of its original inputs,
    plenty of rows: the sequential refit undoes it and is chosen."""
    rng = np.random.default_rng(21)
    d = 12
    w = rng.standard_normal((d, d))
    x = anisotropic_rows(800, d, seed=22)
    xt = x @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)))
    trials = data_fit.linear_trials(w, xt, x, 6, centered=True, damp=0.0)
    choice = data_fit.choose_fit(w, xt, x, np.repeat(np.arange(16), 50), trials)
    assert choice.choice == "sequential"
    assert choice.errors["sequential"] < 0.75 * min(v for k, v in choice.errors.items() if k != "sequential")


def test_tucker_trials_score_every_candidate():
    rng = np.random.default_rng(23)
    f, c = 8, 6
    w = rng.standard_normal((f, c, 3, 3))
    x = kernel_rows(400, c, 9, seed=24)
    xt = x + 0.5 * rng.standard_normal(x.shape)
    trials = data_fit.tucker_trials(w, xt, x, 3, 4, damp=0.01)
    groups = np.repeat(np.arange(8), 50)
    choice = data_fit.choose_fit(w.reshape(f, -1).T, xt, x, groups, trials)
    assert set(choice.errors) == set(data_fit.FIT_CANDIDATES) - {"residual"}  # no Add after the layer
    assert choice.choice == min(choice.errors, key=choice.errors.get)
    # anisotropic rows: on the held-out rows the winner beats the weight-space Tucker-2 (0.52 vs 0.77)
    held = data_fit.held_out(groups, len(x))
    y = x[held] @ w.reshape(f, -1).T
    weights = lowrank.tucker2_full(*lowrank.hosvd_channels(w, 3, 4)).reshape(f, -1).T
    assert choice.errors[choice.choice] < 0.8 * np.linalg.norm(xt[held] @ weights - y) / np.linalg.norm(y)


def _layer_jobs(spectrum: bool = True, select: str = "heldout") -> dict:
    """Data-aware fits of a few small layers (two Tucker-2, one linear) as run_parallel jobs."""
    from surgeon.layer_stats import Sample

    rng = np.random.default_rng(40)
    jobs = {}
    for k, (f, c) in enumerate([(8, 6), (10, 4)]):
        w = rng.standard_normal((f, c, 3, 3))
        x = kernel_rows(400, c, 9, seed=41 + k).astype(np.float32)
        sample = Sample(x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), x, 400, 8, np.repeat(np.arange(8), 50))
        jobs[f"conv{k}"] = (lambda w=w, s=sample: data_fit.fit_tucker(w, s, lambda iv, ov: (3, 4), damp=0.05,
                                                                     spectrum=spectrum, select=select))
    w = rng.standard_normal((12, 9))
    x = anisotropic_rows(400, 12, seed=43).astype(np.float32)
    sample = Sample(x @ (np.eye(12) + 0.2 * rng.standard_normal((12, 12))).astype(np.float32), x, 400, 8,
                    np.repeat(np.arange(8), 50))
    jobs["fc"] = lambda: data_fit.fit_linear(w, sample, lambda values: 4, damp=0.05, spectrum=spectrum, select=select)
    # fewer rows than inputs (the row form, SampleRows), with a residual offset
    wf = rng.standard_normal((40, 12))
    xf = anisotropic_rows(24, 40, seed=44).astype(np.float32)
    few = Sample(xf + 0.2 * rng.standard_normal(xf.shape).astype(np.float32), xf, 24, 8, np.repeat(np.arange(8), 3),
                 offset=0.3 * rng.standard_normal((24, 12)).astype(np.float32))
    jobs["fc_few"] = lambda: data_fit.fit_linear(wf, few, lambda values: 5, damp=0.05, spectrum=spectrum,
                                                select=select)
    return jobs


def _flat(fit) -> bytes:
    return b"".join(np.asarray(a).tobytes() for a in (*fit.factors, fit.shift if fit.shift is not None else 0.0))


def test_parallel_fits_equal_serial_fits_to_the_bit():
    """The fits of a stage run on a thread pool, each on one BLAS thread: the same bytes as one
    after the other, and the held-out choice the same."""
    serial = parallel.run_parallel(_layer_jobs(), workers=1)
    pooled = parallel.run_parallel(_layer_jobs(), workers=2)
    assert set(serial) == set(pooled) == {"conv0", "conv1", "fc", "fc_few"}
    for name in serial:
        assert _flat(serial[name]) == _flat(pooled[name])
        assert serial[name].kind == pooled[name].kind and serial[name].ranks == pooled[name].ranks
    assert parallel._pinned == 0  # the section's BLAS pin is released


def test_ranks_without_a_spectrum_give_the_same_choice():
    """With ranks that do not read the spectrum (a ratio) no fit runs on every row before the
    choice, which comes out the same. A layer whose winner is the first candidate (sequential)
    gets, where the spectrum was computed, that fit on every row (select=refit's bytes);
    otherwise the winning trial, byte for byte either way."""
    full = parallel.run_parallel(_layer_jobs(spectrum=True), workers=1)
    lean = parallel.run_parallel(_layer_jobs(spectrum=False), workers=1)
    refit = parallel.run_parallel(_layer_jobs(spectrum=False, select="refit"), workers=1)
    firsts = 0
    for name in full:
        assert full[name].kind == lean[name].kind == refit[name].kind
        assert full[name].choice.errors == lean[name].choice.errors
        first = full[name].kind == "sequential"
        firsts += first
        assert _flat(full[name]) == _flat(refit[name] if first else lean[name])
    assert 0 < firsts < len(full)


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_fits_report_progress_as_they_finish(workers):
    seen = []
    out = parallel.run_parallel(_layer_jobs(), workers=workers, progress=lambda done, total, name: seen.append(
        (done, total, name)))
    assert [d for d, _, _ in seen] == [1, 2, 3, 4] and {t for _, t, _ in seen} == {4}
    assert sorted(n for _, _, n in seen) == sorted(out) == ["conv0", "conv1", "fc", "fc_few"]


def test_tucker_trials_share_sides_without_changing_a_fit():
    """data and sequential share the input side: each trial is still exactly
    data_channel_spectra + data_tucker2 on its own rows (its outputs up to float32 round-off:
    the trial applies the factors instead of forming W'), and the weight fit given as factors
    scores like the kernel they make."""
    rng = np.random.default_rng(50)
    f, c = 8, 6
    w = rng.standard_normal((f, c, 3, 3))
    x = kernel_rows(400, c, 9, seed=51).astype(np.float32)
    xt = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32)
    trials = data_fit.tucker_trials(w, xt, x, 3, 4, damp=0.05)
    train = ~data_fit.held_out(np.repeat(np.arange(8), 50), 400)
    for name, (rows, target) in {"data": (xt, None), "sequential": (xt, x)}.items():
        fit = data_factors.data_tucker2(data_factors.data_channel_spectra(w, rows[train], None if target is None else
                                                                target[train], 0.05), 3, 4, refit=True)
        apply, shift, made = trials[name](train)  # x -> x W' through the factors, and the fit itself
        expect = lowrank.tucker2_full(fit.core, fit.out_factor, fit.in_factor).reshape(f, -1).T
        held = xt[~train]
        np.testing.assert_allclose(apply(held), held.astype(np.float64) @ expect, rtol=1e-4, atol=1e-4)
        assert np.asarray(shift).tobytes() == fit.shift.tobytes()
        assert made.core.tobytes() == fit.core.tobytes() and made.in_factor.tobytes() == fit.in_factor.tobytes()


@pytest.mark.parametrize("centered", [True, False])
def test_pooled_moments_are_the_moments_of_every_row(centered):
    """The final fit pools the trial split's moments with the held-out rows' (Chan et al.): the
    same S~, C W and means as computed on all rows at once, up to float32 round-off."""
    rng = np.random.default_rng(60)
    x = anisotropic_rows(300, 7, seed=61).astype(np.float32)
    t = (x + rng.standard_normal(x.shape)).astype(np.float32)
    held = data_fit.held_out(np.repeat(np.arange(6), 50), 300)
    w = rng.standard_normal((7, 5))
    both = data_factors.pooled(data_factors.moments(x[~held], t[~held], centered=centered, w=w),
                          data_factors.moments(x[held], t[held], centered=centered, w=w))
    every = data_factors.moments(x, t, centered=centered, w=w)
    assert both.n == 300
    # C W is the cross moment of x~ with x, times W
    xc, tc = (x - x.mean(0), t - t.mean(0)) if centered else (x, t)
    np.testing.assert_allclose(every.xtw, (xc.T.astype(np.float64) @ tc / 300) @ w, rtol=1e-4,
                               atol=1e-5 * np.abs(every.xtw).max())
    for name in ("mean_x", "mean_t", "xx", "xtw"):
        np.testing.assert_allclose(getattr(both, name), getattr(every, name), rtol=1e-5,
                                   atol=1e-5 * np.abs(every.xx).max())
    if centered:  # the between-split term matters: the splits' means differ
        assert np.abs(data_factors.moments(x[held]).mean_x - data_factors.moments(x[~held]).mean_x).max() > 0.01


def test_a_fit_on_pooled_moments_is_the_fit_on_every_row():
    rng = np.random.default_rng(62)
    w = rng.standard_normal((9, 12))
    x = anisotropic_rows(400, 9, seed=63).astype(np.float32)
    t = (x @ (np.eye(9) + 0.2 * rng.standard_normal((9, 9)))).astype(np.float32)
    stats = data_fit.SampleMoments(w, x, t, centered=True, damp=0.05)
    train = ~data_fit.held_out(np.repeat(np.arange(8), 50), 400)
    for kind, (rows, target) in {"data": (x, None), "sequential": (x, t)}.items():
        pooled = data_factors.data_linear(w, rows, target, damp=0.05, stats=stats.every_row(kind, train)).fit(4)
        direct = data_factors.data_linear(w, rows, target, damp=0.05).fit(4)
        # float32 round-off of the sample products, relative to the layer's scale
        scale = np.abs(w).max()
        np.testing.assert_allclose(pooled.a @ pooled.b, direct.a @ direct.b, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(pooled.shift, direct.shift, rtol=0, atol=1e-4 * scale * np.abs(x).max())


def test_core_refit_with_fewer_rows_than_unknowns_is_the_same_least_squares():
    """60 patch rows for 72 core unknowns per output go through the n x n (push-through) system;
    the same rows twice (the same normal equations, 120 rows) through the usual one: one core."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12, 3, 3))
    x = rng.standard_normal((60, 12 * 9)).astype(np.float32)
    thin = data_factors.data_tucker2(data_factors.data_channel_spectra(w, x, damp=0.05), 8, 8)
    twice = data_factors.data_tucker2(data_factors.data_channel_spectra(w, np.concatenate([x, x]), damp=0.05), 8, 8)
    np.testing.assert_allclose(thin.core, twice.core, rtol=0, atol=1e-3 * np.abs(twice.core).max())
    np.testing.assert_allclose(thin.shift, twice.shift, rtol=0, atol=1e-3 * np.abs(twice.shift).max())


def _few_rows(seed: int = 70, n: int = 24, d: int = 40, o: int = 16):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, o))
    x = anisotropic_rows(n, d, seed=seed + 1).astype(np.float32)
    xt = x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return w, xt, x, (0.3 * rng.standard_normal((n, o))).astype(np.float32)


@pytest.mark.parametrize("centered", [True, False], ids=["centred", "uncentred"])
@pytest.mark.parametrize("kind", ["data", "sequential", "residual"])
def test_the_row_form_is_the_moment_form(kind, centered):
    """With fewer rows than inputs, SampleRows (push-through: nothing in x in) gives the fit of
    data_linear (moments, Cholesky factor): spectrum, W' at several ranks, bias shift."""
    w, xt, x, d = _few_rows()
    every = np.ones(len(x), dtype=bool)
    rows = data_fit.SampleRows(w, xt, x, centered=centered, damp=0.05, offset=d).linear(kind, every)
    ref = data_factors.data_linear(w, xt, None if kind == "data" else x, centered=centered, damp=0.05,
                              offset=d if kind == "residual" else None)
    np.testing.assert_allclose(rows.values, ref.values, rtol=1e-5, atol=1e-6 * ref.values[0])
    for r in (3, 8, 16):
        got, want = rows.fit(r, 0.5), ref.fit(r, 0.5)
        scale = np.abs(want.a @ want.b).max()
        np.testing.assert_allclose(got.a @ got.b, want.a @ want.b, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(got.shift, want.shift, rtol=0, atol=1e-5 * scale * np.abs(xt).max())
        assert got.out_error == pytest.approx(want.out_error, rel=1e-4, abs=1e-7)


def test_fewer_rows_than_inputs_build_no_input_by_input_matrix(monkeypatch):
    """fit_linear on fewer rows than inputs takes the row form throughout (trials, choice, final
    fit): the same layer fit as the moment form, and no moments / Cholesky factor of S~ (AlexNet's
    fc6: 9216 x 9216 matrices, 160 s)."""
    from surgeon.layer_stats import Sample

    w, xt, x, d = _few_rows(n=32)
    sample = Sample(xt, x, 32, 8, np.repeat(np.arange(8), 4), offset=d)
    fit = data_fit.fit_linear(w, sample, lambda values: 6, damp=0.05)
    assert fit.choice is not None and set(fit.choice.errors) == {"sequential", "residual", "data"}
    monkeypatch.setattr(data_fit, "few_rows", lambda n, shape: False)  # the moment form, for reference
    ref = data_fit.fit_linear(w, sample, lambda values: 6, damp=0.05)
    assert (fit.kind, fit.choice.choice) == (ref.kind, ref.choice.choice)
    for name in fit.choice.errors:
        assert fit.choice.errors[name] == pytest.approx(ref.choice.errors[name], rel=1e-4)
    scale = np.abs(w).max()
    np.testing.assert_allclose(fit.factors[0] @ fit.factors[1], ref.factors[0] @ ref.factors[1], atol=1e-4 * scale)
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise AssertionError("an input x input statistic was built")
    for module, name in ((data_fit, "moments"), (data_fit, "data_linear"), (data_factors, "data_linear"),
                         (data_factors, "whitened_factors")):
        monkeypatch.setattr(module, name, refuse)
    again = data_fit.fit_linear(w, sample, lambda values: 6, damp=0.05)
    assert again.kind == fit.kind and _flat(again) == _flat(fit)


def test_a_layer_gets_the_factors_that_won_on_held_out_samples():
    """The held-out choice scores each candidate's trial factors (fitted on 3/4 of the samples);
    the layer gets the winner's factors as they were scored, not a refit on every row (which cost
    ResNet-50's surgery 3 s of 14): the same bytes as the trial fit that was scored."""
    jobs = _layer_jobs(spectrum=False)
    for name in ("conv0", "conv1", "fc"):
        fit = jobs[name]()
        choice = fit.choice
        assert choice is not None and choice.choice == fit.kind
        won = choice.fit
        if name == "fc":
            assert fit.factors[0].tobytes() == won.a.tobytes() and fit.factors[1].tobytes() == won.b.tobytes()
            assert np.asarray(fit.shift).tobytes() == np.asarray(won.shift).tobytes()
            assert fit.values is not None and len(fit.values) >= 4  # the spectrum the report reads
        else:
            assert fit.factors[0].tobytes() == won.core.tobytes() and fit.factors[2].tobytes() == won.in_factor.tobytes()
        assert np.isfinite(fit.out_error)


@pytest.mark.parametrize("clip", [None, "relu"])
def test_the_reported_output_error_is_that_of_the_factors_the_layer_got(clip):
    """out_error, recomputed from the factors a layer got: ||x~ W' + b' - (x W + b)|| / ||x W + b||
    on the first ERROR_ROWS rows, for the winning trial as it was scored and after a refit
    through a Relu (the error is taken once, after the refit, through the factors)."""
    from surgeon.clipped_fit import Clip
    from surgeon.layer_stats import Sample
    from surgeon.lowrank import tucker2_full

    rng = np.random.default_rng(46)
    relu = Clip(0.0, np.inf, "Relu") if clip else None
    m = data_factors.ERROR_ROWS
    w = rng.standard_normal((8, 6, 3, 3))
    x = kernel_rows(800, 6, 9, seed=47).astype(np.float32)
    conv = Sample(x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), x, 800, 8, np.repeat(np.arange(8), 100))
    bias = rng.standard_normal(8)
    fit = data_fit.fit_tucker(w, conv, lambda iv, ov: (3, 4), damp=0.05, bias=bias, spectrum=False, clip=relu)
    assert fit.choice is not None and (fit.through is not None) == bool(clip)
    flat = w.reshape(8, -1).T
    approx = tucker2_full(*fit.factors).reshape(8, -1).T
    xt, x0 = conv.rows[:m].astype(np.float64), x[:m].astype(np.float64)
    want = np.linalg.norm(xt @ approx + fit.shift - x0 @ flat) / np.linalg.norm(x0 @ flat + bias)
    assert fit.out_error == pytest.approx(want, rel=1e-6)

    wl = rng.standard_normal((12, 9))
    xl = anisotropic_rows(800, 12, seed=48).astype(np.float32)
    lin = Sample(xl @ (np.eye(12) + 0.2 * rng.standard_normal((12, 12))).astype(np.float32), xl, 800, 8,
                 np.repeat(np.arange(8), 100))
    bias = rng.standard_normal(9)
    fit = data_fit.fit_linear(wl, lin, lambda values: 4, damp=0.05, bias=bias, spectrum=False, clip=relu)
    assert fit.choice is not None and (fit.through is not None) == bool(clip)
    a, b = fit.factors
    xt, x0 = lin.rows[:m].astype(np.float64), xl[:m].astype(np.float64)
    want = np.linalg.norm(xt @ a @ b + fit.shift - x0 @ wl) / np.linalg.norm(x0 @ wl + bias)
    assert fit.out_error == pytest.approx(want, rel=1e-6)


def test_select_refit_refits_the_winner_on_every_row():
    """select=refit makes the same choice and then refits the winner on every sampled row (the
    pooled moments: the same fit as data_linear on all rows); select=heldout keeps the trial's."""
    from surgeon.layer_stats import Sample

    rng = np.random.default_rng(60)
    w = rng.standard_normal((12, 9))
    x = anisotropic_rows(400, 12, seed=61).astype(np.float32)
    xt = x @ (np.eye(12) + 0.2 * rng.standard_normal((12, 12))).astype(np.float32)
    sample = Sample(xt, x, 400, 8, np.repeat(np.arange(8), 50))
    held = data_fit.fit_linear(w, sample, lambda values: 4, damp=0.05, spectrum=False)
    refit = data_fit.fit_linear(w, sample, lambda values: 4, damp=0.05, spectrum=False, select="refit")
    assert refit.kind == refit.choice.choice == held.choice.choice
    full = data_factors.data_linear(w, xt, None if refit.kind == "data" else x, damp=0.05).fit(4)
    scale = np.abs(full.a @ full.b).max()
    np.testing.assert_allclose(refit.factors[0] @ refit.factors[1], full.a @ full.b, atol=1e-5 * scale)
    assert np.abs(held.factors[0] @ held.factors[1] - full.a @ full.b).max() > 1e-3 * scale
