"""Reductions: `sum mean max min argmax (x, axis = A | [A, ...], keepdims = b)`.

Requires `ops.core` and `ops.blocks`; produces the `reduce` operation (attrs: kind,
axes, keepdims; `mean` is a sum divided by the count) and its partition rule: the
reduced axes are moved last and each row is reduced on the tile that holds its first
element; a few long rows (at least TWO_STAGE_MIN elements) are first split into
partial sums on the tiles holding each part.  `sum_partials` (adding up the partial
sums a split matmul or convolution leaves) lives here too, and `unbroadcast`, the
one place gradients sum the axes an operand was broadcast along.

Gradients: a sum's is g repeated along the reduced axes (a broadcast view); a max's
or min's goes to the elements equal to the result, shared evenly between ties (as
PyTorch's amax); argmax's result is an integer and carries none.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.index import Batch, Strided, as_array, unique
from popdsl.ir.mapping import Mapping
from popdsl.ir.tensor import Node
from popdsl.ops import elementwise
from popdsl.ops.blocks import blocks, bounds, emit_classes, map_whole, shape_classes, stacked, task_grid, vertex_split
from popdsl.ops.shape import broadcast_to, reshape
from popdsl.ops.core import FLOATS, Builder, Function, OpDef, Param

TWO_STAGE_MIN = 2048          # a reduction row at least this long may be split
KINDS = ("sum", "max", "min", "argmax")

CODELETS = {("sum", "f32"): "ReduceSum", ("max", "f32"): "ReduceMax", ("min", "f32"): "ReduceMin",
            ("argmax", "f32"): "ReduceArgMax", ("sum", "i32"): "ReduceSumI",
            ("max", "i32"): "ReduceMaxI", ("min", "i32"): "ReduceMinI", ("argmax", "i32"): "ReduceArgMaxI"}


# ---------------------------------------------------------------- shape rule

def reduction(b: Builder, op: str, x: Node, axis, keepdims: bool, span) -> Node:
    if x.dtype == "bool" and op != "argmax":
        b.err(span, f"{op} of a bool tensor: convert it with f32(...) or i32(...) first")
    if not x.shape:
        b.err(span, f"{op} needs a tensor with at least one dimension")
    axes = b.axes(x, axis, span, op)
    if op == "argmax" and len(axes) != 1:
        b.err(span, "argmax reduces exactly one axis: give axis = N")
    shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape) if keepdims or i not in axes)
    if op == "mean" and x.dtype not in FLOATS:
        b.err(span, "mean of an i32 tensor: convert with f32(...)")
    # The codelets reduce f32 or i32: f16 is reduced in f32 and the result rounded
    # back (as numpy's float16 sum accumulates in float32), bools are argmaxed as i32.
    dtype = x.dtype
    if x.dtype == "f16":
        x = elementwise.cast(b, "f32", x)
    elif x.dtype == "bool":
        x = elementwise.cast(b, "i32", x)
    if op == "mean":
        s = b.make("reduce", (x,), ("sum", axes, keepdims), shape, x.dtype)
        k = int(np.prod([x.shape[i] for i in axes]))
        return elementwise.cast(b, dtype, elementwise.apply(b, "div", [s, b.const(k, "f32")], span))
    if op == "argmax":
        return b.make("reduce", (x,), (op, axes, keepdims), shape, "i32")
    return elementwise.cast(b, dtype, b.make("reduce", (x,), (op, axes, keepdims), shape, x.dtype))


def _g_reduce(b: Builder, n: Node, g: Node, i: int) -> Node:
    kind, axes, keepdims = n.attrs
    x = n.args[0]
    kept = [1 if a in axes else size for a, size in enumerate(x.shape)]
    gk = reshape(b, g, kept, None)
    if kind == "sum":
        return broadcast_to(b, gk, x.shape)
    hit = elementwise.apply(b, "eq", [x, reshape(b, n, kept, None)], None)
    share = reduction(b, "sum", elementwise.cast(b, "f32", hit), list(axes), True, None)
    return elementwise.select(b, hit, elementwise.apply(b, "div", [gk, share], None), b.const(0.0, "f32"), None)


def unbroadcast(b: Builder, g: Node, shape) -> Node:
    """g summed over the axes an operand of `shape` was broadcast along (the leading
    axes it lacks and those where it has 1), in the operand's shape."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = len(g.shape) - len(shape)
    axes = list(range(lead)) + [lead + a for a, size in enumerate(shape) if size == 1 and g.shape[lead + a] != 1]
    summed = reduction(b, "sum", g, axes, False, None) if axes else g
    return reshape(b, summed, list(shape), None)


