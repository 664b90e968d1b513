"""Run the part of a graph that computes some tensors, pass after pass, from where the last pass left off.

Sequential fitting (surgeon.layer_stats) runs the calibration data through the graph once per
stage, each time up to the inputs of the stage's layers. Run from the model's inputs every time,
P stages cost about P/2 runs of the whole model (and as much again for the original model,
which runs in lockstep). Most of that recomputes activations no rewrite has touched: everything
upstream of the layers rewritten since the last pass. A `PassRunner` keeps, from each pass, the
activations on the border of what it computed (whole calibration set, axis 0 = sample), with
what earlier passes kept that a later node still reads (a skip connection's source), and
the next pass cuts the graph there: the kept tensors that are not downstream of a rewritten
layer become graph inputs fed from memory, and only the rest is computed.

The values match a run from the inputs up to onnxruntime's rounding (a fused kernel cannot span
the cut); the same inputs give the same cut, so results still repeat byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.validate import STREAM_BATCH

# activations kept between passes, per runner; a pass whose border is larger keeps none
CACHE_BYTES = 1 << 30


def downstream(graph: gs.Graph, tensors: Iterable[str]) -> set[str]:
    """Names of `tensors` and of every tensor computed from them."""
    readers: dict[str, list[gs.Node]] = {}
    for n in graph.nodes:
        for t in n.inputs:
            readers.setdefault(t.name, []).append(n)
    seen = set(tensors)
    todo = list(seen)
    while todo:
        for n in readers.get(todo.pop(), ()):
            for o in n.outputs:
                if o.name not in seen:
                    seen.add(o.name)
                    todo.append(o.name)
    return seen


def upstream(producers: dict[str, gs.Node], names: Iterable[str], stop: set[str] = frozenset()) -> set[int]:
    """ids of the nodes that compute `names` (producers: tensor name -> node), not going past the
    tensors in `stop`."""
    seen: set[int] = set()
    todo = [t for t in names if t not in stop]
    while todo:
        node = producers.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(t.name for t in node.inputs if t.name and t.name not in stop)
    return seen


def part_copy(graph: gs.Graph, names: list[str], cut: set[str], producers: dict[str, gs.Node]) -> gs.Graph:
    """A copy of only the part of `graph` that computes `names` from its inputs and the `cut`
    tensors (which come out with no producer). Copying the whole graph each pass and cleaning it
    up cost 3.4 s of DenseNet-121's 13 s of statistics passes; the graph is left untouched."""
    part = upstream(producers, names, cut)
    tensors = {t.name: t for t in graph.inputs} | {t.name: t for n in graph.nodes for t in n.outputs}
    view = gs.Graph(nodes=[n for n in graph.nodes if id(n) in part], inputs=graph.inputs,
                    outputs=[tensors[t] for t in names if t in tensors], name=graph.name, opset=graph.opset,
                    import_domains=graph.import_domains, functions=graph.functions)
    if hasattr(graph, "ir_version"):  # onnx-graphsurgeon >= 0.5.3 (0.5.2, the floor, has none)
        view.ir_version = graph.ir_version
    return view.copy()


