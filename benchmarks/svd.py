"""Benchmark the svd plugin: what a low-rank pair costs in accuracy and buys in latency.

    python benchmarks/svd.py                  # both parts
    python benchmarks/svd.py --part samples   # the sample MLP / CNN sweep (and docs/svd_ratio.png)
    python benchmarks/svd.py --part block     # the transformer MLP block

1. samples: the trained digits MLP and the FC layers of the digits CNN (sample_models/),
   factorized at ratios 1 .. 1/16 (all FC layers, and the hidden ones only, keeping the
   10-way classifier) and at energies 0.9 / 0.95: accuracy on the test split (450 images),
   output drift, params before/after, and onnxruntime latency before/after (interleaved A/B,
   batch 1 and batch 64) of the whole model. Factorized with guard=none so every layer is
   rewritten; "guard keeps" says how many of those layers the default latency guard keeps at
   batch 1. Ratio 1 is full rank (with allow_growth): it must reproduce the model.
2. block: a transformer-style MLP block, x [1, 128, 768] -> MatMul 768x3072 + Add -> GELU
   (the Erf form PyTorch exports at opset 17) -> MatMul 3072x768 + Add, at ratios 0.5 /
   0.25 / 0.125: latency before/after (interleaved), params before/after, measured speedup
   next to the ideal one (the MACs ratio of the weighted layers). Seeded weights with a
   decaying singular spectrum (s_k proportional to 1/sqrt(k)), so the drift column means
   something; latency does not depend on the values.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

import surgeon
from surgeon.validate import drift_metrics, latency_ab, session

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DOCS = ROOT / "docs"
RATIOS = (1.0, 0.5, 0.25, 0.125, 0.0625)
BLOCK_RATIOS = (0.5, 0.25, 0.125)

console = Console(width=None if sys.stdout.isatty() else 200)


# --- 1. sample models ----------------------------------------------------------------------

# (scope, --layers regex): every FC layer, or the hidden ones only (the 10-way classifier kept)
SCOPES = {"mlp": (("all FC", None), ("hidden FC", r"^fc[12]$")),
          "cnn": (("all FC", None), ("hidden FC", r"^fc1$"))}
ENERGIES = (0.9, 0.95)


def sample_sweep(name: str, budget_s: float, threads: int) -> list[dict]:
    model = surgeon.load(SAMPLES / f"digits_{name}.onnx")
    data = surgeon.load_data(SAMPLES / f"digits_{name}_test.npz", model)
    # multiple 1: the ratio's own ranks (the default rounds them up to 8, which merges the small ratios)
    settings = [(scope, rx, {"ratio": ratio, "allow_growth": ratio == 1.0, "multiple": 1}) for scope, rx in SCOPES[name]
                for ratio in RATIOS if not (rx and ratio == 1.0)]
    settings += [("all FC", None, {"energy": e, "multiple": 1}) for e in ENERGIES]
    rows = []
    for scope, rx, opts in settings:
        result = surgeon.apply(model, "svd", {**opts, "guard": "none"}, layers=rx)
        v1 = surgeon.validate(model, result.model, data, latency_batch=1, budget_s=budget_s, threads=threads)
        v64 = surgeon.validate(model, result.model, data.take(64), latency_batch=64, budget_s=budget_s,
                               threads=threads)
        guarded = surgeon.apply(model, "svd", opts, layers=rx, threads=threads)
        rows.append({
            "model": name, "scope": scope, "ratio": opts.get("ratio"), "energy": opts.get("energy"),
            "ranks": ", ".join(f"{l.layer}:{l.details['rank']}" for l in result.rewritten) or "-",
            "acc_before": v1.accuracy["original"], "acc_after": v1.accuracy["candidate"],
            "rel_l2": v1.worst_rel_l2,
            "params_before": result.before.total_params, "params_after": result.after.total_params,
            "ms1_before": v1.latency["original"]["median_ms"], "ms1_after": v1.latency["candidate"]["median_ms"],
            "ms64_before": v64.latency["original"]["median_ms"], "ms64_after": v64.latency["candidate"]["median_ms"],
            "guard_kept": f"{len(guarded.rewritten)}/{len(result.rewritten)}",
        })
    return rows


def sample_table(rows: list[dict], conditions: str) -> Table:
    t = Table(title="svd on the sample models (factorized with guard=none; accuracy on the test split, 450 images; "
                    "latency = median ms, interleaved A/B; " + conditions + ")")
    for col in ("model", "layers", "rank option", "ranks", "accuracy before -> after", "rel. L2 drift",
                "params before -> after", "ms b=1 before -> after", "ms b=64 before -> after", "guard keeps (b=1)"):
        t.add_column(col, justify="left" if col in ("model", "layers", "ranks") else "right")
    for r in rows:
        option = f"ratio {r['ratio']:g}" if r["ratio"] is not None else f"energy {r['energy']:g}"
        t.add_row(r["model"], r["scope"], option, r["ranks"], f"{r['acc_before']:.2%} -> {r['acc_after']:.2%}",
                  f"{r['rel_l2']:.3g}", f"{r['params_before']:,} -> {r['params_after']:,}",
                  f"{r['ms1_before']:.3f} -> {r['ms1_after']:.3f}", f"{r['ms64_before']:.3f} -> {r['ms64_after']:.3f}",
                  r["guard_kept"])
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, title in (("mlp", "digits MLP"), ("cnn", "digits CNN")):
        mine = [r for r in rows if r["model"] == name and r["ratio"] is not None]
        if not mine:
            continue
        full = [r for r in mine if r["ratio"] == 1.0]
        for scope, style, what in (("all FC", "-o", "all FC layers"), ("hidden FC", "--s", "hidden FC layers only")):
            lower = [r for r in mine if r["scope"] == scope and r["ratio"] < 1]
            pts = [(r["ratio"], r["acc_after"]) for r in full + lower]
            ax.plot(*zip(*sorted(pts)), style, label=f"{title}, {what}",
                    color="C0" if name == "mlp" else "C1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(RATIOS, [f"{r:g}" for r in RATIOS])
    ax.invert_xaxis()
    ax.set_xlabel("ratio (rank = ratio x min(in, out))")
    ax.set_ylabel("test accuracy (450 images)")
    ax.set_title("svd: accuracy vs ratio (ratio 1 = full rank = original)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- 2. transformer MLP block --------------------------------------------------------------

def spectral_weight(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    """W = P diag(s) Q^T with random orthonormal P, Q and s_k = c / sqrt(k)."""
    k = min(n_in, n_out)
    p, _ = np.linalg.qr(rng.standard_normal((n_in, k)))
    q, _ = np.linalg.qr(rng.standard_normal((n_out, k)))
    s = 1.0 / np.sqrt(np.arange(1, k + 1))
    s *= math.sqrt(2 * n_out) / np.linalg.norm(s)  # ||W||_F^2 = 2 n_out, as for He-initialized N(0, 2 / n_in) entries
    return ((p * s) @ q.T).astype(np.float32)


def block_model(hidden: int = 768, ffn: int = 3072, seq: int = 128, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(spectral_weight(rng, hidden, ffn), "fc1.weight"),
             numpy_helper.from_array((0.02 * rng.standard_normal(ffn)).astype(np.float32), "fc1.bias"),
             numpy_helper.from_array(spectral_weight(rng, ffn, hidden), "fc2.weight"),
             numpy_helper.from_array((0.02 * rng.standard_normal(hidden)).astype(np.float32), "fc2.bias"),
             numpy_helper.from_array(np.array(math.sqrt(2), np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "fc1.weight"], ["m1"], name="fc1"),
             n("Add", ["m1", "fc1.bias"], ["a1"], name="fc1_bias"),
             # GELU as torch.onnx exports it at opset 17: x * 0.5 * (1 + erf(x / sqrt(2)))
             n("Div", ["a1", "sqrt2"], ["g1"], name="gelu_div"), n("Erf", ["g1"], ["g2"], name="gelu_erf"),
             n("Add", ["g2", "one"], ["g3"], name="gelu_add"), n("Mul", ["a1", "g3"], ["g4"], name="gelu_mul"),
             n("Mul", ["g4", "half"], ["g5"], name="gelu_half"),
             n("MatMul", ["g5", "fc2.weight"], ["m2"], name="fc2"),
             n("Add", ["m2", "fc2.bias"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "mlp_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def block_bench(budget_s: float, threads: int) -> Table:
    model = block_model()
    x = np.random.default_rng(1).standard_normal((1, 128, 768)).astype(np.float32)
    feed = {"x": x}
    base = session(model, threads)
    (ref,) = base.run(None, feed)
    t = Table(title="svd on a transformer MLP block: x [1, 128, 768] -> 768x3072 -> GELU -> 3072x768 "
                    "(median ms, interleaved A/B, onnxruntime CPU; " + conditions(threads) + ")")
    for col in ("ratio", "ranks", "params before -> after", "ms before -> after", "speedup", "ideal (MACs)",
                "rel. L2 drift", "guard keeps"):
        t.add_column(col, justify="right")
    for ratio in BLOCK_RATIOS:
        result = surgeon.apply(model, "svd", {"ratio": ratio, "guard": "none"})
        cand = session(result.model, threads)
        (out,) = cand.run(None, feed)
        la, lb = latency_ab(base, cand, feed, budget_s=budget_s)
        ideal = result.before.total_macs / result.after.total_macs
        guarded = surgeon.apply(model, "svd", {"ratio": ratio}, threads=threads)
        t.add_row(f"{ratio:g}", ", ".join(f"{l.layer}:{l.details['rank']}" for l in result.rewritten),
                  f"{result.before.total_params:,} -> {result.after.total_params:,}",
                  f"{la.median_ms:.2f} -> {lb.median_ms:.2f}", f"{la.median_ms / lb.median_ms:.2f}x", f"{ideal:.2f}x",
                  f"{drift_metrics(ref, out)['rel_l2']:.3f}", f"{len(guarded.rewritten)}/{len(guarded.layers)}")
    return t


def markdown(table: Table) -> str:
    """The same table as markdown (for docs/svd.md), caption first."""
    cols = table.columns
    lines = [f"{table.title}\n", "| " + " | ".join(str(c.header) for c in cols) + " |",
             "| " + " | ".join("---" for _ in cols) + " |"]
    for row in zip(*(list(c.cells) for c in cols)):
        lines.append("| " + " | ".join(str(v).replace("->", "→") for v in row) + " |")
    return "\n".join(lines) + "\n"


def conditions(threads: int) -> str:
    """What the timings were taken under: threads and the machine's load while it ran."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{threads or 'all'} thread(s), {os.cpu_count()} cores, 1-min load average {load:.1f} at the end"


