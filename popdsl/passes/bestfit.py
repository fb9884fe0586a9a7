"""Greedy best fit of allocations into one tile's memory, for many tiles at once.

Requires allocations per problem (sizes, alignments, live intervals [start, end]
and the order to place them in); produces each allocation's offset and the
problem's top.  Used by `memplan`, one problem per distinct tile layout.  An
allocation may be live in several intervals (a function's region, in each call):
then [start, end] spans them and `lives` lists them (`Lives`); two allocations
conflict when an interval of one overlaps an interval of the other.

`best_fit` (numpy) is the definition.  `best_fit_many` runs the same algorithm as
a popdsl codelet — BestFit below, one vertex per problem, JIT-compiled and cached
like any other — because the placement loop is sequential per allocation and a
Python loop over a ResNet-50's 450,000 allocations took 12 s of its compile.
Both place allocations in `order`, each into the smallest gap among the already
placed allocations alive at the same time (ties: the lowest such gap), or on top;
their results are equal (tests/test_memplan.py checks it on random problems).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from popdsl.ir.index import unique
from popdsl.node import node

# Scanning the placed allocations in offset order keeps `cursor`, the first free
# byte above every conflicting allocation seen so far, so the gap below conflict j
# is off[j] - align_up(cursor).  `byoff` lists the placed allocations by offset
# (equal offsets by index, as numpy's stable sort has them).
SOURCE = """
codelet BestFit(in size: i32[n], in align: i32[n], in start: i32[n], in end: i32[n], in ptr: i32[p],
                in istart: i32[m], in iend: i32[m], in order: i32[n], out off: i32[n], inout byoff: i32[n],
                out top: i32) {
    var placed = 0;
    var peak = 0;
    for q in 0..n {
        let i = order[q];
        let s = size[i];
        let a = align[i];
        let many = ptr[i + 1] - ptr[i] > 1;
        var cursor = 0;
        var best = -1;
        var bestgap = 0;
        for r in 0..placed {
            let j = byoff[r];
            if start[j] <= end[i] && end[j] >= start[i] {
                var hit = true;
                if many || ptr[j + 1] - ptr[j] > 1 {
                    hit = false;
                    var x = ptr[i];
                    while !hit && x < ptr[i + 1] {
                        var y = ptr[j];
                        while !hit && y < ptr[j + 1] {
                            hit = istart[y] <= iend[x] && iend[y] >= istart[x];
                            y += 1;
                        }
                        x += 1;
                    }
                }
                if hit {
                    let at = (cursor + a - 1) / a * a;
                    let gap = off[j] - at;
                    if gap >= s && (best < 0 || gap < bestgap) {
                        best = at;
                        bestgap = gap;
                        if gap == s { break; }
                    }
                    cursor = max(cursor, off[j] + size[j]);
                }
            }
        }
        var at = best;
        if best < 0 { at = (cursor + a - 1) / a * a; }
        off[i] = at;
        peak = max(peak, at + s);
        var r = placed;
        while r > 0 && (off[byoff[r - 1]] > at || (off[byoff[r - 1]] == at && byoff[r - 1] > i)) {
            byoff[r] = byoff[r - 1];
            r -= 1;
        }
        byoff[r] = i;
        placed += 1;
    }
    top = peak;
}
"""
_FIELDS = ("size", "align", "start", "end", "ptr", "istart", "iend", "order", "off", "byoff")
# i32 arithmetic in the codelet: problems whose bytes could reach 2**31 use numpy.
_LIMIT = 1 << 30


@node(eq=False)
class Lives:
    """The intervals each allocation is live in: allocation k's are
    [istart[x], iend[x]] for x in ptr[k]:ptr[k + 1]."""
    ptr: np.ndarray
    istart: np.ndarray
    iend: np.ndarray

    @staticmethod
    def one(starts: np.ndarray, ends: np.ndarray) -> "Lives":
        return Lives(np.arange(len(starts) + 1, dtype=np.int64), np.asarray(starts, np.int64),
                     np.asarray(ends, np.int64))

    def length(self) -> np.ndarray:
        """Program points each allocation is live at, over all its intervals — the
        lifetime placement orders sort by.  (The span from its first interval's
        start to its last's end made a function's region, live in a call near each
        end of the step, look live throughout: ordered by that, the tiles of
        ResNet-50's training step at batch 32 on 368 tiles, every segment
        recomputed, were planned 14 % over their lower bounds; by this, 1 %.)"""
        if len(self.ptr) < 2:
            return np.zeros(0, np.int64)
        return np.add.reduceat(self.iend - self.istart + 1, self.ptr[:-1])


def best_fit(sizes: np.ndarray, aligns: np.ndarray, starts: np.ndarray, ends: np.ndarray,
             order: np.ndarray, lives: Lives | None = None) -> tuple[np.ndarray, int]:
    """Offsets for allocations placed in `order`, each into the smallest gap among
    the already placed allocations whose lifetimes overlap it (or on top).
    `lives`: the intervals of allocations live in several (None: [start, end])."""
    n = len(sizes)
    off = np.zeros(n, np.int64)
    placed = np.zeros(n, bool)
    top = 0
    many = np.diff(lives.ptr) > 1 if lives is not None else np.zeros(n, bool)
    for i in order.tolist():
        size, a = int(sizes[i]), int(aligns[i])
        idx = np.nonzero(placed & (starts <= ends[i]) & (ends >= starts[i]))[0]
        if idx.size and (many[i] or many[idx].any()):
            idx = np.asarray([j for j in idx.tolist() if _meet(lives, i, j)], np.int64)
        at = 0
        if idx.size:
            lo = off[idx]
            srt = np.argsort(lo, kind="stable")
            lo = lo[srt]
            hi = np.maximum.accumulate(lo + sizes[idx][srt])
            # Gap k lies between the end of everything below conflict k and its start.
            begin = -(-np.concatenate(([0], hi[:-1])) // a) * a
            gap = lo - begin
            fits = np.nonzero(gap >= size)[0]
            if fits.size:
                at = int(begin[fits[np.argmin(gap[fits])]])
            else:
                at = -(-int(hi[-1]) // a) * a
        off[i] = at
        placed[i] = True
        top = max(top, at + size)
    return off, top


def _meet(lives: Lives, i: int, j: int) -> bool:
    """Whether an interval of allocation i overlaps one of allocation j."""
    a, b = slice(lives.ptr[i], lives.ptr[i + 1]), slice(lives.ptr[j], lives.ptr[j + 1])
    si, ei, sj, ej = lives.istart[a], lives.iend[a], lives.istart[b], lives.iend[b]
    return bool(((sj[None, :] <= ei[:, None]) & (ej[None, :] >= si[:, None])).any())


@functools.cache
def _codelets():
    from popdsl.sema import compile_codelets
    return compile_codelets(SOURCE, "<bestfit>")


@functools.cache
def _native():
    from popdsl.codegen.jit import NativeCodelets
    return NativeCodelets(_codelets())


def compile_ahead() -> None:
    """Start compiling the BestFit codelet's native code in the background
    (`codegen.jit.compile_ahead`), for a plan still to come."""
    from popdsl.codegen.jit import compile_ahead as ahead
    if _native.cache_info().currsize == 0:
        ahead(_codelets())


def best_fit_many(problems: list[tuple]) -> list[tuple[np.ndarray, int]]:
    """`best_fit` of every (sizes, aligns, starts, ends, order[, lives]) problem."""
    from popdsl.codegen.jit import aligned_zeros
    from popdsl.ir.errors import VertexError
    out: list = [None] * len(problems)
    native, args = [], []
    for k, p in enumerate(problems):
        sz, ag, s, e, order = p[:5]
        lives = p[5] if len(p) > 5 and p[5] is not None else Lives.one(s, e)
        if len(sz) == 0:
            out[k] = (np.zeros(0, np.int64), 0)
        elif int(sz.sum()) + int(ag.max()) * len(sz) >= _LIMIT or max(int(s.max()), int(e.max())) >= _LIMIT:
            out[k] = best_fit(sz, ag, s, e, order, lives)
        else:
            native.append(k)
            args.append((sz, ag, s, e, lives.ptr, lives.istart, lives.iend, order))
    if not native:
        return out
    # One i32 array per field, problems end to end (each field's arrays 64-byte
    # aligned); each vertex's fields point at its slices (byte addresses into one
    # aligned buffer).
    lengths = np.array([[len(a[0])] * 4 + [len(a[4]), len(a[5]), len(a[6]), len(a[0]), len(a[0]), len(a[0])]
                        for a in args], np.int64)                       # (problems, fields)
    firsts = np.cumsum(lengths, axis=0) - lengths
    seg = -(-lengths.sum(axis=0) * 4 // 64) * 64                          # bytes per field
    base = np.concatenate(([0], np.cumsum(seg)))
    mem = aligned_zeros(int(base[-1]) + 8 * len(native) + 64)
    for f in range(8):                                # the inputs: size .. order
        words = mem[base[f]:base[f] + seg[f]].view(np.int32)
        words[:int(lengths[:, f].sum())] = np.concatenate([a[f if f < 7 else 7] for a in args])
    top_at = int(base[-1]) + 8 * np.arange(len(native))
    table = np.empty((len(native), len(_FIELDS) + 4), np.int64)
    for f in range(len(_FIELDS)):
        table[:, f] = base[f] + firsts[:, f] * 4
    table[:, len(_FIELDS)] = top_at
    table[:, len(_FIELDS) + 1:] = lengths[:, [0, 4, 5]]                  # symbols n, p, m
    cycles = np.zeros(len(native), np.int64)
    run = _native().run
    try:
        _on_threads(lambda a, b: run("BestFit", mem, table, a, b, cycles), _shares(lengths[:, 0]))
    except VertexError as e:          # the codelet is ours: a failure is a compiler bug
        raise AssertionError(f"BestFit failed: {e}") from None
    offs = mem[base[8]:base[8] + seg[8]].view(np.int32).astype(np.int64)
    tops = mem.view(np.int32)[top_at // 4]
    for j, k in enumerate(native):
        out[k] = (offs[firsts[j, 8]:firsts[j, 8] + lengths[j, 8]], int(tops[j]))
    return out


def more_orders(sizes: np.ndarray, starts: np.ndarray, ends: np.ndarray, lives: Lives) -> list[np.ndarray]:
    """Placement orders beyond the two every problem gets (by size, by lifetime),
    for the few tiles whose plan decides whether a step fits at all: greedy by
    breadth (TFLite's arena planner: allocations live at the busiest program
    points first, the largest first), by start, by end, by size x lifetime, and
    by size with ties and near-ties broken at random (seeded: a compile is
    reproducible)."""
    n = len(sizes)
    per = np.repeat(sizes, np.diff(lives.ptr))
    points = int(lives.iend.max()) + 2 if n else 1
    live = np.zeros(points, np.int64)
    np.add.at(live, lives.istart, per)
    np.add.at(live, lives.iend + 1, -per)
    breadth = np.cumsum(live)
    # The busiest point of each allocation's lives (each has at least one interval).
    peak = np.maximum.reduceat(_range_max(breadth, lives.istart, lives.iend), lives.ptr[:-1]) if n \
        else np.zeros(0, np.int64)
    span = lives.length() - 1
    out = [np.lexsort((starts, -sizes, -peak)), np.lexsort((starts, -span, -peak)),
           np.lexsort((-sizes, starts)), np.lexsort((-sizes, -ends)), np.lexsort((starts, -(sizes * (span + 1))))]
    rng = np.random.default_rng(0)
    out += [np.lexsort((starts, -(sizes * (1 + 0.25 * rng.random(n))))) for _ in range(4)]
    return out


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo[i]:hi[i] + 1]) for each i (a sparse table: O(len log len) to
    build, two lookups a query)."""
    table = [values]
    while (1 << len(table)) <= len(values):
        half = 1 << (len(table) - 1)
        table.append(np.maximum(table[-1][:-half], table[-1][half:]))
    level = np.floor(np.log2(np.maximum(hi - lo + 1, 1))).astype(np.int64)
    out = np.empty(len(lo), values.dtype)
    for k in unique(level).tolist():
        m = level == k
        out[m] = np.maximum(table[k][lo[m]], table[k][hi[m] - (1 << k) + 1])
    return out


