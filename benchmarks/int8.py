"""int8 on real networks, one run, same data: fp32, onnxruntime's plain quantize_static,
NNCF's nncf.quantize (when installed) and surgeon's int8 defaults.

    python benchmarks/int8.py [--networks eff,det] [--option key=value ...] [--json out.json]

Models and photos come from ../shared: EfficientNet-Lite0 (photos as (p - 127) / 128 RGB) and the
ddddocr detector (photos resized to 416, BGR, raw pixels). The first 32 photos calibrate every
quantizer; drift and top-1 agreement (classifier only) are measured against fp32 on the other 64,
which no quantizer saw. Latency: each model timed interleaved with plain quantize_static's at
batch 1 and 8 (the detector has a static batch of 1). Quantization time is wall clock.

On a CPU whose u8 x s8 kernels saturate (x86 without VNNI; surgeon's probe decides, see
docs/int8.md) plain quantize_static's 8-bit weights give wrong integers, and onnxruntime's own
documentation advises `reduce_range=True` there: that run is added as a second baseline, so the
comparison is with what a careful user of onnxruntime alone would get.

NNCF is an optional extra (pip install 'surgeon[bench]', or a separate interpreter given with
--nncf-python, e.g. /work/venv-nncf/bin/python): it runs in a subprocess of that interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import surgeon
from surgeon.calibration import DataSet
from surgeon.validate import drift_metrics, latency_ab, median_interval, run, session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "efficientnet_lite0.onnx"
DETECTOR = SHARED / "models" / "ddddocr_det.onnx"
PHOTOS = SHARED / "data" / "photos224.npz"
NNCF_WORKER = """
import sys, numpy as np, onnx, nncf
model = onnx.load(sys.argv[1]); data = np.load(sys.argv[2]); name = sys.argv[4]; b = int(sys.argv[5])
ds = nncf.Dataset([{name: data[i:i + b]} for i in range(0, len(data), b)])
onnx.save(nncf.quantize(model, ds, subset_size=len(data)), sys.argv[3])
"""


def network(which: str) -> tuple[Path, str, np.ndarray, int | None]:
    """Model path, input name, the 96 photos preprocessed for it, static batch (or None)."""
    images = np.load(PHOTOS)["images"]
    if which == "eff":
        return MODEL, "input", ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy(), None
    from PIL import Image
    x = np.stack([np.asarray(Image.fromarray(im).resize((416, 416), Image.BILINEAR))[..., ::-1] for im in images])
    return DETECTOR, "images", x.astype(np.float32).transpose(0, 3, 1, 2).copy(), 1


def nncf_quantize(python: str, model_path: Path, calib: np.ndarray, name: str, batch: int) -> onnx.ModelProto | str:
    """nncf.quantize (ONNX backend, defaults) in `python`; a string says why it did not run."""
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "calib.npy", calib)
        out = Path(tmp) / "nncf.onnx"
        proc = subprocess.run([python, "-c", NNCF_WORKER, str(model_path), str(Path(tmp) / "calib.npy"), str(out),
                               name, str(batch)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return "nncf not installed: pip install 'surgeon[bench]'" if "No module named 'nncf'" in last else last
        return onnx.load(str(out))


def plain_quantize(model_path: Path, calib: np.ndarray, name: str = "input", batch: int = 8,
                   reduce_range: bool = False) -> onnx.ModelProto:
    """What a user gets from onnxruntime alone: pre-process, then QDQ per-channel U8S8 MinMax
    (with 7-bit weights when `reduce_range`).
    A model below opset 13 is first converted to 13 (onnx.version_converter), as surgeon does:
    onnxruntime writes per-channel DequantizeLinear(axis) either way, which opset 11 rejects."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = [{name: calib[i:i + batch]} for i in range(0, len(calib), batch)]

        def get_next(self):
            return self.batches.pop(0) if self.batches else None

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "plain.onnx"
        src = onnx.load(str(model_path))
        if next(o.version for o in src.opset_import if o.domain in ("", "ai.onnx")) < 13:
            model_path = Path(tmp) / "opset13.onnx"
            onnx.save(onnx.version_converter.convert_version(src, 13), str(model_path))
        quant_pre_process(str(model_path), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
        return onnx.load(str(out))


def bench(which: str, args, options: dict, console: Console) -> dict:
    path, name, x, static = network(which)
    calib, held = x[:32], x[32:]
    batch = static or 8
    fp32 = surgeon.load(path)
    models, seconds, notes = {}, {}, {}
    t0 = time.perf_counter()
    models["plain"] = plain_quantize(path, calib, name, batch)
    seconds["plain"] = time.perf_counter() - t0
    from surgeon.plugins.int8_ort import products_saturate
    if products_saturate("U8", "S8"):
        t0 = time.perf_counter()
        models["plain_rr"] = plain_quantize(path, calib, name, batch, reduce_range=True)
        seconds["plain_rr"] = time.perf_counter() - t0
        notes["plain_rr"] = "this CPU saturates u8 x s8 products: quantize_static also run with reduce_range=True"
    t0 = time.perf_counter()
    got = nncf_quantize(args.nncf_python, path, calib, name, batch)
    if isinstance(got, str):
        notes["nncf"] = got
        console.print(f"[yellow]{which}: NNCF skipped: {escape(got)}[/]")  # (escaped: "[bench]" is no markup)
    else:
        models["nncf"] = got
        seconds["nncf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = surgeon.apply(fp32, "int8", options, data=DataSet({name: calib}, source="photos 0-31", batch=static),
                           threads=args.threads)
    seconds["surgeon"] = time.perf_counter() - t0
    models["surgeon"] = result.model
    sessions = {"fp32": session(fp32, args.threads), **{k: session(m, args.threads) for k, m in models.items()}}
    held_ds = DataSet({name: held}, source="photos 32-95", batch=static)
    ref = run(sessions["fp32"], held_ds)[0]
    quality = {k: drift_metrics(ref, run(s, held_ds)[0]) for k, s in sessions.items() if k != "fp32"}
    lat: dict[str, dict[int, float]] = {k: {} for k in sessions}
    ratio: dict[str, dict[int, list[float]]] = {k: {} for k in sessions}  # to plain, same pairs: median, 95% CI
    for bs in ((1,) if static else (1, 8)):
        feed = {name: held[:bs]}
        for k, s in sessions.items():
            if k == "plain":
                continue
            a, b = latency_ab(sessions["plain"], s, feed, budget_s=args.budget_s)
            lat["plain"].setdefault(bs, a.median_ms)
            lat[k][bs] = b.median_ms
            ratio[k][bs] = list(median_interval(np.divide(b.times_ms, a.times_ms)))
    return {"network": which, "model": path.name, "calibration_rows": len(calib), "evaluation_rows": len(held),
            "quality": quality, "latency_ms": lat, "latency_ratio_to_plain": ratio, "quantize_seconds": seconds, "notes": notes,
            "surgeon_steps": result.extras.get("steps"), "surgeon_options": options,
            "weight_rounding": result.extras.get("weight_rounding"), "explain": result.extras.get("explain")}


def print_table(r: dict, console: Console) -> None:
    t = Table(title=f"{r['model']}: {r['calibration_rows']} calibration / {r['evaluation_rows']} held-out photos")
    for col in ("model", "agree", "drift", "b1 ms", "b8 ms", "quant s"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    names = {"fp32": "fp32", "plain": "ort quantize_static", "plain_rr": "ort ..., reduce_range",
             "nncf": "nncf.quantize", "surgeon": "surgeon int8"}
    for k, label in names.items():
        if k not in r["latency_ms"]:
            continue
        q = r["quality"].get(k, {})
        agree = f"{q['top1_agreement']:.1%}" if "top1_agreement" in q else ("100%" if k == "fp32" else "-")
        drift = f"{q['rel_l2']:.4f}" if q else "0"
        lat = r["latency_ms"][k]
        sec = r["quantize_seconds"].get(k)
        t.add_row(label, agree, drift, f"{lat.get(1, float('nan')):.2f}",
                  f"{lat[8]:.2f}" if 8 in lat else "-", f"{sec:.1f}" if sec is not None else "")
    console.print(t)
    for k in ("surgeon", "nncf", "plain_rr"):
        for bs, (m, lo, hi) in r["latency_ratio_to_plain"].get(k, {}).items():
            console.print(f"{names[k]} / plain, batch {bs}: {m:.3f} (95% interval {lo:.3f}-{hi:.3f}, same pairs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", default="eff,det", help="comma-separated: eff (EfficientNet-Lite0), det (detector)")
    ap.add_argument("--option", action="append", default=[], help="extra int8 option key=value")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=4.0, help="seconds of timing per pair and batch size")
    ap.add_argument("--nncf-python", default=sys.executable, help="interpreter with nncf installed")
    ap.add_argument("--json", default="int8-benchmark.json", help="where to save every figure")
    args = ap.parse_args()
    console = Console(width=80)
    if not PHOTOS.exists():
        console.print(f"[yellow]skipped: {PHOTOS} not found (benchmarks read ../shared)[/]")
        return 0
    logging.basicConfig(level=logging.ERROR)
    options = dict(o.split("=", 1) for o in args.option)
    results = []
    for which in args.networks.split(","):
        path = MODEL if which == "eff" else DETECTOR
        if not path.exists():
            console.print(f"[yellow]{which}: skipped, {path} not found[/]")
            continue
        r = bench(which, args, options, console)
        print_table(r, console)
        console.print("surgeon steps (drift on its calibration rows): " +
                      ", ".join(f"{s['step']} {s['rel_l2']:.4f}" for s in r["surgeon_steps"] or []))
        results.append(r)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    console.print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
