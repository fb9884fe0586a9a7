"""The convolution and pooling rules build all their tasks at once (`ops.blocks`:
`stacked`, `shape_classes`, `map_first`); each helper is checked here against the
per-task definition it replaces (hypothesis over random shapes, views and blocks),
and `conv2d`'s rule against the per-task loop it replaced, vertex for vertex."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from popdsl import ops
from popdsl.ir import graph as g
from popdsl.ir.index import Batch, RunBatch, Strided, as_array, stack
from popdsl.ir.mapping import Mapping
from popdsl.ir.target import get_target
from popdsl.ops.blocks import blocks, emit_tasks, map_first, map_whole, shape_classes, stacked, task_grid
from popdsl.passes.partition import Partitioner, partition
from popdsl.pipeline import compile_source

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def bases(draw):
    """An index to slice: a strided view (whole, transposed, sliced, broadcast) or an
    element array (in order, shuffled, or selecting elements more than once)."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    s = Strided.whole(shape)
    kind = draw(st.sampled_from(["whole", "transpose", "slice", "broadcast", "array", "shuffled", "repeats"]))
    if kind == "transpose":
        s = s.transpose(draw(st.permutations(range(len(shape)))))
    elif kind == "slice":
        s = Strided.whole((shape[0] + 2,) + shape[1:])[1:shape[0] + 1]
    elif kind == "broadcast":
        s = Strided.whole((1,) + shape[1:]).broadcast_to(shape)
    if kind == "array":
        return s.array()
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    if kind == "shuffled":
        return rng.permutation(int(np.prod(shape))).reshape(shape)
    if kind == "repeats":               # elements several positions select
        return rng.integers(0, max(1, int(np.prod(shape)) // 3), shape)
    return s


@SETTINGS
@given(bases(), st.data())
def test_stacked_equals_stacking_each_tasks_slice(index, data):
    """Per axis an integer, a slice of one length, or the whole axis; per task its
    own positions; then a reshape: the same connection, representation included
    (runs where stacking gives an element array of a strided tensor's runs)."""
    nv = data.draw(st.integers(1, 5))
    keys, per_task = [], [[] for _ in range(nv)]
    naxes = data.draw(st.integers(1, len(index.shape)))
    for n in index.shape[:naxes]:
        kind = data.draw(st.sampled_from(["int", "slice", "all"]))
        if kind == "int":
            k = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=nv, max_size=nv)), np.int64)
            keys.append(k)
            for v in range(nv):
                per_task[v].append(int(k[v]))
        elif kind == "slice":
            size = data.draw(st.integers(1, n))
            lo = np.asarray(data.draw(st.lists(st.integers(0, n - size), min_size=nv, max_size=nv)), np.int64)
            keys.append((lo, lo + size))
            for v in range(nv):
                per_task[v].append(slice(int(lo[v]), int(lo[v]) + size))
        else:
            keys.append(slice(None))
            for v in range(nv):
                per_task[v].append(slice(None))
    if all(isinstance(k, slice) for k in keys):
        keys[0] = np.zeros(nv, np.int64)
        for v in range(nv):
            per_task[v][0] = 0
    one = index[tuple(per_task[0])]
    lead = one.shape[0] if len(one.shape) else 1
    shape = data.draw(st.sampled_from([(-1,), (lead, -1), tuple(one.shape) or (1,)]))
    want = stack([index[tuple(k)].reshape(shape) for k in per_task])
    got = stacked(index, tuple(keys), shape)
    if isinstance(got, RunBatch):
        # Not strided as one view per task, but runs of several elements each: the
        # same elements as the stacked array, in a number per run.
        assert not isinstance(want, Batch) and got.shape == want.shape
        assert (got.lengths > 1).all()
        np.testing.assert_array_equal(got.array(), want)
        return
    assert type(got) is type(want)
    if isinstance(want, Batch):
        np.testing.assert_array_equal(got.offsets, want.offsets)
        assert (got.field_shape, got.strides) == (want.field_shape, want.strides)
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@SETTINGS
@given(st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=3), min_size=1, max_size=40).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_shape_classes_group_tasks_by_sizes_in_first_task_order(rows):
    want: dict[tuple, list[int]] = {}
    for t, r in enumerate(rows):
        want.setdefault(tuple(r), []).append(t)
    sizes = [np.asarray(col, np.int64) for col in zip(*rows)]
    assert [c.tolist() for c in shape_classes(*sizes)] == list(want.values())