def factor_speed() -> Table:
    """fit=weights factorization of VGG-19's FC layers (surgeon.zoo, seeded weights) at ratio
    0.25: the previous route (GEMM Gram, numpy eigh of every pair, one BLAS thread) against
    lowrank.matrix_factors(w, rank) (dsyrk Gram, leading pairs only); time and how far the
    rank-r product A @ B moved. Not part of --part all (minutes per layer)."""
    import time

    from onnx import numpy_helper
    from threadpoolctl import threadpool_limits

    from surgeon import lowrank, rank_choice, zoo

    m = zoo.load("vgg19")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    t = Table(title=f"VGG-19 FC factorization, ratio 0.25 ({conditions(0)})")
    for col in ("layer", "shape", "rank", "before s", "after s", "speedup", "rel. change of A@B"):
        t.add_column(col, justify="right")
    for node in (n for n in m.graph.node if n.op_type == "Gemm"):
        w = inits[node.input[1]]
        w = (w.T if any(a.name == "transB" and a.i for a in node.attribute) else w).astype(np.float64)
        r = rank_choice.rank_from_ratio(min(w.shape), 0.25)
        t0 = time.perf_counter()
        side = w.T if w.shape[0] > w.shape[1] else w
        g = side @ side.T
        with threadpool_limits(1, user_api="blas"):
            ev, vec = np.linalg.eigh(g)
        order = np.argsort(ev)[::-1]
        vec = vec[:, order] * lowrank.column_signs(vec[:, order])
        old = lowrank.MatrixFactors(w, vec, np.sqrt(np.clip(ev[order], 0, None)), w.shape[0] > w.shape[1])
        before = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = lowrank.matrix_factors(w, r)
        after = time.perf_counter() - t0
        po, pn = np.matmul(*old.pair(r)), np.matmul(*new.pair(r))
        t.add_row(node.name, "x".join(map(str, w.shape)), str(r), f"{before:.1f}", f"{after:.1f}",
                  f"{before / after:.2f}x", f"{np.linalg.norm(po - pn) / np.linalg.norm(po):.1e}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "samples", "block", "factor"), default="all",
                    help="factor: the VGG-19 FC factorization speed (not in all)")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of A/B timing per comparison")
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads (1: steadier on a shared machine; 0: all cores)")
    ap.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    args = ap.parse_args(argv)
    tables = []
    if args.part in ("all", "samples"):
        rows = []
        for name in ("mlp", "cnn"):
            if not (SAMPLES / f"digits_{name}.onnx").exists():
                console.print(f"[yellow]sample_models/digits_{name}.onnx missing; skipped[/]")
                continue
            rows += sample_sweep(name, args.budget, args.threads)
        tables.append(sample_table(rows, conditions(args.threads)))
        console.print(tables[-1])
        DOCS.mkdir(exist_ok=True)
        plot(rows, DOCS / "svd_ratio.png")
        console.print(f"plot written to {DOCS / 'svd_ratio.png'}")
    if args.part in ("all", "block"):
        tables.append(block_bench(2 * args.budget, args.threads))
        console.print(tables[-1])
    if args.part == "factor":
        tables.append(factor_speed())
        console.print(tables[-1])
    if args.markdown:
        args.markdown.write_text("\n".join(markdown(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
