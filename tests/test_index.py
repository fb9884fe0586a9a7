"""Strided views against their definition, the element-index arrays numpy computes
for the same operations (hypothesis over random shapes and operations)."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from popdsl.ir.index import Batch, RunBatch, Strided, affine_rows, strided_pieces, unique

SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@st.composite
def views(draw):
    """A strided view and the index array it must equal, after random operations."""
    shape = draw(SHAPES)
    s = Strided.whole(shape)
    a = np.arange(int(np.prod(shape))).reshape(shape)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["slice", "int", "transpose", "reshape", "broadcast", "newaxis"]))
        if op == "slice" and a.ndim:
            axis = draw(st.integers(0, a.ndim - 1))
            n = a.shape[axis]
            lo = draw(st.integers(0, n - 1))
            hi = draw(st.integers(lo + 1, n))
            step = draw(st.sampled_from([1, 1, 2, -1]))
            key = (slice(None),) * axis + ((slice(lo, hi, step) if step > 0 else slice(hi - 1, None if lo == 0 else lo - 1, -1)),)
            s, a = s[key], a[key]
        elif op == "int" and a.ndim > 1:
            axis = draw(st.integers(0, a.ndim - 1))
            k = draw(st.integers(-a.shape[axis], a.shape[axis] - 1))
            key = (slice(None),) * axis + (k,)
            s, a = s[key], a[key]
        elif op == "transpose" and a.ndim:
            perm = draw(st.permutations(range(a.ndim)))
            s, a = s.transpose(perm), a.transpose(perm)
        elif op == "reshape" and a.size:
            n = a.size
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            d = draw(st.sampled_from(divisors))
            shape = (d, n // d)
            r = s.view_reshape(shape)
            if r is not None:
                s, a = r, a.reshape(shape)
            else:
                assert not _nocopy(a, shape), (s, shape)
        elif op == "broadcast" and a.ndim < 4:
            shape = (draw(st.integers(1, 3)),) + tuple(n if draw(st.booleans()) or n != 1 else draw(st.integers(1, 3))
                                                    for n in a.shape)
            s, a = s.broadcast_to(shape), np.broadcast_to(a, shape)
        elif op == "newaxis":
            s, a = s[None], a[None]
    return s, a


def _nocopy(a: np.ndarray, shape) -> bool:
    """Whether numpy reshapes this view of an arange without a copy (setting the
    shape of a view raises when a copy would be needed)."""
    r = a.view()
    try:
        r.shape = shape
        return True
    except AttributeError:
        return False


@settings(max_examples=300, deadline=None)
@given(views())
def test_strided_views_equal_their_element_indices(case):
    s, a = case
    assert s.shape == a.shape
    np.testing.assert_array_equal(s.array(), a)
    if a.size:                        # always: no empty draws
        assert s.bounds() == (int(a.min()), int(a.max()))
        starts, length = s.runs()
        flat = a.reshape(-1)
        expanded = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
        np.testing.assert_array_equal(expanded, flat)


@settings(max_examples=200, deadline=None)
@given(views())
def test_reshape_succeeds_exactly_when_numpy_needs_no_copy(case):
    s, a = case
    assert a.size          # views are never empty here
    for shape in ((a.size,), (1, a.size), (a.size, 1)):
        r = s.view_reshape(shape)
        if r is not None:
            np.testing.assert_array_equal(r.array(), a.reshape(shape))
        else:
            assert not _nocopy(a, shape)


def test_of_recovers_a_strided_view_and_refuses_an_irregular_one():
    s = Strided.whole((4, 6))[1:3, ::2]
    assert Strided.of(s.array()) is not None
    np.testing.assert_array_equal(Strided.of(s.array()).array(), s.array())
    assert Strided.of(np.array([0, 1, 3])) is None


def test_batches_stack_views_of_one_shape():
    base = Strided.whole((8, 8))
    views = [base[r:r + 2, 2:5] for r in range(0, 8, 2)]
    b = Batch.stack(views)
    np.testing.assert_array_equal(b.array(), np.stack([v.array() for v in views]))
    assert b.view(2) == views[2] and len(b.take(np.array([0, 3]))) == 2


# ---------------------------------------------------------------- tile mappings as runs

from popdsl.ir.mapping import Mapping  # noqa: E402


@st.composite
def assignments(draw):
    numel = draw(st.integers(1, 60))
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        k = draw(st.integers(1, 5))
        starts = draw(st.lists(st.integers(0, numel - 1), min_size=k, max_size=k))
        lengths = [draw(st.integers(0, numel - s)) for s in starts]
        tiles = draw(st.lists(st.integers(0, 7), min_size=k, max_size=k))
        steps.append((starts, lengths, tiles, draw(st.booleans())))
    return numel, steps


@settings(max_examples=300, deadline=None)
@given(assignments())
def test_mapping_runs_equal_a_tile_per_element(case):
    numel, steps = case
    m = Mapping.unmapped(numel)
    ref = np.full(numel, -1, np.int32)
    for starts, lengths, tiles, only_unmapped in steps:
        m.assign(starts, lengths, tiles, only_unmapped)
        order = range(len(starts)) if not only_unmapped else reversed(range(len(starts)))
        new = ref.copy()
        for k in order:
            lo, hi = starts[k], starts[k] + lengths[k]
            if only_unmapped:
                sel = np.arange(lo, hi)
                sel = sel[ref[sel] == -1]
                new[sel] = tiles[k]
            else:
                new[lo:hi] = tiles[k]
        ref = new
        np.testing.assert_array_equal(m.elements(), ref)
        assert (m.tiles[1:] != m.tiles[:-1]).all()          # adjacent runs merged
    np.testing.assert_array_equal(m.tile_of(np.arange(numel)), ref)
    assert m.unmapped_count() == int((ref == -1).sum())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=50), st.data())
def test_layout_places_each_tiles_elements_in_flat_order(tile_of, data):
    m = Mapping.from_elements(np.array(tile_of))
    lay = m.layout()
    region, off = lay.locate(np.arange(len(tile_of)))
    for r, tile in enumerate(lay.tiles):
        mine = np.nonzero(np.array(tile_of) == tile)[0]
        np.testing.assert_array_equal(np.sort(off[region == r]), np.arange(len(mine)))
        np.testing.assert_array_equal(off[mine], np.arange(len(mine)))
        assert lay.counts[r] == len(mine)
    start = data.draw(st.integers(0, len(tile_of) - 1))
    length = data.draw(st.integers(0, len(tile_of) - start))
    lo, n, src, pos = lay.split([start], [length])
    assert n.sum() == length and (n > 0).all() and (src == 0).all()
    for a, k in zip(lo, n):                   # each piece sits in one region, contiguous
        r, o = lay.locate(np.arange(a, a + k))
        assert (r == r[0]).all() and np.array_equal(o, o[0] + np.arange(k))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.data())
def test_native_split_runs_equals_the_numpy_definition(tile_of, data):
    """The native kernel (used from `native_runs.MIN_RUNS` runs on) against
    `split_runs_numpy`, on runs in any order, empty ones included, some crossing
    many of the mapping's runs; a run leaving the tensor is the definition's."""
    from popdsl.ir import native_runs
    m = Mapping.from_elements(np.array(tile_of))
    numel = len(tile_of)
    k = data.draw(st.integers(1, 40))
    starts = np.array(data.draw(st.lists(st.integers(0, numel), min_size=k, max_size=k)), np.int64)
    lengths = np.array([data.draw(st.integers(0, numel - s)) for s in starts.tolist()], np.int64)
    if data.draw(st.booleans()):
        order = np.argsort(starts, kind="stable")
        starts, lengths = starts[order], lengths[order]
    got = native_runs.split_runs(m.starts, numel, starts, lengths)
    want = m.split_runs_numpy(starts, lengths)
    assert got is not None
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    # With regions, a position base and a tag per run, as lowering asks for a
    # field's pieces (`TensorLayout.pieces`, here below MIN_RUNS: numpy's).
    from popdsl.ir.lowered import TensorLayout
    lay = TensorLayout(m.layout(), 3, 4)
    base = np.array(data.draw(st.lists(st.integers(0, 99), min_size=k, max_size=k)), np.int64)
    tag = np.array(data.draw(st.lists(st.integers(0, 9), min_size=k, max_size=k)), np.int64)
    r, n, src, pos, off = native_runs.split_runs(m.starts, numel, starts, lengths,
                                                 (lay.layout.run_region, lay.layout.run_off, 3, 4), base, tag)
    for a, b in zip((r, off, n, src, pos), lay.pieces(starts, lengths, base, tag)):
        np.testing.assert_array_equal(a, b)
    bad = starts.copy()
    bad[data.draw(st.integers(0, k - 1))] = data.draw(st.sampled_from([-1, numel + 1]))
    assert native_runs.split_runs(m.starts, numel, bad, np.maximum(lengths, 1)) is None


def test_mapping_split_runs_goes_native_for_many_runs(monkeypatch):
    """Many runs take the kernel, with the definition's result, cut or not."""
    from popdsl.ir import native_runs
    calls = []
    kernel = native_runs.split_runs
    monkeypatch.setattr(native_runs, "split_runs", lambda *a: calls.append(1) or kernel(*a))
    rng = np.random.default_rng(3)
    m = Mapping.from_elements(np.repeat(np.arange(64), rng.integers(1, 50, 64)))
    n = native_runs.MIN_RUNS + 5
    starts = rng.integers(0, m.numel - 8, n)
    for lengths in (np.ones(n, np.int64), rng.integers(0, 8, n)):
        got, want = m.split_runs(starts, lengths), m.split_runs_numpy(starts, lengths)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert len(calls) == 2


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.data())
def test_assign_elements_equals_element_by_element_assignment(numel, data):
    """Elements in any order, repeated or not, become runs; a repeated element takes
    its later tile (the first, when only_unmapped, which also leaves mapped ones)."""
    m = Mapping.from_elements(np.array(data.draw(st.lists(st.integers(-1, 3), min_size=numel, max_size=numel))))
    ref = m.elements().copy()
    k = data.draw(st.integers(0, 3 * numel))
    elements = np.array(data.draw(st.lists(st.integers(0, numel - 1), min_size=k, max_size=k)), np.int64)
    tiles = np.array(data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)), np.int32)
    only_unmapped = data.draw(st.booleans())
    m.assign_elements(elements, tiles, only_unmapped)
    for e, t in zip(elements, tiles):
        if not only_unmapped or ref[e] == -1:
            ref[e] = t
    np.testing.assert_array_equal(m.elements(), ref)
    assert (m.tiles[1:] != m.tiles[:-1]).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.data())
