"""What keeping a node in float costs, measured: its kernel time in the float model minus its
kernel time in the int8 model, from onnxruntime's per-node profiles of both at batch 1.

onnxruntime fuses a quantized Conv with its DequantizeLinear/QuantizeLinear neighbours into
one QLinearConv named `<node>_token_<n>`; the suffix is stripped so both profiles speak of the
original node names. The border QuantizeLinear/DequantizeLinear a float island adds are not
counted, so the cost is a lower bound on what the node adds back to the latency."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx

FUSED = re.compile(r"_token_\d+$")


def node_milliseconds(model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int, runs: int = 20) -> dict[str, float]:
    """Median kernel milliseconds per (original) node name over `runs` profiled runs."""
    from surgeon.sweep import kernel_times
    from surgeon.validate import session
    with tempfile.TemporaryDirectory(prefix="surgeon-int8-cost-") as tmp:
        sess = session(model, threads, profile_dir=str(Path(tmp)))
        for _ in range(3 + runs):
            sess.run(None, feed)
        per_run = kernel_times(sess.end_profiling())[3:]
    out: dict[str, list[float]] = {}
    for run in per_run:
        totals: dict[str, float] = {}
        for name, (_, ms) in run.items():
            key = FUSED.sub("", name)
            totals[key] = totals.get(key, 0.0) + ms
        for key, ms in totals.items():
            out.setdefault(key, []).append(ms)
    return {k: float(np.median(v)) for k, v in out.items()}


def float_costs(float_model: onnx.ModelProto, q_model: onnx.ModelProto, feed: dict[str, np.ndarray],
                threads: int, names: list[str]) -> dict[str, float]:
    """Milliseconds each named node adds when it stays float: float kernel time - int8 kernel
    time (0 when the int8 kernel is not faster). Nodes missing from either profile are left out."""
    t_float = node_milliseconds(float_model, feed, threads)
    t_int8 = node_milliseconds(q_model, feed, threads)
    return {n: max(t_float[n] - t_int8[n], 0.0) for n in names if n in t_float and n in t_int8}
