"""Vertex graph IR: what lowering produces and memory planning consumes.

Every tensor is split into one region per tile it is mapped to; every vertex is a row
of its codelet's table whose field addresses are (region, byte offset) pairs; the
copies a compute set or the program needs are runs of bytes between regions.  All of
it is kept as runs of elements or bytes, never as an array per element.
Regions have sizes and tiles here; `passes.memplan` gives them offsets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import executable as X
from popdsl.ir import graph as g
from popdsl.ir import native_copies, native_runs
from popdsl.ir.mapping import Layout


@dataclass(eq=False)
class CopyElems:
    """Copies as runs of contiguous bytes: (src_region, src_off, dst_region, dst_off,
    nbytes) arrays.  `add_runs` merges a run into the one before it when both ends
    continue it, so a slab copied row by row still costs a few runs.  Offsets and
    lengths are int32 where they fit (they are bytes within one region): a ResNet-50
    training step at batch 8 has 66M runs, its convolutions' windows a run a row."""
    parts: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add_runs(self, sr, so, dr, do, nbytes) -> None:
        sr = np.asarray(sr, np.int32).ravel()
        so = _narrow(so)
        dr = np.asarray(dr, np.int32).ravel()
        do = _narrow(do)
        nb = _narrow(nbytes)
        keep = nb > 0
        if not keep.all():
            sr, so, dr, do, nb = sr[keep], so[keep], dr[keep], do[keep], nb[keep]
        if not sr.size:
            return
        brk = np.ones(sr.size, bool)
        brk[1:] = (sr[1:] != sr[:-1]) | (dr[1:] != dr[:-1]) | (so[1:] != so[:-1] + nb[:-1]) \
            | (do[1:] != do[:-1] + nb[:-1])
        if brk.all():                   # nothing merges: the runs as they are
            self.parts.append((sr, so, dr, do, nb))
            return
        starts = np.nonzero(brk)[0]
        total = _narrow(np.add.reduceat(nb, starts, dtype=np.int64))
        self.parts.append((sr[starts], so[starts], dr[starts], do[starts], total))

    def add_pieces(self, r, off, ln, fp, vert, buf_of, elem_bytes: int, drain: bool) -> None:
        """The runs between a field's pieces of tensor data (region `r`, byte offset
        `off`, `ln` elements, at element `fp` of vertex `vert`'s field) and the
        buffers of the vertices that own one (`buf_of`, per vertex; -1: none, those
        pieces left out): into the buffers, or out of them with `drain`.  Natively
        for many pieces (`native_copies.buffer_runs`, the same parts)."""
        if r.size >= native_copies.MIN_PIECES:
            got = native_copies.buffer_runs(r, off, ln, fp, vert, buf_of, elem_bytes, drain)
            if got is not None:
                (sr, so, dr, do, nb), (so_lo, so_hi, do_lo, do_hi) = got
                # Narrowed as add_runs narrows: offsets by every chosen piece's.
                self.parts.append((sr, _narrow_by(so, so_lo, so_hi), dr, _narrow_by(do, do_lo, do_hi), _narrow(nb)))
            return
        bv = buf_of[vert]
        sel = bv >= 0
        tensor = (r[sel], off[sel])
        buffer = (bv[sel], fp[sel] * elem_bytes)
        src, dst = (buffer, tensor) if drain else (tensor, buffer)
        self.add_runs(*src, *dst, ln[sel] * elem_bytes)

    def merged(self) -> tuple[np.ndarray, ...]:
        """(src_region, src_off, dst_region, dst_off, nbytes): regions int32, the
        rest int64."""
        if not self.parts:
            return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                    np.zeros(0, np.int64), np.zeros(0, np.int64))
        return tuple(np.concatenate([p[k] for p in self.parts]).astype(np.int32 if k in (0, 2) else np.int64,
                                    copy=False) for k in range(5))

    def nbytes(self) -> int:
        return int(sum(p[4].sum() for p in self.parts))


def _narrow(a) -> np.ndarray:
    """`a` as a flat int32 array if every value is below 2^30 (so that an offset
    plus a length cannot overflow), else int64."""
    a = np.asarray(a).ravel()
    return _narrow_by(a, int(a.min()), int(a.max())) if a.size else a.astype(np.int32)


def _narrow_by(a: np.ndarray, least: int, greatest: int) -> np.ndarray:
    """`_narrow` of `a`, whose values (or a wider set's) lie in [least, greatest]."""
    return a.astype(np.int64, copy=False) if least < 0 or greatest >= 1 << 30 else a.astype(np.int32)


