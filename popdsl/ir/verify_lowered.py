"""Verifiers of what the back half of the pipeline promises: the vertex graph
(`lower`), the planned executable (`plan`), and the memory plan's central
property, that no two regions live at the same time share a byte.

Requires a `Lowered` graph, an `(Executable, native code)` pair, or per-region
arrays (tile, offset, size, live interval).  Produces nothing: each verifier raises
AssertionError naming the stage, the object and the broken invariant (a compiler
bug, never the user's).  `ir.verify_graph` verifies the front half.

All checks are numpy over whole tables: loops run per tensor, per compute set, per
vertex group or per copy table, never per element, vertex or region.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import codelet as cir
from popdsl.ir import executable as X
from popdsl.ir.lowered import CopyElems, Lowered
from popdsl.ir.verify import direct_calls
from popdsl.ir.verify_graph import Check

# Regions of one lifetime closer than this are checked as one rectangle first
# (the planner pads allocations to their alignment, at most 63 bytes).
MERGE_GAP = 64
# Candidate pairs of rectangles compared at once: bounds the checker's memory.
PAIR_CHUNK = 1 << 22
# Elements, runs or addresses checked at once: temporaries stay in the cache.
CHUNK = 1 << 16


# ---------------------------------------------------------------- lower

def verify_lowered(low: Lowered) -> None:
    check = Check("lower")
    graph = low.graph
    lengths = {k: len(getattr(low, k)) for k in ("region_tile", "region_size", "region_cs", "region_label",
                                                  "region_tensor")}
    check(len(set(lengths.values())) == 1, "region arrays", f"differ in length: {lengths}")
    rt = np.asarray(low.region_tile, np.int64)
    rs = np.asarray(low.region_size, np.int64)
    rtensor = np.asarray(low.region_tensor, np.int64)
    check.values(rt, 0, graph.target.tiles, "regions", "tile")
    check.values(rs, 0, 1 << 62, "regions", "size")
    check.values(np.asarray(low.region_cs, np.int64), -1, len(low.compute_sets), "regions", "compute set")
    check.values(rtensor, -1, len(graph.tensors), "regions", "tensor")
    if low.tensor_region_tile is not None:
        k = len(low.tensor_region_tile)
        check(np.array_equal(low.tensor_region_tile, rt[:k]), "tensor_region_tile",
              "is not the tiles of the first regions")
    check(set(low.layouts) == set(range(len(graph.tensors))), "layouts",
          "are not given for exactly the graph's tensors")
    for t in graph.tensors:
        _tensor_layout(check, low, t, rt, rs, rtensor)
    for i, cs in enumerate(low.compute_sets):
        for k, grp in enumerate(cs.groups):
            _group(check, low, grp, rt, rs, f"compute set {i} ('{cs.name}') group {k} ({grp.codelet})")
        _copies(check, cs.pre, rs, f"compute set {i} ('{cs.name}') exchange in")
        _copies(check, cs.post, rs, f"compute set {i} ('{cs.name}') exchange out")
    for i, c in enumerate(low.copies):
        _copies(check, c, rs, f"program copy {i}")
    for i, (label, dtype, tid, idx) in enumerate(low.reads):
        what = f"read {i} ('{label}')"
        check(0 <= tid < len(graph.tensors) and graph.tensors[tid].dtype == dtype, what,
              f"of tensor {tid} as {dtype} does not match the tensor")
        check.index(idx, graph.tensors[tid].numel, what)
    _program(check, low.program, len(low.compute_sets), len(low.copies), len(low.reads))
    for name, r in low.outputs.items():
        check(0 <= r < len(low.reads), f"output '{name}'", f"names read {r} of {len(low.reads)}")


def _tensor_layout(check: Check, low: Lowered, t, rt, rs, rtensor) -> None:
    """The tensor's regions are its own, one per tile its mapping uses, sized for
    its elements there; its runs fill each region exactly, without overlap."""
    what, es = f"tensor {t.id} ('{t.name}')", t.elem_bytes
    tl = low.layouts[t.id]
    lay, m = tl.layout, tl.layout.mapping
    check(tl.elem_bytes == es and m.numel == t.numel, what, "layout of another size or element type")
    k = len(lay.tiles)
    regions = np.arange(tl.first, tl.first + k)
    check(tl.first >= 0 and tl.first + k <= len(rt), what, f"regions [{tl.first}, {tl.first + k}) outside the regions")
    check(bool(np.all(rtensor[regions] == t.id)), what, "a region of its layout is another's")
    check(np.array_equal(rt[regions], lay.tiles), what, "regions on other tiles than its mapping's")
    check(np.array_equal(rs[regions], lay.counts * es), what, "regions sized unlike its elements per tile")
    check(bool(np.all(m.tiles >= 0)) and np.array_equal(lay.tiles[lay.run_region], m.tiles), what,
          "a run of its mapping sits in a region on another tile")
    # Per region, the runs' offsets cover [0, count) exactly once.
    lengths = m.lengths
    order = np.lexsort((lay.run_off, lay.run_region))
    reg, off, n = lay.run_region[order], lay.run_off[order], lengths[order]
    first = np.r_[True, reg[1:] != reg[:-1]]
    expect = np.where(first, 0, np.r_[0, off[:-1] + n[:-1]])
    check.none(off != expect, what, lambda i: f"run at offset {off[i]} of region {reg[i]} leaves a gap or "
               "overlaps the run before it")


def _group(check: Check, low: Lowered, grp, rt, rs, what: str) -> None:
    graph = low.graph
    c = graph.codelets.get(grp.codelet)
    check(c is not None and c.ret is None, what, "names no vertex codelet of the graph")
    layout = cir.table_layout(c)
    nv = len(grp.tiles)
    check(grp.table.dtype == np.int64 and grp.table.shape == (nv, len(layout)) and grp.region.shape ==
          grp.table.shape and grp.span_ids.shape == (nv,), what,
          f"table {grp.table.dtype}{grp.table.shape}, regions {grp.region.shape}, span ids {grp.span_ids.shape} "
          f"for {nv} vertices of {len(layout)} columns")
    check.values(grp.tiles, 0, graph.target.tiles, what, "tile")
    check.none(np.diff(grp.tiles) < 0, what, lambda k: f"vertex {k + 1} is on a lower tile than vertex {k}")
    check.values(grp.span_ids, 0, len(graph.spans), what, "span id")
    is_addr = np.array([k.kind == "addr" for k in layout], bool)
    check(bool(np.all(grp.region[:, ~is_addr] == -1)), what, "a column other than an address names a region")
    for j, k in enumerate(layout):
        if k.kind == "addr":
            reg = grp.region[:, j].astype(np.intp)
            check.values(reg, 0, len(rt), f"{what} field '{k.name}'", "region")
            check.none(rt[reg] != grp.tiles, f"{what} field '{k.name}'", lambda v: f"vertex {v} on tile "
                       f"{grp.tiles[v]} points into region {reg[v]} on tile {rt[reg[v]]}")
        elif k.kind in ("stride", "sym"):
            check.values(grp.table[:, j], 0, 1 << 31, f"{what} {k.kind} '{k.name}'", "value")
    col = {(k.kind, k.name): j for j, k in enumerate(layout)}
    for f, addr, extent in X.field_extents(c, grp.table):
        reg = grp.region[:, col[("addr", f.name)]].astype(np.intp)
        es = cir.ELEM_BYTES[f.dtype]
        check.none((addr < 0) | (addr % es != 0) | (addr + extent > rs[reg]), f"{what} field '{f.name}'",
                   lambda v: f"vertex {v}: bytes [{addr[v]}, {addr[v] + extent[v]}) are misaligned or outside "
                   f"region {reg[v]} (size {rs[reg[v]]})")


def _copies(check: Check, c: CopyElems, rs, what: str) -> None:
    at = 0
    for part in c.parts:
        check(len({len(p) for p in part}) == 1, what, "run arrays differ in length")
        for a in range(0, len(part[0]), CHUNK):
            sr, so, dr, do, nb = (p[a:a + CHUNK] for p in part)
            sr, dr = sr.astype(np.intp), dr.astype(np.intp)
            check.values(sr, 0, len(rs), what, "source region")
            check.values(dr, 0, len(rs), what, "destination region")
            check.none((nb <= 0) | (so < 0) | (do < 0) | (so + nb > rs[sr]) | (do + nb > rs[dr]), what,
                       lambda k: f"run {at + k} of {nb[k]} bytes from region {sr[k]} @{so[k]} (size {rs[sr[k]]}) "
                       f"to region {dr[k]} @{do[k]} (size {rs[dr[k]]}) is empty or leaves its regions")
            at += len(sr)


def _program(check: Check, p, ncs: int, ncopies: int, nreads: int) -> None:
    check(isinstance(p, X.PSeq), "program", f"{type(p).__name__} where a PSeq belongs")
    for n in p.body:
        if isinstance(n, X.PSeq):
            _program(check, n, ncs, ncopies, nreads)
        elif isinstance(n, X.PExecute):
            check(0 <= n.cs < ncs, "program", f"executes compute set {n.cs} of {ncs}")
        elif isinstance(n, X.PCopy):
            check(0 <= n.copy < ncopies, "program", f"runs copy {n.copy} of {ncopies}")
        elif isinstance(n, X.PRepeat):
            check(n.count >= 0, "program", f"repeats {n.count} times")
            _program(check, n.body, ncs, ncopies, nreads)
        elif isinstance(n, X.PPrint):
            check(0 <= n.read < nreads, "program", f"PPrint reads {n.read} of {nreads}")
        elif isinstance(n, (X.PWhile, X.PIf)):
            check(0 <= n.cond < nreads, "program", f"{type(n).__name__} reads {n.cond} of {nreads}")
            for body in ((n.body,) if isinstance(n, X.PWhile) else (n.then, n.orelse)):
                _program(check, body, ncs, ncopies, nreads)
        else:
            check(False, "program", f"holds a {type(n).__name__}")


# ---------------------------------------------------------------- codegen

def verify_generated(gen) -> None:
    """`gen`: the codegen stage's result (`.lowered`, `.codelets`, `.native`): native
    code for exactly the codelets the vertices use and the scalar codelets they call."""
    check = Check("codegen")
    used = {grp.codelet for cs in gen.lowered.compute_sets for grp in cs.groups}
    missing = sorted(used - set(gen.codelets))
    check(not missing, "codelets", f"vertices use {missing}, which have no native code")
    for name, c in gen.codelets.items():
        callees = sorted(direct_calls(c) - set(gen.codelets))
        check(not callees, f"codelet '{name}'", f"calls {callees}, which have no native code")
    check(set(gen.native.codelets) == set(gen.codelets), "native code",
          f"is for {sorted(gen.native.codelets)}, not for {sorted(gen.codelets)}")


# ---------------------------------------------------------------- plan

def _verify_memory(check: Check, mem: X.MemoryPlan, nt: int, tm: int | None) -> None:
    for name in ("always_live", "not_always_live", "exchange_buffers", "vertex_state", "code", "planned",
                 "lower_bound", "naive_data"):
        a = getattr(mem, name)
        check(a.shape == (nt,), "memory plan", f"{name} has shape {a.shape}, not ({nt},)")
        check.values(a, 0, 1 << 62, "memory plan", name)
    if tm is not None:
        check.none(mem.total > tm, "memory plan", lambda k: f"tile {k} holds {mem.total[k]} B of {tm}")
    check.none(mem.planned < mem.lower_bound, "memory plan", lambda k: f"tile {k} is planned in {mem.planned[k]} B, "
               f"below its lower bound {mem.lower_bound[k]} B")
    check(len(mem.timeline) == len(mem.timeline_labels), "memory plan", "timeline and labels differ in length")


def verify_planned(result) -> None:
    """`result`: (Executable, native code with a `.codelets` dict); from a try of
    recomputation `auto` that measures only lower bounds (memplan.plan's
    `measure`), (MemoryPlan, native code): its arrays, and planned = the bound."""
    exe, native = result
    check = Check("plan")
    if isinstance(exe, X.MemoryPlan):
        _verify_memory(check, exe, len(exe.planned), None)
        check.none(exe.planned != exe.lower_bound, "memory plan",
                   lambda k: f"tile {k}: a plan of lower bounds gives {exe.planned[k]} B, not {exe.lower_bound[k]} B")
        return
    tm, nt = exe.target.tile_memory, exe.target.tiles
    mem = exe.memory
    _verify_memory(check, mem, nt, tm)
    # Data lies below the top of its tile's plan: in [tile * tm, tile * tm + planned).
    top = np.arange(nt, dtype=np.int64) * tm + mem.planned
    check(len(exe.tensor_runs) == len(exe.tensors), "tensors", "addresses are not given for every tensor")
    for i, (t, r) in enumerate(zip(exe.tensors, exe.tensor_runs)):
        es, n = cir.ELEM_BYTES[t.dtype], int(np.prod(t.shape, dtype=np.int64))
        what = f"tensor {i} ('{t.name}')"
        check(r.starts.shape == r.counts.shape == r.addrs.shape, what, "run arrays differ in shape")
        check.values(r.counts, 1, 1 << 62, what, "run length")
        ends = r.starts + r.counts
        check(r.starts.size == 0 or (r.starts[0] == 0 and bool((r.starts[1:] == ends[:-1]).all())), what,
              "runs do not cover the elements once, in order")
        covered = int(ends[-1]) if ends.size else 0
        check(covered == n, what, f"runs cover {covered} elements of {n}")
        _inside(check, r.addrs, r.counts * es, None, top, tm, es, what, "run")
    for i, r in enumerate(exe.reads):
        es = cir.ELEM_BYTES[r.dtype]
        _inside(check, r.addrs.ravel(), es, None, top, tm, es, f"read {i} ('{r.label}')", "element")
    for i, cs in enumerate(exe.compute_sets):
        for k, grp in enumerate(cs.groups):
            what = f"compute set {i} ('{cs.name}') group {k} ({grp.codelet})"
            c = exe.codelets.get(grp.codelet)
            check(c is not None and c.ret is None and grp.codelet in native.codelets, what,
                  "names no vertex codelet of the executable with native code")
            check(grp.table.shape == (len(grp.tiles), len(cir.table_layout(c))), what,
                  f"table of shape {grp.table.shape} for {len(grp.tiles)} vertices")
            check.values(grp.tiles, 0, nt, what, "tile")
            check.none(np.diff(grp.tiles) < 0, what, lambda v: f"vertex {v + 1} is on a lower tile than vertex {v}")
            check.values(grp.span_ids, 0, len(exe.spans), what, "span id")
            for f, addr, extent in X.field_extents(c, grp.table):
                _inside(check, addr, extent, grp.tiles, top, tm, cir.ELEM_BYTES[f.dtype], f"{what} field '{f.name}'",
                        "vertex")
        for name, ct in (("exchange in", cs.pre), ("exchange out", cs.post)):
            _copy_table(check, ct, top, tm, f"compute set {i} ('{cs.name}') {name}")
    for i, ct in enumerate(exe.copies):
        _copy_table(check, ct, top, tm, f"program copy {i}")
    _program(check, exe.program, len(exe.compute_sets), len(exe.copies), len(exe.reads))
    for name, r in exe.outputs.items():
        check(0 <= r < len(exe.reads), f"output '{name}'", f"names read {r} of {len(exe.reads)}")
    for name, tid in exe.inputs.items():
        check(0 <= tid < len(exe.tensors), f"input '{name}'", f"names tensor {tid}")
    for op in exe.ops:
        check(all(0 <= k < len(exe.compute_sets) for k in op["compute_sets"]), f"op record {op.get('op')}",
              "names a compute set that does not exist")


def _inside(check: Check, addr: np.ndarray, nbytes, tiles, top: np.ndarray, tm: int, align: int, what: str,
            name: str) -> None:
    """Bytes [addr, addr + nbytes) of every entry lie in one tile's window below
    the top of the data planned there (`top`, global addresses), on tile `tiles`
    (per entry) when given, and addr is a multiple of `align`."""
    scalar = np.ndim(nbytes) == 0
    for a in range(0, len(addr), CHUNK):
        ad = addr[a:a + CHUNK]
        tile = ad // tm
        # As unsigned, a negative address is off the chip too.
        bad = (tile.view(np.uint64) >= len(top)) | (ad + (nbytes if scalar else nbytes[a:a + CHUNK]) >
                                                   np.take(top, tile, mode="clip"))
        if tiles is not None:
            bad |= tile != tiles[a:a + CHUNK]
        if align > 1:
            bad |= (ad & (align - 1)).astype(bool)
        check.none(bad, what, lambda k: f"{name} {k}: bytes [{addr[k]}, {addr[k] + (nbytes if scalar else nbytes[k])}) "
                   f"are not inside the data planned on tile {addr[k] // tm if tiles is None else tiles[k]} "
                   f"(tile memory {tm} B){f', or not {align}-aligned' if align > 1 else ''}", at=a)


def _copy_table(check: Check, ct: X.CopyTable, top, tm: int, what: str) -> None:
    check(ct.src.shape == ct.dst.shape == ct.nbytes.shape, what, "run arrays differ in shape")
    check.values(ct.nbytes, 1, 1 << 62, what, "run length")
    _inside(check, ct.src, ct.nbytes, None, top, tm, 1, what, "source run")
    _inside(check, ct.dst, ct.nbytes, None, top, tm, 1, what, "destination run")


# ---------------------------------------------------------------- no overlap

def verify_no_overlap(tiles: np.ndarray, base: np.ndarray, sizes: np.ndarray, start: np.ndarray,
                      end: np.ndarray) -> None:
    """No two regions live at the same time ([start, end], inclusive) share a
    byte ([base, base + size)) of one tile.  Exact, in O(n log n + p) for n regions
    and p pairs of rectangles that overlap in space.

    Regions of one tile with one lifetime must be pairwise disjoint: sorted by
    offset, an overlap always shows between neighbours.  Then each such set of
    regions, cut where they leave a gap of MERGE_GAP bytes or more, is one
    rectangle (bytes × time); sorted by offset, every rectangle is compared with
    the later ones that begin before it ends.  A pair of rectangles that meets
    is decided by their regions, so padding between regions never counts."""
    nz = np.asarray(sizes) > 0
    rid = np.nonzero(nz)[0]
    t, lo, s, e = (np.asarray(a, np.int64)[nz] for a in (tiles, base, start, end))
    hi = lo + np.asarray(sizes, np.int64)[nz]
    o = np.lexsort((lo, e, s, t))
    rid, t, lo, hi, s, e = rid[o], t[o], lo[o], hi[o], s[o], e[o]

    def fail(i: int, j: int):
        raise AssertionError(f"after plan: memory plan: regions {rid[i]} and {rid[j]} share bytes of tile {t[i]}: "
                             f"[{lo[i]}, {hi[i]}) live {s[i]}..{e[i]} and [{lo[j]}, {hi[j]}) live {s[j]}..{e[j]}")

    same = (t[1:] == t[:-1]) & (s[1:] == s[:-1]) & (e[1:] == e[:-1])
    bad = np.nonzero(same & (lo[1:] < hi[:-1]))[0]
    if bad.size:
        fail(int(bad[0]), int(bad[0]) + 1)
    # Rectangles: runs of one lifetime (offsets ascending, disjoint as just checked).
    brk = np.ones(len(t), bool)
    brk[1:] = ~same | (lo[1:] - hi[:-1] >= MERGE_GAP)
    first = np.nonzero(brk)[0]
    if not first.size:
        return
    last = np.append(first[1:], len(t))
    # Tiles are compared in one sorted array: each moved past the one before.
    span = int(hi.max()) + 1
    rlo, rhi = t[first] * span + lo[first], t[first] * span + hi[last - 1]
    rs, re = s[first], e[first]
    order = np.argsort(rlo, kind="stable")
    rlo, rhi, rs, re, first, last = rlo[order], rhi[order], rs[order], re[order], first[order], last[order]
    # Rectangle i meets in space exactly the count[i] rectangles after it.
    count = np.searchsorted(rlo, rhi, "left") - np.arange(len(rlo)) - 1
    ends = np.cumsum(count)
    a = 0
    while a < len(rlo):
        # The next rectangles whose pairs fit in one chunk (at least one rectangle).
        b = max(a + 1, int(np.searchsorted(ends, (ends[a - 1] if a else 0) + PAIR_CHUNK, "right")))
        c = count[a:b]
        i = np.repeat(np.arange(a, b), c)
        j = i + 1 + np.arange(i.size) - np.repeat(np.cumsum(c) - c, c)
        meet = np.nonzero((rs[i] <= re[j]) & (rs[j] <= re[i]))[0]
        for k in meet.tolist():
            _refine(int(first[i[k]]), int(last[i[k]]), int(first[j[k]]), int(last[j[k]]), lo, hi, fail)
        a = b


def _refine(a0: int, a1: int, b0: int, b1: int, lo, hi, fail) -> None:
    """Regions a0..a1-1 and b0..b1-1 of two rectangles that meet in space and
    time: all live at once, so sorted by offset no neighbours may overlap."""
    idx = np.concatenate((np.arange(a0, a1), np.arange(b0, b1)))
    idx = idx[np.argsort(lo[idx], kind="stable")]
    bad = np.nonzero(lo[idx[1:]] < hi[idx[:-1]])[0]
    if bad.size:
        fail(int(idx[bad[0]]), int(idx[bad[0] + 1]))
