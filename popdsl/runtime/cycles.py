"""The cycle model (DESIGN §3), estimated and saying so.

- A vertex's cycles are counted by its own native code: each straight-line segment
  adds its static cost (popdsl.codegen.cost), loops add per iteration.
- A tile runs its vertices on `workers` barrel-scheduled contexts: one context issues
  every `workers` cycles, so a vertex of C instructions alone takes workers × C
  cycles and a full tile issues one instruction a cycle.  A tile's compute time is
  max(workers × longest vertex, sum of its vertices) — perfect packing.
- Exchange moves `exchange_bytes_per_cycle` bytes per cycle into and out of each tile;
  an exchange phase lasts as long as its busiest tile.  On-tile rearrangement copies
  are charged at the same rate.
- Every compute or exchange phase ends with a sync of `sync_cycles`.
"""
from __future__ import annotations

import numpy as np

from popdsl.runtime.target import Target

ASSUMPTIONS = (
    "vertex cycles: static instruction cost per executed codelet statement (estimated)",
    "tile compute: max(workers x longest vertex, sum of vertex cycles) (perfect packing on {workers} workers)",
    "exchange: {exchange_bytes_per_cycle} B/cycle in and out of each tile; busiest tile sets the phase",
    "sync: {sync_cycles} cycles per compute or exchange phase (assumed)",
    "clock: {clock_ghz:.2f} GHz",
)


def assumptions(target: Target) -> list[str]:
    return [a.format(workers=target.workers, exchange_bytes_per_cycle=target.exchange_bytes_per_cycle,
                     sync_cycles=target.sync_cycles, clock_ghz=target.clock_hz / 1e9) for a in ASSUMPTIONS]


def copy_cycles(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, target: Target) -> tuple[int, int, int]:
    """(cycles, bytes crossing tiles, on-tile bytes) of runs of copies."""
    if not src.size:
        return 0, 0, 0
    tm = target.tile_memory
    st, dt = src // tm, dst // tm
    cross = st != dt
    sent = np.bincount(st[cross], weights=nbytes[cross], minlength=target.tiles)
    recv = np.bincount(dt[cross], weights=nbytes[cross], minlength=target.tiles)
    local = np.bincount(dt[~cross], weights=nbytes[~cross], minlength=target.tiles)
    xbytes = int(nbytes[cross].sum())
    lbytes = int(nbytes[~cross].sum())
    busiest = int(np.max(np.maximum(np.maximum(sent, recv), local)))
    cycles = -(-busiest // target.exchange_bytes_per_cycle) + target.sync_cycles
    return cycles, xbytes, lbytes


def compute_cycles(tiles: np.ndarray, vertex_cycles: np.ndarray, target: Target,
                   order: np.ndarray) -> np.ndarray:
    """Per-tile compute cycles of one compute-set execution (int64, length tiles);
    `order` is the stable argsort of `tiles` (fixed per compute set, so computed once)."""
    total = np.bincount(tiles, weights=vertex_cycles, minlength=target.tiles)
    longest = np.zeros(target.tiles, np.int64)
    if tiles.size:
        st = tiles[order]
        first = np.concatenate(([0], np.nonzero(st[1:] != st[:-1])[0] + 1))
        longest[st[first]] = np.maximum.reduceat(vertex_cycles[order], first)
    return np.maximum(total, target.workers * longest).astype(np.int64)