def _ref(attrs, x):
    kind, axes, keepdims = attrs
    if kind == "argmax":
        r = np.argmax(x, axis=axes[0])
        return np.expand_dims(r, axes[0]) if keepdims else r
    fn = {"sum": np.sum, "max": np.max, "min": np.min}[kind]
    return fn(x, axis=axes, keepdims=keepdims)


# ---------------------------------------------------------------- partition rule

def reduce_rows(p, kind: str, src: g.View, dtype: str, out_dtype: str, label: str, shape=None) -> g.View:
    """Reduce the last axis of a 2-D view [R, K] into a new tensor of R elements (of
    `shape`, [R] by default), returned as a view [R]."""
    R, K = src.index.shape
    p.ensure_mapped(src)
    codelet = p.prim(CODELETS[(kind, "i32" if dtype == "i32" else "f32")])
    rows = src.index
    # Rows longer than a tile's share of the input (fewer rows than half the tiles)
    # are split into blocks reduced where they live: one vertex reducing a whole
    # row would receive all of it (batch norm's statistics at batch 2: 37 KB
    # buffers, a GC200 tile over its memory).
    if kind != "argmax" and R * 2 <= p.tiles and K >= TWO_STAGE_MIN:
        parts = max(2, min(p.tiles // max(R, 1), K // 512))
        bl = blocks(K, parts)
        partial = p.new_tensor(f"{label}.partial", out_dtype, (R, len(bl)))
        cs = p.new_cs(label + ".partial")
        # A task per row and block of it (all at once), where the block's first
        # element lives; its partial result there too -- unless that piles more
        # than twice a tile's share of blocks onto one tile: then they are spread
        # evenly (ResNet-50 at batch 8: sixteen 25 KB blocks of the stem's batch
        # norm gradient started on one tile, 401 KB of exchange buffers).
        r, j = task_grid(R, len(bl))
        first, end = bounds(bl)
        lo, hi = first[j], end[j]
        tiles = _unpiled(p, p.g.mappings[src.tensor].tiles_at(rows[:, first]).reshape(-1).astype(np.int32))
        map_whole(p, partial.tensor, (R * len(bl),), tiles)

        def conns(v):
            size = int(hi[v[0]] - lo[v[0]])
            return {"a": (src.tensor, stacked(rows, (r[v], (lo[v], hi[v])), (1, size))),
                    "y": (partial.tensor, stacked(partial.index, (r[v], (j[v], j[v] + 1)), (1,)))}
        emit_classes(p, cs, codelet, tiles, shape_classes(hi - lo), conns, {})
        src, rows = partial, partial.index
        R, K = rows.shape
        codelet = p.prim(CODELETS[(kind, "i32" if out_dtype == "i32" else "f32")])
    out = p.new_tensor(label, out_dtype, shape or (R,))
    out = g.View(out.tensor, out.index.reshape(R), out.span)
    # Each row is reduced where its first element lives -- unless the rows are long
    # (mostly on other tiles anyway) and more than twice a tile's share of them
    # start on one tile: then they are spread evenly, so no vertex receives a pile
    # of whole rows (ResNet-50 at batch 8: eleven rows of 56 x 56, 138 KB, on one
    # tile, where the convolution before left their first elements).
    row_tiles = p.g.mappings[src.tensor].tiles_at(rows[:, 0])
    if K >= TWO_STAGE_MIN and R:
        row_tiles = _unpiled(p, row_tiles)
    p.set_tiles(out.tensor, row_tiles)
    cs = p.new_cs(label)
    for size, pos, tiles in p.chunks(row_tiles, grain=1):
        p.group(cs, codelet, tiles, {"a": (src.tensor, _rows_of(rows, pos)), "y": (out.tensor, _rows_of(out.index, pos))})
    return out


def _rows_of(index, pos: np.ndarray):
    """`index[pos]`, the rows `pos` (vertices, rows) of a view: where the view is
    strided and each vertex's rows consecutive, the Batch `Partitioner.group` would
    make of that index array, without the array (an index per element of the
    tensor reduced)."""
    shape = pos.shape[1:] + index.shape[1:]
    if isinstance(index, Strided) and pos.size and math.prod(shape) \
            and (pos == pos[:, :1] + np.arange(pos.shape[1])).all():
        strides = tuple(s if n > 1 else 0 for s, n in zip(index.strides, shape))
        return Batch(index.offset + pos[:, 0].astype(np.int64) * index.strides[0], shape, strides)
    return index[pos]


def _unpiled(p, tiles: np.ndarray) -> np.ndarray:
    """Tasks' tiles, or the tasks spread evenly over the tiles where more than
    twice a tile's share of them sit on one tile."""
    if len(tiles) and np.bincount(tiles).max() > 2 * -(-len(tiles) // p.tiles):
        return p.linear(len(tiles), grain=1)
    return tiles


REDUCE_GRAIN = 64                 # fewest columns worth a vertex of their own
WAVE_BYTES = 16 * 1024            # most a tile's share of partial sums may take in one wave
MAX_WAVES = 4                     # ... in at most this many waves


def sum_partials(p, partial: g.View, label: str, shape=None) -> g.View:
    """Add up the leading axis of a [K, ...] partial-sum view into a new tensor.
    The result is spread over all tiles, each reducing its columns from K
    contiguous runs (the partials of one column block sit on few tiles, so
    reducing where they are would pile the work onto those).  Where a tile's
    share of the K rows would take more than WAVE_BYTES of exchange buffers, its
    columns go in waves (up to MAX_WAVES), one compute set each taking a part of
    every tile's: a wave's buffers live for its compute set only (a stage-4
    weight gradient of ResNet-50 at batch 8, 8 partial sums of 9.4 MB, took 51 KB
    of buffers a tile at once)."""
    K = partial.index.shape[0]
    cols = partial.index.reshape(K, -1)
    R = cols.shape[1]
    out = p.new_tensor(label, "f32", shape or (R,))
    out = g.View(out.tensor, out.index.reshape(R), out.span)
    # Columns go to tiles and vertices in pairs where they can, so the vertices can
    # add two at a time (ReduceSumCols2); the pairs spread linearly, one run a tile
    # (all kept as runs: a weight gradient has millions of columns).
    unit = 2 if R % 2 == 0 else 1
    units = R // unit
    linear = p.linear_mapping(units)
    mapping = Mapping.unmapped(R)
    mapping.assign(linear.starts * unit, linear.lengths * unit, linear.tiles)
    p.g.mappings[out.tensor] = mapping
    waves = max(1, min(-(-K * R * 4 // (p.tiles * WAVE_BYTES)), MAX_WAVES,
                       units // (p.tiles * REDUCE_GRAIN // unit) or 1))
    # A wave takes the same share of every tile's columns, so each tile's stay one
    # run: a wave a slab of all columns made every tile's output several runs,
    # and the element-wise ops after it an index per element (4.5 GB at batch 32).
    by_tile = np.argsort(linear.tiles, kind="stable")
    first, count, tiles = linear.starts[by_tile], linear.lengths[by_tile], linear.tiles[by_tile]
    for w in range(waves):
        lo, hi = first + -(-w * count // waves), first + -(-(w + 1) * count // waves)
        some = hi > lo
        _sum_columns(p, partial.tensor, cols, out, unit, lo[some], hi[some] - lo[some], tiles[some],
                     p.new_cs(label))
    return out


def _sum_columns(p, tensor: int, cols, out: g.View, unit: int, first, count, tiles, cs) -> None:
    """Vertices of compute set cs adding the K rows of `cols` (a [K, R] view of
    `tensor`) into `out`: on each of `tiles` (ascending), its units of columns
    first .. first + count."""
    K = cols.shape[0]
    # A tile's workers share its columns, at least REDUCE_GRAIN each (a vertex per
    # few columns would cost more vertices than it saves cycles); few columns per
    # vertex keep each vertex's K-row buffer small.
    owner, sizes, offset = vertex_split(count, p.workers, REDUCE_GRAIN // unit,
                                        max_size=max(1, min(256, 8192 // max(K, 1)) // unit))
    for size_units in unique(sizes).tolist():
        sel = np.flatnonzero(sizes == size_units)
        size = size_units * unit
        start = (first[owner[sel]] + offset[sel]) * unit            # each vertex's first column
        codelet = "ReduceSumCols"
        if isinstance(cols, Strided) and isinstance(out.index, Strided):
            # Strided per vertex, O(vertices) numbers rather than an index per element.
            (ks, cs_), (os_,) = cols.strides, out.index.strides
            a_off, y_off = cols.offset + cs_ * start, out.index.offset + os_ * start
            a = Batch(a_off, (K, size), (ks, cs_))
            y = Batch(y_off, (size,), (os_,))
            # Two columns at a time where every vertex's rows start on whole pairs.
            if size % 2 == 0 and cs_ == 1 and os_ == 1 and ks % 2 == 0 and not (a_off % 2).any() \
                    and not (y_off % 2).any():
                codelet = "ReduceSumCols2"
        else:
            pos = start[:, None] + np.arange(size)
            a, y = np.moveaxis(as_array(cols)[:, pos], 1, 0), as_array(out.index)[pos]
        p.group(cs, p.prim(codelet), tiles[owner[sel]], {"a": (tensor, a), "y": (out.tensor, y)})


def partition(p, n: Node) -> g.View:
    kind, axes, keepdims = n.attrs
    x = p.value(n.args[0])
    before = len(p.seq)
    inner = _inner_axes(x.index, axes) if kind != "argmax" else ()
    if inner:
        # Batch norm's statistics over (N, H, W) of an [N, C, H, W] tensor: its rows
        # [C, N*H*W] are no strided view once N > 1 (an index per element, a
        # gigabyte at batch 8), so first each (n, c)'s H*W elements, then the N
        # partial results of each c.
        rest = [i for i in range(x.index.ndim) if i not in inner]
        first = g.View(x.tensor, x.index.reshape(-1, int(np.prod([x.index.shape[i] for i in inner]))), x.span)
        shape = tuple(x.index.shape[i] for i in rest)
        part = reduce_rows(p, kind, first, n.args[0].dtype, n.dtype, p.name(n) + ".inner", shape)
        x = g.View(part.tensor, part.index.reshape(shape), part.span)
        axes = tuple(rest.index(a) for a in axes if a not in inner)
    keep = [i for i in range(x.index.ndim) if i not in axes]
    idx = x.index.transpose(keep + list(axes))
    R = int(np.prod([x.index.shape[i] for i in keep], dtype=np.int64))
    K = int(np.prod([x.index.shape[i] for i in axes], dtype=np.int64))
    src = g.View(x.tensor, idx.reshape(R, K), x.span)
    out = reduce_rows(p, kind, src, n.args[0].dtype if not inner else n.dtype, n.dtype, p.name(n), n.shape)
    p.record(n, *[p.g.compute_sets[e.cs] for e in p.seq[before:]])
    return g.View(out.tensor, out.index.reshape(n.shape), out.span)


def _inner_axes(index, axes) -> tuple[int, ...]:
    """The reduced axes to reduce first, where the rows of all of them reduced at
    once would be no strided view: the trailing run of reduced axes, if its rows
    are one and the rest are not all of them.  () where one step does."""
    if not isinstance(index, Strided) or len(axes) < 2:
        return ()
    keep = [i for i in range(index.ndim) if i not in axes]
    rows = int(np.prod([index.shape[i] for i in keep], dtype=np.int64))
    if index.transpose(keep + list(axes)).view_reshape((rows, -1)) is not None:
        return ()
    inner = []
    for i in reversed(range(index.ndim)):
        if i not in axes:
            break
        inner.insert(0, i)
    if not inner or len(inner) == len(axes):
        return ()
    size = int(np.prod([index.shape[i] for i in inner], dtype=np.int64))
    return tuple(inner) if index.view_reshape((-1, size)) is not None else ()


def add_partials(p, n: Node, cs, acc: g.View, split: bool, label: str, shape=None) -> g.View:
    """The result of a matmul or conv, of `shape` (n's by default): its accumulator,
    or the sum of its partials when the reduction was split."""
    shape = n.shape if shape is None else shape
    css = [cs]
    out = acc
    if split:
        before = len(p.seq)
        out = sum_partials(p, acc, label, shape)
        css += [p.g.compute_sets[e.cs] for e in p.seq[before:]]
    p.record(n, *css)
    return g.View(out.tensor, out.index.reshape(shape), out.span)


# ---------------------------------------------------------------- the table's entries

def op_defs() -> list[OpDef]:
    return [OpDef("reduce", "compute", "sum, max, min or argmax over axes", ref=_ref, partition=partition,
                  codelets=tuple(CODELETS.values()) + ("ReduceSumCols", "ReduceSumCols2"),
                  flops=lambda n: n.args[0].numel, grad=_g_reduce)]


def functions() -> list[Function]:
    params = (Param("x", "tensor"), Param("axis", "any", None), Param("keepdims", "bool", False))

    def fn(kind, one_operand_only=False):
        return Function(kind, params, lambda b, a, span: reduction(b, kind, a["x"], a["axis"], a["keepdims"], span),
                        f"{kind} over axes (all by default)",
                        applies=(lambda npos, kw: npos < 2 and "b" not in kw) if one_operand_only else None)
    return [fn("sum"), fn("mean"), fn("argmax"), fn("max", True), fn("min", True)]
