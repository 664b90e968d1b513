"""Loading, checking, saving ONNX models, and moving between ModelProto and the graphsurgeon IR.

Everything that touches a file goes through here, so that reads fail with a clear
`ModelError` and writes are atomic (temp file + rename in the same folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from google.protobuf.message import DecodeError

from surgeon.atomic import plain_mode
from surgeon.errors import ModelError, UsageError

log = logging.getLogger(__name__)

# graphsurgeon logs its own warnings (missing `colored`, large folded tensors) to stdout;
# the CLI owns the console, so keep it quiet unless something is really wrong.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
# graphsurgeon's constant folding opens onnxruntime sessions of its own, whose optimizer
# warnings ("UnsqueezeElimination cannot remove node") are noise to a user.
ort.set_default_logger_severity(4)  # fatal only: we report failures ourselves, in one line

TWO_GB = 2**31
# ir_version 3 (the model zoo's "light" models) lists initializers among graph inputs and
# has no room for some attributes newer tools emit; we always write at least this.
MIN_IR_VERSION = 7


def load(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model (with external data) and check it. Raises ModelError on any problem."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({_first_line(exc) or 'protobuf decode failed'})") from None
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelError(f"{path}: cannot read model or its external data ({_first_line(exc)})") from None
    except Exception as exc:  # protobuf raises a zoo of types for truncated files
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: parsed, but holds no graph (is it an ONNX file?)")
    if check:
        try:
            check_model(model, what=str(path))
        except ModelError as exc:
            if "topologically sorted" not in str(exc):  # (also said of a tensor nothing produces)
                raise
            model = _sorted(model, str(path), exc)
    return model


def _sorted(model: onnx.ModelProto, what: str, refused: ModelError) -> onnx.ModelProto:
    """A copy of a model whose only fault is its node order, in topological order. onnxruntime's
    own float16 converter (keep_io_types=True) appends the input Casts after the nodes that read
    them: onnxruntime sorts such a model itself and runs it, onnx.checker refuses it. The order
    changes no computation; anything else the checker finds is still an error."""
    try:
        ordered = to_model(to_graph(model), like=model)
        check_model(ordered, what=what)
    except Exception:
        raise refused from None
    log.warning(f"{what}: its nodes are not in topological order (onnxruntime runs it, onnx.checker refuses "
                "it); surgeon works on a sorted copy, and what it writes is sorted")
    return ordered


def check_model(model: onnx.ModelProto, *, what: str = "model", full: bool = False) -> None:
    """onnx.checker on a model of any size (the in-memory checker refuses protos over 2 GB)."""
    try:
        if model.ByteSize() < TWO_GB:
            onnx.checker.check_model(model, full_check=full)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "m.onnx"
                onnx.save(model, str(p), save_as_external_data=True, location="m.onnx.data")
                onnx.checker.check_model(str(p), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # its messages break lines mid-sentence ("... of node: \nname: ... OpType: Conv\n is not ...")
        raise ModelError(f"{what}: fails the ONNX checker: {' '.join(str(exc).split())[:300]}") from None


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
         protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write atomically. External data is used when asked, or when the model is over 2 GB.

    `protect` names files that must never be overwritten (the input model).
    """
    path = Path(path)
    for p in protect:
        if Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise UsageError(f"refusing to overwrite the input model {p}; choose another output with -o")
    if not path.parent.exists():
        raise UsageError(f"{path.parent}: output folder does not exist")
    if external_data is None:
        external_data = model.ByteSize() >= TWO_GB
    tmp_dir = tempfile.mkdtemp(prefix=".surgeon-", dir=path.parent)
    try:
        tmp = Path(tmp_dir) / path.name
        data_name = path.name + ".data"
        if external_data:
            # Copy so that converting to external data never mutates the caller's proto.
            model = _copy(model)
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
            # onnx >= 1.2x creates the data file owner-only (0600), the model file as open()
            # does: a model another user (a container, a web server) could read, its weights not
            os.chmod(Path(tmp_dir) / data_name, plain_mode())
            os.replace(Path(tmp_dir) / data_name, path.parent / data_name)
        else:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink()
        os.rmdir(tmp_dir)
    return path


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


# --- graphsurgeon IR ---------------------------------------------------------------------------

def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    name_nodes(graph)
    return graph


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export, keeping the source model's opsets, producer and metadata."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        model.ir_version = max(like.ir_version, MIN_IR_VERSION)
        del model.opset_import[:]
        model.opset_import.extend(like.opset_import)
        model.producer_name = like.producer_name or "surgeon"
        model.producer_version = like.producer_version
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model


