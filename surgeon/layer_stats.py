"""What a layer sees on the calibration data: a bounded sample of its input rows or patches.

Data-aware factorization (surgeon.data_factors: whitened SVD, data-aware Tucker-2) needs, per
layer, the covariance of the rows a fully connected layer multiplies or of the patches a
conv's kernel covers. Both come from a fixed-size random sample of those rows, drawn batch
by batch while surgeon.validate.stream_tensors runs the model (one batch of activations in
memory at a time), so memory per layer is at most `rows` x (c * prod(kernel)) floats whatever
the data size.

Sequential fitting: `SequentialSampler` runs the graph *as rewritten so far*, so a layer is
fitted to the inputs the already-compressed layers before it produce (Zhang et al.: errors
then do not compound). Running the model once per layer would cost one full inference per
layer; instead the candidates are split into `passes` consecutive stages, and one run of the
partially rewritten graph samples every layer of the next stage at once.

The fits aim at the original model's activations at the same positions, so each stage also
runs the original model. That pass depends on no rewrite: it is drawn for the next stage on a
background thread at idle priority while this stage's fits run, on whatever core they leave
idle (ResNet-50's data-aware tucker, 16 images: the reference passes took 1.6 s of the
surgery's 15 s; about 1 s of it now runs beside the fits).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.pass_cache import PassRunner
from surgeon.rewrite import add_partner
from surgeon.validate import STREAM_BATCH

log = logging.getLogger(__name__)


@dataclass
class ConvWindow:
    """Where a conv's kernel reads its input: kernel, strides, dilations, and explicit pads
    (auto_pad resolved against the actual input size, ONNX Conv spec)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # begin..., end...; None: resolve from auto_pad
    auto_pad: str = "NOTSET"

    @classmethod
    def of(cls, node: gs.Node, kernel: tuple[int, ...]) -> "ConvWindow":
        nd = len(kernel)
        a = node.attrs
        auto = a.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        pads = tuple(a["pads"]) if "pads" in a and auto in ("NOTSET", "") else None
        if pads is None and auto in ("NOTSET", "", "VALID"):
            pads = (0,) * (2 * nd)
        return cls(tuple(kernel), tuple(a.get("strides", [1] * nd)), tuple(a.get("dilations", [1] * nd)),
                   pads, auto)

    def resolve(self, size: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(pads_begin, pads_end, output size) for an input of spatial `size`."""
        nd = len(size)
        if self.pads is not None:
            begin, end = self.pads[:nd], self.pads[nd:]
        else:  # SAME_UPPER / SAME_LOWER: output = ceil(in / stride), extra pad at the end (upper)
            begin, end = [], []
            for i, n in enumerate(size):
                extent = (self.kernel[i] - 1) * self.dilations[i] + 1
                total = max(0, (math.ceil(n / self.strides[i]) - 1) * self.strides[i] + extent - n)
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
        out = tuple((size[i] + begin[i] + end[i] - ((self.kernel[i] - 1) * self.dilations[i] + 1))
                    // self.strides[i] + 1 for i in range(nd))
        return tuple(begin), tuple(end), out


@dataclass
class Request:
    """One layer's sample: the rows of `tensor` (window None: a fully connected input, last
    axis = features) or the kernel patches of a conv input (N, C, *spatial)."""

    layer: str
    tensor: str
    window: ConvWindow | None = None
    skip: str | None = None  # the other input of the Add that alone reads the layer's output


@dataclass
class Sample:
    rows: np.ndarray               # (n, d) float32: what the layer sees in the graph rewritten so far
    target: np.ndarray | None      # the same positions in the original model (None: identical)
    seen: int                      # how many rows / positions the data offered
    images: int                    # calibration samples run through the model
    groups: np.ndarray | None = None  # (n,) which calibration sample each row came from
    # (n, out) float32: at the same output positions, the Add's other input in the original
    # model minus in the rewritten graph (s - s~), so the fit can aim at y + s - s~ and the
    # Add's output y~ + s~ at the original's (None: no such Add, or nothing rewritten yet)
    offset: np.ndarray | None = None


def patches_at(x: np.ndarray, window: ConvWindow, picks: np.ndarray) -> np.ndarray:
    """im2col for a few output positions only: x (N, C, *spatial), `picks` flat indices into
    (N, *out) -> (len(picks), C * K) laid out like w.reshape(f, -1) (channel-major). Reads
    outside the input are the conv's zero padding (no padded copy of x is made)."""
    nd = x.ndim - 2
    size = x.shape[2:]
    begin, _, out = window.resolve(size)
    idx = np.unravel_index(picks, (x.shape[0],) + out)
    b, pos = idx[0], idx[1:]
    offsets = np.stack(np.meshgrid(*[np.arange(k) for k in window.kernel], indexing="ij"), -1).reshape(-1, nd)
    # Channels last makes each gather read whole rows, but the copy reads all of x: worth it only
    # when the gathers touch more positions than x has. A few rows per image (the usual sample)
    # gather from x as it is: 2.5-9x faster on ResNet-50's activations, the same values.
    if len(picks) * len(offsets) >= x.shape[0] * math.prod(size):
        xt, lead = np.ascontiguousarray(np.moveaxis(x, 1, -1)), ()
    else:
        xt, lead = x, (slice(None),)
    # every offset in one gather: (n, K) positions -> (n, K, C), the advanced indices' shape first
    # (one gather per offset cost 1.3-6x as much on small activations: the calls, not the copies)
    where = [pos[i][:, None] * window.strides[i] + offsets[:, i] * window.dilations[i] - begin[i] for i in range(nd)]
    inside = np.logical_and.reduce([(w >= 0) & (w < size[i]) for i, w in enumerate(where)])
    padded = not inside.all()
    if padded:
        where = [np.clip(w, 0, size[i] - 1) for i, w in enumerate(where)]
    vals = xt[(b[:, None], *lead, *where)]
    if padded:
        vals *= inside[..., None]
    return vals.transpose(0, 2, 1).reshape(len(picks), -1)


