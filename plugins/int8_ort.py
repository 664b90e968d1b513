"""The onnxruntime side of int8: pre-processing, calibration, quantize_static/dynamic, n-bit
weights, and measuring models on data. Every file onnxruntime needs lives in one temporary
folder (`Workspace`) that is removed afterwards; nothing is written next to the user's model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from surgeon.calibration import DataSet
from surgeon.plugins.int8_float import float_outputs, keep_weights_float
from surgeon.model import scratch_cwd
from surgeon.errors import SurgeonError, UsageError
from surgeon.validate import (discrete, drift_metrics, least_agreement, looks_like_scores, run, session, with_outputs,
                              worst_drift)

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def quiet():
    """onnxruntime.quantization logs and prints progress; keep it off the CLI's console. Its
    numpy warnings too: a tensor with an infinite range (an attention mask) gets a NaN scale
    there, which int8 finds in the ranges and keeps in float (int8_ranges.unbounded)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            yield
    finally:
        root.setLevel(level)


class Workspace:
    """A temporary folder for the files onnxruntime.quantization reads and writes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="surgeon-int8-"))
        self._n = 0

    def path(self, stem: str) -> str:
        self._n += 1
        return str(self.dir / f"{self._n:03d}-{stem}.onnx")

    def save(self, model: onnx.ModelProto, stem: str) -> str:
        p = self.path(stem)
        onnx.save(model, p)
        return p

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_reader(data: DataSet, batch: int = CALIBRATION_BATCH):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Feeds every model input, batch by batch, from a surgeon DataSet."""

        def __init__(self) -> None:
            self.feeds = list(data.batches(batch))
            self.i = 0

        def get_next(self):
            if self.i >= len(self.feeds):
                return None
            self.i += 1
            return self.feeds[self.i - 1]

        def rewind(self) -> None:
            self.i = 0

        def __len__(self) -> int:
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.feeds = list(data.batches(batch))[start_index:end_index]
            self.i = 0

    return Reader()


