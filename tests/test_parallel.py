"""surgeon.parallel: layer fits on a thread pool, their parts on idle workers, BLAS thread limits."""

from __future__ import annotations

import pytest

from surgeon import parallel


def test_a_failing_fit_is_returned_not_raised():
    def broken():
        raise ValueError("singular layer")
    out = parallel.run_parallel({"ok": lambda: 1, "bad": broken}, workers=2)
    assert out["ok"] == 1 and isinstance(out["bad"], ValueError)


def test_an_interrupted_stage_drops_the_fits_not_started():
    """Ctrl-C (here: the progress callback raising) while a stage's fits run: the fits still
    queued are cancelled, not run to the end."""
    import threading
    import time

    started = []
    lock = threading.Lock()

    def job(i):
        def run():
            with lock:
                started.append(i)
            time.sleep(0.05)
            return i
        return run

    def interrupt(done, total, name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parallel.run_parallel({f"l{i}": job(i) for i in range(20)}, workers=2, progress=interrupt)
    assert len(started) < 20
    assert parallel._pinned == 0


def test_run_parts_outside_a_pool_runs_them_in_order():
    seen = []
    assert parallel.run_parts([lambda i=i: seen.append(i) or i * i for i in range(4)]) == [0, 1, 4, 9]
    assert seen == [0, 1, 2, 3]


def test_an_idle_worker_takes_parts_of_a_running_fit():
    """A stage with one large layer: its independent parts (held-out trials) run on the worker
    that has no layer left. The first part waits for the second to start, so it can only finish
    when another thread runs the second; a failing part's error reaches the fit."""
    import threading

    started = threading.Event()

    def first():
        return started.wait(timeout=30)

    def second():
        started.set()
        return threading.current_thread().name

    def failing():
        raise ValueError("part failed")

    out = parallel.run_parallel({"big": lambda: parallel.run_parts([first, second]),
                                "bad": lambda: parallel.run_parts([lambda: 1, failing])}, workers=2)
    assert out["big"][0] is True and out["big"][1].startswith("surgeon-fit")
    assert isinstance(out["bad"], ValueError)
    assert parallel._pool is None


def test_a_spawned_part_runs_once_and_raises_in_its_caller():
    calls = []
    part = parallel.spawn(lambda: calls.append(1) or 7)  # no pool: get() runs it here
    assert part.get() == 7 and part.get() == 7 and calls == [1]

    def boom():
        raise ValueError("in a part")

    def job():
        parts = [parallel.spawn(boom), parallel.spawn(lambda: 3)]
        return [p.get() if i else None for i, p in enumerate(parts)], parts[0]
    (values, failed), = parallel.run_parallel({"j": job}, workers=2).values()
    assert values == [None, 3]
    with pytest.raises(ValueError, match="in a part"):
        failed.get()


def test_a_thread_limit_reaches_scipys_blas_loaded_after_it():
    """scipy.linalg is imported where first used; a limit set before that import did not reach
    its OpenBLAS, and the first stage of fits in a process ran its solves on every core (other
    last bits than later stages)."""
    pytest.importorskip("threadpoolctl")
    import subprocess
    import sys
    code = ("import sys; from surgeon import data_factors, data_fit, lowrank, parallel, rank_choice  # noqa: F401\n"
            "assert 'scipy.linalg' not in sys.modules\n"
            "with parallel.single_blas_thread():\n"
            "    import scipy.linalg, threadpoolctl\n"
            "    print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1]", out


def test_a_long_fit_reports_progress_while_it_runs(monkeypatch):
    """A stage whose fit takes long still calls progress (a CI log shows it working): every
    HEARTBEAT_S with the done count so far and a fit still running."""
    import time
    monkeypatch.setattr(parallel, "HEARTBEAT_S", 0.05)
    seen = []
    out = parallel.run_parallel({"slow": lambda: time.sleep(0.4) or 1, "quick": lambda: 2}, workers=2,
                               progress=lambda done, total, name: seen.append((done, total, name)))
    assert out == {"slow": 1, "quick": 2}
    assert seen[-1][0] == 2 and [d for d, _, _ in seen if d == 2] == [2]
    beats = [s for s in seen if s[0] == 1]
    assert beats[0] == (1, 2, "quick") and len(beats) >= 4 and set(beats[1:]) == {(1, 2, "slow, still running")}
