"""Surgery time of data-aware low-rank factors against the weight fit (issue 13), on a
model-zoo architecture with materialized weights.

    python benchmarks/lowrank_time.py                       # ResNet-50, 16 images, two runs each
    python benchmarks/lowrank_time.py --model vgg19 --images 64 --runs 1

`surgeon apply`'s library call, tucker at --ratio (guard none: every conv is fitted, nothing
timed), once per setting and run after an untimed warm-up call, the settings interleaved so a
machine that slows down slows all of them: fit=weights (no data read), fit=data (the default: sequential stages and the
held-out choice, each layer getting the trial that won), select=refit (the winner refitted on every sample) and
select=none (the sequential fit everywhere, no choice). The calibration
images are the shared photos (ImageNet-normalized, repeated when --images asks for more), or
seeded noise when ../shared is absent. Prints a table of the times and their ratio to the
weight fit; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import surgeon
from surgeon import zoo
from surgeon.calibration import DataSet

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared" / "data" / "photos224.npz"
SETTINGS = {"weights": {"fit": "weights"}, "data": {}, "data, select=refit": {"select": "refit"},
            "data, select=none": {"select": "none"}}
console = Console(width=80)


def images(n: int, size: int = 224) -> tuple[np.ndarray, str]:
    """n calibration images (N, 3, size, size): the shared photos, else seeded noise."""
    if PHOTOS.exists():
        x = np.load(PHOTOS)["images"].astype(np.float32) / 255  # (N, 224, 224, 3)
        x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        x = np.resize(x.transpose(0, 3, 1, 2).astype(np.float32), (n, 3, size, size))
        return x, f"{n} shared photos"
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32), f"{n} noise images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", help=f"one of: {', '.join(zoo.available())}")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default="lowrank_time.json")
    a = ap.parse_args(argv)
    model = zoo.load(a.model)
    x, source = images(a.images)
    data = DataSet({model.graph.input[0].name: x}, source=source, batch=1)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    # untimed: the first call in a process also pays for imports and onnxruntime's start-up
    surgeon.apply(model, "tucker", {"ratio": a.ratio, "guard": "none", "fit": "weights"})
    for run in range(a.runs):
        for name, opts in SETTINGS.items():
            t = time.perf_counter()
            surgeon.apply(model, "tucker", {"ratio": a.ratio, "guard": "none", **opts}, data=data)
            times[name].append(time.perf_counter() - t)
            console.print(f"run {run + 1}: {name}: {times[name][-1]:.1f} s", style="dim")
    base = float(np.median(times["weights"]))
    t = Table(title=f"{a.model}, tucker ratio {a.ratio:g}, {source}: surgery time")
    for col in ("fit", "runs (s)", "median s", "vs weights"):
        t.add_column(col, justify="left" if col == "fit" else "right")
    for name, ts in times.items():
        t.add_row(name, " / ".join(f"{v:.1f}" for v in ts), f"{np.median(ts):.1f}", f"{np.median(ts) / base:.2f}x")
    console.print(t)
    Path(a.json).write_text(json.dumps({"model": a.model, "ratio": a.ratio, "images": source, "seconds": times,
                                        "vs_weights": {k: float(np.median(v) / base) for k, v in times.items()}},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