def pre_process(model: onnx.ModelProto, ws: Workspace) -> onnx.ModelProto:
    """onnxruntime's quantization pre-processing: symbolic + ONNX shape inference. Its graph
    optimizations are skipped: they rename fused nodes (`my/MatMulAddFusion`), which would break
    exclusion and reporting by node name; BN folding is done by int8_graph and onnxruntime
    fuses the rest when it loads the quantized model. Raises UsageError when it cannot cope."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    src = ws.save(model, "float")
    out = ws.path("preprocessed")
    try:
        with quiet(), scratch_cwd():
            quant_pre_process(src, out, skip_optimization=True, skip_symbolic_shape=False)
    except Exception as exc:
        log.info("pre-processing with symbolic shape inference failed (%s); retrying without", _first_line(exc))
        try:
            with quiet(), scratch_cwd():
                quant_pre_process(src, out, skip_optimization=True, skip_symbolic_shape=True)
        except Exception as exc2:
            raise UsageError(f"onnxruntime's quantization pre-processing cannot handle this model: "
                             f"{_first_line(exc2)}") from None
    return onnx.load(out)


@functools.lru_cache(maxsize=None)
def products_saturate(activation_type: str = "U8", weight_type: str = "S8") -> bool:
    """Whether this onnxruntime, on this CPU, saturates 8-bit products with full-range weights.

    x86 CPUs without VNNI multiply u8 x s8 with vpmaddubsw, which sums pairs of products into
    int16 and saturates: 255 * 127 * 2 = 64770 > 32767. A quantized layer then silently gives
    wrong outputs (the digits CNN drifted 0.160 instead of 0.0039 on an AVX2-only EPYC). Which
    kernel onnxruntime picks cannot be read from Python, so the answer is measured: one
    MatMulInteger at the largest integers, compared with the exact sum."""
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    a_dtype, b_dtype = (np.uint8 if t == "U8" else np.int8 for t in (activation_type, weight_type))
    # the largest products: 255 (or -128 when signed) times the largest weight of the same sign
    signed = a_dtype == np.int8 and b_dtype == np.int8
    a = np.full((1, k), np.iinfo(a_dtype).min if a_dtype == np.int8 else np.iinfo(a_dtype).max, a_dtype)
    b = np.full((k, 1), np.iinfo(b_dtype).min if signed else np.iinfo(b_dtype).max, b_dtype)
    exact = int((a.astype(np.int64) @ b.astype(np.int64))[0, 0])
    elem = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "saturation-probe",
                              [helper.make_tensor_value_info("a", elem[a_dtype], [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    try:
        got = session(model, threads=1).run(None, {"a": a})[0]
    except Exception as exc:  # a runtime without this kernel cannot saturate it either
        log.debug("saturation probe did not run: %s", _first_line(exc))
        return False
    return int(np.asarray(got).reshape(-1)[0]) != exact


@dataclass
class StaticConfig:
    per_channel: bool
    reduce_range: bool
    activation_type: str  # "U8" | "S8"
    weight_type: str
    calibration: str  # minmax | entropy | percentile | auto
    percentile: float = 99.999


def _qtype(name: str):
    from onnxruntime.quantization import QuantType
    return {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}[name]


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    # auto: the per-tensor ranges are written as a MinMax cache (plugins/int8_ranges.py)
    return {"minmax": CalibrationMethod.MinMax, "auto": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[name]


def quantize_static(model: onnx.ModelProto, data: DataSet, cfg: StaticConfig, exclude: Iterable[str],
                    ws: Workspace, cache: str, overrides: dict | None = None) -> onnx.ModelProto:
    """QDQ quantize_static; the activation ranges are computed once and then read from `cache`."""
    from onnxruntime.quantization import QuantFormat, quantize_static as ort_quantize_static
    src = ws.save(model, "to-quantize")
    out = ws.path("qdq")
    extra = {"CalibPercentile": cfg.percentile} if cfg.calibration == "percentile" else {}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    try:
        with quiet():
            ort_quantize_static(src, out, make_reader(data), quant_format=QuantFormat.QDQ,
                                per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                                activation_type=_qtype(cfg.activation_type), weight_type=_qtype(cfg.weight_type),
                                nodes_to_exclude=sorted(exclude), calibrate_method=_method(cfg.calibration),
                                extra_options=extra, calibration_cache_path=cache)
    except Exception as exc:
        raise SurgeonError(f"onnxruntime quantize_static failed: {_first_line(exc)}") from None
    # nodes left in float must stay float when onnxruntime loads the model (plugins/int8_float.py)
    q, guarded = keep_weights_float(onnx.load(out))
    if guarded:
        log.info("int8: %d float node(s) guarded against onnxruntime's load-time weight quantization", len(guarded))
    q, floats = float_outputs(q, model)  # 8-bit logits tie and drift for no speed (plugins/int8_float.py)
    if floats:
        log.info("int8: output(s) %s left in float", ", ".join(floats))
    return q


def quantize_dynamic(model: onnx.ModelProto, per_channel: bool, reduce_range: bool, weight_type: str,
                     exclude: Iterable[str], ws: Workspace) -> onnx.ModelProto:
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    src = ws.save(model, "to-quantize")
    out = ws.path("dynamic")
    try:
        with quiet():
            ort_quantize_dynamic(src, out, per_channel=per_channel, reduce_range=reduce_range,
                                 weight_type=_qtype(weight_type), nodes_to_exclude=sorted(exclude))
    except Exception as exc:
        raise SurgeonError(f"onnxruntime quantize_dynamic failed: {_first_line(exc)}") from None
    return onnx.load(out)


def quantize_nbits(model: onnx.ModelProto, bits: int, block_size: int, exclude: Iterable[str]) -> onnx.ModelProto:
    """Weight-only block-wise quantization of MatMul weights (MatMulNBits)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise UsageError(f"bits < 8 needs onnxruntime's weight-only quantizer, which cannot be imported "
                         f"({_first_line(exc)}; it needs the onnx-ir package: pip install onnx-ir)") from None
    try:
        with quiet():
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     nodes_to_exclude=sorted(exclude), op_types_to_quantize=("MatMul",))
            q.process()
    except Exception as exc:
        raise SurgeonError(f"onnxruntime MatMulNBitsQuantizer failed: {_first_line(exc)}") from None
    return q.model.model


# --- measuring --------------------------------------------------------------------------------

def run_outputs(model: onnx.ModelProto, data: DataSet, threads: int = 0, batch: int = 32) -> list[np.ndarray]:
    """Every output over `data` (surgeon.validate.run; scalar outputs stacked, not concatenated)."""
    return run(session(model, threads), data, batch)


