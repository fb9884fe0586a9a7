"""Tile mappings as runs of elements, as Poplar keeps them: which tile holds each
element of a tensor, without an array the size of the tensor.

Requires numpy and `ir.index` (views); produces `Mapping`: a tensor's flat elements
cut into runs `[starts[i], starts[i+1])` (the last run ends at `numel`), each on
`tiles[i]` (-1: not mapped yet), adjacent runs on one tile merged.  Assigning tiles to runs of
elements, asking which tile holds given elements and laying the tensor out in
per-tile regions (a tile's elements in flat order, one region per tile) all cost
O(runs), never O(elements).

`Mapping.elements()` gives the tile of every element — the definition the tests
compare with, used only on small tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir import native_runs
from popdsl.ir.index import Strided, as_array, ramps, unique

UNMAPPED = -1


def _coalesce(starts: np.ndarray, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(starts), bool)
    keep[1:] = tiles[1:] != tiles[:-1]
    return starts[keep], tiles[keep]


@dataclass(eq=False)
class Mapping:
    numel: int
    starts: np.ndarray          # int64, ascending, starts[0] == 0
    tiles: np.ndarray           # int32 per run

    @staticmethod
    def unmapped(numel: int) -> "Mapping":
        return Mapping(int(numel), np.zeros(1, np.int64), np.full(1, UNMAPPED, np.int32))

    @staticmethod
    def from_elements(tile_of: np.ndarray) -> "Mapping":
        """From a tile per element (small tensors, tests)."""
        tile_of = np.asarray(tile_of, np.int32).reshape(-1)
        if not tile_of.size:
            return Mapping.unmapped(0)
        starts = np.concatenate(([0], np.nonzero(tile_of[1:] != tile_of[:-1])[0] + 1)).astype(np.int64)
        return Mapping(tile_of.size, starts, tile_of[starts].copy())

    def copy(self) -> "Mapping":
        return Mapping(self.numel, self.starts.copy(), self.tiles.copy())

    # ---------------------------------------------------------------- questions
    @property
    def ends(self) -> np.ndarray:
        return np.append(self.starts[1:], self.numel)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def run_of(self, elements) -> np.ndarray:
        """The run holding each element (int64, same shape)."""
        return np.searchsorted(self.starts, np.asarray(elements, np.int64), side="right") - 1

    def tile_of(self, elements) -> np.ndarray:
        return self.tiles[self.run_of(elements)]

    def unmapped_count(self) -> int:
        return int(self.lengths[self.tiles == UNMAPPED].sum())

    def all_mapped(self, start: int, stop: int) -> bool:
        """Every element of [start, stop) mapped (O(runs it spans))."""
        return stop <= start or bool((self.tiles[self.run_of(start):self.run_of(stop - 1) + 1] >= 0).all())

    def fully_mapped(self) -> bool:
        return not (self.tiles == UNMAPPED).any()

    def used_tiles(self) -> np.ndarray:
        return unique(self.tiles[self.tiles != UNMAPPED])

    def elements(self) -> np.ndarray:
        """The tile of every element (the definition; small tensors only)."""
        return np.repeat(self.tiles, self.lengths)

    # ---------------------------------------------------------------- changes
    def assign(self, starts, lengths, tiles, only_unmapped: bool = False) -> None:
        """Put runs of elements `[starts[k], starts[k] + lengths[k])` on `tiles[k]` (a
        scalar or one per run).  The runs may come in any order and overlap: a later
        run wins over an earlier one, unless `only_unmapped`, where nothing already
        mapped changes and, of overlapping new runs, the first wins."""
        starts = np.asarray(starts, np.int64).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        tiles = np.broadcast_to(np.asarray(tiles, np.int32), starts.shape).reshape(-1)
        keep = lengths > 0
        starts, lengths, tiles = starts[keep], lengths[keep], tiles[keep]
        if not starts.size:
            return
        ends = starts + lengths
        # Every boundary of the old and new runs cuts the elements into segments;
        # each segment takes the tile of the winning run that covers it.
        cuts = unique(np.concatenate((self.starts, starts, ends[ends < self.numel])))
        old = self.tiles[self.run_of(cuts)]
        # Winner per segment: the last new run covering it (or the first, when
        # only_unmapped), found by painting run priorities over segment indices.
        order = np.arange(starts.size) if not only_unmapped else np.arange(starts.size)[::-1]
        first_seg = np.searchsorted(cuts, starts[order])
        last_seg = np.searchsorted(cuts, ends[order]) - 1
        winner = _paint(len(cuts), first_seg, last_seg, order)
        new = np.where(winner >= 0, tiles[np.maximum(winner, 0)], UNMAPPED).astype(np.int32)
        covered = winner >= 0
        if only_unmapped:
            covered &= old == UNMAPPED
        result = np.where(covered, new, old).astype(np.int32)
        self.starts, self.tiles = _coalesce(cuts, result)

    def assign_elements(self, elements, tiles, only_unmapped: bool = False) -> None:
        """Per-element form of `assign`: elements in any order, an element given twice
        takes the later tile (the first, when only_unmapped).  Consecutive elements
        on one tile become one run before they are assigned."""
        elements = np.asarray(elements, np.int64).reshape(-1)
        tiles = np.broadcast_to(np.asarray(tiles, np.int32), elements.shape).reshape(-1)
        if not elements.size:
            return
        order = np.argsort(elements, kind="stable")
        e, t = elements[order], tiles[order]
        dup = e[1:] == e[:-1]
        if dup.any():
            keep = np.ones(e.size, bool)
            if only_unmapped:
                keep[1:] = ~dup
            else:
                keep[:-1] = ~dup
            e, t = e[keep], t[keep]
        brk = np.ones(e.size, bool)
        brk[1:] = (e[1:] != e[:-1] + 1) | (t[1:] != t[:-1])
        first = np.nonzero(brk)[0]
        self.assign(e[first], np.diff(np.append(first, e.size)), t[first], only_unmapped)

    def tiles_at(self, index) -> np.ndarray:
        """The tile of each element of a view's index (a Strided, a Batch or an
        array), in the index's shape."""
        if isinstance(index, Strided) and index.is_whole(self.numel):
            return self.elements().reshape(index.shape)
        return self.tile_of(as_array(index))

    def same(self, other: "Mapping") -> bool:
        """Every element on the same tile (both are kept coalesced)."""
        return self.numel == other.numel and np.array_equal(self.starts, other.starts) \
            and np.array_equal(self.tiles, other.tiles)

    def split(self, starts, lengths) -> tuple[np.ndarray, ...]:
        """Runs of elements cut where the mapping's runs end: (piece start element,
        piece length, index of the run each piece came from, its position in that
        run).  A piece lies on one tile (in one region, contiguous, once laid out)."""
        return self.split_runs(starts, lengths)[:4]

    def split_runs(self, starts, lengths) -> tuple[np.ndarray, ...]:
        """`split`, and the mapping's run each piece lies in: natively for many runs
        (`ir.native_runs`), `split_runs_numpy` being the definition."""
        starts = np.asarray(starts, np.int64).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if starts.size >= native_runs.MIN_RUNS:
            out = native_runs.split_runs(self.starts, self.numel, starts, lengths)
            if out is not None:
                return out
        return self.split_runs_numpy(starts, lengths)

    def split_runs_numpy(self, starts, lengths) -> tuple[np.ndarray, ...]:
        """`split_runs` in numpy: the definition the native kernel is tested against."""
        starts = np.asarray(starts, np.int64).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        first = self.run_of(starts)
        # Only a run that ends past its first mapping run's end needs a second search.
        end = starts + np.maximum(lengths, 1)
        past = end > np.append(self.starts[1:], self.numel)[first]
        last = first
        if past.any():
            last = first.copy()
            last[past] = self.run_of(end[past] - 1)
        if not past.any() and (lengths > 0).all():
            # Every run inside one of the mapping's (the usual case): no cuts.
            return starts, lengths, np.arange(starts.size), np.zeros(starts.size, np.int64), first
        npieces = np.where(lengths > 0, last - first + 1, 0)
        src = np.repeat(np.arange(starts.size), npieces)
        run = np.repeat(first, npieces) + ramps(npieces)
        lo = np.maximum(self.starts[run], np.repeat(starts, npieces))
        hi = np.minimum(self.ends[run], np.repeat(starts + lengths, npieces))
        return lo, hi - lo, src, lo - np.repeat(starts, npieces), run

    # ---------------------------------------------------------------- layout
    def layout(self) -> "Layout":
        """The tensor laid out on its tiles: a tile's elements in flat order, one
        region per tile.  Requires a full mapping."""
        assert self.fully_mapped(), "layout of a tensor not fully mapped"
        lengths = self.lengths
        tiles_used, inverse = np.unique(self.tiles, return_inverse=True)
        # Offset of each run in its tile's region: lengths of the tile's earlier runs.
        order = np.argsort(inverse, kind="stable")
        csum = np.cumsum(lengths[order])
        group_first = np.searchsorted(inverse[order], np.arange(len(tiles_used)))
        before_group = np.concatenate(([0], csum))[group_first]
        run_off = np.empty(len(lengths), np.int64)
        run_off[order] = csum - lengths[order] - before_group[inverse[order]]
        counts = np.bincount(inverse, weights=lengths, minlength=len(tiles_used)).astype(np.int64)
        return Layout(self, tiles_used.astype(np.int32), counts, inverse.astype(np.int32), run_off)


