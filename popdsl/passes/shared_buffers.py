"""Buffers shared by a compute set's vertices that read the same runs of a tensor.

Requires a field's vertices that need a buffer (their runs of the tensor as
`ptr`, `rs`, `rl`, in tile order); produces which of them own a buffer and which
buffer each reads (`shared_buffers`), and a compute set's registry of the buffers
read from one tensor, which a later group's vertices reading exactly a registered
buffer's runs on its tile read too (`Registry`).  Either way the exchange brings
those bytes to the tile once: a matmul's workers share their block of b, a
convolution's tasks on one tile their weight block.  Runs are matched by a hash
(`run_keys`), then checked exactly (`same_runs`).  Used by `passes.lower`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from popdsl.ir.index import ramps, unique


def run_keys(tiles: np.ndarray, ptr, rs, rl, rows: np.ndarray):
    """Per vertex of `rows`: a key hashing its tile, run count and runs (equal runs
    on one tile give equal keys; callers check a match exactly) and its run count."""
    counts = (ptr[rows + 1] - ptr[rows]).astype(np.int64)
    idx = np.repeat(ptr[rows], counts) + ramps(counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    mix = (rs[idx] * np.int64(0x9E3779B1) + rl[idx] * np.int64(0x85EBCA77)) ^ ramps(counts)
    h = np.add.reduceat(mix, np.minimum(starts, max(idx.size - 1, 0))) if idx.size else np.zeros(len(rows), np.int64)
    h = np.where(counts > 0, h, 0)
    key = h * np.int64(0x5851F42D) + counts * np.int64(0x14057B7E) + tiles.astype(np.int64) * np.int64(0x2545F491)
    return key, counts


class RunKeys(NamedTuple):
    """Vertices' tiles with their `run_keys`, hashed once per field: the field's
    buffers are matched within the group, against the compute set's registry and
    then registered, each on a subset of the same vertices."""
    tiles: np.ndarray
    key: np.ndarray
    counts: np.ndarray

    @staticmethod
    def of(tiles, ptr, rs, rl, rows) -> "RunKeys":
        return RunKeys(tiles, *run_keys(tiles, ptr, rs, rl, rows))

    def subset(self, sel: np.ndarray) -> "RunKeys":
        """The same keys for vertices `sel` (indices into these)."""
        return RunKeys(self.tiles[sel], self.key[sel], self.counts[sel])


def same_runs(rs_a, rl_a, idx_a, rs_b, rl_b, idx_b, starts) -> np.ndarray:
    """Per vertex (runs of equal counts, at idx_a and idx_b): are all runs equal?"""
    if not idx_a.size:
        return np.ones(len(starts), bool)
    same = (rs_a[idx_a] == rs_b[idx_b]) & (rl_a[idx_a] == rl_b[idx_b])
    empty = np.diff(np.append(starts, idx_a.size)) == 0
    return np.logical_and.reduceat(same, np.minimum(starts, idx_a.size - 1)) | empty


def shared_buffers(keys: "RunKeys | None", ptr, rs, rl, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices needing a buffer for a field (`rows`, in tile order, with their
    `keys`; None when the field is written) → (indices of those owning a buffer, per
    vertex the index of the buffer it uses among them).  Vertices of one tile
    reading the same runs share one buffer, so the exchange brings those bytes once
    (a matmul's workers share their block of b).  Buffers that are written are never
    shared."""
    k = np.arange(len(rows))
    if keys is None or len(rows) < 2 or unique(keys.tiles).size == len(rows):
        return k, k
    # Two vertices share when tile, run count and every run agree (checked exactly
    # after grouping by a hash).
    tiles, key, counts = keys.tiles, keys.key, keys.counts
    _, own, share = np.unique(key, return_index=True, return_inverse=True)
    share = share.reshape(-1)
    # Exact check against the owner; a hash collision gets a buffer of its own.
    owner = own[share]
    agree = (tiles == tiles[owner]) & (counts == counts[owner])
    o_idx = np.repeat(ptr[rows[owner]], np.where(agree, counts, 0)) + ramps(np.where(agree, counts, 0))
    mine = np.repeat(ptr[rows], np.where(agree, counts, 0)) + ramps(np.where(agree, counts, 0))
    agree &= same_runs(rs, rl, mine, rs, rl, o_idx, np.concatenate(([0], np.cumsum(np.where(agree, counts, 0))[:-1])))
    owner = np.where(agree, owner, k)
    own = unique(owner)
    rank = np.searchsorted(own, owner)
    return own, rank


class Registry:
    """The buffers of one compute set that vertices read one tensor through, across
    its groups: a later group's vertex reading exactly the runs of a registered
    buffer on its tile reads that buffer (the exchange brings the bytes once)."""

    def __init__(self):
        self.keys = np.zeros(0, np.int64)          # sorted
        self.order = np.zeros(0, np.int64)         # registered index of each sorted key
        self.tiles = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.bufs = np.zeros(0, np.int64)
        self.rs = np.zeros(0, np.int64)
        self.rl = np.zeros(0, np.int64)
        self.first = np.zeros(0, np.int64)         # each buffer's runs start here in rs/rl

    def find(self, keys: RunKeys, ptr, rs, rl, rows) -> np.ndarray:
        """Per vertex of `rows` (with their `keys`): a registered buffer holding
        exactly its runs, or -1."""
        if not len(self.bufs) or not len(rows):
            return np.full(len(rows), -1, np.int64)
        tiles, key, counts = keys.tiles, keys.key, keys.counts
        at = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        hit = np.where(self.keys[at] == key, self.order[at], -1)
        ok = (hit >= 0)
        ok[ok] = (self.tiles[hit[ok]] == tiles[ok]) & (self.counts[hit[ok]] == counts[ok])
        found = np.nonzero(ok)[0]
        if found.size:
            c = counts[found]
            mine = np.repeat(ptr[rows[found]], c) + ramps(c)
            theirs = np.repeat(self.first[hit[found]], c) + ramps(c)
            ok[found] = same_runs(rs, rl, mine, self.rs, self.rl, theirs, np.concatenate(([0], np.cumsum(c)[:-1])))
        return np.where(ok, self.bufs[np.maximum(hit, 0)], -1)

    def add(self, keys: RunKeys, ptr, rs, rl, rows, bufs) -> None:
        tiles, key, counts = keys.tiles, keys.key, keys.counts
        idx = np.repeat(ptr[rows], counts) + ramps(counts)
        n0 = len(self.bufs)
        self.first = np.concatenate([self.first, len(self.rs) + np.concatenate(([0], np.cumsum(counts)[:-1]))])
        self.rs = np.concatenate([self.rs, rs[idx]])
        self.rl = np.concatenate([self.rl, rl[idx]])
        self.tiles = np.concatenate([self.tiles, tiles.astype(np.int64)])
        self.counts = np.concatenate([self.counts, counts])
        self.bufs = np.concatenate([self.bufs, np.asarray(bufs, np.int64)])
        # Merged into the sorted keys (after equal ones, as a stable sort of all
        # would put them), not sorted again with them.
        new = np.argsort(key, kind="stable")
        at = np.searchsorted(self.keys, key[new], side="right")
        self.keys = np.insert(self.keys, at, key[new])
        self.order = np.insert(self.order, at, n0 + new)
