"""Liveness: when each memory region is live, over the linearised program.

Requires a `Lowered` graph; produces, per region, a live interval [start, end] of
program points.  Every action (a compute set's execution with its exchange, a copy,
a read by `print`, `while` or `if`) is one point in program order; both arms of an
`if` are laid out one after the other.  A region is live from its first access to
its last; one used inside a loop and also outside it stays live for the whole loop
(it carries values between iterations); a loop runs its body again, so nothing
inside it dies before the loop's end if it was live at the loop's start.

Always live: variables, inputs and parameters (the host and later steps see them).
Results read as outputs live until the end of the step.

A function's regions (passes.outline: the tensors its build made, the exchange
buffers of its compute sets) hold nothing from one call to the next: each call
copies its parameters in and its results out.  They are live during each call
only: `calls` gives the interval of every call, `call_end` the end of the first
(the same in every call, relative to its start: memplan's lifetime key).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.lowered import Lowered
from popdsl.ir import executable as X
from popdsl.ir.index import unique

ALWAYS_LIVE_KINDS = ("var", "input", "param")


@dataclass(eq=False)
class Liveness:
    start: np.ndarray          # int64 per region
    end: np.ndarray            # int64 per region, inclusive
    points: int                # number of program points
    labels: list[str]          # what happens at each point
    always: np.ndarray         # bool per region: live for the whole program
    cs_points: dict[int, list[int]]   # compute set index -> the points where it executes
    function: np.ndarray = None       # int64 per region: the function it belongs to, or -1
    call_end: np.ndarray = None       # int64 per region: the end of its first call's use (else end)
    # Per call of a function region: (region, start, end)
    calls: tuple[np.ndarray, np.ndarray, np.ndarray] = None
    untouched: np.ndarray = None      # bool per region: no action touches it

    def intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(region, start, end) of every interval a region is live in: one per
        region, one per call for a function's regions."""
        one = np.nonzero(self.function < 0)[0]
        r, s, e = self.calls
        return (np.concatenate([one, r]), np.concatenate([self.start[one], s]),
                np.concatenate([self.end[one], e]))


def region_functions(low: Lowered) -> np.ndarray:
    """The function (index into graph.function_summary) each region belongs to, or -1."""
    n = len(low.region_tile)
    out = np.full(n, -1, np.int64)
    tensor = np.asarray(low.region_tensor, np.int64)
    rcs = np.asarray(low.region_cs, np.int64)
    cs_index = {cs.name: i for i, cs in enumerate(low.compute_sets)}
    # Per tensor and per compute set first (a later function's claim wins), then
    # one gather per region.
    of_tensor = np.full(len(low.graph.tensors), -1, np.int64)
    of_cs = np.full(len(low.compute_sets) + 1, -1, np.int64)     # the last: no compute set (-1)
    for k, f in enumerate(low.graph.function_summary):
        t0, t1 = f["tensors"]
        of_tensor[t0:t1] = k
        of_cs[[cs_index[c] for c in f["compute_sets"]]] = k
    mine = tensor >= 0
    out[mine] = of_tensor[tensor[mine]]
    out[~mine] = of_cs[rcs[~mine]]
    return out


def _cs_regions(cs, n: int) -> np.ndarray:
    """The regions (of `n`) a compute set's vertices and copies touch, sorted."""
    parts = [grp.region[grp.region >= 0] for grp in cs.groups]
    for c in (cs.pre, cs.post):
        for p in c.parts:
            parts += [p[0], p[2]]
    return _distinct(parts, n)


def _distinct(parts: list, n: int) -> np.ndarray:
    """Sorted distinct values of arrays of ids below `n`: a mask over the ids (the
    sort of every run's region was most of liveness on ResNet-50), or a sort where
    they are few against `n` (clearing and scanning a mask of seven million
    regions for each of ResNet-50's compute sets took 1.2 s)."""
    total = sum(p.size for p in parts)
    if total * 16 < n:                    # few ids among many regions: sort them
        return unique(np.concatenate(parts).astype(np.int64, copy=False)) if total else np.zeros(0, np.int64)
    seen = np.zeros(n, bool)
    for p in parts:
        seen[p] = True
    return np.flatnonzero(seen)


