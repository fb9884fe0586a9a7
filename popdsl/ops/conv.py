"""Convolution and pooling: `conv2d(x, w, stride, padding, groups)` (NCHW, weights
OIHW), `max_pool2d` and `avg_pool2d (x, kernel, stride, padding)`.  Their gradient
rules build the backward primitives of `ops.conv_grad`.

Requires `ops.core`, `ops.blocks`, `ops.reduce` (partial sums) and `ops.shape`
(padding); produces the `conv2d` and `pool` operations and their partition rules:
tasks over batch, groups, output channels, output rows and (for conv) input
channels, each within SLAB_BYTES of input per vertex, the split chosen by estimated
cycles at the target's rates (or, where the fastest would crowd a tile's memory,
the one that holds least of those about as fast: `_conv_plan`); padding is a tensor the input is copied into, its
border filled (zero, or -inf for max pooling: a window never sees padding as a
maximum).  Average pooling divides by the whole kernel, padding included (PyTorch's
`count_include_pad=True`).
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.ir.cost import LOOP_ITER, LOOP_SETUP, RPT_ITER, VERTEX_OVERHEAD, amp_cycles
from popdsl.ir.intrinsics import DIV, OP
from popdsl.ops.blocks import (CROWDED_BYTES, SLAB_BYTES, TILE_BUFFER_BYTES, block_of, blocks, bounds, ceil_div,
                               emit_classes, fallback_rank, map_first, map_whole, pow2_splits, shape_classes, stacked,
                               task_grid, worker_bands)
from popdsl.ops import elementwise
from popdsl.ops.core import FLOATS, HIGH_VALUE, Builder, Function, OpDef, Param, float_result, shape_str
from popdsl.ops import conv_grad
from popdsl.ops.reduce import add_partials
from popdsl.ops.shape import padded, subsampled


# ---------------------------------------------------------------- shape rules

def conv2d(b: Builder, x: Node, w: Node, stride: int, padding: int, groups: int, span) -> Node:
    if len(x.shape) != 4 or len(w.shape) != 4:
        b.err(span, f"conv2d needs x as [N, C, H, W] and weights as [O, C/groups, KH, KW]; "
              f"found {shape_str(x.shape)} and {shape_str(w.shape)}")
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if groups < 1 or c % groups or o % groups:
        b.err(span, f"conv2d: groups = {groups} must divide input channels {c} and output channels {o}")
    if cg != c // groups:
        b.err(span, f"conv2d: weights {shape_str(w.shape)} expect {cg * groups} input channels "
              f"(with groups = {groups}), x {shape_str(x.shape)} has {c}")
    if stride < 1 or padding < 0:
        b.err(span, "conv2d: stride must be >= 1 and padding >= 0")
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    if oh < 1 or ow < 1:
        b.err(span, f"conv2d: a {kh}x{kw} kernel does not fit input {shape_str(x.shape)} with padding {padding}")
    if x.dtype not in FLOATS or w.dtype not in FLOATS:
        b.err(span, "conv2d needs floating-point tensors")
    # Computed in f32 (the codelet's type); f16 operands are converted and the
    # result rounded back when both were f16.
    out = b.make("conv2d", (elementwise.cast(b, "f32", x), elementwise.cast(b, "f32", w)),
                 (stride, padding, groups), (n, o, oh, ow), "f32")
    return elementwise.cast(b, float_result(x.dtype, w.dtype), out)


def pool(b: Builder, kind: str, x: Node, kernel: int, stride: int, padding: int, span) -> Node:
    if len(x.shape) != 4:
        b.err(span, f"{kind}_pool2d needs x as [N, C, H, W], found {shape_str(x.shape)}")
    if kernel < 1 or stride < 1 or padding < 0 or padding * 2 > kernel:
        b.err(span, f"{kind}_pool2d: kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2")
    n, c, h, w = x.shape
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if oh < 1 or ow < 1:
        b.err(span, f"{kind}_pool2d: kernel {kernel} does not fit {shape_str(x.shape)}")
    if x.dtype not in FLOATS:
        b.err(span, f"{kind}_pool2d needs a floating-point tensor")
    out = b.make("pool", (elementwise.cast(b, "f32", x),), (kind, kernel, stride, padding), (n, c, oh, ow), "f32")
    return elementwise.cast(b, x.dtype, out)


def _conv_ref(attrs, x, w):
    stride, padding, groups = attrs
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    out = [np.einsum("nchwyx,ocyx->nohw", win[:, gi * cg:(gi + 1) * cg], w[gi * og:(gi + 1) * og].astype(np.float64))
           for gi in range(groups)]
    return np.concatenate(out, axis=1)


def _pool_ref(attrs, x):
    kind, k, stride, padding = attrs
    fill = -np.inf if kind == "max" else 0.0
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5)) if kind == "max" else win.mean(axis=(4, 5))


# ---------------------------------------------------------------- gradient rules

def _g_conv(b: Builder, n: Node, g: Node, i: int) -> Node:
    stride, padding, groups = n.attrs
    x, w = n.args
    if i == 0:
        return conv_grad.input_grad(b, g, w, stride, padding, groups, x.shape)
    return conv_grad.weight_grad(b, x, g, stride, padding, groups, w.shape)


def _g_pool(b: Builder, n: Node, g: Node, i: int) -> Node:
    kind, k, stride, padding = n.attrs
    return conv_grad.pool_grad(b, kind, n.args[0], g, k, stride, padding)


# ---------------------------------------------------------------- plans

def conv_vertex_cycles(ob: int, cb: int, rb: int, ow: int, kh: int, kw: int) -> int:
    """The cycles `ir.cost` charges a Conv2dBlock vertex (stdlib/prims.pop) of ob
    output channels, cb input channels, rb output rows of width ow and a kh x kw
    kernel: zeroing y, then one amp per output row and kernel position, loop and
    index arithmetic included (tests/test_amp.py keeps the two equal)."""
    zero = LOOP_SETUP + ob * (LOOP_ITER + LOOP_SETUP + rb * ow * (OP + RPT_ITER))
    per_amp = LOOP_ITER + _AMP_OPERANDS + amp_cycles(ob, cb, ow, "f32")
    per_ky = LOOP_ITER + _ROW_LETS + LOOP_SETUP + kw * per_amp
    loops = LOOP_SETUP + rb * (LOOP_ITER + 2 * OP + LOOP_SETUP + OP + kh * per_ky)
    return VERTEX_OVERHEAD + _LETS + zero + loops


# Plans within this fraction of the fastest estimate count as tied, and the tile
# bytes decide (the cycle model is not that exact).
NEAR_TIE = 0.02
MIN_BAND = 8                  # columns of a worker's band: at 4 cycles each, about one AMP pass's set-up
_LETS = DIV + 4 * OP          # let oh = ys / ow; let kk = kh * kw
_ROW_LETS = 12 * OP           # let wrow = ky * kw; let xrow = (oy * s + ky) * wp + ox * s; the loop's kw
_AMP_OPERANDS = 4 * OP        # wrow + kx, xrow + kx, and the state ow and s


def conv_tile_cycles(ob: int, cb: int, rb: int, ow: int, kh: int, kw: int, workers: int, tasks: int = 1) -> int:
    """A tile's compute cycles for `tasks` alike convolution tasks, each split over
    the workers as `blocks.worker_bands` splits it: rows, or columns when rows are
    fewer.  The model packs a tile's vertices on its workers: max(workers x the
    longest, the sum of all).  (Charging each of several tasks a tile's time for one
    made a big batch's plans split input channels instead of rows, every split a
    copy of the output in partial sums: 205 MB for one of ResNet-50's at batch 32.)"""
    if rb >= workers:                   # a band of rows per worker
        cycles = [conv_vertex_cycles(ob, cb, rb * (k + 1) // workers - rb * k // workers, ow, kh, kw)
                  for k in range(workers)]
        per_task = sum(cycles)
    else:                               # each row in bands of columns
        bands = max(1, min(ow // MIN_BAND, ceil_div(workers, rb)))
        cycles = [conv_vertex_cycles(ob, cb, 1, ow * (k + 1) // bands - ow * k // bands, kh, kw) for k in range(bands)]
        per_task = rb * sum(cycles)
    return max(workers * max(cycles), tasks * per_task)


def _conv_layout(p, outer: int, Og: int, Cg: int, OH: int, OW: int, kh: int, s: int, wp: int, kk: int,
                 groups: int, go: int, gr: int, gc: int, shared_slabs: bool = False):
    """A plan's tasks on the tiles: (tasks, tasks per tile, input slab, weight block
    and output block bytes, bytes a tile receives, images per run).  Several tasks
    on a tile are runs of tasks sharing a weight block, every image's; with
    `shared_slabs`, runs of as many images as make the tile receive least, the
    weight blocks of one input-channel block next to each other, so that a tile's
    tasks also share those images' input slabs over output-channel blocks (a
    batch-32 training step's stage-4 convolution on 368 tiles: 23 tasks a tile,
    each its own 31 KB slab, 0.9 MB of the tile; a tile of 4 images x 6 output
    blocks receives 4 slabs and 6 weight blocks)."""
    ob, rb, cb = ceil_div(Og, go), ceil_div(OH, gr), ceil_div(Cg, gc)
    rin = (rb - 1) * s + kh
    slab, wblk, yblk = cb * rin * wp * 4, ob * cb * kk * 4, ob * rb * OW * 4
    tasks = outer * go * gr * gc
    per_tile = ceil_div(tasks, p.tiles)
    images = outer // groups
    best = None
    for a in [images] + ([k for k in pow2_splits(images) if k < images] if shared_slabs else []):
        run = a * gr
        wblocks = min(per_tile, 1 + ceil_div(per_tile - 1, run))
        # A run of every image: each task of a tile its own slab.
        slabs = per_tile if a == images else min(per_tile, run * min(wblocks, 1 + ceil_div(wblocks - 1, go)))
        moved = slabs * slab + wblocks * wblk
        if best is None or moved < best[0]:
            best = (moved, a)
    return tasks, per_tile, slab, wblk, yblk, best[0], best[1]


def _conv_plan(p, outer: int, Og: int, Cg: int, OH: int, OW: int, kh: int, s: int, wp: int, kk: int,
               groups: int = 1, layout: bool = False):
    """(output-channel, output-row, input-channel) splits of a convolution of
    `outer` = images x `groups` independent jobs (and, with `layout`, the images
    per run of a tile's tasks, `_conv_layout`).

    Searches power-of-two splits for the least estimated time per tile — the
    cycles the cycle model charges its vertices (`conv_tile_cycles`) and the bytes
    a tile receives at the target's exchange rate (input slabs, weights, and partial
    sums when input channels are split) — among plans whose per-vertex blocks fit
    SLAB_BYTES: one task per tile if it can, else several (a big batch), then
    preferring plans whose tasks receive and produce at most TILE_BUFFER_BYTES on a
    tile.  When several tasks share a tile and the fastest plan puts more than
    CROWDED_BYTES on it, the plan is chosen for memory: tasks share input slabs
    too, and of the plans within NEAR_TIE of the fastest, the one whose tile holds
    least (at batch 32 on 368 tiles the fastest of a stage-4 convolution put
    893 KB on each tile; one 0.004 % slower, sharing slabs, 608 KB)."""
    best, crowded, roomy, fallback = None, None, None, None
    target = p.g.target
    rate = target.exchange_bytes_per_cycle
    plans = []                   # (splits, cycles but the exchange) within SLAB_BYTES, for the memory rule
    for go in pow2_splits(Og):
        for gr in pow2_splits(OH):
            for gc in pow2_splits(Cg):
                ob, rb, cb = ceil_div(Og, go), ceil_div(OH, gr), ceil_div(Cg, gc)
                tasks, per_tile, slab, wblk, yblk, moved, _ = _conv_layout(p, outer, Og, Cg, OH, OW, kh, s, wp, kk,
                                                                           groups, go, gr, gc)
                compute = conv_tile_cycles(ob, cb, rb, OW, kh, kk // kh, target.workers, per_tile)
                summed = outer * Og * OH * OW * gc * 4 / p.tiles / rate * 2 if gc > 1 else 0
                cost = compute + moved / rate + summed   # partial sums: gc copies of the output, exchanged, added
                worst = max(slab, wblk, yblk)
                key = fallback_rank(p, tasks, worst)
                if fallback is None or key < fallback[0]:
                    fallback = (key, (go, gr, gc))
                if worst > SLAB_BYTES:
                    continue
                plans.append(((go, gr, gc), compute + summed))
                # One task per tile at most: more only multiplies exchanged data.
                if tasks <= p.tiles and (best is None or cost < best[0]):
                    best = (cost, (go, gr, gc))
                # Unless no such plan fits (a big batch): then the cheapest that fits,
                # never the smallest blocks regardless of their number (ResNet-50's
                # stride-2 shortcut at batch 4 would be 29M vertices).
                if crowded is None or cost < crowded[0]:
                    crowded = (cost, (go, gr, gc), moved + per_tile * yblk)
                # Of those, one whose exchange buffers and output leave room on the tile
                # (a batch-8 training step's recomputed stage-3 convolution put five
                # tasks' 30 KB of inputs on each tile, 150 KB of buffers at its peak).
                if moved + per_tile * yblk <= TILE_BUFFER_BYTES and (roomy is None or cost < roomy[0]):
                    roomy = (cost, (go, gr, gc))
    args = (p, outer, Og, Cg, OH, OW, kh, s, wp, kk, groups)
    if best or roomy or crowded is None or crowded[2] <= CROWDED_BYTES:
        splits = (best or roomy or crowded or fallback)[1]
        return (*splits, outer // groups) if layout else splits
    scored = []                  # (cost, tile bytes, splits, images per run)
    for splits, rest in plans:
        _, per_tile, _, _, yblk, moved, a = _conv_layout(*args, *splits, shared_slabs=True)
        scored.append((rest + moved / rate, moved + per_tile * yblk, splits, a))
    fastest = min(c[0] for c in scored)
    _, _, splits, a = min((c for c in scored if c[0] <= fastest * (1 + NEAR_TIE)), key=lambda c: (c[1], c[0]))
    return (*splits, a) if layout else splits


def _pool_plan(p, N: int, C: int, OH: int, OW: int, k: int, s: int, wp: int):
    """(channel, row) splits of a pooling: all tiles busy, blocks within SLAB_BYTES."""
    best, fallback = None, None
    for gcn in pow2_splits(C):
        for gr in pow2_splits(OH):
            cb, rb = ceil_div(C, gcn), ceil_div(OH, gr)
            rin = (rb - 1) * s + k
            slab = cb * rin * wp * 4
            tasks = N * gcn * gr
            cost = ceil_div(tasks, p.tiles) * (cb * rb * OW * k * k + slab / p.g.target.exchange_bytes_per_cycle)
            key = fallback_rank(p, tasks, slab)
            if fallback is None or key < fallback[0]:
                fallback = (key, (gcn, gr))
            if slab <= SLAB_BYTES and (best is None or cost < best[0]):
                best = (cost, (gcn, gr))
    return (best or fallback)[1]


# ---------------------------------------------------------------- partition rules

def partition_conv(p, n: Node) -> g.View:
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
    x, stride = subsampled(p, x, KH, KW, stride, OH, OW, label)
    Wp = x.index.shape[3]
    Og = O // groups
    go, gr, gc, images = _conv_plan(p, N * groups, Og, Cg, OH, OW, KH, stride, Wp, KH * KW, groups, layout=True)
    ob_, rb_, cb_ = blocks(Og, go), blocks(OH, gr), blocks(Cg, gc)
    if len(cb_) > 1:
        acc = p.new_tensor(label + ".partial", "f32", (len(cb_), N, O, OH, OW))
        target = acc.index
    else:
        acc = p.new_tensor(label, "f32", (N, O, OH, OW))
        target = acc.index[None]
    # The tasks: images, groups, output-channel, row and input-channel blocks (the
    # last innermost), all at once: per task its blocks' bounds.
    nob, nrb, ncb = len(ob_), len(rb_), len(cb_)
    nn, gi, oi, ri, ci = task_grid(N, groups, nob, nrb, ncb)
    # Several tasks to a tile: those of one weight block together (in runs of
    # `images` images, input-channel blocks outside output-channel blocks).
    tiles = p.spread(nn.size, together=(gi * nob + oi) * ncb + ci if images == N
                     else (((nn // images) * groups + gi) * ncb + ci) * nob + oi)
    (ob0, ob1), (rb0, rb1), (cb0, cb1) = bounds(ob_), bounds(rb_), bounds(cb_)
    o0, o1 = gi * Og + ob0[oi], gi * Og + ob1[oi]
    r0, r1 = rb0[ri], rb1[ri]
    c0, c1 = cb0[ci], cb1[ci]
    # Each output element is one task's: the tile of (image, its output channel's
    # group and block, its row's block, partial sum).  acc is new, laid out as `target`.
    og, oo = np.divmod(np.arange(O), Og)
    o_task = (og * nob + block_of(ob_)[oo]) * nrb
    task = ((np.arange(N)[:, None, None] * (groups * nob * nrb) + o_task[:, None] + block_of(rb_)) * ncb
            + np.arange(ncb)[:, None, None, None])
    map_whole(p, acc.tensor, task.shape + (OW,), tiles[task][..., None])
    # A weight block goes where its first task runs (first image, first row block).
    wtask = (o_task[:, None] * ncb + block_of(cb_))[:, :, None, None]
    map_first(p, w, tiles[wtask], wtask)
    # A task's block is shared by its tile's workers: a vertex per band of output
    # rows, or of output columns when rows are fewer than workers.
    t, r0, r1, x0, x1 = worker_bands(r0, r1, OW, p.workers, MIN_BAND)
    nn, gi, ci, c0, c1, o0, o1, tiles = nn[t], gi[t], ci[t], c0[t], c1[t], o0[t], o1[t], tiles[t]

    def conns(v):
        """Vertices v (one class): x[image, channels, input rows, :], w[outputs,
        channels, :, :] and target[partial, image, outputs, rows, columns], each
        (block, -1)."""
        ob, cb = int(o1[v[0]] - o0[v[0]]), int(c1[v[0]] - c0[v[0]])
        xc, xr = (gi[v] * Cg + c0[v], gi[v] * Cg + c1[v]), (r0[v] * stride, (r1[v] - 1) * stride + KH)
        oc = (o0[v], o1[v])
        return {"x": (x.tensor, stacked(x.index, (nn[v], xc, xr, slice(None)), (cb, -1))),
                "w": (w.tensor, stacked(w.index, (oc, (c0[v], c1[v]), slice(None), slice(None)), (ob, -1))),
                "y": (acc.tensor, stacked(target, (ci[v], nn[v], oc, (r0[v], r1[v]), (x0[v], x1[v])), (ob, -1)))}
    cs = p.new_cs(label)
    emit_classes(p, cs, p.prim("Conv2dBlock"), tiles, shape_classes(o1 - o0, r1 - r0, c1 - c0, x1 - x0), conns,
                 {"kh": KH, "kw": KW, "s": stride, "wp": Wp, "ow": x1 - x0, "ox": x0})
    return add_partials(p, n, cs, acc, len(cb_) > 1, label)


def partition_pool(p, n: Node) -> g.View:
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
    cbs, rbs = blocks(C, go), blocks(OH, gr)
    out = p.new_tensor(label, "f32", n.shape)
    # The tasks: images, channel blocks, row blocks (the last innermost), all at once.
    ncb, nrb = len(cbs), len(rbs)
    tiles = p.spread(N * ncb * nrb)
    nn, ci, ri = task_grid(N, ncb, nrb)
    (cb0, cb1), (rb0, rb1) = bounds(cbs), bounds(rbs)
    c0, c1, r0, r1 = cb0[ci], cb1[ci], rb0[ri], rb1[ri]
    # Each output element is one task's (out is new and whole).
    task = (np.arange(N)[:, None, None] * ncb + block_of(cbs)[:, None]) * nrb + block_of(rbs)
    map_whole(p, out.tensor, task.shape + (OW,), tiles[task][..., None])

    def conns(v):
        """Tasks v (one class): x[image, channels, input rows, :] and out[image,
        channels, rows, :], each (channels, -1)."""
        cb = int(c1[v[0]] - c0[v[0]])
        return {"x": (x.tensor, stacked(x.index, (nn[v], (c0[v], c1[v]), (r0[v] * stride, (r1[v] - 1) * stride + k),
                                                  slice(None)), (cb, -1))),
                "y": (out.tensor, stacked(out.index, (nn[v], (c0[v], c1[v]), (r0[v], r1[v]), slice(None)), (cb, -1)))}
    cs = p.new_cs(label)
    emit_classes(p, cs, p.prim("MaxPoolBlock" if kind == "max" else "AvgPoolBlock"), tiles,
                 shape_classes(c1 - c0, r1 - r0), conns, {"k": k, "s": stride, "wp": Wp, "ow": OW})
    p.record(n, cs)
    return out


# ---------------------------------------------------------------- the table's entries

def op_defs() -> list[OpDef]:
    return [OpDef("conv2d", "compute", "2-D convolution, NCHW input, OIHW weights", ref=_conv_ref,
                  partition=partition_conv, codelets=("Conv2dBlock", "ReduceSumCols", "ReduceSumCols2", "Fill"),
                  cost=_conv_plan,
                  flops=lambda n: 2 * n.numel * int(np.prod(n.args[1].shape[1:])), grad=_g_conv,
                  value=HIGH_VALUE),
            OpDef("pool", "compute", "max or average pooling over square windows", ref=_pool_ref,
                  partition=partition_pool, codelets=("MaxPoolBlock", "AvgPoolBlock", "Fill"), cost=_pool_plan,
                  flops=lambda n: n.numel * n.attrs[1] ** 2, grad=_g_pool)]


def functions() -> list[Function]:
    conv = Function("conv2d", (Param("x", "tensor"), Param("w", "tensor"), Param("stride", "int", 1),
                               Param("padding", "int", 0), Param("groups", "int", 1)),
                    lambda b, a, span: conv2d(b, a["x"], a["w"], a["stride"], a["padding"], a["groups"], span),
                    "2-D convolution (NCHW, OIHW)")
    out = [conv]
    for kind in ("max", "avg"):
        out.append(Function(f"{kind}_pool2d", (Param("x", "tensor"), Param("kernel", "int"),
                                               Param("stride", "int", None), Param("padding", "int", 0)),
                            lambda b, a, span, kind=kind: pool(b, kind, a["x"], a["kernel"],
                                                               a["kernel"] if a["stride"] is None else a["stride"],
                                                               a["padding"], span),
                            f"{kind} pooling over kernel x kernel windows"))
    return out