# Below this much work (allocations squared, summed) a thread costs more than it
# saves: ResNet-50's forward plan is about 10^8, its training step's 10^10.
PARALLEL_MIN_WORK = 50_000_000


def _threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:                      # (not on Linux)
        return max(1, min(8, os.cpu_count() or 1))


def _shares(n: np.ndarray) -> np.ndarray:
    """Problems (rows, in order) cut into contiguous ranges of about equal work, one
    per thread: a problem's placement loop scans the allocations placed before
    each, so its work grows as its allocations squared.  Bounds, first to last."""
    work = np.cumsum(n.astype(np.float64) ** 2)
    parts = _threads() if work.size and work[-1] >= PARALLEL_MIN_WORK else 1
    cuts = np.searchsorted(work, work[-1] * np.arange(1, parts) / parts) if parts > 1 else []
    return unique(np.concatenate(([0], cuts, [len(n)]))).astype(int)


def _on_threads(run, bounds: np.ndarray) -> None:
    """`run(begin, end)` over each range of rows: the first on this thread, the
    others on a pool (a native call lets go of the interpreter's lock), so the
    problems of a large plan are solved on every core."""
    ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    if len(ranges) == 1:
        run(*ranges[0])
        return
    with ThreadPoolExecutor(len(ranges) - 1) as pool:
        rest = [pool.submit(run, a, b) for a, b in ranges[1:]]
        run(*ranges[0])
        for f in rest:
            f.result()
