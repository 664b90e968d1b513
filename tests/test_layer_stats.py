"""surgeon.layer_stats: the samples of the sequential fits, and the original model's passes drawn
ahead on a background thread while a stage's fits run."""

import os
import threading

import numpy as np
import pytest

import surgeon
from surgeon import layer_stats
from surgeon.calibration import DataSet
from surgeon.errors import SurgeonError
from surgeon.layer_stats import ConvWindow, Request, SequentialSampler, collect, draw, take_rows
from tests.models import detector_model

# fewer rows than positions; multiple 1: ranks small enough to save something on these small layers
OPTS = {"ratio": 0.5, "multiple": 1, "guard": "none", "passes": 12, "samples": 8, "rows": 96}


def _data(samples=8):
    x = np.random.default_rng(0).standard_normal((samples, 3, 16, 16)).astype(np.float32)
    return DataSet({"images": x}, source="random", batch=1)


def test_collect_takes_the_reference_rows_where_it_takes_the_live_ones():
    rng = np.random.default_rng(1)
    live = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32),
             "s": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)} for _ in range(3)]
    ref = [{"x": v["x"] * 2 + 1, "s": v["s"] - 5} for v in live]  # same shapes, other values
    window = ConvWindow((3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    requests = [Request("conv", "x", window, skip="s"), Request("fc", "x", None)]
    data = DataSet({"x": np.zeros((6, 3, 6, 6), np.float32)}, source="test", batch=2)

    reference = draw(iter(ref), requests, data, rows=20, seed=3, batch=2)
    got = collect(iter(live), requests, data, rows=20, seed=3, batch=2, reference=reference)
    alone = collect(iter(live), requests, data, rows=20, seed=3, batch=2)
    for r in requests:
        s = got[r.layer]
        np.testing.assert_array_equal(s.rows, alone[r.layer].rows)  # the positions a live draw takes
        assert len(s.rows) == 20 and s.target.shape == s.rows.shape
        picks = reference.picks[r.layer]
        expect = np.concatenate([take_rows(v["x"], r.window, p) for v, p in zip(live, picks)])[:20]
        np.testing.assert_array_equal(s.rows, expect)
        # x W at the same positions: the reference is 2 x + 1 where the conv reads inside the input
        inside = np.concatenate([take_rows(np.ones_like(v["x"]), r.window, p) for v, p in zip(live, picks)])[:20]
        np.testing.assert_allclose(s.target, (2 * s.rows + 1) * inside, rtol=1e-6)
    np.testing.assert_allclose(got["conv"].offset, -5.0)  # the skip's difference at the output positions
    assert got["fc"].offset is None and alone["conv"].offset is None


def test_the_next_stages_reference_pass_runs_beside_the_fits_and_changes_nothing(monkeypatch):
    model, data = detector_model(c=8), _data()
    used, threads = [], []
    result, reference = layer_stats._Ahead.result, SequentialSampler._draw_reference

    def spy_result(self):
        used.append(self.requests)
        return result(self)

    def spy_draw(self, *args, **kwargs):
        policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
        threads.append((threading.current_thread().name, policy))
        return reference(self, *args, **kwargs)

    monkeypatch.setattr(layer_stats._Ahead, "result", spy_result)
    monkeypatch.setattr(SequentialSampler, "_draw_reference", spy_draw)
    ahead = surgeon.apply(model, "tucker", OPTS, data=data)
    assert len(used) >= 2  # every stage after the first read a pass drawn ahead
    background = [t for t in threads if t[0] == "surgeon-reference"]
    assert len(background) >= len(used)
    if hasattr(os, "SCHED_IDLE"):
        assert {policy for _, policy in background} == {os.SCHED_IDLE}
    assert "surgeon-reference" not in {t.name for t in threading.enumerate()}  # none left running

    monkeypatch.setattr(SequentialSampler, "_start_ahead", lambda self, *a, **k: None)
    threads.clear()
    inline = surgeon.apply(model, "tucker", OPTS, data=data)
    assert threads and all(name != "surgeon-reference" for name, _ in threads)
    assert ahead.model.SerializeToString() == inline.model.SerializeToString()
    assert [l.details for l in ahead.layers] == [l.details for l in inline.layers]


def test_a_background_pass_that_fails_fails_the_run_with_its_error(monkeypatch):
    reference = SequentialSampler._draw_reference

    def failing(self, *args, **kwargs):
        if threading.current_thread().name == "surgeon-reference":
            raise SurgeonError("onnxruntime failed to run the model: out of memory")
        return reference(self, *args, **kwargs)

    monkeypatch.setattr(SequentialSampler, "_draw_reference", failing)
    with pytest.raises(SurgeonError, match="out of memory"):
        surgeon.apply(detector_model(c=8), "tucker", OPTS, data=_data())
