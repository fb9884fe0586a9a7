"""Element-wise fusion: a chain of element-wise operations partitioned as ONE
generated codelet and one compute set.

Requires a `passes.partition.Partitioner` (`p`: values, mapping, vertex groups, the
op records) and the operation table's `emit` rules; produces, for the node ending a
chain, its output tensor — mapped like its first full-size operand (so no exchange)
or spread evenly — and the vertices that compute it:

- single-use element-wise operands are inlined into the vertex loop, constants
  become literals, an operand an op uses twice is computed once into a local;
- the codelet is named after what it computes and a digest of its IR
  (`fused_mul_add_relu_31298822`), so equal chains share one codelet;
- a leaf that is one element for a vertex (a per-channel scale broadcast over the
  channel's pixels, where the vertex lies in one channel) is a scalar field of a
  variant of the codelet (`..._s1_2`): the exchange brings one element, not one per
  element of the vertex.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from popdsl import ops
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.index import (Batch, RunBatch, Strided, as_array, broadcast_to, first_elements, ramps,
                              strided_pieces, take_rows)
from popdsl.ir.tensor import Node


def partition_fused(p, n: Node) -> g.View:
    """A chain of element-wise operations ending at n: one generated codelet, one
    compute set, its output mapped like its first full-size operand."""
    leaves: list[Node] = []
    lets: list[cir.Declare] = []
    expr = fuse(p, n, leaves, lets, top=True)
    fields = tuple(cir.Field(f"a{i}", "in", leaf.dtype, ("n",)) for i, leaf in enumerate(leaves))
    i = cir.Local("i", "i32")
    body = (cir.For("i", cir.Const(0, "i32"), cir.Sym("n"), 1,
                    (*lets, cir.Store("y", (i,), expr, False))),)
    proto = cir.Codelet("ew", fields + (cir.Field("y", "out", n.dtype, ("n",)),), ("n",), None, body)
    digest = hashlib.sha1(repr(proto).encode()).hexdigest()[:8]
    base = cir.Codelet(f"fused_{_fused_ops(n, leaves)}_{digest}", proto.fields, proto.symbols, None, body)
    name = p.add_codelet(base)
    out = p.new_tensor(p.name(n), n.dtype, n.shape)
    views = [p.value(leaf) for leaf in leaves]
    # Aligned with the first full-size operand: each tile computes its own data.
    # One that really holds that many elements first: a broadcast scalar (the
    # gradient of a sum, times y) lives on one tile, and the output with it.
    full = [v for v in views if v.shape == n.shape]
    align = next((v for v in full if p.g.tensors[v.tensor].numel >= n.numel), full[0] if full else None)
    if align is not None:
        p.ensure_mapped(align)
        am = p.g.mappings[align.tensor]
        if n.numel and isinstance(align.index, Strided) and align.index.is_whole(am.numel) and am.numel == n.numel:
            p.g.mappings[out.tensor] = am.copy()          # run for run: no tile per element
        else:
            p.set_tiles(out.tensor, p.tiles_of(align).ravel())
    elif n.numel:
        p.g.mappings[out.tensor] = p.linear_mapping(out.index.size)
    else:
        p.set_tiles(out.tensor, p.linear(0))
    for v in views:
        if not p.g.mappings[v.tensor].fully_mapped():
            if v.shape == n.shape:
                p.map_like(g.View(v.tensor, _flat(v.index), v.span), p.g.mappings[out.tensor])
            else:
                p.ensure_mapped(g.View(v.tensor, broadcast_to(v.index, n.shape), v.span))
    cs = p.new_cs(name)
    for v, leaf in zip(views, leaves):
        t = p.g.tensors[v.tensor]
        # Same layout element by element: the output may overwrite this operand
        # where it dies (the planner decides).  Equal mappings too: an operand
        # mapped unlike the output (not the one it is aligned with) has other
        # elements at the same offsets, which the output would overwrite
        # before a vertex of the tile reads them.
        if v.shape == n.shape and t.shape == n.shape and cir.ELEM_BYTES[t.dtype] == cir.ELEM_BYTES[n.dtype] \
                and (v.index.is_whole(t.numel) if isinstance(v.index, Strided)
                     else np.array_equal(as_array(v.index).ravel(), np.arange(t.numel))) \
                and p.g.mappings[v.tensor].same(p.g.mappings[out.tensor]):
            p.g.inplace.append((out.tensor, v.tensor, cs.name))
    variants: dict[tuple, str] = {(): name}
    strided = [broadcast_to(v.index, n.shape) for v in views]
    if all(isinstance(b, Strided) for b in strided):
        # Every operand a strided view (the usual case): each vertex's elements as
        # runs, never an index per element (a batch's activations are spread over
        # a tile's several runs, one per channel block).
        m = p.g.mappings[out.tensor]
        for size, y, tiles in p.chunk_runs(m):
            operands = [_Operand(b, y) for b in strided]
            modes = _choose_modes(operands, len(y))
            for rows, kind in _kinds(modes):
                scalars = tuple(k for k, mode in enumerate(kind) if mode == ONE)
                segs = tuple(k for k, mode in enumerate(kind) if mode == SEGMENTS)
                key = (scalars, segs) if segs else scalars
                if key not in variants:
                    variants[key] = p.add_codelet(_with_segments(_with_scalar_leaves(base, scalars), segs))
                conns = {f"a{k}": (v.tensor, op.connection(kind[k], rows)) for k, (v, op) in enumerate(zip(views, operands))}
                conns["y"] = (out.tensor, y.take(rows))
                state = None
                if segs:
                    ref = operands[segs[0]]
                    state = {"seg_first": ref.seg_first[rows], "seg_len": ref.seg_len[rows]}
                p.group(cs, variants[key], tiles[rows], conns, state)
        p.record(n, cs, flops=n.numel * _count_ops(expr, lets))
        return out
    flat_leaves = [(v.tensor, _flat(broadcast_to(v.index, n.shape))) for v in views]
    dense: dict[int, np.ndarray] = {}
    for size, pos, tiles in p.chunks(p.g.mappings[out.tensor].elements()):
        # A vertex's elements are usually consecutive (an output laid out by
        # tile): then every strided operand is a Batch, O(vertices) numbers,
        # not an index per element.
        first = pos[:, 0]
        runs = np.array_equal(pos, first[:, None] + np.arange(size))
        conns = {}
        one = np.zeros((len(tiles), len(leaves)), bool)    # the vertex reads one element of the leaf
        for k, (t, b) in enumerate(flat_leaves):
            if runs and isinstance(b, Strided):
                conns[f"a{k}"] = (t, Batch(b.offset + b.strides[0] * first, (size,), (b.strides[0],)))
                one[:, k] = b.strides[0] == 0 and size > 1
            else:
                if k not in dense:
                    dense[k] = as_array(b)
                idx = dense[k][pos]
                conns[f"a{k}"] = (t, idx)
                one[:, k] = (idx == idx[:, :1]).all(axis=1) & (size > 1)
        conns["y"] = (out.tensor, Batch(first.astype(np.int64), (size,), (1,)) if runs else pos)
        _emit(p, cs, base, variants, leaves, tiles, conns, one)
    p.record(n, cs, flops=n.numel * _count_ops(expr, lets))
    return out


def _emit(p, cs, base: cir.Codelet, variants: dict, leaves, tiles, conns: dict, one: np.ndarray) -> None:
    """The vertices of one size, operands as element arrays or Batches: a leaf that
    is one element for a vertex is a scalar field of that vertex's codelet."""
    kinds, which = np.unique(one, axis=0, return_inverse=True)
    for j, kind in enumerate(kinds):
        rows = np.nonzero(which.reshape(-1) == j)[0]
        scalars = tuple(np.nonzero(kind)[0].tolist())
        if scalars not in variants:
            variants[scalars] = p.add_codelet(_with_scalar_leaves(base, scalars))
        sel = conns if len(kinds) == 1 else {f: (t, take_rows(idx, rows)) for f, (t, idx) in conns.items()}
        sel = {f: (t, first_elements(idx) if f in {f"a{k}" for k in scalars} else idx)
               for f, (t, idx) in sel.items()}
        p.group(cs, variants[scalars], tiles[rows], sel)


