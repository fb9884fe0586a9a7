"""The backward primitives of convolution and pooling, which their gradient rules
(`ops.conv`) build: `conv2d_grad_x` (the input's gradient: a transposed
convolution), `conv2d_grad_w` (the weights'), `max_pool_grad` (each window's
gradient to the first maximum of the window in row order, the element the
forward's max kept) and `avg_pool_grad` (spread evenly over the window, padding
included, as the forward divides).

Requires `ops.core`, `ops.blocks`, `ops.reduce` (partial sums) and `ops.shape`
(padding); produces the four operations, their numpy references and partition
rules.  They work in padded coordinates: each vertex owns whole padded images of
its channels, so overlapping windows add up on one vertex, and the result is the
unpadded middle, a view.  Tasks go over images and channel blocks; the reduced
dimension (output channels for the input's gradient, images for the weights')
may be split too, leaving partial sums `reduce.sum_partials` adds up.  Plans are
chosen by estimated cycles at the target's rates, or, where the fastest would
crowd a tile's memory, as PopLibs chooses them then (`split_plan`).  They have no
gradients of their own: popdsl takes no second derivatives of convolutions.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import graph as g
from popdsl.ir.cost import LOOP_ITER, LOOP_SETUP, RPT_ITER, VERTEX_OVERHEAD, amp_cycles
from popdsl.ir.index import Strided
from popdsl.ir.intrinsics import DIV, OP
from popdsl.ir.tensor import Node
from popdsl.ops.blocks import (block_of, blocks, bounds, emit_classes, map_first, map_runs, map_whole, shape_classes,
                               split_plan, stacked, task_grid)
from popdsl.ops.core import HIGH_VALUE, Builder, OpDef
from popdsl.ops.reduce import sum_partials
from popdsl.ops.shape import padded, place, subsampled


# ---------------------------------------------------------------- builders (for the gradient rules)

def input_grad(b: Builder, g: Node, w: Node, stride: int, padding: int, groups: int, x_shape) -> Node:
    kh, kw = w.shape[2:]
    if kh == kw == 1 and stride > 1 and padding == 0:
        # A strided 1 x 1 kernel read x's every stride-th row and column only
        # (`shape.subsampled`): its gradient there, placed among zeros.  Computed
        # whole, every partial sum of it would be stride² times larger (ResNet-50's
        # stage-4 shortcut at batch 8: sixteen partials of 6.4 MB, not 1.6 MB).
        n, c, h, wd = x_shape
        oh, ow = g.shape[2:]
        sub = b.make("conv2d_grad_x", (g, w), (1, 0, groups, oh, ow), (n, c, oh, ow), "f32")
        at = np.arange(n * c * h * wd).reshape(x_shape)[:, :, ::stride, ::stride][:, :, :oh, :ow]
        return place(b, sub, at, x_shape, "f32")
    return b.make("conv2d_grad_x", (g, w), (stride, padding, groups) + tuple(x_shape[2:]), x_shape, "f32")


def weight_grad(b: Builder, x: Node, g: Node, stride: int, padding: int, groups: int, w_shape) -> Node:
    return b.make("conv2d_grad_w", (x, g), (stride, padding, groups) + tuple(w_shape[2:]), w_shape, "f32")


def pool_grad(b: Builder, kind: str, x: Node, g: Node, k: int, stride: int, padding: int) -> Node:
    if kind == "max":
        return b.make("max_pool_grad", (x, g), (k, stride, padding), x.shape, "f32")
    return b.make("avg_pool_grad", (g,), (k, stride, padding) + x.shape[2:], x.shape, "f32")


# ---------------------------------------------------------------- numpy references

def _pad64(x, p, fill=0.0):
    return np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)


def _conv_grad_x_ref(attrs, g, w):
    stride, padding, groups, h, wd = attrs
    n, o, oh, ow = g.shape
    _, cg, kh, kw = w.shape
    og = o // groups
    dx = np.zeros((n, cg * groups, h + 2 * padding, wd + 2 * padding))
    g, w = g.astype(np.float64), w.astype(np.float64)
    for gi in range(groups):
        gg, ww = g[:, gi * og:(gi + 1) * og], w[gi * og:(gi + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                dx[:, gi * cg:(gi + 1) * cg, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride] += \
                    np.einsum("nohw,oc->nchw", gg, ww[:, :, ky, kx])
    return dx[:, :, padding:padding + h, padding:padding + wd]


def _conv_grad_w_ref(attrs, x, g):
    stride, padding, groups, kh, kw = attrs
    x = _pad64(x, padding)
    n, c, _, _ = x.shape
    _, o, oh, ow = g.shape
    cg, og = c // groups, o // groups
    dw = np.zeros((o, cg, kh, kw))
    for gi in range(groups):
        gg = g[:, gi * og:(gi + 1) * og].astype(np.float64)
        for ky in range(kh):
            for kx in range(kw):
                win = x[:, gi * cg:(gi + 1) * cg, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
                dw[gi * og:(gi + 1) * og, :, ky, kx] = np.einsum("nohw,nchw->oc", gg, win)
    return dw


def _max_pool_grad_ref(attrs, x, g):
    k, stride, padding = attrs
    n, c, h, w = x.shape
    xp = _pad64(x, padding, -np.inf)
    _, _, oh, ow = g.shape
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :oh, :ow]
    first = win.reshape(n, c, oh, ow, k * k).argmax(axis=4)          # the first maximum, row by row
    rows = np.arange(oh)[:, None] * stride + first // k
    cols = np.arange(ow)[None, :] * stride + first % k
    dx = np.zeros_like(xp)
    ni, ci = np.indices((n, c))
    np.add.at(dx, (ni[:, :, None, None], ci[:, :, None, None], rows, cols), g.astype(np.float64))
    return dx[:, :, padding:padding + h, padding:padding + w]


def _avg_pool_grad_ref(attrs, g):
    k, stride, padding, h, w = attrs
    n, c, oh, ow = g.shape
    dx = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for ky in range(k):
        for kx in range(k):
            dx[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride] += g / (k * k)
    return dx[:, :, padding:padding + h, padding:padding + w]


# ---------------------------------------------------------------- plans and partition rules

# What `ir.cost` charges the statements around each amp of the backward codelets
# (stdlib/prims.pop), counted from their code; tests/test_amp.py keeps these equal.
# `split_plan` does not use them yet: planning with them (instead of weighing
# multiply-accumulates) cut the bench's step by 5 % but moved later ops' tiles, and
# AlexNet's batch-3 training step, which fits with 341 B to spare, no longer did.
_X_LETS = DIV + 4 * OP            # let oh = ys / ow; let kk = kh * kw
_X_ROW = 5 * OP                   # let xrow = (oy * s + ky) * wp
_X_OPERANDS = 8 * OP              # xrow + kx, ky * kw + kx, oy * ow, and the state ow, kk, s
_BOUND = OP                       # a loop bound read from the vertex state (kh, kw)
_W_LETS = 3 * DIV + 4 * OP        # let oh = ys / ow; let nb = q / o; let c = r / nb; let kk = kh * kw
_W_OPERANDS = 10 * OP             # ky * kw + kx, nn * o, oy * ow, nn * c, xrow + kx, and the state ow, s, kk


# Cycles (instructions of its worker) a max-pool gradient vertex (MaxPoolGradRows)
# spends per element of a window, as the model counts them: 8-17 for kernels 2-5
# on random data (tests/test_amp.py keeps it within a factor of two), depending
# on how often a window's maximum moves.  `_partition_pool_grad` plans with it.
_POOL_GRAD_CYCLES = 11


def grad_x_vertex_cycles(o: int, c: int, oh: int, ow: int, kh: int, kw: int, s: int) -> int:
    """The cycles `ir.cost` charges a Conv2dGradX vertex of o output channels (of
    g), c input channels (of dx), oh x ow output positions and a kh x kw kernel of
    stride s: zeroing dx's padded rows, then one amp_at per output row and kernel
    position."""
    wp, hp = (ow - 1) * s + kw, (oh - 1) * s + kh
    zero = LOOP_SETUP + c * (LOOP_ITER + LOOP_SETUP + hp * wp * (OP + RPT_ITER))
    per_kx = LOOP_ITER + _X_OPERANDS + amp_cycles(c, o, ow, "f32")
    per_ky = LOOP_ITER + _X_ROW + LOOP_SETUP + _BOUND + kw * per_kx
    return VERTEX_OVERHEAD + _X_LETS + zero + LOOP_SETUP + oh * (LOOP_ITER + LOOP_SETUP + _BOUND + kh * per_ky)


def grad_w_vertex_cycles(o: int, c: int, nb: int, oh: int, ow: int, kh: int, kw: int, s: int) -> int:
    """The cycles `ir.cost` charges a Conv2dGradW vertex of o output channels, c
    input channels, nb images of oh x ow output positions and a kh x kw kernel of
    stride s: zeroing dw, then one amp_bt per image, output row and kernel
    position."""
    zero = LOOP_SETUP + o * (LOOP_ITER + LOOP_SETUP + c * kh * kw * (OP + RPT_ITER))
    per_kx = LOOP_ITER + _W_OPERANDS + amp_cycles(o, ow, c, "f32")
    per_ky = LOOP_ITER + _X_ROW + LOOP_SETUP + _BOUND + kw * per_kx
    per_oy = LOOP_ITER + LOOP_SETUP + _BOUND + kh * per_ky
    return VERTEX_OVERHEAD + _W_LETS + zero + LOOP_SETUP + nb * (LOOP_ITER + LOOP_SETUP + oh * per_oy)


def _rows_reaching(rb: int, kh: int, stride: int, oh: int) -> int:
    """How many output rows have windows (kh rows, `stride` apart) that reach a
    block of rb padded rows, at most."""
    return min(oh, (rb + kh - 2) // stride + 1)


def _reaching(y0: np.ndarray, y1: np.ndarray, kh: int, stride: int, oh: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block of padded rows [y0, y1): the output rows [first, last) whose windows
    reach it, widened to one row where none does (the codelets skip what falls
    outside their block)."""
    first = np.minimum(np.maximum(0, -(-(y0 - kh + 1) // stride)), oh - 1)
    last = np.maximum(np.minimum(oh, (y1 - 1) // stride + 1), first + 1)
    return first, last


def _strided(index, block, shape) -> bool:
    """Whether the leading `block` (sizes of index's first axes) of a view reshapes
    to `shape` without a copy, as `stacked` makes a vertex's field of it."""
    if not isinstance(index, Strided):
        return False
    return index[tuple(slice(0, b) for b in block)].view_reshape(shape) is not None


def _crop(p, out: g.View, shape, padding: int) -> g.View:
    """The middle of a padded result, as a view."""
    n, c, h, w = shape
    idx = out.index.reshape(n, c, h + 2 * padding, w + 2 * padding)
    return g.View(out.tensor, idx[:, :, padding:padding + h, padding:padding + w], out.span)


def _result(p, n: Node, cs, acc: g.View, split: bool, label: str, shape) -> g.View:
    """A backward primitive's padded result: its accumulator, or the sum of its
    partials."""
    css = [cs]
    out = acc
    if split:
        before = len(p.seq)
        out = sum_partials(p, acc, label, shape)
        css += [p.g.compute_sets[e.cs] for e in p.seq[before:]]
    p.record(n, *css)
    return out


def partition_conv_grad_x(p, n: Node) -> g.View:
    stride, padding, groups, H, W = n.attrs
    gv, w = p.value(n.args[0]), p.value(n.args[1])
    p.ensure_mapped(gv)
    N, O, OH, OW = gv.index.shape
    _, Cg, KH, KW = w.index.shape
    C, Hp, Wp, Og = Cg * groups, H + 2 * padding, W + 2 * padding, O // groups
    kk = KH * KW
    label = p.name(n)

    def g_rows(rb: int) -> int:                  # output rows whose windows reach rb padded rows
        return _rows_reaching(rb, KH, stride, OH)

    # Padded rows split too (each block gathers the output rows whose windows reach
    # it): a whole 56x56 image's channels per vertex filled ResNet-50's tiles.
    # Tasks of one block of w (every image's, every row block's) may share it on a
    # tile, as a big batch needs.
    plan = split_plan(p, N * groups, (Hp, Cg, Og),
                       lambda rb, cb, ob: (ob * g_rows(rb) * OW * 4 + ob * cb * kk * 4,
                                           max(cb * rb * Wp, ob * g_rows(rb) * OW) * 4, cb * rb * Wp * 4),
                       lambda rb, cb, ob: cb * ob * kk * g_rows(rb) * OW, partial_dims=(2,),
                       partial_bytes=N * C * Hp * Wp * 4,
                       share=lambda splits, rb, cb, ob: (ob * cb * kk * 4, N * splits[0]))
    gr, gc, go = plan.splits
    rbs, cbs, obs = blocks(Hp, gr), blocks(Cg, gc), blocks(Og, go)
    shape = (N, C, Hp, Wp)
    acc = p.new_tensor(label + ".partial" if len(obs) > 1 else label, "f32", ((len(obs),) if len(obs) > 1 else ()) + shape)
    target = acc.index.reshape((len(obs),) + shape)
    # The tasks: images, groups, input-channel blocks, row blocks, output-channel
    # blocks (the last innermost), all at once.
    ncb, nrb, nob = len(cbs), len(rbs), len(obs)
    nn, gi, ci, ri, oi = task_grid(N, groups, ncb, nrb, nob)
    # Several tasks to a tile: those reading one block of g together, or (a plan
    # of runs) one block of w.
    tiles = p.spread(nn.size, together=((gi * ncb + ci) * nob + oi) if plan.runs
                     else ((nn * groups + gi) * nrb + ri) * nob + oi)
    (cb0, cb1), (rb0, rb1), (ob0, ob1) = bounds(cbs), bounds(rbs), bounds(obs)
    c0, c1 = cb0[ci], cb1[ci]
    y0, y1 = rb0[ri], rb1[ri]
    o0, o1 = gi * Og + ob0[oi], gi * Og + ob1[oi]
    first, last = _reaching(y0, y1, KH, stride, OH)       # a row block's output rows
    # Each element of the result is one task's: (partial sum, image, its channel's
    # group and block, its row's block).  acc is new, laid out as `target`.
    cg, cc = np.divmod(np.arange(C), Cg)
    cpart = cg * ncb + block_of(cbs)[cc]
    task = (((np.arange(N)[:, None, None] * (groups * ncb) + cpart[:, None]) * nrb + block_of(rbs)) * nob
            + np.arange(nob)[:, None, None, None])
    map_whole(p, acc.tensor, task.shape + (Wp,), tiles[task][..., None])
    # A weight block goes where its first task (first image, first rows) runs.
    og, oo = np.divmod(np.arange(O), Og)
    wtask = ((og * ncb)[:, None] + block_of(cbs)) * nrb * nob + block_of(obs)[oo][:, None]
    map_first(p, w, tiles[wtask][:, :, None, None], wtask[:, :, None, None])

    def conns(v):
        """Tasks v (one class): g[image, outputs, (rows)], w[outputs, channels] and
        target[partial, image, channels, (rows)]."""
        ob, cb = int(o1[v[0]] - o0[v[0]]), int(c1[v[0]] - c0[v[0]])
        chans = (gi[v] * Cg + c0[v], gi[v] * Cg + c1[v])
        rows = () if nrb == 1 else ((first[v], last[v]),)
        dx_rows = () if nrb == 1 else ((y0[v], y1[v]),)
        return {"g": (gv.tensor, stacked(gv.index, (nn[v], (o0[v], o1[v])) + rows, (ob, -1))),
                "w": (w.tensor, stacked(w.index, ((o0[v], o1[v]), (c0[v], c1[v])), (ob, -1))),
                "dx": (acc.tensor, stacked(target, (oi[v], nn[v], chans) + dx_rows, (cb, -1)))}
    cs = p.new_cs(label)
    state = {"kh": KH, "kw": KW, "s": stride, "wp": Wp, "ow": OW}
    if nrb == 1:
        emit_classes(p, cs, p.prim("Conv2dGradX"), tiles, shape_classes(c1 - c0, o1 - o0), conns, state)
    else:
        emit_classes(p, cs, p.prim("Conv2dGradXRows"), tiles,
                     shape_classes(c1 - c0, o1 - o0, y1 - y0, last - first), conns,
                     {**state, "off": y0 - first * stride})
    return _crop(p, _result(p, n, cs, acc, len(obs) > 1, label, shape), n.shape, padding)


def partition_conv_grad_w(p, n: Node) -> g.View:
    stride, padding, groups, KH, KW = n.attrs
    x, gv = p.value(n.args[0]), p.value(n.args[1])
    label = p.name(n)
    if padding:
        x = padded(p, x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), 0.0, "f32", label + ".pad")
    else:
        p.ensure_mapped(x)
    p.ensure_mapped(gv)
    _, O, OH, OW = gv.index.shape
    x, stride = subsampled(p, x, KH, KW, stride, OH, OW, label)
    N, C, Hp, Wp = x.index.shape
    Cg, Og, kk = C // groups, O // groups, KH * KW

    def rows_in(rb: int) -> int:                 # input rows a block of rb output rows reads
        return (rb - 1) * stride + KH

    # Images and output rows are both summed over: a split of either gives partial
    # sums (rows: a stem's 230x230 input is too big for one vertex at batch 1).
    gn, gr, go, gc = split_plan(p, groups, (N, OH, Og, Cg),
                                 lambda nb, rb, ob, cb: ((nb * cb * rows_in(rb) * Wp + nb * ob * rb * OW) * 4,
                                                         max(nb * cb * rows_in(rb) * Wp, nb * ob * rb * OW,
                                                             ob * cb * kk) * 4, ob * cb * kk * 4),
                                 lambda nb, rb, ob, cb: nb * ob * cb * kk * rb * OW, partial_dims=(0, 1),
                                 partial_bytes=O * Cg * kk * 4,
                                 strided=lambda nb, rb, ob, cb: _strided(x.index, (nb, cb, rows_in(rb)), (nb * cb, -1))
                                 and _strided(gv.index, (nb, ob, rb), (nb * ob, -1))).splits
    nbs, rbs, obs, cbs = blocks(N, gn), blocks(OH, gr), blocks(Og, go), blocks(Cg, gc)
    nnb, nrb, nob, ncb = len(nbs), len(rbs), len(obs), len(cbs)
    nparts = nnb * nrb
    shape = n.shape
    acc = p.new_tensor(label + ".partial" if nparts > 1 else label, "f32",
                       ((nparts,) if nparts > 1 else ()) + shape)
    target = acc.index.reshape((nparts,) + shape)
    # The tasks: groups, image blocks, row blocks, output-channel blocks,
    # input-channel blocks (the last innermost), all at once.
    gi, ni, ri, oi, ci = task_grid(groups, nnb, nrb, nob, ncb)
    # Several tasks to a tile: those reading one block of g together.
    tiles = p.spread(gi.size, together=((gi * nnb + ni) * nrb + ri) * nob + oi)
    (nb0, nb1), (rb0, rb1), (ob0, ob1), (cb0, cb1) = bounds(nbs), bounds(rbs), bounds(obs), bounds(cbs)
    n0, n1 = nb0[ni], nb1[ni]
    r0, r1 = rb0[ri], rb1[ri]
    o0, o1 = gi * Og + ob0[oi], gi * Og + ob1[oi]
    c0, c1 = cb0[ci], cb1[ci]
    part = ni * nrb + ri
    # Each element of the result is one task's: (partial sum, its output channel's
    # group and block, its input channel's block).  acc is new, laid out as `target`:
    # a run of each block of input channels' KH x KW weights.
    og, oo = np.divmod(np.arange(O), Og)
    task = ((og * nparts + np.arange(nparts)[:, None]) * nob + block_of(obs)[oo]) * ncb
    task = task[..., None] + np.arange(ncb)                          # (partial, output, channel block)
    map_runs(p, acc.tensor, (np.arange(nparts * O).reshape(nparts, O, 1) * Cg + cb0) * kk, (cb1 - cb0) * kk,
             tiles[task])

    def conns(v):
        """Tasks v (one class): x[images, channels, input rows], g[images, outputs,
        rows] and target[partial, outputs, channels]."""
        nb, ob = int(n1[v[0]] - n0[v[0]]), int(o1[v[0]] - o0[v[0]])
        cb = int(c1[v[0]] - c0[v[0]])
        images, oc = (n0[v], n1[v]), (o0[v], o1[v])
        xrows = (r0[v] * stride, (r1[v] - 1) * stride + KH)
        return {"x": (x.tensor, stacked(x.index, (images, (gi[v] * Cg + c0[v], gi[v] * Cg + c1[v]), xrows),
                                        (nb * cb, -1))),
                "g": (gv.tensor, stacked(gv.index, (images, oc, (r0[v], r1[v])), (nb * ob, -1))),
                "dw": (acc.tensor, stacked(target, (part[v], oc, (c0[v], c1[v])), (ob, -1)))}
    cs = p.new_cs(label)
    emit_classes(p, cs, p.prim("Conv2dGradW"), tiles, shape_classes(n1 - n0, r1 - r0, o1 - o0, c1 - c0), conns,
                 {"kh": KH, "kw": KW, "s": stride, "wp": Wp, "ow": OW})
    out = _result(p, n, cs, acc, nparts > 1, label, shape)
    return g.View(out.tensor, out.index.reshape(shape), out.span)


def _partition_pool_grad(p, n: Node, x: g.View | None, gv: g.View, k: int, stride: int, padding: int) -> g.View:
    """Max pooling's gradient (with x, padded with -inf) or average pooling's (without):
    tasks over images, blocks of channels and (max pooling) blocks of padded rows,
    each owning its block's padded rows."""
    label = p.name(n)
    N, C, H, W = n.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    if x is not None:
        if padding:
            x = padded(p, x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), -np.inf, "f32", label + ".pad")
        else:
            p.ensure_mapped(x)
    p.ensure_mapped(gv)
    OH, OW = gv.index.shape[2:]

    def g_rows(rb: int) -> int:                  # output rows whose windows reach rb padded rows
        return _rows_reaching(rb, k, stride, OH)

    def x_rows(rb: int) -> int:                  # the padded rows those windows read
        return min(Hp, (g_rows(rb) - 1) * stride + k)

    # Max pooling splits padded rows too (each block gathers the windows that reach
    # it): one task per channel put ResNet-50's stem gradient on 64 tiles, 104 KB
    # of padded rows each.  Average pooling (ResNet's global pool) keeps whole images.
    if x is not None:
        # Its vertices compare element by element on one worker each: weighed as
        # multiply-accumulates at the AMP's rate, a window looked cheap and the plan
        # left five of six workers idle on 960 tiles (276K cycles, ResNet-50's
        # longest compute set at batch 1).  `split_plan` charges macs /
        # macs_per_cycle per vertex, shared by the tile's workers (a vertex of C
        # cycles alone takes workers x C, ir.cost).
        per_element = _POOL_GRAD_CYCLES * p.g.target.workers * p.g.target.macs_per_cycle
        gr, gc = split_plan(p, N, (Hp, C),
                             lambda rb, cb: ((cb * x_rows(rb) * Wp + cb * g_rows(rb) * OW) * 4,
                                             cb * x_rows(rb) * Wp * 4, cb * rb * Wp * 4),
                             lambda rb, cb: cb * g_rows(rb) * OW * k * k * per_element).splits
    else:
        gr, (gc,) = 1, split_plan(p, N, (C,), lambda cb: (cb * OH * OW * 4, cb * Hp * Wp * 4, cb * Hp * Wp * 4),
                                    lambda cb: cb * OH * OW * k * k).splits
    out = p.new_tensor(label, "f32", (N, C, Hp, Wp))
    cbs, rbs = blocks(C, gc), blocks(Hp, gr)
    # The tasks: images, channel blocks, row blocks (the last innermost), all at
    # once; each element of the result is one task's (out is new and whole).
    ncb, nrb = len(cbs), len(rbs)
    tiles = p.spread(N * ncb * nrb)
    nn, ci, ri = task_grid(N, ncb, nrb)
    (cb0, cb1), (rb0, rb1) = bounds(cbs), bounds(rbs)
    c0, c1 = cb0[ci], cb1[ci]
    y0, y1 = rb0[ri], rb1[ri]
    first, last = _reaching(y0, y1, k, stride, OH)        # a row block's output rows
    task = (np.arange(N)[:, None, None] * ncb + block_of(cbs)[:, None]) * nrb + block_of(rbs)
    map_whole(p, out.tensor, task.shape + (Wp,), tiles[task][..., None])

    def conns(v):
        """Tasks v (one class): g, x and dx [image, channels, (rows)]: whole padded
        images where rows are not split (x's windows then start at its first row)."""
        key, cb = (nn[v], (c0[v], c1[v])), int(c1[v[0]] - c0[v[0]])
        g_key, x_key, dx_key = key, key, key
        if nrb > 1:
            g_key = key + ((first[v], last[v]),)
            x_key = key + ((first[v] * stride, (last[v] - 1) * stride + k),)
            dx_key = key + ((y0[v], y1[v]),)
        c = {"g": (gv.tensor, stacked(gv.index, g_key, (cb, -1)))}
        if x is not None:
            c["x"] = (x.tensor, stacked(x.index, x_key, (cb, -1)))
        c["dx"] = (out.tensor, stacked(out.index, dx_key, (cb, -1)))
        return c
    cs = p.new_cs(label)
    state = {"k": k, "s": stride, "wp": Wp, "ow": OW}
    if x is None:
        emit_classes(p, cs, p.prim("AvgPoolGradBlock"), tiles, shape_classes(c1 - c0), conns, state)
    else:
        emit_classes(p, cs, p.prim("MaxPoolGradRows"), tiles, shape_classes(c1 - c0, y1 - y0, last - first), conns,
                     {**state, "off": y0 - first * stride})
    p.record(n, cs)
    return _crop(p, out, n.shape, padding)


def partition_max_pool_grad(p, n: Node) -> g.View:
    k, stride, padding = n.attrs
    return _partition_pool_grad(p, n, p.value(n.args[0]), p.value(n.args[1]), k, stride, padding)


def partition_avg_pool_grad(p, n: Node) -> g.View:
    k, stride, padding = n.attrs[:3]
    return _partition_pool_grad(p, n, None, p.value(n.args[0]), k, stride, padding)


# ---------------------------------------------------------------- the table's entries

def op_defs() -> list[OpDef]:
    return [
        OpDef("conv2d_grad_x", "compute", "the gradient of conv2d with respect to its input",
              ref=_conv_grad_x_ref, partition=partition_conv_grad_x,
              codelets=("Conv2dGradX", "Conv2dGradXRows", "ReduceSumCols", "ReduceSumCols2"), cost=split_plan,
              flops=lambda n: 2 * n.args[0].numel * int(np.prod(n.args[1].shape[1:])), value=HIGH_VALUE),
        OpDef("conv2d_grad_w", "compute", "the gradient of conv2d with respect to its weights",
              ref=_conv_grad_w_ref, partition=partition_conv_grad_w,
              codelets=("Conv2dGradW", "ReduceSumCols", "ReduceSumCols2", "Fill"), cost=split_plan,
              flops=lambda n: 2 * n.args[1].numel * int(np.prod(n.shape[1:])), value=HIGH_VALUE),
        OpDef("max_pool_grad", "compute", "max pooling's gradient: to the first maximum of each window",
              ref=_max_pool_grad_ref, partition=partition_max_pool_grad,
              codelets=("MaxPoolGradRows", "Fill"), cost=split_plan,
              flops=lambda n: n.args[1].numel * n.attrs[0] ** 2),
        OpDef("avg_pool_grad", "compute", "average pooling's gradient: spread evenly over each window",
              ref=_avg_pool_grad_ref, partition=partition_avg_pool_grad,
              codelets=("AvgPoolGradBlock",), cost=split_plan,
              flops=lambda n: n.args[0].numel * n.attrs[0] ** 2),
    ]


def functions() -> list:
    return []          # built by gradient rules, never called by users
