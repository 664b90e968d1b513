"""Data-aware vs weight-space low-rank factors (issue 13), side by side at equal ranks.

    python benchmarks/lowrank_data.py                        # every model found, ratios 0.25 0.5 0.75
    python benchmarks/lowrank_data.py --model cnn --ratios 0.125 0.25
    python benchmarks/lowrank_data.py --model effnet --plugin tucker --json out.json
    python benchmarks/lowrank_data.py --model effnet --ratios --energies 0.9 0.95 --fits data

Models: the sample digits CNN (fit on its calib split, measured on its test split), the shared
EfficientNet-Lite0 (photos224.npz: fit on the first 32, measured on the other 64; RGB
(p-127)/128), the shared ddddocr detector (the same photos resized to 416, BGR 0..255,
batch 1) and the shared ddddocr OCR recognizer (`--model ocr`: the photos as grayscale 64x256
lines, pixel / 255; its output is scored by drift only). Shared models are read from ../shared
and skipped with a message when absent.
For each ratio and fit (weights, data): agreement (top-1 for classifiers), output rel. L2
drift, params, MACs, interleaved A/B latency (batch 1), surgery time and which fit each layer
got (fit=data chooses per layer on held-out calibration samples). guard=none, so both fits
rewrite the same layers at the same ranks: the plugin's, rounded up to a multiple of 8 as a user
gets them (-O multiple=1: the ratio's own ranks, as the tables dated before 7 Dec 2026 evening
were measured). Prints an 80-column table (`cut`: the weight fit's drift over the data-aware
fit's, with its 95% paired bootstrap interval over the scored rows under the table), writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

import surgeon
from surgeon.calibration import DataSet
from surgeon.validate import run, session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
console = Console(width=80)


def photos() -> np.ndarray | None:
    path = SHARED / "data" / "photos224.npz"
    return np.load(path)["images"] if path.exists() else None


def cnn():
    m = surgeon.load(ROOT / "sample_models" / "digits_cnn.onnx")
    return m, surgeon.load_data(ROOT / "sample_models" / "digits_cnn_calib.npz", m), \
        surgeon.load_data(ROOT / "sample_models" / "digits_cnn_test.npz", m)


def effnet():
    path, imgs = SHARED / "models" / "efficientnet_lite0.onnx", photos()
    if not path.exists() or imgs is None:
        return None
    m = surgeon.load(path)
    x = ((imgs.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2).copy()
    return m, DataSet({"input": x[:32]}, source="photos[:32]"), DataSet({"input": x[32:]}, source="photos[32:]")


def det():
    path, imgs = SHARED / "models" / "ddddocr_det.onnx", photos()
    if not path.exists() or imgs is None:
        return None
    from PIL import Image  # noqa: F401  (resize through numpy below if PIL is missing)
    m = surgeon.load(path)
    big = np.stack([np.asarray(Image.fromarray(i).resize((416, 416), Image.BILINEAR)) for i in imgs])
    x = big[..., ::-1].astype(np.float32).transpose(0, 3, 1, 2).copy()  # BGR 0..255
    return m, DataSet({"images": x[:32]}, source="photos416[:32]", batch=1), \
        DataSet({"images": x[32:]}, source="photos416[32:]", batch=1)


def ocr():
    path, imgs = SHARED / "models" / "ddddocr_ocr.onnx", photos()
    if not path.exists() or imgs is None:
        return None
    from PIL import Image
    m = surgeon.load(path)
    # grayscale text-line shape: height 64, width 256 (the model's width is dynamic), pixel / 255
    x = np.stack([np.asarray(Image.fromarray(i).convert("L").resize((256, 64), Image.BILINEAR), np.float32) / 255
                  for i in imgs])[:, None]
    return m, DataSet({"input1": x[:32]}, source="photos64x256[:32]", batch=1), \
        DataSet({"input1": x[32:]}, source="photos64x256[32:]", batch=1)


MODELS = {"cnn": cnn, "effnet": effnet, "det": det, "ocr": ocr}


def measure(name, plugin, settings: list[tuple[str, float]], fits: list[str], latency: bool,
            extra: dict) -> list[dict]:
    """One row per (rank setting, fit). A rank setting is ("ratio", x) or ("energy", e)."""
    loaded = MODELS[name]()
    if loaded is None:
        console.print(f"[yellow]skip {name}: ../shared models or photos not found[/]")
        return []
    model, calib, test = loaded
    names = [o.name for o in model.graph.output]
    ref = outputs(model, names, test)
    rows = []
    for key, value in settings:
        errors = {}  # fit -> {output: per-row squared error}, for the paired bootstrap of the cut
        for fit in fits:
            res = surgeon.apply(model, plugin, {key: value, "guard": "none", "fit": fit, **extra}, data=calib)
            v = surgeon.validate(model, res.model, test, latency=latency, budget_s=3.0)
            out = next(iter(v.outputs.values()))
            got = outputs(res.model, names, test)
            errors[fit] = {n: row_energy(got[n] - ref[n]) for n in names}
            worst = max(v.outputs, key=lambda n: v.outputs[n].get("rel_l2") or 0.0)
            interval = cut_interval(errors["weights"][worst], errors[fit][worst]) \
                if fit != "weights" and "weights" in errors else None
            choices = Counter(l.details.get("fit_choice", l.details.get("fit")) for l in res.rewritten)
            rows.append({"model": name, "plugin": plugin, "setting": f"{key} {value:g}", "ratio": value, "fit": fit,
                         "layers": len(res.rewritten), "rel_l2": v.worst_rel_l2,
                         "agreement": v.top1_agreement, "accuracy": v.accuracy,
                         "params": [res.before.total_params, res.after.total_params],
                         "macs": [res.before.total_macs, res.after.total_macs],
                         "speedup": (v.latency or {}).get("speedup"), "latency": v.latency, "seconds": res.seconds,
                         "cosine": out.get("cosine"), "choices": dict(sorted(choices.items())), "options": extra,
                         "cut_interval": interval})
            console.print(f"{name} {plugin} {key} {value:g} fit {fit}: {len(res.rewritten)} layers, drift "
                          f"{v.worst_rel_l2:.4g} agreement {v.top1_agreement} params {res.after.total_params} "
                          f"MACs {res.after.total_macs / max(1, res.before.total_macs):.3f}x speedup "
                          f"{(v.latency or {}).get('speedup')} fits {dict(sorted(choices.items()))} "
                          f"({res.seconds:.1f} s)")
    return rows


def outputs(model, names: list[str], data: DataSet) -> dict[str, np.ndarray]:
    """The model's outputs on every scored row, a row per sample (validate.run: the OCR
    recognizer's [T, 1, C] steps are joined as [N, T, C], so the bootstrap resamples lines)."""
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], run(sess, data)))


