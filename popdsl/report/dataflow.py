"""The compiled graph as nodes and edges, for pictures (`report.pictures`).

Requires an `Executable` only (its vertex tables, copy tables, program tree, tensors'
addresses and ops); produces a `CompiledGraph`: nodes, and edges weighted by the
field connections they stand for.  Pure numpy, no Python loop per vertex or element.

What the nodes and edges are (Poplar counts one edge per vertex field connected to
a tensor region; popdsl's vertices connect to bytes, so the regions are found by
following the bytes):

* A node is a vertex of the executable, or, when there are too many, one node per
  (compute set, group of `group_tiles` tiles): the vertices of a compute set on
  those tiles.  Always-live tensors (parameters, variables, inputs) are data nodes,
  one per (tensor, tile group).
* An edge joins a vertex to the node that last wrote bytes its field reads: the
  vertex (or data node) whose output region its input field reaches, on its own
  tile or through the exchange.  The program is walked in order, with every byte's
  last writer kept per *cell* (the address space cut at every boundary of a write
  or a copy), so reused memory links a reader to the value it really reads.  Copies
  carry their source's writer to their destination.  Loop bodies are walked twice
  (to see values carried between iterations), both arms of an `if` once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir import executable as X
from popdsl.ir.codelet import ELEM_BYTES, lane_type, table_layout
from popdsl.ir.index import unique

ALWAYS_LIVE = ("var", "input", "param")


@dataclass(eq=False)
class CompiledGraph:
    """Nodes 0..nodes-1: first the vertex nodes, then the data nodes."""
    exe: X.Executable
    group_tiles: int               # 0: one node per vertex; g: one per (compute set, g tiles)
    node_cs: np.ndarray            # int32 compute set per vertex node, -1 for a data node
    node_tile: np.ndarray          # int32 first tile of the node
    node_tensor: np.ndarray        # int32 tensor of a data node, -1 for a vertex node
    node_vertices: np.ndarray      # int64 vertices a node stands for (0 for data nodes)
    src: np.ndarray                # int32 edge: the writer
    dst: np.ndarray                # int32 edge: the reader
    weight: np.ndarray             # int64 cells of data the edge carries
    vertices: int                  # vertices of the executable
    connections: int               # field connections (Poplar's edges): vertex fields connected to data

    @property
    def nodes(self) -> int:
        return int(self.node_cs.size)

    @property
    def is_data(self) -> np.ndarray:
        return self.node_tensor >= 0

    def describe(self) -> str:
        what = ("one node per vertex" if self.group_tiles == 0 else
                f"one node per (compute set, {self.group_tiles} tile{'s' if self.group_tiles > 1 else ''})")
        return (f"{self.vertices:,} vertices, {self.connections:,} field connections; "
                f"drawn: {self.nodes:,} nodes ({what}; always-live tensors per tile group), "
                f"{self.src.size:,} edges (reader to the writer of the bytes it reads)")


# ---------------------------------------------------------------- program order

def subgraph(g: CompiledGraph, nodes: np.ndarray) -> CompiledGraph:
    """The graph on `nodes` (renumbered in that order) and the edges between them."""
    nodes = np.asarray(nodes, np.int64)
    new = np.full(g.nodes, -1, np.int64)
    new[nodes] = np.arange(nodes.size)
    keep = (new[g.src] >= 0) & (new[g.dst] >= 0)
    verts = int(g.node_vertices[nodes].sum())
    return CompiledGraph(g.exe, g.group_tiles, g.node_cs[nodes], g.node_tile[nodes], g.node_tensor[nodes],
                         g.node_vertices[nodes], new[g.src[keep]].astype(np.int32),
                         new[g.dst[keep]].astype(np.int32), g.weight[keep], verts, int(keep.sum()))


def cs_order(exe: X.Executable) -> list[int]:
    """Compute sets in the order the program first executes them (then the rest)."""
    seen: dict[int, None] = {}

    def walk(p):
        for n in p.body:
            if isinstance(n, X.PExecute):
                seen.setdefault(n.cs, None)
            elif isinstance(n, (X.PRepeat, X.PWhile)):
                walk(n.body)
            elif isinstance(n, X.PIf):
                walk(n.then)
                walk(n.orelse)
            elif isinstance(n, X.PSeq):
                walk(n)
    walk(exe.program)
    for i in range(len(exe.compute_sets)):
        seen.setdefault(i, None)
    return list(seen)


def cs_layers(exe: X.Executable) -> tuple[np.ndarray, list[str]]:
    """Per compute set, its layer: the tensor op that made it (ops are numbered in
    program order), or the compute set itself where no op did (graphs that place
    their vertices).  Returns (layer per compute set, label per layer)."""
    layer = np.full(len(exe.compute_sets), -1, np.int64)
    labels: list[str] = []
    # A compute set the partitioner made for an op but did not list with it (a
    # convolution's padding) is named after the op's node: '%NODE.'.
    by_node = {f"%{op['node']}.": k for k, op in enumerate(exe.ops) if "node" in op}
    extra: dict[int, list[int]] = {}
    for i, cs in enumerate(exe.compute_sets):
        k = by_node.get(cs.name[:cs.name.index(".") + 1] if "." in cs.name else "")
        if k is not None and i not in exe.ops[k].get("compute_sets", []):
            extra.setdefault(k, []).append(i)
    for k, op in enumerate(exe.ops):
        todo = [c for c in sorted(op.get("compute_sets", []) + extra.get(k, [])) if layer[c] < 0]
        if todo:
            layer[todo] = len(labels)
            labels.append(f"{op['op']} {op['source']}")
    order = cs_order(exe)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    for c in np.nonzero(layer < 0)[0].tolist():
        layer[c] = len(labels)
        labels.append(exe.compute_sets[c].name)
    # Number layers by when the program first runs them.
    first = np.full(len(labels), np.iinfo(np.int64).max)
    np.minimum.at(first, layer, rank)
    ren = np.empty(len(labels), np.int64)
    ren[np.argsort(first, kind="stable")] = np.arange(len(labels))
    return ren[layer] if layer.size else layer, [labels[i] for i in np.argsort(first, kind="stable")]


# ---------------------------------------------------------------- intervals

def _expand(c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices c0[i]..c1[i]-1 for every i, and which i each belongs to."""
    n = np.maximum(c1 - c0, 0)
    total = int(n.sum())
    which = np.repeat(np.arange(n.size), n)
    starts = np.cumsum(n) - n
    return np.repeat(c0, n) + (np.arange(total) - np.repeat(starts, n)), which