FULL, ONE, SEGMENTS = 0, 1, 2       # how a vertex reads an operand (`_Operand`)


class _Operand:
    """An operand (strided view `b` of the output's shape) at each vertex's output
    elements `y` (a RunBatch), read in one of three ways per vertex:

    - FULL: its elements as runs, one per output element;
    - ONE: one element for all of the vertex's (a per-channel scale, the vertex
      inside one channel): a scalar field;
    - SEGMENTS: one element per stretch of the vertex's output, the stretches
      `seg_first` long, then `seg_len` each, the last shorter (a per-channel scale,
      the vertex over several channels of equal size): a field of an element per
      stretch (`_with_segments`), instead of the element copied once per pixel.
    """

    def __init__(self, b: Strided, y: RunBatch):
        self.nv = nv = len(y)
        src, _, elem, step, ln = strided_pieces(b, y.starts, y.lengths)
        pv = np.repeat(np.arange(nv), np.diff(y.ptr))[src]
        first = np.searchsorted(pv, np.arange(nv))
        const = (step == 0) | (ln == 1)
        self.pieces = (pv, elem, step, ln, first)
        same = const & (elem == elem[first][pv])
        self.one = np.logical_and.reduceat(same, first) & (y.sizes > 1) if nv else np.zeros(0, bool)
        # Stretches: a vertex's pieces of one element each, merged while the element stays.
        new = np.ones(pv.size, bool)
        new[1:] = (pv[1:] != pv[:-1]) | (elem[1:] != elem[:-1])
        at = np.nonzero(new)[0]
        seg_v, seg_elem = pv[at], elem[at]
        seg_n = np.add.reduceat(ln, at) if at.size else ln[:0]
        nseg = np.bincount(seg_v, minlength=nv)
        s0 = np.concatenate(([0], np.cumsum(nseg)[:-1]))
        k = np.arange(seg_v.size) - s0[seg_v]
        width = np.where(nseg >= 2, seg_n[np.minimum(s0 + 1, max(seg_v.size - 1, 0))], 0) if nv else nseg
        middle = (k > 0) & (k < nseg[seg_v] - 1)
        fits = ~middle | (seg_n == width[seg_v])
        fits &= (k != nseg[seg_v] - 1) | (k == 0) | (seg_n <= width[seg_v])
        allconst = np.logical_and.reduceat(const, first) if nv else np.zeros(0, bool)
        # Worth it while the stretches are fewer than the elements.
        self.segments_ok = allconst & (nseg >= 2) & (nseg < y.sizes) \
            & (np.bincount(seg_v, weights=~fits, minlength=nv) == 0)
        self.seg_first = np.where(self.segments_ok, seg_n[np.minimum(s0, max(seg_v.size - 1, 0))], 0).astype(np.int64)
        self.seg_len = np.where(self.segments_ok, width, 0).astype(np.int64)
        self.nseg = nseg.astype(np.int64)
        self.segs = (seg_v, seg_elem)
        self.field_shape = y.field_shape

    def connection(self, mode: int, rows: np.ndarray):
        """The vertices `rows`' connection, all read in `mode`."""
        pv, elem, step, ln, first = self.pieces
        if mode == ONE:
            return elem[first[rows]].copy()
        if mode == SEGMENTS:
            seg_v, seg_elem = self.segs
            on = np.zeros(self.nv, bool)
            on[rows] = True
            keep = on[seg_v]
            return _runs(seg_v[keep], seg_elem[keep], np.ones(int(keep.sum()), np.int64), self.nv, None).take(rows)
        on = np.zeros(self.nv, bool)
        on[rows] = True
        keep = on[pv]
        pv, elem, step, ln = pv[keep], elem[keep], step[keep], ln[keep]
        # Pieces of step 1 are runs as they are; others an element at a time.
        expand = np.where(step == 1, 1, ln)
        rs = np.repeat(elem, expand) + np.repeat(step, expand) * ramps(expand)
        rl = np.where(np.repeat(step == 1, expand), np.repeat(ln, expand), 1)
        return _runs(np.repeat(pv, expand), rs, rl, self.nv, self.field_shape).take(rows)