@SETTINGS
@given(bases(), st.data())
def test_map_first_maps_as_each_tasks_ensure_mapped_in_task_order(index, data):
    """Tasks over boxes of a view's positions (blocks of its first two axes, tasks
    in a random loop order, each box wanted by several tasks), some elements mapped
    beforehand: the same tile per element as `ensure_mapped` task by task."""
    numel = int(np.max(np.asarray(index))) + 1
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    before = np.where(rng.random(numel) < data.draw(st.sampled_from([0.0, 0.3])), rng.integers(0, 9, numel), -1)
    n0, n1 = index.shape[0], index.shape[1]
    b0, b1 = blocks(n0, data.draw(st.integers(1, n0))), blocks(n1, data.draw(st.integers(1, n1)))
    reps = data.draw(st.integers(1, 3))
    # Loops: repeats (the images a block serves), the two block axes, in a random order.
    order = data.draw(st.permutations([0, 1, 2]))
    counts = [reps, len(b0), len(b1)]
    grid = task_grid(*[counts[a] for a in order])
    loop = {a: grid[i] for i, a in enumerate(order)}
    tiles = rng.integers(0, 50, len(grid[0])).astype(np.int32)

    view = g.View(0, index, None)
    want = SimpleNamespace(g=SimpleNamespace(mappings={0: Mapping.from_elements(before)}))
    for t in range(len(tiles)):
        (lo0, hi0), (lo1, hi1) = b0[loop[1][t]], b1[loop[2][t]]
        Partitioner.ensure_mapped(want, g.View(0, index[lo0:hi0, lo1:hi1], None), np.int32(tiles[t]))

    # The first task of each box, for each position.
    first = np.full((len(b0), len(b1)), len(tiles))
    np.minimum.at(first, (loop[1], loop[2]), np.arange(len(tiles)))
    pos0 = np.repeat(np.arange(len(b0)), [hi - lo for lo, hi in b0])
    pos1 = np.repeat(np.arange(len(b1)), [hi - lo for lo, hi in b1])
    task = first[pos0[:, None], pos1[None, :]].reshape((n0, n1) + (1,) * (len(index.shape) - 2))
    got = SimpleNamespace(g=SimpleNamespace(mappings={0: Mapping.from_elements(before)}),
                          set_tiles=lambda t, tiles: got.g.mappings.__setitem__(t, Mapping.from_elements(tiles)))
    map_first(got, view, tiles[task], task)
    np.testing.assert_array_equal(got.g.mappings[0].elements(), want.g.mappings[0].elements())


def _bare_partitioner(before: np.ndarray) -> Partitioner:
    """A partitioner of one tensor mapped as `before` (-1: unmapped), 7 tiles, rotor 3."""
    p = Partitioner.__new__(Partitioner)
    p.g, p.tiles, p.rotor = SimpleNamespace(mappings={0: Mapping.from_elements(before)}), 7, 3
    return p


