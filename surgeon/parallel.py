"""Layer fits on a pool of threads, and how many BLAS threads each may use.

The data-aware low-rank fits (surgeon.data_fit, surgeon.clipped_fit) are independent per layer
within a stage, and numpy and scipy release the GIL in BLAS/LAPACK, so a pool of threads uses
both cores where one fit on two BLAS threads gained little. Each fit does the same arithmetic
on whichever thread and with whatever worker count, so a run repeats byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import threading


def load_scipy_blas() -> None:
    """Load scipy's own OpenBLAS before a thread limit is set: threadpoolctl limits the libraries
    loaded at that moment, and scipy.linalg (imported where first used) brought in one that then
    ran on every core for the rest of the section. The first stage's fits of a process differed
    from later ones in the last bits (Cholesky factors and solves on two threads)."""
    import scipy.linalg  # noqa: F401


def one_blas_thread(fn):
    """Run `fn` with one BLAS thread (see single_blas_thread): for the data-aware fits the
    Cholesky, solve and eigh calls were 10-40x slower on two threads with the cores busy."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with single_blas_thread():
            return fn(*args, **kwargs)
    return wrapped


# > 0 while layer fits run in parallel (run_parallel): BLAS is then pinned to one thread for the
# whole section, and the per-call limits below do nothing (a worker restoring "two threads" on
# exit would otherwise change the other worker's thread count, and each call costs ~1 ms).
_pinned = 0


def pinned() -> bool:
    """Whether run_parallel has pinned BLAS to one thread for its whole section."""
    return _pinned > 0


def single_blas_thread():
    """LAPACK's symmetric eigensolver (tridiagonal reduction) gains nothing from a second
    OpenBLAS thread at these sizes and loses a lot when the cores are busy: measured on the
    2-core machine, eigh of a 1024 x 1024 Gram took 0.26-0.52 s on one thread vs 0.97-2.3 s
    on two. threadpoolctl (optional) pins it to one; without it nothing changes."""
    if _pinned:
        return contextlib.nullcontext()
    return blas_threads(1)


def blas_threads(n: int):
    """A context limiting BLAS to `n` threads (threadpoolctl, optional; without it, nothing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    load_scipy_blas()
    return threadpool_limits(n, user_api="blas")


# seconds between progress calls while a stage's fits run and none finishes
HEARTBEAT_S = 5.0

# the pool of the running run_parallel, so that one fit's independent parts (its held-out
# trials) can run on a worker that has no layer left (see run_parts)
_pool = None


class Part:
    """A zero-argument callable that an idle worker of the running run_parallel pool may run
    (spawn); get() runs it in the caller when no worker has claimed it yet, else waits for it.
    A part never waits on its caller, so this cannot deadlock."""

    def __init__(self, fn):
        self.fn, self.claim, self.done, self.result = fn, threading.Lock(), threading.Event(), None

    def run(self) -> None:
        if not self.claim.acquire(blocking=False):
            return
        try:
            self.result = (True, self.fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in get()
            self.result = (False, exc)
        finally:
            self.done.set()

    def get(self):
        self.run()
        self.done.wait()
        ok, value = self.result
        if not ok:
            raise value
        return value


def spawn(fn) -> Part:
    """`fn` as a Part, queued on the running pool (when there is one) for an idle worker."""
    part = Part(fn)
    if _pool is not None:
        try:
            _pool.submit(part.run)
        except RuntimeError:  # the pool is shutting down (Ctrl-C): get() runs it
            pass
    return part


def run_parts(parts: list) -> list:
    """The results of independent zero-argument callables, in order. Inside run_parallel, idle
    workers help: every part but the first is queued on the pool (spawn), and the caller runs
    each one no worker has claimed yet itself, then waits for the ones taken. A stage of few
    layers, one of them large, otherwise leaves a core idle while that layer's trials run one
    after another: on ResNet-50 the fits used 1.57 of the 2 cores. Each part does the same
    arithmetic on whichever thread, so results repeat."""
    if _pool is None or len(parts) < 2:
        return [part() for part in parts]
    queued = [Part(parts[0])] + [spawn(part) for part in parts[1:]]
    for part in queued:
        part.run()
    return [part.get() for part in queued]


def run_parallel(jobs: dict, workers: int | None = None, progress=None) -> dict:
    """Run independent layer fits (name -> zero-argument callable) on a pool of threads, each on
    one BLAS thread (numpy and scipy release the GIL in BLAS/LAPACK, so two fits use two cores,
    where one fit on two BLAS threads gained little: its solves are small). A fit that raises
    gives its exception as the result, raised again where its layer is rewritten. Each fit does
    the same arithmetic whatever the worker count, so the results repeat byte for byte.
    progress(done, total, name) is called (from this thread) as each fit finishes, and every
    HEARTBEAT_S while none does (name: "<the first fit not done>, still running")."""
    import os
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    global _pinned, _pool

    def guarded(job):
        try:
            return job()
        except Exception as exc:  # noqa: BLE001 - reported on its own layer
            return exc

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # one pool thread per core even for fewer fits: a stage of one large layer (AlexNet's fc6)
    # otherwise ran its held-out trials one after another with a core idle (run_parts)
    workers = max(1, workers or cores)
    with single_blas_thread():
        _pinned += 1
        try:
            tick = progress or (lambda done, total, name: None)
            if workers == 1:
                out = {}
                for name, job in jobs.items():
                    out[name] = guarded(job)
                    tick(len(out), len(jobs), name)
                return out
            pool = ThreadPoolExecutor(workers, thread_name_prefix="surgeon-fit")
            _pool = pool
            try:
                futures = {pool.submit(guarded, job): name for name, job in jobs.items()}
                order = {fut: i for i, fut in enumerate(futures)}
                pending, done = set(futures), 0
                while pending:
                    finished, pending = wait(pending, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                    if not finished:  # a long fit (AlexNet's fc6: a minute): the log shows it still runs
                        tick(done, len(jobs), f"{futures[min(pending, key=order.get)]}, still running")
                    for fut in sorted(finished, key=order.get):
                        done += 1
                        tick(done, len(jobs), futures[fut])
                return {name: fut.result() for fut, name in futures.items()}
            finally:  # on Ctrl-C, drop the fits not started instead of finishing the whole stage
                _pool = None
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            _pinned -= 1