def test_tiles_at_and_same(numel, data):
    tiles = np.array(data.draw(st.lists(st.integers(-1, 3), min_size=numel, max_size=numel)), np.int32)
    m = Mapping.from_elements(tiles)
    np.testing.assert_array_equal(m.tiles_at(Strided.whole((numel,))), tiles)
    idx = np.array(data.draw(st.lists(st.integers(0, numel - 1), min_size=1, max_size=10)))
    np.testing.assert_array_equal(m.tiles_at(idx), tiles[idx])
    other = tiles.copy()
    other[data.draw(st.integers(0, numel - 1))] = data.draw(st.integers(-1, 3))
    assert m.same(Mapping.from_elements(other)) == np.array_equal(tiles, other)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_affine_rows_finds_the_strided_vertices(data):
    """Rows it calls strided equal offset + the shared strides' view; the offset is
    the row's first element."""
    nv = data.draw(st.integers(1, 6))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    common = tuple(data.draw(st.sampled_from([0, 1, 3])) for _ in shape)
    strided = [data.draw(st.booleans()) for _ in range(nv)]
    rows = []
    for v in range(nv):
        if strided[v]:
            rows.append(Strided(data.draw(st.integers(0, 50)), shape, common).array())
        else:
            rows.append(np.array(data.draw(st.lists(st.integers(0, 50), min_size=math.prod(shape),
                                                    max_size=math.prod(shape)))).reshape(shape))
    index = np.stack(rows).astype(np.int64)
    strides, ok = affine_rows(index)
    assert ok.shape == (nv,)
    for v in np.nonzero(ok)[0]:
        np.testing.assert_array_equal(Strided(int(index[v].flat[0]), shape, strides).array(), index[v])
    if not shape:
        assert ok.all()
    elif strided[0]:                        # the first vertex's strides are a candidate
        assert ok[np.array(strided)].all()


