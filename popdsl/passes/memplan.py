"""Memory planning: lowered graph → `Executable` with every region at an offset.

Requires a `Lowered` graph and the native code size of each codelet; produces the
executable with global byte addresses (tile × tile memory + offset) in every table,
copy and read, and the per-tile memory plan by category.

This is the simple planner: regions that live for the whole program are packed
first on each tile; the exchange buffers of a compute set live only while it runs,
so every compute set's buffers start at the same offset after them.  Vertex state
(the real table bytes) and codelet code are charged to the tiles that use them.
Anything over a tile's capacity is an out-of-memory error naming the tile and what
is on it.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostics
from popdsl.passes.lower import CopyElems, Lowered
from popdsl.runtime import executable as X
from popdsl.runtime.cycles import copy_cycles
from popdsl.runtime.target import Target


def _align(size: np.ndarray) -> np.ndarray:
    # 64-byte alignment for anything vectorised code will stream; 8 for small data.
    a = np.where(size >= 256, 64, 8)
    return a


def _pack(order, sizes, aligns, start: int, base: np.ndarray) -> int:
    off = start
    for r in order:
        a = int(aligns[r])
        off = -(-off // a) * a
        base[r] = off
        off += int(sizes[r])
    return off


def plan(low: Lowered, code_sizes: dict[str, int], unchecked: bool = False) -> X.Executable:
    graph = low.graph
    target: Target = graph.target
    ntiles = target.tiles
    rt = np.asarray(low.region_tile, np.int64)
    rs = np.asarray(low.region_size, np.int64)
    rc = np.asarray(low.region_cs, np.int64)
    al = _align(rs)
    base = np.zeros(len(rt), np.int64)
    variables = np.zeros(ntiles, np.int64)
    buffers = np.zeros(ntiles, np.int64)
    # Regions sorted by (tile, compute set, id): one pass packs every tile.
    order = np.lexsort((np.arange(len(rt)), rc, rt))
    i = 0
    while i < len(order):
        tile = rt[order[i]]
        j = i
        while j < len(order) and rt[order[j]] == tile:
            j += 1
        on_tile = order[i:j]
        perm = [r for r in on_tile if rc[r] < 0]
        end = _pack(perm, rs, al, 0, base)
        variables[tile] = end
        peak = end
        k = 0
        scratch = [r for r in on_tile if rc[r] >= 0]
        while k < len(scratch):
            cs = rc[scratch[k]]
            m = k
            while m < len(scratch) and rc[scratch[m]] == cs:
                m += 1
            peak = max(peak, _pack(scratch[k:m], rs, al, end, base))
            k = m
        buffers[tile] = peak - end
        i = j
    vertex_state = np.zeros(ntiles, np.int64)
    code = np.zeros(ntiles, np.int64)
    for cs in low.compute_sets:
        for grp in cs.groups:
            row_bytes = grp.table.shape[1] * 8
            vertex_state += np.bincount(grp.tiles, minlength=ntiles) * row_bytes
    for cname in sorted({grp.codelet for cs in low.compute_sets for grp in cs.groups}):
        on = np.zeros(ntiles, bool)
        for cs in low.compute_sets:
            for grp in cs.groups:
                if grp.codelet == cname:
                    on[grp.tiles] = True
        code += on * int(code_sizes.get(cname, 0))
    mem = X.MemoryPlan(variables, buffers, vertex_state, code)
    _check_capacity(low, mem, target, base)

    region_addr = rt * target.tile_memory + base
    tensor_addrs = []
    for t in graph.tensors:
        tensor_addrs.append(region_addr[low.elem_region[t.id]] + low.elem_off[t.id])
    css = []
    for cs in low.compute_sets:
        groups = []
        for grp in cs.groups:
            table = grp.table.copy()
            m = grp.region >= 0
            table[m] += region_addr[grp.region[m]]
            groups.append(X.VertexTable(grp.codelet, table, grp.tiles, grp.span_ids))
        css.append(X.ComputeSetExec(cs.name, cs.span, groups, _copy_table(cs.pre, region_addr, target),
                                    _copy_table(cs.post, region_addr, target)))
    copies = [_copy_table(c, region_addr, target) for c in low.copies]
    reads = [X.Read(label, dtype, tensor_addrs[t][idx]) for label, dtype, t, idx in low.reads]
    tensors = [X.TensorInfo(t.name, t.dtype, t.shape, t.kind, t.span) for t in graph.tensors]
    cs_index = {cs.name: i for i, cs in enumerate(low.compute_sets)}
    ops = [{**{k: v for k, v in op.items() if k != "compute_sets"},
            "compute_sets": [cs_index[n] for n in op["compute_sets"]]} for op in graph.ops]
    return X.Executable(graph.name, target, dict(graph.codelets), tensors, tensor_addrs,
                        dict(graph.init), css, copies, reads, low.program, dict(graph.inputs),
                        dict(low.outputs), list(graph.spans), mem, unchecked, ops)


def _copy_table(c: CopyElems, region_addr: np.ndarray, target: Target) -> X.CopyTable:
    sr, so, dr, do, nbytes = c.merged()
    out = X.CopyTable(region_addr[sr] + so, region_addr[dr] + do, nbytes)
    out.cycles, out.exchange_bytes, out.local_bytes = copy_cycles(out.src, out.dst, out.nbytes, target)
    return out


def _check_capacity(low: Lowered, mem: X.MemoryPlan, target: Target, base: np.ndarray) -> None:
    total = mem.total
    over = np.nonzero(total > target.tile_memory)[0]
    if not over.size:
        return
    worst = int(over[np.argmax(total[over])])
    rt = np.asarray(low.region_tile)
    rs = np.asarray(low.region_size)
    on = np.nonzero(rt == worst)[0]
    big = on[np.argsort(-rs[on], kind="stable")][:5]
    notes = [f"{int(rs[r]):,} B  {low.region_label[r][0]} ({low.region_label[r][1]})" for r in big]
    notes.append(f"by category: variables {int(mem.variables[worst]):,} B, exchange buffers "
                 f"{int(mem.exchange_buffers[worst]):,} B, vertex state {int(mem.vertex_state[worst]):,} B, "
                 f"code {int(mem.code[worst]):,} B")
    notes.append("what would help: spread the largest tensors over more tiles (map ... -> linear), "
                 "connect vertices to data on their own tile to avoid exchange buffers, or use a "
                 "target with more memory per tile")
    d = Diagnostics()
    span = low.region_label[big[0]][1] if big.size else low.graph.spans[0] if low.graph.spans else None
    from popdsl.diagnostics import Span
    d.error(span or Span("<graph>", 0, 0, 0, 0),
            f"out of memory: tile {worst} needs {int(total[worst]):,} B but has "
            f"{target.tile_memory:,} B ({len(over)} tile{'s' if len(over) > 1 else ''} over capacity)",
            *notes)
    d.check()
