"""Lowering: tensor graph → vertex graph with memory regions and exchange.

Requires a partitioned `TensorGraph` (every tensor a vertex or copy touches mapped);
produces a `Lowered` graph: every tensor laid out in one region per tile it is
mapped to (its elements there in flat order), every vertex a row of its codelet's
table whose field addresses are (region, byte offset) pairs, and the copies the
compute sets and programs need, as runs of bytes.  A field whose data is on the
vertex's own tile and laid out as the field expects (contiguous, or rows with one
stride) connects in place; anything else — data on another tile, or scattered —
gets a buffer on the vertex's tile, with exchange in before the compute phase and
out after it.  Vertices of one tile reading the same elements in the same order
share one buffer, so the exchange brings those bytes to the tile once (a matmul's
workers share their block of b; `passes.shared_buffers`).

Everything runs on runs of elements: a field is the runs of tensor elements it
connects to, cut where the tensor changes region; a slab of a convolution is a few
runs per vertex, not an array per element.

Regions are sized here; `memplan` gives them offsets.

`only` (a bool per tile) lowers the vertices of those tiles alone, and of the
program's copies the runs from or to them, with every tensor's regions: enough for
their tiles' lower bounds (every region on them, each touched at most as often as
in the whole graph), a fraction of the time.
Recomputation `auto` tries a level this way first where it expects the level not
to fit (recompute_auto.fit); nothing is ever placed or run from such a lowering.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.ir import codelet as cir
from popdsl.ir import executable as X
from popdsl.ir import graph as g
from popdsl.ir.index import Batch, RunBatch, Strided, take_rows, unique
from popdsl.ir.lowered import CopyElems, Lowered, LoweredCS, LoweredGroup, TensorLayout
from popdsl.ir.mapping import Mapping
from popdsl.passes.shared_buffers import Registry, RunKeys, shared_buffers


# ---------------------------------------------------------------- runs of a connection

def view_runs(index) -> tuple[np.ndarray, np.ndarray]:
    """A view's elements in order as runs: (first element, length) per run."""
    if isinstance(index, Strided):
        starts, n = index.runs()
        return starts, np.full(starts.size, n, np.int64)
    flat = np.asarray(index, np.int64).reshape(-1)
    if not flat.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    brk = np.concatenate(([0], np.nonzero(np.diff(flat) != 1)[0] + 1))
    return flat[brk], np.diff(np.append(brk, flat.size))


def stacked_runs(conn, nv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group's connection of one field as runs per vertex: (ptr (nv+1), run
    starts, run lengths), vertex v's runs at ptr[v]:ptr[v+1]."""
    if isinstance(conn, RunBatch):
        return conn.ptr, conn.starts, conn.lengths
    if isinstance(conn, Batch):
        starts, n = Strided(0, conn.field_shape, conn.strides).runs()
        per = starts.size
        allstarts = (conn.offsets[:, None] + starts[None, :]).reshape(-1)
        return np.arange(nv + 1, dtype=np.int64) * per, allstarts, np.full(allstarts.size, n, np.int64)
    idx = np.asarray(conn, np.int64).reshape(nv, -1)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    brk = np.ones(flat.size, bool)
    brk[1:] = np.diff(flat) != 1
    brk[::k] = True                         # a vertex's first element starts a run
    first = np.nonzero(brk)[0]
    counts = np.add.reduceat(brk.astype(np.int64), np.arange(0, flat.size, k)) if nv else np.zeros(0, np.int64)
    ptr = np.concatenate(([0], np.cumsum(counts)))
    return ptr, flat[first], np.diff(np.append(first, flat.size))


def list_runs(views) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`stacked_runs` for one View per vertex (graphs placed by hand): all views'
    elements end to end, a run broken where elements stop being consecutive and
    where a vertex's view starts."""
    if not views:
        return np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    flats = [v.index.reshape(-1) for v in views]
    sizes = np.fromiter(map(len, flats), np.int64, len(flats))
    flat = np.concatenate(flats).astype(np.int64, copy=False)
    starts = np.cumsum(sizes) - sizes
    brk = np.ones(flat.size, bool)
    brk[1:] = np.diff(flat) != 1
    brk[starts[sizes > 0]] = True
    first = np.nonzero(brk)[0]
    ptr = np.append(np.searchsorted(first, starts), first.size)
    return ptr, flat[first], np.diff(np.append(first, flat.size))


