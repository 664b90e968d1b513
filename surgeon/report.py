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

def plugins_table(reg: Registry) -> Table:
    t = Table(title="plugins", show_lines=True)
    t.add_column("name", style="bold")
    t.add_column("summary")
    t.add_column("options")
    t.add_column("from")
    for p in reg:
        opts = "\n".join(f"{n} ({tp}, default {d}): {h}" if h else f"{n} ({tp}, default {d})"
                         for n, tp, d, h in option_help(p))
        t.add_row(p.name, p.summary, opts or "-", reg.origin(p.name))
    return t


def profile_table(prof: Profile, title: str = "layers") -> Table:
    t = Table(title=title)
    for col, just in (("layer", "left"), ("op", "left"), ("weight shape", "left"), ("params", "right"),
                      ("MACs", "right"), ("bytes", "right")):
        t.add_column(col, justify=just)
    for l in prof.layers:
        t.add_row(l.name, l.op, "x".join(map(str, l.weight_shape)) if l.weight_shape else "-", human(l.params),
                  human(l.macs), human_bytes(l.bytes))
    t.add_section()
    t.add_row("total", "", "", human(prof.total_params), human(prof.total_macs), human_bytes(prof.weight_bytes))
    return t


# detail keys shown as columns when a plugin reports them, in this order
DETAIL_COLUMNS = (
    ("ranks", "ranks"), ("rel_error", "rel. error"), ("params_before", "params"), ("params_after", "→ params"),
    ("macs_before", "MACs"), ("macs_after", "→ MACs"), ("complexity_ratio", "compl. ratio"),
)


def _ranks(d: dict[str, Any]) -> str:
    if "r1" in d and "r2" in d:
        return f"{d['r1']},{d['r2']}"
    if "rank" in d:
        return str(d["rank"])
    if "ranks" in d:
        v = d["ranks"]
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return ""


def _cell(key: str, d: dict[str, Any]) -> str:
    if key == "ranks":
        return _ranks(d)
    v = d.get(key)
    if v is None:
        return ""
    if key in ("params_before", "params_after", "macs_before", "macs_after"):
        return human(v)
    if key == "rel_error":
        return f"{v:.4f}"
    if key == "complexity_ratio":
        return f"{v:.2f}x"
    return str(v)


def layers_table(layers: Sequence[LayerReport], verbose: bool = False, title: str = "layers") -> Table:
    shown = [l for l in layers if verbose or l.status == "rewritten"]
    keys = [(k, h) for k, h in DETAIL_COLUMNS if any(_cell(k, l.details) for l in shown)]
    t = Table(title=title)
    t.add_column("layer")
    t.add_column("op")
    t.add_column("status")
    for _, h in keys:
        t.add_column(h, justify="right")
    t.add_column("guard", justify="right")
    t.add_column("reason")
    for l in shown:
        g = l.details.get("guard")
        style = {"rewritten": "green", "skipped": "yellow", "reverted": "yellow"}[l.status]
        t.add_row(l.layer, l.op, f"[{style}]{l.status}[/]", *[_cell(k, l.details) for k, _ in keys],
                  f"{g['speedup']:.2f}x" if g else "", l.reason)
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


def validation_table(v: dict[str, Any]) -> Table:
    """From Validation.to_json()."""
    t = Table(title=f"validation on {v['samples']} samples ({'synthetic' if v['synthetic_data'] else v['data']})")
    t.add_column("output")
    for col in ("max abs", "mean abs", "rel. L2", "cosine", "top-1 agree"):
        t.add_column(col, justify="right")
    for name, m in v["outputs"].items():
        agree = m.get("top1_agreement")
        t.add_row(name, f"{m['max_abs']:.3g}", f"{m['mean_abs']:.3g}", f"{m['rel_l2']:.4f}", f"{m['cosine']:.5f}",
                  f"{agree:.1%}" if agree is not None else "-")
    if v.get("accuracy"):
        a = v["accuracy"]
        t.add_section()
        t.add_row("accuracy", "", "", "", "", f"{a['original']:.2%} → {a['candidate']:.2%}")
    if v.get("latency"):
        lat = v["latency"]
        t.add_section()
        o, c = lat["original"], lat["candidate"]
        t.add_row(f"latency (batch {lat['batch']}, median/p90 ms)", f"{o['median_ms']:.3f}/{o['p90_ms']:.3f}",
                  f"→ {c['median_ms']:.3f}/{c['p90_ms']:.3f}", "", "",
                  f"{lat['speedup']:.2f}x" if lat.get("speedup") else "-")
    return t


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
