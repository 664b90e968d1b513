"""Which channels of a network hang together: dependency groups for structured pruning, on ONNX.

The idea of torch-pruning's DepGraph, done on an onnx-graphsurgeon graph. Every output channel
of a layer that owns its weights (Conv / ConvTranspose with group 1, Gemm, MatMul with a
constant 2-D right operand) is an *atom*. The tracer walks the graph once in topological order
and gives each tensor it can follow a channel map: for every position on the tensor's channel
axis, the atom it carries. Ops that must keep channels aligned unify atoms (union-find):

* Add / Sum / Sub / Mul / Max / Min with several traced inputs (residual blocks, and the
  squeeze-and-excitation product trunk * sigmoid(fc(pool(trunk)))),
* a depthwise conv (group == input channels) maps its output channel o to input channel
  o // multiplier: it follows its input, and its own weights are pruned with it.

Concat concatenates maps (offsets shift by themselves), Split / Slice on the channel axis cut
them, Flatten / Reshape to [N, C*H*W] repeat each atom over the H*W block of a following
Gemm / MatMul. Element-wise activations, pooling, Resize, Pad, Dropout pass maps through.

A class of unified atoms is a *slot*: one channel that is either kept everywhere or removed
everywhere. Layers connected through shared slots form a *group* (a residual stage of
ResNet-50 is one group of 16 layers), scored and pruned as a whole.

Exactness. Removal is compared with *masking*: a masked channel has its member's weight slice
W[j] and bias b[j] set to zero, and so are gamma[j] and beta[j] of the BatchNormalization
(and the constant of a per-channel Add / Sub) that directly follows the member, so the
channel's output is exactly 0 (`mask_channels`). A consumer that drops the channel gives the
same result as a consumer that sees a zero there, so removal == masking holds as long as the
channel is still exactly zero where it is consumed. The tracer checks that: f(0) = 0 ops
(Relu, Clip around 0, Tanh, SiLU's Mul, pooling, Resize, zero Pad) keep the zero; an op with
f(0) != 0 (Sigmoid, Softplus, Exp, a BatchNormalization or bias Add that is not part of a
member's head) makes it a constant instead, which Mul with a zero channel cancels (SE) and
anything else would leak. Slots that would leak, reach a graph output, or pass an op the tracer
cannot follow (Reshape mixing the channel axis, Gather / Transpose / Softmax on it, unknown ops,
grouped convs) are *fixed*, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from surgeon.rewrite import constant_value, input_or_none, not_constant

log = logging.getLogger(__name__)

# element-wise / spatial ops that carry each channel through on its own; True when f(0) == 0
UNARY = {
    "Relu": True, "LeakyRelu": True, "Tanh": True, "HardSwish": True, "Elu": True, "Selu": True, "Celu": True,
    "Gelu": True, "Softsign": True, "Identity": True, "Neg": True, "Abs": True, "Sqrt": True, "Erf": True,
    "Cast": True, "Sign": True, "Floor": True, "Ceil": True, "Round": True, "Sin": True, "Mish": True,
    "ThresholdedRelu": True, "Shrink": True, "MaxPool": True, "AveragePool": True, "LpPool": True,
    "GlobalAveragePool": True, "GlobalMaxPool": True, "GlobalLpPool": True, "Dropout": True,
    "Sigmoid": False, "HardSigmoid": False, "Softplus": False, "Exp": False, "Cos": False, "Log": False,
    "Reciprocal": False,
}
ADDITIVE = {"Add", "Sum", "Sub", "Max", "Min"}  # zero out only when every input is zero
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd"}


@dataclass
class ChannelMap:
    """The atom carried at each position of a tensor's channel axis.

    `axis` counts from the end (-3 for NCHW, -1 for [N, F] or [b, s, h]); `rank` is the tensor's
    rank when known. `flat` marks a Flatten output whose H*W repeat is learnt at its consumer.
    `exact` says a masked channel is still exactly zero here (`why` says what broke it).
    `head` is the member whose output (or head) this tensor is, while that holds.
    """

    atoms: tuple[int, ...]
    axis: int = -3
    rank: int | None = 4
    flat: bool = False
    exact: bool = True
    why: str = ""
    head: "Member | None" = None

    def but(self, **kw) -> "ChannelMap":
        d = dict(atoms=self.atoms, axis=self.axis, rank=self.rank, flat=self.flat, exact=self.exact,
                 why=self.why, head=None)
        d.update(kw)
        return ChannelMap(**d)

    @property
    def positive_axis(self) -> int | None:
        return self.rank + self.axis if self.rank is not None else None


@dataclass
class Member:
    """A node whose output channels are pruned: a layer that owns them, or a depthwise conv."""

    node: gs.Node
    kind: str  # conv | convT | gemm | matmul | depthwise
    atoms: tuple[int, ...]  # per output channel
    head: list[gs.Node] = field(default_factory=list)  # BN / per-channel Add, Mul after it

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class Cut:
    """A constant or attribute that follows the channel axis somewhere: what to slice on removal.

    kind: 'in' (consumer weight; `axis` into the weight), 'const' (per-channel constant input
    `index`, aligned from the end at `axis`), 'split', 'slice', 'resize', 'reshape'.
    `atoms` is the channel map at that point (after Flatten expansion for 'in')."""

    kind: str
    node: gs.Node
    index: int
    axis: int
    atoms: tuple[int, ...]
    extra: dict = field(default_factory=dict)


@dataclass
class Group:
    """Layers whose channels are pruned together, and their slots (one per distinct channel)."""

    members: list[Member]
    slots: list[int]  # slot ids (union-find roots), in the first member's channel order
    fixed: dict[int, str]  # slot -> why it must stay

    @property
    def name(self) -> str:
        return self.members[0].name

    @property
    def layers(self) -> list[str]:
        return [m.name for m in self.members if m.kind != "depthwise"]


@dataclass
class Analysis:
    groups: list[Group]
    members: list[Member]
    cuts: list[Cut]
    segments: list[tuple[int, ...]]  # slots of a member, Split part or Slice range: each keeps >= 1
    sinks: dict[str, tuple[int, ...]]  # tensor consumed by a channel-dropping consumer -> slots per position
    sink_axes: dict[str, int]  # that tensor's channel axis (from the end)
    untraced: list[tuple[str, str, str]]  # (node, op, why) for layers that could own channels but do not
    find: "UnionFind"
    graph: gs.Graph

    def slot_of(self, atom: int) -> int:
        return self.find(atom)


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> tuple[int, ...]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return tuple(range(start, start + n))

    def __call__(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self(a), self(b)
        if ra != rb:  # the smaller id stays the root, so slot ids follow graph order
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo


# --- the tracer --------------------------------------------------------------------------------

class _Tracer:
    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[int, ...]] | None) -> None:
        self.graph = graph
        self.shapes = shapes or {}
        self.uf = UnionFind()
        self.maps: dict[str, ChannelMap] = {}
        self.members: list[Member] = []
        self.cuts: list[Cut] = []
        self.segments: list[tuple[int, ...]] = []
        self.fixed: dict[int, str] = {}  # atom -> reason (first one wins)
        self.sinks: dict[str, tuple[int, ...]] = {}
        self.sink_axes: dict[str, int] = {}
        self.untraced: list[tuple[str, str, str]] = []

    # helpers
    def fix(self, atoms: Iterable[int], reason: str) -> None:
        for a in atoms:
            self.fixed.setdefault(a, reason)

    def get(self, t: gs.Tensor | None) -> ChannelMap | None:
        return self.maps.get(t.name) if t is not None and t.name else None

    def put(self, t: gs.Tensor, m: ChannelMap) -> None:
        self.maps[t.name] = m

    def sink(self, node: gs.Node, index: int, m: ChannelMap, width: int, waxis: int) -> bool:
        """A consumer that drops input channels: weight `waxis` has `width` entries on the traced axis."""
        atoms = m.atoms
        if m.flat:
            if width % len(atoms):
                self.fix(atoms, f"{node.op} {node.name}: {width} inputs are not a multiple of {len(atoms)} channels")
                return False
            rep = width // len(atoms)
            atoms = tuple(a for a in atoms for _ in range(rep))  # C-major: channel c is rows [c*HW, (c+1)*HW)
        if len(atoms) != width:
            self.fix(atoms, f"{node.op} {node.name}: weight has {width} inputs, the tracer counted {len(atoms)}")
            return False
        if not m.exact:
            self.fix(atoms, f"pruned channels would not be zero at {node.op} {node.name} ({m.why})")
            return False
        name = node.inputs[index].name
        self.cuts.append(Cut("in", node, 1, waxis, atoms, {"tensor": name}))
        self.sinks[name] = atoms
        self.sink_axes[name] = m.axis
        return True

    def new_member(self, node: gs.Node, kind: str, count: int, axis: int, rank: int | None) -> ChannelMap:
        atoms = self.uf.new(count)
        mem = Member(node, kind, atoms)
        self.members.append(mem)
        return ChannelMap(atoms, axis=axis, rank=rank, head=mem)

    def run(self) -> None:
        for node in self.graph.nodes:
            mapped = {i: self.get(t) for i, t in enumerate(node.inputs) if self.get(t) is not None}
            handled = getattr(self, "op_" + node.op, self.op_unknown)(node, mapped)
            for i, m in mapped.items():
                if i not in (handled or ()):
                    self.fix(m.atoms, f"input {i} of {node.op} {node.name} (the tracer cannot follow channels there)")
        for t in self.graph.outputs:
            m = self.get(t)
            if m is not None:
                self.fix(m.atoms, f"reaches graph output '{t.name}'")

    # --- layers that own channels ---
    def op_Conv(self, node, mapped):
        w = constant_value(node.inputs[1])
        x = mapped.get(0)
        if w is None:
            self.untraced.append((node.name, node.op, not_constant(node.inputs[1])))
            return ()
        group = int(node.attrs.get("group", 1))
        if group == 1:
            if x is not None:
                self.sink(node, 0, x, w.shape[1], 1)
            self.put(node.outputs[0], self.new_member(node, "conv", w.shape[0], -(w.ndim - 1), w.ndim))
            return (0,)
        if x is not None and w.shape[1] == 1 and group == len(x.atoms) and not x.flat:
            mult = w.shape[0] // group
            atoms = tuple(x.atoms[o // mult] for o in range(w.shape[0]))
            mem = Member(node, "depthwise", atoms)
            self.members.append(mem)
            # its own weights and bias are masked with the channel, so the output is exactly zero
            self.put(node.outputs[0], ChannelMap(atoms, axis=x.axis, rank=x.rank, head=mem))
            return (0,)
        if x is not None:
            self.fix(x.atoms, f"grouped conv {node.name} (group={group}) consumes these channels")
        self.untraced.append((node.name, node.op, f"grouped conv (group={group})"))
        return (0,)

    def op_ConvTranspose(self, node, mapped):
        w = constant_value(node.inputs[1])  # [c_in, c_out/group, k, k]
        x = mapped.get(0)
        group = int(node.attrs.get("group", 1))
        if w is None or group != 1:
            if x is not None:
                self.fix(x.atoms, f"ConvTranspose {node.name}: " + ("weight is not constant" if w is None
                                                                      else f"group={group}"))
            self.untraced.append((node.name, node.op, "weight is not constant" if w is None else f"group={group}"))
            return (0,)
        if x is not None:
            self.sink(node, 0, x, w.shape[0], 0)
        self.put(node.outputs[0], self.new_member(node, "convT", w.shape[1], -(w.ndim - 1), w.ndim))
        return (0,)

    def op_Gemm(self, node, mapped):
        w = constant_value(node.inputs[1])
        x = mapped.get(0)
        trans_b = int(node.attrs.get("transB", 0))
        if w is None or int(node.attrs.get("transA", 0)) or w.ndim != 2:
            why = "weight is not constant" if w is None else "transA=1"
            if x is not None:
                self.fix(x.atoms, f"Gemm {node.name}: {why}")
            self.untraced.append((node.name, node.op, why))
            return (0,)
        c = input_or_none(node, 2)
        if c is not None and constant_value(c) is None:
            if x is not None:
                self.fix(x.atoms, f"Gemm {node.name}: bias is not constant")
            self.untraced.append((node.name, node.op, "bias is not constant"))
            return (0,)
        k, f = (w.shape[1], w.shape[0]) if trans_b else w.shape
        if x is not None:
            if x.axis != -1:
                self.fix(x.atoms, f"Gemm {node.name} reads channels on axis {x.axis}")
            else:
                self.sink(node, 0, x, k, 1 if trans_b else 0)
        self.put(node.outputs[0], self.new_member(node, "gemm", f, -1, 2))
        return (0,)

    def op_MatMul(self, node, mapped):
        w = constant_value(node.inputs[1])
        x = mapped.get(0)
        if w is None or w.ndim != 2 or constant_value(node.inputs[0]) is not None:
            if x is not None:
                self.fix(x.atoms, f"MatMul {node.name}: right operand is not a constant matrix")
            if 1 in mapped:
                self.fix(mapped[1].atoms, f"MatMul {node.name}: channels used as a matrix")
            self.untraced.append((node.name, node.op, "right operand is not a constant matrix"))
            return (0, 1)
        if x is not None:
            if x.axis != -1:
                self.fix(x.atoms, f"MatMul {node.name} reads channels on axis {x.axis}")
            else:
                self.sink(node, 0, x, w.shape[0], 0)
        rank = x.rank if x is not None else len(self.shapes.get(node.inputs[0].name, ())) or None
        self.put(node.outputs[0], self.new_member(node, "matmul", w.shape[1], -1, rank))
        return (0,)

    # --- per-channel affine and element-wise ---
    def op_BatchNormalization(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        if x.positive_axis != 1 or x.flat:
            self.fix(x.atoms, f"BatchNormalization {node.name} normalizes another axis")
            return (0,)
        if any(constant_value(t) is None for t in node.inputs[1:5]):
            self.fix(x.atoms, f"BatchNormalization {node.name}: parameters are not constant")
            return (0,)
        for i in range(1, 5):
            self.cuts.append(Cut("const", node, i, -1, x.atoms))
        if self._extends_head(node, x):
            out = x.but(head=x.head)
        else:
            out = x.but(exact=False, why=f"BatchNormalization {node.name} turns a zero channel into its shift")
        self.put(node.outputs[0], out)
        return (0,)

    def _extends_head(self, node, x: ChannelMap) -> bool:
        """`node` (a per-channel affine) is masked with the member when it is the sole reader of
        the member's output or head: then zeroing its shift keeps the channel exactly zero."""
        t = next((i for i in node.inputs if self.get(i) is x), None)
        if x.head is None or t is None or len(t.outputs) != 1 or t.name in {o.name for o in self.graph.outputs}:
            return False
        x.head.head.append(node)
        return True

    def op_InstanceNormalization(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        if x.positive_axis != 1 or any(constant_value(t) is None for t in node.inputs[1:3]):
            self.fix(x.atoms, f"InstanceNormalization {node.name}: cannot follow")
            return (0,)
        for i in (1, 2):
            self.cuts.append(Cut("const", node, i, -1, x.atoms))
        self.put(node.outputs[0], x.but(exact=False, why=f"InstanceNormalization {node.name} adds its bias"))
        return (0,)

    def op_PRelu(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        if not self._const_operand(node, 1, x):
            return (0,)
        self.put(node.outputs[0], x.but())
        return (0, )

    def _const_operand(self, node, index: int, x: ChannelMap) -> bool:
        """A constant operand of an element-wise op with a traced tensor: sliced if it has the
        channel axis, left alone if it broadcasts over it."""
        c = constant_value(node.inputs[index])
        if c is None:
            self.fix(x.atoms, f"{node.op} {node.name} combines the channels with an untraced tensor "
                              f"'{node.inputs[index].name}'")
            return False
        pos = c.ndim + x.axis  # numpy broadcasting aligns from the end
        if pos < 0 or c.shape[pos] == 1:
            return True
        if x.flat or c.shape[pos] != len(x.atoms):
            self.fix(x.atoms, f"{node.op} {node.name}: constant of shape {list(c.shape)} does not match "
                              f"{len(x.atoms)} channels")
            return False
        self.cuts.append(Cut("const", node, index, x.axis, x.atoms))
        return True

    def _elementwise(self, node, mapped):
        op = node.op
        maps = list(mapped.values())
        if not maps:
            return ()
        first = maps[0]
        if op in ("Div", "Pow") and 1 in mapped:
            self.fix([a for m in maps for a in m.atoms], f"{op} {node.name} with a traced divisor or exponent")
            return tuple(mapped)
        for m in maps[1:]:
            if len(m.atoms) != len(first.atoms) or m.axis != first.axis or m.flat != first.flat:
                self.fix([a for mm in maps for a in mm.atoms],
                         f"{op} {node.name} combines tensors of different channel layouts")
                return tuple(mapped)
        for m in maps[1:]:
            for a, b in zip(first.atoms, m.atoms):
                self.uf.union(a, b)
        consts = [i for i in range(len(node.inputs)) if i not in mapped]
        for i in consts:
            if not self._const_operand(node, i, first):
                for m in maps[1:]:
                    self.fix(m.atoms, f"{op} {node.name} combines the channels with an untraced tensor")
                return tuple(mapped)
        if consts and len(maps) == 1 and op in ("Add", "Sub", "Mul", "Div") and self._extends_head(node, first):
            out = first.but(head=first.head)  # a bias or scale right after the layer: masked with it
        elif op == "Mul" or op == "Div":
            exact = any(m.exact for m in maps)
            out = first.but(exact=exact, why="" if exact else first.why)
        elif consts and op != "Mul":
            c = [constant_value(node.inputs[i]) for i in consts]
            zero = all(not np.any(v) for v in c)  # x + 0, max(x, 0): a zero channel stays zero
            out = first.but(exact=first.exact and zero,
                            why=first.why or f"{op} {node.name} adds a constant to a zero channel")
        else:
            exact = all(m.exact for m in maps)
            why = next((m.why for m in maps if not m.exact), "")
            out = first.but(exact=exact, why=why)
        for o in node.outputs[:1]:
            self.put(o, out)
        return tuple(mapped)

    op_Add = op_Sum = op_Sub = op_Mul = op_Max = op_Min = op_Div = _elementwise

    def op_Clip(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        for i, default in ((1, -np.inf), (2, np.inf)):
            t = input_or_none(node, i)
            if t is not None:
                v = constant_value(t)
                if v is None:
                    lo, hi = (np.nan, hi) if i == 1 else (lo, np.nan)
                else:
                    lo, hi = (float(v), hi) if i == 1 else (lo, float(v))
        exact = x.exact and lo <= 0 <= hi
        self.put(node.outputs[0], x.but(exact=exact, why=x.why or f"Clip {node.name} moves 0 to [{lo}, {hi}]"))
        return (0,)

    def op_unknown(self, node, mapped):
        if node.op in UNARY and 0 in mapped:
            x = mapped[0]
            if node.op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool") \
                    and x.positive_axis != 1:
                self.fix(x.atoms, f"{node.op} {node.name} pools over the channel axis")
                return (0,)
            ok = UNARY[node.op]
            self.put(node.outputs[0], x.but(exact=x.exact and ok,
                                            why=x.why or ("" if ok else f"{node.op} {node.name} has f(0) != 0")))
            return (0,)
        if node.op in REDUCE and 0 in mapped:
            return self._reduce(node, mapped[0])
        if mapped:
            self.fix([a for m in mapped.values() for a in m.atoms], f"{node.op} {node.name}: the tracer does not "
                                                                   f"know how {node.op} moves channels")
        if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            self.untraced.append((node.name, node.op, "not traced"))
        return tuple(mapped)

    def _reduce(self, node, x: ChannelMap):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            v = constant_value(node.inputs[1])
            axes = None if v is None else [int(a) for a in v.ravel()]
        keep = int(node.attrs.get("keepdims", 1))
        if axes is None or not keep or x.rank is None or any((a % x.rank) == x.positive_axis for a in axes):
            self.fix(x.atoms, f"{node.op} {node.name} reduces over (or may drop) the channel axis")
            return (0,)
        self.put(node.outputs[0], x.but())
        return (0, 1)

    # --- ops that move channels ---
    def _axis(self, node, x: ChannelMap, attr: int) -> bool:
        """Is the node's axis attribute the traced channel axis?"""
        if attr < 0:
            return attr == x.axis
        return x.positive_axis == attr

    def op_Concat(self, node, mapped):
        axis = int(node.attrs["axis"])
        first = next(iter(mapped.values()), None)
        if first is None:
            return ()
        if not self._axis(node, first, axis) or first.flat:
            return self._elementwise_like(node, mapped)
        atoms: list[int] = []
        exact, why = True, ""
        for i, t in enumerate(node.inputs):
            m = mapped.get(i)
            if m is None:
                shape = self.shapes.get(t.name) or t.shape  # a graph input's or constant's own shape
                pos = first.positive_axis
                if shape is None or pos is None or len(shape) <= pos or not isinstance(shape[pos], int):
                    self.fix([a for mm in mapped.values() for a in mm.atoms],
                             f"Concat {node.name}: input '{t.name}' has an unknown channel count")
                    return tuple(mapped)
                fresh = self.uf.new(int(shape[pos]))
                self.fix(fresh, f"comes from untraced tensor '{t.name}'")
                atoms.extend(fresh)
                if isinstance(t, gs.Constant) and np.any(t.values):
                    exact, why = False, f"Concat {node.name} of a constant"
                continue
            if m.axis != first.axis or m.flat:
                self.fix([a for mm in mapped.values() for a in mm.atoms], f"Concat {node.name}: inputs disagree")
                return tuple(mapped)
            atoms.extend(m.atoms)
            if not m.exact:
                exact, why = False, m.why
        self.put(node.outputs[0], first.but(atoms=tuple(atoms), exact=exact, why=why))
        return tuple(mapped)

    def _elementwise_like(self, node, mapped):
        """Concat / Split on another axis: every traced input must carry the same channels."""
        maps = list(mapped.values())
        if len(mapped) != len([t for t in node.inputs if t.name]):
            self.fix([a for m in maps for a in m.atoms], f"{node.op} {node.name} on a non-channel axis "
                                                         "mixes traced and untraced tensors")
            return tuple(mapped)
        for m in maps[1:]:
            if len(m.atoms) != len(maps[0].atoms) or m.axis != maps[0].axis:
                self.fix([a for mm in maps for a in mm.atoms], f"{node.op} {node.name}: inputs disagree")
                return tuple(mapped)
            for a, b in zip(maps[0].atoms, m.atoms):
                self.uf.union(a, b)
        exact = all(m.exact for m in maps)
        out = maps[0].but(exact=exact, why=next((m.why for m in maps if not m.exact), ""))
        for o in node.outputs:
            self.put(o, out)
        return tuple(mapped)

    def op_Split(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        axis = int(node.attrs.get("axis", 0))
        if not self._axis(node, x, axis):
            for o in node.outputs:
                self.put(o, x.but())
            return (0, 1)
        if x.flat:
            self.fix(x.atoms, f"Split {node.name} on a flattened axis")
            return (0,)
        sizes = node.attrs.get("split")
        t = input_or_none(node, 1)
        if t is not None:
            v = constant_value(t)
            if v is None:
                self.fix(x.atoms, f"Split {node.name}: sizes are not constant")
                return (0, 1)
            sizes = [int(s) for s in v.ravel()]
        n = len(node.outputs)
        if sizes is None:
            if len(x.atoms) % n:
                self.fix(x.atoms, f"Split {node.name}: uneven equal split")
                return (0,)
            sizes = [len(x.atoms) // n] * n
        cuts = np.cumsum([0] + list(sizes))
        if cuts[-1] != len(x.atoms):
            self.fix(x.atoms, f"Split {node.name}: sizes do not add up to {len(x.atoms)} channels")
            return (0, 1)
        self.cuts.append(Cut("split", node, 1, axis, x.atoms, {"sizes": list(sizes)}))
        for o, a, b in zip(node.outputs, cuts[:-1], cuts[1:]):
            part = x.atoms[a:b]
            self.segments.append(part)
            self.put(o, x.but(atoms=part))
        return (0, 1)

    def op_Slice(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        vals = [constant_value(t) if t is not None else None for t in (input_or_none(node, i) for i in range(1, 5))]
        if len(node.inputs) < 3 or any(v is None for v, t in zip(vals, node.inputs[1:5]) if t.name):
            self.fix(x.atoms, f"Slice {node.name}: bounds are not constant (or an old opset's attributes)")
            return tuple(mapped)
        starts, ends = vals[0].ravel(), vals[1].ravel()
        axes = vals[2].ravel() if vals[2] is not None else np.arange(len(starts))
        steps = vals[3].ravel() if vals[3] is not None else np.ones(len(starts), np.int64)
        out_atoms = x.atoms
        for k, ax in enumerate(axes):
            if not self._axis(node, x, int(ax)):
                continue
            if x.flat or steps[k] != 1:
                self.fix(x.atoms, f"Slice {node.name}: step {steps[k]} on the channel axis")
                return tuple(mapped)
            s, e, _ = slice(int(starts[k]), int(ends[k])).indices(len(x.atoms))
            out_atoms = x.atoms[s:e]
            self.cuts.append(Cut("slice", node, k, 0, x.atoms, {"start": s, "end": e}))
            self.segments.append(out_atoms)
        self.put(node.outputs[0], x.but(atoms=out_atoms))
        return tuple(mapped)

    def op_Flatten(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return ()
        axis = int(node.attrs.get("axis", 1))
        if x.positive_axis == 1 and axis == 1 and not x.flat:
            self.put(node.outputs[0], x.but(axis=-1, rank=2, flat=x.rank != 2))
        else:
            self.fix(x.atoms, f"Flatten {node.name} (axis={axis}) mixes the channel axis")
        return (0,)

    def op_Reshape(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return tuple(mapped)
        shape = constant_value(node.inputs[1])
        c = len(x.atoms)
        ok = (shape is not None and shape.size == 2 and x.positive_axis == 1 and not x.flat
              and int(node.attrs.get("allowzero", 0)) == 0
              and (shape[1] == -1 or (shape[1] > 0 and shape[1] % c == 0)))
        if not ok:
            self.fix(x.atoms, f"Reshape {node.name} to {None if shape is None else shape.tolist()} mixes the "
                              "channel axis")
            return (0, 1)
        if shape[1] > 0:
            self.cuts.append(Cut("reshape", node, 1, 1, x.atoms, {"block": int(shape[1]) // c}))
        self.put(node.outputs[0], x.but(axis=-1, rank=2, flat=x.rank != 2))
        return (0,)

    def op_Resize(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return tuple(mapped)
        pos = x.positive_axis
        for i in (1, 2, 3):
            t = input_or_none(node, i)
            if t is None or i == 1:  # roi
                continue
            v = constant_value(t)
            if v is None or pos is None:
                self.fix(x.atoms, f"Resize {node.name}: scales/sizes are not constant")
                return tuple(mapped)
            if i == 2 and v.size and v.ravel()[pos] != 1:
                self.fix(x.atoms, f"Resize {node.name} scales the channel axis")
                return tuple(mapped)
            if i == 3 and v.size:
                self.cuts.append(Cut("resize", node, 3, pos, x.atoms))
        self.put(node.outputs[0], x.but())
        return tuple(mapped)

    op_Upsample = op_Resize

    def op_Pad(self, node, mapped):
        x = mapped.get(0)
        if x is None:
            return tuple(mapped)
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", []))
        axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        pos = x.positive_axis
        if pads is None or pos is None or (axes is not None) or x.flat:
            self.fix(x.atoms, f"Pad {node.name}: pads are not constant or the rank is unknown")
            return tuple(mapped)
        n = pads.size // 2
        if pads.ravel()[pos] or pads.ravel()[pos + n]:
            self.fix(x.atoms, f"Pad {node.name} pads the channel axis")
            return tuple(mapped)
        value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        value = float(np.asarray(value).ravel()[0]) if value is not None and np.size(value) else float(
            node.attrs.get("value", 0.0))
        mode = node.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        exact = x.exact and (mode != "constant" or value == 0)
        self.put(node.outputs[0], x.but(exact=exact, why=x.why or f"Pad {node.name} pads with {value}"))
        return tuple(mapped)


def analyze(graph: gs.Graph, shapes: dict[str, tuple[int, ...]] | None = None) -> Analysis:
    """Trace channels through `graph` (toposorted in place) and group the prunable ones."""
    graph.toposort()
    tr = _Tracer(graph, shapes)
    tr.run()
    uf = tr.uf
    fixed_slots: dict[int, str] = {}
    for atom, why in tr.fixed.items():
        fixed_slots.setdefault(uf(atom), why)
    # members connected through a shared slot form one group
    owner: dict[int, int] = {}
    parent = list(range(len(tr.members)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, mem in enumerate(tr.members):
        for a in mem.atoms:
            s = uf(a)
            if s in owner:
                ri, rj = root(i), root(owner[s])
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            else:
                owner[s] = i
    by_root: dict[int, list[Member]] = {}
    for i, mem in enumerate(tr.members):
        by_root.setdefault(root(i), []).append(mem)
    groups = []
    for mems in by_root.values():
        slots = list(dict.fromkeys(uf(a) for m in mems for a in m.atoms))
        groups.append(Group(mems, slots, {s: fixed_slots[s] for s in slots if s in fixed_slots}))
    sinks = {t: tuple(uf(a) for a in atoms) for t, atoms in tr.sinks.items()}
    # a member must keep one output channel, a Split part or Slice range one channel
    segments = [tuple(uf(a) for a in seg) for seg in tr.segments + [m.atoms for m in tr.members]]
    return Analysis(groups, tr.members, tr.cuts, segments, sinks, tr.sink_axes, tr.untraced, uf, graph)
