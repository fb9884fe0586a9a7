"""Lowering: tensor graph → vertex graph with memory regions and exchange.

Requires an elaborated `TensorGraph`; produces a `Lowered` graph: every tensor split
into one region per tile it is mapped to, every vertex a row of its codelet's table
whose field addresses are (region, byte offset) pairs, and the element copies the
compute sets and programs need.  A field whose data is on the vertex's own tile and
laid out as the field expects (contiguous, or rows with one stride) connects in
place; anything else — data on another tile, or scattered — gets a buffer on the
vertex's tile with exchange in before the compute phase and out after it.

Regions are sized here; `memplan` gives them offsets.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir import executable as X
from popdsl.ir.lowered import CopyElems, Lowered, LoweredCS, LoweredGroup


def _tensor_regions(low: Lowered, t: g.Tensor, tile_of: np.ndarray) -> None:
    es = t.elem_bytes
    tiles_used, counts = np.unique(tile_of, return_counts=True)
    first = len(low.region_tile)
    for tile, n in zip(tiles_used.tolist(), counts.tolist()):
        low.new_region(tile, n * es, -1, t.name, t.span, t.id)
    low.elem_region[t.id] = (first + np.searchsorted(tiles_used, tile_of)).astype(np.int32)
    order = np.argsort(tile_of, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    local = np.empty(t.numel, np.int64)
    group_of_sorted = np.repeat(np.arange(len(counts)), counts)
    local[order] = np.arange(t.numel) - starts[group_of_sorted]
    low.elem_off[t.id] = local * es


def _affine(offs: np.ndarray, es: int):
    """Row stride (in elements) if `offs` (rank 1 or 2) is laid out row-major with
    unit column stride, else None."""
    if offs.ndim == 1:
        ok = offs.size <= 1 or np.array_equal(offs, offs[0] + es * np.arange(offs.size))
        return offs.shape[0] if ok else None
    rows, cols = offs.shape
    stride_b = int(offs[1, 0] - offs[0, 0]) if rows > 1 else cols * es
    if stride_b < 0 or stride_b % es:
        return None
    expect = offs[0, 0] + stride_b * np.arange(rows)[:, None] + es * np.arange(cols)[None, :]
    return stride_b // es if np.array_equal(offs, expect) else None


def lower(graph: g.TensorGraph) -> Lowered:
    d = Diagnostics()
    low = Lowered(graph)
    reported: set[int] = set()
    for t in graph.tensors:
        tile_of = graph.tile_of[t.id]
        if (tile_of < 0).any():
            continue                         # reported below, where it is used
        _tensor_regions(low, t, tile_of)
    # Vertices connect only to tensor regions, all made by now.
    low.tensor_region_tile = np.asarray(low.region_tile, np.int64)
    cs_index = {name: i for i, name in enumerate(graph.compute_sets)}
    for i, cs in enumerate(graph.compute_sets.values()):
        low.compute_sets.append(_lower_cs(low, graph, cs, i, d, reported))
    for t in graph.tensors:
        if t.id not in low.elem_region and t.id not in reported:
            n = int((graph.tile_of[t.id] < 0).sum())
            d.error(t.span, f"tensor '{t.name}' has {n} of {t.numel} elements not mapped to any tile",
                    f"add 'map {t.name} -> linear;' or map its slices to tiles")
    d.check()
    low.program = _lower_prog(low, graph, graph.program, cs_index)
    for name, v in graph.outputs:
        low.outputs[name] = _read(low, graph, name, v)
    return low


def _read(low: Lowered, graph: g.TensorGraph, label: str, v: g.View) -> int:
    low.reads.append((label, graph.tensors[v.tensor].dtype, v.tensor, v.index))
    return len(low.reads) - 1


def _lower_prog(low, graph, p, cs_index) -> X.PSeq:
    out = []
    for n in p.body:
        if isinstance(n, g.Execute):
            out.append(X.PExecute(cs_index[n.cs]))
        elif isinstance(n, g.Copy):
            es = graph.tensors[n.src.tensor].elem_bytes
            c = CopyElems()
            si, di = n.src.index.ravel(), n.dst.index.ravel()
            c.add(es, low.elem_region[n.src.tensor][si], low.elem_off[n.src.tensor][si],
                  low.elem_region[n.dst.tensor][di], low.elem_off[n.dst.tensor][di])
            low.copies.append(c)
            out.append(X.PCopy(len(low.copies) - 1))
        elif isinstance(n, g.Repeat):
            out.append(X.PRepeat(n.count, _lower_prog(low, graph, n.body, cs_index)))
        elif isinstance(n, g.While):
            out.append(X.PWhile(_read(low, graph, "cond", n.cond), _lower_prog(low, graph, n.body, cs_index)))
        elif isinstance(n, g.If):
            out.append(X.PIf(_read(low, graph, "cond", n.cond), _lower_prog(low, graph, n.then, cs_index),
                             _lower_prog(low, graph, n.orelse, cs_index)))
        elif isinstance(n, g.Print):
            out.append(X.PPrint(_read(low, graph, n.label, n.view)))
        elif isinstance(n, g.Seq):
            out.extend(_lower_prog(low, graph, n, cs_index).body)
        else:
            raise AssertionError(f"unhandled program node {n!r}")
    return X.PSeq(tuple(out))


def _lower_cs(low: Lowered, graph: g.TensorGraph, cs: g.ComputeSet, csi: int,
              d: Diagnostics, reported: set[int]) -> LoweredCS:
    pre, post = CopyElems(), CopyElems()
    groups = []
    written: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (tensor, element, span id)
    for grp in cs.groups:
        cname = grp.codelet
        c = graph.codelets[cname]
        layout = cir.table_layout(c)
        nv = len(grp)
        order = np.argsort(np.asarray(grp.tiles, np.int32), kind="stable")
        table = np.zeros((nv, len(layout)), np.int64)
        region = np.full((nv, len(layout)), -1, np.int32)
        tiles = np.asarray(grp.tiles, np.int32)[order]
        span_ids = np.asarray(grp.span_ids, np.int32)[order]
        col = {(k.kind, k.name): j for j, k in enumerate(layout)}
        for f in c.fields:
            if f.direction == "state":
                vals = np.asarray(grp.state[f.name])[order]
                if f.dtype in ("f32", "f16"):
                    vals = vals.astype(np.float32).view(np.int32)
                table[:, col[("state", f.name)]] = vals.astype(np.int64)
                continue
            views = grp.connections[f.name]
            if isinstance(views, g.Stacked):
                if _connect_stacked(low, graph, c, f, views, order, tiles, csi, col, table, region,
                                    pre, post, d, reported) and f.direction in ("out", "inout"):
                    idx = views.index.reshape(nv, -1)
                    written.append((np.full(idx.size, views.tensor, np.int64), idx.ravel(),
                                    np.repeat(np.asarray(grp.span_ids, np.int64), idx.shape[1])))
                continue
            for row, vi in enumerate(order.tolist()):
                v = views[vi]
                tile = int(tiles[row])
                ok = _connect(low, graph, c, f, v, tile, csi, row, col, table, region, pre, post,
                              d, reported)
                if ok and f.direction in ("out", "inout"):
                    written.append((np.full(v.index.size, v.tensor, np.int64), v.index.ravel(),
                                    np.full(v.index.size, grp.span_ids[vi], np.int64)))
        for s in c.symbols:
            table[:, col[("sym", s)]] = np.asarray(grp.syms[s], np.int64)[order]
        groups.append(LoweredGroup(cname, table, region, tiles, span_ids))
    _check_write_conflicts(graph, cs, written, d)
    return LoweredCS(cs.name, cs.span, groups, pre, post)


def _connect(low, graph, c, f, v: g.View, tile, csi, row, col, table, region, pre, post,
             d: Diagnostics, reported) -> bool:
    t = graph.tensors[v.tensor]
    es = t.elem_bytes
    if t.id not in low.elem_region:
        idx = v.index.ravel()
        if (graph.tile_of[t.id][idx] < 0).any():
            d.error(v.span, f"field '{f.name}' of {c.name} is connected to elements of '{t.name}' "
                    "that are not mapped to any tile", f"map '{t.name}' with 'map {t.name} -> ...;'")
            reported.add(t.id)
        return False      # the tensor's other unmapped elements are reported by `lower`
    regs = low.elem_region[t.id][v.index]
    offs = low.elem_off[t.id][v.index]
    ac = col[("addr", f.name)]
    r0 = int(regs.ravel()[0])
    local = low.region_tile[r0] == tile and bool((regs == r0).all())
    stride = None
    if local:
        stride = 1 if f.rank == 0 else _affine(offs, es)
    if stride is not None:
        table[row, ac] = int(offs.ravel()[0])
        region[row, ac] = r0
        if f.rank == 2:
            table[row, col[("stride", f.name)]] = stride
        return True
    # A buffer on the vertex's tile, filled by exchange before compute and drained after.
    n = v.index.size
    buf = low.new_region(tile, n * es, csi, f"{c.name}.{f.name} buffer", v.span)
    table[row, ac] = 0
    region[row, ac] = buf
    if f.rank == 2:
        table[row, col[("stride", f.name)]] = v.index.shape[1]
    boffs = np.arange(n, dtype=np.int64) * es
    bregs = np.full(n, buf, np.int32)
    if f.direction in ("in", "inout"):
        pre.add(es, regs, offs, bregs, boffs)
    if f.direction in ("out", "inout"):
        post.add(es, bregs, boffs, regs, offs)
    return True


def _connect_stacked(low, graph, c, f, st: g.Stacked, order, tiles, csi, col, table, region,
                     pre, post, d: Diagnostics, reported) -> bool:
    """`_connect` for a whole group at once: rows whose data is local and laid out
    as the field needs connect in place, the others get buffers — all in numpy."""
    t = graph.tensors[st.tensor]
    es = t.elem_bytes
    nv = len(order)
    idx = st.index[order].reshape(nv, -1)
    if t.id not in low.elem_region:
        if (graph.tile_of[t.id][idx] < 0).any():
            d.error(st.span, f"field '{f.name}' of {c.name} is connected to elements of '{t.name}' "
                    "that are not mapped to any tile")
            reported.add(t.id)
        return False
    n = idx.shape[1]
    R = low.elem_region[t.id][idx]
    O = low.elem_off[t.id][idx]
    ok = (R == R[:, :1]).all(1) & (low.tensor_region_tile[R[:, 0]] == tiles)
    stride = np.zeros(nv, np.int64)
    if f.rank == 1:
        ok &= (O == O[:, :1] + es * np.arange(n)).all(1)
    elif f.rank == 2:
        rows, cols = st.index.shape[1], st.index.shape[2]
        stride_b = (O[:, cols] - O[:, 0]) if rows > 1 else np.full(nv, cols * es)
        expect = (O[:, :1] + (stride_b[:, None] * np.repeat(np.arange(rows), cols)[None, :])
                  + es * np.tile(np.arange(cols), rows)[None, :])
        ok &= (O == expect).all(1) & (stride_b >= 0) & (stride_b % es == 0)
        stride = np.where(ok, stride_b // es, cols)
    ac = col[("addr", f.name)]
    table[ok, ac] = O[ok, 0]
    region[ok, ac] = R[ok, 0]
    if f.rank == 2:
        table[:, col[("stride", f.name)]] = stride
    bad = np.nonzero(~ok)[0]
    if bad.size:
        own, share = _shared_buffers(f, tiles[bad], R[bad], O[bad])
        mine = bad[own]                  # rows that get a buffer of their own
        first = len(low.region_tile)
        low.region_tile.extend(tiles[mine].tolist())
        low.region_size.extend([n * es] * mine.size)
        low.region_cs.extend([csi] * mine.size)
        low.region_tensor.extend([-1] * mine.size)
        low.region_label.extend([(f"{c.name}.{f.name} buffer", st.span)] * mine.size)
        bufs = np.arange(first, first + mine.size, dtype=np.int32)
        table[bad, ac] = 0
        region[bad, ac] = bufs[share]
        bregs = np.repeat(bufs, n)
        boffs = np.tile(np.arange(n, dtype=np.int64) * es, mine.size)
        if f.direction in ("in", "inout"):
            pre.add(es, R[mine], O[mine], bregs, boffs)
        if f.direction in ("out", "inout"):
            post.add(es, bregs, boffs, R[mine], O[mine])
    return True


def _shared_buffers(f, tiles: np.ndarray, R: np.ndarray, O: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (vertices needing a buffer for field `f`) → (rows that own a buffer,
    per row the index of the buffer it uses among those).  Vertices of one tile that
    read the same elements in the same layout share one buffer, so the exchange
    brings those bytes to the tile once (a matmul's workers share their b block).
    Buffers that are written are never shared."""
    rows = np.arange(len(tiles))
    if f.direction != "in" or len(tiles) < 2 or np.unique(tiles).size == len(tiles):
        return rows, rows
    key = np.ascontiguousarray(np.concatenate([tiles[:, None].astype(np.int64), R.astype(np.int64), O], axis=1))
    _, own, share = np.unique(key.view(np.dtype((np.void, key.itemsize * key.shape[1]))).ravel(),
                              return_index=True, return_inverse=True)
    # Buffers in row order (rows are sorted by tile), each row pointing at its own.
    order = np.argsort(own, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return own[order], rank[share.ravel()]


def _check_write_conflicts(graph, cs, written, d: Diagnostics) -> None:
    if len(written) < 2:
        return
    tens = np.concatenate([w[0] for w in written])
    elem = np.concatenate([w[1] for w in written])
    spans = np.concatenate([w[2] for w in written])
    key = tens * (1 << 33) + elem
    order = np.argsort(key, kind="stable")
    k = key[order]
    dup = np.nonzero(k[1:] == k[:-1])[0]
    if dup.size:
        j = int(dup[0])
        a, b = int(spans[order[j]]), int(spans[order[j + 1]])
        t = graph.tensors[int(tens[order[j]])]
        d.error(graph.spans[b], f"two vertices of compute set '{cs.name}' write element "
                f"{int(elem[order[j]])} of '{t.name}'",
                f"the other vertex is at {graph.spans[a]}",
                "vertices of one compute set run in parallel; give each its own output")