# ---------------------------------------------------------------- the pass

def lower(graph: g.TensorGraph, only: np.ndarray | None = None) -> Lowered:
    d = Diagnostics()
    low = Lowered(graph, only=only)
    reported: set[int] = set()
    mappings = {t.id: _mapping(graph, t) for t in graph.tensors}
    for t in graph.tensors:
        m = mappings[t.id]
        if not m.fully_mapped():
            continue                         # reported below, where it is used
        lay = m.layout()
        first = low.add_regions(lay.tiles, lay.counts * t.elem_bytes, -1, t.id, (t.name, t.span))
        low.layouts[t.id] = TensorLayout(lay, first, t.elem_bytes)
    # Vertices connect only to tensor regions, all made by now.
    low.freeze()
    low.tensor_region_tile = low.region_tile
    low.mappings = mappings
    cs_index = {name: i for i, name in enumerate(graph.compute_sets)}
    for i, cs in enumerate(graph.compute_sets.values()):
        low.compute_sets.append(_lower_cs(low, graph, cs, i, d, reported, only))
    for t in graph.tensors:
        if t.id not in low.layouts and t.id not in reported:
            n = mappings[t.id].unmapped_count()
            d.error(t.span, f"tensor '{t.name}' has {n} of {t.numel} elements not mapped to any tile",
                    f"add 'map {t.name} -> linear;' or map its slices to tiles")
    d.check()
    low.program = _lower_prog(low, graph, graph.program, cs_index)
    for name, v in graph.outputs:
        low.outputs[name] = _read(low, graph, name, v)
    low.freeze()
    return low


def _mapping(graph: g.TensorGraph, t: g.Tensor) -> Mapping:
    return graph.mappings[t.id]


def _read(low: Lowered, graph: g.TensorGraph, label: str, v: g.View) -> int:
    low.reads.append((label, graph.tensors[v.tensor].dtype, v.tensor, v.index))
    return len(low.reads) - 1


def _lower_prog(low, graph, p, cs_index) -> X.PSeq:
    out = []
    for n in p.body:
        if isinstance(n, g.Execute):
            out.append(X.PExecute(cs_index[n.cs]))
        elif isinstance(n, g.Copy):
            low.copies.append(_copy(low, graph, n.src, n.dst))
            out.append(X.PCopy(len(low.copies) - 1))
        elif isinstance(n, g.Repeat):
            out.append(X.PRepeat(n.count, _lower_prog(low, graph, n.body, cs_index)))
        elif isinstance(n, g.While):
            out.append(X.PWhile(_read(low, graph, graph.tensors[n.cond.tensor].name, n.cond), _lower_prog(low, graph, n.body, cs_index)))
        elif isinstance(n, g.If):
            out.append(X.PIf(_read(low, graph, graph.tensors[n.cond.tensor].name, n.cond), _lower_prog(low, graph, n.then, cs_index),
                             _lower_prog(low, graph, n.orelse, cs_index)))
        elif isinstance(n, g.Print):
            out.append(X.PPrint(_read(low, graph, n.label, n.view)))
        elif isinstance(n, g.Seq):
            out.extend(_lower_prog(low, graph, n, cs_index).body)
        else:
            raise AssertionError(f"unhandled program node {n!r}")
    return X.PSeq(tuple(out))


def _positioned(lay: TensorLayout, starts, lengths):
    """Pieces of runs (in order) with their position along the runs: (region,
    byte offset, length, position of the piece's first element)."""
    r, off, n, src, pos = lay.pieces(starts, lengths)
    run_pos = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else np.zeros(0, np.int64)
    return r, off, n, run_pos[src] + pos


