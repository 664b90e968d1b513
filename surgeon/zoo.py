"""Model-zoo architectures shipped inside the onnx package, with weights made real.

`onnx/backend/test/data/light/*.onnx` holds ResNet-50, VGG-19, Inception, DenseNet, ...
with every weight produced by a ConstantOfShape node filled with 0.02. That is fine for
testing graph handling, useless for numerics: a constant kernel is rank one. `materialize`
folds those constants and fills each weight with seeded He-normal values (BatchNorm gets
positive variances), so decompositions and drift see tensors shaped like a real network's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from surgeon.errors import UsageError
from surgeon.model import fold_constants

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("light_") for p in LIGHT_DIR.glob("light_*.onnx"))


def path(name: str) -> Path:
    p = LIGHT_DIR / f"light_{name}.onnx"
    if not p.exists():
        raise UsageError(f"no model-zoo architecture '{name}'; the onnx package ships: {', '.join(available())}")
    return p


def load(name: str, seed: int = 0) -> onnx.ModelProto:
    """A zoo architecture with folded, seeded random weights (deterministic for a seed)."""
    return materialize(onnx.load(str(path(name))), seed)


def materialize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    model = fold_constants(model)
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    new: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        ins = list(node.input)
        def shape(i):
            return tuple(inits[ins[i]].dims) if i < len(ins) and ins[i] in inits else None
        if node.op_type in ("Conv", "ConvTranspose") and shape(1):
            w = shape(1)
            fan_in = int(np.prod(w[1:]))
            new.setdefault(ins[1], rng.standard_normal(w) * np.sqrt(2.0 / fan_in))
            if shape(2):
                new.setdefault(ins[2], rng.standard_normal(shape(2)) * 0.01)
        elif node.op_type == "Gemm" and shape(1):
            w = shape(1)
            new.setdefault(ins[1], rng.standard_normal(w) * np.sqrt(1.0 / min(w)))
            if shape(2):
                new.setdefault(ins[2], rng.standard_normal(shape(2)) * 0.01)
        elif node.op_type == "BatchNormalization" and all(shape(i) for i in range(1, 5)):
            c = shape(1)
            new.setdefault(ins[1], rng.uniform(0.5, 1.0, c))
            new.setdefault(ins[2], rng.standard_normal(c) * 0.05)
            new.setdefault(ins[3], rng.standard_normal(c) * 0.05)
            new.setdefault(ins[4], rng.uniform(0.5, 1.5, c))
        elif node.op_type == "Mul" and any(shape(i) for i in (0, 1)):  # BN written as Mul + Add
            for i in (0, 1):
                if shape(i):
                    new.setdefault(ins[i], rng.uniform(0.5, 1.0, shape(i)))
        elif node.op_type == "Add" and any(shape(i) for i in (0, 1)):
            for i in (0, 1):
                if shape(i):
                    new.setdefault(ins[i], rng.standard_normal(shape(i)) * 0.05)
    for t in model.graph.initializer:
        if t.name in new and t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    return model


def set_batchnorm_statistics(model: onnx.ModelProto, data, batch: int = 8) -> onnx.ModelProto:
    """Each BatchNormalization's running mean and variance set to the per-channel statistics its
    input really has on `data` (a surgeon.calibration.DataSet), in graph order, so every earlier
    layer is already normalized when a later one is measured.

    Seeded weights with made-up statistics leave a deep residual network badly scaled: the
    activations grow block by block, the logits are huge and a Softmax output is one-hot, so
    a small change anywhere flips the answer and drift says little. With its statistics from
    data, the network is where training starts from: every BatchNormalization output has
    the mean beta and the standard deviation gamma on that data. Returns a new model."""
    from surgeon.validate import stream_tensors
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type != "BatchNormalization" or not all(n in inits for n in node.input[3:5]):
            continue
        n = 0
        s1 = s2 = 0.0
        for got in stream_tensors(out, [node.input[0]], data, batch=batch):
            x = got[node.input[0]].astype(np.float64)
            axes = (0,) + tuple(range(2, x.ndim))
            s1 = s1 + x.sum(axes)
            s2 = s2 + (x * x).sum(axes)
            n += x.size // x.shape[1]
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        for name, v in ((node.input[3], mean), (node.input[4], var)):
            inits[name].CopyFrom(numpy_helper.from_array(v.astype(np.float32), name))
    return out
