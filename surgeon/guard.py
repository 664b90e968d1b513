"""The latency guard: is a replacement chain really faster than the node it replaces?

Fewer MACs do not always run faster (three small convs can lose to one big one in
onnxruntime), so each candidate is timed alone, original vs chain, at its real input shape,
in two tiny models that onnxruntime optimizes the same way it will the whole model.

Timings are noisy, so a verdict is a statistical statement, not one median against another.
Original (A) and rewrite (B) run in interleaved pairs (A B, B A, ...); each pair gives a ratio
r_i = t_A / t_B, which a machine that speeds up or slows down moves little. The speedup is the
median of the r_i, and its spread is the distribution-free 95% confidence interval of that
median: the order statistics r_(j), r_(k) with j, k = n/2 -+ z sqrt(n)/2 (the binomial
interval for a median). Pairs are added until the interval lies wholly above 1 ("faster",
kept) or wholly below 1 ("slower", original kept), or a time cap per layer runs out
("inconclusive": the original is kept, since a rewrite that is not clearly faster is not
worth its drift). Looking at the interval after every pair would let chance decide (each
look is another chance to exclude 1), so it is looked at only at n = 8, 16, 32, ... with
z = 2.576 (99% each; under ten looks in all).

A verdict that flips between runs would make the same command write a different model, so
each one is cached on disk, keyed by the two mini models' bytes, the input shapes, the
thread count, the onnxruntime version and the machine (CPU model and core count): a repeated
run on the same machine reuses it and writes the same bytes. `SURGEON_CACHE_DIR` moves the
cache (default `~/.cache/surgeon`); `SURGEON_GUARD_CACHE=0` turns it off; `refreshing()` (or
`SURGEON_GUARD_REFRESH=1`) re-measures and overwrites the cached verdicts.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.validate import latency_ab, median_interval, session  # latency_ab: tests patch it

CACHE_VERSION = "3"  # bump when the measurement changes, so old verdicts are not reused (3: no spinning)
DEFAULT_BUDGET_S = 1.0  # time cap per layer (stretched to at most 4x for one look at a slow layer)
MIN_PAIRS = 8  # the first look: all 8 ratios on one side of 1 (chance 2/256 when there is no difference)
Z = 2.576  # 99% per look

_refresh: contextvars.ContextVar[bool] = contextvars.ContextVar("surgeon_guard_refresh", default=False)


@contextlib.contextmanager
def refreshing(on: bool = True) -> Iterator[None]:
    """Within this block the guard re-measures instead of reading cached verdicts (and
    overwrites them). The CLI's --guard-refresh sets it."""
    token = _refresh.set(on)
    try:
        yield
    finally:
        _refresh.reset(token)


def refresh_requested() -> bool:
    return _refresh.get() or os.environ.get("SURGEON_GUARD_REFRESH", "0") not in ("", "0")


@dataclass
class GuardResult:
    """Median times of original and rewrite, and the speedup's 95% interval when measured in pairs."""

    original_ms: float
    chain_ms: float
    low: float | None = None  # lower end of the speedup's 95% interval
    high: float | None = None
    pairs: int = 0
    median_ratio: float | None = None  # median of the per-pair ratios t_original / t_rewrite

    @property
    def speedup(self) -> float:
        if self.median_ratio is not None:
            return self.median_ratio
        return self.original_ms / self.chain_ms if self.chain_ms > 0 else float("inf")

    @property
    def verdict(self) -> Literal["faster", "slower", "inconclusive"]:
        if self.low is None or self.high is None:  # no interval: the point estimate decides
            return "faster" if self.speedup > 1.0 else "slower"
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "inconclusive"

    @property
    def kept(self) -> bool:
        """Whether the rewrite goes in: only when it is faster beyond the measured noise."""
        return self.verdict == "faster"

    def describe(self) -> str:
        """The skip reason for a rewrite the guard did not keep."""
        spread = (f"; 95% interval of the speedup {self.low:.2f}x-{self.high:.2f}x over {self.pairs} pairs"
                  if self.low is not None and self.high is not None else "")
        if self.verdict == "slower":
            return f"slower ({1 / self.speedup:.2f}x the original's time{spread})"
        return f"inconclusive: kept original (speedup {self.speedup:.2f}x{spread})"

    def to_json(self) -> dict[str, float]:
        out = {"original_ms": round(self.original_ms, 4), "rewrite_ms": round(self.chain_ms, 4),
               "speedup": round(self.speedup, 3), "verdict": self.verdict}
        if self.low is not None and self.high is not None:
            out.update(speedup_low=round(self.low, 3), speedup_high=round(self.high, 3), pairs=self.pairs)
        return out


class GuardUnavailable(Exception):
    """The rewrite cannot be timed alone (an input's shape is unknown)."""