def _copy(low: Lowered, graph: g.TensorGraph, src: g.View, dst: g.View) -> CopyElems:
    """A program's copy of one view into another, element by element in order, as
    byte runs: both views' runs cut where either changes region or run."""
    es = graph.tensors[src.tensor].elem_bytes
    sr, so, sn, sp = _positioned(low.layouts[src.tensor], *view_runs(src.index))
    dr, do, dn, dp = _positioned(low.layouts[dst.tensor], *view_runs(dst.index))
    cuts = unique(np.concatenate((sp, dp)))
    total = int(sn.sum())
    seg_len = np.diff(np.append(cuts, total))
    i = np.searchsorted(sp, cuts, side="right") - 1
    j = np.searchsorted(dp, cuts, side="right") - 1
    if low.only is not None and not _in_function(graph, src.tensor) and not _in_function(graph, dst.tensor):
        # Lowered for some tiles alone (a sample measured by its lower bounds): a run
        # neither from nor to one of them touches none of their regions.  (Not a
        # function's: liveness counts its regions' touches call by call, and a
        # call's arguments lie elsewhere than another's.)
        near = low.only[low.tensor_region_tile[sr[i]]] | low.only[low.tensor_region_tile[dr[j]]]
        i, j, cuts, seg_len = i[near], j[near], cuts[near], seg_len[near]
    c = CopyElems()
    c.add_runs(sr[i], so[i] + (cuts - sp[i]) * es, dr[j], do[j] + (cuts - dp[j]) * es, seg_len * es)
    return c


def _in_function(graph: g.TensorGraph, tensor: int) -> bool:
    return any(f["tensors"][0] <= tensor < f["tensors"][1] for f in graph.function_summary)


def _lower_cs(low: Lowered, graph: g.TensorGraph, cs: g.ComputeSet, csi: int,
              d: Diagnostics, reported: set[int], only: np.ndarray | None = None) -> LoweredCS:
    pre, post = CopyElems(), CopyElems()
    groups = []
    written: list[tuple[np.ndarray, ...]] = []         # (tensor, start, end, span id) per run
    shared: dict[int, Registry] = {}                   # tensor -> buffers read from it
    for grp in cs.groups:
        cname = grp.codelet
        c = graph.codelets[cname]
        layout = cir.table_layout(c)
        all_tiles = np.asarray(grp.tiles, np.int32)
        if only is None:
            order = np.argsort(all_tiles, kind="stable")
        else:
            sel = np.flatnonzero(only[all_tiles])
            if not sel.size:
                continue
            order = sel[np.argsort(all_tiles[sel], kind="stable")]
        nv = len(order)
        table = np.zeros((nv, len(layout)), np.int64)
        region = np.full((nv, len(layout)), -1, np.int32)
        tiles = all_tiles[order]
        span_ids = np.asarray(grp.span_ids, np.int32)[order]
        col = {(k.kind, k.name): j for j, k in enumerate(layout)}
        for f in c.fields:
            if f.direction == "state":
                vals = np.asarray(grp.state[f.name])[order]
                if f.dtype in ("f32", "f16"):
                    vals = vals.astype(np.float32).view(np.int32)
                table[:, col[("state", f.name)]] = vals.astype(np.int64)
                continue
            conn = grp.connections[f.name]
            if isinstance(conn, g.Stacked):
                tensor, span = conn.tensor, conn.span
                index = take_rows(conn.index, order)
                ptr, rs, rl = stacked_runs(index, nv)
                if isinstance(index, RunBatch) and index.field_shape is None:     # a size per vertex
                    rows, cols = np.ones(nv, np.int64), index.sizes
                else:
                    shape = tuple(conn.index.shape[1:])
                    rows, cols = _rows_cols(np.broadcast_to(np.asarray(shape[:f.rank] if f.rank else (), np.int64),
                                                            (nv, f.rank)), f.rank)
                spans = None
            else:
                views = [conn[i] for i in order.tolist()]
                tensor, span = views[0].tensor, views[0].span
                ptr, rs, rl = list_runs(views)
                shapes = np.array([v.index.shape if f.rank else () for v in views], np.int64).reshape(nv, f.rank)
                rows, cols = _rows_cols(shapes, f.rank)
                spans = [v.span for v in views]
            registry = shared.setdefault(tensor, Registry()) if f.direction == "in" else None
            ok = _connect(low, graph, c, f, tensor, span, spans, ptr, rs, rl, rows, cols, tiles, csi,
                          col, table, region, pre, post, d, reported, registry)
            if ok and f.direction in ("out", "inout"):
                vert = np.repeat(np.arange(nv), np.diff(ptr))
                written.append((np.full(rs.size, tensor, np.int64), rs, rs + rl, span_ids[vert].astype(np.int64)))
        for s in c.symbols:
            table[:, col[("sym", s)]] = np.asarray(grp.syms[s], np.int64)[order]
        groups.append(LoweredGroup(cname, table, region, tiles, span_ids))
    _check_write_conflicts(graph, cs, written, d)
    return LoweredCS(cs.name, cs.span, groups, pre, post)