class Evaluator:
    """Drift of a candidate model against the float model's outputs on a fixed data set."""

    def __init__(self, reference: onnx.ModelProto, data: DataSet, threads: int = 0) -> None:
        self.data = data
        self.threads = threads
        self.ref = run_outputs(reference, data, threads)
        self.calls = 0

    @property
    def has_scores(self) -> bool:
        return any(looks_like_scores(r) or discrete(r) for r in self.ref)

    def __call__(self, model: onnx.ModelProto) -> dict[str, float]:
        self.calls += 1
        outs = run_outputs(model, self.data, self.threads)
        metrics = [drift_metrics(r, o) for r, o in zip(self.ref, outs)]
        rel, agree = worst_drift(metrics), least_agreement(metrics)
        if rel is None:  # every output is discrete (labels): the steps are judged by disagreement
            rel = 1.0 - agree
        out = {"rel_l2": rel}
        if agree is not None:
            out["top1_agreement"] = agree
        return out


def node_outputs(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """Node name -> its first output tensor, for the nodes that exist in `model`."""
    wanted = set(names)
    return {n.name: n.output[0] for n in model.graph.node if n.name in wanted}


def paired_stats(float_model: onnx.ModelProto, quant_model: onnx.ModelProto | None, nodes: Iterable[str],
                 data: DataSet, threads: int = 0, batch: int = 8) -> dict[str, dict[str, np.ndarray]]:
    """Per node output (channel axis 1, or the last axis of a 2-D output): the float model's
    per-channel mean and max and, with `quant_model`, the quantized model's per-channel mean and
    the relative L2 error of the whole output. Nodes are matched by name; runs batch by batch so
    memory stays at one batch of activations."""
    nodes = list(nodes)
    f_t = node_outputs(float_model, nodes)
    q_t = node_outputs(quant_model, nodes) if quant_model is not None else {}
    nodes = [n for n in nodes if n in f_t and (quant_model is None or n in q_t)]
    fs = session(with_outputs(float_model, [f_t[n] for n in nodes]), threads)
    f_idx = _indices(fs, [f_t[n] for n in nodes])
    if quant_model is not None:
        qs = session(with_outputs(quant_model, [q_t[n] for n in nodes]), threads)
        q_idx = _indices(qs, [q_t[n] for n in nodes])
    acc = {n: {"fsum": 0.0, "qsum": 0.0, "max": -np.inf, "count": 0, "err": 0.0, "energy": 0.0} for n in nodes}
    for feed in data.batches(batch):
        fr = fs.run(None, feed)
        qr = qs.run(None, feed) if quant_model is not None else None
        for k, n in enumerate(nodes):
            a = acc[n]
            f = channels_first(fr[f_idx[k]])
            a["fsum"] = a["fsum"] + f.sum(axis=1)
            a["max"] = np.maximum(a["max"], f.max(axis=1))
            a["count"] += f.shape[1]
            if qr is not None:
                q = channels_first(qr[q_idx[k]])
                a["qsum"] = a["qsum"] + q.sum(axis=1)
                a["err"] += float(np.sum((q - f) ** 2))
                a["energy"] += float(np.sum(f ** 2))
    out = {}
    for n, a in acc.items():
        out[n] = {"float_mean": a["fsum"] / a["count"], "max": a["max"]}
        if quant_model is not None:
            out[n]["quant_mean"] = a["qsum"] / a["count"]
            out[n]["rel_err"] = float(np.sqrt(a["err"] / max(a["energy"], 1e-30)))
    return out


def _indices(sess, names: list[str]) -> list[int]:
    out_names = [o.name for o in sess.get_outputs()]
    return [out_names.index(t) for t in names]


def channels_first(a: np.ndarray) -> np.ndarray:
    """(channels, everything else) in float64: axis 1 of an N-D tensor, the last of a 2-D one."""
    ax = 1 if a.ndim > 2 else a.ndim - 1
    return np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1).astype(np.float64)


def input_means(model: onnx.ModelProto, tensors: Iterable[str], data: DataSet, threads: int = 0,
                batch: int = 8) -> dict[str, np.ndarray]:
    """Per-channel mean of tensors (graph inputs or node outputs) of the float model."""
    tensors = sorted(set(tensors))
    return channel_means(session(with_outputs(model, tensors), threads), tensors, data.batches(batch))


def channel_means(sess, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]],
                  extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-channel mean of `tensors` (session outputs or fed inputs) over `feeds`, each run with
    the `extra` inputs added (e.g. initializers declared as inputs)."""
    outputs = {o.name for o in sess.get_outputs()}
    asked = [t for t in tensors if t in outputs]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        res = dict(zip(asked, sess.run(asked, {**feed, **(extra or {})}))) if asked else {}
        res.update({t: v for t, v in feed.items() if t not in res})
        for t in tensors:
            c = channels_first(res[t])
            sums[t] = sums.get(t, 0) + c.sum(axis=1)
            counts[t] = counts.get(t, 0) + c.shape[1]
    return {t: sums[t] / counts[t] for t in tensors}
