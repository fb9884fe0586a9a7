"""The exchange's cost rule (`ir.cost.tile_bytes`, `copy_cycles`) against its
definition, element by element: a tile sends each byte once however many tiles
receive it; each receiver counts all it receives; on-tile copies count for the
destination."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from popdsl.ir import cost
from popdsl.ir.target import get_target

T = get_target(tiles=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 60), st.integers(0, 5), st.integers(0, 60),
                          st.integers(1, 20)), min_size=1, max_size=40), st.booleans())
def test_tile_bytes_count_each_sent_byte_once(copies, repeat):
    if repeat:      # one source run sent to many tiles, as a broadcast is
        copies = [(copies[0][0], copies[0][1], d, o, copies[0][4]) for _, _, d, o, _ in copies]
    tm = T.tile_memory
    src = np.array([s * tm + a for s, a, _, _, _ in copies], np.int64)
    dst = np.array([d * tm + b for _, _, d, b, _ in copies], np.int64)
    nb = np.array([n for *_, n in copies], np.int64)
    sent, recv, local = np.zeros(T.tiles), np.zeros(T.tiles), np.zeros(T.tiles)
    for tile in range(T.tiles):
        covered = set()
        for (s, a, d, _, n) in copies:
            if s == tile and d != tile:
                covered.update(range(a, a + n))
        sent[tile] = len(covered)
    for (s, _, d, _, n) in copies:
        (recv if s != d else local)[d] += n
    want = np.maximum(np.maximum(sent, recv), local)
    np.testing.assert_array_equal(cost.tile_bytes(src, dst, nb, T), want)
    cycles, moved, on_tile = cost.copy_cycles(src, dst, nb, T)
    assert cycles == -(-int(want.max()) // T.exchange_bytes_per_cycle) + T.sync_cycles
    assert moved == sum(n for s, _, d, _, n in copies if s != d)
    assert on_tile == sum(n for s, _, d, _, n in copies if s == d)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 60), st.integers(0, 5), st.integers(0, 60),
                          st.integers(0, 20)), min_size=0, max_size=40))
def test_native_tile_sums_equal_the_numpy_definition(copies):
    """`native_runs.tile_bytes` (large copy tables) against `cost._sums`; an
    address outside the tiles is left to the definition."""
    from popdsl.ir import native_runs
    tm = T.tile_memory
    src = np.array([s * tm + a for s, a, *_ in copies], np.int64)
    dst = np.array([d * tm + b for _, _, d, b, _ in copies], np.int64)
    nb = np.array([n for *_, n in copies], np.int64)
    got = native_runs.tile_bytes(src, dst, nb, tm, T.tiles)
    for a, b in zip(got, cost._sums(src, dst, nb, tm, T.tiles)):
        np.testing.assert_array_equal(a, b)
    if copies:
        assert native_runs.tile_bytes(src, dst + T.tiles * tm, nb, tm, T.tiles) is None
        assert native_runs.tile_bytes(src - src.max() - 1, dst, nb, tm, T.tiles) is None


def test_a_large_copy_table_is_costed_natively_as_by_its_definition(monkeypatch):
    from popdsl.ir import native_runs
    rng = np.random.default_rng(5)
    n, tm = native_runs.MIN_RUNS * 2, T.tile_memory
    src = rng.integers(0, T.tiles, n) * tm + rng.integers(0, 500, n)
    dst = np.where(rng.random(n) < 0.3, src // tm, rng.integers(0, T.tiles, n)) * tm + rng.integers(0, 500, n)
    nb = rng.integers(1, 64, n)
    calls = []
    kernel = native_runs.tile_bytes
    monkeypatch.setattr(native_runs, "tile_bytes", lambda *a: calls.append(1) or kernel(*a))
    fast = cost.copy_cycles(src, dst, nb, T), cost.tile_bytes(src, dst, nb, T)
    monkeypatch.setattr(native_runs, "tile_bytes", lambda *a: None)
    slow = cost.copy_cycles(src, dst, nb, T), cost.tile_bytes(src, dst, nb, T)
    assert len(calls) == 2 and fast[0] == slow[0]
    np.testing.assert_array_equal(fast[1], slow[1])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(1, 20)), min_size=1, max_size=30),
       st.booleans())
def test_union_per_tile_sorts_by_value_or_falls_back(runs, huge):
    """The union of each tile's runs, whether start and length pack into one sort
    key or not (addresses past 2^40 with a run near 2^26 B: sixteen GC200s of the
    largest tiles)."""
    tm, tiles = (1 << 26, 23552) if huge else (1000, 4)
    base = (tiles - 4) * tm if huge else 0
    start = np.array([base + t * tm + a for t, a, _ in runs], np.int64)
    nb = np.array([n for *_, n in runs], np.int64)
    if huge:            # one long run at the start of the last tile, so no key fits in 63 bits
        start, nb = np.append(start, (tiles - 1) * tm), np.append(nb, tm - 1)
    want = np.zeros(tiles, np.int64)
    for tile in set((start // tm).tolist()):
        merged: list[list[int]] = []
        for s, e in sorted((s, s + n) for s, n in zip(start.tolist(), nb.tolist()) if s // tm == tile):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        want[tile] = sum(e - s for s, e in merged)
    np.testing.assert_array_equal(cost._union_per_tile(start, nb, tm, tiles), want)
