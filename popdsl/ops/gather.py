"""gather(x, indices, axis): numpy's `take`, and its gradient.

Requires `ops.shape` (views, one_hot) and `ops.linalg` (its gradient is a one-hot
matrix product, a scatter-add: the rows of g summed into the rows they were gathered
from), which is why it has a module of its own: those two cannot import each other.
Produces the `gather` operation: its shape rule, numpy reference, partition rule
(vertices where the output rows go, each reading the whole of x) and gradient.
Negative indices count from the end; one outside -n..n-1 is a runtime error.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.ops import elementwise, linalg
from popdsl.ops.core import Builder, Function, OpDef, Param, shape_str
from popdsl.ops.shape import _moves, one_hot, reshape, transpose

# One codelet per storage type.
GATHER = {"f32": "GatherRows", "i32": "GatherRowsI", "f16": "GatherRowsH", "bool": "GatherRowsB"}


def gather(b: Builder, x: Node, idx: Node, axis: int, span) -> Node:
    if idx.dtype != "i32":
        b.err(span, f"gather: indices must be i32, found {idx.dtype}")
    if not x.shape or not -len(x.shape) <= axis < len(x.shape):
        b.err(span, f"gather: axis {axis} is out of range for shape {shape_str(x.shape)}")
    axis %= len(x.shape)
    shape = x.shape[:axis] + idx.shape + x.shape[axis + 1:]
    return b.make("gather", (x, idx), (axis,), shape, x.dtype)


def _g_gather(b, n, g, i):
    """dx = one_hot(idx)^T @ g with the gathered axis first: each row of g added to
    the row it came from (a scatter-add as a matrix product)."""
    x, idx = n.args
    axis = n.attrs[0]
    rank, k = len(x.shape), len(idx.shape)
    rest = x.shape[:axis] + x.shape[axis + 1:]
    m, size = idx.numel, x.shape[axis]
    # g: x.shape[:axis] + idx.shape + x.shape[axis + 1:], the index axes moved first.
    gt = transpose(b, g, list(range(axis, axis + k)) + list(range(axis)) + list(range(axis + k, rank - 1 + k)), None)
    g2 = reshape(b, gt, [m, int(np.prod(rest, dtype=np.int64))], None)
    wrapped = elementwise.select(b, elementwise.apply(b, "lt", [idx, b.const(0, "i32")], None),
                                 elementwise.apply(b, "add", [idx, b.const(size, "i32")], None), idx, None)
    rows = transpose(b, one_hot(b, reshape(b, wrapped, [m], None), size, None), None, None)
    dx = reshape(b, linalg.matmul(b, rows, g2, None), [size, *rest], None)
    return transpose(b, dx, list(range(1, axis + 1)) + [0] + list(range(axis + 1, rank)), None)


def _gather_ref(attrs, x, idx):
    return np.take(x, idx, axis=attrs[0])         # negative indices count from the end


def partition_gather(p, n: Node) -> g.View:
    axis = n.attrs[0]
    x, idx = p.value(n.args[0]), p.value(n.args[1])
    xi = np.moveaxis(x.index, axis, 0)
    rows = xi.reshape(xi.shape[0], -1)
    flat_idx = idx.index.reshape(-1)
    m, d = flat_idx.size, rows.shape[1]
    out = p.new_tensor(p.name(n), n.dtype, (m, d))
    p.ensure_mapped(x)
    p.ensure_mapped(idx)
    row_tiles = p.linear(m, grain=1)
    p.set_tiles(out.tensor, np.repeat(row_tiles, d))
    cs = p.new_cs(p.name(n))
    codelet = p.prim(GATHER[n.dtype])
    for size, pos, tiles in p.chunks(row_tiles, grain=1):
        p.group(cs, codelet, tiles, {"x": (x.tensor, np.broadcast_to(rows, (len(tiles),) + rows.shape)),
                                     "idx": (idx.tensor, flat_idx[pos]),
                                     "y": (out.tensor, out.index[pos])})
    p.record(n, cs)
    res = out.index.reshape(idx.index.shape + xi.shape[1:])
    res = np.moveaxis(res, list(range(idx.index.ndim)), list(range(axis, axis + idx.index.ndim)))
    return g.View(out.tensor, res, out.span)


def op_defs() -> list[OpDef]:
    return [
        OpDef("gather", "compute", "x's slices at indices along an axis", ref=_gather_ref,
              partition=partition_gather, codelets=tuple(GATHER.values()), flops=_moves, grad=_g_gather,
              explain={(c, "x", 0): "gather: an index is out of range for an axis of size {size} "
                                    "(numpy's take allows -{size} to {size} - 1)"
                       for c in GATHER.values()}),
    ]


def functions() -> list[Function]:
    return [
        Function("gather", (Param("x", "tensor"), Param("indices", "tensor"), Param("axis", "int", 0)),
                 lambda b, a, span: gather(b, a["x"], a["indices"], a["axis"], span), "numpy's take"),
    ]
