"""Plugin `prune`: magnitude (unstructured) and structured (channel) pruning.

magnitude: W[|W| <= t] = 0, with t the k-th smallest |w|, k = round(ratio * n), per weight
(`scope=layer`) or over all selected weights at once (`scope=global`; with `normalize`, each
weight is compared as |w| / rms(W), so that layers of different scales lose similar shares).
The model keeps its shapes: dense kernels run no faster, only the zipped file shrinks.

structured: whole output channels of Conv / ConvTranspose and neurons of Gemm / MatMul are
removed with everything that depended on them (surgeon/channel_groups.py builds the dependency
groups). Per group of coupled layers, each channel ("slot") gets a score and the lowest go:

* l1: sum over the group's layers of sum |W[j]|; l2: sqrt(sum over the group of sum W[j]^2)
  (W[j] is the slice that produces channel j, depthwise convs included);
* bn: sum of |gamma[j]| of the BatchNormalization after each layer (network slimming); groups
  without one (BN folded) fall back to l2, and the report says so;
* activation: the calibration data is run through the model and, at every tensor where the
  channel is consumed, APoZ = P(x == 0) and the mean |x| are measured; the score is the mean
  |x| (a channel that never activates scores 0 and goes first), APoZ is reported beside it.

How many go: `ratio` of a group's channels (per-layer ratios from a recipe or plan override;
a group takes the smallest ratio of its layers), never below `min_channels`, and the count
kept is rounded up to a multiple of `multiple`. `threshold=outliers` removes instead the
channels scoring below mean - 2 std of their group; `threshold=dead` only those whose
activation was exactly zero on every calibration sample (removing those changes no output).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgeon.calibration import synthesize
from surgeon.channel_groups import Analysis, Group, analyze
from surgeon.channel_removal import PREDICTION_DAMP, head_of, prune_channels, weight_out_axis
from surgeon.data_factors import regularised
from surgeon.model import to_graph, to_model
from surgeon.plugin import Context, LayerReport, ModelPlugin
from surgeon.rewrite import constant_value, not_constant
from surgeon.validate import stream_tensors

log = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# onnxruntime's CPU conv (MLAS NCHWc) blocks channels by 16 on AVX-512 machines; measured in
# docs/prune.md: conv latency steps at multiples of 16, so 16 is the default.
DEFAULT_MULTIPLE = 16
DENSE_NOTE = ("magnitude pruning only writes zeros into dense weights: onnxruntime's dense kernels run "
              "no faster with them (the validation's latency shows it); the file zips smaller")


@dataclass
class PruneOptions:
    method: Literal["structured", "magnitude"] = field(default="structured", metadata={
        "help": "structured removes whole channels (smaller and faster); magnitude zeroes small weights "
                "(zips smaller, runs no faster)"})
    ratio: float = field(default=0.25, metadata={
        "help": "fraction of weights (magnitude) or of each group's channels (structured) to remove, 0 <= r < 1"})
    scope: Literal["layer", "global"] = field(default="layer", metadata={
        "help": "magnitude: the ratio per weight, or over all selected weights at once"})
    normalize: bool = field(default=False, metadata={
        "help": "magnitude, scope=global: compare |w| / rms(W) so every layer is on one scale"})
    # auto (6 Dec 2026): redundancy beat activation and l1 (both compensated) on the sample CNN,
    # EfficientNet-Lite0, the detector and the OCR recognizer at every ratio tried (docs/prune.md)
    criterion: Literal["auto", "l1", "l2", "bn", "activation", "redundancy"] = field(default="auto", metadata={
        "help": "structured: channel score (weight L1/L2 norm, BN |gamma|, activation on the calibration data, "
                "or redundancy: the output energy the next layers lose when the channel alone goes and is "
                "predicted from the others on the calibration data); auto is redundancy when removed "
                "channels are predicted (compensate linear), l1 otherwise"})
    threshold: Literal["ratio", "outliers", "dead"] = field(default="ratio", metadata={
        "help": "structured: remove the ratio, or channels below mean - 2 std of their group, or only "
                "never-activating ones (needs criterion=activation)"})
    min_channels: int = field(default=1, metadata={"help": "structured: channels every group keeps at least"})
    multiple: int = field(default=DEFAULT_MULTIPLE, metadata={
        "help": "structured: keep channel counts at a multiple of this (16 measured fastest for onnxruntime "
                "CPU convs here; 1 disables)"})
    # auto (6 Dec 2026): with calibration data, linear took the sample CNN at ratio 0.5 from 18.7% to
    # 98.9% accuracy, EfficientNet-Lite0 at 0.1 from 0% to 70% agreement, the detector's drift at
    # 0.1 from 0.18 to 0.033 and the OCR recognizer's at 0.3 from 0.58 to 0.20 (docs/prune.md)
    compensate: Literal["auto", "none", "mean", "linear"] = field(default="auto", metadata={
        "help": "structured: what replaces each removed channel where the next layer reads it: 'linear' its "
                "least-squares prediction from the kept channels on the calibration data (folded into the "
                "next layer's weights and bias), 'mean' its mean (folded into the bias), 'none' zero (pruned "
                "== masked exactly); 'auto' is linear with real --data/--calib, none without"})
    samples: int = field(default=64, metadata={"help": "activation / compensate: calibration samples to run at most"})
    batch: int = field(default=8, metadata={"help": "activation / compensate: batch size for the calibration run"})

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (got {self.ratio})")
        for name, lo, hi in (("min_channels", 1, 1 << 20), ("multiple", 1, 4096), ("samples", 1, 1 << 20),
                             ("batch", 1, 4096)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}] (got {v})")
        if self.threshold == "dead" and self.criterion != "activation":
            raise ValueError("threshold=dead needs criterion=activation (dead means never activated on the data)")
        if self.method == "magnitude" and (self.threshold != "ratio" or self.criterion not in ("l1", "auto")
                                           or self.compensate not in ("none", "auto")):
            raise ValueError("criterion, threshold and compensate apply to method=structured only")


class Prune(ModelPlugin):
    """Zeroes small weights (magnitude) or removes whole channels and what depends on them (structured)."""

    name = "prune"
    summary = "magnitude pruning (zeros) or structured channel pruning (smaller, faster) with dependency groups"
    Options = PruneOptions

    def uses_data(self, opts: PruneOptions) -> bool:
        """Only the activation statistics look at the data (the activation criterion, threshold=dead,
        compensation: by default, with data, linear); magnitude and an uncompensated weight criterion
        do not."""
        return opts.method == "structured" and (opts.criterion in ("activation", "redundancy")
                                                or opts.threshold == "dead" or opts.compensate != "none")

    def compensation(self, opts: "PruneOptions", ctx: Context) -> tuple[str, str]:
        """(none | mean | linear, why none when auto found no real calibration data)."""
        if opts.compensate != "auto":
            return opts.compensate, ""
        if ctx.data is None or getattr(ctx.data, "synthetic", False) or len(ctx.data) == 0:
            return "none", "no calibration data: pass --data or --calib to predict removed channels from it"
        return "linear", ""

    def run(self, model: onnx.ModelProto, ctx: Context, opts: PruneOptions,
            layers: Callable[[str], bool]) -> tuple[onnx.ModelProto, list[LayerReport], dict[str, Any]]:
        if opts.method == "magnitude":
            return magnitude(model, ctx, opts, layers)
        compensate, why = self.compensation(opts, ctx)
        # the redundancy score is the loss under linear compensation: without it, l1
        criterion = opts.criterion if opts.criterion != "auto" else "redundancy" if compensate == "linear" else "l1"
        out, reports, extras = structured(model, ctx, dataclasses.replace(opts, compensate=compensate,
                                                                          criterion=criterion), layers,
                                          {"compensate": compensate + (f" ({why})" if why else "")})
        # what the defaults chose depends on the data given: say so where the user reads
        if opts.compensate == "auto" and compensate == "linear":
            extras.setdefault("notes", []).append(
                "removed channels are replaced by their prediction from the kept ones on the calibration data "
                "(compensate=auto)" + ("; channels chosen by how well the others predict them (criterion=auto: "
                                       "redundancy)" if opts.criterion == "auto" else ""))
        elif opts.compensate == "auto":
            extras.setdefault("notes", []).append("removed channels are zeros (no calibration data: pass --data or "
                                                  "--calib to predict them from the kept ones)")
        return out, reports, extras


def _wanted(ctx: Context, layers: Callable[[str], bool], name: str) -> str:
    """Why a layer is left alone by the user's choice, or '' when it is selected."""
    if name in ctx.skip_layers:
        return "left alone by the recipe"
    if not layers(name):
        return "not matched by --layers (or the step's select)"
    return ""