def _runs(rv, rs, rl, nv: int, field_shape) -> RunBatch:
    """A RunBatch of runs (vertex, start, length) in vertex order, runs that
    continue each other merged."""
    brk = np.ones(rs.size, bool)
    brk[1:] = (rv[1:] != rv[:-1]) | (rs[1:] != rs[:-1] + rl[:-1])
    at = np.nonzero(brk)[0]
    ptr = np.concatenate(([0], np.cumsum(np.bincount(rv[at], minlength=nv)))).astype(np.int64)
    return RunBatch(ptr, rs[at], np.add.reduceat(rl, at) if at.size else rl[:0], field_shape)


def _choose_modes(operands: list[_Operand], nv: int) -> np.ndarray:
    """(nv, operands) modes: ONE where a vertex reads one element, SEGMENTS where
    its stretches fit and agree with those of the first operand read so (a vertex
    has one stretch pattern), FULL otherwise."""
    modes = np.full((nv, len(operands)), FULL, np.int8)
    ref = np.full((nv, 3), -1, np.int64)
    for k, op in enumerate(operands):
        modes[op.one, k] = ONE
        pattern = np.stack([op.seg_first, op.seg_len, op.nseg], axis=1)
        free = op.segments_ok & ~op.one & (ref[:, 0] < 0)
        ref[free] = pattern[free]
        agree = op.segments_ok & ~op.one & (ref == pattern).all(axis=1)
        modes[agree, k] = SEGMENTS
    return modes


