"""Calibration and validation inputs: read from .npz/.npy, or synthesized from the input signature.

A `DataSet` holds whole arrays (samples along axis 0) keyed by input name, plus optional
labels, and hands them out in batches that fit the model's batch dimension.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from surgeon.errors import UsageError
from surgeon.model import input_signature

DEFAULT_SYNTHETIC_SAMPLES = 8

log = logging.getLogger(__name__)


@dataclass
class DataSet:
    """Samples along axis 0 of each array. A model without a batch axis (a scalar input, or
    inputs whose fixed leading dims differ, like MatMul(A[2,3], B[3,4])) is `stacked`: row i
    of every array is one whole feed, and batches are single feeds."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    synthetic: bool = False
    source: str = ""
    batch: int | None = None  # the model's static batch size; None when it is free
    stacked: bool = False
    warnings: tuple[str, ...] = ()  # about the file's contents (integers fed to a float input, unscaled)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches; a model with a static batch dim gets exactly that many rows."""
        if self.stacked:
            for i in range(len(self)):
                yield {k: v[i] for k, v in self.inputs.items()}
            return
        step = self.batch or size or len(self)
        n = len(self)
        stop = n - n % step if self.batch else n
        for start in range(0, stop, step):
            yield {k: v[start:start + step] for k, v in self.inputs.items()}

    def batch_labels(self, size: int | None = None) -> Iterator[np.ndarray]:
        if self.stacked:
            yield from (self.labels[i:i + 1] for i in range(len(self)))
            return
        step = self.batch or size or len(self)
        n = len(self)
        stop = n - n % step if self.batch else n
        for start in range(0, stop, step):
            yield self.labels[start:start + step]

    def first_batch(self, size: int = 1) -> dict[str, np.ndarray]:
        if self.stacked:
            return {k: v[0] for k, v in self.inputs.items()}
        step = self.batch or size
        return {k: v[:step] for k, v in self.inputs.items()}

    def take(self, n: int) -> "DataSet":
        return self.rows(0, n)

    def rows(self, start: int, stop: int) -> "DataSet":
        return replace(self, inputs={k: v[start:stop] for k, v in self.inputs.items()},
                       labels=None if self.labels is None else self.labels[start:stop])


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
                   batch: int = 1, *, required: bool = True) -> dict[str, tuple[int, ...] | None]:
    """Concrete input shapes: given ones win; a dynamic leading (batch) dim becomes `batch`.

    Any other dynamic dim must be given (with --shape, or by data). With `required=False` an
    input whose shape stays unknown maps to None instead of raising: rewrites never need
    concrete shapes, only measurements do (see `shape_hint` for the line that says what to pass).
    """
    overrides = dict(overrides or {})
    sig = input_signature(model)
    names = {n for n, _, _ in sig}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {', '.join(unknown)}; inputs are: {', '.join(sorted(names))}")
    shapes: dict[str, tuple[int, ...] | None] = {}
    for name, dims, _ in sig:
        if name in overrides and overrides[name] is not None:
            given = overrides[name]
            if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(dims, given)):
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
            elif required:
                raise UsageError(f"input '{name}' has dynamic dimension {i} ({d or '?'}) in {_show(dims)}; "
                                 f"set it with --shape {_shape_template(name, dims)}")
            else:
                out = None
                break
        shapes[name] = tuple(out) if out is not None else None
    return shapes


def _shape_template(name: str, dims) -> str:
    """`images=1x3x?x?`: what to write after --shape, the unknowns left as '?'."""
    return f"{name}=" + "x".join(str(x) if isinstance(x, int) and x > 0 else ("1" if j == 0 else "?")
                                 for j, x in enumerate(dims))


def shape_hint(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...] | None]) -> str | None:
    """One line saying what to pass when some input shapes are unknown (None when all are known)."""
    missing = [(n, dims) for n, dims, _ in input_signature(model) if shapes.get(n) is None]
    if not missing:
        return None
    return ("input " + ", ".join(f"'{n}' {_show(d)}" for n, d in missing) + " has dynamic dimensions; pass --data, or "
            + " ".join(f"--shape {_shape_template(n, d)}" for n, d in missing) + " with the ?s filled in")


