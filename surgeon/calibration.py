"""Calibration and validation inputs: read from .npz/.npy, or synthesized from the input signature.

A `DataSet` holds whole arrays (samples along axis 0) keyed by input name, plus optional
labels, and hands them out in batches that fit the model's batch dimension.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from surgeon.errors import UsageError
from surgeon.model import input_signature

DEFAULT_SYNTHETIC_SAMPLES = 8


@dataclass
class DataSet:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    synthetic: bool = False
    source: str = ""
    batch: int | None = None  # the model's static batch size; None when it is free

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches; a model with a static batch dim gets exactly that many rows."""
        step = self.batch or size or len(self)
        n = len(self)
        stop = n - n % step if self.batch else n
        for start in range(0, stop, step):
            yield {k: v[start:start + step] for k, v in self.inputs.items()}

    def batch_labels(self, size: int | None = None) -> Iterator[np.ndarray]:
        step = self.batch or size or len(self)
        n = len(self)
        stop = n - n % step if self.batch else n
        for start in range(0, stop, step):
            yield self.labels[start:start + step]

    def first_batch(self, size: int = 1) -> dict[str, np.ndarray]:
        step = self.batch or size
        return {k: v[:step] for k, v in self.inputs.items()}

    def take(self, n: int) -> "DataSet":
        return DataSet({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.synthetic, self.source, self.batch)

    def rows(self, start: int, stop: int) -> "DataSet":
        return DataSet({k: v[start:stop] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[start:stop], self.synthetic, self.source,
                       self.batch)


def parse_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """`name=1x3x224x224` (repeatable) -> {name: (1, 3, 224, 224)}."""
    shapes = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise UsageError(f"bad --shape {spec!r}: expected NAME=DxDxD, e.g. input=1x3x224x224") from None
    return shapes


def resolve_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                   batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: given ones win; a dynamic leading (batch) dim becomes `batch`;
    any other dynamic dim must be given with --shape."""
    overrides = dict(overrides or {})
    sig = input_signature(model)
    names = {n for n, _, _ in sig}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {', '.join(unknown)}; inputs are: {', '.join(sorted(names))}")
    shapes = {}
    for name, dims, _ in sig:
        if name in overrides:
            given = overrides[name]
            if len(given) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims, given)):
                raise UsageError(f"--shape {name}={'x'.join(map(str, given))} does not fit the model's input "
                                 f"{_show(dims)}")
            shapes[name] = tuple(given)
            continue
        out = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif i == 0:
                out.append(batch)
            else:
                raise UsageError(f"input '{name}' has dynamic dimension {i} ({d or '?'}) in {_show(dims)}; "
                                 f"set it with --shape {name}=" + "x".join(
                                     str(x) if isinstance(x, int) and x > 0 else ("1" if j == 0 else "?")
                                     for j, x in enumerate(dims)))
        shapes[name] = tuple(out)
    return shapes


def _show(dims) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in dims) + "]"


def static_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, if every input fixes its leading dim to the same value."""
    firsts = {dims[0] for _, dims, _ in input_signature(model) if dims}
    if len(firsts) == 1:
        (b,) = firsts
        if isinstance(b, int) and b > 0:
            return b
    return None


def synthesize(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
               samples: int = DEFAULT_SYNTHETIC_SAMPLES, seed: int = 0) -> DataSet:
    """Seeded random inputs that follow the input signature (standard normal for floats)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or resolve_shapes(model)
    batch = static_batch(model)
    rows = max(samples, batch or 1)
    inputs = {}
    for name, _, dtype in input_signature(model):
        shape = (rows,) + tuple(shapes[name][1:])
        if np.issubdtype(dtype, np.floating):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            inputs[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            inputs[name] = rng.integers(0, 8, shape).astype(dtype)
    return DataSet(inputs, None, synthetic=True, source=f"synthesized (seed {seed})", batch=batch)


def load_data(path: str | Path, model: onnx.ModelProto, labels_key: str = "labels",
              limit: int | None = None) -> DataSet:
    """Read inputs (and labels) from .npz (keys = input names) or .npy (the single input)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such data file")
    sig = input_signature(model)
    names = [n for n, _, _ in sig]
    try:
        if path.suffix == ".npy":
            if len(names) != 1:
                raise UsageError(f"{path}: a .npy file feeds a single input, but the model has {len(names)} "
                                 f"({', '.join(names)}); use an .npz keyed by input name")
            arrays = {names[0]: np.load(path, allow_pickle=False)}
            labels = None
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            labels = arrays.pop(labels_key, None)
    except UsageError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path}: cannot read as .npz/.npy ({exc})") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(sorted(arrays)) or 'none'}"
                         f" (keys must be the model's input names)")
    inputs = {}
    for name, dims, dtype in sig:
        a = arrays[name]
        if a.ndim != len(dims):
            raise UsageError(f"{path}: '{name}' has shape {list(a.shape)}, the model wants {_show(dims)} "
                             f"(samples along the first axis)")
        for i, (have, want) in enumerate(zip(a.shape[1:], dims[1:]), start=1):
            if isinstance(want, int) and want > 0 and have != want:
                raise UsageError(f"{path}: '{name}' has shape {list(a.shape)}, the model wants {_show(dims)}")
        if a.dtype != dtype:
            if np.issubdtype(dtype, np.floating) and (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                a = a.astype(dtype)
            else:
                raise UsageError(f"{path}: '{name}' is {a.dtype}, the model wants {np.dtype(dtype)}")
        inputs[name] = a
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise UsageError(f"{path}: inputs have different sample counts {sorted(counts)}")
    if labels is not None and len(labels) != counts.pop():
        raise UsageError(f"{path}: '{labels_key}' has {len(labels)} rows, inputs have {len(next(iter(inputs.values())))}")
    ds = DataSet(inputs, labels, synthetic=False, source=str(path), batch=static_batch(model))
    if ds.batch and len(ds) < ds.batch:
        raise UsageError(f"{path}: {len(ds)} samples, fewer than the model's fixed batch of {ds.batch}")
    return ds.take(limit) if limit else ds