def _run_batch(rows: np.ndarray) -> RunBatch:
    """A RunBatch of the index rows (nv, n): maximal runs of consecutive elements."""
    nv, n = rows.shape
    flat = rows.reshape(-1).astype(np.int64)
    brk = np.ones(flat.size, bool)
    brk[1:] = np.diff(flat) != 1
    brk[::n] = True
    at = np.nonzero(brk)[0]
    ptr = np.append(np.searchsorted(at, np.arange(0, flat.size, n)), at.size).astype(np.int64)
    return RunBatch(ptr, flat[at], np.diff(np.append(at, flat.size)), (n,))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_run_batches_are_their_elements_and_find_the_same_strided_rows(data):
    """A RunBatch gives back its elements, per vertex and taken by rows, and
    affine_rows decides from its runs exactly as from the element array."""
    nv = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(1, 5))
    rows = []
    for _ in range(nv):
        kind = data.draw(st.sampled_from(["run", "step", "same", "any"]))
        first = data.draw(st.integers(0, 40))
        step = {"run": 1, "same": 0, "step": data.draw(st.sampled_from([2, 3, -1]))}.get(kind)
        rows.append(first + 50 + step * np.arange(n) if step is not None
                    else np.array(data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))))
    index = np.stack(rows).astype(np.int64)
    rb = _run_batch(index)
    np.testing.assert_array_equal(rb.array(), index)
    for v in range(nv):
        np.testing.assert_array_equal(rb[v], index[v])
    pick = np.array(data.draw(st.lists(st.integers(0, nv - 1), max_size=8)), np.int64)
    np.testing.assert_array_equal(rb.take(pick).array().reshape(len(pick), n), index[pick])
    strides, ok = affine_rows(rb)
    want_strides, want_ok = affine_rows(index)
    assert strides == want_strides and ok.tolist() == want_ok.tolist()


