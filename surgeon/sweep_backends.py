"""Where sweep evaluations run: in this process, in a pool of processes, or on a Ray cluster.

An evaluation is one configuration of one plugin (its options, the layers it may touch,
per-layer options): apply it to the model with the engine, run the result over the evaluation
rows and compare with the original's outputs (`drift_metrics`). Evaluations are independent,
so they fan out; each worker receives the model, the data and the original's reference outputs
once (`Payload`, shipped to a process at start-up or put once in Ray's object store) and then
only small `Config`s.

Latency is different: a timing taken while other evaluations run measures the contention, not
the model. So the backends never time anything in parallel: `Backend.timed(fn, ...)` runs one
measurement at a time, after the parallel drift evaluations have finished (the sweep and the
plan call it only once `map` has returned). With Ray the measurement runs on a cluster node, or
in this process with `latency_local=True`; either way the node it ran on is recorded, since
timings from different node types are not comparable.

The default path imports no Ray: `RayBackend` imports it when it is built.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from surgeon.calibration import DataSet
from surgeon.errors import SurgeonError, UsageError

log = logging.getLogger(__name__)

Tick = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Config:
    """One evaluation: the plugin's options, which layers it may touch and per-layer options."""

    key: str
    options: dict[str, Any]
    layers: str | None = None  # regex on node names (like --layers)
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    keep_model: bool = False  # send the model back (for a latency measurement afterwards)


@dataclass
class Payload:
    """What every worker needs once: the prepared model, the data and the reference outputs."""

    model: bytes  # the folded (engine.prepare) original, serialized
    plugin: str
    calib: DataSet | None
    eval: DataSet
    reference: list[np.ndarray]  # the original's outputs on the evaluation rows
    shapes: dict[str, tuple[int, ...]]
    threads: int = 1
    seed: int = 0


class Evaluator:
    """Applies configurations to the payload's model and measures them (runs inside a worker)."""

    def __init__(self, payload: Payload) -> None:
        from surgeon.profile import profile as _profile_fn
        self.p = payload
        self.model = onnx.load_from_string(payload.model)
        self.before = _profile_fn(self.model, payload.shapes, data=payload.calib)

    def evaluate(self, cfg: Config) -> dict[str, Any]:
        from surgeon import engine
        from surgeon.plugin import registry
        from surgeon.validate import run, session
        t0 = time.perf_counter()
        out: dict[str, Any] = {"key": cfg.key}
        try:
            res = engine.apply(self.model, self.p.plugin, cfg.options, layers=cfg.layers, per_layer=cfg.per_layer,
                               skip=set(cfg.skip), data=self.p.calib, input_shapes=self.p.shapes,
                               threads=self.p.threads, seed=self.p.seed, prepared=True, before=self.before)
            outs = run(session(res.model, self.p.threads), self.p.eval)
        except SurgeonError as exc:
            out.update(error=str(exc), seconds=time.perf_counter() - t0)
            return out
        out.update(score(self.p.reference, outs, self.p.eval.labels))
        out.update(params=res.after.total_params, macs=res.after.total_macs, size_bytes=res.model.ByteSize(),
                   rewritten=[l.layer for l in res.rewritten],
                   layers={l.layer: _layer_summary(l.details) for l in res.rewritten},
                   settled=registry().get(self.p.plugin).settled(res.extras),
                   seconds=time.perf_counter() - t0)
        if cfg.keep_model:
            out["model"] = res.model.SerializeToString()
        return out


def score(reference: list[np.ndarray], outs: list[np.ndarray], labels: np.ndarray | None) -> dict[str, Any]:
    """Worst drift over the outputs (rel. L2 up, agreement down) and accuracy with labels."""
    from surgeon.validate import drift_metrics, least_agreement, looks_like_scores, unique_top1, worst_drift
    metrics = [drift_metrics(a, b) for a, b in zip(reference, outs)]
    out: dict[str, Any] = {"drift": worst_drift(metrics), "agreement": least_agreement(metrics), "accuracy": None}
    scores = [b for a, b in zip(reference, outs) if looks_like_scores(a)]
    if labels is not None and scores:
        top, ok = unique_top1(scores[0])
        out["accuracy"] = float(np.mean((top == labels[: len(top)]) & ok))
    return out


def _layer_summary(d: dict[str, Any]) -> dict[str, Any]:
    keep = ("R1", "R2", "rank", "rel_error", "sparsity", "channels_before", "channels_after", "params_before",
            "params_after", "macs_before", "macs_after")
    return {k: d[k] for k in keep if k in d}


# --- backends --------------------------------------------------------------------------------------

def node_name() -> str:
    return f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} cores)"