def _rows_cols(shapes: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A field's elements as rows × columns per vertex (rank 0 and 1: one row)."""
    nv = shapes.shape[0]
    if rank == 2:
        return shapes[:, 0].astype(np.int64), shapes[:, 1].astype(np.int64)
    if rank == 1:
        return np.ones(nv, np.int64), shapes[:, 0].astype(np.int64)
    return np.ones(nv, np.int64), np.ones(nv, np.int64)


def _connect(low, graph, c, f, tensor: int, span: Span, spans, ptr, rs, rl, rows, cols, tiles, csi,
             col, table, region, pre, post, d: Diagnostics, reported, registry: "Registry | None") -> bool:
    """Connect field `f` of a group (vertices in tile order) to runs of `tensor`:
    in place where the data is on the vertex's tile and laid out as the field
    expects, through a buffer otherwise (one the compute set's `registry` of
    buffers read from `tensor` may already hold).  False when the data is not
    mapped (reported)."""
    t = graph.tensors[tensor]
    es = t.elem_bytes
    nv = len(tiles)
    lay = low.layouts.get(t.id)
    if lay is None:
        lo, n, src, _ = low.mappings[t.id].split(rs, rl)
        bad = low.mappings[t.id].tile_of(lo) < 0
        if bad.any():
            vert = int(np.searchsorted(ptr, src[np.argmax(bad)], side="right") - 1)
            d.error(spans[vert] if spans else span, f"field '{f.name}' of {c.name} is connected to elements of "
                    f"'{t.name}' that are not mapped to any tile", f"map '{t.name}' with 'map {t.name} -> ...;'")
            reported.add(t.id)
        return False        # the tensor's other unmapped elements are reported by `lower`
    r, off, ln, fp, vert = _pieces_by_vertex(lay, ptr, rs, rl)
    first = np.searchsorted(vert, np.arange(nv))
    base, reg0 = off[first], r[first]
    stride_b = cols * es
    ok = np.zeros(nv, bool)
    # Only a vertex whose data starts on its own tile may connect in place: the
    # checks look at those vertices' pieces alone (a convolution's vertices mostly
    # read other tiles' data).
    cand = low.tensor_region_tile[reg0] == tiles
    cr, coff, cln, cfp, cvert = r, off, ln, fp, vert
    if not cand.all():
        keep = cand[vert]
        cr, coff, cln, cfp, cvert = r[keep], off[keep], ln[keep], fp[keep], vert[keep]
    if cvert.size:
        v = np.flatnonzero(cand)
        at = np.searchsorted(cvert, v)
        # Row stride in bytes: from where row 1 starts (rank 2, more than one row).
        two = rows[v] > 1
        if f.rank == 2 and two.any():
            scale = int(cfp.max()) + int(cols.max()) + 2
            k = np.searchsorted(cvert * scale + cfp, v * scale + cols[v], side="right") - 1
            row1 = coff[k] + (cols[v] - cfp[k]) * es
            stride_b[v] = np.where(two, row1 - base[v], stride_b[v])
        cv = cols[cvert]
        row, colp = cfp // cv, cfp % cv
        good = (cr == reg0[cvert]) & (coff == base[cvert] + row * stride_b[cvert] + colp * es) \
            & ((colp + cln <= cv) | (stride_b[cvert] == cv * es))
        ok[v] = np.logical_and.reduceat(good, at) & (stride_b[v] >= 0) & (stride_b[v] % es == 0)
    ac = col[("addr", f.name)]
    table[ok, ac] = base[ok]
    region[ok, ac] = reg0[ok]
    if f.rank == 2:
        table[:, col[("stride", f.name)]] = np.where(ok, stride_b // es, cols)
    bad = np.nonzero(~ok)[0]
    if not bad.size:
        return True
    # Buffers on the vertices' tiles, filled by exchange before compute and drained after.
    n = rows * cols
    # Reads only: each needing vertex's runs hashed once, for sharing buffers within
    # the group and with the compute set's earlier groups (`RunKeys`).
    keys = RunKeys.of(tiles[bad], ptr, rs, rl, bad) if f.direction == "in" else None
    own, share = shared_buffers(keys, ptr, rs, rl, bad)
    owners = bad[own]
    # A buffer an earlier group of this compute set fills with the same runs serves
    # these vertices too (the bands of a tile's block in two shape classes).
    reuse = registry.find(keys.subset(own), ptr, rs, rl, owners) if registry is not None \
        else np.full(owners.size, -1, np.int64)
    mine = owners[reuse < 0]
    first_buf = low.add_regions(tiles[mine], n[mine] * es, csi, -1, (f"{c.name}.{f.name} buffer", span))
    bufs = reuse.copy()
    bufs[reuse < 0] = np.arange(first_buf, first_buf + mine.size)
    if registry is not None and mine.size:
        registry.add(keys.subset(own[reuse < 0]), ptr, rs, rl, mine, bufs[reuse < 0])
    bufs = bufs.astype(np.int32)
    table[bad, ac] = 0
    region[bad, ac] = bufs[share]
    # The copies of the vertices owning a new buffer: their pieces, at their positions.
    buf_of = np.full(nv, -1, np.int64)
    buf_of[mine] = bufs[reuse < 0]
    if f.direction in ("in", "inout"):
        pre.add_pieces(r, off, ln, fp, vert, buf_of, es, drain=False)
    if f.direction in ("out", "inout"):
        post.add_pieces(r, off, ln, fp, vert, buf_of, es, drain=True)
    return True


def _pieces_by_vertex(lay: TensorLayout, ptr, rs, rl):
    """Every run of every vertex cut where the tensor changes region: (region, byte
    offset, length, position in the vertex's field, vertex) per piece, in vertex
    order."""
    # Position of each run within its vertex: lengths of the vertex's runs before it.
    csum = np.concatenate(([0], np.cumsum(rl)))
    vert_of_run = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    run_pos = csum[:-1] - csum[ptr[vert_of_run]]
    r, off, n, vert, pos = lay.pieces(rs, rl, base=run_pos, tag=vert_of_run)
    return r, off, n, pos, vert


def _check_write_conflicts(graph, cs, written, d: Diagnostics) -> None:
    if not written:
        return
    tens = np.concatenate([w[0] for w in written])
    lo = np.concatenate([w[1] for w in written])
    hi = np.concatenate([w[2] for w in written])
    spans = np.concatenate([w[3] for w in written])
    order = np.lexsort((lo, tens))
    tens, lo, hi, spans = tens[order], lo[order], hi[order], spans[order]
    # A run overlaps an earlier one of its tensor if it starts before the furthest
    # end so far: compare with the running maximum within each tensor.
    run_max = _segmented_max(hi, tens)
    clash = np.nonzero((tens[1:] == tens[:-1]) & (lo[1:] < run_max[:-1]))[0]
    if clash.size:
        j = int(clash[0]) + 1
        a = int(np.nonzero((tens[:j] == tens[j]) & (hi[:j] > lo[j]))[0][0])
        t = graph.tensors[int(tens[j])]
        d.error(graph.spans[int(spans[j])], f"two vertices of compute set '{cs.name}' write element "
                f"{int(lo[j])} of '{t.name}'", f"the other vertex is at {graph.spans[int(spans[a])]}",
                "vertices of one compute set run in parallel; give each its own output")


def _segmented_max(values: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Running maximum of `values` restarting where `segment` changes."""
    out = values.copy()
    if not out.size:
        return out
    starts = np.nonzero(np.r_[True, segment[1:] != segment[:-1]])[0]
    # Offset each segment above all earlier ones so one global accumulate works.
    span = int(values.max() - values.min()) + 1
    seg_id = np.repeat(np.arange(starts.size), np.diff(np.append(starts, values.size)))
    shifted = values - values.min() + seg_id.astype(np.int64) * span
    return np.maximum.accumulate(shifted) - seg_id.astype(np.int64) * span + values.min()