def _kinds(modes: np.ndarray):
    """(rows, modes) per distinct row of `modes`, rows in lexicographic order (as
    np.unique(axis=0) would give them, without its sort of whole rows)."""
    nv, n = modes.shape
    if n > 39:                                        # 3**40 passes int64
        kinds, which = np.unique(modes, axis=0, return_inverse=True)
        which = which.reshape(-1)
    else:
        key = modes.astype(np.int64) @ (3 ** np.arange(n - 1, -1, -1, dtype=np.int64))
        keys, which = np.unique(key, return_inverse=True)
        kinds = (keys[:, None] // 3 ** np.arange(n - 1, -1, -1, dtype=np.int64)) % 3
    for j, kind in enumerate(kinds):
        yield np.nonzero(which == j)[0], tuple(int(x) for x in kind)


def _with_segments(c: cir.Codelet, segs: tuple[int, ...]) -> cir.Codelet:
    """A fused codelet whose leaves `segs` hold one element per stretch of the
    output: `seg_first` elements, then `seg_len` each, the last stretch what is
    left.  The element loop runs once per stretch with the stretch's elements in
    locals; its indices are checked (the stretches are vertex state)."""
    if not segs:
        return c
    names = {f"a{k}" for k in segs}
    (loop,) = c.body
    i32 = "i32"
    at, s, ln = cir.Local("at", i32), cir.Local("s", i32), cir.Local("len", i32)
    tys: dict[str, str] = {}

    def leaf(x):
        if isinstance(x, cir.Load):
            if x.field in names:
                tys[x.field] = x.ty
                return cir.Local(f"c_{x.field}", x.ty)
            return dataclasses.replace(x, index=_rewrite(x.index, leaf), checked=True)
        if isinstance(x, cir.Store):
            return dataclasses.replace(x, value=_rewrite(x.value, leaf), checked=True)
        return None
    inner = _rewrite(loop.body, leaf)
    left, want = cir.Binary("-", cir.Sym("n"), at, i32), cir.Local("want", i32)
    body = (cir.Declare("at", i32, cir.Const(0, i32)),
            cir.For("s", cir.Const(0, i32), cir.Sym("m"), 1, (
                cir.Declare("want", i32, cir.Select(cir.Binary("==", s, cir.Const(0, i32), "bool"),
                                                    cir.Load("seg_first", (), i32, False),
                                                    cir.Load("seg_len", (), i32, False), i32)),
                cir.Declare("len", i32, cir.Select(cir.Binary("<", want, left, "bool"), want, left, i32)),
                *(cir.Declare(f"c_{f}", tys[f], cir.Load(f, (s,), tys[f], True)) for f in sorted(names) if f in tys),
                cir.For("i", at, cir.Binary("+", at, ln, i32), 1, inner),
                cir.Assign("at", cir.Binary("+", at, ln, i32)))))
    fields = tuple(dataclasses.replace(f, dims=("m",)) if f.name in names else f for f in c.fields) \
        + (cir.Field("seg_first", "state", i32, ()), cir.Field("seg_len", "state", i32, ()))
    return cir.Codelet(f"{c.name}_g{'_'.join(str(k) for k in segs)}", fields, ("n", "m"), c.ret, body)


def fuse(p, n: Node, leaves: list, lets: list, top: bool = False) -> cir.Expr:
    """Codelet IR for n, inlining single-use element-wise operands.  An operand
    an op's `emit` uses more than once (`square`, `leaky_relu`) is computed once
    into a local (a `let` in `lets`) rather than once per use."""
    if n.op == "const":
        return cir.Const(n.attrs[0], n.dtype)
    if not top and (not ops.is_elementwise(n.op) or p.consumers.get(n.id, 0) > 1 or n.id in p.mat
                    or p.called(n)):
        if n not in leaves:
            leaves.append(n)
        k = leaves.index(n)
        return cir.Load(f"a{k}", (cir.Local("i", "i32"),), cir.compute_type(n.dtype), False)
    args = [fuse(p, a, leaves, lets) for a in n.args]
    ty = cir.compute_type(n.dtype)
    if n.op.startswith("call:"):
        return cir.CallScalar(n.op[5:], tuple(args), ty)
    emit = ops.op(n.op).emit
    expr = emit(args, ty, n.attrs)
    reused = [k for k, a in enumerate(args)
              if not isinstance(a, (cir.Load, cir.Const, cir.Local)) and _uses(expr, a) > 1]
    if not reused:
        return expr
    for k in reused:
        name = f"t{len(lets)}"
        lets.append(cir.Declare(name, args[k].ty, args[k]))
        args[k] = cir.Local(name, args[k].ty)
    return emit(args, ty, n.attrs)


def _uses(expr, sub) -> int:
    """How many times the object `sub` occurs in the codelet IR tree `expr`."""
    if expr is sub:
        return 1
    if isinstance(expr, tuple):
        return sum(_uses(x, sub) for x in expr)
    if hasattr(expr, "__dataclass_fields__"):
        return sum(_uses(getattr(expr, f), sub) for f in expr.__dataclass_fields__)
    return 0


def _count_ops(expr, lets) -> int:
    """Arithmetic operations in a fused kernel's element (loads, constants and
    locals are not operations)."""
    n = 0
    stack = [expr] + [d.init for d in lets]
    while stack:
        e = stack.pop()
        if isinstance(e, (cir.Unary, cir.Binary, cir.Select, cir.Intrinsic, cir.CallScalar)):
            n += 1
        if isinstance(e, tuple):
            stack.extend(e)
        elif hasattr(e, "__dataclass_fields__"):
            stack.extend(getattr(e, f) for f in e.__dataclass_fields__)
    return max(n, 1)


def _fused_ops(n: Node, leaves: list) -> str:
    """The operations a fused kernel computes, for its name: `mul_add_relu` (at most
    four, then `etc`)."""
    names: list[str] = []
    stop = {leaf.id for leaf in leaves}

    def visit(m: Node) -> None:
        if m.id in stop or m.op == "const":
            return
        for a in m.args:
            visit(a)
        op = m.op[5:] if m.op.startswith("call:") else m.op.removeprefix("cast_")
        if op not in names:
            names.append(op)
    visit(n)
    return "_".join(names[:4] + (["etc"] if len(names) > 4 else [])) or n.op


def _with_scalar_leaves(c: cir.Codelet, scalars: tuple[int, ...]) -> cir.Codelet:
    """A fused codelet whose leaves `scalars` (a0, a1, ...) are scalar fields: each
    read of `aK[i]` becomes a read of `aK`.  Named after the codelet and the leaves."""
    if not scalars:
        return c
    names = {f"a{k}" for k in scalars}

    def leaf(x):
        return dataclasses.replace(x, index=()) if isinstance(x, cir.Load) and x.field in names else None
    fields = tuple(dataclasses.replace(f, dims=()) if f.name in names else f for f in c.fields)
    return cir.Codelet(f"{c.name}_s{'_'.join(str(k) for k in scalars)}", fields, c.symbols, c.ret,
                       _rewrite(c.body, leaf))


def _rewrite(x, leaf):
    """Codelet IR tree `x` with `leaf(node)` in place of every node for which it is
    not None; rebuilt only where something changed."""
    new = leaf(x)
    if new is not None:
        return new
    if isinstance(x, tuple):
        return tuple(_rewrite(y, leaf) for y in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {f.name: _rewrite(getattr(x, f.name), leaf) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **changes) if any(changes[k] is not getattr(x, k) for k in changes) else x
    return x


def _flat(index):
    """A view's elements in flat order: a 1-D strided view where there is one (not
    for a broadcast), else the element array."""
    if isinstance(index, Strided):
        f = index.view_reshape((index.size,))
        if f is not None:
            return f
    return as_array(index).ravel()