class Backend:
    """Runs evaluations (`map`, maybe in parallel) and measurements (`timed`, one at a time)."""

    name = "serial"
    workers = 1

    def start(self, payload: Payload) -> None:
        self._evaluator = Evaluator(payload)

    def map(self, configs: Sequence[Config], tick: Tick | None = None, what: str = "evaluating"
            ) -> list[dict[str, Any]]:
        out = []
        for i, cfg in enumerate(configs):
            _tick(tick, what, i, len(configs))
            out.append(self._evaluator.evaluate(cfg))
        _tick(tick, what, len(configs), len(configs))
        return out

    def timed(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
        """Run one latency measurement, alone; returns (its result, the node it ran on)."""
        return fn(*args), node_name()

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tick(tick: Tick | None, what: str, done: int, total: int) -> None:
    if tick is not None:
        tick(what, done, total)


_worker: Evaluator | None = None


def _init_worker(payload: Payload) -> None:
    global _worker
    _worker = Evaluator(payload)


def _evaluate_in_worker(cfg: Config) -> dict[str, Any]:
    assert _worker is not None
    return _worker.evaluate(cfg)


class ProcessBackend(Backend):
    """A pool of `workers` processes (spawned, so no onnxruntime thread pool is forked); the
    payload is pickled once per worker, through the pool's initializer."""

    name = "processes"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None

    def start(self, payload: Payload) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp
        self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                           initializer=_init_worker, initargs=(payload,))

    def map(self, configs, tick=None, what="evaluating"):
        import concurrent.futures as cf
        futures = {self.pool.submit(_evaluate_in_worker, c): i for i, c in enumerate(configs)}
        out: list[dict[str, Any] | None] = [None] * len(configs)
        _tick(tick, what, 0, len(configs))
        try:
            for done, f in enumerate(cf.as_completed(futures), start=1):
                out[futures[f]] = f.result()
                _tick(tick, what, done, len(configs))
        except cf.process.BrokenProcessPool:
            raise SurgeonError("a sweep worker process died (out of memory?); try fewer --workers") from None
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


class RayBackend(Backend):
    """The same evaluations on Ray: `workers` actors, each built once from the payload, which
    is put in the object store once. Without an address a local Ray runtime is started."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None, latency_local: bool = False) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--backend ray needs Ray: pip install 'surgeon[ray]'") from None
        self.workers = workers
        self.address = address
        self.latency_local = latency_local
        self.actors: list[Any] = []
        self._started_ray = False

    def start(self, payload: Payload) -> None:
        import ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                      "logging_level": logging.WARNING}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = max(self.workers, 1)
            try:
                ray.init(**kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ...: one line, not a traceback
                raise UsageError(f"cannot start or reach Ray ({self.address or 'local runtime'}): "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
            self._started_ray = True
        self.payload_ref = ray.put(payload)  # once; every actor reads it from the object store

    def _actors(self) -> list[Any]:
        import ray
        if not self.actors:
            actor = ray.remote(num_cpus=1)(_RayEvaluator)
            self.actors = [actor.remote(self.payload_ref) for _ in range(self.workers)]
        return self.actors

    def _release(self) -> None:
        """Free the actors' CPUs (a measurement must not wait for them, nor run beside them)."""
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def map(self, configs, tick=None, what="evaluating"):
        from ray.util import ActorPool
        pool = ActorPool(self._actors())
        out: list[dict[str, Any] | None] = [None] * len(configs)
        pending = list(enumerate(configs))
        _tick(tick, what, 0, len(configs))
        results = pool.map_unordered(lambda a, ic: a.evaluate.remote(ic[0], ic[1]), pending)
        for done, (i, r) in enumerate(results, start=1):
            out[i] = r
            _tick(tick, what, done, len(configs))
        return out  # type: ignore[return-value]

    def timed(self, fn, *args):
        if self.latency_local:
            return fn(*args), node_name()
        import ray
        # one task at a time, after the evaluations (their actors are gone): nothing of ours runs beside it
        self._release()
        task = ray.remote(num_cpus=1)(_timed_on_node)
        result, node = ray.get(task.remote(fn, *args))
        return result, node

    def close(self) -> None:
        import ray
        self._release()
        if self._started_ray and not self.address:
            ray.shutdown()


class _RayEvaluator:
    def __init__(self, payload: Payload) -> None:
        self.evaluator = Evaluator(payload)

    def evaluate(self, i: int, cfg: Config) -> tuple[int, dict[str, Any]]:
        return i, self.evaluator.evaluate(cfg)


def _timed_on_node(fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    import ray
    return fn(*args), f"{node_name()} ray node {ray.get_runtime_context().get_node_id()[:12]}"


def make_backend(backend: str = "processes", workers: int = 1, address: str | None = None,
                 latency_local: bool = False) -> Backend:
    """`processes` (serial in this process when workers is 1) or `ray`."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if backend == "ray":
        return RayBackend(workers, address, latency_local)
    if backend != "processes":
        raise UsageError(f"unknown --backend {backend!r}; choose processes or ray")
    if address:
        raise UsageError("--address is for --backend ray")
    return Backend() if workers == 1 else ProcessBackend(workers)
