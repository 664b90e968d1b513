"""Tables (rich), JSON reports and PNG plots. Formatting only: no measurement happens here."""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.markup import escape
from rich.table import Table

from surgeon.atomic import replacing
from surgeon.plugin import LayerReport, Registry, _jsonable, option_help
from surgeon.profile import Profile


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; None (not measured) -> '?'."""
    if n is None:
        return "?"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.3g}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def ratio(before: float | None, after: float | None) -> str:
    return f"{before / after:.2f}x" if after and before is not None else "-"


def elide(text: str, width: int) -> str:
    """Shorten in the middle, keeping both ends: node names differ at their ends
    ('model/encoder/layer.11/attention/query' vs '.../key')."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1 + 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


def fold_name(text: str, width: int) -> str:
    """Break a node name over lines of at most `width`, after a separator where one falls in
    the second half of the line ('/_blocks.2/_expand_conv/' + 'Conv', not '.../C' + 'onv')."""
    lines = []
    while len(text) > width > 0:
        cut = max((i + 1 for i, ch in enumerate(text[:width]) if ch in "/._-:" and i + 1 >= width // 2), default=width)
        lines.append(text[:cut])
        text = text[cut:]
    return "\n".join([*lines, text])


# --- tables ------------------------------------------------------------------------------------

class FitTable:
    """A rich Table laid out for the console it is printed on, so it stays readable at 80
    columns (CI logs): numeric columns keep their full values, short text columns (op) keep
    their width, long names are elided in the middle and long prose wraps.

    Column kinds: "num" (never cut, right-aligned), "text" (never cut), "name" (elided in the
    middle when space runs out; wrapped instead when eliding would make two different names
    read the same, as EfficientNet-Lite0's '/_blocks.12/_project_conv/Conv' and
    '/_blocks.3/_expand_conv/Conv' both did: '/_blocks…nv/Conv'; broken after a '/', '.' or '_'
    where one is near the end of the line), "wrap" (wraps). Same surface
    as rich's Table for what we use: add_column, add_row, add_section, title, caption."""

    MIN_NAME = 12

    def __init__(self, title: str | None = None, caption: str | None = None, **table_kwargs: Any) -> None:
        self.title, self.caption = title, caption
        self.table_kwargs = table_kwargs
        self.columns: list[tuple[str, str, str, dict[str, Any]]] = []  # (header, kind, justify, extra)
        self.rows: list[tuple[list[str], bool]] = []  # (cells, section break before)
        self._section = False

    def add_column(self, header: str, kind: str = "text", justify: str | None = None, **extra: Any) -> None:
        self.columns.append((header, kind, justify or ("right" if kind == "num" else "left"), extra))

    def add_row(self, *cells: Any) -> None:
        self.rows.append(([str(c) for c in cells], self._section))
        self._section = False

    def add_section(self) -> None:
        self._section = True

    def _natural(self, split_arrows: bool = False) -> list[int]:
        from rich.text import Text
        natural = []
        for i, (header, _, _, _) in enumerate(self.columns):
            cells = [Text.from_markup(self._cell(r[i], self.columns[i][1], split_arrows)).cell_len
                     for r, _ in self.rows if i < len(r)]
            head = max(Text.from_markup(line).cell_len for line in header.split("\n"))  # a header may take two lines
            natural.append(max([head, *[c for c in cells]]))
        return natural

    @staticmethod
    def _cell(text: str, kind: str, split_arrows: bool) -> str:
        # a "before→after" pair may take two lines, each value whole
        if split_arrows and kind == "num" and "→" in text:
            return text.replace("→", "→\n")
        return text

    def _layouts(self, max_width: int) -> list[tuple[list[int], int, bool]]:
        """(width per column, padding, split arrows) for each way the table can fit, most
        spacious first: natural widths if they fit; else names and prose give way down to a
        minimum, then the padding goes, then before→after pairs wrap."""
        flexible = [i for i, c in enumerate(self.columns) if c[1] in ("name", "wrap")]
        n = len(self.columns)
        found = []
        for padding, split in ((1, False), (0, False), (0, True)):
            natural = self._natural(split)
            if split:
                natural = [max(len(p) for p in self._lines_max(i)) if self.columns[i][1] == "num" else w
                           for i, w in enumerate(natural)]
            overhead = n + 1 + 2 * padding * n  # borders, and padding either side of each cell
            if sum(natural) + overhead <= max_width:
                return [*found, (natural, padding, split)]
            floor = sum(min(self.MIN_NAME, natural[i]) for i in flexible)
            fixed = sum(w for i, w in enumerate(natural) if i not in flexible)
            if fixed + floor + overhead <= max_width or (split and not found):
                room = max_width - overhead - fixed
                widths = list(natural)
                left = room  # share it out, smallest demand first, so a short column keeps all it needs
                for k, i in enumerate(sorted(flexible, key=lambda i: natural[i])):
                    widths[i] = min(natural[i], max(left // (len(flexible) - k), min(self.MIN_NAME, natural[i])))
                    left -= widths[i]
                found.append((widths, padding, split))
        return found

    def _lines_max(self, i: int) -> list[str]:
        lines = self.columns[i][0].split("\n")  # a two-line header is as wide as its longer line
        for r, _ in self.rows:
            if i < len(r):
                lines += self._cell(r[i], "num", True).split("\n")
        return lines

    def _table(self, widths: list[int], padding: int, split: bool, kinds: list[str]) -> Table:
        t = Table(title=self.title, caption=self.caption, padding=(0, padding), **self.table_kwargs)
        for (header, _, justify, extra), kind, w in zip(self.columns, kinds, widths):
            if kind in ("wrap", "folded"):
                t.add_column(header, justify=justify, width=w, overflow="fold", **extra)
            else:
                t.add_column(header, justify=justify, no_wrap=True, min_width=w, max_width=w if kind == "name" else None,
                             **extra)
        for cells, section in self.rows:
            if section:
                t.add_section()
            t.add_row(*[elide(c, w) if kind == "name" and w else fold_name(c, w) if kind == "folded" else
                        self._cell(c, kind, split) for c, kind, w in zip(cells, kinds, widths)])
        return t

    def build(self, max_width: int = 80) -> Table:
        """The layout that prints the fewest lines. At 80 columns EfficientNet-Lite0's tucker
        table took 3 lines per layer with its before→after pairs whole (30-character names
        wrapped at 13); with the pairs split after their arrows the names get 25 and every
        layer takes 2. On a tie the more spacious layout wins, and a name column wraps rather
        than elides (the whole name costs no extra line then)."""
        names = [i for i, c in enumerate(self.columns) if c[1] == "name"]
        candidates = {}
        for widths, padding, split in self._layouts(max_width):
            for wrapped in itertools.product((True, False), repeat=len(names)):
                kinds = [c[1] for c in self.columns]
                for i, wrap in zip(names, wrapped):
                    column = {r[i] for r, _ in self.rows if i < len(r)}
                    if all(len(c) <= widths[i] for c in column):
                        continue  # whole either way
                    # eliding must not make two different names read the same
                    kinds[i] = "folded" if wrap or len({elide(c, widths[i]) for c in column}) < len(column) else "name"
                candidates.setdefault((tuple(widths), padding, split, tuple(kinds)), None)
        tables = [self._table(list(w), padding, split, list(kinds)) for w, padding, split, kinds in candidates]
        if len(tables) == 1:
            return tables[0]
        return min(tables, key=lambda t: _line_count(t, max_width))  # the first of the shortest

    def __rich_console__(self, console, options):
        yield self.build(options.max_width)


def _line_count(table: Table, width: int) -> int:
    from rich.console import Console
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(table, console.options, pad=False))


def plugins_tables(reg: Registry) -> list[FitTable]:
    """One table per plugin: its options with types, defaults and help."""
    tables = []
    for p in reg:
        t = FitTable(title=f"[bold]{p.name}[/]: {p.summary}", caption=reg.origin(p.name), title_justify="left",
                     caption_justify="left")
        # type and default go under the meaning: as columns of their own at 80 columns, a type
        # like int8's 'minmax|entropy|percentile|auto|minmax-or-percentile' squeezed the
        # meaning into 15 characters, a word or two per line
        t.add_column("option", "text", style="bold")
        t.add_column("meaning (type, default)", "wrap")
        for name, tp, default, help_ in option_help(p):
            t.add_row(name, f"{escape(help_)}\n[dim]{escape(tp)}, default {escape(default)}[/]")
        tables.append(t)
    return tables


def profile_table(prof: Profile, title: str = "layers") -> FitTable:
    caption = "the total counts every initializer (BatchNorm statistics too)"
    if prof.macs_note:
        caption += "\n" + prof.macs_note
    t = FitTable(title=title, caption=caption)
    for col, kind in (("layer", "name"), ("op", "text"), ("weight shape", "text"), ("params", "num"),
                      ("MACs", "num"), ("bytes", "num")):
        t.add_column(col, kind)
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
    return f"{human(a)}→{human(b)}" if a is not None or b is not None else ""


# (header, cell) for the per-layer details plugins commonly report; empty columns are dropped
DETAIL_COLUMNS = (
    ("ranks", _ranks),
    ("error", lambda d: f"{d['rel_error']:.3f}" if d.get("rel_error") is not None else ""),
    # a data-aware fit minimises this one, not the weight error beside it (issue 13: the
    # report gives both), so its weight error can exceed 1 while the output is kept
    ("out err", lambda d: _metric(d["out_error"], ".3f") if d.get("out_error") is not None else ""),
    ("params", lambda d: _arrow(d, "params")),
    ("MACs", lambda d: _arrow(d, "macs")),
    ("compl.", lambda d: f"{d['complexity_ratio']:.2f}x" if d.get("complexity_ratio") else ""),
    ("guard", lambda d: f"{d['guard']['speedup']:.2f}x" if d.get("guard") else ""),
)


def layers_table(layers: Sequence[LayerReport], title: str = "layers") -> FitTable:
    """The rewritten layers with what the plugin reported about each."""
    shown = [l for l in layers if l.status == "rewritten"]
    cols = [(h, f) for h, f in DETAIL_COLUMNS if any(f(l.details) for l in shown)]
    both = any(h == "out err" for h, _ in cols)
    t = FitTable(title=title)
    t.add_column("layer", "name")
    t.add_column("op", "text")
    for h, _ in cols:
        # two-line headers: as wide as their values (0.123), so adding the output error does not
        # push the detector's table over 80 columns and into two lines per layer
        t.add_column({"error": "w\nerr", "out err": "out\nerr"}.get(h, h) if both else h, "num")
    if both:
        t.caption = ("w err: ||W - W'|| / ||W||; out err: the output's rel. error on the sampled "
                     "calibration rows, which fit=data minimises")
    for l in shown:
        t.add_row(l.layer, l.op, *[f(l.details) for _, f in cols])
    return t


def skipped_table(layers: Sequence[LayerReport]) -> FitTable:
    t = FitTable(title="skipped")
    t.add_column("layer", "name")
    t.add_column("op", "text")
    t.add_column("why", "wrap")
    for l in layers:
        if l.status != "rewritten":
            t.add_row(l.layer, l.op, l.reason)
    return t


def steps_table(extras: dict[str, Any]) -> FitTable | None:
    """A plugin's own stages and the drift after each (int8: quantize, equalize, bias correction, fallback)."""
    steps = extras.get("steps")
    if not steps:
        return None
    where = extras.get("measured_on")
    t = FitTable(title="steps" + (f" (drift measured on {where})" if where else ""))
    t.add_column("step", "wrap")
    t.add_column("rel. L2 drift", "num")
    for st in steps:
        t.add_row(str(st.get("step")), f"{st['rel_l2']:.4f}" if st.get("rel_l2") is not None else "-")
    fb = extras.get("fallback")
    if fb and fb.get("kept_float"):
        t.caption = f"kept in float: {', '.join(fb['kept_float'])}"
    return t


def explain_table(extras: dict[str, Any], top: int = 5) -> FitTable | None:
    """int8's `explain` section (option explain=true): the drift with only the weights or only
    the activations quantized, and the tensors and layers that drift most alone."""
    ex = extras.get("explain")
    if not ex or not ex.get("drift"):
        return None
    t = FitTable(title="where the error comes from" + (f" (on {ex['rows_are']})" if ex.get("rows_are") else ""))
    t.add_column("quantized", "wrap")
    t.add_column("rel. L2 drift", "num")
    labels = {"int8": "weights and activations (before the corrections)", "weights_only": "weights only", "activations_only": "activations only"}
    for key, label in labels.items():
        if key in ex["drift"]:
            t.add_row(label, f"{ex['drift'][key]['rel_l2']:.4f}")
    for a in ex.get("activations", [])[:top]:
        tail = f"{a['tail_ratio']:.2g}" if a.get("tail_ratio") is not None else "-"
        t.add_row(f"tensor {a['tensor']} alone (range {a['min']:.3g}..{a['max']:.3g}, tail ratio {tail})",
                  f"{a['drift_alone']:.4f}")
    for w in ex.get("weights", [])[:top]:
        t.add_row(f"weight of {w['layer']} alone", f"{w['drift_alone']:.4f}")
    counts = ex.get("counts", {})
    if counts:
        t.caption = (f"the {top} worst of {counts.get('activation_tensors', '?')} activation tensors and "
                     f"{counts.get('weighted_layers', '?')} weighted layers; all in the JSON report")
    return t


def totals_table(before: Profile, after: Profile) -> FitTable:
    t = FitTable(title="totals")
    t.add_column("", "text")
    for col in ("before", "after", "ratio"):
        t.add_column(col, "num")
    t.add_row("params", human(before.total_params), human(after.total_params),
              ratio(before.total_params, after.total_params))
    t.add_row("MACs", human(before.total_macs), human(after.total_macs), ratio(before.total_macs, after.total_macs))
    t.add_row("weights", human_bytes(before.weight_bytes), human_bytes(after.weight_bytes),
              ratio(before.weight_bytes, after.weight_bytes))
    t.add_row("model size", human_bytes(before.file_bytes), human_bytes(after.file_bytes),
              ratio(before.file_bytes, after.file_bytes))
    if before.total_macs is None or after.total_macs is None:
        t.caption = before.macs_note or after.macs_note or "MACs unknown: input shapes unknown"
    return t


def _metric(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    return "NaN" if v != v else format(v, fmt)


def validation_tables(v: dict[str, Any]) -> list:
    """Drift per output (and accuracy), then latency and the speedup line; from
    Validation.to_json(). Broken outputs (NaN/Inf, constant) are flagged in their row, and
    agreement says over how many rows."""
    src = "synthesized inputs" if v["synthetic_data"] else v["data"]
    t = FitTable(title=f"drift on {v['samples']} samples ({src})")
    t.add_column("output", "name")
    for col in ("max abs", "mean abs", "rel. L2", "cosine", "top-1 agree"):
        t.add_column(col, "num")
    t.add_column("flags", "text")
    notes = []
    for name, m in v["outputs"].items():
        agree = m.get("top1_agreement")
        flags = []
        if m.get("non_finite"):
            flags.append(f"NaN/Inf x{m['non_finite']}")
        if m.get("constant") and not m.get("constant_original"):
            flags.append("constant")
        t.add_row(name, _metric(m["max_abs"], ".3g"), _metric(m["mean_abs"], ".3g"), _metric(m["rel_l2"], ".4f"),
                  _metric(m["cosine"], ".5f"), f"{agree:.1%}" if agree is not None else "-",
                  ", ".join(flags) or "-")
        rows = m.get("agreement_rows")
        if m.get("discrete"):
            notes.append(f"{name}: integer output; agreement = share of equal values")
        elif rows is not None and rows < v["samples"]:
            notes.append(f"{name}: top-1 agreement over the {rows} of {v['samples']} rows whose original top-1 is "
                         "unique")
    if not any(m.get("non_finite") or (m.get("constant") and not m.get("constant_original"))
               for m in v["outputs"].values()):
        t.columns.pop()  # no flags: keep the table narrow
        t.rows = [(cells[:-1], sec) for cells, sec in t.rows]
    tables = [t]
    iv = v.get("worst_rel_l2_interval")
    if iv:
        notes.append(f"rel. L2 95% interval over samples: {iv[0]:.4f}-{iv[1]:.4f} (bootstrap)")
    if v.get("accuracy"):
        a = v["accuracy"]
        notes.append(f"accuracy on the labels: {a['original']:.2%} before, {a['candidate']:.2%} after")
    if notes:
        t.caption = "\n".join(notes)
    if v.get("latency"):
        lat = v["latency"]
        lt = FitTable(title=f"latency, onnxruntime CPU, batch {lat['batch']}, threads {lat['threads']} "
                            "(interleaved A/B)")
        lt.add_column("model", "text")
        for col in ("median ms", "p90 ms", "runs"):
            lt.add_column(col, "num")
        for name in ("original", "candidate"):
            x = lat[name]
            lt.add_row(name, f"{x['median_ms']:.3f}", f"{x['p90_ms']:.3f}", str(x["runs"]))
        tables.append(lt)
        if lat.get("speedup"):
            # a line of its own: as the table's caption it wrapped to the table's 41 columns
            line = f"speedup {lat['speedup']:.2f}x (median)"
            if lat.get("ratio_low") is not None and lat.get("ratio_high"):
                line += f"; latency ratio {lat['ratio_low']:.3f}-{lat['ratio_high']:.3f} (95% interval, per pair)"
            from rich.text import Text
            tables.append(Text(line))
    return tables


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None,
          first: str = "name", group: bool = False, optional: Iterable[str] = ()) -> FitTable:
    """A plain table for benchmarks and sweeps: the first column names the row (kind `first`:
    "name" elides in the middle when the console is narrow, "wrap" folds it over lines so node
    names that differ in the middle stay whole), the others keep their values whole. `group`:
    consecutive rows with the same first cell form one section that names it once. Columns named
    in `optional` are left out when no row has a value there ("-": agreement and accuracy of a
    detector), so the others keep their width at 80 columns."""
    rows = [[x if isinstance(x, str) else (f"{x:.4g}" if isinstance(x, float) else str(x)) for x in r] for r in rows]
    optional = set(optional)
    keep = [i for i, c in enumerate(columns) if c not in optional or any(r[i] != "-" for r in rows)]
    t = FitTable(title=title, caption=caption)
    for i in keep:
        t.add_column(columns[i], first if i == 0 else "num")
    previous = None
    for r in rows:
        cells = [r[i] for i in keep]
        if group:
            if previous is not None and cells[0] != previous:
                t.add_section()
            previous, cells[0] = cells[0], ("" if cells[0] == previous else cells[0])
        t.add_row(*cells)
    return t


# --- files -------------------------------------------------------------------------------------

def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic: a reader never sees a half-written report."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


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
    try:
        with replacing(path, ".png") as tmp:
            fig.savefig(tmp, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


# --- pipeline and gate reports ------------------------------------------------------------------

def chain_table(doc: dict[str, Any]) -> Table | None:
    """Each step's effect: params, MACs, size, drift and latency after it (a chain of steps)."""
    steps = doc.get("steps") or []
    if len(steps) < 2:
        return None
    t = Table(title="after each step (drift and latency vs the original)")
    for col, just in (("step", "left"), ("params", "right"), ("MACs", "right"), ("size", "right"),
                      ("rel. L2", "right"), ("top-1", "right"), ("ms", "right")):
        t.add_column(col, justify=just, no_wrap=col != "step")
    first = steps[0]["before"]
    base_ms = next((s["original_ms"] for s in steps if s.get("original_ms")), None)
    t.add_row("original", human(first["total_params"]), _macs(first["total_macs"]), human_bytes(first["file_bytes"]),
              "-", "-", f"{base_ms:.2f}" if base_ms else "-")
    for i, s in enumerate(steps, 1):
        d = s.get("drift_after") or {}
        agree = d.get("top1_agreement")
        ms = s.get("latency_ms_after")
        t.add_row(f"{i}. {s['plugin']} ({s['rewritten']})", human(s["after"]["total_params"]),
                  _macs(s["after"]["total_macs"]), human_bytes(s["size_bytes_after"]),
                  f"{d['rel_l2']:.4f}" if d.get("rel_l2") is not None else "-",
                  f"{agree:.1%}" if agree is not None else "-", f"{ms:.2f}" if ms else "-")
    t.caption = "(n) = layers rewritten by the step"
    return t


def _macs(v: Any) -> str:
    return "unknown" if v is None else human(v)


def checks_table(checks: Sequence[dict[str, Any]], title: str = "gate") -> Table:
    """One row per budget: measured value, budget, verdict and margin."""
    t = Table(title=title)
    for col, just in (("check", "left"), ("value", "right"), ("budget", "right"), ("result", "left"),
                      ("margin", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    style = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}
    notes = []
    for c in checks:
        t.add_row(c["name"], _fmt_check(c["name"], c["value"]), _fmt_check(c["name"], c["budget"]),
                  f"[{style[c['status']]}]{c['status']}[/]",
                  "-" if c["margin"] is None else _fmt_check(c["name"], c["margin"], signed=True))
        if c.get("detail"):
            notes.append(f"{c['name']}: {c['detail']}")
    if notes:
        t.caption = "\n".join(notes)
    return t


def _fmt_check(name: str, v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    if name in ("min_agreement", "min_accuracy"):
        return f"{v:+.1%}" if signed else f"{v:.1%}"
    if name == "max_size_mb":
        return f"{v:+.2f} MB" if signed else f"{v:.2f} MB"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def junit_xml(checks: Sequence[dict[str, Any]], suite: str = "surgeon gate", skipped_reason: str = "") -> str:
    """JUnit XML with one test case per budget check, so CI systems list them."""
    from xml.sax.saxutils import quoteattr, escape
    failures = sum(1 for c in checks if c["status"] == "fail")
    skipped = sum(1 for c in checks if c["status"] == "inconclusive")
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr(suite)} tests="{len(checks)}" failures="{failures}" errors="0" '
             f'skipped="{skipped}">']
    for c in checks:
        text = (f"{c['name']}: value {_fmt_check(c['name'], c['value'])}, budget "
                f"{_fmt_check(c['name'], c['budget'])}" + (f" ({c['detail']})" if c.get("detail") else ""))
        lines.append(f'  <testcase classname="surgeon.gate" name={quoteattr(c["name"])}>')
        if c["status"] == "fail":
            lines.append(f'    <failure message={quoteattr(text)}>{escape(text)}</failure>')
        elif c["status"] == "inconclusive":
            lines.append(f'    <skipped message={quoteattr("inconclusive: " + text)}/>')
        else:
            lines.append(f'    <system-out>{escape(text)}</system-out>')
        lines.append('  </testcase>')
    if skipped_reason:
        lines.append(f'  <system-err>{escape(skipped_reason)}</system-err>')
    lines.append('</testsuite>')
    return "\n".join(lines) + "\n"


def markdown(checks: Sequence[dict[str, Any]], status: str, title: str = "surgeon gate",
             extra: Sequence[str] = ()) -> str:
    """A job summary for CI ($GITHUB_STEP_SUMMARY): the verdict and one row per check."""
    icon = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}
    lines = [f"### {title}: {icon.get(status, '')} {status}", "", "| check | value | budget | result | margin |",
             "| --- | --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c['name']} | {_fmt_check(c['name'], c['value'])} | {_fmt_check(c['name'], c['budget'])} "
                     f"| {icon[c['status']]} {c['status']} | "
                     f"{'-' if c['margin'] is None else _fmt_check(c['name'], c['margin'], signed=True)} |")
    details = [f"- {c['name']}: {c['detail']}" for c in checks if c.get("detail")]
    lines += [""] + details if details else []
    lines += [""] + list(extra) if extra else []
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (JSON, JUnit, Markdown reports): a reader never sees half a file."""
    path = Path(path)
    with replacing(path) as tmp:
        Path(tmp).write_text(text)
    return path
