"""The latency guard: is a replacement chain really faster than the node it replaces?

Fewer MACs do not always run faster (three small convs can lose to one big one in
onnxruntime), so each candidate is timed alone, original vs chain, at its real input shape,
in two tiny models that onnxruntime optimizes the same way it will the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _mini_model(nodes: list[gs.Node], x: gs.Tensor, y: gs.Tensor, x_shape, opset: int) -> onnx.ModelProto:
    xin = gs.Variable(x.name, dtype=np.float32, shape=list(x_shape))
    yout = gs.Variable(y.name, dtype=np.float32)
    # Export through a throwaway graph that points at the real tensors by name only, so the
    # model being edited is left untouched.
    clones = []
    for n in nodes:
        ins = [xin if t is x else (t if isinstance(t, gs.Constant) else gs.Variable(t.name, dtype=np.float32))
               for t in n.inputs]
        outs = [yout if t is y else gs.Variable(t.name, dtype=np.float32) for t in n.outputs]
        clones.append((n, ins, outs))
    # graphsurgeon links tensors by identity; map names to single objects
    by_name: dict[str, gs.Tensor] = {xin.name: xin, yout.name: yout}
    new_nodes = []
    for n, ins, outs in clones:
        ins = [by_name.setdefault(t.name, t) for t in ins]
        outs = [by_name.setdefault(t.name, t) for t in outs]
        new_nodes.append(gs.Node(n.op, n.name, dict(n.attrs), inputs=ins, outputs=outs))
    g = gs.Graph(nodes=new_nodes, inputs=[xin], outputs=[yout], opset=opset)
    m = gs.export_onnx(g, do_type_check=False)
    m.ir_version = 8
    return m


def time_rewrite(node: gs.Node, chain: list[gs.Node], x_shape: tuple[int, ...], opset: int,
                 threads: int = 0, budget_s: float = 0.6, seed: int = 0) -> GuardResult:
    """Median latency of `node` alone vs `chain` alone on a random input of `x_shape`."""
    x, y = node.inputs[0], node.outputs[0]
    original = _mini_model([node], x, y, x_shape, opset)
    rewritten = _mini_model(chain, x, chain[-1].outputs[0], x_shape, opset)
    # the chain's output tensor has its own name; rename the graph output so both models match
    feed = {x.name: np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
    sa, sb = session(original, threads), session(rewritten, threads)
    la, lb = latency_ab(sa, sb, feed, warmup=2, budget_s=budget_s)
    return GuardResult(la.median_ms, lb.median_ms)