@settings(max_examples=300, deadline=None)
@given(views(), st.data())
def test_strided_pieces_are_the_views_elements_at_the_positions(case, data):
    """Each piece's elements are affine (element + step k) and, run by run, equal
    the view's elements at those flat positions."""
    s, a = case
    flat = a.reshape(-1)
    nruns = data.draw(st.integers(0, 4))
    starts, lengths = [], []
    for _ in range(nruns):
        lo = data.draw(st.integers(0, flat.size - 1))
        starts.append(lo)
        lengths.append(data.draw(st.integers(0, flat.size - lo)))
    src, pos, elem, step, ln = strided_pieces(s, np.array(starts, np.int64), np.array(lengths, np.int64))
    assert (ln > 0).all()
    got = [[] for _ in range(nruns)]
    for r, p, e, d, n in zip(src, pos, elem, step, ln):
        assert p >= starts[r] and p + n <= starts[r] + lengths[r]
        got[r] += (e + d * np.arange(n)).tolist()
    for r in range(nruns):
        assert got[r] == flat[starts[r]:starts[r] + lengths[r]].tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.integers(1, 8))
def test_chunk_runs_cuts_tiles_as_chunks_does(tile_of, grain):
    """The partitioner's vertices from a mapping's runs hold exactly the elements
    its element-array `chunks` gives them, vertex by vertex."""
    from types import SimpleNamespace
    from popdsl.passes.partition import Partitioner
    p = SimpleNamespace(workers=6)
    tile_of = np.array(tile_of, np.int32)
    want = list(Partitioner.chunks(p, tile_of, grain=grain))
    got = list(Partitioner.chunk_runs(p, Mapping.from_elements(tile_of), grain=grain))
    assert [s for s, _, _ in got] == [s for s, _, _ in want]
    for (_, rb, tiles), (_, pos, want_tiles) in zip(got, want):
        np.testing.assert_array_equal(rb.array(), pos)
        np.testing.assert_array_equal(tiles, want_tiles)


@given(st.lists(st.integers(-2**62, 2**62), max_size=40) | st.lists(st.integers(-3, 3), max_size=40),
       st.sampled_from([np.int64, np.int32, np.uint8]), st.booleans())
def test_unique_is_numpys(values, dtype, matrix):
    """`unique` (a sort) gives what np.unique gives: values, order, dtype and shape,
    for any integer array (a matrix flattened)."""
    a = np.array(values, np.int64).astype(dtype)
    if matrix and a.size % 2 == 0:
        a = a.reshape(2, -1)
    got, want = unique(a), np.unique(a)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
