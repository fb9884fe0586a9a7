"""Vertex state on the IPU: the bytes a tile holds for its vertex tables.

Consumed by the memory plan (`passes.memplan`, the vertex-state category) and the
reuse report.  The simulator runs a vertex per worker from host tables of int64
rows (`ir.codelet.table_layout`); what a tile of a real IPU stores is estimated
from those rows here, as PopLibs lays its vertices out.

PopLibs does not give each worker its own vertex: an element-wise operation's piece
of a tile is one `MultiVertex` that all six workers run, each finding its slice from
its worker id, and a convolution's is one supervisor vertex handing its workers
their parts from a worklist.  Likewise here: a tile's vertices of one codelet table
(one compute set, one class of shapes) are one multi-vertex per `workers` of them,
whose state holds each column as

- one word when its workers agree (a shared weight block's pointer, a size, a
  kernel's stride),
- two words (a base and a step) for a pointer whose values are an arithmetic
  progression in the workers' order within one region — advancing by a slice's
  bytes, as a MultiVertex derives its worker's slice from the worker id,
- otherwise one word per worker (a worklist entry each),

and one word for the number of workers when there are several — or, where that is
less, a vertex per worker with its whole row (two vertices of few columns).  A word is
`STATE_WORD_BYTES`: a pointer, a count or a scalar (Poplar's SPAN layout).  A table
whose vertices are one per tile costs what it did counted per vertex.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir.codelet import STATE_WORD_BYTES


def state_bytes(table: np.ndarray, tiles: np.ndarray, ntiles: int, workers: int, addresses: np.ndarray,
                region: np.ndarray | None = None) -> np.ndarray:
    """Vertex-state bytes per tile (ntiles,) of one vertex table: `table` rows
    (nv, columns), `tiles` (nv,); `addresses` (columns,) marks the pointer columns.
    `region` (same shape as table) says which region a pointer points into, a
    progression staying in one (None: the table holds absolute addresses)."""
    tiles = np.asarray(tiles, np.int64)
    n = tiles.size
    if n == 0:
        return np.zeros(ntiles, np.int64)
    order = np.argsort(tiles, kind="stable")
    t = tiles[order]
    # Multi-vertices: each tile's rows in table order, `workers` at a time.
    new_tile = np.ones(n, bool)
    new_tile[1:] = t[1:] != t[:-1]
    first = np.flatnonzero(new_tile)
    pos = np.arange(n) - np.repeat(first, np.diff(np.append(first, n)))
    starts = new_tile | (pos % workers == 0)
    cs = np.flatnonzero(starts)
    k = np.diff(np.append(cs, n))
    cross = np.append(starts[1:], True)
    alone = k == 1
    addresses = np.asarray(addresses, bool)
    words = (k > 1).astype(np.int64)
    # A column whose every row holds the same value (and points into the same
    # region) agrees in every multi-vertex: one word each.  Most columns are such
    # (sizes, strides, shared blocks: 11,351 of 16,079 in a ResNet-50 training step).
    steady = table.min(axis=0) == table.max(axis=0)
    if region is not None:
        steady &= region.min(axis=0) == region.max(axis=0)
    words += int(steady.sum())
    # The others a column at a time (a batch-32 training step has tables of
    # millions of rows).
    for c in np.flatnonzero(~steady).tolist():
        # The differences between a multi-vertex's consecutive rows; one that
        # would cross into the next multi-vertex is replaced by its own first one,
        # neutral for the min and max below (a lone row is all agreement).
        col = np.asarray(table[:, c], np.int64)[order]
        diff = np.zeros(n, np.int64)
        diff[:-1] = col[1:] - col[:-1]
        diff[cross] = np.repeat(diff[cs], k)[cross]
        lo = np.minimum.reduceat(diff, cs)
        same = lo == np.maximum.reduceat(diff, cs)
        if region is not None:          # a pointer into another region neither agrees nor steps
            reg = np.asarray(region[:, c])[order]
            moved = np.zeros(n, bool)
            moved[:-1] = reg[1:] != reg[:-1]
            moved[cross] = False
            same &= ~np.logical_or.reduceat(moved, cs)
        agree = (same & (lo == 0)) | alone
        words += np.where(agree, 1, np.where(same & addresses[c], 2, k))
    words = np.minimum(words, k * table.shape[1])       # two small vertices may be cheaper
    return np.bincount(t[cs], weights=words * STATE_WORD_BYTES, minlength=ntiles).astype(np.int64)