def shapes_from_data(data: "DataSet | None") -> dict[str, tuple[int, ...]]:
    """Input shapes of one batch of a data set (the model's fixed batch, or 1; a stacked set's
    rows are whole feeds)."""
    if data is None:
        return {}
    if data.stacked:
        return {k: tuple(v.shape[1:]) for k, v in data.inputs.items()}
    return {k: (data.batch or 1,) + tuple(v.shape[1:]) for k, v in data.inputs.items()}


def unbatched(model: onnx.ModelProto) -> bool:
    """True when the inputs share no batch axis: a scalar input, or leading dims that differ
    where one of them is fixed (A[2,3] with B[3,4]; X[N] with Splits[3])."""
    sig = [dims for _, dims, _ in input_signature(model)]
    if any(len(d) == 0 for d in sig):
        return True
    firsts = {d[0] for d in sig}
    return len(firsts) > 1 and any(isinstance(f, int) and f > 0 for f in firsts)


def _show(dims) -> str:
    # parentheses, not brackets: a console that reads markup (rich) would take "[batch, 3, h, w]" for a tag
    return "(" + ", ".join(str(d) if d not in (None, "") else "?" for d in dims) + ")"


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
    odd = [n for n, _, dtype in input_signature(model) if dtype == np.dtype(object)]
    if odd:
        raise UsageError(f"cannot synthesize inputs: input(s) {', '.join(odd)} are not plain tensors "
                         "(sequence, map or an unsupported element type)")
    shapes = {**resolve_shapes(model, required=False), **(shapes or {})}
    hint = shape_hint(model, shapes)
    if hint:
        raise UsageError(f"cannot synthesize inputs: {hint}")
    stacked = unbatched(model)
    batch = None if stacked else static_batch(model)
    rows = max(samples, batch or 1)
    inputs = {}
    for name, _, dtype in input_signature(model):
        shape = (rows,) + (tuple(shapes[name]) if stacked else tuple(shapes[name][1:]))
        if np.issubdtype(dtype, np.floating):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            inputs[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            inputs[name] = rng.integers(0, _index_bound(model, name), shape).astype(dtype)
    return DataSet(inputs, None, synthetic=True, source=f"synthesized (seed {seed})", batch=batch, stacked=stacked)


def _index_bound(model: onnx.ModelProto, name: str, default: int = 8) -> int:
    """Integer inputs are often indices (token ids into an embedding table): keep them below the
    size of every constant table they index through Gather, so synthesized rows are valid."""
    inits = {t.name: t for t in model.graph.initializer}
    bound = default
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            dims = inits[n.input[0]].dims
            if dims:
                bound = min(bound, max(1, int(dims[axis])))
    return bound


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
    warnings = []
    stacked = unbatched(model)
    for name, dims, dtype in sig:
        a = arrays[name]
        if stacked:  # one feed per row; a single feed without the row axis is one row
            a = a[None] if a.ndim == len(dims) else a
            if a.ndim != len(dims) + 1 or any(isinstance(w, int) and w > 0 and h != w for h, w in zip(a.shape[1:], dims)):
                raise UsageError(f"{path}: '{name}' has shape {list(a.shape)}, the model wants {_show(dims)} "
                                 "(one whole input per row: this model has no batch axis)")
            inputs[name] = a.astype(dtype) if a.dtype != dtype and np.issubdtype(dtype, np.floating) else a
            continue
        if a.ndim != len(dims):
            raise UsageError(f"{path}: '{name}' has shape {list(a.shape)}, the model wants {_show(dims)} "
                             f"(samples along the first axis)")
        for i, (have, want) in enumerate(zip(a.shape[1:], dims[1:]), start=1):
            if isinstance(want, int) and want > 0 and have != want:
                raise UsageError(f"{path}: '{name}' has shape {list(a.shape)}, the model wants {_show(dims)}")
        if a.dtype != dtype:
            if np.issubdtype(dtype, np.floating) and (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                if np.issubdtype(a.dtype, np.integer) and a.size:
                    # Right for a model fed raw pixels (the ddddocr detector), wrong for one fed
                    # normalised values (EfficientNet-Lite0): calibration and drift would then
                    # both run on inputs the model never sees, and agree with each other.
                    warnings.append(f"{path}: '{name}' is {a.dtype} ({a.min()}..{a.max()}); the model takes "
                                    f"{np.dtype(dtype)}, so it is fed these values as they are, unscaled: "
                                    "apply the model's own preprocessing first if it expects normalised inputs")
                    log.warning(warnings[-1])
                a = a.astype(dtype)
            else:
                raise UsageError(f"{path}: '{name}' is {a.dtype}, the model wants {np.dtype(dtype)}")
        inputs[name] = a
    for name, a in inputs.items():
        # One NaN pixel in EfficientNet-Lite0's calibration photos failed 26 layers' fits with
        # numpy's "array must not contain infs or NaNs", naming neither the file nor the sample.
        bad = ~np.isfinite(a) if np.issubdtype(a.dtype, np.floating) else None
        if bad is not None and bad.any():
            rows = np.flatnonzero(bad.reshape(len(a), -1).any(1)) if a.ndim else np.zeros(1, int)
            raise UsageError(f"{path}: '{name}' holds {int(bad.sum())} NaN/Inf value(s), in {len(rows)} sample(s) "
                             f"(the first: row {int(rows[0])}); calibration and drift need finite inputs")
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise UsageError(f"{path}: inputs have different sample counts {sorted(counts)}")
    if labels is not None and len(labels) != counts.pop():
        raise UsageError(f"{path}: '{labels_key}' has {len(labels)} rows, inputs have {len(next(iter(inputs.values())))}")
    ds = DataSet(inputs, labels, synthetic=False, source=str(path), batch=None if stacked else static_batch(model),
                 stacked=stacked, warnings=tuple(warnings))
    if ds.batch and len(ds) < ds.batch:
        raise UsageError(f"{path}: {len(ds)} samples, fewer than the model's fixed batch of {ds.batch}")
    return ds.take(limit) if limit else ds


# --- calibration rows vs evaluation rows --------------------------------------------------------

@dataclass
class DataSplit:
    """What plugins may fit on (`calib`) and what validation scores (`eval`): never the same rows."""

    calib: DataSet | None
    eval: DataSet | None
    note: str = ""  # how the rows were split, or why there are none
    warning: str = ""  # what the user should hear about: validation scoring the rows fitted on
    unsynthesizable: str = ""  # why inputs could not be synthesized (string or sequence inputs)

    def to_json(self) -> dict:
        def part(ds: DataSet | None) -> dict | None:
            return None if ds is None else {"source": ds.source, "rows": len(ds), "synthetic": ds.synthetic,
                                            **({"warnings": list(ds.warnings)} if ds.warnings else {})}
        return {"calibration": part(self.calib), "evaluation": part(self.eval), "note": self.note}


def split(given: DataSet | None, calib: DataSet | None, *, needs_calibration: bool,
          calib_rows: int | None = None) -> DataSplit:
    """Keep the rows a plugin fits on out of the rows validation scores.

    --calib and --data: each is used for its own purpose. Only --data, with a plugin that fits
    on data: the first `calib_rows` rows (default a third, at least 1) calibrate and the rest
    are scored. Only --data otherwise: every row is scored."""
    if calib is not None:
        same = ""
        if given is not None and given.source and given.source == calib.source:
            same = "--calib and --data name the same file: validation scores the rows the plugins fitted on"
        return DataSplit(calib, given, same, warning=same)
    if given is None:
        return DataSplit(None, None)
    if not needs_calibration:
        return DataSplit(None, given, "")
    n = len(given)
    k = calib_rows if calib_rows is not None else max(1, n // 3)
    step = given.batch or 1
    if k >= n or n - k < step:
        raise UsageError(f"{given.source}: {n} rows cannot be split into calibration rows and evaluation rows "
                         f"(--calib-rows {k}); pass a separate --calib file or more rows")
    return DataSplit(given.rows(0, k), given.rows(k, n),
                     f"rows 0-{k - 1} of {given.source} calibrate, rows {k}-{n - 1} are scored")