@dataclass
class PassRunner:
    """One model's passes (the graph as rewritten so far, or the original) and what they keep."""

    limit: int = CACHE_BYTES
    cache: dict[str, np.ndarray] = field(default_factory=dict)
    changing: set[str] = field(default_factory=set)  # what the last pass's caller was about to rewrite
    started_from: list[str] = field(default_factory=list)  # the last pass's cut (tests, logs)

    def stream(self, graph: gs.Graph, names: list[str], data, *, like: onnx.ModelProto | None = None,
               changing: Iterable[str] = (), batch: int = STREAM_BATCH, threads: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield {name: value} batch by batch, like surgeon.validate.stream_tensors over the part
        of `graph` that computes `names`. `changing`: the tensors whose values the caller may
        change before the next pass (the outputs of the layers it may rewrite): the next pass
        recomputes them and everything computed from them, and this pass keeps nothing there."""
        from surgeon.calibration import DataSet
        from surgeon.model import detach_large, to_model
        from surgeon.validate import stream_tensors

        names = list(dict.fromkeys(names))
        stale = downstream(graph, self.changing)      # changed since the last pass
        self.changing = set(changing)
        will_change = downstream(graph, self.changing)  # useless to keep
        # no cut without a batch axis, nor around subgraphs, whose outer-scope reads are not edges
        subgraphs = any(n.op in ("If", "Loop", "Scan") for n in graph.nodes)
        no_cut = getattr(data, "stacked", False) or subgraphs
        producers = {o.name: n for n in graph.nodes for o in n.outputs}
        needed = upstream(producers, names)
        computed = {o.name for n in graph.nodes if id(n) in needed for o in n.outputs}
        # a tensor is cut off from its producer, so only the single output of a node can be cut at:
        # detaching one output of a Split would shift the others
        cut = [] if no_cut else sorted(t for t in self.cache if t in computed and t not in stale and t not in names
                                       and len(producers[t].outputs) == 1)
        if subgraphs:  # the whole graph, cleaned up to what computes `names` (cleanup sees subgraph reads)
            g = graph.copy()
            have = g.tensors()
            g.outputs = [have[t] for t in names if t in have]
            g.cleanup()
        else:
            g = part_copy(graph, names, set(cut), producers)
        have = g.tensors()
        cut = [t for t in cut if t in have]  # (one upstream of another cut tensor is not read)
        for t in cut:
            v = self.cache[t]
            have[t].inputs.clear()  # fed from memory: its producers are no longer needed
            have[t].dtype, have[t].shape = v.dtype, ["batch", *v.shape[1:]]
        if cut:
            g.inputs = list(g.inputs) + [have[t] for t in cut]
            g.cleanup()
            read = {t.name for n in g.nodes for t in n.inputs} | {t.name for t in g.outputs}
            g.inputs = [i for i in g.inputs if i.name in read]
        # kept for the next pass: what this pass computes that no coming rewrite changes and that
        # the rest of the graph, or a part the coming rewrites change, reads
        inside = {n.name for n in g.nodes}
        computed = {o.name for n in g.nodes for o in n.outputs}
        wanted = {t.name for n in graph.nodes if n.name not in inside or any(o.name in will_change for o in n.outputs)
                  for t in n.inputs}
        border = [] if no_cut else sorted((computed & wanted | set(names)) - will_change)
        large = detach_large(g)  # handed to the session in memory, not copied through the proto
        model = to_model(g, like=like)
        feed_names = {i.name for i in g.inputs}
        inputs = {k: v for k, v in data.inputs.items() if k in feed_names or not cut}
        inputs.update({t: self.cache[t] for t in cut if t in feed_names})
        feed = DataSet(inputs, None, data.synthetic, data.source, data.batch, getattr(data, "stacked", False))
        fetch = names + [t for t in border if t not in names and t not in feed_names]
        # each border tensor is written batch by batch into one array of the whole data's size,
        # allocated at the first batch (concatenating the batches at the end cost a copy of it all)
        keep: dict[str, np.ndarray | None] | None = {t: None for t in border if t not in feed_names} or None
        size, done, total = 0, 0, len(feed)
        for values, fed in zip(stream_tensors(model, fetch, feed, batch=batch, threads=threads, initializers=large), feed.batches(batch)):
            n = len(next(iter(fed.values())))
            if keep is not None:
                for t in list(keep):
                    v = values[t]
                    # only per-sample activations can be cut at and fed back batch by batch
                    if not (isinstance(v, np.ndarray) and v.ndim >= 1 and v.dtype.kind == "f" and v.shape[0] == n
                            and (keep[t] is None or v.shape[1:] == keep[t].shape[1:])):
                        del keep[t]
                        continue
                    if keep[t] is None:
                        if size + v.nbytes // n * total > self.limit:
                            keep = None
                            break
                        keep[t] = np.empty((total, *v.shape[1:]), v.dtype)
                        size += keep[t].nbytes
                    keep[t][done:done + n] = v
            done += n
            yield {t: values[t] for t in names}
        self.started_from = [t for t in cut if t in feed_names]
        kept = {t: v for t, v in keep.items() if v is not None and done == total} if keep is not None else {}
        # the part of the cut this pass read stays valid where no coming rewrite reaches
        cache = {**{t: self.cache[t] for t in cut if t in feed_names and t not in will_change}, **kept}
        self.cache = cache | self._carried(graph, cache, needed, stale | will_change)

    def _carried(self, graph: gs.Graph, cache: dict[str, np.ndarray], needed: set[int], invalid: set[str]
                 ) -> dict[str, np.ndarray]:
        """What the cache held that this pass did not read but a later one may: still valid, and read
        by a node this pass did not need. A detector's neck reads backbone maps many stages later;
        dropped, they were recomputed from the images (the ddddocr detector's passes ran 2.6x its
        forward time). Within the size limit, after what this pass kept."""
        size = sum(v.nbytes for v in cache.values())
        read_later = {t.name for n in graph.nodes if id(n) not in needed for t in n.inputs}
        out = {}
        for t in sorted(set(self.cache) - set(cache)):
            v = self.cache[t]
            if t in invalid or t not in read_later or size + v.nbytes > self.limit:
                continue
            out[t] = v
            size += v.nbytes
        return out