@dataclass(eq=False)
class TensorLayout:
    """Where a tensor's elements live after lowering: its mapping laid out per tile
    (`ir.mapping.Layout`), the tile's region being `first + layout's region index`."""
    layout: Layout
    first: int                  # the region of layout.tiles[0]
    elem_bytes: int

    def locate(self, elements) -> tuple[np.ndarray, np.ndarray]:
        """(region, byte offset in it) of each element."""
        r, off = self.layout.locate(elements)
        return self.first + r, off * self.elem_bytes

    def pieces(self, starts, lengths, base: np.ndarray | None = None, tag: np.ndarray | None = None):
        """Runs of elements cut where they change region: (region, byte offset,
        length in elements, index of the run it came from, element position in that
        run) per piece.  `base`, `tag` (per run): added to each piece's position,
        and given instead of the run's index (a vertex's field: the run's position
        in the field, and the vertex)."""
        lay = self.layout
        m = lay.mapping
        starts = np.asarray(starts, np.int64).reshape(-1)
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if starts.size >= native_runs.MIN_RUNS:
            out = native_runs.split_runs(m.starts, m.numel, starts, lengths,
                                         (lay.run_region, lay.run_off, self.first, self.elem_bytes), base, tag)
            if out is not None:
                r, n, src, pos, off = out
                return r, off, n, src, pos
        lo, n, src, pos, run = m.split_runs_numpy(starts, lengths)
        # The run each piece lies in gives its region and offset (no second search).
        r = self.first + lay.run_region[run]
        off = (lay.run_off[run] + (lo - m.starts[run])) * self.elem_bytes
        if base is not None:
            pos = base[src] + pos
        return r, off, n, (src if tag is None else tag[src]), pos


@dataclass(eq=False)
class LoweredGroup:
    codelet: str
    table: np.ndarray           # int64; addr columns hold a byte offset within a region
    region: np.ndarray          # int32, same shape: the region of an addr column, else -1
    tiles: np.ndarray
    span_ids: np.ndarray


@dataclass(eq=False)
class LoweredCS:
    name: str
    span: Span
    groups: list[LoweredGroup]
    pre: CopyElems
    post: CopyElems


_REGION_COLUMNS = ("region_tile", "region_size", "region_cs", "region_tensor")


@dataclass(eq=False)
class Lowered:
    """The vertex graph with every tensor's part on a tile, and every exchange
    buffer, a memory region.  Lowering adds regions in blocks (`add_regions`); once
    it is done (`freeze`) the region columns — tile, size, compute set, tensor —
    are int64 arrays and `region_label` a list."""
    graph: g.TensorGraph
    region_tile: np.ndarray | None = None
    region_size: np.ndarray | None = None
    region_cs: np.ndarray | None = None           # -1: lives for the whole program
    region_label: list[tuple[str, Span]] = field(default_factory=list)
    region_tensor: np.ndarray | None = None       # -1: an exchange buffer
    layouts: dict[int, TensorLayout] = field(default_factory=dict)   # every fully mapped tensor
    mappings: dict = field(default_factory=dict)                       # tensor id -> ir.mapping.Mapping
    compute_sets: list[LoweredCS] = field(default_factory=list)
    copies: list[CopyElems] = field(default_factory=list)
    reads: list[tuple[str, str, int, np.ndarray]] = field(default_factory=list)
    program: X.PSeq = X.PSeq(())
    outputs: dict[str, int] = field(default_factory=dict)
    tensor_region_tile: np.ndarray | None = None    # region -> tile, for the tensors' regions
    only: np.ndarray | None = None                  # bool per tile: only these tiles' vertices lowered
    _blocks: dict = field(default_factory=lambda: {name: [] for name in _REGION_COLUMNS})

    @property
    def regions(self) -> int:
        return len(self.region_label)

    def add_regions(self, tiles, sizes, cs: int, tensor: int, label: tuple[str, Span]) -> int:
        """Regions on `tiles` of `sizes` bytes, all of compute set `cs` (-1: none)
        and `tensor` (-1: exchange buffers), named `label`: the first one's index."""
        first, k = self.regions, len(tiles)
        for name, column in zip(_REGION_COLUMNS, (tiles, sizes, np.full(k, cs), np.full(k, tensor))):
            self._blocks[name].append(np.asarray(column, np.int64))
        self.region_label.extend([label] * k)
        return first

    def freeze(self) -> None:
        """The region columns, with the regions added since, as int64 arrays
        (lowering freezes once the tensors' regions, which vertices index, are
        made, and at its end).  ResNet-50's training step at batch 8 has seven
        million regions: kept as Python lists, each consumer converted them again,
        and they held a GB of Python ints."""
        for name in _REGION_COLUMNS:
            made = getattr(self, name)          # what an earlier freeze made, first
            blocks = ([made] if made is not None else []) + self._blocks[name]
            setattr(self, name, np.concatenate(blocks) if blocks else np.zeros(0, np.int64))
            self._blocks[name] = []
