"""Splitting work into blocks and tasks: what the partition rules share.

Requires numpy and the tensor graph IR; produces block ranges, power-of-two split
candidates, and `emit_tasks`, which turns a list of per-vertex tasks into vertex
groups (one group per distinct set of field shapes, stacked index arrays, never an
object per vertex).
"""
from __future__ import annotations

import numpy as np

from popdsl.ir.index import stack

GRAIN = 16                    # fewest elements worth a vertex of element-wise work
SLAB_BYTES = 48 * 1024        # most input data one vertex of a conv or pool may take


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """0..n in `parts` (or fewer) ranges of equal size but the last."""
    size = ceil_div(n, parts)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def pow2_splits(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself: the splits a plan search tries."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def _by_shape(tasks):
    """Group task dicts by the shapes of their index arrays."""
    groups: dict[tuple, list] = {}
    for t in tasks:
        key = tuple((k, v[1].shape, getattr(v[1], "strides", None)) for k, v in sorted(t["conns"].items()))
        groups.setdefault(key, []).append(t)
    return groups.values()


def emit_tasks(p, cs, codelet: str, tasks, state_keys=()) -> None:
    """Vertices of `codelet` in compute set `cs`, one per task: {"tile": t,
    "conns": {field: (tensor, index array)}, "state": {name: value}}."""
    for grp in _by_shape(tasks):
        conns = {f: (grp[0]["conns"][f][0], stack([t["conns"][f][1] for t in grp]))
                 for f in grp[0]["conns"]}
        state = {k: np.asarray([t["state"][k] for t in grp]) for k in state_keys}
        p.group(cs, codelet, [t["tile"] for t in grp], conns, state)