def _mini_model(nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor, x_shape, opset: int,
                shapes: dict[str, tuple[int, ...]], dtype=np.float32
                ) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A model holding just `nodes`, fed at `x`; other run-time inputs (a bias computed by
    the graph, say) become graph inputs too. Returns it with the shapes of its inputs."""
    produced = {t.name for n in nodes for t in n.outputs}
    feeds = {x.name: tuple(x_shape)}
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name and t.name not in produced and t.name not in feeds:
                if t.name not in shapes:
                    raise GuardUnavailable(f"shape of input '{t.name}' unknown")
                feeds[t.name] = tuple(shapes[t.name])
    # Export through a throwaway graph that points at the real tensors by name only, so the
    # model being edited is left untouched.
    by_name: dict[str, gs.Tensor] = {name: gs.Variable(name, dtype=dtype, shape=list(shape))
                                     for name, shape in feeds.items()}
    by_name[y.name] = gs.Variable(y.name, dtype=dtype)

    def local(t: gs.Tensor) -> gs.Tensor:
        if isinstance(t, gs.Constant) or t.name == "":
            return t
        return by_name.setdefault(t.name, gs.Variable(t.name, dtype=dtype))

    new_nodes = [gs.Node(n.op, n.name, dict(n.attrs), inputs=[local(t) for t in n.inputs],
                         outputs=[local(t) for t in n.outputs]) for n in nodes]
    g = gs.Graph(nodes=new_nodes, inputs=[by_name[k] for k in feeds], outputs=[by_name[y.name]], opset=opset)
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = 8
    return m, feeds


def _float_type(node: gs.Node) -> np.dtype:
    """The float type the node computes in: its input's if known, else its weight's (fp16 models)."""
    for t in node.inputs:
        dt = getattr(t, "values", None).dtype if isinstance(t, gs.Constant) else t.dtype
        if dt is not None and np.issubdtype(np.dtype(dt), np.floating):
            return np.dtype(dt)
    return np.dtype(np.float32)


def _is_look(n: int, first: int) -> bool:
    """n = first, 2 first, 4 first, ...: the sample sizes at which the interval is checked."""
    k, rem = divmod(n, first)
    return rem == 0 and k > 0 and (k & (k - 1)) == 0


def measure_pairs(sess_a, sess_b, feed: dict[str, np.ndarray], *, budget_s: float = DEFAULT_BUDGET_S,
                  min_pairs: int = MIN_PAIRS, max_pairs: int = 2000, warmup: int = 2) -> GuardResult:
    """Interleaved pairs until the speedup's interval excludes 1.0 or `budget_s` runs out."""
    for _ in range(warmup):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    # very fast ops are timed over a few runs per sample, so the timer's resolution does not dominate
    t0 = time.perf_counter()
    sess_a.run(None, feed)
    single = time.perf_counter() - t0
    inner = int(min(max(1, 2e-4 / max(single, 1e-9)), 50))
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while len(ta) < max_pairs:
        order = ((sess_a, ta), (sess_b, tb)) if len(ta) % 2 == 0 else ((sess_b, tb), (sess_a, ta))
        for s, acc in order:
            t = time.perf_counter()
            for _ in range(inner):
                s.run(None, feed)
            acc.append((time.perf_counter() - t) / inner)
        n = len(ta)
        if _is_look(n, min_pairs):
            _, low, high = median_interval(np.divide(ta, tb), Z)
            if low > 1.0 or high < 1.0:
                break
        # the cap: budget_s, stretched up to 4x so that slow layers still get one look
        elapsed = time.perf_counter() - start
        if (elapsed > budget_s and n >= min_pairs) or elapsed > 4 * budget_s:
            break
    ratios = np.divide(ta, tb)
    med, low, high = median_interval(ratios, Z) if len(ratios) >= min_pairs else (float(np.median(ratios)), 0.0,
                                                                                 float("inf"))
    return GuardResult(float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3, low, high, len(ta), med)


def time_rewrite(node: gs.Node, chain: list[gs.Node], x_shape: tuple[int, ...], opset: int,
                 threads: int = 0, budget_s: float = DEFAULT_BUDGET_S, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None, refresh: bool | None = None) -> GuardResult:
    """`node` alone vs `chain` alone on seeded random inputs (`x` of `x_shape`), measured in
    interleaved pairs (see the module docstring); cached unless `refresh`."""
    x, y = node.inputs[0], node.outputs[0]
    dtype = _float_type(node)
    original, feeds = _mini_model([node], x, y, x_shape, opset, shapes or {}, dtype)
    rewritten, _ = _mini_model(chain, x, chain[-1].outputs[0], x_shape, opset, {**(shapes or {}), **feeds}, dtype)
    rng = np.random.default_rng(seed)
    feed = {name: rng.standard_normal(shape).astype(dtype) for name, shape in feeds.items()}
    key = _cache_key(original, rewritten, feeds, threads)
    if not (refresh if refresh is not None else refresh_requested()):
        cached = _cache_get(key)
        if cached is not None:
            return cached
    sa, sb = session(original, threads), session(rewritten, threads)
    result = measure_pairs(sa, sb, feed, budget_s=budget_s)
    _cache_put(key, result)
    return result


# --- verdict cache -------------------------------------------------------------------------------

def cache_dir() -> Path | None:
    if os.environ.get("SURGEON_GUARD_CACHE", "1") == "0":
        return None
    root = os.environ.get("SURGEON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "surgeon")
    return Path(root) / "guard"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_key(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds, threads: int) -> str:
    import onnxruntime as ort
    h = hashlib.sha256()
    for part in (original.SerializeToString(deterministic=True), rewritten.SerializeToString(deterministic=True),
                 json.dumps(sorted(feeds.items())).encode(), f"{threads}|{ort.__version__}|{_cpu()}|{os.cpu_count()}".encode()):
        h.update(hashlib.sha256(part).digest())
    h.update(CACHE_VERSION.encode())
    return h.hexdigest()


def _cache_get(key: str) -> GuardResult | None:
    d = cache_dir()
    if d is None:
        return None
    try:
        data = json.loads((d / f"{key}.json").read_text())
        return GuardResult(float(data["original_ms"]), float(data["chain_ms"]), float(data["low"]),
                           float(data["high"]), int(data["pairs"]), float(data["median_ratio"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_put(key: str, result: GuardResult) -> None:
    d = cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"original_ms": result.original_ms, "chain_ms": result.chain_ms,
                                   "low": result.low, "high": result.high, "pairs": result.pairs,
                                   "median_ratio": result.median_ratio}))
        os.replace(tmp, d / f"{key}.json")
    except OSError:  # a read-only home must not stop the surgery
        pass