def _field_runs(exe: X.Executable, cs: X.ComputeSetExec, vbase: int):
    """(reads, writes, field connections) of a compute set's vertices: reads and
    writes as (addr, end, vertex) arrays, rank-2 fields cut into their rows (a
    strided block does not own its gaps)."""
    reads, writes, connected = [], [], 0
    for grp in cs.groups:
        c = exe.codelets[grp.codelet]
        n = len(grp.tiles)
        verts = vbase + np.arange(n, dtype=np.int64)
        vbase += n
        layout = [(col.kind, col.name) for col in table_layout(c)]
        syms = {name: grp.table[:, k] for k, (kind, name) in enumerate(layout) if kind == "sym"}
        for f, addr, extent in X.field_extents(c, grp.table):
            on = extent > 0
            connected += int(np.count_nonzero(on))
            if f.rank == 2:
                es = ELEM_BYTES[f.dtype]
                stride = grp.table[:, layout.index(("stride", f.name))] * ELEM_BYTES[lane_type(f.dtype)]
                rows, cols = (np.broadcast_to(syms[d] if isinstance(d, str) else np.int64(d), (n,)) for d in f.dims)
                r, v = _expand(np.zeros(n, np.int64), np.where(on, rows, 0).astype(np.int64))
                a = addr[v] + r * stride[v]
                e, vv = a + cols[v].astype(np.int64) * es, verts[v]
            else:
                a, e, vv = addr[on], addr[on] + extent[on], verts[on]
            if f.direction in ("in", "inout"):
                reads.append((a, e, vv))
            if f.direction in ("out", "inout"):
                writes.append((a, e, vv))
    return _cat(reads), _cat(writes), connected


def _cat(parts):
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, z
    return tuple(np.concatenate([p[k] for p in parts]).astype(np.int64) for k in range(3))