# --- magnitude ----------------------------------------------------------------------------------

def zipped_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model in a deflated zip (fixed timestamp: the same model, the same size)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        z.writestr(zipfile.ZipInfo("model.onnx", date_time=(1980, 1, 1, 0, 0, 0)),
                   model.SerializeToString(deterministic=True), compress_type=zipfile.ZIP_DEFLATED)
    return len(buf.getvalue())


def _weight_index(node: gs.Node) -> int | None:
    if node.op == "MatMul":
        for i in (1, 0):
            if constant_value(node.inputs[i]) is not None and node.inputs[1 - i].name:
                return i
        return None
    return 1 if len(node.inputs) > 1 and constant_value(node.inputs[1]) is not None else None


def magnitude(model, ctx: Context, opts: PruneOptions, layers):
    graph = to_graph(model)
    reports: list[LayerReport] = []
    weights: dict[str, tuple[gs.Constant, list[gs.Node], Any]] = {}  # a tied weight is pruned once
    for node in graph.nodes:
        if node.op not in WEIGHTED:
            continue
        idx = _weight_index(node)
        why = _wanted(ctx, layers, node.name)
        if idx is None:
            reports.append(LayerReport(node.name, node.op, "skipped",
                                       not_constant(node.inputs[1] if len(node.inputs) > 1 else None)))
            continue
        t = node.inputs[idx]
        if not np.issubdtype(np.asarray(t.values).dtype, np.floating):
            why = why or f"weight is {np.asarray(t.values).dtype}, not float"
        if why:
            reports.append(LayerReport(node.name, node.op, "skipped", why))
            continue
        if t.name in weights:
            weights[t.name][1].append(node)
        else:
            weights[t.name] = (t, [node], ctx.options_for(node.name, opts))
    # which |w| fall: per weight, or by one threshold over the pool
    masks: dict[str, np.ndarray] = {}
    pool = [(name, t) for name, (t, users, o) in weights.items()
            if opts.scope == "global" and o is opts]
    for name, (t, users, o) in weights.items():
        if not (opts.scope == "global" and o is opts):
            masks[name] = _smallest(np.abs(np.asarray(t.values, np.float64)).ravel(), o.ratio)
    if pool:
        mags = []
        for _, t in pool:
            w = np.abs(np.asarray(t.values, np.float64)).ravel()
            if opts.normalize:
                rms = math.sqrt(float(np.mean(w * w))) or 1.0
                w = w / rms
            mags.append(w)
        allmask = _smallest(np.concatenate(mags), opts.ratio)
        start = 0
        for (name, _), m in zip(pool, mags):
            masks[name] = allmask[start:start + m.size]
            start += m.size
    total = zeros = 0
    for name, (t, users, o) in weights.items():
        w = np.array(t.values)
        before = int(np.count_nonzero(w))
        w.ravel()[masks[name]] = 0
        t.values = w
        after = int(np.count_nonzero(w))
        total += w.size
        zeros += w.size - after
        for node in users:
            details = {"sparsity": round(1 - after / w.size, 6), "params_before": before, "params_after": after}
            if len(users) > 1:
                details["tied_with"] = [u.name for u in users if u is not node]
            reports.append(LayerReport(node.name, node.op, "rewritten", "", details))
    out = to_model(graph, like=model)
    zb, za = zipped_size(model), zipped_size(out)
    extras = {"method": "magnitude", "scope": opts.scope, "sparsity": zeros / total if total else 0.0,
              "zipped_bytes": {"before": zb, "after": za},
              "note": DENSE_NOTE,
              "warnings": [f"{DENSE_NOTE}: zipped {zb / 2**20:.2f} MiB -> {za / 2**20:.2f} MiB, "
                           f"{zeros / max(total, 1):.1%} of the pruned weights are zero"]}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    reports.sort(key=lambda r: order.get(r.layer, 1 << 30))
    return out, reports, extras