# Constants from this size on leave the exported proto of a statistics pass (detach_large)
DETACH_BYTES = 1 << 20
IN_MEMORY_DTYPES = {"float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                    "uint64", "bool"}


def detach_large(graph: gs.Graph, min_bytes: int = DETACH_BYTES) -> dict[str, np.ndarray]:
    """Take the large constants' values out of `graph` (a copy the caller owns): each keeps its
    name, dtype and shape in the exported proto as external data the session is given in memory
    (validate.session's `initializers`), returned here by name. Exporting and serialising a pass's
    part of VGG-19 copied its 548 MB of weights four times (6.5 s); protobuf copies bytes at a few
    hundred MB/s."""
    out: dict[str, np.ndarray] = {}
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or t.name in out:
            continue
        shape, dtype = tuple(t.shape or ()), t.dtype
        # onnxruntime takes numpy's own number types in memory; bfloat16 / float8 (ml_dtypes), strings
        # and constants exported in another type than they are stored in stay in the proto
        if np.dtype(dtype).name not in IN_MEMORY_DTYPES or getattr(t, "export_dtype", dtype) != dtype:
            continue
        code = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        if np.dtype(dtype).itemsize * int(np.prod(shape)) < min_bytes:
            continue
        values = np.ascontiguousarray(t.values)
        proto = onnx.TensorProto(name=t.name, data_type=code, dims=shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "surgeon-in-memory"), ("offset", "0"), ("length", str(values.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        t.values = gs.ir.tensor.LazyValues(proto)
        out[t.name] = values
    return out


def name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes stable names (`Conv_0`, `Conv_1`, ...) so reports and --layers can refer to them."""
    seen = {n.name for n in graph.nodes if n.name}
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        if node.name:
            continue
        while True:
            name = f"{node.op}_{counts[node.op]}"
            counts[node.op] += 1
            if name not in seen:
                break
        node.name = name
        seen.add(name)


def _name_node_protos(model: onnx.ModelProto) -> None:
    """Unnamed nodes get stable names (`Conv_0`, `Conv_1`, ...) so reports and --layers can refer to them."""
    seen = {n.name for n in model.graph.node if n.name}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.name:
            continue
        while f"{node.op_type}_{counts[node.op_type]}" in seen:
            counts[node.op_type] += 1
        node.name = f"{node.op_type}_{counts[node.op_type]}"
        seen.add(node.name)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes and constant subgraphs (e.g. ConstantOfShape weights) into initializers.

    Also drops initializers listed as graph inputs (ir_version < 4 style), which would
    otherwise make every weight look like a runtime input.
    """
    model = _copy(model)
    _name_node_protos(model)
    graph = gs.import_onnx(model)
    inits = {t.name for t in model.graph.initializer}
    graph.inputs = [t for t in graph.inputs if t.name not in inits]
    needs_folding = any(n.op in ("Constant", "ConstantOfShape") for n in graph.nodes) or any(
        n.op in ("Shape", "Unsqueeze", "Reshape", "Cast", "Transpose", "Identity") and
        all(isinstance(t, gs.Constant) for t in n.inputs) for n in graph.nodes)
    if needs_folding:
        try:
            graph.fold_constants(error_ok=False)
        except Exception as exc:  # graphsurgeon runs onnxruntime on the constant subgraph
            log.warning("constant folding failed (%s); continuing with Constant nodes in place", _first_line(exc))
            graph = gs.import_onnx(model)
            graph.inputs = [t for t in graph.inputs if t.name not in inits]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = max(model.ir_version, MIN_IR_VERSION)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    return out


# --- signatures --------------------------------------------------------------------------------

def input_signature(model: onnx.ModelProto) -> list[tuple[str, list[int | str | None], np.dtype]]:
    """(name, dims, dtype) for each real graph input; dims are ints, dim_param strings or None."""
    inits = {t.name for t in model.graph.initializer}
    sig = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):  # a sequence, map or optional input: nothing we can feed
            sig.append((vi.name, [], np.dtype(object)))
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except (KeyError, ValueError, TypeError):  # undefined or exotic element types
            dtype = np.dtype(object)
        sig.append((vi.name, dims, dtype))
    return sig


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that survives models too large for the in-memory pass."""
    try:
        if model.ByteSize() < TWO_GB:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.info("shape inference failed: %s", _first_line(exc))
    return model


@contextlib.contextmanager
def scratch_cwd():
    """Run onnxruntime's tools in a throwaway working directory: its symbolic shape inference
    writes `sym_shape_infer_temp.onnx` into the cwd when it gives up, and nothing of ours may
    appear next to the user's files."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="surgeon-") as scratch:
        os.chdir(scratch)
        try:
            yield scratch
        finally:
            os.chdir(old)