def liveness(low: Lowered) -> Liveness:
    n = len(low.region_tile)
    regions: list[np.ndarray] = []
    counts: list[int] = []              # regions touched at each point
    labels: list[str] = []
    loops: list[tuple[int, int]] = []
    cs_points: dict[int, list[int]] = {}
    cs_regions = [_cs_regions(cs, n) for cs in low.compute_sets]
    copy_regions = [_distinct([q for p in c.parts for q in (p[0], p[2])], n) for c in low.copies]
    read_regions = [unique(low.layouts[t].locate(np.asarray(idx).reshape(-1))[0]) for _, _, t, idx in low.reads]

    def touch(rs: np.ndarray, label: str) -> None:
        labels.append(label)
        regions.append(rs)
        counts.append(rs.size)

    def walk(p: X.PSeq) -> None:
        for node in p.body:
            if isinstance(node, X.PExecute):
                cs_points.setdefault(node.cs, []).append(len(labels))
                touch(cs_regions[node.cs], f"execute {low.compute_sets[node.cs].name}")
            elif isinstance(node, X.PCopy):
                touch(copy_regions[node.copy], "copy")
            elif isinstance(node, X.PPrint):
                touch(read_regions[node.read], f"print {low.reads[node.read][0]}")
            elif isinstance(node, X.PRepeat):
                a = len(labels)
                walk(node.body)
                if len(labels) > a:
                    loops.append((a, len(labels) - 1))
            elif isinstance(node, X.PWhile):
                a = len(labels)
                touch(read_regions[node.cond], "while condition")
                walk(node.body)
                loops.append((a, len(labels) - 1))
            elif isinstance(node, X.PIf):
                touch(read_regions[node.cond], "if condition")
                walk(node.then)
                walk(node.orelse)
            elif isinstance(node, X.PSeq):
                walk(node)
            else:
                raise AssertionError(f"unhandled program node {node!r}")

    walk(low.program)
    end_point = len(labels)
    touch(unique(np.concatenate([read_regions[r] for r in low.outputs.values()]))
          if low.outputs else np.zeros(0, np.int64), "outputs read by the host")
    start = np.full(n, np.iinfo(np.int64).max)
    end = np.full(n, -1, np.int64)
    r = np.concatenate(regions).astype(np.int64, copy=False) if regions else np.zeros(0, np.int64)
    t = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    np.minimum.at(start, r, t)
    np.maximum.at(end, r, t)
    untouched = end < 0
    start[untouched], end[untouched] = 0, 0
    # Loops, innermost first (they were appended when they closed).
    for a, b in loops:
        inside = (start <= b) & (end >= a)
        crossing = inside & ((start < a) | (end > b))
        start[crossing] = np.minimum(start[crossing], a)
        end[crossing] = np.maximum(end[crossing], b)
    tensor_always = np.array([t.kind in ALWAYS_LIVE_KINDS for t in low.graph.tensors] + [False], bool)
    always = tensor_always[np.asarray(low.region_tensor, np.int64)]       # -1 (a buffer): the False at the end
    start[always] = 0
    end[always] = end_point
    function = region_functions(low)
    call_end = end.copy()
    calls = _calls(low, function, r, t, cs_points)
    touched = np.zeros(n, bool)
    touched[calls[0]] = True
    function[(function >= 0) & ~touched] = -1      # never used: an ordinary region
    first = np.unique(calls[0], return_index=True)[1]
    call_end[calls[0][first]] = calls[2][first]
    return Liveness(start, end, end_point + 1, labels, always, cs_points, function, call_end, calls, untouched)


def _calls(low: Lowered, function: np.ndarray, r: np.ndarray, t: np.ndarray, cs_points):
    """(region, start, end) per call of each function region, from its touches:
    every call touches a function's region at the same points of the body, so a
    region touched k times by c calls is touched k / c times in each."""
    sel = (function >= 0)[r]          # a gather from a bool per region: 8× less to read
    rr, tt = r[sel], t[sel]
    if not rr.size:
        z = np.zeros(0, np.int64)
        return z, z, z
    # (region, point) sorted as one key: one sort, where a lexsort makes two.
    shift = int(tt.max()).bit_length()
    key = np.sort((rr << shift) | tt)
    rr, tt = key >> shift, key & ((1 << shift) - 1)
    # Sorted already: each region's touches start where the region changes.
    first = np.flatnonzero(np.r_[True, rr[1:] != rr[:-1]])
    regs, counts = rr[first], np.diff(np.append(first, rr.size))
    cs_index = {cs.name: i for i, cs in enumerate(low.compute_sets)}
    per_fn = np.asarray([len(cs_points.get(cs_index[f["compute_sets"][0]], ())) for f in low.graph.function_summary],
                        np.int64)
    ncalls = per_fn[function[regs]]
    m = counts // ncalls
    assert (m * ncalls == counts).all() and (m > 0).all(), "a function's region touched unevenly by its calls"
    rep = np.repeat(np.arange(regs.size), ncalls)
    k = np.arange(rep.size) - np.repeat(np.cumsum(ncalls) - ncalls, ncalls)
    at = first[rep] + k * m[rep]
    return regs[rep], tt[at], tt[at + m[rep] - 1]
