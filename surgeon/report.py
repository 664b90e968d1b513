"""Tables (rich), JSON reports and PNG plots. Formatting only: no measurement happens here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.table import Table

from surgeon.plugin import LayerReport, Registry, _jsonable, option_help
from surgeon.profile import Profile


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def ratio(before: float, after: float) -> str:
    return f"{before / after:.2f}x" if after else "-"


# --- tables ------------------------------------------------------------------------------------

def plugins_tables(reg: Registry) -> list[Table]:
    """One table per plugin: its options with types, defaults and help."""
    tables = []
    for p in reg:
        t = Table(title=f"[bold]{p.name}[/]: {p.summary}", caption=reg.origin(p.name), title_justify="left",
                  caption_justify="left")
        t.add_column("option", style="bold")
        t.add_column("type")
        t.add_column("default")
        t.add_column("meaning")
        for name, tp, default, help_ in option_help(p):
            t.add_row(name, tp, default, help_)
        tables.append(t)
    return tables


def profile_table(prof: Profile, title: str = "layers") -> Table:
    t = Table(title=title, caption="the total counts every initializer (BatchNorm statistics too)")
    for col, just in (("layer", "left"), ("op", "left"), ("weight shape", "left"), ("params", "right"),
                      ("MACs", "right"), ("bytes", "right")):
        t.add_column(col, justify=just)
    for l in prof.layers:
        t.add_row(l.name, l.op, "x".join(map(str, l.weight_shape)) if l.weight_shape else "-", human(l.params),
                  human(l.macs), human_bytes(l.bytes))
    t.add_section()
    t.add_row("total", "", "", human(prof.total_params), human(prof.total_macs), human_bytes(prof.weight_bytes))
    return t


def _ranks(d: dict[str, Any]) -> str:
    for a, b in (("R1", "R2"), ("r1", "r2")):
        if a in d and b in d:
            return f"{d[a]},{d[b]}"
    for key in ("rank", "ranks"):
        if key in d:
            v = d[key]
            return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return ""


def _arrow(d: dict[str, Any], what: str) -> str:
    a, b = d.get(f"{what}_before"), d.get(f"{what}_after")
    return f"{human(a)}→{human(b)}" if a is not None and b is not None else ""


# (header, cell) for the per-layer details plugins commonly report; empty columns are dropped
DETAIL_COLUMNS = (
    ("ranks", _ranks),
    ("error", lambda d: f"{d['rel_error']:.3f}" if d.get("rel_error") is not None else ""),
    ("params", lambda d: _arrow(d, "params")),
    ("MACs", lambda d: _arrow(d, "macs")),
    ("compl.", lambda d: f"{d['complexity_ratio']:.2f}x" if d.get("complexity_ratio") else ""),
    ("guard", lambda d: f"{d['guard']['speedup']:.2f}x" if d.get("guard") else ""),
)


def layers_table(layers: Sequence[LayerReport], title: str = "layers") -> Table:
    """The rewritten layers with what the plugin reported about each."""
    shown = [l for l in layers if l.status == "rewritten"]
    cols = [(h, f) for h, f in DETAIL_COLUMNS if any(f(l.details) for l in shown)]
    t = Table(title=title)
    t.add_column("layer", no_wrap=True)
    t.add_column("op")
    for h, _ in cols:
        t.add_column(h, justify="right", no_wrap=True)
    for l in shown:
        t.add_row(l.layer, l.op, *[f(l.details) for _, f in cols])
    return t


def skipped_table(layers: Sequence[LayerReport]) -> Table:
    t = Table(title="skipped")
    t.add_column("layer", no_wrap=True)
    t.add_column("op")
    t.add_column("why")
    for l in layers:
        if l.status != "rewritten":
            t.add_row(l.layer, l.op, l.reason)
    return t


def steps_table(extras: dict[str, Any]) -> Table | None:
    """A plugin's own stages and the drift after each (int8: quantize, equalize, bias correction, fallback)."""
    steps = extras.get("steps")
    if not steps:
        return None
    where = extras.get("measured_on")
    t = Table(title="steps" + (f" (drift measured on {where})" if where else ""))
    t.add_column("step")
    t.add_column("rel. L2 drift", justify="right")
    for st in steps:
        t.add_row(str(st.get("step")), f"{st['rel_l2']:.4f}" if st.get("rel_l2") is not None else "-")
    fb = extras.get("fallback")
    if fb and fb.get("kept_float"):
        t.caption = f"kept in float: {', '.join(fb['kept_float'])}"
    return t


def totals_table(before: Profile, after: Profile) -> Table:
    t = Table(title="totals")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("params", human(before.total_params), human(after.total_params),
              ratio(before.total_params, after.total_params))
    t.add_row("MACs", human(before.total_macs), human(after.total_macs), ratio(before.total_macs, after.total_macs))
    t.add_row("weights", human_bytes(before.weight_bytes), human_bytes(after.weight_bytes),
              ratio(before.weight_bytes, after.weight_bytes))
    t.add_row("model size", human_bytes(before.file_bytes), human_bytes(after.file_bytes),
              ratio(before.file_bytes, after.file_bytes))
    return t


def validation_tables(v: dict[str, Any]) -> list[Table]:
    """Drift per output (and accuracy), then latency; from Validation.to_json()."""
    src = "synthesized inputs" if v["synthetic_data"] else v["data"]
    t = Table(title=f"drift on {v['samples']} samples ({src})")
    t.add_column("output")
    for col in ("max abs", "mean abs", "rel. L2", "cosine", "top-1 agree"):
        t.add_column(col, justify="right")
    for name, m in v["outputs"].items():
        agree = m.get("top1_agreement")
        t.add_row(name, f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['rel_l2']:.4f}", f"{m['cosine']:.5f}",
                  f"{agree:.1%}" if agree is not None else "-")
    tables = [t]
    if v.get("accuracy"):
        a = v["accuracy"]
        t.caption = f"accuracy on the labels: {a['original']:.2%} before, {a['candidate']:.2%} after"
    if v.get("latency"):
        lat = v["latency"]
        lt = Table(title=f"latency, onnxruntime CPU, batch {lat['batch']}, threads {lat['threads']} (interleaved A/B)")
        for col in ("model", "median ms", "p90 ms", "runs"):
            lt.add_column(col, justify="left" if col == "model" else "right")
        for name in ("original", "candidate"):
            x = lat[name]
            lt.add_row(name, f"{x['median_ms']:.3f}", f"{x['p90_ms']:.3f}", str(x["runs"]))
        if lat.get("speedup"):
            lt.caption = f"speedup {lat['speedup']:.2f}x (median)"
        tables.append(lt)
    return tables


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A plain table for benchmarks and sweeps."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[x if isinstance(x, str) else (f"{x:.4g}" if isinstance(x, float) else str(x)) for x in r])
    return t


# --- files -------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic: a reader never sees a half-written report."""
    path = Path(path)
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".surgeon-", suffix=".json", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def plot(path: str | os.PathLike, x: Sequence[float], series: dict[str, Sequence[float]], *, xlabel: str,
         ylabel: str, title: str, logy: bool = False) -> Path:
    """A line plot saved as PNG (error vs rank, drift vs ratio, sensitivity per layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".surgeon-", suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path
