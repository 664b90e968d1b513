"""Train the small sample models shipped in ``sample_models/`` and export them to ONNX.

Re-run (from the repository root)::

    pip install torch==2.13.0 scikit-learn && python sample_models/train.py

Torch is needed only by this script; it is never a runtime dependency of the
package. Everything runs on CPU with a single torch thread in a few minutes.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, values
0..16, no network access needed), scaled to [0, 1] and split 75/25 with
``train_test_split(..., stratify=y, random_state=0)`` -> 1347 train / 450 test.

Outputs (all written to a temporary file first, then renamed into place):

* ``digits_cnn.onnx``  CNN on the digits upsampled to 32x32 (bilinear,
  ``scipy.ndimage.zoom(order=1)``).  input ``input`` [N,1,32,32] float32,
  output ``logits`` [N,10]::

      conv1 3x3 1->32   + bn1 + relu1
      conv2 3x3 32->32  + bn2 + relu2 + pool1 (2x2 max) -> 16x16
      conv3 3x3 32->64  + bn3 + relu3
      conv4 3x3 64->64  + bn4 + relu4 + pool2           -> 8x8
      conv5 3x3 64->128 + bn5 + relu5 + pool3           -> 4x4
      flatten -> fc1 2048->128 (Gemm) + relu_fc1 -> fc2 128->10 (Gemm)

  BatchNormalization is NOT fused: every BN stays a separate
  ``BatchNormalization`` node (inference form, one output). This is done
  cleanly by exporting the eval-mode model with the TorchScript exporter
  (``dynamo=False``) and ``training=TrainingMode.PRESERVE`` with constant
  folding off.  Trained with light augmentation (random shifts of up to
  +-3 pixels at 32x32, zero padded).
* ``digits_mlp.onnx``  MLP on the raw 64 features: input ``input`` [N,64],
  output ``logits`` [N,10]; fc1 64->256 + relu1, fc2 256->128 + relu2,
  fc3 128->10 (all Gemm).
* ``digits_{cnn,mlp}_test.npz``  the held-out test split, keys ``input``
  (float32, model-ready) and ``labels`` (int64).
* ``digits_{cnn,mlp}_calib.npz``  128 samples from the TRAIN split, key
  ``input`` only (for int8 calibration).

Export details: opset 17, dynamic leading batch dimension ``N``, weights are
graph initializers (no Constant nodes), node names are the module names
(``conv1``, ``bn1``, ``relu1``, ``pool1``, ``flatten``, ``fc1``, ...).  After
export each model is checked with ``onnx.checker.check_model(full_check=True)``
and run with onnxruntime on the test split; its accuracy (and predictions)
must match torch's.

Determinism: fixed seeds, ``torch.use_deterministic_algorithms(True)``,
``torch.set_num_threads(1)``, explicit ``torch.Generator`` objects for
shuffling/augmentation, and ``.npz`` files written with fixed zip timestamps,
so re-running produces byte-identical outputs on the same torch/onnx versions.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - only hit when torch is missing
    sys.exit("train.py needs torch: pip install torch==2.13.0 scikit-learn")

import onnx
import onnxruntime as ort
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
OPSET = 17
OUT_DIR = Path(__file__).resolve().parent
N_CALIB = 128

CNN_EPOCHS = 30
CNN_BATCH = 64
CNN_MIN_ACC = 0.97
MLP_EPOCHS = 150
MLP_BATCH = 64
MLP_MIN_ACC = 0.95
MAX_SHIFT = 3  # pixels at 32x32, for augmentation


# --------------------------------------------------------------------------- io
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but byte-deterministic (fixed zip timestamps)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, npy.getvalue())
    _atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------- data
def load_data():
    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).astype(np.float32)  # [1797, 64] in [0,1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return x_tr, x_te, y_tr, y_te


def to_32x32(x64: np.ndarray) -> np.ndarray:
    """[M,64] in [0,1] -> [M,1,32,32] float32 via bilinear 4x zoom."""
    imgs = x64.reshape(-1, 8, 8).astype(np.float64)
    out = np.stack([ndimage.zoom(im, 4, order=1, mode="nearest", grid_mode=True) for im in imgs])
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[:, None, :, :]


def random_shift(xb: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each image by an independent integer (dy, dx) in [-s, s], zero fill."""
    n, _, h, w = xb.shape
    padded = F.pad(xb, (max_shift,) * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(xb)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


# ----------------------------------------------------------------------- models
class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128)]
        for i, (cin, cout) in enumerate(chans, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            setattr(self, f"relu{i}", nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128 * 4 * 4, 128)
        self.relu_fc1 = nn.ReLU()
        self.dropout = nn.Dropout(0.3)  # identity in eval mode, not exported
        self.fc2 = nn.Linear(128, 10)

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self._block(2, self._block(1, x)))  # 32 -> 16
        x = self.pool2(self._block(4, self._block(3, x)))  # 16 -> 8
        x = self.pool3(self._block(5, x))  # 8 -> 4
        x = self.relu_fc1(self.fc1(self.flatten(x)))
        return self.fc2(self.dropout(x))


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(256, 128)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------- training
def train(model, x_tr, y_tr, *, epochs, batch, lr, wd, seed, augment=None):
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * ((len(xt) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(0, len(xt), batch):
            idx = perm[s : s + batch]
            xb, yb = xt[idx], yt[idx]
            if augment is not None:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % max(1, epochs // 5) == 0:
            print(f"    epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):.4f}", flush=True)
    model.eval()
    return model


@torch.no_grad()
def torch_logits(model, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


# ----------------------------------------------------------------------- export
def _node_name(torch_name: str, op_type: str) -> str:
    # TorchScript exporter names nodes "/<module path>/<OpType>[_k]" -> "<module path>"
    parts = [p for p in torch_name.split("/") if p]
    if len(parts) >= 2 and parts[-1].split("_")[0] == op_type:
        return ".".join(parts[:-1])
    return torch_name.strip("/").replace("/", ".") or op_type


def _clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    # The exporter de-duplicates equal-valued initializers and re-creates the
    # aliases with Identity nodes; turn those back into plain initializers.
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    # Drop initializers no longer referenced.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    # Module-path node names ("conv1", "bn1", "fc1", ...), unique.
    seen: collections.Counter = collections.Counter()
    for node in g.node:
        name = _node_name(node.name, node.op_type)
        seen[name] += 1
        node.name = name if seen[name] == 1 else f"{name}_{seen[name] - 1}"
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, doc: str) -> onnx.ModelProto:
    model.eval()
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation notice
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=False,
                export_params=True,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization
                do_constant_folding=False,
            )
        m = onnx.load(str(raw))
    m = _clean_graph(m)
    m.doc_string = doc
    m.producer_name = "surgeon sample_models/train.py"
    m.producer_version = f"torch {torch.__version__}"
    onnx.checker.check_model(m, full_check=True)
    assert not any(n.op_type == "Constant" for n in m.graph.node), "weights must be initializers"
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            assert len(n.output) == 1, "BN must be in inference form"
    _atomic_write_bytes(path, m.SerializeToString())
    return onnx.load(str(path))


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def describe(m: onnx.ModelProto) -> str:
    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ops = collections.Counter(n.op_type for n in m.graph.node)
    io_ = ", ".join(f"{v.name}{shape(v)}" for v in list(m.graph.input) + list(m.graph.output))
    return (
        f"opset {m.opset_import[0].version}, ir_version {m.ir_version}; {io_}; "
        f"ops {dict(sorted(ops.items()))}"
    )


# ------------------------------------------------------------------------- main
def build(name, model, x_tr, y_tr, x_te, y_te, min_acc, train_kw):
    print(f"[{name}] params {n_params(model):,}", flush=True)
    t0 = time.time()
    train(model, x_tr, y_tr, **train_kw)
    lt = torch_logits(model, x_te)
    acc_t = float((lt.argmax(1) == y_te).mean())
    print(f"[{name}] trained in {time.time() - t0:.1f}s, torch test acc {acc_t:.4f}", flush=True)
    assert acc_t >= min_acc, f"{name}: test accuracy {acc_t:.4f} < {min_acc}"

    path = OUT_DIR / f"{name}.onnx"
    doc = (
        f"{name}: trained on sklearn load_digits (75/25 stratified split, random_state=0) "
        f"by sample_models/train.py; test accuracy {acc_t:.4f} on {len(y_te)} samples."
    )
    m = export_onnx(model, torch.from_numpy(x_te[:2]), path, doc)
    lo = ort_logits(path, x_te)
    acc_o = float((lo.argmax(1) == y_te).mean())
    max_diff = float(np.abs(lo - lt).max())
    print(f"[{name}] onnxruntime test acc {acc_o:.4f} (max |logit diff| vs torch {max_diff:.2e})")
    assert acc_o == acc_t, f"{name}: ORT accuracy {acc_o} != torch accuracy {acc_t}"
    assert (lo.argmax(1) == lt.argmax(1)).all()
    assert max_diff < 1e-3, max_diff
    print(f"[{name}] {describe(m)}")
    return acc_t, path


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    t_start = time.time()

    x_tr, x_te, y_tr, y_te = load_data()
    calib_idx = np.sort(np.random.default_rng(SEED).choice(len(x_tr), N_CALIB, replace=False))
    print(f"data: {len(x_tr)} train / {len(x_te)} test, calib {N_CALIB} from train")

    summary = []

    # ---- MLP on raw 64 features
    torch.manual_seed(SEED)
    mlp = DigitsMLP()
    acc, path = build(
        "digits_mlp", mlp, x_tr, y_tr, x_te, y_te, MLP_MIN_ACC,
        dict(epochs=MLP_EPOCHS, batch=MLP_BATCH, lr=3e-3, wd=1e-4, seed=SEED + 1),
    )
    save_npz(OUT_DIR / "digits_mlp_test.npz", input=x_te, labels=y_te)
    save_npz(OUT_DIR / "digits_mlp_calib.npz", input=x_tr[calib_idx])
    summary.append(("digits_mlp", n_params(mlp), acc, path))

    # ---- CNN on 32x32 upsampled images
    x_tr32, x_te32 = to_32x32(x_tr), to_32x32(x_te)
    torch.manual_seed(SEED)
    cnn = DigitsCNN()
    acc, path = build(
        "digits_cnn", cnn, x_tr32, y_tr, x_te32, y_te, CNN_MIN_ACC,
        dict(epochs=CNN_EPOCHS, batch=CNN_BATCH, lr=3e-3, wd=5e-4, seed=SEED + 2,
             augment=lambda xb, g: random_shift(xb, g, MAX_SHIFT)),
    )
    save_npz(OUT_DIR / "digits_cnn_test.npz", input=x_te32, labels=y_te)
    save_npz(OUT_DIR / "digits_cnn_calib.npz", input=x_tr32[calib_idx])
    summary.append(("digits_cnn", n_params(cnn), acc, path))

    print("\nsummary")
    for name, p, a, path in summary:
        print(f"  {name:<11} params {p:>8,}  test acc {a:.4f}  {path.stat().st_size / 1e6:.2f} MB")
    print(f"total time {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
