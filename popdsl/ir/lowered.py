"""Vertex graph IR: what lowering produces and memory planning consumes.

Every tensor is split into one region per tile it is mapped to; every vertex is a row
of its codelet's table whose field addresses are (region, byte offset) pairs; the
element copies a compute set or the program needs are runs of bytes between regions.
Regions have sizes and tiles here; `passes.memplan` gives them offsets.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import executable as X
from popdsl.ir import graph as g


@dataclass(eq=False)
class CopyElems:
    """Copies as runs of contiguous bytes: (src_region, src_off, dst_region, dst_off,
    nbytes) arrays.  `add` takes element lists and merges neighbours into runs at
    once, so a slab of a million elements costs a few hundred runs."""
    parts: list[tuple[np.ndarray, ...]] = field(default_factory=list)

    def add(self, es: int, sr, so, dr, do) -> None:
        sr = np.asarray(sr, np.int32).ravel()
        so = np.asarray(so, np.int64).ravel()
        dr = np.asarray(dr, np.int32).ravel()
        do = np.asarray(do, np.int64).ravel()
        n = sr.size
        if not n:
            return
        brk = (sr[1:] != sr[:-1]) | (dr[1:] != dr[:-1]) | (so[1:] != so[:-1] + es) | (do[1:] != do[:-1] + es)
        starts = np.concatenate(([0], np.nonzero(brk)[0] + 1))
        nbytes = np.diff(np.append(starts, n)) * es
        self.parts.append((sr[starts], so[starts], dr[starts], do[starts], nbytes.astype(np.int64)))

    def merged(self) -> tuple[np.ndarray, ...]:
        if not self.parts:
            return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                    np.zeros(0, np.int64), np.zeros(0, np.int64))
        return tuple(np.concatenate([p[k] for p in self.parts]) for k in range(5))

    def nbytes(self) -> int:
        return int(sum(p[4].sum() for p in self.parts))


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


@dataclass(eq=False)
class Lowered:
    graph: g.TensorGraph
    region_tile: list[int] = field(default_factory=list)
    region_size: list[int] = field(default_factory=list)
    region_cs: list[int] = field(default_factory=list)        # -1: lives for the whole program
    region_label: list[tuple[str, Span]] = field(default_factory=list)
    region_tensor: list[int] = field(default_factory=list)     # -1: an exchange buffer
    elem_region: dict[int, np.ndarray] = field(default_factory=dict)
    elem_off: dict[int, np.ndarray] = field(default_factory=dict)
    compute_sets: list[LoweredCS] = field(default_factory=list)
    copies: list[CopyElems] = field(default_factory=list)
    reads: list[tuple[str, str, int, np.ndarray]] = field(default_factory=list)
    program: X.PSeq = X.PSeq(())
    outputs: dict[str, int] = field(default_factory=dict)
    tensor_region_tile: np.ndarray | None = None

    def new_region(self, tile: int, size: int, cs: int, label: str, span: Span, tensor: int = -1) -> int:
        self.region_tensor.append(tensor)
        self.region_tile.append(tile)
        self.region_size.append(size)
        self.region_cs.append(cs)
        self.region_label.append((label, span))
        return len(self.region_tile) - 1