def _ensure_mapped_by_elements(p: Partitioner, index, tiles) -> None:
    """`ensure_mapped`'s definition, element by element: the view's unmapped
    elements take `tiles` (or linear tiles over its positions), the first position
    of an element given twice winning; nothing rotates when none is free."""
    m = p.g.mappings[0]
    flat = as_array(index).ravel()
    free = m.tile_of(flat) < 0
    if free.any():
        tiles = p.linear(flat.size) if tiles is None else np.broadcast_to(tiles, index.shape).ravel()
        m.assign_elements(flat[free], tiles[free], only_unmapped=True)


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_ensure_mapped_maps_a_contiguous_view_by_runs_as_element_by_element(shape, data):
    """A view whose elements are consecutive (a slice of whole rows, reshaped) is
    mapped by runs: the same tile per element, and the same rotor, as the
    per-element definition (only unmapped elements take the given or linear tiles;
    nothing rotates when none is free)."""
    numel = int(np.prod(shape)) + data.draw(st.integers(0, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    before = np.where(rng.random(numel) < data.draw(st.sampled_from([0.0, 0.5, 1.0])),
                      rng.integers(0, 9, numel), -1)
    lo = data.draw(st.integers(0, numel - int(np.prod(shape))))
    index = Strided.whole((numel,))[lo:lo + int(np.prod(shape))].reshape(tuple(shape))
    given_tiles = None if data.draw(st.booleans()) else rng.integers(0, 9, tuple(shape)).astype(np.int32)
    got, want = _bare_partitioner(before), _bare_partitioner(before)
    got.ensure_mapped(g.View(0, index, None), given_tiles)
    _ensure_mapped_by_elements(want, index, given_tiles)
    assert got.g.mappings[0].same(want.g.mappings[0]) and got.rotor == want.rotor


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=2), st.data())
def test_ensure_mapped_maps_a_broadcast_of_consecutive_elements_as_element_by_element(shape, data):
    """A contiguous slice broadcast along new axes (a channel's scale over a
    batch) is mapped from its elements' first positions: the same tile per element,
    and the same rotor, as linear tiles over every position element by element."""
    size = int(np.prod(shape))
    numel = size + data.draw(st.integers(0, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 999)))
    before = np.where(rng.random(numel) < data.draw(st.sampled_from([0.0, 0.5, 1.0])),
                      rng.integers(0, 9, numel), -1)
    lo = data.draw(st.integers(0, numel - size))
    index = Strided.whole((numel,))[lo:lo + size].reshape(tuple(shape))
    # New axes of random sizes before, between and after the view's own.
    full = []
    for n in shape:
        full += [None] * data.draw(st.integers(0, 1)) + [slice(None)]
    full += [None] * data.draw(st.integers(0, 1))
    index = index[tuple(full)]
    target = tuple(n if n > 1 or k is not None else data.draw(st.integers(1, 40))
                   for n, k in zip(index.shape, full))
    index = index.broadcast_to(target)
    got, want = _bare_partitioner(before), _bare_partitioner(before)
    got.ensure_mapped(g.View(0, index, None))
    _ensure_mapped_by_elements(want, index, None)
    assert got.g.mappings[0].same(want.g.mappings[0]) and got.rotor == want.rotor


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_map_whole_maps_runs_of_the_axes_tiles_are_broadcast_along(shape, data):
    """`map_whole` keeps the trailing axes its tiles are broadcast along as runs:
    the same mapping as the tiles broadcast element by element."""
    shape = tuple(shape)
    lead = tuple(n if data.draw(st.booleans()) else 1 for n in shape)[data.draw(st.integers(0, len(shape))):]
    tiles = np.random.default_rng(data.draw(st.integers(0, 999))).integers(0, 3, lead).astype(np.int32)
    p = SimpleNamespace(g=SimpleNamespace(mappings={}),
                        set_tiles=lambda t, tl: p.g.mappings.__setitem__(t, Mapping.from_elements(tl)))
    map_whole(p, 0, shape, tiles)
    assert p.g.mappings[0].same(Mapping.from_elements(np.broadcast_to(tiles, shape)))


# ---------------------------------------------------------------- conv2d against its per-task loop