def tensor_regions(exe: X.Executable):
    """(start, end, tensor, tile) of always-live tensors' bytes, one interval per
    (tensor, tile): they never share bytes with anything, so the span of their
    elements on a tile is theirs."""
    tm = exe.target.tile_memory
    out = []
    for i, t in enumerate(exe.tensors):
        if t.kind not in ALWAYS_LIVE:
            continue
        r = exe.tensor_runs[i]
        if not r.addrs.size:
            continue
        es = ELEM_BYTES[t.dtype]
        tile = r.addrs // tm
        tiles, inv = np.unique(tile, return_inverse=True)
        lo = np.full(tiles.size, np.iinfo(np.int64).max)
        hi = np.zeros(tiles.size, np.int64)
        np.minimum.at(lo, inv, r.addrs)
        np.maximum.at(hi, inv, r.addrs + r.counts * es)
        out.append((lo, hi, np.full(tiles.size, i, np.int64), tiles))
    return _cat4(out)


def _cat4(parts):
    if not parts:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


# ---------------------------------------------------------------- the graph

def vertex_count(exe: X.Executable) -> int:
    return int(sum(len(g.tiles) for cs in exe.compute_sets for g in cs.groups))


def choose_grouping(exe: X.Executable, max_nodes: int) -> int:
    """The finest grouping (0 = every vertex; else tiles per group, a power of two)
    whose vertex nodes fit in `max_nodes`."""
    if vertex_count(exe) <= max_nodes:
        return 0
    keys = unique(np.concatenate([np.int64(i) * exe.target.tiles + unique(g.tiles).astype(np.int64)
                                     for i, cs in enumerate(exe.compute_sets) for g in cs.groups]))
    cs_of, tile_of = keys // exe.target.tiles, keys % exe.target.tiles
    g = 1
    while g < exe.target.tiles:
        if unique(cs_of * exe.target.tiles + tile_of // g).size <= max_nodes:
            return g
        g *= 2
    return g


def _unique_counts(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    x = x[order]
    first = np.nonzero(np.concatenate(([True], x[1:] != x[:-1])))[0] if x.size else np.zeros(0, np.int64)
    w = np.ones(x.size, np.int64) if w is None else w[order]
    return x[first], np.add.reduceat(w, first) if x.size else np.zeros(0, np.int64)


def _counts_of_runs(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`_unique_counts` of keys that come in long runs of equal values (a cell after
    cell of the same writer): the runs are summed first, so the sort sees one key a
    run instead of one a cell."""
    if x.size:
        first = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
        w = np.add.reduceat(np.ones(x.size, np.int64) if w is None else w, first)
        x = x[first]
    return _unique_counts(x, w)


def _merge(a: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intervals [a, e) merged where they touch or overlap."""
    if not a.size:
        return a, e
    o = np.argsort(a, kind="stable")
    a, e = a[o], np.maximum.accumulate(e[o])
    new = np.concatenate(([True], a[1:] > e[:-1]))
    last = np.concatenate((np.nonzero(new)[0][1:] - 1, [a.size - 1]))
    return a[new], e[last]


def compiled_graph(exe: X.Executable, max_nodes: int = 40_000, group_tiles: int | None = None,
                   compute_sets=None, tiles: np.ndarray | None = None, regions=None) -> CompiledGraph:
    """The graph of `exe`, aggregated to at most about `max_nodes` vertex nodes
    unless `group_tiles` fixes the grouping (0: one node per vertex).  A section:
    `compute_sets` (indices) and `tiles` (a bool mask) keep only those vertices, the
    data on those tiles and the edges between them.

    One node per vertex follows every byte through the exchange buffers into the
    vertex that reads it.  Grouped, an exchange into a compute set's buffers on a
    tile is an edge from the source's writer to the group of that tile directly
    (what a buffer feeds is the group), which spares cutting memory at every run.
    `regions`: `tensor_regions(exe)`, when the caller has it already."""
    ntiles = exe.target.tiles
    tm = exe.target.tile_memory
    g = choose_grouping(exe, max_nodes) if group_tiles is None else group_tiles
    on_tile = np.ones(ntiles, bool) if tiles is None else np.asarray(tiles, bool)
    walk_cs = np.ones(len(exe.compute_sets), bool)
    if compute_sets is not None:
        walk_cs[:] = False
        walk_cs[list(compute_sets)] = True
    # Vertices: global ids in compute-set order, with their compute set and tile.
    v_cs = np.concatenate([np.full(len(grp.tiles), i, np.int64) for i, cs in enumerate(exe.compute_sets)
                           for grp in cs.groups] or [np.zeros(0, np.int64)])
    v_tile = np.concatenate([grp.tiles.astype(np.int64) for cs in exe.compute_sets for grp in cs.groups]
                            or [np.zeros(0, np.int64)])
    v_keep = walk_cs[v_cs] & on_tile[v_tile]
    if g == 0:
        keys = np.nonzero(v_keep)[0]
        v_node = np.full(v_cs.size, -1, np.int64)
        v_node[keys] = np.arange(keys.size)
        n_cs, n_tile, n_count = v_cs[keys], v_tile[keys], np.ones(keys.size, np.int64)
    else:
        vk = v_cs * ntiles + v_tile // g
        keys = unique(vk[v_keep])
        v_node = np.where(v_keep, np.searchsorted(keys, vk), -1)
        n_cs, n_tile = keys // ntiles, (keys % ntiles) * g
        n_count = np.bincount(v_node[v_keep], minlength=keys.size).astype(np.int64)
    nv = n_cs.size
    # Data nodes: always-live tensors per (tensor, tile group).
    d_lo, d_hi, d_tensor, d_tile = tensor_regions(exe) if regions is None else regions
    keep = on_tile[d_tile]
    d_lo, d_hi, d_tensor, d_tile = d_lo[keep], d_hi[keep], d_tensor[keep], d_tile[keep]
    dk = d_tensor * ntiles + d_tile // max(g, 1)
    dkeys = unique(dk)
    d_node = nv + np.searchsorted(dkeys, dk)
    node_cs = np.concatenate([n_cs, np.full(dkeys.size, -1, np.int64)]).astype(np.int32)
    node_tile = np.concatenate([n_tile, (dkeys % ntiles) * max(g, 1)]).astype(np.int32)
    node_tensor = np.concatenate([np.full(nv, -1, np.int64), dkeys // ntiles]).astype(np.int32)
    node_vertices = np.concatenate([n_count, np.zeros(dkeys.size, np.int64)])
    nn = node_cs.size

    # Field runs of the compute sets walked (vertex ids global), on the tiles kept.
    vbase = np.cumsum([0] + [sum(len(grp.tiles) for grp in cs.groups) for cs in exe.compute_sets])
    runs = {}
    connections = 0
    for i, cs in enumerate(exe.compute_sets):
        if walk_cs[i]:
            r, w, connected = _field_runs(exe, cs, int(vbase[i]))
            r, w = (tuple(a[v_node[x[2]] >= 0] for a in x) for x in (r, w))
            runs[i] = (r, w)
            connections += connected if tiles is None else int(unique(r[2]).size + unique(w[2]).size)

    def kept(c: X.CopyTable) -> X.CopyTable:
        if tiles is None:
            return c
        m = on_tile[c.dst // tm]
        return X.CopyTable(c.src[m], c.dst[m], c.nbytes[m])
    pre = {i: kept(exe.compute_sets[i].pre) for i in runs}
    post = {i: kept(exe.compute_sets[i].post) for i in runs}
    copies = [kept(c) for c in exe.copies]
    # Buffers an exchange fills, when grouped: merged, marked, never followed.
    buffers = {i: _merge(c.dst, c.dst + c.nbytes) for i, c in pre.items()} if g else {}
    # Cells: the address space cut at every boundary of a write, a copy or a region.
    cuts = [d_lo, d_hi]
    for _, (wa, we, _) in runs.values():
        cuts += [wa, we]
    followed = list(post.values()) + copies + (list(pre.values()) if g == 0 else [])
    for c in followed:
        cuts += [c.dst, c.dst + c.nbytes, c.src, c.src + c.nbytes]
    for a, e in buffers.values():
        cuts += [a, e]
    bnd = unique(np.concatenate(cuts))
    # One more round: a copy's destination is cut where its source is, so a cell
    # of the destination comes from one cell of the source.
    extra = []
    for c in followed:
        if c.src.size:
            c0 = np.searchsorted(bnd, c.src, "right")
            c1 = np.searchsorted(bnd, c.src + c.nbytes, "left")
            idx, which = _expand(c0, c1)
            if idx.size:
                extra.append(c.dst[which] + (bnd[idx] - c.src[which]))
    if extra:
        bnd = unique(np.concatenate([bnd] + extra))
    owner = np.full(bnd.size, -1, np.int64)       # -1 nothing known, -2 a buffer (grouped)
    edges: list[tuple[np.ndarray, np.ndarray]] = []

    def cells(a, e):
        return _expand(np.searchsorted(bnd, a, "right") - 1, np.searchsorted(bnd, e, "left"))

    def paint(a, e, who):
        idx, which = _expand(np.searchsorted(bnd, a), np.searchsorted(bnd, e))
        owner[idx] = who[which] if np.ndim(who) else who

    def link(w, r, weight=None):
        keep = (w >= 0) & (r >= 0) & (w != r)
        if keep.any():
            edges.append(_counts_of_runs(w[keep] * nn + r[keep], None if weight is None else weight[keep]))

    def copy(c: X.CopyTable):
        if not c.src.size:
            return
        idx, which = _expand(np.searchsorted(bnd, c.dst), np.searchsorted(bnd, c.dst + c.nbytes))
        srcaddr = c.src[which] + (bnd[idx] - c.dst[which])
        owner[idx] = owner[np.searchsorted(bnd, srcaddr, "right") - 1]

    def exchange_in(i: int, c: X.CopyTable):
        """Grouped: an edge from every source cell's writer to the group reading
        the destination tile."""
        if not c.src.size:
            return
        # The compute set's groups: keys[lo:hi]; a dense table from tile group to node.
        lo, hi = np.searchsorted(keys, [i * ntiles, (i + 1) * ntiles])
        table = np.full(ntiles // g + 1, -1, np.int64)
        table[keys[lo:hi] - i * ntiles] = np.arange(lo, hi)
        # An exchange sends the same bytes to many tiles: follow each distinct source
        # run once (its writers and their cells), then join with the groups reading
        # it, weighted by how often (cell by cell, ResNet-50's ran to 489M cells and
        # 42 s; 23 s so).
        reader = table[(c.dst // tm) // g]
        on = reader >= 0
        if not on.any():
            paint(*buffers[i], -2)
            return
        src, n, reader = c.src[on].astype(np.int64), c.nbytes[on], reader[on]
        span = int(n.max()) + 1
        key = src * span + n
        if unique(key[:65536]).size > min(key.size, 65536) // 2:
            # Mostly distinct runs (a transpose's element copies): sorting them to
            # find the repeats would cost more than it saves.
            idx, which = cells(src, src + n)
            link(owner[idx], reader[which])
        else:
            runs_, inv = np.unique(key, return_inverse=True)
            pairs, times = _unique_counts(inv.ravel() * nn + reader)
            idx, which = cells(runs_ // span, runs_ // span + runs_ % span)
            ow, cnt = _counts_of_runs(which * (nn + 2) + owner[idx] + 2)
            o_run, o_who = ow // (nn + 2), ow % (nn + 2) - 2
            # Join on the source run: every reader of run u with every writer of u.
            o_first = np.searchsorted(o_run, np.arange(runs_.size))
            o_last = np.searchsorted(o_run, np.arange(runs_.size), "right")
            p_run = pairs // nn
            k, which = _expand(o_first[p_run], o_last[p_run])
            link(o_who[k], (pairs % nn)[which], cnt[k] * times[which])
        a, e = buffers[i]
        paint(a, e, -2)

    paint(d_lo, d_hi, d_node)

    def execute(i: int):
        if i not in runs:
            return
        if g:
            exchange_in(i, pre[i])
        else:
            copy(pre[i])
        (ra, re_, rv), (wa, we, wv) = runs[i]
        idx, which = cells(ra, re_)
        link(owner[idx], v_node[rv[which]])
        paint(wa, we, v_node[wv])
        copy(post[i])

    def walk(p, times=1):
        for _ in range(times):
            for n in p.body:
                if isinstance(n, X.PExecute):
                    execute(n.cs)
                elif isinstance(n, X.PCopy):
                    copy(copies[n.copy])
                elif isinstance(n, X.PRepeat):
                    walk(n.body, min(n.count, 2))
                elif isinstance(n, X.PWhile):
                    walk(n.body, 2)
                elif isinstance(n, X.PIf):
                    walk(n.then)
                    walk(n.orelse)
                elif isinstance(n, X.PSeq):
                    walk(n)
    walk(exe.program)
    if edges:
        ek, weight = _unique_counts(np.concatenate([k for k, _ in edges]), np.concatenate([c for _, c in edges]))
    else:
        ek, weight = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return CompiledGraph(exe, g, node_cs, node_tile, node_tensor, node_vertices,
                         (ek // nn).astype(np.int32), (ek % nn).astype(np.int32), weight,
                         int(v_keep.sum()), connections)
