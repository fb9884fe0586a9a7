"""Shape operations, views and data movement: `reshape transpose slice concat pad
one_hot` and indexing `x[i, a:b]` (`gather` has its own module, `ops.gather`).

Requires `ops.core`; produces their operations.  Reshape, transpose, indexing and
`broadcast` (made by gradients: a tensor repeated along axes, numpy's
`broadcast_to`) are views: the partitioner re-indexes the operand's elements, no
vertex, no copy.  `concat` and `pad` make a new tensor each part is copied into (a
pad's border is filled by vertices every step), and so does `place`, the gradient
of a view leaf (its elements put back where the view took them, zeros elsewhere);
`one_hot` places vertices where its rows go.  Leaves (`tensor`,
`view` of a graph tensor) are here too.

Gradients are written in terms of each other: reshape's is a reshape, transpose's
the inverse transpose, an index's a pad, a pad's an index, concat's an index per
part.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.index import Strided, as_array
from popdsl.ir.index import broadcast_to as broadcast_index
from popdsl.ir.tensor import Node
from popdsl.ops.core import Builder, Function, OpDef, Param, shape_str

# Data-movement codelets, one per storage type.
FILL = {"f32": "Fill", "i32": "FillI", "f16": "FillH", "bool": "FillB"}


# ---------------------------------------------------------------- shape rules

def reshape(b: Builder, x: Node, shape, span) -> Node:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        b.err(span, "reshape: the shape must be a list of integers")
    shape = list(shape)
    if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
        b.err(span, f"reshape: bad shape {shape_str(shape)}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if known == 0 or x.numel % known:
            b.err(span, f"cannot reshape {shape_str(x.shape)} to {shape_str(shape)}")
        shape[shape.index(-1)] = x.numel // known
    if int(np.prod(shape)) != x.numel:
        b.err(span, f"cannot reshape {shape_str(x.shape)} ({x.numel} elements) to {shape_str(shape)}")
    if tuple(shape) == x.shape:
        return x
    return b.make("reshape", (x,), (tuple(shape),), tuple(shape), x.dtype)


def transpose(b: Builder, x: Node, perm, span) -> Node:
    r = len(x.shape)
    perm = list(range(r))[::-1] if perm is None else perm
    if not isinstance(perm, list) or sorted(perm) != list(range(r)):
        b.err(span, f"transpose: perm must be a permutation of 0..{r - 1} for shape {shape_str(x.shape)}")
    if perm == list(range(r)):
        return x
    return b.make("transpose", (x,), (tuple(perm),), tuple(x.shape[p] for p in perm), x.dtype)


def index(b: Builder, x: Node, key: list, span) -> Node:
    """key: per leading axis an int or (lo, hi), already range-checked."""
    shape = []
    for i, n in enumerate(x.shape):
        if i < len(key) and isinstance(key[i], int):
            continue
        shape.append(key[i][1] - key[i][0] if i < len(key) else n)
    return b.make("index", (x,), (tuple(tuple(k) if isinstance(k, tuple) else k for k in key),),
                  tuple(shape), x.dtype)


def slice_(b: Builder, x: Node, axis: int, start: int, stop: int, span) -> Node:
    if not -len(x.shape) <= axis < len(x.shape):
        b.err(span, f"slice: axis {axis} is out of range for shape {shape_str(x.shape)}")
    axis %= len(x.shape)
    n = x.shape[axis]
    if not 0 <= start < stop <= n:
        b.err(span, f"slice: {start}:{stop} is out of range for axis {axis} of {shape_str(x.shape)}")
    key = [(0, x.shape[i]) for i in range(axis)] + [(start, stop)]
    return index(b, x, key, span)


def concat(b: Builder, xs: list, axis: int, span) -> Node:
    if not xs:
        b.err(span, "concat needs at least one tensor")
    r = len(xs[0].shape)
    if not -r <= axis < r:
        b.err(span, f"concat: axis {axis} is out of range for shape {shape_str(xs[0].shape)}")
    axis %= r
    for x in xs[1:]:
        if len(x.shape) != r or any(p != q for i, (p, q) in enumerate(zip(x.shape, xs[0].shape)) if i != axis) \
                or x.dtype != xs[0].dtype:
            b.err(span, f"concat: {xs[0].dtype}{shape_str(xs[0].shape)} and {x.dtype}{shape_str(x.shape)} "
                  f"differ outside axis {axis}")
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return b.make("concat", tuple(xs), (axis,), tuple(shape), xs[0].dtype)


def pad(b: Builder, x: Node, pads, value, span) -> Node:
    value = _fill_value(b, x.dtype, value, span)
    r = len(x.shape)
    if isinstance(pads, int) and not isinstance(pads, bool):
        pads = [[pads, pads]] * r
    ok = isinstance(pads, list) and len(pads) == r and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in p)
        for p in pads)
    if not ok:
        b.err(span, f"pad: give one [before, after] pair of non-negative integers per axis of {shape_str(x.shape)}")
    pads_t = tuple((p[0], p[1]) for p in pads)
    shape = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape, pads_t))
    return b.make("pad", (x,), (pads_t, value), shape, x.dtype)


def _fill_value(b: Builder, dtype: str, value, span):
    """`value` as an element of `dtype`: true/false (or 1/0) for bool, an integer for
    i32, any number for floats; anything else an error rather than a silent cast."""
    if dtype == "bool":
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return bool(value)
        b.err(span, f"pad: the value for a bool tensor must be true or false, found {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        b.err(span, f"pad: value must be a number, found {type(value).__name__}")
    if dtype == "i32":
        if float(value) != int(value) or not -2**31 <= int(value) < 2**31:
            b.err(span, f"pad: the value for an i32 tensor must be an i32 integer, found {value!r}")
        return int(value)
    return float(value)


def one_hot(b: Builder, y: Node, depth: int, span) -> Node:
    if y.dtype != "i32":
        b.err(span, f"one_hot: labels must be i32, found {y.dtype}")
    if depth < 1:
        b.err(span, "one_hot: depth must be positive")
    return b.make("one_hot", (y,), (depth,), y.shape + (depth,), "f32")


def broadcast_to(b: Builder, x: Node, shape) -> Node:
    """x repeated along axes to `shape` (numpy's broadcast_to; a view)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    return b.make("broadcast", (x,), (shape,), shape, x.dtype)


def place(b: Builder, g: Node, index: np.ndarray, shape, dtype: str) -> Node:
    """A tensor of `shape`: g's elements at flat positions `index` (g's shape, no
    position twice), zeros elsewhere.  Not interned: it carries an index array."""
    return b.t.make("place", (g,), (tuple(shape),), tuple(shape), dtype, index=index)


# ---------------------------------------------------------------- gradient rules

def _g_reshape(b, n, g, i):
    return reshape(b, g, list(n.args[0].shape), None)


def _g_transpose(b, n, g, i):
    return transpose(b, g, [int(k) for k in np.argsort(n.attrs[0])], None)


def _g_index(b, n, g, i):
    """An index's gradient: g padded with zeros back to the operand's shape (an
    integer index first becomes an axis of one)."""
    x = n.args[0]
    key = n.attrs[0]
    kept, pads = [], []
    for ax, size in enumerate(x.shape):
        k = key[ax] if ax < len(key) else (0, size)
        lo, hi = (k, k + 1) if isinstance(k, int) else k
        kept.append(hi - lo)
        pads.append([lo, size - hi])
    return pad(b, reshape(b, g, kept, None), pads, 0.0, None)


def _g_pad(b, n, g, i):
    return index(b, g, [(lo, lo + size) for size, (lo, _) in zip(n.args[0].shape, n.attrs[0])], None)


def _g_concat(b, n, g, i):
    axis = n.attrs[0]
    at = sum(a.shape[axis] for a in n.args[:i])
    key = [(0, size) for size in n.shape[:axis]] + [(at, at + n.args[i].shape[axis])]
    return index(b, g, key, None)




# ---------------------------------------------------------------- numpy references

def _index_ref(attrs, x):
    return x[tuple(slice(*k) if isinstance(k, tuple) else k for k in attrs[0])]


def _pad_ref(attrs, x):
    pads, value = attrs
    return np.pad(x, pads, constant_values=np.asarray(value).astype(x.dtype))


def _place_ref(attrs, index, g):
    out = np.zeros(attrs[0], g.dtype)
    out.reshape(-1)[index.ravel()] = g.ravel()
    return out


def _one_hot_ref(attrs, y):
    if y.size and (y.min() < 0 or y.max() >= attrs[0]):
        raise ValueError(f"one_hot: label outside 0..{attrs[0] - 1}")
    return (y[..., None] == np.arange(attrs[0])).astype(np.float32)


# ---------------------------------------------------------------- partition rules

def partition_tensor(p, n: Node) -> g.View:
    t = p.g.tensors[n.attrs[0]]
    return g.View(t.id, Strided.whole(t.shape), p.span)


def partition_view(p, n: Node) -> g.View:
    # A Poplar-level view is an index array (reshape(beta, [C, 1, 1]) of a param);
    # as a strided view where it is one, element-wise ops read it by runs, not by an
    # index per element (ResNet-50's batch norms: one 4-byte copy an element).
    index = n.index
    if isinstance(index, np.ndarray):
        index = Strided.of(index) or index
    return g.View(n.attrs[0], index, p.span)


def partition_reshape(p, n: Node) -> g.View:
    v = p.value(n.args[0])
    return g.View(v.tensor, v.index.reshape(n.shape), v.span)


def partition_transpose(p, n: Node) -> g.View:
    v = p.value(n.args[0])
    return g.View(v.tensor, v.index.transpose(n.attrs[0]), v.span)


def partition_broadcast(p, n: Node) -> g.View:
    v = p.value(n.args[0])
    return g.View(v.tensor, broadcast_index(v.index, n.shape), v.span)


def partition_index(p, n: Node) -> g.View:
    v = p.value(n.args[0])
    key = tuple(slice(*k) if isinstance(k, tuple) else k for k in n.attrs[0])
    idx = v.index[key]
    return g.View(v.tensor, idx if isinstance(idx, Strided) else np.asarray(idx), v.span)   # an array even for one element


def fill(p, view: g.View, value: float, dtype: str, label: str) -> None:
    cs = p.new_cs(label + ".fill")
    codelet = p.prim(FILL[dtype])
    flat = as_array(view.index).ravel()
    for size, pos, tiles in p.chunks(p.g.mappings[view.tensor].tile_of(flat)):
        p.group(cs, codelet, tiles, {"y": (view.tensor, flat[pos])}, {"v": value})


def padded(p, x: g.View, pads, value: float, dtype: str, label: str) -> g.View:
    """A new tensor: x surrounded by `value`, refreshed every step."""
    shape = tuple(n + a + b for n, (a, b) in zip(x.index.shape, pads))
    out = p.new_tensor(label, dtype, shape)
    p.ensure_mapped(x)
    at = tuple(slice(a, a + n) for n, (a, _) in zip(x.index.shape, pads))
    # A border element goes with its nearest interior element: x's tiles, their
    # edges repeated outwards (no coordinates per element).
    p.set_tiles(out.tensor, np.pad(p.tiles_of(x), pads, mode="edge"))
    border = np.ones(shape, bool)
    border[at] = False
    if border.any():                      # `out` is new: its elements are their flat positions
        fill(p, g.View(out.tensor, np.flatnonzero(border), out.span), value, dtype, label)
    p.seq.append(g.Copy(x, g.View(out.tensor, out.index[at], out.span), p.span))
    return out


def subsampled(p, x: g.View, kh: int, kw: int, stride: int, oh: int, ow: int, label: str) -> tuple[g.View, int]:
    """The input a convolution's tasks read, and its stride.  A 1 x 1 kernel with a
    stride reads only every stride-th row and column: those elements are copied, on
    the tiles that hold them, into a tensor of their own, convolved with stride 1 —
    as PopLibs' planner expands a kernel-1 dimension (poplin ConvTransforms.cpp,
    expandSpatialDim: the input subsampled by the stride, the stride set to 1) and
    rearranges the result.  The tasks then receive only the elements they read (a
    quarter of the rows' elements at stride 2), in contiguous rows, and the AMP
    streams contiguous rows.  (As a view, the elements would reach the tasks one at
    a time: a third more copy runs over ResNet-50's training step at batch 1.)"""
    if not (kh == kw == 1 and stride > 1):
        return x, stride
    view = g.View(x.tensor, x.index[:, :, ::stride, ::stride][:, :, :oh, :ow], x.span)
    return p.copied(view, label + ".subsampled"), 1


def partition_pad(p, n: Node) -> g.View:
    pads, value = n.attrs
    return padded(p, p.value(n.args[0]), pads, value, n.dtype, p.name(n))


def partition_place(p, n: Node) -> g.View:
    """g's elements copied to where the view took them (mapped where g is), the
    other elements zero, filled every step."""
    v = p.value(n.args[0])
    label = p.name(n)
    out = p.new_tensor(label, n.dtype, n.shape)
    p.ensure_mapped(v)
    dst = out.index.reshape(-1)[n.index]
    tile_of = np.full(math.prod(n.shape), -1, np.int32)
    tile_of[as_array(dst).ravel()] = p.tiles_of(v).ravel()
    rest = np.flatnonzero(tile_of < 0)
    if rest.size:
        tile_of[rest] = p.linear(rest.size)
    p.set_tiles(out.tensor, tile_of)
    if rest.size:
        fill(p, g.View(out.tensor, rest, out.span), 0.0, n.dtype, label)
    p.seq.append(g.Copy(v, g.View(out.tensor, dst, out.span), p.span))
    return g.View(out.tensor, out.index, out.span)


def partition_concat(p, n: Node) -> g.View:
    axis = n.attrs[0]
    out = p.new_tensor(p.name(n), n.dtype, n.shape)
    tile_of = np.full(math.prod(n.shape), -1, np.int32)
    at = 0
    for a in n.args:
        v = p.value(a)
        p.ensure_mapped(v)
        k = v.index.shape[axis]
        dst = out.index[(slice(None),) * axis + (slice(at, at + k),)]
        tile_of[as_array(dst).ravel()] = p.tiles_of(v).ravel()
        p.seq.append(g.Copy(v, g.View(out.tensor, dst, out.span), p.span))
        at += k
    p.set_tiles(out.tensor, tile_of)
    return out


def partition_one_hot(p, n: Node) -> g.View:
    y = p.value(n.args[0])
    depth = n.attrs[0]
    flat = y.index.reshape(-1)
    out = p.new_tensor(p.name(n), "f32", (flat.size, depth))
    p.ensure_mapped(y)
    label_tiles = p.g.mappings[y.tensor].tile_of(as_array(flat))
    p.set_tiles(out.tensor, np.repeat(label_tiles, depth))
    cs = p.new_cs(p.name(n))
    for size, pos, tiles in p.chunks(label_tiles, grain=1):
        p.group(cs, p.prim("OneHot"), tiles, {"labels": (y.tensor, flat[pos]), "y": (out.tensor, out.index[pos])})
    p.record(n, cs)
    return g.View(out.tensor, out.index.reshape(n.shape), out.span)


# ---------------------------------------------------------------- the table's entries

def _moves(n: Node) -> int:
    return 0                         # data movement: no arithmetic


def op_defs() -> list[OpDef]:
    return [
        OpDef("tensor", "leaf", "a tensor of the graph", partition=partition_tensor),
        OpDef("view", "leaf", "elements of a tensor of the graph, as a Poplar-level view", partition=partition_view),
        OpDef("reshape", "view", "the same elements in a new shape", ref=lambda at, x: x.reshape(at[0]),
              partition=partition_reshape, grad=_g_reshape),
        OpDef("transpose", "view", "axes permuted", ref=lambda at, x: x.transpose(at[0]),
              partition=partition_transpose, grad=_g_transpose),
        OpDef("index", "view", "x[i, a:b]", ref=_index_ref, partition=partition_index, grad=_g_index),
        OpDef("broadcast", "view", "x repeated along axes (numpy's broadcast_to)",
              ref=lambda at, x: np.broadcast_to(x, at[0]), partition=partition_broadcast,
              grad=lambda b, n, g, i: g),             # the pass sums the repeated axes
        OpDef("place", "compute", "g's elements where a view took them, zeros elsewhere", ref=_place_ref,
              partition=partition_place, codelets=tuple(FILL.values()), flops=_moves),
        OpDef("concat", "compute", "tensors joined along an axis",
              ref=lambda at, *xs: np.concatenate(xs, axis=at[0]), partition=partition_concat, flops=_moves,
              grad=_g_concat),
        OpDef("pad", "compute", "x surrounded by a value", ref=_pad_ref, partition=partition_pad,
              codelets=tuple(FILL.values()), flops=_moves, grad=_g_pad),
        OpDef("one_hot", "compute", "1.0 where the class is the label", ref=_one_hot_ref,
              partition=partition_one_hot, codelets=("OneHot",), flops=_moves,
              explain={("OneHot", "y", 1): "one_hot: label {index} is outside 0..{size} - 1 (one_hot(y, {size}))"}),
    ]


def functions() -> list[Function]:
    return [
        Function("reshape", (Param("x", "tensor"), Param("shape", "any")),
                 lambda b, a, span: reshape(b, a["x"], a["shape"], span), "the same elements in a new shape"),
        Function("transpose", (Param("x", "tensor"), Param("perm", "any", None)),
                 lambda b, a, span: transpose(b, a["x"], a["perm"], span), "axes permuted (reversed by default)"),
        Function("slice", (Param("x", "tensor"), Param("axis", "int"), Param("start", "int"), Param("stop", "int")),
                 lambda b, a, span: slice_(b, a["x"], a["axis"], a["start"], a["stop"], span),
                 "elements start..stop of an axis"),
        Function("concat", (Param("xs", "tensors"), Param("axis", "int", 0)),
                 lambda b, a, span: concat(b, a["xs"], a["axis"], span), "tensors joined along an axis"),
        Function("pad", (Param("x", "tensor"), Param("pads", "any"), Param("value", "any", 0.0)),
                 lambda b, a, span: pad(b, a["x"], a["pads"], a["value"], span),
                 "x with [before, after] elements of `value` around each axis"),
        Function("one_hot", (Param("y", "tensor"), Param("depth", "int")),
                 lambda b, a, span: one_hot(b, a["y"], a["depth"], span), "one-hot rows of f32"),
    ]
