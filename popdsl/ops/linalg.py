"""Matrix products: `a @ b` and `matmul(a, b)`, batched and broadcasting as numpy's.

Requires `ops.core`, `ops.blocks` and `ops.reduce`; produces the `matmul` operation
and its partition rule: output blocks on a grid of tiles (rows × columns × the
reduction dimension), the grid chosen by `cost` (estimated cycles of the busiest
tile, with the target's rates); a tile's block is split over its workers in bands
of columns that share one exchanged copy of the a block (and the AMP's held block
of it: a tile has one AMP); a split reduction leaves
partial sums that `reduce.sum_partials` adds up on the tiles.

Gradient: g @ bᵀ for a and aᵀ @ g for b (batch axes an operand was broadcast along
are summed by the autodiff pass).  A transposed operand is a view whose rows are not
contiguous: its blocks would reach the tiles element by element.  So a product of
two matrices whose operands are read better transposed is computed as (bᵀ aᵀ)ᵀ —
for a dense layer's input gradient g @ Wᵀ, W @ gᵀ: AlexNet's 37.7M-weight layer
was 37.7M one-element copies.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.cost import LOOP_ITER, LOOP_SETUP, RPT_ITER, VERTEX_OVERHEAD, amp_cycles
from popdsl.ir.intrinsics import OP
from popdsl.ir.target import Target
from popdsl.ir.index import Strided, as_array, broadcast_to
from popdsl.ir.tensor import Node, broadcast_shapes
from popdsl.ops import elementwise
from popdsl.ops.blocks import (GRAIN, block_of, blocks, bounds, ceil_div, emit_classes, map_first, map_whole,
                               pow2_splits, shape_classes, stacked, task_grid)
from popdsl.ops.core import FLOATS, HIGH_VALUE, Builder, Function, OpDef, Param, float_result, shape_str
from popdsl.ops.reduce import add_partials
from popdsl.ops.shape import transpose

F32_BYTES = 4
SWAP_SHARE = 1 / 64       # see `partition`


# ---------------------------------------------------------------- shape rule

def matmul(b: Builder, x: Node, y: Node, span) -> Node:
    if len(x.shape) < 1 or len(y.shape) < 1:
        b.err(span, f"'@' needs tensors of rank >= 1, found {shape_str(x.shape)} and {shape_str(y.shape)}")
    if x.dtype not in FLOATS or y.dtype not in FLOATS:
        b.err(span, f"'@' needs floating-point tensors, found {x.dtype} and {y.dtype}")
    x2 = x if len(x.shape) > 1 else b.make("reshape", (x,), ((1, x.shape[0]),), (1, x.shape[0]), x.dtype)
    y2 = y if len(y.shape) > 1 else b.make("reshape", (y,), ((y.shape[0], 1),), (y.shape[0], 1), y.dtype)
    if x2.shape[-1] != y2.shape[-2]:
        b.err(span, f"'@': shapes {shape_str(x.shape)} and {shape_str(y.shape)} do not match "
              f"({x2.shape[-1]} != {y2.shape[-2]})")
    batch = broadcast_shapes(x2.shape[:-2], y2.shape[:-2])
    if batch is None:
        b.err(span, f"'@': batch dimensions of {shape_str(x.shape)} and {shape_str(y.shape)} do not broadcast")
    shape = batch + (x2.shape[-2], y2.shape[-1])
    # The codelet multiplies f32: f16 operands are converted, the product rounded
    # back to f16 when both were (numpy's result type).
    out = b.make("matmul", (elementwise.cast(b, "f32", x2), elementwise.cast(b, "f32", y2)), (), shape, "f32")
    out = elementwise.cast(b, float_result(x.dtype, y.dtype), out)
    if len(x.shape) == 1 or len(y.shape) == 1:
        final = shape[:-2] + ((x2.shape[-2],) if len(x.shape) > 1 else ()) + ((y2.shape[-1],) if len(y.shape) > 1 else ())
        out = b.make("reshape", (out,), (final,), final, out.dtype)
    return out


def _swap(b: Builder, x: Node) -> Node:
    r = len(x.shape)
    return transpose(b, x, list(range(r - 2)) + [r - 1, r - 2], None)


def _grad(b: Builder, n: Node, g: Node, i: int) -> Node:
    x, y = n.args
    return matmul(b, g, _swap(b, y), None) if i == 0 else matmul(b, _swap(b, x), g, None)


def _ref(attrs, a, b):
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


# ---------------------------------------------------------------- cost and plan

def vertex_cycles(m, k, p):
    """The cycles `ir.cost` charges a MatMul vertex (stdlib/prims.pop) of an m × k by
    k × p block: zeroing c, then one amp (tests/test_amp.py keeps them equal).  Ints
    or numpy arrays of them."""
    zero = LOOP_SETUP + m * (LOOP_ITER + LOOP_SETUP + p * (OP + RPT_ITER))
    return VERTEX_OVERHEAD + zero + amp_cycles(m, k, p, "f32")


# ReduceSumCols2 (stdlib/prims.pop) per column of k partials, two columns at a time:
# its loop, a load, k - 1 loads and adds (a hardware loop) and a store per pair.
def _reduce_cycles(k):
    return (LOOP_ITER + 2 * OP + LOOP_SETUP + (k - 1) * 2 * OP + OP) / 2


def cost(target: Target, bm, bn, bk, gk, M: int, N: int, reducers: int):
    """Estimated cycles of the busiest tile for blocks of bm × bk by bk × bn with the
    reduction split gk ways: the cycles the model charges its workers' vertices (a
    band of columns each, `_worker_cols`), the a and b blocks it receives, and for a
    split reduction the partial sums exchanged and added on `reducers` tiles (at
    the cycles ReduceSumCols is charged).  Ints or numpy arrays of them."""
    rate = target.exchange_bytes_per_cycle
    parts = np.clip(bn // MIN_COLS, 1, target.workers)
    band = -(-bn // parts)                       # the widest band of `_worker_cols`
    c = target.workers * vertex_cycles(bm, bk, band) + (bm * bk + bk * bn) * F32_BYTES / rate
    per_reducer = M * N / reducers
    return c + np.where(gk > 1, 2 * gk * per_reducer * F32_BYTES / rate + per_reducer * _reduce_cycles(gk), 0)


def _splits(n: int) -> np.ndarray:
    """The splits of an axis of n a plan search tries: every count up to 32, then
    powers of two and three times powers of two, and n."""
    out = set(range(1, min(n, 32) + 1)) | set(pow2_splits(n)) | {n}
    k = 48
    while k <= n:
        out.add(k)
        k *= 2
    return np.array(sorted(out), np.int64)


@lru_cache(maxsize=256)
def grid(M: int, N: int, K: int, budget: int, target: Target) -> tuple[int, int, int]:
    """(row, column, reduction) splits of one matmul over `budget` tiles: those of
    least `cost` (all at once, as arrays) among blocks at least 16 columns wide where
    the output allows (a vertex's inner loop runs over the columns).  Partial sums
    are reduced on as many tiles as `sum_partials` would spread the M × N outputs
    over (at least GRAIN outputs each, so a small output is reduced on few tiles)."""
    gm, gn, gk = np.meshgrid(_splits(M), _splits(N), _splits(K), indexing="ij")
    gm, gn, gk = gm.ravel(), gn.ravel(), gk.ravel()
    bn = -(-N // gn)
    ok = (gm * gn * gk <= budget) & (bn >= min(16, N))
    if not ok.any():
        return (1, 1, 1)
    gm, gn, gk, bn = gm[ok], gn[ok], gk[ok], bn[ok]
    reducers = max(1, min(budget, ceil_div(M * N, GRAIN)))
    c = cost(target, -(-M // gm), bn, -(-K // gk), gk, M, N, reducers)
    best = int(np.argmin(c))            # the first of equal costs: fewest splits, rows first
    return int(gm[best]), int(gn[best]), int(gk[best])


def _worker_cols(c0: np.ndarray, c1: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns c0..c1 of each task's matmul block as bands for up to `workers`
    vertices, at least MIN_COLS wide (a narrower band spends more on each AMP
    pass's set-up than it streams): (task, first column, end) per band, a task's
    bands consecutive."""
    width = c1 - c0
    parts = np.maximum(1, np.minimum(workers, width // MIN_COLS))
    task = np.repeat(np.arange(len(c0)), parts)
    j = np.arange(len(task)) - np.repeat(np.cumsum(parts) - parts, parts)
    return task, c0[task] + width[task] * j // parts[task], c0[task] + width[task] * (j + 1) // parts[task]


MIN_COLS = 8


def _scattered(index) -> int:
    """Elements of a 2-D view that reach a tile one by one: all of them unless its
    rows are contiguous (a transposed matrix's are not)."""
    if isinstance(index, Strided) and (index.strides[-1] == 1 or index.shape[-1] == 1):
        return 0
    return int(np.prod(index.shape))


def partition(p, n: Node) -> g.View:
    a, b = p.value(n.args[0]), p.value(n.args[1])
    # Only where the element copies would fill a real part of the tiles (more than
    # SWAP_SHARE of a tile each, in exchange buffers): re-planning a product moves
    # every later op's tiles too, and ResNet-50's training step fits with 0.4 % to
    # spare (its last layer's 2M weights, 5.6 KB a tile, stay as they are).  Decided
    # from the shapes first (every element scattered is the most there can be), so
    # an index array is made strided (a second array as large) only where it matters.
    share = p.tiles * p.g.target.tile_memory * SWAP_SHARE
    if len(n.shape) == 2 and _one_by_one(p, a.index, b.index, worst=True) * F32_BYTES > share:
        ai, bi = (v.index if isinstance(v.index, Strided) else Strided.of(v.index) for v in (a, b))
        direct = _one_by_one(p, ai, bi) if ai is not None and bi is not None else 0
        if direct * F32_BYTES > share and _one_by_one(p, bi.T, ai.T) + n.shape[0] * n.shape[1] < direct:
            c = _product(p, n, b.tensor, bi.T, a.tensor, ai.T, (n.shape[1], n.shape[0]))
            return g.View(c.tensor, c.index.T, c.span)
    return _product(p, n, a.tensor, a.index, b.tensor, b.index, n.shape)


def _one_by_one(p, ai, bi, worst: bool = False) -> int:
    """Elements the blocks of a @ b would receive one at a time: a scattered a block
    goes to every column of the grid, a scattered b block to every row.  `worst`:
    as if both were scattered (from the shapes alone)."""
    (M, K), N = ai.shape, bi.shape[1]
    gm, gn, _ = grid(M, N, K, p.tiles, p.g.target)
    scattered = (lambda index: int(np.prod(index.shape))) if worst else _scattered
    return scattered(ai) * gn + scattered(bi) * gm


def _product(p, n: Node, a_tensor: int, a_index, b_tensor: int, b_index, shape) -> g.View:
    """The blocks of a @ b (views of two tensors) for node `n`, whose result has
    `shape` (n's, or its transpose's).  All tasks at once (a ResNet-50 training
    step's products have about 9,000 vertices each): the tasks are the cells of
    loops over batch, row, column and reduction blocks (the last innermost), each
    split over its tile's workers in bands of columns."""
    M, K = a_index.shape[-2:]
    N = b_index.shape[-1]
    batch = shape[:-2]
    ai = broadcast_to(a_index, batch + (M, K))
    bi = broadcast_to(b_index, batch + (K, N))
    nb = int(np.prod(batch, dtype=np.int64)) if batch else 1
    ai, bi = ai.reshape(nb, M, K), bi.reshape(nb, K, N)
    gm, gn, gk = grid(M, N, K, max(1, p.tiles // nb), p.g.target)
    rb, cb, kb = blocks(M, gm), blocks(N, gn), blocks(K, gk)
    nr, nc, nk = len(rb), len(cb), len(kb)
    label = p.name(n)
    # A scattered operand (a transposed matrix: a dense layer's xᵀ in its weights'
    # gradient) that several blocks read is copied into rows first, one element at a
    # time once, as PopLibs rearranges an operand, not once per block that reads it:
    # xᵀ @ g at batch 2 sent 2M one-element runs to ResNet-50's last layer's blocks.
    # (Mapped below where the blocks that read it first run.)
    if nb == 1 and _copy_first(ai[0], nc):
        a_tensor, ai = p.copied(g.View(a_tensor, ai[0], p.span), label + ".a", False).tensor, Strided.whole((1, M, K))
    if nb == 1 and _copy_first(bi[0], nr):
        b_tensor, bi = p.copied(g.View(b_tensor, bi[0], p.span), label + ".b", False).tensor, Strided.whole((1, K, N))
    # The result (or its partial sums) has the op's shape; the rule indexes it as
    # [reduction block, batch, row, column].
    if nk > 1:
        acc = p.new_tensor(label + ".partial", "f32", (nk,) + shape)
    else:
        acc = p.new_tensor(label, "f32", shape)
    target = acc.index.reshape(nk, nb, M, N)
    tiles = p.spread(nb * nr * nc * nk)
    bt, ri, ci, ki = task_grid(nb, nr, nc, nk)
    (rb0, rb1), (cb0, cb1), (kb0, kb1) = bounds(rb), bounds(cb), bounds(kb)
    # The task of each position of a, b and c that reads or writes it first: a's
    # block is read by the tasks of its row and reduction blocks (first: column
    # block 0), b's by those of its column and reduction blocks (row block 0).
    # (An operand mapped already, as weights usually are, needs no such array: one
    # as large as AlexNet's 37.7M-weight layer would be 300 MB.)
    images = np.arange(nb, dtype=np.int64)[:, None, None]
    c_task = ((images * nr + block_of(rb)[:, None]) * nc + block_of(cb)) * nk + np.arange(nk)[:, None, None, None]
    map_whole(p, acc.tensor, c_task.shape, tiles[c_task])
    a_free, b_free = (not p.g.mappings[t].fully_mapped() for t in (a_tensor, b_tensor))
    a_task = (images * nr + block_of(rb)[:, None]) * nc * nk + block_of(kb) if a_free else None
    b_task = ((images * nr) * nc + block_of(cb)) * nk + block_of(kb)[:, None] if b_free else None
    if a_tensor == b_tensor and a_free:    # x @ x.T: both read one tensor, first come first
        _map_first_of_both(p, a_tensor, ai, a_task, bi, b_task, tiles)
    else:
        if a_free:
            map_first(p, g.View(a_tensor, ai, None), tiles[a_task], a_task)
        if b_free:
            map_first(p, g.View(b_tensor, bi, None), tiles[b_task], b_task)
    # The tile's block is shared by its workers, a band of columns each: the tile
    # has one AMP, whose held block of a all its workers use at once, and they
    # read one copy of the a block (lower shares the buffer).
    t, s0, s1 = _worker_cols(cb0[ci], cb1[ci], p.workers)
    bt, r0, r1, k0, k1, kk = bt[t], rb0[ri][t], rb1[ri][t], kb0[ki][t], kb1[ki][t], ki[t]

    def conns(v):
        """Vertices v (one class): a[image, rows, k], b[image, k, columns] and
        target[partial, image, rows, columns]."""
        rs, ks, ws = int(r1[v[0]] - r0[v[0]]), int(k1[v[0]] - k0[v[0]]), int(s1[v[0]] - s0[v[0]])
        rows, red, cols = (r0[v], r1[v]), (k0[v], k1[v]), (s0[v], s1[v])
        return {"a": (a_tensor, stacked(ai, (bt[v], rows, red), (rs, ks))),
                "b": (b_tensor, stacked(bi, (bt[v], red, cols), (ks, ws))),
                "c": (acc.tensor, stacked(target, (kk[v], bt[v], rows, cols), (rs, ws)))}
    cs = p.new_cs(label)
    emit_classes(p, cs, p.prim("MatMul"), tiles[t], shape_classes(r1 - r0, k1 - k0, s1 - s0), conns, {})
    return add_partials(p, n, cs, acc, nk > 1, label, shape)


def _copy_first(index, readers: int) -> bool:
    """Whether an operand's view is copied into rows before a product whose
    `readers` blocks each receive it: a scattered one read more than once."""
    return readers > 1 and _scattered(index) > 0


def _map_first_of_both(p, tensor: int, ai, a_task, bi, b_task, tiles) -> None:
    """Map one tensor read as both operands as the tasks want it, in order: a task
    wants its a block, then its b block."""
    m = p.g.mappings[tensor]
    if m.fully_mapped():
        return
    elements = np.concatenate([as_array(ai).reshape(-1), as_array(bi).reshape(-1)])
    order = np.concatenate([2 * a_task.reshape(-1), 2 * np.broadcast_to(b_task, bi.shape).reshape(-1) + 1])
    first = np.argsort(order, kind="stable")
    elements, task = elements[first], order[first] // 2
    free = m.tile_of(elements) < 0
    m.assign_elements(elements[free], tiles[task][free], only_unmapped=True)


# ---------------------------------------------------------------- the table's entries

def op_defs() -> list[OpDef]:
    return [OpDef("matmul", "compute", "batched matrix product of the last two axes", ref=_ref,
                  partition=partition, codelets=("MatMul",), cost=cost,
                  flops=lambda n: 2 * n.numel * n.args[0].shape[-1], grad=_grad, value=HIGH_VALUE)]


def functions() -> list[Function]:
    return [Function("matmul", (Param("a", "tensor"), Param("b", "tensor")),
                     lambda b, a, span: matmul(b, a["a"], a["b"], span), "a @ b")]