def _smallest(mag: np.ndarray, ratio: float) -> np.ndarray:
    """Boolean mask of the round(ratio * n) smallest entries (ties by position: deterministic)."""
    k = int(round(ratio * mag.size))
    mask = np.zeros(mag.size, bool)
    if k:
        mask[np.argsort(mag, kind="stable")[:k]] = True
    return mask


# --- structured ---------------------------------------------------------------------------------

@dataclass
class SlotScores:
    score: dict[int, float]
    apoz: dict[int, float] | None = None
    note: str = ""


def structured(model, ctx: Context, opts: PruneOptions, layers, info: dict | None = None):
    graph = to_graph(model)
    an = analyze(graph, ctx.shapes)
    extras: dict[str, Any] = {"method": "structured", "criterion": opts.criterion, "threshold": opts.threshold,
                              **(info or {"compensate": opts.compensate}), "groups": len(an.groups),
                              "warnings": [], "notes": []}
    reports: list[LayerReport] = [LayerReport(n, op, "skipped", why) for n, op, why in an.untraced]
    chosen: dict[int, Group] = {}
    left_alone: dict[str, str] = {}  # member -> why its group was not pruned by the user's choice
    for g in an.groups:
        why = next((w for w in (_wanted(ctx, layers, n) for n in g.layers) if w), "")
        if why:
            for m in g.members:
                left_alone[m.name] = why if len(g.members) == 1 else f"group of {g.name}: {why}"
            continue
        chosen[id(g)] = g
    acts = activation_stats(model, an, ctx, opts, extras) if opts.criterion in ("activation", "redundancy") or \
        opts.threshold == "dead" or opts.compensate != "none" else None
    removed: set[int] = set()
    group_info: dict[int, dict[str, Any]] = {}
    for g in an.groups:
        if id(g) not in chosen:
            continue
        if len(g.fixed) == len(g.slots):  # nothing to choose from: not scored
            group_info[id(g)] = {"group": g.name, "channels_before": len(g.slots), "channels_after": len(g.slots),
                                 "fixed": len(g.fixed), "fixed_reason": next(iter(g.fixed.values())), "ratio": None}
            continue
        sc = score_group(g, an, opts, acts)
        if sc.note:
            extras["notes"].append(f"{g.name}: {sc.note}")
        o = [ctx.options_for(n, opts) for n in g.layers] or [opts]
        ratio = min(x.ratio for x in o)
        floor = max(x.min_channels for x in o)
        mult = o[0].multiple
        gone = select(g, an, sc, ratio, floor, mult, opts.threshold)
        removed |= gone
        group_info[id(g)] = {"group": g.name, "channels_before": len(g.slots),
                             "channels_after": len(g.slots) - len(gone), "ratio": ratio,
                             "fixed": len(g.fixed)}
        if g.fixed:
            group_info[id(g)]["fixed_reason"] = next(iter(g.fixed.values()))
        if sc.apoz is not None:
            group_info[id(g)]["apoz_removed"] = (float(np.mean([sc.apoz[s] for s in gone])) if gone else None)
    before = {m.name: _params(m.node) for m in an.members}
    removed_channels = {m.name: [j for j, a in enumerate(m.atoms) if an.find(a) in removed] for m in an.members}
    fill = acts["mean"] if opts.compensate != "none" else None
    linear = acts["cov"] if opts.compensate == "linear" else None
    unfilled = prune_channels(graph, an, removed, ctx.opset, fill, linear)
    if unfilled:
        extras["notes"].append("removed channels read by " + ", ".join(sorted(set(unfilled))) +
                               " were not compensated (ConvTranspose): they are zero there")
    if linear is not None:
        wide = sorted({c.node.name for c in an.cuts if c.kind == "in" and c.extra.get("tensor") in fill
                       and c.extra["tensor"] not in linear})
        if wide:
            extras["notes"].append(f"more than {LINEAR_MAX} channel positions: removed channels read by "
                                   + ", ".join(wide) + " were replaced by their mean, not predicted")
    for g in an.groups:
        info = group_info.get(id(g), {"group": g.name})
        for m in g.members:
            after = _params(m.node)
            d = {**info, "params_before": before[m.name], "params_after": after,
                 "channels": f"{len(m.atoms)}→{len(m.atoms) - len(removed_channels[m.name])}",
                 "removed_channels": removed_channels[m.name]}
            if m.kind == "depthwise":
                d["follows"] = "its input (depthwise)"
            if m.name in left_alone:
                if after != before[m.name]:  # its outputs stay, but it reads fewer channels
                    d["inputs_only"] = left_alone[m.name]
                    reports.append(LayerReport(m.name, m.node.op, "rewritten", "", d))
                else:
                    reports.append(LayerReport(m.name, m.node.op, "skipped", left_alone[m.name]))
            elif after != before[m.name]:
                reports.append(LayerReport(m.name, m.node.op, "rewritten", "", d))
            elif len(g.fixed) == len(g.slots):
                reports.append(LayerReport(m.name, m.node.op, "skipped", f"channels fixed: {info['fixed_reason']}", d))
            else:
                reports.append(LayerReport(m.name, m.node.op, "skipped",
                                           _kept_reason(info, opts, ratio=info["ratio"]), d))
    out = to_model(graph, like=model)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    reports.sort(key=lambda r: order.get(r.layer, 1 << 30))
    extras["channels_removed"] = len(removed)
    if not extras["warnings"]:
        del extras["warnings"]
    if not extras["notes"]:
        del extras["notes"]
    return out, reports, extras


