"""Greedy best fit of allocations into one tile's memory, for many tiles at once.

Requires allocations per problem (sizes, alignments, live intervals [start, end]
and the order to place them in); produces each allocation's offset and the
problem's top.  Used by `memplan`, one problem per distinct tile layout.  An
allocation may be live in several intervals (a function's region, in each call):
then [start, end] spans them and `lives` lists them (`Lives`); two allocations
conflict when an interval of one overlaps an interval of the other.

`best_fit` (numpy) is the definition.  `best_fit_many` runs the same algorithm
natively (`passes.bestfit_native`), because the placement loop is sequential per
allocation and a Python loop over a ResNet-50's 450,000 allocations took 12 s of
its compile.  Both place allocations in `order`, each into the smallest gap among
the already placed allocations alive at the same time (ties: the lowest such
gap), or on top; their results are equal (tests/test_memplan.py checks it on
random problems).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from popdsl.ir.index import unique
from popdsl.node import node
from popdsl.passes import bestfit_native

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


def best_fit_many(problems: list[tuple]) -> list[tuple[np.ndarray, int]]:
    """`best_fit` of every (sizes, aligns, starts, ends, order[, lives]) problem:
    natively (`bestfit_native`) on every core, the problems cut into ranges of
    about equal work, or by the definition where the kernel cannot."""
    out: list = [None] * len(problems)
    native = []
    for k, p in enumerate(problems):
        sz, ag, s, e, order = p[:5]
        lives = p[5] if len(p) > 5 and p[5] is not None else Lives.one(s, e)
        if len(sz) == 0:
            out[k] = (np.zeros(0, np.int64), 0)
        elif bestfit_native.fits(sz, ag, s, e):
            native.append((k, (sz, ag, s, e, order, lives)))
        else:
            out[k] = best_fit(sz, ag, s, e, order, lives)

    def solve(a: int, b: int) -> None:
        for k, args in native[a:b]:
            out[k] = bestfit_native.best_fit(*args)
    if native:
        _on_threads(solve, _shares(np.array([len(args[0]) for _, args in native], np.int64)))
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