def _conv_per_task(p, n):
    """conv2d's partition rule as a Python loop over the tasks and their workers'
    vertices, a dict each (the definition the vectorised rule must equal, vertex
    for vertex)."""
    from popdsl.ops.conv import _conv_plan, subsampled
    from popdsl.ops.reduce import add_partials
    from popdsl.ops.shape import padded
    stride, padding, groups = n.attrs
    x, w = p.value(n.args[0]), p.value(n.args[1])
    N = x.index.shape[0]
    O, Cg, KH, KW = w.index.shape
    _, _, OH, OW = n.shape
    label = p.name(n)
    if padding:
        x = padded(p, x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), 0.0, "f32", label + ".pad")
    else:
        p.ensure_mapped(x)
    x, stride = subsampled(p, x, KH, KW, stride, OH, OW, label)
    Wp = x.index.shape[3]
    Og = O // groups
    go, gr, gc, images = _conv_plan(p, N * groups, Og, Cg, OH, OW, KH, stride, Wp, KH * KW, groups, layout=True)
    ob_, rb_, cb_ = blocks(Og, go), blocks(OH, gr), blocks(Cg, gc)
    if len(cb_) > 1:
        acc = p.new_tensor(label + ".partial", "f32", (len(cb_), N, O, OH, OW))
        target = acc.index
    else:
        acc = p.new_tensor(label, "f32", (N, O, OH, OW))
        target = acc.index[None]
    # Several tasks to a tile: those of one weight block (group, output and input
    # channel block) together, in runs of `images` images (then input-channel
    # blocks outside output-channel blocks).
    weight_block = [(gi * len(ob_) + oi) * len(cb_) + ci if images == N
                    else (((nn // images) * groups + gi) * len(cb_) + ci) * len(ob_) + oi
                    for nn in range(N) for gi in range(groups)
                    for oi in range(len(ob_)) for _ in rb_ for ci in range(len(cb_))]
    tiles = p.spread(len(weight_block), together=np.array(weight_block))
    tasks, t = [], 0
    for nn in range(N):
        for gi in range(groups):
            for (o0, o1) in ob_:
                for (r0, r1) in rb_:
                    for ci, (c0, c1) in enumerate(cb_):
                        tile = int(tiles[t])
                        t += 1
                        oo0, oo1 = gi * Og + o0, gi * Og + o1
                        ys = target[ci, nn, oo0:oo1, r0:r1, :]
                        p.g.mappings[acc.tensor].assign_elements(as_array(ys).ravel(), tile)
                        p.ensure_mapped(g.View(w.tensor, w.index[oo0:oo1, c0:c1, :, :], w.span), np.int32(tile))
                        # The task's workers: bands of rows, or when rows are
                        # fewer than workers, each row in bands of 8 columns or more.
                        rows = r1 - r0
                        bands = max(1, min(OW // 8, -(-p.workers // rows))) if rows < p.workers else 1
                        parts = min(rows, p.workers)
                        for kr in range(parts):
                            for kc in range(bands):
                                s0, s1 = r0 + rows * kr // parts, r0 + rows * (kr + 1) // parts
                                a0, a1 = OW * kc // bands, OW * (kc + 1) // bands
                                xs = x.index[nn, gi * Cg + c0: gi * Cg + c1, s0 * stride:(s1 - 1) * stride + KH, :]
                                ws = w.index[oo0:oo1, c0:c1, :, :]
                                ys = target[ci, nn, oo0:oo1, s0:s1, a0:a1]
                                tasks.append({"tile": tile, "state": {"kh": KH, "kw": KW, "s": stride, "wp": Wp,
                                                                      "ow": a1 - a0, "ox": a0},
                                              "conns": {"x": (x.tensor, xs.reshape(c1 - c0, -1)),
                                                        "w": (w.tensor, ws.reshape(o1 - o0, -1)),
                                                        "y": (acc.tensor, ys.reshape(o1 - o0, -1))}})
    cs = p.new_cs(label)
    emit_tasks(p, cs, p.prim("Conv2dBlock"), tasks, ("kh", "kw", "s", "wp", "ow", "ox"))
    return add_partials(p, n, cs, acc, len(cb_) > 1, label)


def _same_partition(a: g.TensorGraph, b: g.TensorGraph) -> None:
    assert list(a.compute_sets) == list(b.compute_sets)
    for name in a.compute_sets:
        ga, gb = a.compute_sets[name].groups, b.compute_sets[name].groups
        assert [x.codelet for x in ga] == [x.codelet for x in gb], name
        for x, y in zip(ga, gb):
            np.testing.assert_array_equal(x.tiles, y.tiles)
            assert list(x.connections) == list(y.connections)
            for f in x.connections:
                cx, cy = x.connections[f], y.connections[f]
                assert cx.tensor == cy.tensor and type(cx.index) is type(cy.index), (name, f)
                if isinstance(cx.index, Batch):
                    np.testing.assert_array_equal(cx.index.offsets, cy.index.offsets)
                    assert (cx.index.field_shape, cx.index.strides) == (cy.index.field_shape, cy.index.strides)
                else:
                    np.testing.assert_array_equal(cx.index, cy.index)
            assert {k: v.tolist() for k, v in x.state.items()} == {k: v.tolist() for k, v in y.state.items()}
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for t in a.tensors:
        np.testing.assert_array_equal(a.mappings[t.id].elements(), b.mappings[t.id].elements())


@pytest.mark.parametrize("tiles", [1, 5, 1472])
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3), cg=st.integers(1, 40), og=st.integers(1, 40), groups=st.integers(1, 3),
       hw=st.integers(4, 24), k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
       view=st.sampled_from(["x", "transpose(x, [0, 1, 3, 2])"]))
def test_conv2d_rule_equals_its_per_task_loop(monkeypatch, tiles, n, cg, og, groups, hw, k, stride, padding, view):
    """Same vertices in the same groups and order, same connections (a transposed
    input without padding connects element arrays), same tile mappings."""
    c, o = cg * groups, og * groups
    assume(4 * n * c * hw * hw * 4 <= tiles * get_target("gc200").tile_memory)   # x and 2x fit the target
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[{n}, {c}, {hw}, {hw}];
    param w: f32[{o}, {cg}, {k}, {k}] = normal(0.0, 1.0);
    let x = xin * 2.0;
    output y = conv2d({view}, w, stride = {stride}, padding = {padding}, groups = {groups});
}}
"""
    graph = compile_source(src, "<string>", get_target("gc200", tiles=tiles), stop_after="autodiff")
    got = partition(graph)
    with monkeypatch.context() as m:
        m.setitem(ops.OPS, "conv2d", dataclasses.replace(ops.op("conv2d"), partition=_conv_per_task))
        want = partition(graph)
    _same_partition(got, want)


@pytest.mark.parametrize("stride,padding", [(2, 0), (3, 0), (2, 1)])
def test_strided_1x1_conv_reads_only_the_elements_it_uses(monkeypatch, stride, padding):
    """A 1 x 1 kernel with a stride convolves the subsampled input with stride 1
    (PopLibs' expandDims): the same values as numpy, and the tiles receive fewer
    bytes than when they took whole input rows."""
    import popdsl
    from popdsl.ops import conv
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 24, 14, 14)).astype(np.float32)
    w = rng.standard_normal((32, 24, 1, 1)).astype(np.float32)
    src = f"""graph g(tiles = 16) {{
    input x: f32[2, 24, 14, 14];
    input w: f32[32, 24, 1, 1];
    output y = conv2d(x, w, stride = {stride}, padding = {padding});
}}"""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    want = np.einsum("nchw,oc->nohw", xp[:, :, ::stride, ::stride], w[:, :, 0, 0].astype(np.float64))

    def run():
        exe = popdsl.compile(src, cache=False)
        with popdsl.Simulator(exe) as sim:
            got = sim.run({"x": x, "w": w})["y"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            return sim.cycles.exchange
    subsampled = run()
    monkeypatch.setattr(conv, "subsampled", lambda p, x, kh, kw, stride, oh, ow, label: (x, stride))
    whole_rows = run()
    assert subsampled < whole_rows, (subsampled, whole_rows)


def _padded_3x3(tiles: int, n: int, c: int, o: int, hw: int, seed: int):
    """A 3 x 3 convolution with padding 1 of random inputs: (source, x, w, numpy's y)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    src = f"""graph g(tiles = {tiles}) {{
    input x: f32[{n}, {c}, {hw}, {hw}];
    input w: f32[{o}, {c}, 3, 3];
    output y = conv2d(x, w, padding = 1);
}}"""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + hw, j:j + hw], w[:, :, i, j].astype(np.float64))
               for i in range(3) for j in range(3))
    return src, x, w, want


def test_tasks_sharing_a_weight_block_share_a_tile(monkeypatch):
    """When tiles take several tasks of a convolution (a big batch), a tile's tasks
    are a run of those reading one weight block: the exchange brings it once.
    Dealt round robin, a tile's tasks read as many blocks as it has tasks."""
    import popdsl
    from popdsl.passes.partition import Partitioner
    src, x, w, want = _padded_3x3(tiles=5, n=8, c=64, o=128, hw=8, seed=4)

    def buffers():
        exe = popdsl.compile(src, cache=False, tile_memory=4 << 20)
        with popdsl.Simulator(exe) as sim:
            np.testing.assert_allclose(sim.run({"x": x, "w": w})["y"], want, rtol=1e-4, atol=1e-3)
        return int(exe.ir.memory.exchange_buffers.sum())
    together = buffers()
    spread = Partitioner.spread
    monkeypatch.setattr(Partitioner, "spread", lambda self, n, together=None: spread(self, n))
    assert together < buffers()


def test_crowded_convolution_shares_input_slabs_and_matches_numpy():
    """A convolution whose fastest plan would put more than CROWDED_BYTES on a tile
    (8 images of 64 channels on 2 tiles) is planned for memory: a tile's tasks are
    runs of fewer images than the batch, sharing their input slabs over
    output-channel blocks, and the tiles receive fewer bytes than with runs of
    every image; the result is numpy's."""
    import types
    import popdsl
    from popdsl.ops import conv
    p = types.SimpleNamespace(tiles=2, g=types.SimpleNamespace(target=get_target("gc200", tiles=2)))
    go, gr, gc, images = conv._conv_plan(p, 8, 64, 64, 14, 14, 3, 1, 16, 9, layout=True)
    assert images < 8
    runs_of_all = conv._conv_layout(p, 8, 64, 64, 14, 14, 3, 1, 16, 9, 1, go, gr, gc)
    shared = conv._conv_layout(p, 8, 64, 64, 14, 14, 3, 1, 16, 9, 1, go, gr, gc, shared_slabs=True)
    assert shared[-1] == images and shared[5] < runs_of_all[5]
    src, x, w, want = _padded_3x3(tiles=2, n=8, c=64, o=64, hw=14, seed=5)
    exe = popdsl.compile(src, cache=False, tile_memory=8 << 20)
    with popdsl.Simulator(exe) as sim:
        np.testing.assert_allclose(sim.run({"x": x, "w": w})["y"], want, rtol=1e-4, atol=1e-3)