def _kept_reason(info: dict, opts: PruneOptions, ratio: float) -> str:
    if opts.threshold == "dead":
        return "no channel was dead on the calibration data"
    if opts.threshold == "outliers":
        return "no channel scored below mean - 2 std"
    if ratio == 0:
        return "ratio 0"
    return (f"nothing to remove: {info['channels_before']} channels ({info['fixed']} fixed) at ratio {ratio}, "
            f"min_channels {opts.min_channels}, multiple {opts.multiple}")


def _params(node: gs.Node) -> int:
    return int(sum(np.asarray(t.values).size for t in node.inputs if isinstance(t, gs.Constant)))


def select(g: Group, an: Analysis, sc: SlotScores, ratio: float, floor: int, multiple: int,
           threshold: str) -> set[int]:
    """The slots of `g` to remove: lowest scores first, never fixed ones, keeping at least
    `floor`, the count kept a multiple of `multiple` (rounded up), no Split part emptied."""
    n = len(g.slots)
    position = {s: i for i, s in enumerate(g.slots)}
    free = [s for s in g.slots if s not in g.fixed]
    order = sorted(free, key=lambda s: (sc.score[s], position[s]))
    if threshold == "ratio":
        want = int(math.floor(ratio * n + 1e-9))
    elif threshold == "outliers":
        vals = np.array([sc.score[s] for s in g.slots])
        vals = vals[np.isfinite(vals)]
        cut = vals.mean() - 2 * vals.std()
        order = [s for s in order if sc.score[s] < cut]
        want = len(order)
    else:  # dead: never non-zero on the calibration data
        order = [s for s in order if sc.apoz is not None and sc.apoz[s] == 1.0]
        want = len(order)
    keep = max(n - want, floor, 1)
    if multiple > 1:
        keep = min(n, -(-keep // multiple) * multiple)
    want = min(n - keep, len(order))
    # every member, Split part and Slice range keeps at least one channel
    segs = [Counter(seg) for seg in an.segments if not position.keys().isdisjoint(seg)]
    left = [sum(c.values()) for c in segs]
    gone: set[int] = set()
    for s in order:
        if len(gone) >= want:
            break
        hits = [i for i, c in enumerate(segs) if s in c]
        if any(left[i] - segs[i][s] < 1 for i in hits):
            continue
        for i in hits:
            left[i] -= segs[i][s]
        gone.add(s)
    return gone


def score_group(g: Group, an: Analysis, opts: PruneOptions, acts: dict | None) -> SlotScores:
    find = an.find
    if opts.criterion == "redundancy":
        return SlotScores(_unpredicted_energy(g, an, acts))
    if opts.criterion == "activation" or opts.threshold == "dead":
        zeros, absum, count = acts["zeros"], acts["abs"], acts["count"]
        score, apoz = {}, {}
        for s in g.slots:
            c = count.get(s, 0)
            if c == 0:  # never consumed where we measure (all its consumers fixed it): keep it last
                score[s], apoz[s] = math.inf, 0.0
            else:
                score[s], apoz[s] = absum[s] / c, zeros[s] / c
        if opts.criterion == "activation":
            return SlotScores(score, apoz)
        base = score_group(g, an, PruneOptions(criterion=opts.criterion), None)
        return SlotScores(base.score, apoz, base.note)
    if opts.criterion == "bn":
        gammas = {}
        ok = True
        for m in g.members:
            bn = next((h for h in head_of(m.node, an.graph) if h.op == "BatchNormalization"), None)
            if bn is None:
                ok = False
                break
            gam = np.abs(np.asarray(constant_value(bn.inputs[1]), np.float64))
            for j, a in enumerate(m.atoms):
                gammas[find(a)] = gammas.get(find(a), 0.0) + float(gam[j])
        if ok:
            return SlotScores(gammas)
        sc = score_group(g, an, PruneOptions(criterion="l2"), None)
        sc.note = "no BatchNormalization after every layer of the group (folded?): scored by l2 instead"
        return sc
    p = 1 if opts.criterion == "l1" else 2
    score: dict[int, float] = {s: 0.0 for s in g.slots}
    for m in g.members:
        w = np.asarray(constant_value(m.node.inputs[1]), np.float64)
        w = np.moveaxis(w, weight_out_axis(m), 0).reshape(len(m.atoms), -1)
        norms = np.sum(np.abs(w) ** p, axis=1)
        for j, a in enumerate(m.atoms):
            score[find(a)] += float(norms[j])
    if p == 2:
        score = {s: math.sqrt(v) for s, v in score.items()}
    return SlotScores(score)


def _unpredicted_energy(g: Group, an: Analysis, acts: dict) -> dict[int, float]:
    """Per slot: what its consumers would lose if it alone went and were predicted from every
    other channel of its tensor (compensate=linear), summed over consumers: Var(x_j | x_rest)
    ||W[:, j]||^2 with Var(x_j | rest) = 1 / (S^-1)_jj (S the covariance, ridged like
    linear_prediction's). A tensor too wide for its covariance (LINEAR_MAX) counts the channel's
    plain variance (as if nothing predicted it); a slot no consumer reads where we measure goes
    last. One at a time: two channels that predict each other both score low."""
    find = an.find
    score: dict[int, float] = {s: 0.0 for s in g.slots}
    slots, measured = set(g.slots), set()
    for cut in an.cuts:
        if cut.kind != "in" or not any(find(a) in slots for a in cut.atoms):
            continue
        t = cut.extra.get("tensor")
        if t not in acts["variance"]:
            continue
        condvar = _conditional_variance(acts, t)
        w = np.moveaxis(np.asarray(constant_value(cut.node.inputs[1]), np.float64), cut.axis, 0)
        energy = np.sum(w.reshape(len(w), -1) ** 2, axis=1)
        for p, a in enumerate(cut.atoms):
            if find(a) in slots:
                score[find(a)] += float(condvar[p] * energy[p])
                measured.add(find(a))
    return {s: v if s in measured else math.inf for s, v in score.items()}


def _conditional_variance(acts: dict, t: str) -> np.ndarray:
    """Var(x_j | every other channel of tensor t) = 1 / (S^-1)_jj (S ridged like
    linear_prediction's), or the plain variance when t was too wide for S; computed once per
    tensor (several groups' channels meet in a Concat or an Add) and kept with the statistics."""
    done = acts.setdefault("conditional_variance", {})
    if t not in done:
        done[t] = 1.0 / np.diag(np.linalg.inv(regularised(acts["cov"][t], PREDICTION_DAMP))) if t in acts["cov"] \
            else acts["variance"][t]
    return done[t]


# compensate=linear keeps a channels x channels covariance per consumed tensor: up to this
# many channel positions (a Gemm after a Flatten of a large map would need gigabytes)
LINEAR_MAX = 4096


def activation_stats(model: onnx.ModelProto, an: Analysis, ctx: Context, opts: PruneOptions,
                     extras: dict) -> dict[str, dict[int, float]]:
    """Per slot, over the calibration data at every tensor where the slot is consumed: the number
    of zero values, the sum of |x|, and the number of values looked at."""
    data = ctx.data
    if data is None or data.synthetic:
        if data is None:
            data = synthesize(model, samples=min(opts.samples, 32), seed=ctx.seed)
        msg = ("activation statistics come from SYNTHESIZED random inputs: pass real calibration data "
               "with --calib or --data for a meaningful activation criterion or compensation")
        log.warning("prune: %s", msg)  # as the report's warnings will say it: the CLI shows it once
        extras["warnings"].append(msg)
    if len(data) > opts.samples:
        data = data.take(opts.samples)
    extras["activation_samples"] = len(data)
    extras["activation_data"] = data.source
    global _last_stats
    key = _stats_key(model, an, data, opts, ctx.threads)
    if _last_stats is not None and _last_stats[0] == key:
        return _last_stats[1]
    stats = _activation_stats(model, an, data, opts, ctx.threads, ctx.tick)
    size = sum(v.nbytes for v in stats["cov"].values()) + sum(v.nbytes for v in stats["mean"].values())
    _last_stats = (key, stats) if size <= STATS_CACHE_BYTES else None
    return stats


# The statistics depend on the model, the data and these options, not on what gets pruned: a
# plan or sweep that prunes one model many ways reads them once (the last ones are kept, when
# they take at most STATS_CACHE_BYTES; compensate=linear made each evaluation run them).
STATS_CACHE_BYTES = 1 << 30
_last_stats: tuple | None = None


def _stats_key(model: onnx.ModelProto, an: Analysis, data, opts: PruneOptions, threads: int) -> tuple:
    digest = hashlib.sha1(model.SerializeToString(deterministic=True))
    for name in sorted(data.inputs):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(data.inputs[name]).tobytes())
    return (digest.hexdigest(), tuple(sorted(an.sinks.items())), tuple(sorted(an.sink_axes.items())), len(data),
            opts.batch, _covariances(opts), threads)


def _covariances(opts: PruneOptions) -> bool:
    """Whether the statistics need each consumed tensor's channel covariance."""
    return opts.compensate == "linear" or opts.criterion == "redundancy"


def _activation_stats(model: onnx.ModelProto, an: Analysis, data, opts: PruneOptions, threads: int,
                      tick=lambda done, total, what: None) -> dict:
    zeros: dict[int, float] = {}
    absum: dict[int, float] = {}
    count: dict[int, float] = {}
    sums: dict[str, np.ndarray] = {}  # per tensor and channel position: sum of x, for the mean
    # compensate=linear: sum of (x - s)(x - s)^T over the positions, s the first batch's mean (a
    # shift, so that the covariance is not the difference of two large numbers), float32 products
    # summed in float64 (a float64 copy of a 224x224 activation batch cost VGG-19 a gigabyte)
    shift: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    shifted: dict[str, np.ndarray] = {}  # sum of x - s
    diag: dict[str, np.ndarray] = {}  # sum of x^2 per channel position, of tensors too wide for S
    seen: dict[str, int] = {}
    names = list(an.sinks)
    covariances = _covariances(opts)
    batches = sum(1 for _ in data.batches(opts.batch))  # a fixed-batch model's data comes one by one
    tick(0, batches, "activation statistics")  # the detector's took 10 s with nothing on the screen
    for i, batch in enumerate(stream_tensors(model, names, data, batch=opts.batch, threads=threads)):
        for name in names:
            x = batch[name]
            axis = x.ndim + an.sink_axes[name]
            xm = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            z = np.count_nonzero(xm == 0, axis=1)
            a = np.abs(xm, dtype=np.float64).sum(axis=1)
            sums[name] = sums.get(name, 0.0) + xm.sum(axis=1, dtype=np.float64)
            if covariances and len(xm) > LINEAR_MAX:  # too wide for S: its diagonal only
                diag[name] = diag.get(name, 0.0) + np.square(xm).sum(axis=1, dtype=np.float64)
            elif covariances:
                if name not in shift:
                    shift[name] = xm.mean(axis=1, dtype=np.float64).astype(np.float32)
                xs = xm - shift[name][:, None]
                squares[name] = squares.get(name, 0.0) + (xs @ xs.T).astype(np.float64)
                shifted[name] = shifted.get(name, 0.0) + xs.sum(axis=1, dtype=np.float64)
            seen[name] = seen.get(name, 0) + xm.shape[1]
            for p, s in enumerate(an.sinks[name]):
                zeros[s] = zeros.get(s, 0.0) + float(z[p])
                absum[s] = absum.get(s, 0.0) + float(a[p])
                count[s] = count.get(s, 0.0) + xm.shape[1]
        tick(i + 1, batches, "activation statistics")
    # the mean of each channel position over the samples and the tensor's other axes
    mean = {name: sums[name] / seen[name] for name in names if seen.get(name)}
    # the covariance from the shifted sums: E[(x-s)(x-s)^T] - d d^T with d = E[x - s]
    cov, variance = {}, {}
    for name in squares:
        d = shifted[name] / seen[name]
        cov[name] = squares[name] / seen[name] - np.outer(d, d)
        variance[name] = np.diag(cov[name]).copy()
    for name in diag:
        variance[name] = np.maximum(diag[name] / seen[name] - mean[name] ** 2, 0.0)
    return {"zeros": zeros, "abs": absum, "count": count, "mean": mean, "cov": cov, "variance": variance}


PLUGINS = [Prune]
