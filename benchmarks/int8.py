"""int8 on a real ImageNet model: plain onnxruntime quantize_static vs surgeon's `int8`.

    python benchmarks/int8.py [--max-drift 0.08] [--min-agreement 0.9] [--option key=value ...]

Model and photos come from ../shared (EfficientNet-Lite0, 96 photos: the first 32 calibrate,
the other 64 evaluate). Both quantized models see the same 32 calibration photos; drift and
top-1 agreement are measured against the float model on the 64 evaluation photos, which
neither quantizer saw. Latency is timed interleaved (plain, surgeon, surgeon, plain, ...)
at batch 1 and 8 in the same run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

import surgeon
from surgeon.calibration import DataSet
from surgeon.validate import drift_metrics, latency_ab, session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "efficientnet_lite0.onnx"
PHOTOS = SHARED / "data" / "photos224.npz"


def plain_quantize(model_path: Path, calib: np.ndarray) -> onnx.ModelProto:
    """What a user gets from onnxruntime alone: pre-process, then QDQ per-channel U8S8 MinMax."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = [{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)]

        def get_next(self):
            return self.batches.pop(0) if self.batches else None

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "plain.onnx"
        quant_pre_process(str(model_path), str(pre))
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-drift", type=float, default=None)
    ap.add_argument("--min-agreement", type=float, default=None)
    ap.add_argument("--option", action="append", default=[], help="extra int8 option key=value")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=6.0, help="seconds of timing per batch size")
    args = ap.parse_args()
    console = Console()
    if not MODEL.exists() or not PHOTOS.exists():
        console.print(f"[yellow]skipped: {MODEL} or {PHOTOS} not found (benchmarks read ../shared)[/]")
        return 0
    logging.basicConfig(level=logging.ERROR)

    images = np.load(PHOTOS)["images"]
    x = ((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()
    calib, held = x[:32], x[32:]
    fp32 = surgeon.load(MODEL)

    t0 = time.perf_counter()
    plain = plain_quantize(MODEL, calib)
    t_plain = time.perf_counter() - t0

    options = dict(o.split("=", 1) for o in args.option)
    if args.max_drift is not None:
        options["max_drift"] = args.max_drift
    if args.min_agreement is not None:
        options["min_agreement"] = args.min_agreement
    if "max_drift" not in options and "min_agreement" not in options:
        options["min_agreement"] = 0.9
    t0 = time.perf_counter()
    result = surgeon.apply(fp32, "int8", options, data=DataSet({"input": calib}, source="photos 0-31"),
                           threads=args.threads)
    t_surgeon = time.perf_counter() - t0
    ours = result.model

    s_fp32, s_plain, s_ours = (session(m, args.threads) for m in (fp32, plain, ours))
    ref = s_fp32.run(None, {"input": held})[0]
    quality = {name: drift_metrics(ref, s.run(None, {"input": held})[0])
               for name, s in (("plain", s_plain), ("surgeon", s_ours))}
    lat = {}
    for bs in (1, 8):
        feed = {"input": held[:bs]}
        a, b = latency_ab(s_plain, s_ours, feed, budget_s=args.budget_s)
        f, _ = latency_ab(s_fp32, s_plain, feed, budget_s=args.budget_s / 2)
        lat[bs] = {"fp32": f.median_ms, "plain": a.median_ms, "surgeon": b.median_ms}

    table = Table(title=f"EfficientNet-Lite0 int8: 32 calibration photos, {len(held)} held-out photos, "
                        f"threads={args.threads or 'default'}")
    for col in ("model", "top-1 agreement", "rel. L2 drift", "batch 1 ms", "batch 8 ms", "quantize s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("fp32", "100.0%", "0", f"{lat[1]['fp32']:.2f}", f"{lat[8]['fp32']:.2f}", "")
    table.add_row("onnxruntime quantize_static (QDQ, per-channel, U8S8, MinMax)",
                  f"{quality['plain']['top1_agreement']:.1%}", f"{quality['plain']['rel_l2']:.4f}",
                  f"{lat[1]['plain']:.2f}", f"{lat[8]['plain']:.2f}", f"{t_plain:.1f}")
    table.add_row(f"surgeon int8 ({', '.join(f'{k}={v}' for k, v in options.items())})",
                  f"{quality['surgeon']['top1_agreement']:.1%}", f"{quality['surgeon']['rel_l2']:.4f}",
                  f"{lat[1]['surgeon']:.2f}", f"{lat[8]['surgeon']:.2f}", f"{t_surgeon:.1f}")
    console.print(table)
    console.print("latency ratio surgeon/plain: batch 1 {:.3f}, batch 8 {:.3f}".format(
        lat[1]["surgeon"] / lat[1]["plain"], lat[8]["surgeon"] / lat[8]["plain"]))
    ex = result.extras
    steps = Table(title="what surgeon's int8 did (drift measured by the plugin on its own calibration data)")
    steps.add_column("step")
    steps.add_column("rel. L2 drift", justify="right")
    for s in ex.get("steps", []):
        steps.add_row(s["step"], f"{s['rel_l2']:.4f}")
    console.print(steps)
    if "calibration_auto" in ex:  # --option calibration=auto
        a = ex["calibration_auto"]
        console.print(f"[bold]calibration_auto[/]: per tensor {a['counts']}, drift minmax "
                      f"{a['drift_minmax']['rel_l2']:.4f} -> auto {a['drift_auto']['rel_l2']:.4f}, kept={a['kept']}, "
                      f"{a['seconds_total']:.1f} s (of which {a['seconds']})")
    for key in ("equalization", "bias_correction", "fallback"):
        if key in ex:
            info = {k: v for k, v in ex[key].items() if k not in ("skipped", "ranking")}
            console.print(f"[bold]{key}[/]: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
