"""Partition rules of the non-element-wise primitives (see `partition`).

Each function takes the partitioner and a node and returns a view of the result,
having added tensors, tile mappings, compute sets and copies.

- reduce: rows of the (transposed) input go to the tile that holds them; a few long
  rows are first split into partial sums on the tiles holding each part.
- matmul: output blocks on a grid of tiles (rows × columns × reduction), block sizes
  chosen to fill the tiles; a split reduction dimension leaves partial sums that a
  reduction adds up on the tiles.
- conv2d / pooling: tasks over batch, output channels, output rows and (for conv)
  input channels, each within a per-vertex memory budget; padding is a zeroed
  tensor the input is copied into.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.tensor import Node

GRAIN = 16              # fewest elements worth a vertex of element-wise work
SLAB_BYTES = 48 * 1024        # most input data one vertex of a conv or pool may take
TWO_STAGE_MIN = 2048          # a reduction row at least this long may be split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(n: int, parts: int) -> list[tuple[int, int]]:
    size = _cdiv(n, parts)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _by_shape(tasks):
    """Group task dicts by the shapes of their index arrays."""
    groups: dict[tuple, list] = {}
    for t in tasks:
        key = tuple((k, v[1].shape) for k, v in sorted(t["conns"].items()))
        groups.setdefault(key, []).append(t)
    return groups.values()


def _emit(p, cs, codelet: str, tasks, state_keys=()) -> None:
    for grp in _by_shape(tasks):
        conns = {f: (grp[0]["conns"][f][0], np.stack([t["conns"][f][1] for t in grp]))
                 for f in grp[0]["conns"]}
        state = {k: np.asarray([t["state"][k] for t in grp]) for k in state_keys}
        p.group(cs, codelet, [t["tile"] for t in grp], conns, state)


# ---------------------------------------------------------------- reductions

_REDUCE_CODELET = {("sum", "f32"): "ReduceSum", ("max", "f32"): "ReduceMax", ("min", "f32"): "ReduceMin",
                   ("argmax", "f32"): "ReduceArgMax", ("sum", "i32"): "ReduceSumI",
                   ("max", "i32"): "ReduceMaxI", ("min", "i32"): "ReduceMinI", ("argmax", "i32"): "ReduceArgMaxI"}


def reduce_rows(p, kind: str, src: g.View, dtype: str, out_dtype: str, label: str) -> g.View:
    """Reduce the last axis of a 2-D view [R, K] into a new tensor [R]."""
    R, K = src.index.shape
    p.ensure_mapped(src)
    codelet = p.prim(_REDUCE_CODELET[(kind, "i32" if dtype == "i32" else "f32")])
    rows = src.index
    if kind != "argmax" and R * 4 <= p.tiles and K >= TWO_STAGE_MIN:
        parts = max(2, min(p.tiles // max(R, 1), K // 512))
        bl = _blocks(K, parts)
        partial = p.new_tensor(f"{label}.partial", out_dtype, (R, len(bl)))
        cs = p.new_cs(label + ".partial")
        tasks = []
        for r in range(R):
            for j, (lo, hi) in enumerate(bl):
                idx = rows[r, lo:hi][None, :]
                tile = int(p.g.tile_of[src.tensor][idx[0, 0]])
                p.g.tile_of[partial.tensor][partial.index[r, j]] = tile
                tasks.append({"tile": tile, "conns": {"a": (src.tensor, idx),
                                                      "y": (partial.tensor, partial.index[r, j:j + 1])}})
        _emit(p, cs, codelet, tasks)
        src, rows = partial, partial.index
        R, K = rows.shape
        codelet = p.prim(_REDUCE_CODELET[(kind, "i32" if out_dtype == "i32" else "f32")])
    out = p.new_tensor(label, out_dtype, (R,))
    # Each row is reduced where its first element lives.
    p.g.tile_of[out.tensor][:] = p.g.tile_of[src.tensor][rows[:, 0]]
    cs = p.new_cs(label)
    for size, pos, tiles in p.chunks(p.g.tile_of[out.tensor], grain=1):
        p.group(cs, codelet, tiles, {"a": (src.tensor, rows[pos]), "y": (out.tensor, out.index[pos])})
    return out


def sum_partials(p, partial: g.View, label: str) -> g.View:
    """Add up the leading axis of a [K, ...] partial-sum view into a new tensor.
    The result is spread over all tiles, each reducing its columns from K
    contiguous runs (the partials of one column block sit on few tiles, so
    reducing where they are would pile the work onto those)."""
    K = partial.index.shape[0]
    cols = partial.index.reshape(K, -1)
    R = cols.shape[1]
    out = p.new_tensor(label, "f32", (R,))
    p.g.tile_of[out.tensor][:] = p.linear(R)
    cs = p.new_cs(label)
    # Few columns per vertex keep each vertex's K-row buffer small.
    grain = max(1, min(256, 8192 // max(K, 1)))
    for size, pos, tiles in p.chunks(p.g.tile_of[out.tensor], grain=grain, max_size=grain):
        p.group(cs, p.prim("ReduceSumCols"), tiles,
                {"a": (partial.tensor, np.moveaxis(cols[:, pos], 1, 0)), "y": (out.tensor, out.index[pos])})
    return out


def reduce(p, n: Node) -> g.View:
    kind, axes, keepdims = n.attrs
    x = p.value(n.args[0])
    keep = [i for i in range(x.index.ndim) if i not in axes]
    idx = x.index.transpose(keep + list(axes))
    R = int(np.prod([x.index.shape[i] for i in keep], dtype=np.int64))
    K = int(np.prod([x.index.shape[i] for i in axes], dtype=np.int64))
    src = g.View(x.tensor, idx.reshape(R, K), x.span)
    before = len(p.seq)
    out = reduce_rows(p, kind, src, n.args[0].dtype, n.dtype, p.name(n))
    p.record(n, *[p.g.compute_sets[e.cs] for e in p.seq[before:]])
    return g.View(out.tensor, out.index.reshape(n.shape), out.span)


# ---------------------------------------------------------------- matmul

def _grid(M: int, N: int, K: int, budget: int) -> tuple[int, int, int]:
    """(row, column, reduction) splits of one matmul over `budget` tiles.

    Searches power-of-two splits for the least estimated time per tile —
    multiply-accumulates at 8 a cycle, the a and b blocks a tile receives at 4
    bytes a cycle, and for a split reduction the partial sums exchanged and added
    on the tiles `sum_partials` spreads the M × N outputs over (at least GRAIN
    outputs each, so a small output is reduced on few tiles) — among blocks at
    least 16 columns wide where the output allows (a vertex's inner loop runs over
    the columns)."""
    best = None
    min_bn = min(16, N)
    reducers = max(1, min(budget, _cdiv(M * N, GRAIN)))
    for gm in _pow2(M):
        for gn in _pow2(N):
            bn = _cdiv(N, gn)
            if bn < min_bn:
                continue
            for gk in _pow2(K):
                tasks = gm * gn * gk
                if tasks > budget:
                    continue
                bm, bk = _cdiv(M, gm), _cdiv(K, gk)
                cost = bm * bn * bk / 8 + (bm * bk + bk * bn) * 4 / 4
                if gk > 1:
                    cost += 2 * gk * M * N * 4 / reducers / 4
                if best is None or cost < best[0]:
                    best = (cost, (gm, gn, gk))
    return best[1] if best else (1, 1, 1)


def _worker_rows(r0: int, r1: int, workers: int) -> list[tuple[int, int]]:
    """Rows r0..r1 of a tile's matmul block as bands for up to `workers` vertices:
    whole multiples of four rows (the MatMul codelet takes rows four at a time)
    but the last."""
    n = r1 - r0
    parts = max(1, min(workers, -(-n // 4)))
    size = -(-_cdiv(n, parts) // 4) * 4
    return [(i, min(r1, i + size)) for i in range(r0, r1, size)]


def matmul(p, n: Node) -> g.View:
    a, b = p.value(n.args[0]), p.value(n.args[1])
    M, K = a.index.shape[-2:]
    N = b.index.shape[-1]
    batch = n.shape[:-2]
    ai = np.broadcast_to(a.index, batch + (M, K))
    bi = np.broadcast_to(b.index, batch + (K, N))
    nb = int(np.prod(batch, dtype=np.int64)) if batch else 1
    ai, bi = ai.reshape(nb, M, K), bi.reshape(nb, K, N)
    gm, gn, gk = _grid(M, N, K, max(1, p.tiles // nb))
    rb, cb, kb = _blocks(M, gm), _blocks(N, gn), _blocks(K, gk)
    label = p.name(n)
    if len(kb) > 1:
        acc = p.new_tensor(label + ".partial", "f32", (len(kb), nb, M, N))
        target = acc.index
    else:
        acc = p.new_tensor(label, "f32", (nb, M, N))
        target = acc.index[None]
    ntasks = nb * len(rb) * len(cb) * len(kb)
    tiles = p.spread(ntasks)
    cs = p.new_cs(label)
    tasks = []
    t = 0
    for bt in range(nb):
        for (r0, r1) in rb:
            for (c0, c1) in cb:
                for kk, (k0, k1) in enumerate(kb):
                    tile = int(tiles[t])
                    t += 1
                    bv = bi[bt, k0:k1, c0:c1]
                    p.ensure_mapped(g.View(b.tensor, bv, b.span), np.int32(tile))
                    # The tile's block is shared by its workers, a band of rows each;
                    # they read one copy of the b block (lower shares the buffer).
                    for (s0, s1) in _worker_rows(r0, r1, p.workers):
                        av = ai[bt, s0:s1, k0:k1]
                        cv = target[kk, bt, s0:s1, c0:c1]
                        p.g.tile_of[acc.tensor][cv.ravel()] = tile
                        p.ensure_mapped(g.View(a.tensor, av, a.span), np.int32(tile))
                        tasks.append({"tile": tile, "conns": {"a": (a.tensor, av), "b": (b.tensor, bv),
                                                              "c": (acc.tensor, cv)}})
    _emit(p, cs, p.prim("MatMul"), tasks)
    return _add_partials(p, n, cs, acc, len(kb) > 1, label)


def _add_partials(p, n: Node, cs, acc: g.View, split: bool, label: str) -> g.View:
    """The result of a matmul or conv: its accumulator, or the sum of its partials
    when the reduction was split."""
    css = [cs]
    out = acc
    if split:
        before = len(p.seq)
        out = sum_partials(p, acc, label)
        css += [p.g.compute_sets[e.cs] for e in p.seq[before:]]
    p.record(n, *css)
    return g.View(out.tensor, out.index.reshape(n.shape), out.span)


# ---------------------------------------------------------------- padding, concat, constants

def _fill(p, view: g.View, value: float, dtype: str, label: str) -> None:
    cs = p.new_cs(label + ".fill")
    codelet = p.prim("FillI" if dtype == "i32" else "Fill")
    tile_of = p.g.tile_of[view.tensor]
    flat = view.index.ravel()
    for size, pos, tiles in p.chunks(tile_of[flat]):
        p.group(cs, codelet, tiles, {"y": (view.tensor, flat[pos])}, {"v": value})


def padded(p, x: g.View, pads, value: float, dtype: str, label: str) -> g.View:
    """A new tensor: x surrounded by `value`, refreshed every step."""
    shape = tuple(n + a + b for n, (a, b) in zip(x.index.shape, pads))
    out = p.new_tensor(label, dtype, shape)
    p.ensure_mapped(x)
    inner = out.index[tuple(slice(a, a + n) for n, (a, _) in zip(x.index.shape, pads))]
    tile_of = p.g.tile_of[out.tensor]
    tile_of[inner.ravel()] = p.g.tile_of[x.tensor][x.index.ravel()]
    # A border element goes with its nearest interior element.
    if (tile_of < 0).any():
        coords = np.indices(shape).reshape(len(shape), -1)
        clipped = [np.clip(c - a, 0, n - 1) + a for c, n, (a, _) in zip(coords, x.index.shape, pads)]
        nearest = np.ravel_multi_index(clipped, shape)
        missing = tile_of < 0
        tile_of[missing] = tile_of[nearest[missing]]
    border = np.setdiff1d(out.index.ravel(), inner.ravel(), assume_unique=True)
    if border.size:
        _fill(p, g.View(out.tensor, border, out.span), value, dtype, label)
    p.seq.append(g.Copy(x, g.View(out.tensor, inner, out.span), p.span))
    return out


def pad(p, n: Node) -> g.View:
    pads, value = n.attrs
    return padded(p, p.value(n.args[0]), pads, value, n.dtype, p.name(n))


def concat(p, n: Node) -> g.View:
    axis = n.attrs[0]
    out = p.new_tensor(p.name(n), n.dtype, n.shape)
    at = 0
    for a in n.args:
        v = p.value(a)
        p.ensure_mapped(v)
        k = v.index.shape[axis]
        dst = out.index[(slice(None),) * axis + (slice(at, at + k),)]
        p.g.tile_of[out.tensor][dst.ravel()] = p.g.tile_of[v.tensor][v.index.ravel()]
        p.seq.append(g.Copy(v, g.View(out.tensor, dst, out.span), p.span))
        at += k
    return out


def const(p, n: Node) -> g.View:
    out = p.new_tensor(p.name(n), n.dtype, n.shape, kind="var")
    from popdsl.ir.codelet import NUMPY_DTYPE
    p.g.init[out.tensor] = np.full(n.shape, n.attrs[0], dtype=NUMPY_DTYPE[n.dtype])
    p.g.tile_of[out.tensor][:] = 0
    return out


# ---------------------------------------------------------------- gather, one-hot

def gather(p, n: Node) -> g.View:
    axis = n.attrs[0]
    x, idx = p.value(n.args[0]), p.value(n.args[1])
    xi = np.moveaxis(x.index, axis, 0)
    rows = xi.reshape(xi.shape[0], -1)
    flat_idx = idx.index.reshape(-1)
    m, d = flat_idx.size, rows.shape[1]
    out = p.new_tensor(p.name(n), n.dtype, (m, d))
    p.ensure_mapped(x)
    p.ensure_mapped(idx)
    p.g.tile_of[out.tensor][:] = np.repeat(p.linear(m, grain=1), d)
    cs = p.new_cs(p.name(n))
    codelet = p.prim("GatherRowsI" if n.dtype == "i32" else "GatherRows")
    row_tiles = p.g.tile_of[out.tensor][out.index[:, 0]]
    for size, pos, tiles in p.chunks(row_tiles, grain=1):
        p.group(cs, codelet, tiles, {"x": (x.tensor, np.broadcast_to(rows, (len(tiles),) + rows.shape)),
                                     "idx": (idx.tensor, flat_idx[pos]),
                                     "y": (out.tensor, out.index[pos])})
    p.record(n, cs)
    res = out.index.reshape(idx.index.shape + xi.shape[1:])
    res = np.moveaxis(res, list(range(idx.index.ndim)), list(range(axis, axis + idx.index.ndim)))
    return g.View(out.tensor, res, out.span)


def one_hot(p, n: Node) -> g.View:
    y = p.value(n.args[0])
    depth = n.attrs[0]
    flat = y.index.reshape(-1)
    out = p.new_tensor(p.name(n), "f32", (flat.size, depth))
    p.ensure_mapped(y)
    p.g.tile_of[out.tensor][:] = np.repeat(p.g.tile_of[y.tensor][flat], depth)
    cs = p.new_cs(p.name(n))
    for size, pos, tiles in p.chunks(p.g.tile_of[y.tensor][flat], grain=1):
        p.group(cs, p.prim("OneHot"), tiles, {"labels": (y.tensor, flat[pos]), "y": (out.tensor, out.index[pos])})
    p.record(n, cs)
    return g.View(out.tensor, out.index.reshape(n.shape), out.span)


# ---------------------------------------------------------------- convolution and pooling

def _pow2(n: int) -> list[int]:
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def _conv_plan(p, outer: int, Og: int, Cg: int, OH: int, OW: int, kh: int, s: int, wp: int, kk: int):
    """(output-channel, output-row, input-channel) splits of a convolution.

    Searches power-of-two splits for the least estimated time per tile —
    multiply-accumulates at 8 a cycle plus the bytes a tile receives at 4 a cycle
    (input slab, weights, and partial sums when input channels are split) — among
    plans whose per-vertex blocks fit SLAB_BYTES."""
    best, fallback = None, None
    for go in _pow2(Og):
        for gr in _pow2(OH):
            for gc in _pow2(Cg):
                ob, rb, cb = _cdiv(Og, go), _cdiv(OH, gr), _cdiv(Cg, gc)
                rin = (rb - 1) * s + kh
                slab, wblk, yblk = cb * rin * wp * 4, ob * cb * kk * 4, ob * rb * OW * 4
                tasks = outer * go * gr * gc
                per_tile = _cdiv(tasks, p.tiles)
                macs = ob * rb * OW * cb * kk
                moved = slab + wblk
                cost = per_tile * (macs / 8 + moved / 4)
                if gc > 1:      # partial sums: gc copies of the output, exchanged and added
                    cost += outer * Og * OH * OW * gc * 4 / p.tiles / 4 * 2
                worst = max(slab, wblk, yblk)
                if fallback is None or worst < fallback[0]:
                    fallback = (worst, (go, gr, gc))
                # One task per tile at most: more only multiplies exchanged data.
                if worst <= SLAB_BYTES and tasks <= p.tiles and (best is None or cost < best[0]):
                    best = (cost, (go, gr, gc))
    return (best or fallback)[1]


def _pool_plan(p, N: int, C: int, OH: int, OW: int, k: int, s: int, wp: int):
    """(channel, row) splits of a pooling: all tiles busy, blocks within SLAB_BYTES."""
    best, fallback = None, None
    for gcn in _pow2(C):
        for gr in _pow2(OH):
            cb, rb = _cdiv(C, gcn), _cdiv(OH, gr)
            rin = (rb - 1) * s + k
            slab = cb * rin * wp * 4
            tasks = N * gcn * gr
            cost = _cdiv(tasks, p.tiles) * (cb * rb * OW * k * k + slab / 4)
            if fallback is None or slab < fallback[0]:
                fallback = (slab, (gcn, gr))
            if slab <= SLAB_BYTES and (best is None or cost < best[0]):
                best = (cost, (gcn, gr))
    return (best or fallback)[1]


def conv2d(p, n: Node) -> g.View:
    stride, padding, groups = n.attrs
    x, w = p.value(n.args[0]), p.value(n.args[1])
    N = x.index.shape[0]
    O, Cg, KH, KW = w.index.shape
    _, _, OH, OW = n.shape
    label = p.name(n)
    if padding:
        x = padded(p, x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), 0.0, "f32", label + ".pad")
    else:
        p.ensure_mapped(x)
    Wp = x.index.shape[3]
    Og = O // groups
    go, gr, gc = _conv_plan(p, N * groups, Og, Cg, OH, OW, KH, stride, Wp, KH * KW)
    ob_, rb_, cb_ = _blocks(Og, go), _blocks(OH, gr), _blocks(Cg, gc)
    if len(cb_) > 1:
        acc = p.new_tensor(label + ".partial", "f32", (len(cb_), N, O, OH, OW))
        target = acc.index
    else:
        acc = p.new_tensor(label, "f32", (N, O, OH, OW))
        target = acc.index[None]
    ntasks = N * groups * len(ob_) * len(rb_) * len(cb_)
    tiles = p.spread(ntasks)
    tasks = []
    t = 0
    for nn in range(N):
        for gi in range(groups):
            for (o0, o1) in ob_:
                for (r0, r1) in rb_:
                    for ci, (c0, c1) in enumerate(cb_):
                        tile = int(tiles[t])
                        t += 1
                        oo0, oo1 = gi * Og + o0, gi * Og + o1
                        xin0, xin1 = r0 * stride, (r1 - 1) * stride + KH
                        xs = x.index[nn, gi * Cg + c0: gi * Cg + c1, xin0:xin1, :]
                        ws = w.index[oo0:oo1, c0:c1, :, :]
                        ys = target[ci, nn, oo0:oo1, r0:r1, :]
                        p.g.tile_of[acc.tensor][ys.ravel()] = tile
                        p.ensure_mapped(g.View(w.tensor, ws, w.span), np.int32(tile))
                        tasks.append({"tile": tile, "state": {"kh": KH, "kw": KW, "s": stride, "wp": Wp, "ow": OW},
                                      "conns": {"x": (x.tensor, xs.reshape(c1 - c0, -1)),
                                                "w": (w.tensor, ws.reshape(o1 - o0, -1)),
                                                "y": (acc.tensor, ys.reshape(o1 - o0, -1))}})
    cs = p.new_cs(label)
    _emit(p, cs, p.prim("Conv2dBlock"), tasks, ("kh", "kw", "s", "wp", "ow"))
    return _add_partials(p, n, cs, acc, len(cb_) > 1, label)


def pool(p, n: Node) -> g.View:
    kind, k, stride, padding = n.attrs
    x = p.value(n.args[0])
    label = p.name(n)
    if padding:
        fill = -np.inf if kind == "max" else 0.0
        x = padded(p, x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), fill, "f32", label + ".pad")
    else:
        p.ensure_mapped(x)
    N, C = x.index.shape[:2]
    Wp = x.index.shape[3]
    _, _, OH, OW = n.shape
    go, gr = _pool_plan(p, N, C, OH, OW, k, stride, Wp)
    cbs, rbs = _blocks(C, go), _blocks(OH, gr)
    out = p.new_tensor(label, "f32", n.shape)
    ntasks = N * len(cbs) * len(rbs)
    tiles = p.spread(ntasks)
    tasks = []
    t = 0
    for nn in range(N):
        for (c0, c1) in cbs:
            for (r0, r1) in rbs:
                tile = int(tiles[t])
                t += 1
                xs = x.index[nn, c0:c1, r0 * stride:(r1 - 1) * stride + k, :]
                ys = out.index[nn, c0:c1, r0:r1, :]
                p.g.tile_of[out.tensor][ys.ravel()] = tile
                tasks.append({"tile": tile, "state": {"k": k, "s": stride, "wp": Wp, "ow": OW},
                              "conns": {"x": (x.tensor, xs.reshape(c1 - c0, -1)),
                                        "y": (out.tensor, ys.reshape(c1 - c0, -1))}})
    cs = p.new_cs(label)
    _emit(p, cs, p.prim("MaxPoolBlock" if kind == "max" else "AvgPoolBlock"), tasks, ("k", "s", "wp", "ow"))
    p.record(n, cs)
    return out
