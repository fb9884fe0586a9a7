"""Memory planning: lowered graph → `Executable` with every region at an offset.

Requires a `Lowered` graph and the native code size of each codelet; produces the
executable with global byte addresses (tile × tile memory + offset) in every table,
copy and read, and the per-tile memory plan.

Per tile, regions (a tensor's part on the tile, or a vertex's exchange buffer) get
live intervals from `liveness` (a function's regions, one per call: they hold
nothing between calls, so anything live only between them may share their bytes);
regions with the same intervals are packed together into one allocation;
allocations get offsets by greedy-by-size best fit
(`passes.bestfit`: largest first, each into the smallest gap left by the
allocations whose lifetimes overlap it), tried in two orders — by size and by
length of life (the points it is live at, over all of a function's calls:
`Lives.length`) — keeping the better (TFLite's arena planner; XLA's heap simulator
tries the same two).  A tile still over its memory, whose lower bound is not,
tries nine more orders (`_plan_harder`): whether the graph compiles turns on it.
The lower
bound is the peak of live bytes; `reuse=False` gives every region its own bytes
(the naive plan), for checking results against.  Vertex state (a tile's vertices
of one table as PopLibs' multi-vertices hold them, `ir.vertex_state`) and codelet
code (real object-code size per codelet used) are charged to the tiles that use
them.  A tile over capacity is an out-of-memory error naming the
tile, what is on it by category, its largest tensors with their source lines, and
what would help.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostic, OutOfMemory, Span
from popdsl.ir.index import as_array, unique
from popdsl.passes.bestfit import Lives, best_fit_many, more_orders
from popdsl.passes.liveness import Liveness, liveness
from popdsl.ir.lowered import CopyElems, Lowered
from popdsl.ir import executable as X
from popdsl.ir import native_runs
from popdsl.ir.cost import copy_cycles
from popdsl.ir.target import Target
from popdsl.ir.verify_lowered import verify_no_overlap
from popdsl.ir.vertex_state import state_bytes


def _align(size: np.ndarray) -> np.ndarray:
    # 64-byte alignment for anything vectorised code will stream; 8 for small data.
    return np.where(size >= 256, 64, 8)


def _peak(sizes, starts, ends, points: int) -> int:
    live = np.zeros(points + 1, np.int64)
    np.add.at(live, starts, sizes)
    np.add.at(live, ends + 1, -sizes)
    return int(np.cumsum(live).max()) if len(sizes) else 0


def _packed(sizes: np.ndarray, aligns: np.ndarray) -> tuple[np.ndarray, int]:
    """Every allocation its own bytes, one after another: (offsets, top).  Most-aligned
    first: every size is a multiple of its alignment, so no padding."""
    order = np.argsort(-aligns, kind="stable")
    off = np.empty(len(sizes), np.int64)
    off[order] = np.cumsum(sizes[order]) - sizes[order]
    return off, int(sizes.sum())


def _plan_tiles(problems: list[tuple], reuse: bool, lower_bounds: list[int]) -> list:
    """(offsets, top) per (sizes, aligns, starts, ends, lives) problem (`starts`,
    `ends`: the span of each allocation's intervals; orders sort by size, by the
    points it is live at and by start)."""
    if not reuse:
        return [_packed(p[0], p[1]) for p in problems]
    life = [lives.length() for *_, lives in problems]
    by_size = [np.lexsort((p[2], -n, -p[0])) for p, n in zip(problems, life)]
    out = best_fit_many([(*p[:4], o, p[4]) for p, o in zip(problems, by_size)])
    # Problems not yet at their lower bound try the second order.
    again = [k for k, (a, bound) in enumerate(zip(out, lower_bounds)) if a[1] != bound]
    by_life = [np.lexsort((problems[k][2], -problems[k][0], -life[k])) for k in again]
    for k, b in zip(again, best_fit_many([(*problems[k][:4], o, problems[k][4]) for k, o in zip(again, by_life)])):
        if b[1] < out[k][1]:
            out[k] = b
    # Greedy best fit can lose to no sharing at all (alignment gaps around small
    # allocations, found by hypothesis: 2,096 B against 2,056 B): never plan worse.
    for k in again:
        sizes, aligns = problems[k][:2]
        if int(sizes.sum()) < out[k][1]:
            out[k] = _packed(sizes, aligns)
    return out


def plan(low: Lowered, codelets: dict, code_sizes: dict[str, int], unchecked: bool = False,
         reuse: bool = True, verify: bool = False, probe: bool = False,
         measure: bool = False) -> X.Executable | X.MemoryPlan:
    """Consumes `low`: its vertex tables and copies become the executable's.
    `codelets`: the codelets the executable needs (native code exists for them);
    `verify`: check the plan (no two regions live at once share a byte).  `probe`:
    a try whose out-of-memory error only says that it does not fit (recomputation
    `auto`'s search): raised before placing anything when a tile's lower bound is
    already over its memory, which no placement can beat.  `measure`: a try that
    only asks how much its busiest tile needs at least (`auto`'s search, for the
    try with everything recomputed, whose plan is rarely the one kept): the
    memory plan's categories and lower bounds, nothing placed (`planned` is the
    lower bound).  Over a tile's memory, the out-of-memory error as `probe`'s.
    A lowering of some tiles alone (`Lowered.only`) is only measured: each tile's
    bound at most the whole graph's (its regions touched at most as often, an
    untouched one holding nothing, allocations not padded)."""
    assert low.only is None or measure, "a lowering of some tiles alone is only ever measured"
    graph = low.graph
    target: Target = graph.target
    ntiles = target.tiles
    live = liveness(low)
    rt = np.asarray(low.region_tile, np.int64)
    rs = np.asarray(low.region_size, np.int64)
    al = _align(rs)
    n = len(rt)
    alias = _in_place(low, live) if reuse else {}
    plan_rs = rs.copy()
    plan_rs[list(alias)] = 0              # planned through the region they take over
    if low.only is not None:
        # Lowered for some tiles' vertices only: a region whose every touch was a
        # vertex or exchange left out holds nothing here, not bytes live at the start.
        plan_rs[live.untouched & ~live.always] = 0
    cat_rs = -(-plan_rs // al) * al
    exact_rs = plan_rs.copy()
    # A function's region is live in each call (liveness): its lifetime is the
    # function's and its first call's interval, the same in every call.
    fn = live.function
    life_end = np.where(fn >= 0, live.call_end, live.end)
    # Regions of one tile with one lifetime form one allocation: sizes rounded to
    # their alignment and the 64-aligned ones first, so running sums stay aligned.
    rs, full_rs = plan_rs, rs
    rounded = -(-rs // al) * al
    key = np.lexsort((np.arange(n), -al, life_end, live.start, fn, rt))
    ks = rt[key], fn[key], live.start[key], life_end[key]
    new = np.ones(n, bool)
    if n:
        new[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in ks])
    alloc_of_sorted = np.cumsum(new) - 1
    nalloc = int(alloc_of_sorted[-1]) + 1 if n else 0
    csum = np.cumsum(rounded[key])
    group_first = np.nonzero(new)[0]
    before = np.concatenate(([0], csum))[group_first]          # bytes of earlier groups
    inner = np.empty(n, np.int64)
    inner[key] = csum - rounded[key] - before[alloc_of_sorted]
    alloc_size = np.bincount(alloc_of_sorted, weights=rounded[key], minlength=nalloc).astype(np.int64)
    alloc_align = np.zeros(nalloc, np.int64)
    np.maximum.at(alloc_align, alloc_of_sorted, al[key])
    # A size that is a multiple of its alignment packs without padding.  (Not for
    # a lowering of some tiles alone: regions that live alike only there would
    # share an allocation, and its padding, that the whole graph's do not.)
    if low.only is None:
        alloc_size = -(-alloc_size // alloc_align) * alloc_align
    # Naive: the same allocations, none sharing, none in place.
    full = np.bincount(alloc_of_sorted, weights=(-(-full_rs // al) * al)[key], minlength=nalloc).astype(np.int64)
    full = -(-full // alloc_align) * alloc_align
    first = key[new]
    alloc_tile, alloc_start, alloc_end = rt[first], live.start[first], live.end[first]
    ptr, istart, iend = _lives(live, first, alloc_start, alloc_end)
    alloc_base = np.zeros(nalloc, np.int64)
    planned = np.zeros(ntiles, np.int64)
    bound = np.zeros(ntiles, np.int64)
    bounds = np.searchsorted(alloc_tile, np.arange(ntiles + 1))
    per_interval = np.repeat(alloc_size, np.diff(ptr))
    tile_lives = {}
    for tile in unique(alloc_tile).tolist():
        a, b = bounds[tile], bounds[tile + 1]
        c, d = ptr[a], ptr[b]
        tile_lives[tile] = lives = Lives(ptr[a:b + 1] - c, istart[c:d], iend[c:d])
        bound[tile] = _peak(per_interval[c:d], lives.istart, lives.iend, live.points)
    # Naive: the same allocations, none sharing, none in place.  Categories count
    # regions as allocated (rounded to their alignment), so that naive >= lower
    # bound <= planned compare like with like.
    naive = np.bincount(alloc_tile, weights=full, minlength=ntiles).astype(np.int64) if nalloc \
        else np.zeros(ntiles, np.int64)
    mem = _categories(low, live, -(-full_rs // al) * al, cat_rs, rt, bound.copy(), bound, naive,
                      code_sizes, ntiles)
    if (probe or measure) and (mem.bound_total > target.tile_memory).any():
        _check_capacity(low, mem, target, at_least=True)
    if measure:
        return mem                        # its `planned`: the lower bound
    # Tiles laid out alike are planned once (found only for a plan that places:
    # a try stopped at its bounds above never needs them).
    problems, problem_bound, problem_of = [], [], {}
    which = {}
    for tile, lives in tile_lives.items():
        a, b = bounds[tile], bounds[tile + 1]
        sz, ag, s, e = alloc_size[a:b], alloc_align[a:b], alloc_start[a:b], alloc_end[a:b]
        sig = np.concatenate([sz, ag, s, e, lives.ptr, lives.istart, lives.iend]).tobytes()
        k = problem_of.get(sig)
        if k is None:
            k = problem_of[sig] = len(problems)
            problems.append((sz, ag, s, e, lives))
            problem_bound.append(int(bound[tile]))
        which[tile] = k
    solved = _plan_tiles(problems, reuse, problem_bound)
    if reuse:
        _plan_harder(problems, problem_bound, solved, which, mem, target.tile_memory, probe)
    for tile, k in which.items():
        a, b = bounds[tile], bounds[tile + 1]
        alloc_base[a:b] = solved[k][0]
        planned[tile] = solved[k][1]
    region_alloc = np.empty(n, np.int64)
    region_alloc[key] = alloc_of_sorted
    base = alloc_base[region_alloc] + inner if n else np.zeros(0, np.int64)
    for out_r, in_r in alias.items():
        base[out_r] = base[in_r]
    if verify:
        verify_plan(rt, base, exact_rs, live)
    mem.planned = planned
    _check_capacity(low, mem, target)
    return _finish(low, codelets, base, mem, unchecked)


def _plan_harder(problems, bounds: list[int], solved: list, which: dict, mem: X.MemoryPlan, capacity: int,
                 probe: bool = False) -> None:
    """Tiles over their memory as planned decide whether the step compiles: their
    problems, where above the lower bound, try more placement orders
    (`bestfit.more_orders`) and keep the best (in `solved`).  Only when every such
    tile could fit (its lower bound and fixed bytes within its memory): otherwise
    the graph is out of memory whatever the plan, and the work would be wasted.
    `probe` (a try of `auto`'s search, which only asks whether the plan fits): the
    tile most over goes first, alone, and if no order fits it the rest are left
    as they are — the plan does not fit either way (ResNet-50 at batch 8: a
    failing try's planning 36 s, 17 s of it these orders)."""
    tiles = np.array(list(which), np.int64)
    if not tiles.size:
        return
    k_of = np.array([which[t] for t in tiles.tolist()], np.int64)
    tops = np.array([top for _, top in solved], np.int64)
    over = tops[k_of] + mem.fixed[tiles] > capacity
    if not over.any() or (np.array(bounds)[k_of[over]] + mem.fixed[tiles[over]] > capacity).any():
        return
    # Each problem's largest fixed bytes over the tiles that share it.
    fixed = np.zeros(len(solved), np.int64)
    np.maximum.at(fixed, k_of, mem.fixed[tiles])
    ks = sorted({int(k) for k in k_of[over] if tops[k] > bounds[k]}, key=lambda k: (-(tops[k] + fixed[k]), k))
    if probe and len(ks) > 1:
        _more_orders(problems, solved, ks[:1])
        if solved[ks[0]][1] + fixed[ks[0]] > capacity:
            return
        ks = ks[1:]
    _more_orders(problems, solved, ks)


def _more_orders(problems, solved: list, ks: list[int]) -> None:
    args, owner = [], []
    for k in ks:
        sz, ag, s, e, lives = problems[k]
        for order in more_orders(sz, s, e, lives):
            args.append((sz, ag, s, e, order, lives))
            owner.append(k)
    for k, got in zip(owner, best_fit_many(args)):
        if got[1] < solved[k][1]:
            solved[k] = got


def verify_plan(tiles: np.ndarray, base: np.ndarray, sizes: np.ndarray, live: Liveness) -> None:
    """No two regions live at the same time share a byte of one tile (a function's
    regions: in any of its calls).  A region that took over another's bytes in
    place has size 0 here (its owner's interval covers it).  A failure is a
    compiler bug (AssertionError)."""
    r, s, e = live.intervals()
    verify_no_overlap(tiles[r], base[r], sizes[r], s, e)


def _lives(live: Liveness, first: np.ndarray, starts: np.ndarray, ends: np.ndarray):
    """The intervals each allocation is live in, as `bestfit.Lives` arrays (ptr,
    istart, iend): its calls for a function's allocation (those of its first
    region, `first`; the others' are the same), else [start, end]."""
    cr, cs, ce = live.calls
    ccount = np.bincount(cr, minlength=len(live.start))
    cptr = np.concatenate(([0], np.cumsum(ccount)))
    many = live.function[first] >= 0
    nint = np.where(many, ccount[first], 1)
    ptr = np.concatenate(([0], np.cumsum(nint)))
    owner = np.repeat(np.arange(len(first)), nint)
    k = np.arange(int(ptr[-1])) - ptr[owner]
    src = np.where(many[owner], cptr[first[owner]] + k, 0)
    if not cs.size:
        return ptr, starts[owner], ends[owner]
    return ptr, np.where(many[owner], cs[src], starts[owner]), np.where(many[owner], ce[src], ends[owner])


def _in_place(low: Lowered, live: Liveness) -> dict[int, int]:
    """Output regions that take over an input region's bytes: the input dies at
    the element-wise op that makes the output, on the same tile, with the same
    size (the usual rules: a safe pair, no later reader, equal size and type,
    not a variable, input or output).  The input's interval is stretched over the
    output's and the output region is left out of planning (size 0, same base)."""
    graph = low.graph
    cs_index = {cs.name: i for i, cs in enumerate(low.compute_sets)}
    outputs = {low.reads[i][2] for i in low.outputs.values()}
    size = np.asarray(low.region_size, np.int64)
    alias = np.full(size.size, -1, np.int64)       # region -> the region whose bytes it takes
    taken = np.zeros(size.size, bool)
    for out_t, in_t, cs in graph.inplace:
        times = live.cs_points.get(cs_index[cs], [])
        li, lo = low.layouts.get(in_t), low.layouts.get(out_t)
        if len(times) != 1 or graph.tensors[in_t].kind != "temp" or in_t in outputs or li is None or lo is None:
            continue
        t = times[0]
        # A tensor's regions are consecutive, one per tile of its layout (ascending).
        _, i_in, i_out = np.intersect1d(li.layout.tiles, lo.layout.tiles, assume_unique=True, return_indices=True)
        r_in, r_out = li.first + i_in, lo.first + i_out
        ok = ~taken[r_in] & (alias[r_out] < 0) & (size[r_out] == size[r_in]) \
            & (live.end[r_in] == t) & (live.start[r_out] == t)
        r_in, r_out = r_in[ok], r_out[ok]
        taken[r_in] = True
        root = np.where(alias[r_in] >= 0, alias[r_in], r_in)     # chains share the first region's bytes
        alias[r_out] = root
        live.end[root] = np.maximum(live.end[root], live.end[r_out])
    out = np.nonzero(alias >= 0)[0]
    return dict(zip(out.tolist(), alias[out].tolist()))


def _categories(low, live: Liveness, rs, plan_rs, rt, planned, bound, naive, code_sizes,
                ntiles) -> X.MemoryPlan:
    tensor = np.asarray(low.region_tensor, np.int64)
    is_buf = tensor < 0

    def per_tile(mask):
        return np.bincount(rt[mask], weights=rs[mask], minlength=ntiles).astype(np.int64)
    vertex_state = np.zeros(ntiles, np.int64)
    workers = low.graph.target.workers
    code = np.zeros(ntiles, np.int64)
    on_tiles: dict[str, np.ndarray] = {}
    for cs in low.compute_sets:
        for grp in cs.groups:
            if len(grp.tiles):
                vertex_state += state_bytes(grp.table, grp.tiles, ntiles, workers, grp.region[0] >= 0, grp.region)
            on = on_tiles.setdefault(grp.codelet, np.zeros(ntiles, bool))
            on[grp.tiles] = True
    for cname, on in on_tiles.items():
        code += on * int(code_sizes.get(cname, 0))
    # Live bytes at each program point, over all tiles, by category (a function's
    # regions in each of its calls).
    ri, starts, ends = live.intervals()

    def timeline(mask):
        m = mask[ri]
        t = np.zeros(live.points + 1, np.int64)
        np.add.at(t, starts[m], plan_rs[ri[m]])
        np.add.at(t, ends[m] + 1, -plan_rs[ri[m]])
        return np.cumsum(t)[:-1]
    by_category = {"always_live": timeline(live.always), "not_always_live": timeline(~live.always & ~is_buf),
                   "exchange_buffers": timeline(is_buf)}
    return X.MemoryPlan(always_live=per_tile(live.always), not_always_live=per_tile(~live.always & ~is_buf),
                        exchange_buffers=per_tile(is_buf), vertex_state=vertex_state, code=code,
                        planned=planned, lower_bound=bound, naive_data=naive, timeline=sum(by_category.values()),
                        timeline_labels=list(live.labels), timeline_categories=by_category)


def _finish(low: Lowered, codelets: dict, base: np.ndarray, mem: X.MemoryPlan, unchecked: bool) -> X.Executable:
    graph = low.graph
    target = graph.target
    rt = np.asarray(low.region_tile, np.int64)
    region_addr = rt * target.tile_memory + base
    tensor_runs = []
    for t in graph.tensors:
        tl = low.layouts[t.id]
        m = tl.layout.mapping
        addrs = region_addr[tl.first + tl.layout.run_region] + tl.layout.run_off * tl.elem_bytes
        tensor_runs.append(X.TensorRuns(m.starts.copy(), m.lengths, addrs.astype(np.int64)))
    # The lowered graph's tables and copy runs become the executable's, one compute
    # set at a time (a ResNet-50 training step's are gigabytes: never two copies).
    css = []
    for cs in low.compute_sets:
        groups = []
        for grp in cs.groups:
            table = grp.table
            m = grp.region >= 0
            table[m] += region_addr[grp.region[m]]
            groups.append(X.VertexTable(grp.codelet, table, grp.tiles, grp.span_ids))
        css.append(X.ComputeSetExec(cs.name, cs.span, groups, _copy_table(cs.pre, region_addr, target),
                                    _copy_table(cs.post, region_addr, target)))
    low.compute_sets = []
    copies = [_copy_table(c, region_addr, target) for c in low.copies]
    low.copies = []
    reads = []
    for label, dtype, t, idx in low.reads:
        r, off = low.layouts[t].locate(as_array(idx))
        reads.append(X.Read(label, dtype, region_addr[r] + off))
    tensors = [X.TensorInfo(t.name, t.dtype, t.shape, t.kind, t.span) for t in graph.tensors]
    cs_index = {cs.name: i for i, cs in enumerate(css)}
    ops = [{**{k: v for k, v in op.items() if k != "compute_sets"},
            "compute_sets": [cs_index[n] for n in op["compute_sets"]]} for op in graph.ops]
    functions = [{**f, "compute_sets": [cs_index[n] for n in f["compute_sets"]]} for f in graph.function_summary]
    return X.Executable(graph.name, target, dict(codelets), tensors, tensor_runs,
                        graph.init.copy(), css, copies, reads, low.program, dict(graph.inputs),
                        dict(low.outputs), list(graph.spans), mem, unchecked, ops,
                        dict(graph.recompute), functions)


def _copy_table(c: CopyElems, region_addr: np.ndarray, target: Target) -> X.CopyTable:
    """`c`'s runs at their addresses (taken from `c`, which is left empty):
    natively for many runs (`native_runs.copy_addresses`), each part where it is."""
    runs = native_runs.copy_addresses(c.parts, region_addr) \
        if sum(p[0].size for p in c.parts) >= native_runs.MIN_RUNS else None
    if runs is None:
        sr, so, dr, do, nbytes = c.merged()
        runs = region_addr[sr] + so, region_addr[dr] + do, nbytes
    c.parts = []
    out = X.CopyTable(*runs)
    out.cycles, out.exchange_bytes, out.local_bytes = copy_cycles(out.src, out.dst, out.nbytes, target)
    return out


def _check_capacity(low: Lowered, mem: X.MemoryPlan, target: Target, at_least: bool = False) -> None:
    """Raise OutOfMemory for the tile most over its memory, as planned (`at_least`:
    its lower bound, the plan not made)."""
    total = mem.bound_total if at_least else mem.total
    over = np.nonzero(total > target.tile_memory)[0]
    if not over.size:
        return
    worst = int(over[np.argmax(total[over])])
    rt = np.asarray(low.region_tile)
    rs = np.asarray(low.region_size)
    on = np.nonzero(rt == worst)[0]
    big = on[np.argsort(-rs[on], kind="stable")][:5]
    notes = [f"{int(rs[r]):,} B  {low.region_label[r][0]} ({low.region_label[r][1]})" for r in big]
    notes.append(f"by category: always-live variables {int(mem.always_live[worst]):,} B, not-always-live "
                 f"{int(mem.not_always_live[worst]):,} B (live at once at most {int(mem.lower_bound[worst]):,} B "
                 f"with exchange buffers), exchange buffers {int(mem.exchange_buffers[worst]):,} B, vertex state "
                 f"{int(mem.vertex_state[worst]):,} B, code {int(mem.code[worst]):,} B")
    notes.append("what would help: spread the largest tensors over more tiles (map ... -> linear), "
                 "connect vertices to data on their own tile to avoid exchange buffers, a smaller "
                 "batch, or a target with more memory per tile")
    span = low.region_label[big[0]][1] if big.size else Span("<graph>", 0, 0, 0, 0)
    raise OutOfMemory([Diagnostic(span, f"out of memory: tile {worst} needs {'at least ' if at_least else ''}"
                                  f"{int(total[worst]):,} B but has "
                                  f"{target.tile_memory:,} B ({len(over)} tile{'s' if len(over) > 1 else ''} "
                                  "over capacity)", "error", tuple(notes))],
                      worst, int(total[worst]), target.tile_memory, mem.bound_total)
