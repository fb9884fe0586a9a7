"""Splitting work into blocks and tasks: what the partition rules share.

Requires numpy and the tensor graph IR; produces block ranges, power-of-two split
candidates, `split_plan` (the backward convolutions' and poolings' plan search),
and `emit_tasks`, which turns a list of per-vertex tasks into vertex
groups (one group per distinct set of field shapes, stacked index arrays, never an
object per vertex).

The convolution and pooling rules have many tasks (a ResNet-50 forward pass about
50,000): they build them all at once instead, with no Python work per task.  Their
tasks are the cells of nested loops (`task_grid`) over images, groups and blocks;
the blocks of one axis have at most two sizes, so the tasks fall into a few classes
of equal field shapes (`shape_classes`), one vertex group each.  `stacked` gives a
field's connections for a class (what `stack` of the per-task slices would), and
`map_first` maps a tensor the tasks read as per-task `ensure_mapped` calls in task
order would (the first task to want an element keeps it).
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from popdsl.ir.index import Batch, RunBatch, Strided, as_array, ramps, stack
from popdsl.ir.mapping import Mapping

GRAIN = 16                    # fewest elements worth a vertex of element-wise work
SLAB_BYTES = 48 * 1024        # most input data one vertex of a conv or pool may take
# Most bytes the vertices of one convolution may receive on one tile (their exchange
# buffers; a forward convolution's plans prefer it, a gradient's keep to it).  PopLibs caps a convolution's temporary memory at a proportion
# of the tile (availableMemoryProportion, 0.6 by default); a training step also
# keeps weights, optimizer state and activations there, so a fifth of a GC200 tile.
TILE_BUFFER_BYTES = 128 * 1024
# A plan whose fastest choice puts more than this on a tile (exchange buffers and
# outputs: 80 % of a GC200 tile) is chosen for memory instead, as PopLibs does
# when a plan is over its memory target: 1.9 MB of a tile for the fastest plan of
# a stage-4 input gradient at batch 32 on 368 tiles.  Below it plans stay the
# fastest (AlexNet's training step at batch 35 fits with 94 B to spare).
CROWDED_BYTES = 4 * TILE_BUFFER_BYTES
# Most tasks a plan that shares a block over runs of tasks may have, per worker of
# the tiles: each task is a vertex (its vertex state, its exchange), and the
# smallest blocks are the most of them.
RUN_TASKS_PER_WORKER = 8


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


def fallback_rank(p, tasks: int, largest: int) -> tuple[bool, int]:
    """How a plan search ranks plans when none has its fields within SLAB_BYTES:
    the smallest largest field among plans of at most one task per worker, before
    any with more.  Ranked by the field alone, ResNet-50's weight gradient at batch
    32 on 368 tiles split every dimension to one: 235M tasks."""
    return tasks > p.tiles * p.g.target.workers, largest


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


# ---------------------------------------------------------------- all tasks at once

def task_grid(*counts: int) -> list[np.ndarray]:
    """The cells of nested loops `for i0 in range(counts[0]): for i1 in ...`, in loop
    order (the last loop innermost): each loop's index per task."""
    return [a.reshape(-1) for a in np.indices(counts, dtype=np.int64)]


