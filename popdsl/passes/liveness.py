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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.lowered import Lowered
from popdsl.ir import executable as X

ALWAYS_LIVE_KINDS = ("var", "input", "param")


@dataclass(eq=False)
class Liveness:
    start: np.ndarray          # int64 per region
    end: np.ndarray            # int64 per region, inclusive
    points: int                # number of program points
    labels: list[str]          # what happens at each point
    always: np.ndarray         # bool per region: live for the whole program
    cs_points: dict[int, list[int]]   # compute set index -> the points where it executes


def _cs_regions(cs) -> np.ndarray:
    parts = [grp.region[grp.region >= 0] for grp in cs.groups]
    for c in (cs.pre, cs.post):
        for p in c.parts:
            parts += [p[0], p[2]]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def liveness(low: Lowered) -> Liveness:
    n = len(low.region_tile)
    regions: list[np.ndarray] = []
    times: list[np.ndarray] = []
    labels: list[str] = []
    loops: list[tuple[int, int]] = []
    cs_points: dict[int, list[int]] = {}
    cs_regions = [_cs_regions(cs) for cs in low.compute_sets]
    copy_regions = [np.unique(np.concatenate([np.concatenate([p[0], p[2]]) for p in c.parts]))
                    if c.parts else np.zeros(0, np.int64) for c in low.copies]
    read_regions = [np.unique(low.layouts[t].locate(np.asarray(idx).reshape(-1))[0]) for _, _, t, idx in low.reads]

    def touch(rs: np.ndarray, label: str) -> None:
        t = len(labels)
        labels.append(label)
        regions.append(rs.astype(np.int64))
        times.append(np.full(rs.size, t, np.int64))

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
    touch(np.unique(np.concatenate([read_regions[r] for r in low.outputs.values()]))
          if low.outputs else np.zeros(0, np.int64), "outputs read by the host")
    start = np.full(n, np.iinfo(np.int64).max)
    end = np.full(n, -1, np.int64)
    if regions:
        r = np.concatenate(regions)
        t = np.concatenate(times)
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
    kinds = [t.kind for t in low.graph.tensors]
    tensor = np.asarray(low.region_tensor, np.int64)
    always = np.zeros(n, bool)
    is_tensor = tensor >= 0
    always[is_tensor] = [kinds[i] in ALWAYS_LIVE_KINDS for i in tensor[is_tensor].tolist()]
    start[always] = 0
    end[always] = end_point
    return Liveness(start, end, end_point + 1, labels, always, cs_points)