def positions(x: np.ndarray, window: ConvWindow | None) -> int:
    if window is None:
        return int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    _, _, out = window.resolve(x.shape[2:])
    return int(x.shape[0] * math.prod(out))


def row_images(x: np.ndarray, window: ConvWindow | None, picks: np.ndarray) -> np.ndarray:
    """For each pick, the index along axis 0 (the sample within the batch) it comes from."""
    per_sample = max(1, positions(x, window) // max(1, x.shape[0])) if x.ndim > 1 else max(1, positions(x, window))
    return picks // per_sample


def output_rows(s: np.ndarray, x: np.ndarray, window: ConvWindow | None, picks: np.ndarray) -> np.ndarray | None:
    """The rows of `s`, a tensor shaped like the layer's output, at the output positions
    `picks` of its input `x` (as take_rows): (len(picks), channels); None when `s` is not
    shaped like the output (an Add that broadcasts)."""
    if window is None:
        if x.ndim < 1 or s.shape[:-1] != x.shape[:-1]:
            return None
        return s.reshape(-1, s.shape[-1])[picks]
    out = window.resolve(x.shape[2:])[2]
    if s.ndim != x.ndim or s.shape[0] != x.shape[0] or tuple(s.shape[2:]) != tuple(out):
        return None
    idx = np.unravel_index(picks, (x.shape[0],) + tuple(out))
    return s[(idx[0], slice(None), *idx[1:])]  # the advanced indices first: (len(picks), channels)


def take_rows(x: np.ndarray, window: ConvWindow | None, picks: np.ndarray) -> np.ndarray:
    if window is None:
        return x.reshape(-1, x.shape[-1])[picks]
    return patches_at(x, window, picks)


@dataclass
class Drawn:
    """One stream's sample, per request layer: the rows taken from each batch, the positions
    they were taken at (`picks`, so that a second stream over the same batches takes the same
    ones), which calibration sample each row came from, the skip tensor's rows at the layer's
    output positions (None for a batch where it is not shaped like the output) and how many
    positions the data offered."""

    rows: dict[str, list[np.ndarray]]
    picks: dict[str, list[np.ndarray]]
    groups: dict[str, list[np.ndarray]]
    skips: dict[str, list[np.ndarray | None]]
    seen: dict[str, int]


def draw(stream, requests: list[Request], data, *, rows: int, seed: int = 0, batch: int = STREAM_BATCH,
         picks: dict[str, list[np.ndarray]] | None = None) -> Drawn:
    """Take, for every request, at most `rows` rows from `stream` (the batches of one run of the
    model over `data`, like surgeon.validate.stream_tensors): about rows / batches from each batch,
    uniformly without replacement, seeded by layer name, or at the given `picks` (another stream's
    Drawn.picks). Only the sampled rows are kept, one batch of activations at a time."""
    step = getattr(data, "batch", None) or batch
    quota = max(1, math.ceil(rows / max(1, math.ceil(len(data) / step))))
    rngs = {r.layer: np.random.default_rng([seed, zlib.crc32(r.layer.encode())]) for r in requests}
    out = Drawn(*({r.layer: [] for r in requests} for _ in range(4)), dict.fromkeys([r.layer for r in requests], 0))
    offset = 0  # calibration samples before this batch: rows are grouped by sample for held-out scoring
    for i, values in enumerate(stream):
        for r in requests:
            x = np.asarray(values[r.tensor])
            total = positions(x, r.window)
            at = picks[r.layer][i] if picks is not None else \
                np.sort(rngs[r.layer].choice(total, size=min(quota, total), replace=False))
            out.rows[r.layer].append(take_rows(x, r.window, at).astype(np.float32))
            out.picks[r.layer].append(at)
            out.groups[r.layer].append(offset + row_images(x, r.window, at))
            if r.skip:
                out.skips[r.layer].append(output_rows(np.asarray(values[r.skip]), x, r.window, at))
            out.seen[r.layer] += total
        offset += max([np.shape(values[r.tensor])[0] for r in requests if np.ndim(values[r.tensor]) > 1] or [1])
    return out


def collect(stream, requests: list[Request], data, *, rows: int, seed: int = 0, batch: int = STREAM_BATCH,
            reference: Drawn | None = None) -> dict[str, Sample]:
    """Sample every request from `stream` (see draw). With a `reference` (the original model over
    the same batches, drawn first), the same positions are taken, so a fit can aim at the
    original outputs, and for a request with a `skip` tensor the difference of the two streams'
    skip at the layer's output positions is the Sample's offset. Both streams must carry every
    request's tensor and skip."""
    live = draw(stream, requests, data, rows=rows, seed=seed, batch=batch,
                picks=None if reference is None else reference.picks)
    out = {}
    for r in requests:
        k = r.layer
        v = live.rows[k]
        x = np.concatenate(v)[:rows] if v else np.zeros((0, 0), np.float32)
        g = np.concatenate(live.groups[k])[:rows] if v else None
        t = d = None
        if reference is not None and v:
            t = np.concatenate(reference.rows[k])[:rows]
            pairs = list(zip(reference.skips[k], live.skips[k]))
            if r.skip and all(a is not None and b is not None for a, b in pairs):
                d = np.concatenate([(a - b).astype(np.float32) for a, b in pairs])[:rows]
        out[k] = Sample(x, t, live.seen[k], len(data), g, d)
    return out


@dataclass
class SequentialSampler:
    """Samples for the candidates of one run, collected stage by stage on the live graph.

    `order` is the candidates in graph order; stage s holds order[bounds[s]:bounds[s+1]].
    The first time a layer of a stage is asked for, the graph as rewritten so far is exported
    and run once, sampling the layers of that stage still to come."""

    order: list[str]
    passes: int
    rows: int
    seed: int = 0
    threads: int = 0
    original: object = None  # the model before any rewrite (ModelProto), the fits' target
    # each pass starts from the activations of the last one that no rewrite has touched since
    live: PassRunner = field(default_factory=PassRunner)
    reference: PassRunner = field(default_factory=PassRunner)
    samples: dict[str, Sample] = field(default_factory=dict)
    fits: dict[str, object] = field(default_factory=dict)  # layer -> its fit (or the exception it raised)
    runs: int = 0
    _original_graph: gs.Graph | None = None

    _ahead: "_Ahead | None" = None  # the original model's pass for the next stage, drawn beside the fits

    def stages(self) -> list[list[str]]:
        return [list(s) for s in np.array_split(np.array(self.order, dtype=object),
                                                max(1, min(self.passes, len(self.order))))]

    def stage_of(self, layer: str) -> list[str]:
        for s in self.stages():
            if layer in s:
                return s[s.index(layer):]
        return [layer]

    def get(self, graph: gs.Graph, layer: str, data, request_for: Callable[[gs.Node], Request | None],
            wants: Callable[[str], bool], changed: bool, job_for: Callable | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Sample | None:
        """`changed`: some layer was rewritten already, so the live graph is not the original.
        `job_for(node, sample)`: the fit of a stage layer as a closure (or None); all of a
        stage's fits run in parallel right after its samples are drawn (fit_of gives them)."""
        if layer in self.samples:
            return self.samples.pop(layer)
        nodes = {n.name: n for n in graph.nodes}
        requests = _requests(nodes, self.stage_of(layer), lambda name: name == layer or wants(name), request_for)
        if not requests:
            return None
        self.runs += 1
        log.debug("layer statistics pass %d on the rewritten graph: %d layers", self.runs, len(requests))
        # the candidates from this stage on may be rewritten before the next pass
        coming = set(self.order[self.order.index(layer):]) if layer in self.order else {layer}
        changing = {o.name for n in graph.nodes if n.name in coming for o in n.outputs}
        batch = STREAM_BATCH
        stream = self.live.stream(graph, _tensors(requests), data, like=self.original, changing=changing, batch=batch,
                                  threads=self.threads)
        ahead, self._ahead = self._ahead, None
        reference = None
        if changed:
            reference = ahead.result() if ahead is not None and ahead.requests == requests else \
                self._draw_reference(requests, data, batch)
        drawn = collect(stream, requests, data, rows=self.rows, seed=self.seed, batch=batch, reference=reference)
        self.samples.update(drawn)
        if job_for is not None:
            from surgeon.parallel import run_parallel

            jobs = {name: job_for(nodes[name], sample) for name, sample in drawn.items() if len(sample.rows) >= 2}
            stage = self.runs
            tick = None if progress is None else (
                lambda done, total, name: progress(done, total, f"fitting {_layers(total)} (stage {stage}): {name}"))
            self._ahead = self._start_ahead(nodes, layer, data, request_for, wants, batch)
            try:
                fits = run_parallel({k: j for k, j in jobs.items() if j is not None}, progress=tick)
            except BaseException:
                if self._ahead is not None:
                    self._ahead.stop.set()  # (Ctrl-C): it ends after its current batch
                raise
            if self._ahead is not None:
                # Before the first of them is rewritten: the guard then times each rewrite with
                # nothing running beside it.
                self._ahead.thread.join()
            self.fits.update(fits)
        return self.samples.pop(layer, None)

    def _draw_reference(self, requests: list[Request], data, batch: int, stop=None) -> Drawn:
        """The sample of the original model at the requests (positions drawn here, the live
        stream takes the same ones)."""
        from surgeon.model import to_graph

        if self._original_graph is None:
            self._original_graph = to_graph(self.original)
        stream = self.reference.stream(self._original_graph, _tensors(requests), data, like=self.original, batch=batch,
                                       threads=self.threads)
        if stop is not None:
            stream = itertools.takewhile(lambda _: not stop.is_set(), stream)
        return draw(stream, requests, data, rows=self.rows, seed=self.seed, batch=batch)

    def _start_ahead(self, nodes: dict, layer: str, data, request_for, wants, batch: int) -> "_Ahead | None":
        """The next stage's pass of the original model, started on a background thread: it reads
        only the original model, so it need not wait for this stage's rewrites, and it runs on
        the cores the fits leave idle (a stage's last, largest layer fits alone). Used when the
        next stage asks for the same requests (get), dropped otherwise."""
        stages = self.stages()
        at = next((i for i, s in enumerate(stages) if layer in s), len(stages))
        if at + 1 >= len(stages):
            return None
        requests = _requests(nodes, stages[at + 1], wants, request_for)
        if not requests:
            return None
        return _Ahead.start(requests, lambda stop: self._draw_reference(requests, data, batch, stop))

    def fit_of(self, layer: str):
        """The fit job_for made for `layer` (None when there was none); raises what it raised."""
        fit = self.fits.pop(layer, None)
        if isinstance(fit, Exception):
            raise fit
        return fit


def _layers(n: int) -> str:
    return "1 layer" if n == 1 else f"{n} layers at once"


def _requests(nodes: dict[str, gs.Node], stage: list[str], wanted: Callable[[str], bool],
              request_for: Callable[[gs.Node], Request | None]) -> list[Request]:
    reqs = [request_for(nodes[name]) for name in stage if name in nodes and wanted(name)]
    return [r for r in reqs if r is not None]


def _tensors(requests: list[Request]) -> list[str]:
    return list(dict.fromkeys([r.tensor for r in requests] + [r.skip for r in requests if r.skip]))


@dataclass
class _Ahead:
    """A reference pass (draw) as a parallel.Part run by a background thread at idle priority;
    `stop` ends it after its current batch."""

    requests: list[Request]
    part: object  # surgeon.parallel.Part
    stop: threading.Event
    thread: threading.Thread

    @classmethod
    def start(cls, requests: list[Request], run: Callable[[threading.Event], Drawn]) -> "_Ahead":
        from surgeon.parallel import Part

        stop = threading.Event()
        part = Part(lambda: run(stop))
        thread = threading.Thread(target=lambda: (_idle_priority(), part.run()), name="surgeon-reference",
                                  daemon=True)
        thread.start()
        return cls(requests, part, stop, thread)

    def result(self) -> Drawn:
        self.thread.join()
        return self.part.get()  # (raises what the pass raised)


def _idle_priority() -> None:
    """Let the calling thread (and the onnxruntime threads it creates, which inherit the policy)
    run only on a core nothing else wants: Linux's SCHED_IDLE; elsewhere, nothing changes. At
    equal priority the pass took the core from the layer whose fit its stage waits on."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed
        pass


def sampler_for(graph: gs.Graph, ctx, tag: str, passes: int, rows: int) -> SequentialSampler:
    """The run's sampler, kept on the graph (one per plugin run): candidates in graph order."""
    from surgeon.model import to_model

    key = f"_surgeon_{tag}_sampler"
    s = graph.__dict__.get(key)
    if s is None:
        order = [n.name for n in graph.nodes if n.name in ctx.selected]
        s = SequentialSampler(order, passes, rows, ctx.seed, ctx.threads, original=to_model(graph.copy()))
        graph.__dict__[key] = s
    return s


def layer_fit(graph: gs.Graph, layer: str, ctx, opts, request_for: Callable[[gs.Node], Request | None], tag: str,
              job_for: Callable | None = None) -> tuple[Sample | None, object]:
    """(sample, fit) for one candidate (fit=data). When its stage's samples are drawn,
    job_for(node, sample, layer_options) gives every stage layer's fit as a closure, and they run
    in parallel (surgeon.parallel.run_parallel); fit is this layer's result (None without job_for)."""
    sampler = sampler_for(graph, ctx, tag, opts.passes, opts.rows)
    data = ctx.data.take(min(opts.samples, len(ctx.data)))
    wants = lambda name: getattr(ctx.options_for(name, opts), "fit", "weights") == "data"
    request_for = _with_skip(graph, request_for, lambda name: getattr(ctx.options_for(name, opts), "residual", ""))
    changed = any(v == "rewritten" for v in ctx.outcomes.values())
    jobs = None if job_for is None else (lambda node, sample: job_for(node, sample, ctx.options_for(node.name, opts)))
    sample = sampler.get(graph, layer, data, request_for, wants, changed, jobs, ctx.tick)
    return sample, (sampler.fit_of(layer) if job_for is not None else None)


def _with_skip(graph: gs.Graph, request_for: Callable[[gs.Node], Request | None], residual: Callable[[str], str]
               ) -> Callable[[gs.Node], Request | None]:
    """request_for, with the Add's other input as the request's skip where the layer's output
    feeds a residual Add alone and its options say residual=add."""

    def request(node: gs.Node) -> Request | None:
        req = request_for(node)
        other = add_partner(graph, node) if req is not None and residual(node.name) == "add" else None
        return req if other is None else replace(req, skip=other.name)
    return request


# A fit that took every position its calibration samples offer and still has fewer rows than
# SHORT_ROWS per input is short of data, and the report says so (the `hint` detail, a note on
# the command line). On EfficientNet-Lite0 with 32 photos this flags its four 7x7 project convs
# (1568 rows for 1152 inputs), whose output directions measured on those photos did not carry
# over to others; fitted on 64 photos its drift at ratio 0.25 fell from 0.52 to 0.42 on the
# same scored photos. Its six other layers that took every position had 2.3 rows per input or
# more. With tucker, the detector, the OCR recognizer and the sample CNN offer more positions
# than `rows`, so none of their layers is flagged, and 64 photos did not move the detector or
# the OCR recognizer. With svd, the OCR recognizer's classifier (Gemm_97, 1024 rows from 32
# photos for 1024 inputs) is flagged, and 64 photos lowered its drift 10-12% (7 Dec 2026,
# docs/tucker.md).
SHORT_ROWS = 2


def short_of_rows(sample: Sample) -> str | None:
    """The hint for a sample that took every position offered and has fewer than SHORT_ROWS rows
    per input, or None."""
    n, d = np.shape(sample.rows)
    if not d or n < sample.seen or n >= SHORT_ROWS * d:
        return None
    return (f"few calibration rows: every position of the {sample.images} calibration samples gives fewer than "
            f"{SHORT_ROWS} rows per input of the fit; more samples would fit it better (it reads up to `samples`, "
            "64 by default)")


def report(sample: Sample, out_error: float, kind: str, choice=None, through=None) -> dict:
    """fit=data report fields of one layer: the output-space error on the sampled calibration
    rows (y = W p + b per row: the figure the data-aware fit minimises, next to the weight-space
    rel_error), the sample, which fit the layer got (`fit_choice`) and, when it was chosen on
    held-out samples (a surgeon.data_fit.FitChoice), every candidate's held-out output error;
    with a refit to the clipped output (a surgeon.clipped_fit.ClippedFit), the error after the
    clip before and after it, and whether it was kept."""
    d = {"out_error": out_error, "calib_rows": len(sample.rows), "calib_inputs": int(np.shape(sample.rows)[1]),
         "calib_positions": sample.seen, "calib_samples": sample.images,
         "sequential": kind in ("sequential", "residual"), "fit_choice": kind}
    if choice is not None:
        d.update({"heldout_errors": choice.errors, "heldout_rows": choice.held_rows,
                  "heldout_samples": choice.held_samples})
    if through is not None:
        d.update({"activation": through.clip.describe(), "clipped_error_before": through.before,
                  "clipped_error": through.after, "clipped_refit": through.kept})
    hint = short_of_rows(sample)
    if hint:
        d["hint"] = hint
    return d


def conv_request(node: gs.Node, kernel: tuple[int, ...]) -> Request:
    return Request(node.name, node.inputs[0].name, ConvWindow.of(node, kernel))


def fc_request(node: gs.Node) -> Request:
    return Request(node.name, node.inputs[0].name, None)


__all__ = ["ConvWindow", "Request", "Sample", "collect", "layer_fit", "patches_at", "SequentialSampler", "sampler_for",
           "conv_request", "fc_request", "report", "short_of_rows", "SHORT_ROWS"]
