"""Greedy best fit of allocations into one tile's memory, for many tiles at once.

Requires allocations per problem (sizes, alignments, live intervals [start, end]
and the order to place them in); produces each allocation's offset and the
problem's top.  Used by `memplan`, one problem per distinct tile layout.

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

import numpy as np

# Scanning the placed allocations in offset order keeps `cursor`, the first free
# byte above every conflicting allocation seen so far, so the gap below conflict j
# is off[j] - align_up(cursor).  `byoff` lists the placed allocations by offset
# (equal offsets by index, as numpy's stable sort has them).
SOURCE = """
codelet BestFit(in size: i32[n], in align: i32[n], in start: i32[n], in end: i32[n],
                in order: i32[n], out off: i32[n], inout byoff: i32[n], out top: i32) {
    var placed = 0;
    var peak = 0;
    for q in 0..n {
        let i = order[q];
        let s = size[i];
        let a = align[i];
        var cursor = 0;
        var best = -1;
        var bestgap = 0;
        for r in 0..placed {
            let j = byoff[r];
            if start[j] <= end[i] && end[j] >= start[i] {
                let at = (cursor + a - 1) / a * a;
                let gap = off[j] - at;
                if gap >= s && (best < 0 || gap < bestgap) {
                    best = at;
                    bestgap = gap;
                }
                cursor = max(cursor, off[j] + size[j]);
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
_FIELDS = ("size", "align", "start", "end", "order", "off", "byoff")
# i32 arithmetic in the codelet: problems whose bytes could reach 2**31 use numpy.
_LIMIT = 1 << 30


def best_fit(sizes: np.ndarray, aligns: np.ndarray, starts: np.ndarray, ends: np.ndarray,
             order: np.ndarray) -> tuple[np.ndarray, int]:
    """Offsets for allocations placed in `order`, each into the smallest gap among
    the already placed allocations whose lifetimes overlap it (or on top)."""
    n = len(sizes)
    off = np.zeros(n, np.int64)
    placed = np.zeros(n, bool)
    top = 0
    for i in order.tolist():
        size, a = int(sizes[i]), int(aligns[i])
        idx = np.nonzero(placed & (starts <= ends[i]) & (ends >= starts[i]))[0]
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


@functools.cache
def _native():
    from popdsl.codegen.jit import NativeCodelets
    from popdsl.sema import compile_codelets
    return NativeCodelets(compile_codelets(SOURCE, "<bestfit>"))


def best_fit_many(problems: list[tuple[np.ndarray, ...]]) -> list[tuple[np.ndarray, int]]:
    """`best_fit` of every (sizes, aligns, starts, ends, order) problem."""
    from popdsl.codegen.jit import aligned_zeros
    from popdsl.ir.errors import VertexError
    out: list = [None] * len(problems)
    native = []
    for k, (sz, ag, s, e, order) in enumerate(problems):
        if len(sz) == 0:
            out[k] = (np.zeros(0, np.int64), 0)
        elif int(sz.sum()) + int(ag.max()) * len(sz) >= _LIMIT or max(int(s.max()), int(e.max())) >= _LIMIT:
            out[k] = best_fit(sz, ag, s, e, order)
        else:
            native.append(k)
    if not native:
        return out
    # One i32 array per field, problems end to end; each vertex's fields point at
    # its slices (byte addresses into one aligned buffer).
    ns = np.array([len(problems[k][0]) for k in native], np.int64)
    first = np.concatenate(([0], np.cumsum(ns)[:-1]))
    total = int(ns.sum())
    seg = -(-total * 4 // 64) * 64                    # bytes per field array
    mem = aligned_zeros(seg * len(_FIELDS) + 8 * len(native) + 64)
    words = mem[:seg * len(_FIELDS)].view(np.int32).reshape(len(_FIELDS), -1)
    for f in range(5):                                # the inputs: size .. order
        words[f, :total] = np.concatenate([problems[k][f] for k in native])
    top_at = seg * len(_FIELDS) + 8 * np.arange(len(native))
    table = np.empty((len(native), len(_FIELDS) + 2), np.int64)
    for f in range(len(_FIELDS)):
        table[:, f] = f * seg + first * 4
    table[:, len(_FIELDS)] = top_at
    table[:, len(_FIELDS) + 1] = ns
    cycles = np.zeros(len(native), np.int64)
    try:
        _native().run("BestFit", mem, table, 0, len(native), cycles)
    except VertexError as e:          # the codelet is ours: a failure is a compiler bug
        raise AssertionError(f"BestFit failed: {e}") from None
    offs = words[5, :total].astype(np.int64)
    tops = mem.view(np.int32)[top_at // 4]
    for j, k in enumerate(native):
        out[k] = (offs[first[j]:first[j] + ns[j]], int(tops[j]))
    return out