def row_energy(a: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row (axis 0, the samples)."""
    return np.square(a.astype(np.float64)).reshape(len(a), -1).sum(1)


def cut_interval(weights: np.ndarray, data: np.ndarray, level: float = 0.95, draws: int = 4000) -> list[float]:
    """Paired percentile bootstrap over the scored rows of the cut (the weight fit's drift over the
    data-aware fit's, from their per-row squared errors; the original's norm cancels): with 64
    photos EfficientNet-Lite0's 2.01x at ratio 0.25 spans 1.80-2.30x. Seeded."""
    idx = np.random.default_rng(0).integers(0, len(data), size=(draws, len(data)))
    cut = np.sqrt(weights[idx].sum(1) / np.maximum(data[idx].sum(1), 1e-300))
    return [float(q) for q in np.quantile(cut, [(1 - level) / 2, (1 + level) / 2])]


def table(rows: list[dict]) -> Table:
    """80 columns: one row per (setting, fit); `cut` = the weight fit's drift over this row's, at the
    same setting (the issue's "at least 2x")."""
    plugins = sorted({r["plugin"] for r in rows})
    t = Table(title=f"{'/'.join(plugins)}: data-aware (data) vs weight-space (weights) factors, equal ranks",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("model", "ranks", "fit", "params", "MACs", "drift", "cut", "agree", "speed", "s"):
        t.add_column(col, justify="left" if col in ("model", "fit") else "right", no_wrap=True)
    weights = {(r["model"], r["plugin"], r["setting"]): r["rel_l2"] for r in rows if r["fit"] == "weights"}
    for r in rows:
        macs, params = r["macs"], r["params"]
        m = f"{macs[1] / macs[0]:.2f}x" if macs and macs[0] and macs[1] else "-"
        w = weights.get((r["model"], r["plugin"], r["setting"]))
        cut = f"{w / r['rel_l2']:.2f}x" if r["fit"] != "weights" and w and r["rel_l2"] else "-"
        t.add_row(r["model"], r["setting"].replace("ratio ", "r").replace("energy ", "e"), r["fit"],
                  f"{params[1] / 1e6:.2f}M", m, f"{r['rel_l2']:#.3g}", cut,
                  "-" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%",
                  "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", f"{r['seconds']:.1f}")
    cuts = [f"{r['model']} {r['setting'].replace('ratio ', 'r').replace('energy ', 'e')} "
            f"{r['cut_interval'][0]:.2f}-{r['cut_interval'][1]:.2f}x" for r in rows if r.get("cut_interval")]
    if cuts:
        t.caption = "cut, 95% paired bootstrap over the scored rows: " + "; ".join(cuts)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--plugin", choices=["tucker", "svd"], default="tucker")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    ap.add_argument("--energies", type=float, nargs="*", default=[],
                    help="also per-layer ranks by output energy (data-aware spectrum with fit=data)")
    ap.add_argument("--fits", nargs="+", choices=["weights", "data"], default=["weights", "data"])
    ap.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                    help="extra plugin option for every run, e.g. samples=32 (repeatable)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", default="lowrank_data.json")
    a = ap.parse_args(argv)
    extra = dict(o.split("=", 1) for o in a.option)
    settings = [("ratio", r) for r in a.ratios] + [("energy", e) for e in a.energies]
    rows = []
    for name in (MODELS if a.model == "all" else [a.model]):
        rows += measure(name, a.plugin, settings, a.fits, not a.no_latency, extra)
    console.print(table(rows))
    Path(a.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
