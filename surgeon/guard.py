"""The latency guard: is a replacement chain really faster than the node it replaces?

Fewer MACs do not always run faster (three small convs can lose to one big one in
onnxruntime), so each candidate is timed alone, original vs chain, at its real input shape,
in two tiny models that onnxruntime optimizes the same way it will the whole model.

Timings are noisy, and a verdict that flips between runs would make the same command write
a different model. So each measured verdict is cached on disk, keyed by the two mini models'
bytes, the thread count, the onnxruntime version and the CPU: a repeated run on the same
machine reuses it and writes the same bytes. `SURGEON_CACHE_DIR` moves the cache
(default `~/.cache/surgeon`); `SURGEON_GUARD_CACHE=0` re-measures every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.validate import latency_ab, session


@dataclass
class GuardResult:
    original_ms: float
    chain_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.chain_ms if self.chain_ms > 0 else float("inf")

    def to_json(self) -> dict[str, float]:
        return {"original_ms": round(self.original_ms, 4), "rewrite_ms": round(self.chain_ms, 4),
                "speedup": round(self.speedup, 3)}


class GuardUnavailable(Exception):
    """The rewrite cannot be timed alone (an input's shape is unknown)."""


def _mini_model(nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor, x_shape, opset: int,
                shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
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
    by_name: dict[str, gs.Tensor] = {name: gs.Variable(name, dtype=np.float32, shape=list(shape))
                                     for name, shape in feeds.items()}
    by_name[y.name] = gs.Variable(y.name, dtype=np.float32)

    def local(t: gs.Tensor) -> gs.Tensor:
        if isinstance(t, gs.Constant) or t.name == "":
            return t
        return by_name.setdefault(t.name, gs.Variable(t.name, dtype=np.float32))

    new_nodes = [gs.Node(n.op, n.name, dict(n.attrs), inputs=[local(t) for t in n.inputs],
                         outputs=[local(t) for t in n.outputs]) for n in nodes]
    g = gs.Graph(nodes=new_nodes, inputs=[by_name[k] for k in feeds], outputs=[by_name[y.name]], opset=opset)
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = 8
    return m, feeds


def time_rewrite(node: gs.Node, chain: list[gs.Node], x_shape: tuple[int, ...], opset: int,
                 threads: int = 0, budget_s: float = 0.3, seed: int = 0,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> GuardResult:
    """Median latency of `node` alone vs `chain` alone on random inputs (`x` of `x_shape`)."""
    x, y = node.inputs[0], node.outputs[0]
    original, feeds = _mini_model([node], x, y, x_shape, opset, shapes or {})
    rewritten, _ = _mini_model(chain, x, chain[-1].outputs[0], x_shape, opset, {**(shapes or {}), **feeds})
    rng = np.random.default_rng(seed)
    feed = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in feeds.items()}
    key = _cache_key(original, rewritten, feeds, threads)
    cached = _cache_get(key)
    if cached is not None:
        return cached
    sa, sb = session(original, threads), session(rewritten, threads)
    la, lb = latency_ab(sa, sb, feed, warmup=2, budget_s=budget_s)
    result = GuardResult(la.median_ms, lb.median_ms)
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
    return h.hexdigest()


def _cache_get(key: str) -> GuardResult | None:
    d = cache_dir()
    if d is None:
        return None
    try:
        data = json.loads((d / f"{key}.json").read_text())
        return GuardResult(float(data["original_ms"]), float(data["chain_ms"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_put(key: str, result: GuardResult) -> None:
    d = cache_dir()
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"original_ms": result.original_ms, "chain_ms": result.chain_ms}))
        os.replace(tmp, d / f"{key}.json")
    except OSError:  # a read-only home must not stop the surgery
        pass