def _paint(nsegs: int, first: np.ndarray, last: np.ndarray, value: np.ndarray) -> np.ndarray:
    """out[s] = the value of the last interval [first, last] (in the order given)
    covering segment s, or -1.  Costs the number of (interval, segment) pairs:
    intervals are usually disjoint, so O(segments)."""
    out = np.full(nsegs, -1, np.int64)
    span = np.maximum(last - first + 1, 0)
    if not span.sum():
        return out
    idx = np.repeat(first, span) + ramps(span)
    rank = np.repeat(np.arange(len(first)), span)
    # The last interval in the given order wins each segment.
    order = np.lexsort((rank, idx))
    idx, vals = idx[order], np.repeat(value, span)[order]
    last_of = np.append(idx[1:] != idx[:-1], True)
    out[idx[last_of]] = vals[last_of]
    return out


@dataclass(eq=False)
class Layout:
    """Where a fully mapped tensor's elements sit: per run its tile's region (an
    index into `tiles`) and its offset (in elements) in that region."""
    mapping: Mapping
    tiles: np.ndarray           # int32: the tiles the tensor uses, ascending
    counts: np.ndarray          # int64: elements on each of those tiles
    run_region: np.ndarray      # int32 per run: index into `tiles`
    run_off: np.ndarray         # int64 per run: element offset in its region

    def locate(self, elements) -> tuple[np.ndarray, np.ndarray]:
        """(region index, element offset in the region) of each element."""
        run = self.mapping.run_of(elements)
        return self.run_region[run], self.run_off[run] + (np.asarray(elements, np.int64) - self.mapping.starts[run])

    def split(self, starts, lengths) -> tuple[np.ndarray, ...]:
        return self.mapping.split(starts, lengths)
