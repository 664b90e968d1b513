"""PNG plots of sweeps (formatting only: every value plotted was measured by surgeon.sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgeon.atomic import replacing


def _figure(panels: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), dpi=110, squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with replacing(path, ".png") as tmp:
            fig.savefig(tmp, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def _xlabel(removes: bool) -> str:
    return "ratio (fraction of channels removed)" if removes else "ratio (fraction of ranks kept)"


def _finite(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and y == y and abs(y) != float("inf")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def uniform(out: Path, rows: list[dict[str, Any]], original: dict[str, Any], title: str, removes: bool) -> list[Path]:
    """sweep_quality.png (accuracy / agreement / drift vs ratio) and sweep_latency.png."""
    files = []
    x = [r["ratio"] for r in rows]
    quality = {label: _finite(x, [r.get(key) for r in rows])
               for key, label in (("agreement", "top-1 agreement"), ("accuracy", "accuracy"))}
    quality = {label: xy for label, xy in quality.items() if xy[1]}
    # no class axis and no labels (an OCR recognizer's [time, batch, classes] output): drift alone,
    # not an empty panel with an empty legend
    shown = quality or original.get("accuracy") is not None
    plt, fig, panels = _figure(2 if shown else 1)
    drift_ax = panels[-1]
    if shown:
        left = panels[0]
        for label, (xs, ys) in quality.items():
            left.plot(xs, ys, marker="o", label=label)
        if original.get("accuracy") is not None:
            left.axhline(original["accuracy"], color="grey", ls="--", lw=1, label="original accuracy")
        left.set_xlabel(_xlabel(removes))
        left.set_ylabel("fraction")
        left.set_title("agreement / accuracy")
        left.grid(alpha=0.3)
        left.legend()
    xs, ys = _finite(x, [r.get("drift") for r in rows])
    drift_ax.plot(xs, ys, marker="o", color="C3")
    if ys and min(ys) > 0:
        drift_ax.set_yscale("log")
    drift_ax.set_xlabel(_xlabel(removes))
    drift_ax.set_ylabel("relative L2 drift of the outputs")
    drift_ax.set_title("drift")
    drift_ax.grid(alpha=0.3)
    fig.suptitle(title)
    files.append(_save(plt, fig, out / "sweep_quality.png"))

    if any(r.get("latency_ratio") is not None for r in rows):
        plt, fig, (ax,) = _figure(1)
        xs, ys = _finite(x, [r.get("latency_ratio") for r in rows])
        lo = [r.get("latency_ratio_low") for r in rows if r.get("latency_ratio") is not None]
        hi = [r.get("latency_ratio_high") for r in rows if r.get("latency_ratio") is not None]
        ax.plot(xs, ys, marker="o", label="measured latency / original (median of pairs)")
        if len(lo) == len(xs):
            ax.fill_between(xs, lo, hi, alpha=0.2, label="95% interval")
        mx, my = _finite(x, [r.get("macs_ratio") for r in rows])
        if my:
            ax.plot(mx, my, ls="--", marker=".", color="grey", label="MACs / original (reference)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xlabel(_xlabel(removes))
        ax.set_ylabel("after / before")
        ax.set_title(f"{title}: latency vs ratio")
        ax.grid(alpha=0.3)
        ax.legend()
        files.append(_save(plt, fig, out / "sweep_latency.png"))
    return files


def per_layer(out: Path, rows: list[dict[str, Any]], title: str, removes: bool) -> list[Path]:
    """per_layer.png: drift (and agreement) vs ratio, one curve per layer; per_layer_latency.png."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    has_agree = any(r.get("agreement") is not None for r in rows)
    plt, fig, axes = _figure(2 if has_agree else 1)
    for name in layers:
        mine = [r for r in rows if r["layer"] == name and r.get("applied")]  # not rewritten: nothing to show
        xs, ys = _finite([r["ratio"] for r in mine], [r.get("drift") for r in mine])
        xs, ys = [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]  # log axis
        axes[0].plot(xs, ys, marker="o", ms=3, label=name)
        if has_agree:
            xs, ys = _finite([r["ratio"] for r in mine], [r.get("agreement") for r in mine])
            axes[1].plot(xs, ys, marker="o", ms=3, label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative L2 drift (this layer alone)")
    axes[0].set_title("sensitivity: drift")
    if has_agree:
        axes[1].set_ylabel("top-1 agreement (this layer alone)")
        axes[1].set_title("sensitivity: agreement")
    for ax in axes:
        ax.set_xlabel(_xlabel(removes))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
    fig.suptitle(f"{title}: one layer at a time")
    files = [_save(plt, fig, out / "per_layer.png")]
    if any(r.get("saved_ms") is not None for r in rows):
        plt, fig, (ax,) = _figure(1)
        for name in layers:
            mine = [r for r in rows if r["layer"] == name]
            xs, ys = _finite([r["ratio"] for r in mine], [r.get("saved_ms") for r in mine])
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel(_xlabel(removes))
        ax.set_ylabel("ms saved (measured, layer alone)")
        ax.set_title(f"{title}: latency saved per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers) > 8 else 1)
        files.append(_save(plt, fig, out / "per_layer_latency.png"))
    return files


def fallback(out: Path, rows: list[dict[str, Any]], title: str) -> list[Path]:
    """fallback.png: drift with each node alone in float (bars), all-quantized drift as a line;
    `rows`: SweepResult.fallback (the all-quantized row has no layer)."""
    base = next((r for r in rows if not r["layer"]), None)
    nodes = [r for r in rows if r is not base and r.get("drift") is not None]
    plt, fig, (ax,) = _figure(1)
    ax.bar(range(len(nodes)), [r["drift"] for r in nodes])
    ax.set_xticks(range(len(nodes)), [r["layer"] for r in nodes], rotation=60, ha="right", fontsize=7)
    if base is not None and base.get("drift") is not None:
        ax.axhline(base["drift"], color="C3", ls="--", label="every node quantized")
        ax.legend()
    ax.set_ylabel("relative L2 drift")
    ax.set_title(f"{title}: drift with one node kept in float")
    ax.grid(alpha=0.3, axis="y")
    return [_save(plt, fig, out / "fallback.png")]


def reconstruction(out: Path, rows: list[dict[str, Any]], title: str) -> list[Path]:
    """reconstruction.png: error vs rank fraction per layer, one panel per mode."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    plt, fig, axes = _figure(len(modes))
    for ax, mode in zip(axes, modes):
        mine = [r for r in rows if r["mode"] == mode]
        for name in dict.fromkeys(r["layer"] for r in mine):
            pts = [r for r in mine if r["layer"] == name]
            ax.plot([r["fraction"] for r in pts], [r["rel_error"] for r in pts], label=name)
        ax.set_xlabel(f"rank / full ({mode})")
        ax.set_ylabel("||W - W_r|| / ||W||")
        ax.set_title(mode)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len({r['layer'] for r in mine}) > 8 else 1)
    fig.suptitle(f"{title}: reconstruction error (data-free)")
    return [_save(plt, fig, out / "reconstruction.png")]