def worker_bands(r0: np.ndarray, r1: np.ndarray, width: int, workers: int, min_band: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split each task's output rows r0..r1 (each `width` wide) over up to `workers`
    vertices on its tile: bands of whole rows, or, when a task has fewer rows than
    workers, each row in bands of at least `min_band` columns.  Returns (task, r0,
    r1, c0, c1) per vertex, a task's vertices consecutive, rows then columns."""
    rows = r1 - r0
    wr = np.minimum(rows, workers)
    # Column bands at least `min_band` wide: a narrower one costs more in overhead
    # than its worker gives.
    bands = np.minimum(width // min_band, -(-workers // np.maximum(rows, 1)))
    wc = np.where(rows < workers, np.maximum(bands, 1), 1)
    count = wr * wc
    task = np.repeat(np.arange(len(r0), dtype=np.int64), count)
    k = np.arange(len(task), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    kr, kc = k // wc[task], k % wc[task]
    n, bands = rows[task], wc[task]
    parts = wr[task]
    return (task, r0[task] + n * kr // parts, r0[task] + n * (kr + 1) // parts,
            width * kc // bands, width * (kc + 1) // bands)


def bounds(bl: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The starts and stops of block ranges, as arrays indexed by block."""
    a = np.asarray(bl, np.int64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def block_of(bl: list[tuple[int, int]]) -> np.ndarray:
    """For each position 0..n covered by consecutive block ranges, its block."""
    starts, stops = bounds(bl)
    return np.repeat(np.arange(len(bl), dtype=np.int64), stops - starts)


def shape_classes(*sizes: np.ndarray) -> list[np.ndarray]:
    """The tasks with equal block sizes (one size per task for each blocked loop), as
    sorted task indices per class, the classes in the order of their first task:
    what grouping the tasks by their fields' shapes gives when the sizes are in
    those shapes."""
    code = np.zeros(len(sizes[0]), np.int64)
    for s in sizes:
        values, which = np.unique(s, return_inverse=True)
        code = code * len(values) + which.reshape(-1)
    _, first, which = np.unique(code, return_index=True, return_inverse=True)
    which = which.reshape(-1)
    order = np.argsort(which, kind="stable")
    cuts = np.cumsum(np.bincount(which))[:-1]
    per_class = np.split(order, cuts)
    return [per_class[c] for c in np.argsort(first)]


def stacked(index, keys: tuple, shape: tuple):
    """`stack([index[key(v)].reshape(shape) for v in tasks])` for all tasks at once.

    keys: one per leading axis of `index`: an int array (an integer index per
    task), a (starts, stops) pair of int arrays (a slice per task, all of one
    length) or `slice(None)`; at least one is per task.  The result is what the
    per-task slices give, representation included: a Batch where each task's
    view is strided (the first task's slice gives the shape and strides, the
    others only move its offset), else runs per task (a RunBatch) where each task's
    view is runs of several elements of a strided tensor, else the stacked element
    array."""
    nv = len(next(k[0] if isinstance(k, tuple) else k for k in keys if not isinstance(k, slice)))
    pos = index if isinstance(index, Strided) else Strided.whole(np.shape(index))
    first = tuple(k if isinstance(k, slice) else slice(int(k[0][0]), int(k[1][0])) if isinstance(k, tuple)
                  else int(k[0]) for k in keys)
    one = pos[first]
    offsets = np.full(nv, one.offset, np.int64)
    for k, s in zip(keys, pos.strides):
        if isinstance(k, tuple):
            assert np.all(k[1] - k[0] == k[1][0] - k[0][0]), "the slices of one class have one length"
            k = k[0]
        if not isinstance(k, slice) and s:
            offsets += (k - k[0]) * s
    view = one.view_reshape(shape) if isinstance(index, Strided) else None
    if view is not None:
        return Batch(offsets, view.shape, view.strides)
    if isinstance(index, Strided):
        # Runs, not an element each, where a task's view is runs of several elements
        # (a weight gradient's images × channels of whole rows): a training step
        # at batch 8 held 200 MB of such index arrays.
        starts, n = one.runs()
        if n > 1:
            size = one.size
            known = math.prod(d for d in shape if d != -1)
            field = tuple(size // known if d == -1 else d for d in shape)
            per = starts.size
            return RunBatch(np.arange(nv + 1, dtype=np.int64) * per,
                            (offsets[:, None] - one.offset + starts[None, :]).reshape(-1),
                            np.full(nv * per, n, np.int64), field)
    out = Batch(offsets, one.shape, one.strides).array()
    if not isinstance(index, Strided):
        out = np.asarray(index).reshape(-1)[out]
    return out.reshape((nv,) + tuple(shape))


def one_to_one(index) -> bool:
    """A strided view whose positions all select different elements (sufficient:
    each axis steps over everything the smaller ones reach)."""
    if not isinstance(index, Strided):
        return False
    reach = 0
    for n, s in sorted(((n, abs(s)) for n, s in zip(index.shape, index.strides) if n > 1), key=lambda a: a[1]):
        if s <= reach:
            return False
        reach += (n - 1) * s
    return True


def vertex_split(counts: np.ndarray, workers: int, grain: int = GRAIN, max_size: int | None = None):
    """How the partitioner splits each of some tiles' `counts` elements (in flat
    order) into vertices (`Partitioner.chunks`): up to `workers` per tile, of
    near-equal sizes, at least `grain` elements each where there are enough, more
    if a vertex would exceed `max_size`.  Per vertex, in tile order: (its tile's
    index in `counts`, its size, where it starts among its tile's elements)."""
    k = np.clip(counts // grain, 1, workers)
    if max_size is not None:
        k = np.maximum(k, -(-counts // max_size))
    q, r = counts // k, counts % k
    owner = np.repeat(np.arange(len(counts)), k)
    j = ramps(k)
    rr, qq = r[owner], q[owner]
    return owner, qq + (j < rr), j * qq + np.minimum(j, rr)


def map_whole(p, tensor: int, shape: tuple, tiles: np.ndarray) -> None:
    """Map every element of `tensor` (one the rule made, its elements in the order of
    a `shape` array) to `tiles`, broadcast to `shape`.  The trailing axes `tiles`
    is broadcast along are runs, never elements (a weight gradient's KH x KW)."""
    tiles = np.asarray(tiles)
    lead = (1,) * (len(shape) - tiles.ndim) + tiles.shape
    k = len(shape)
    while k and lead[k - 1] == 1:
        k -= 1
    inner = math.prod(shape[k:])
    outer = np.broadcast_to(tiles.reshape(lead[:k]), shape[:k]).reshape(-1)
    if inner <= 1 or not outer.size:
        p.set_tiles(tensor, np.broadcast_to(tiles, shape))
        return
    runs = Mapping.from_elements(outer)
    p.g.mappings[tensor] = Mapping(runs.numel * inner, runs.starts * inner, runs.tiles)


def map_runs(p, tensor: int, starts: np.ndarray, lengths: np.ndarray, tiles: np.ndarray) -> None:
    """Map every element of `tensor` (one the rule made) by runs: elements
    [starts, starts + lengths) on `tiles` (broadcast together), covering it."""
    starts, lengths, tiles = (a.reshape(-1) for a in np.broadcast_arrays(starts, lengths, tiles))
    m = Mapping.unmapped(p.g.tensors[tensor].numel)
    m.assign(starts, lengths, tiles)
    p.g.mappings[tensor] = m


def map_first(p, view, tiles: np.ndarray, task: np.ndarray) -> None:
    """Map the still-unmapped elements of `view` (a g.View) as `p.ensure_mapped` of
    each task's block in task order would: `tiles` and `task` (broadcastable to the
    view's shape) give, for each position, the tile and the index of the first task
    whose block holds it (blocks are boxes of positions, each a task's in row-major
    order); an element several positions select keeps the first task's tile."""
    m = p.g.mappings[view.tensor]
    if m.fully_mapped():
        return
    shape = view.index.shape
    tiles = np.broadcast_to(tiles, shape).reshape(-1)
    if isinstance(view.index, Strided) and view.index.is_whole(m.numel):
        have = m.elements()                     # the whole tensor in order (weights, usually)
        p.set_tiles(view.tensor, np.where(have < 0, tiles, have))
        return
    flat = as_array(view.index).reshape(-1)
    free = m.tile_of(flat) < 0
    if not free.any():
        return
    if one_to_one(view.index):
        m.assign_elements(flat[free], tiles[free])
        return
    # An element several tasks' blocks hold keeps the first task's tile.
    order = np.argsort(np.broadcast_to(task, shape).reshape(-1), kind="stable")
    flat, tiles, free = flat[order], tiles[order], free[order]
    m.assign_elements(flat[free], tiles[free], only_unmapped=True)


def emit_classes(p, cs, codelet: str, tiles: np.ndarray, classes, conns, state: dict) -> None:
    """One vertex group of `codelet` per class of tasks (task indices, in order):
    tiles[task], `conns(rows)` = {field: (tensor, stacked index)} and `state`: a
    value for every vertex, or an array of one per task."""
    for rows in classes:
        p.group(cs, codelet, tiles[rows], conns(rows),
                {k: v[rows] if isinstance(v, np.ndarray) else np.full(len(rows), v) for k, v in state.items()})


# ---------------------------------------------------------------- plans of splits

class Split(NamedTuple):
    splits: tuple[int, ...]      # how many blocks each dimension is cut into
    runs: bool                   # tasks sharing a block (`share`) sit together on tiles


def split_plan(p, outer: int, sizes, moved, macs, partial_dims: tuple[int, ...] = (), partial_bytes: int = 0,
                strided=None, share=None) -> Split:
    """Power-of-two splits of the dimensions `sizes` for `outer` independent jobs: the
    least estimated cycles of the busiest tile — its vertices' `macs(*block)`
    multiply-accumulates at the target's rate, a tile's workers busy only when it
    has as many vertices as workers (a lone vertex runs at a sixth of the tile's
    issue rate), the bytes its vertices receive (`moved(*block)` = (bytes received,
    largest field, bytes produced)) at the exchange rate, and, when dimensions `partial_dims` are
    split, `partial_bytes` of partial sums per split exchanged and added.

    Which plans: those of at most one vertex per worker whose fields fit SLAB_BYTES
    and whose vertices receive and produce at most TILE_BUFFER_BYTES on a tile (six
    vertices of 48 KB fields each filled ResNet-50's tiles with exchange buffers and
    partial sums).  When there is none, the fastest of one vertex per worker, if
    its tile bytes are within CROWDED_BYTES; else PopLibs' rule (poplin's ConvPlan.cpp: a
    plan over its memory target is planned again with the target doubled, and
    again): the fastest whose tile bytes are within twice TILE_BUFFER_BYTES, else
    four times, ... — among the plans with fields within SLAB_BYTES, one vertex per
    worker or, with `share`, runs of tasks that share a block on a tile.
    `share(splits, *block)` = (bytes of the block a run of tasks reads alike, tasks
    in a run): the tile receives that block once per run it holds part of, not
    once per task (the input's gradient at batch 32: each of six vertices took its
    own 256 KB block of a stage-4 weight, 1.5 MB of the tile).  Else the plan with
    the smallest largest field (of at most one task per worker, where there is
    such a plan).  `strided(*block)`, if given, says whether a block's fields are
    strided views of their tensors; a plan whose fields are not (an index array
    per element: gigabytes of them for a training step at batch 8) is taken only
    where no strided plan meets the same conditions."""
    target = p.g.target
    rate, workers = target.exchange_bytes_per_cycle, target.workers
    best, fallback = [None, None], None
    options = []                 # (cost, tile bytes, strided, splits, runs): the ladder's
    for splits in itertools.product(*(pow2_splits(n) for n in sizes)):
        block = [ceil_div(n, k) for n, k in zip(sizes, splits)]
        tasks = outer * int(np.prod(splits))
        per_tile = ceil_div(tasks, p.tiles)
        received, worst, produced = moved(*block)
        compute = macs(*block) * max(workers, per_tile) / workers / target.macs_per_cycle
        parts = int(np.prod([splits[d] for d in partial_dims]))
        summed = parts * partial_bytes / p.tiles / rate * 2 if parts > 1 else 0
        cost = compute + per_tile * received / rate + summed
        key = fallback_rank(p, tasks, worst)
        if fallback is None or key < fallback[0]:
            fallback = (key, splits)
        runs = share is not None and per_tile > 1 and tasks <= p.tiles * workers * RUN_TASKS_PER_WORKER
        if worst > SLAB_BYTES or not (tasks <= p.tiles * workers or runs):
            continue
        k = int(strided is None or strided(*block))
        if tasks <= p.tiles * workers:
            tile_bytes = per_tile * (received + produced)
            options.append((cost, tile_bytes, k, splits, False))
            if tile_bytes <= TILE_BUFFER_BYTES and (best[k] is None or cost < best[k][0]):
                best[k] = (cost, splits)
        if runs:
            shared, run = share(splits, *block)
            if shared <= SLAB_BYTES:
                # A tile's tasks are a stretch of runs: the shared blocks it holds.
                blocks_in = min(per_tile, 1 + ceil_div(per_tile - 1, run))
                got = blocks_in * shared + per_tile * (received - shared)
                options.append((compute + got / rate + summed, got + per_tile * produced, k, splits, True))
    if best[1] or best[0]:
        return Split((best[1] or best[0])[1], False)
    alone = [o for o in options if not o[4]]
    if alone:
        fastest = min(alone, key=lambda o: (-o[2], o[0]))
        if fastest[1] <= CROWDED_BYTES:
            return Split(fastest[3], False)
    limit = 2 * TILE_BUFFER_BYTES
    while options and limit <= 2 * max(target.tile_memory, TILE_BUFFER_BYTES):
        fit = [o for o in options if o[1] <= limit]
        if fit:
            _, _, _, splits, runs = min(fit, key=lambda o: (-o[2], o[0]))
            return Split(splits, runs)
        limit *= 2
    if options:
        _, _, _, splits, runs = min(options, key=lambda o: (-o[2], o[0]))
        return Split(splits, runs)
    return Split(fallback[1], False)
