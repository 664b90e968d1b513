"""Benchmark the prune plugin: what structured pruning buys in latency, and what both kinds cost.

    python benchmarks/prune.py                     # every part
    python benchmarks/prune.py --part zoo          # ResNet-50 / VGG-19: latency, params, MACs
    python benchmarks/prune.py --part efficientnet # top-1 agreement vs ratio (docs/prune_efficientnet.png)
    python benchmarks/prune.py --part samples      # the sample CNN: accuracy and latency vs ratio
    python benchmarks/prune.py --part multiple     # which channel multiple onnxruntime's CPU convs like

1. zoo: ResNet-50 and VGG-19 from the onnx package's model zoo (surgeon/zoo.py, seeded weights,
   so only speed and size mean something), structured l1 at ratios 0.25 / 0.5 with the default
   multiple: params and MACs before/after, the MACs ratio, and onnxruntime latency of the whole
   model before/after (interleaved A/B, batch 1) with the measured speedup beside it.
2. efficientnet: /work/shared/models/efficientnet_lite0.onnx on the shared photos (first 32
   calibrate the activation criterion, the other 64 evaluate): top-1 agreement with the
   original vs ratio for magnitude (layer, and global normalized) and structured with each
   criterion, with and without mean compensation (multiple 1, so every ratio removes what it
   says), then latency of the structured models with multiple 1 and the default 16. Saves
   docs/prune_efficientnet.png. Skipped with a message when ../shared is absent.
3. samples: the sample CNN (sample_models/digits_cnn.onnx): accuracy on its test split (450
   images) and latency (batch 1 and 64) vs ratio for magnitude and structured (l1, bn, and
   activation calibrated on digits_cnn_calib.npz) with multiple 1, and l1 with the default 16.
4. multiple: one 3x3 conv (C -> C channels, 28x28) and one 1x1 conv (56x56) timed in
   onnxruntime for C = 40 .. 72: the kernels' latency steps show the channel multiple they like.

Tables are printed for 80 columns; `--json FILE` writes every row (default prune-benchmark.json).
Latency on a busy machine is noisy: rerun on an idle one for figures to publish.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import surgeon
from surgeon import zoo
from surgeon.calibration import DataSet
from surgeon.report import plot, table, write_json
from surgeon.validate import drift_metrics, latency_ab, run, session

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DOCS = ROOT / "docs"
SHARED = ROOT.parent / "shared"
console = Console(width=80)


def human(n: float) -> str:
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{s}"
    return f"{n:.0f}"


def timed(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, budget: float, threads: int) -> tuple[float, float]:
    la, lb = latency_ab(session(a, threads), session(b, threads), feed, budget_s=budget)
    return la.median_ms, lb.median_ms


# --- 1. model zoo ------------------------------------------------------------------------------

def zoo_part(budget: float, threads: int) -> list[dict]:
    rows = []
    for name in ("resnet50", "vgg19"):
        model = zoo.load(name, seed=0)
        feed = next(surgeon.synthesize(model, samples=1).batches(1))
        for ratio in (0.25, 0.5):
            t0 = time.perf_counter()
            res = surgeon.apply(model, "prune", {"method": "structured", "ratio": ratio, "criterion": "l1"})
            secs = time.perf_counter() - t0
            before, after = timed(model, res.model, feed, budget, threads)
            rows.append({"model": name, "ratio": ratio, "seconds": secs,
                         "params_before": res.before.total_params, "params_after": res.after.total_params,
                         "macs_before": res.before.total_macs, "macs_after": res.after.total_macs,
                         "ms_before": before, "ms_after": after})
            console.print(f"{name} ratio {ratio}: {before:.1f} -> {after:.1f} ms", style="dim")
    console.print(table(
        f"structured l1, batch 1, threads {threads or 'default'} (median ms, interleaved A/B)",
        ("model", "ratio", "params M", "GMACs", "MACs x", "ms", "speedup"),
        [(r["model"], f"{r['ratio']:g}", f"{r['params_before'] / 1e6:.1f}→{r['params_after'] / 1e6:.1f}",
          f"{r['macs_before'] / 1e9:.2f}→{r['macs_after'] / 1e9:.2f}", f"{r['macs_before'] / r['macs_after']:.2f}x",
          f"{r['ms_before']:.0f}→{r['ms_after']:.0f}", f"{r['ms_before'] / r['ms_after']:.2f}x") for r in rows]))
    return rows


# --- 2. EfficientNet-Lite0 on photos -----------------------------------------------------------

EFF_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5)
SETTINGS = (("magnitude", {"method": "magnitude"}),
            ("magnitude global", {"method": "magnitude", "scope": "global", "normalize": True}),  # normalized
            ("structured l1", {"method": "structured", "criterion": "l1", "compensate": "none"}),
            ("structured l2", {"method": "structured", "criterion": "l2", "compensate": "none"}),
            ("structured bn", {"method": "structured", "criterion": "bn", "compensate": "none"}),
            ("structured act.", {"method": "structured", "criterion": "activation", "compensate": "none"}),
            ("l1 + mean", {"method": "structured", "criterion": "l1", "compensate": "mean"}),
            ("act. + mean", {"method": "structured", "criterion": "activation", "compensate": "mean"}),
            ("l1 + linear", {"method": "structured", "criterion": "l1", "compensate": "linear"}),
            ("act. + linear", {"method": "structured", "criterion": "activation", "compensate": "linear"}),
            ("redundancy + linear", {"method": "structured", "criterion": "redundancy", "compensate": "linear"}))


def efficientnet_part(budget: float, threads: int) -> dict | None:
    path, photos = SHARED / "models" / "efficientnet_lite0.onnx", SHARED / "data" / "photos224.npz"
    if not path.exists() or not photos.exists():
        console.print(f"[yellow]skipped:[/] {path} or {photos} not found")
        return None
    model = surgeon.load(path)
    images = np.load(photos)["images"].astype(np.float32)
    x = ((images - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()
    calib = DataSet({"input": x[:32]}, source="photos 0-31")
    evaluate = DataSet({"input": x[32:]}, source="photos 32-95")
    ref = run(session(model, threads), evaluate)[0]
    rows, notes = [], set()
    for label, opts in SETTINGS:
        for ratio in EFF_RATIOS:
            # multiple 1: every ratio removes what it says, the same channel counts for every criterion
            res = surgeon.apply(model, "prune", {"multiple": 1, **opts, "ratio": ratio} if opts["method"] ==
                                "structured" else {**opts, "ratio": ratio}, data=calib, threads=threads)
            m = drift_metrics(ref, run(session(res.model, threads), evaluate)[0])
            rows.append({"setting": label, "ratio": ratio, "agreement": m["top1_agreement"], "rel_l2": m["rel_l2"]})
            notes.update(n.split(": ", 1)[1] for n in res.extras.get("notes", []))
            console.print(f"{label} {ratio}: agreement {m['top1_agreement']:.1%}", style="dim")
    console.print(table(
        "EfficientNet-Lite0: top-1 agreement with the original on 64 held-out photos (structured: multiple 1)",
        ("setting",) + tuple(f"r={r:g}" for r in EFF_RATIOS),
        [(label,) + tuple(f"{r['agreement']:.1%}" for r in rows if r["setting"] == label) for label, _ in SETTINGS]))
    for n in sorted(notes):
        console.print(f"note: {n}")
    speed = []
    feed = evaluate.first_batch(1)
    for ratio in EFF_RATIOS:
        for multiple in (1, 16):
            res = surgeon.apply(model, "prune", {"criterion": "l1", "ratio": ratio, "multiple": multiple})
            before, after = timed(model, res.model, feed, budget, threads)
            speed.append({"ratio": ratio, "multiple": multiple, "params_before": res.before.total_params,
                          "params_after": res.after.total_params, "macs_before": res.before.total_macs,
                          "macs_after": res.after.total_macs, "ms_before": before, "ms_after": after})
    console.print(table(
        f"EfficientNet-Lite0 structured l1, batch 1, threads {threads or 'default'} (median ms, A/B)",
        ("ratio", "multiple", "params M", "MACs x", "ms", "speedup"),
        [(f"{r['ratio']:g}", str(r["multiple"]), f"{r['params_before'] / 1e6:.2f}→{r['params_after'] / 1e6:.2f}",
          f"{r['macs_before'] / r['macs_after']:.2f}x", f"{r['ms_before']:.1f}→{r['ms_after']:.1f}",
          f"{r['ms_before'] / r['ms_after']:.2f}x") for r in speed]))
    plot(DOCS / "prune_efficientnet.png", list(EFF_RATIOS),
         {label: [r["agreement"] for r in rows if r["setting"] == label] for label, _ in SETTINGS},
         xlabel="ratio (fraction of weights / of each layer's channels removed)",
         ylabel="top-1 agreement (64 held-out photos)", title="prune on EfficientNet-Lite0, no fine-tuning")
    return {"agreement": rows, "latency": speed, "notes": sorted(notes)}


# --- 3. the sample CNN -------------------------------------------------------------------------

CNN_RATIOS = (0.125, 0.25, 0.375, 0.5)
CNN_SETTINGS = (("magnitude", {"method": "magnitude"}),
                ("structured l1", {"method": "structured", "criterion": "l1", "multiple": 1, "compensate": "none"}),
                ("l1, multiple 16", {"method": "structured", "criterion": "l1", "compensate": "none"}),
                ("structured bn", {"method": "structured", "criterion": "bn", "multiple": 1, "compensate": "none"}),
                ("structured act.", {"method": "structured", "criterion": "activation", "multiple": 1, "compensate": "none"}),
                ("linear, multiple 16", {"method": "structured", "criterion": "l1", "compensate": "linear"}))


def samples_part(budget: float, threads: int) -> list[dict]:
    model = surgeon.load(SAMPLES / "digits_cnn.onnx")
    test = surgeon.load_data(SAMPLES / "digits_cnn_test.npz", model)
    calib = surgeon.load_data(SAMPLES / "digits_cnn_calib.npz", model)
    rows = []
    for label, opts in CNN_SETTINGS:
        for ratio in CNN_RATIOS:
            res = surgeon.apply(model, "prune", {**opts, "ratio": ratio}, data=calib, threads=threads)
            v1 = surgeon.validate(model, res.model, test, latency_batch=1, budget_s=budget, threads=threads)
            v64 = surgeon.validate(model, res.model, test.take(64), latency_batch=64, budget_s=budget,
                                   threads=threads)
            rows.append({"setting": label, "ratio": ratio, "acc_before": v1.accuracy["original"],
                         "acc_after": v1.accuracy["candidate"], "params_before": res.before.total_params,
                         "params_after": res.after.total_params, "macs_before": res.before.total_macs,
                         "macs_after": res.after.total_macs,
                         "ms1_before": v1.latency["original"]["median_ms"],
                         "ms1_after": v1.latency["candidate"]["median_ms"],
                         "ms64_before": v64.latency["original"]["median_ms"],
                         "ms64_after": v64.latency["candidate"]["median_ms"],
                         "zipped": res.extras.get("zipped_bytes")})
            console.print(f"{label} {ratio}: {v1.accuracy['candidate']:.2%}", style="dim")
    console.print(table(
        f"digits CNN, 450 test images (accuracy {rows[0]['acc_before']:.2%} before), median ms",
        ("setting", "ratio", "accuracy", "MACs", "ms b=1", "ms b=64"),
        [(r["setting"], f"{r['ratio']:g}", f"{r['acc_after']:.2%}", human(r["macs_after"]),
          f"{r['ms1_before']:.3f}→{r['ms1_after']:.3f}", f"{r['ms64_before']:.1f}→{r['ms64_after']:.1f}")
         for r in rows]))
    return rows


# --- 4. channel multiple -----------------------------------------------------------------------

def conv_model(c: int, k: int, hw: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((c, c, k, k)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], pads=[k // 2] * 4)
    g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def multiple_part(rounds: int, threads: int) -> list[dict]:
    """Round-robin over channel counts, so machine noise hits every count alike."""
    rows = []
    counts = list(range(40, 73, 2))
    for k, hw in ((3, 28), (1, 56)):
        sess = {c: session(conv_model(c, k, hw), threads or 1) for c in counts}
        feeds = {c: {"x": np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)}
                 for c in counts}
        times: dict[int, list[float]] = {c: [] for c in counts}
        for c in counts:
            for _ in range(3):
                sess[c].run(None, feeds[c])
        for _ in range(rounds):
            for c in counts:
                t0 = time.perf_counter()
                sess[c].run(None, feeds[c])
                times[c].append(time.perf_counter() - t0)
        for c in counts:
            ms = float(np.median(times[c]) * 1e3)
            rows.append({"kernel": k, "hw": hw, "channels": c, "ms": ms, "ns_per_mac": ms * 1e6 / (c * c * k * k * hw * hw)})
    console.print(table(
        f"one conv C->C, batch 1, {threads or 1} thread(s): median ms ({rounds} rounds)",
        ("C", "3x3 @28 ms", "ps/MAC", "1x1 @56 ms", "ps/MAC"),
        [(str(c), f"{a['ms']:.3f}", f"{a['ns_per_mac'] * 1e3:.1f}", f"{b['ms']:.3f}", f"{b['ns_per_mac'] * 1e3:.1f}")
         for c, a, b in zip(counts, [r for r in rows if r["kernel"] == 3], [r for r in rows if r["kernel"] == 1])]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "zoo", "efficientnet", "samples", "multiple"), default="all")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of A/B timing per comparison")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: onnxruntime's default)")
    ap.add_argument("--rounds", type=int, default=30, help="timing rounds per channel count (--part multiple)")
    ap.add_argument("--json", type=Path, default=Path("prune-benchmark.json"), help="write every row here")
    args = ap.parse_args()
    out: dict = {"threads": args.threads or "default", "budget_s": args.budget}
    if args.part in ("all", "multiple"):
        out["multiple"] = multiple_part(args.rounds, args.threads)
    if args.part in ("all", "zoo"):
        out["zoo"] = zoo_part(args.budget, args.threads)
    if args.part in ("all", "samples"):
        out["samples"] = samples_part(args.budget, args.threads)
    if args.part in ("all", "efficientnet"):
        out["efficientnet"] = efficientnet_part(args.budget, args.threads)
    write_json(args.json, out)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
