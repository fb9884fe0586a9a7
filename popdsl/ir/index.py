"""Strided views of a tensor's elements: an offset, a shape and strides, numpy-style,
instead of an array of element indices.

Requires numpy only; produces `Strided` (one view), `Batch` (one view per vertex
of a group: offsets differ, shape and strides are shared) and `RunBatch` (per vertex
of a group, runs of consecutive elements).  A view of a tensor's
flat elements is `offset + Σ i_k · strides[k]` over the index `i` of `shape`: every
slice, integer index, transpose, broadcast and most reshapes of a strided view are
strided again, so the compiler keeps O(rank) numbers where it kept one int64 per
element.  `array()` gives the element indices themselves — the definition the
tests check everything else against — and is used only where a view is small or
irregular.  `runs()` gives the view as contiguous runs of elements, what memory
layout and exchange work with.

Element indices fit in int64; offsets and strides are Python ints here, int64 in
`Batch` arrays.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.node import node


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc if n != 1 else 0)
        acc *= n
    return tuple(reversed(out))


@node
class Strided:
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    # ---------------------------------------------------------------- making
    @staticmethod
    def whole(shape) -> "Strided":
        """All elements of a tensor of `shape`, in order."""
        shape = tuple(int(n) for n in shape)
        return Strided(0, shape, contiguous_strides(shape))

    @staticmethod
    def of(index: np.ndarray) -> "Strided | None":
        """The strided view equal to an index array, or None if it is irregular."""
        index = np.asarray(index)
        if index.size == 0:
            return None
        shape = index.shape
        offset = int(index.flat[0])
        strides = []
        for axis, n in enumerate(shape):
            if n == 1:
                strides.append(0)
                continue
            step = np.take(index, 1, axis=axis).flat[0] - np.take(index, 0, axis=axis).flat[0]
            strides.append(int(step))
        s = Strided(offset, shape, tuple(strides))
        return s if np.array_equal(s.array(), index) else None

    # ---------------------------------------------------------------- properties
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def bounds(self) -> tuple[int, int]:
        """Smallest and largest element index (the view must not be empty)."""
        lo = hi = self.offset
        for n, s in zip(self.shape, self.strides):
            if s > 0:
                hi += (n - 1) * s
            else:
                lo += (n - 1) * s
        return lo, hi

    def is_whole(self, numel: int) -> bool:
        """All `numel` elements of the tensor, in order."""
        return self.size == numel and self.canonical() == Strided.whole((numel,)).canonical()

    # ---------------------------------------------------------------- numpy-style operations
    def __getitem__(self, key):
        """Basic indexing: ints (negative count from the end), slices (any step),
        None (a new axis of size 1) and Ellipsis give a strided view; indexing with
        arrays gives the element array, as numpy's would."""
        if not isinstance(key, tuple):
            key = (key,)
        for k in key:
            if isinstance(k, (np.ndarray, list)):
                return self.array()[key]
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            used = sum(1 for k in key if k is not None and k is not Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - used) + key[i + 1:]
        offset, shape, strides, axis = self.offset, [], [], 0
        for k in key:
            if k is None:
                shape.append(1)
                strides.append(0)
                continue
            if axis >= self.ndim:
                raise IndexError("too many indices for a strided view")
            n, s = self.shape[axis], self.strides[axis]
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                count = len(range(start, stop, step))
                offset += start * s
                shape.append(count)
                strides.append(s * step if count > 1 else 0)
            else:
                k = int(k)
                if not -n <= k < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                offset += (k % n) * s
            axis += 1
        shape += self.shape[axis:]
        strides += self.strides[axis:]
        return Strided(offset, tuple(shape), tuple(strides))

    def transpose(self, perm=None) -> "Strided":
        perm = tuple(reversed(range(self.ndim))) if perm is None else tuple(perm)
        return Strided(self.offset, tuple(self.shape[p] for p in perm), tuple(self.strides[p] for p in perm))

    @property
    def T(self) -> "Strided":
        return self.transpose()

    def broadcast_to(self, shape) -> "Strided":
        """numpy's broadcasting: new leading axes and axes of size 1 get stride 0."""
        shape = tuple(int(n) for n in shape)
        if len(shape) < self.ndim:
            raise ValueError(f"cannot broadcast {self.shape} to {shape}")
        pad = len(shape) - self.ndim
        strides = [0] * pad
        for n, own, s in zip(shape[pad:], self.shape, self.strides):
            if own == n:
                strides.append(s)
            elif own == 1:
                strides.append(0)
            else:
                raise ValueError(f"cannot broadcast {self.shape} to {shape}")
        return Strided(self.offset, shape, tuple(strides))

    def reshape(self, *shape):
        """The same elements in a new shape, as numpy's reshape: a strided view where
        numpy would return a view, the element array where numpy would copy."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        view = self.view_reshape(shape)
        return view if view is not None else self.array().reshape(shape)

    def ravel(self) -> np.ndarray:
        return self.array().reshape(-1)

    def view_reshape(self, shape) -> "Strided | None":
        """The same elements in a new shape, if that needs no copy (numpy's rule,
        ported from its `_attempt_nocopy_reshape`); None otherwise."""
        shape = [int(n) for n in shape]
        size = self.size
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            shape[shape.index(-1)] = size // known if known else 0
        shape = tuple(shape)
        if math.prod(shape) != size:
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        if shape == self.shape:
            return self
        if size == 0:
            return Strided(self.offset, shape, contiguous_strides(shape))
        olddims = [n for n in self.shape if n != 1]
        oldstrides = [s for n, s in zip(self.shape, self.strides) if n != 1]
        newstrides = [0] * len(shape)
        oi, oj, ni, nj = 0, 1, 0, 1
        while ni < len(shape) and oi < len(olddims):
            np_, op = shape[ni], olddims[oi]
            while np_ != op:
                if np_ < op:
                    np_ *= shape[nj]
                    nj += 1
                else:
                    op *= olddims[oj]
                    oj += 1
            for ok in range(oi, oj - 1):
                if oldstrides[ok] != olddims[ok + 1] * oldstrides[ok + 1]:
                    return None
            newstrides[nj - 1] = oldstrides[oj - 1]
            for nk in range(nj - 1, ni, -1):
                newstrides[nk - 1] = newstrides[nk] * shape[nk]
            ni, nj = nj, nj + 1
            oi, oj = oj, oj + 1
        last = newstrides[ni - 1] if ni >= 1 else 1
        for nk in range(ni, len(shape)):
            newstrides[nk] = last
        return Strided(self.offset, shape, tuple(newstrides))

    def canonical(self) -> tuple:
        """The same view with axes of size 1 dropped and axes that continue each other
        merged: two views select the same elements in the same order iff these are
        equal."""
        if self.size == 0:
            return ("empty",)
        merged: list[list[int]] = []
        for n, s in zip(self.shape, self.strides):
            if n == 1:
                continue
            if merged and merged[-1][1] == s * n:
                merged[-1] = [merged[-1][0] * n, s]
            else:
                merged.append([n, s])
        return (self.offset, tuple(n for n, _ in merged), tuple(s for _, s in merged))

    # ---------------------------------------------------------------- elements and runs
    def array(self) -> np.ndarray:
        """The element indices, shaped as the view (the definition of the view)."""
        out = np.full(self.shape, self.offset, np.int64)
        for axis, (n, s) in enumerate(zip(self.shape, self.strides)):
            if s and n > 1:
                shape = [1] * self.ndim
                shape[axis] = n
                out += (np.arange(n, dtype=np.int64) * s).reshape(shape)
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    def runs(self) -> tuple[np.ndarray, int]:
        """The view in order as runs of consecutive elements: (first element of each
        run, run length).  The innermost axes that continue each other with stride
        1 form one run."""
        if self.size == 0:
            return np.zeros(0, np.int64), 0
        offset, shape, strides = self.canonical()
        shape, strides = list(shape), list(strides)
        length = 1
        if shape and strides[-1] == 1:
            length = shape.pop()
            strides.pop()
        starts = Strided(offset, tuple(shape), tuple(strides)).array().reshape(-1)
        return starts, length


@node(eq=False)
class Batch:
    """One strided view per vertex of a group: `offsets[v]` and a shared shape and
    strides (the field's shape).  What a partition rule connects a field of many
    vertices to, in O(vertices) numbers."""
    offsets: np.ndarray          # int64 (nverts,)
    field_shape: tuple[int, ...]
    strides: tuple[int, ...]

    @staticmethod
    def stack(views: list[Strided]) -> "Batch":
        first = views[0]
        assert all(v.shape == first.shape and v.strides == first.strides for v in views), \
            "views of one batch share their shape and strides"
        return Batch(np.fromiter((v.offset for v in views), np.int64, len(views)), first.shape, first.strides)

    @property
    def shape(self) -> tuple[int, ...]:
        """(vertices, *field shape), as a stacked index array's."""
        return (len(self.offsets),) + self.field_shape

    @property
    def ndim(self) -> int:
        return 1 + len(self.field_shape)

    def __len__(self) -> int:
        return len(self.offsets)

    def view(self, v: int) -> Strided:
        return Strided(int(self.offsets[v]), self.field_shape, self.strides)

    def take(self, rows: np.ndarray) -> "Batch":
        return Batch(self.offsets[rows], self.field_shape, self.strides)

    def __getitem__(self, v):
        if isinstance(v, (int, np.integer)):
            return self.view(int(v))
        return self.array()[v]

    def array(self) -> np.ndarray:
        """(nverts, *field shape) element indices."""
        one = Strided(0, self.field_shape, self.strides).array()
        return self.offsets.reshape((-1,) + (1,) * len(self.field_shape)) + one[None]

    def __array__(self, dtype=None, copy=None):
        a = self.array()
        return a if dtype is None else a.astype(dtype)


@node(eq=False)
class RunBatch:
    """Per vertex of a group, its field as runs of consecutive elements: vertex v's
    runs are `starts[ptr[v]:ptr[v+1]]` and `lengths[...]`, in field order.  What an
    element-wise vertex whose elements are spread over a tile's several runs
    connects to, in O(runs) numbers.  `field_shape` is the field's shape when every
    vertex has one ((n,) for element-wise vertices, (rows, n) for a block of rows
    that is no strided view, `ops.blocks.stacked`), None when each vertex has its
    own number of elements (`sizes`, one axis): its codelet's size symbol is then
    bound per vertex."""
    ptr: np.ndarray              # int64 (nverts + 1,)
    starts: np.ndarray           # int64 (runs,)
    lengths: np.ndarray          # int64 (runs,), each > 0
    field_shape: tuple[int, ...] | None

    @property
    def shape(self) -> tuple:
        return (len(self.ptr) - 1,) + (self.field_shape or (None,))

    @property
    def sizes(self) -> np.ndarray:
        """Each vertex's number of elements."""
        if self.field_shape is not None:
            return np.full(len(self), math.prod(self.field_shape), np.int64)
        out = np.zeros(len(self), np.int64)
        np.add.at(out, np.repeat(np.arange(len(self)), np.diff(self.ptr)), self.lengths)
        return out

    @property
    def ndim(self) -> int:
        return 1 + len(self.field_shape or (None,))

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def take(self, rows: np.ndarray) -> "RunBatch":
        rows = np.asarray(rows, np.int64)
        counts = self.ptr[rows + 1] - self.ptr[rows]
        idx = np.repeat(self.ptr[rows], counts) + ramps(counts)
        return RunBatch(np.concatenate(([0], np.cumsum(counts))).astype(np.int64), self.starts[idx],
                        self.lengths[idx], self.field_shape)

    def __getitem__(self, v):
        if isinstance(v, (int, np.integer)):
            a, b = int(self.ptr[v]), int(self.ptr[v + 1])
            return np.repeat(self.starts[a:b], self.lengths[a:b]) + ramps(self.lengths[a:b])
        return self.array()[v]

    def array(self) -> np.ndarray:
        """(nverts, *field shape) element indices (vertices of one size only)."""
        assert self.field_shape is not None, "the vertices' sizes differ: no element array"
        return (np.repeat(self.starts, self.lengths) + ramps(self.lengths)).reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        a = self.array()
        return a if dtype is None else a.astype(dtype)


def unique(values) -> np.ndarray:
    """`np.unique(values)` of integers, its distinct values in order, by a sort.
    numpy 2.4's `np.unique` hashes first and sorts what it found: measured here 30
    to 40 times slower from a million values on (10M: 9.4 s against 0.24 s; numpy's
    sort-based path, taken when it returns indices or counts, is not slowed)."""
    x = np.sort(np.asarray(values), axis=None)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if x.size else x


def ramps(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n of `lengths`, concatenated."""
    lengths = np.asarray(lengths, np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def strided_pieces(view: Strided, starts, lengths) -> tuple[np.ndarray, ...]:
    """The elements a strided view has at runs of its flat positions (`starts`,
    `lengths`), each run cut where they stop being affine in the position: (run
    index, first position, its element, element step, length) per piece.  A view's
    innermost axes that continue each other form one affine block; the runs are cut
    only at those blocks' ends (a per-channel scale broadcast over the pixels: once
    per channel plane)."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    inner, step, outer = 1, 0, []
    merging = True
    for n, st in reversed(list(zip(view.shape, view.strides))):
        if merging and (n == 1 or inner == 1 or st == step * inner):
            step = st if inner == 1 and n > 1 else step
            inner *= n
        else:
            merging = False
            outer.append((n, st))
    if inner == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty, empty
    first_blk = starts // inner
    npieces = np.where(lengths > 0, (starts + lengths - 1) // inner - first_blk + 1, 0)
    src = np.repeat(np.arange(starts.size), npieces)
    blk = np.repeat(first_blk, npieces) + ramps(npieces)
    lo = np.maximum(blk * inner, starts[src])
    hi = np.minimum((blk + 1) * inner, starts[src] + lengths[src])
    elem = view.offset + (lo - blk * inner) * step
    rem = blk
    for n, st in outer:                     # innermost first
        elem = elem + (rem % n) * st
        rem = rem // n
    return src, lo, elem, np.full(src.size, step, np.int64), hi - lo


def affine_rows(index: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """For a stacked index array (vertices, *field shape): strides shared by as many
    vertices as possible, and which vertices' views are strided with them (offset
    `index[v].flat[0]`).  Candidates: the first vertex's strides and, for vectors,
    0 (one element broadcast) and 1 (consecutive) — what a rule's dense
    connections usually are per vertex, even where the whole field is not."""
    if isinstance(index, RunBatch):
        return _affine_runs(index)
    a = np.asarray(index, np.int64)
    nv, shape = a.shape[0], a.shape[1:]
    if not shape:
        return (), np.ones(nv, bool)            # one element: always a view
    if not nv or 0 in shape:
        return (0,) * len(shape), np.zeros(nv, bool)
    base = a.reshape(nv, -1)[:, :1].reshape((nv,) + (1,) * len(shape))
    firsts = []
    for axis, n in enumerate(shape):
        unit = (0,) + tuple(1 if k == axis else 0 for k in range(len(shape)))
        firsts.append(int(a[unit] - a[(0,) * (1 + len(shape))]) if n > 1 else 0)
    candidates = [tuple(firsts)]
    if len(shape) == 1:
        candidates += [c for c in ((0,), (1,)) if c != candidates[0]]
    best, best_ok = candidates[0], None
    for c in candidates:
        one = Strided(0, shape, tuple(s if n > 1 else 0 for s, n in zip(c, shape))).array()
        ok = (a == base + one[None]).reshape(nv, -1).all(axis=1)
        if best_ok is None or ok.sum() > best_ok.sum():
            best, best_ok = tuple(s if n > 1 else 0 for s, n in zip(c, shape)), ok
    return best, best_ok


def _affine_runs(rb: RunBatch) -> tuple[tuple[int, ...], np.ndarray]:
    """`affine_rows` of a RunBatch, from its runs: the same candidates, in the
    same order, and the same choice, without the elements."""
    nv, (n,) = len(rb), rb.field_shape
    if not nv or n == 0:
        return (0,), np.zeros(nv, bool)
    if n == 1:
        return (0,), np.ones(nv, bool)
    counts = np.diff(rb.ptr)
    a0 = int(rb.ptr[0])
    first = 1 if rb.lengths[a0] > 1 else int(rb.starts[a0 + 1] - rb.starts[a0])
    candidates = [first] + [c for c in (0, 1) if c != first]
    single = rb.lengths == 1
    # Runs of one element each, k-th at its vertex's first + c k: stride c.
    vert = np.repeat(np.arange(nv), counts)
    k = ramps(counts)
    firsts = rb.starts[rb.ptr[:-1]]
    best, best_ok = None, None
    for c in candidates:
        if c == 1:
            ok = counts == 1
        else:
            fits = single & (rb.starts == firsts[vert] + c * k)
            ok = np.logical_and.reduceat(fits, rb.ptr[:-1]) & (counts == n)
        if best_ok is None or ok.sum() > best_ok.sum():
            best, best_ok = (c,), ok
    return best, best_ok


# ---------------------------------------------------------------- either kind of index

def as_array(index) -> np.ndarray:
    """The element indices of a strided view, a batch or an index array."""
    return index.array() if isinstance(index, (Strided, Batch, RunBatch)) else np.asarray(index)


def first_elements(index) -> np.ndarray:
    """Each vertex's first element of a stacked connection (a Batch, a RunBatch or
    an index array (vertices, ...)): where its view starts, what a scalar field
    connects to."""
    if isinstance(index, Batch):
        return index.offsets.copy()
    if isinstance(index, RunBatch):
        return index.starts[index.ptr[:-1]].copy()
    a = np.asarray(index, np.int64)
    return a.reshape(len(a), -1)[:, 0].copy()


def take_rows(index, rows: np.ndarray):
    """The vertices `rows` of a stacked connection (a Batch, a RunBatch or an index
    array)."""
    return index.take(rows) if isinstance(index, (Batch, RunBatch)) else np.asarray(index)[rows]


def broadcast_to(index, shape):
    """numpy's broadcast_to, keeping a strided view strided."""
    return index.broadcast_to(shape) if isinstance(index, Strided) else np.broadcast_to(index, shape)


def stack(views: list):
    """Per-vertex views as one connection: a Batch when all are strided alike,
    else a stacked index array (vertices, *shape)."""
    first = views[0]
    if isinstance(first, Strided) and all(isinstance(v, Strided) and v.shape == first.shape
                                          and v.strides == first.strides for v in views):
        return Batch.stack(views)
    return np.stack([as_array(v) for v in views])
