"""Vertex state as a tile holds it: a tile's vertices of one table as multi-vertices
(ir.vertex_state), checked against a per-multi-vertex count written out longhand."""
import numpy as np
from hypothesis import given, settings, strategies as st

from popdsl.ir.codelet import STATE_WORD_BYTES
from popdsl.ir.vertex_state import state_bytes

W = STATE_WORD_BYTES


def longhand(table, tiles, ntiles, workers, addresses, region=None):
    """One multi-vertex at a time, one column at a time."""
    out = np.zeros(ntiles, np.int64)
    for tile in range(ntiles):
        rows = np.flatnonzero(tiles == tile)
        for i in range(0, rows.size, workers):
            mv = rows[i:i + workers]
            words = int(mv.size > 1)
            for c in range(table.shape[1]):
                vals = table[mv, c]
                one_region = region is None or len(set(region[mv, c].tolist())) == 1
                steps = set(np.diff(vals).tolist())
                if mv.size == 1 or (steps == {0} and one_region):
                    words += 1
                elif len(steps) == 1 and addresses[c] and one_region:
                    words += 2
                else:
                    words += mv.size
            out[tile] += min(words, mv.size * table.shape[1]) * W
    return out


def test_worker_slices_of_one_piece_hold_their_pointers_as_base_and_step():
    # Six workers' slices of one element-wise piece: x and y advance by 64 B, the
    # size agrees; one vertex on tile 1.
    table = np.array([[64 * i, 1024 + 64 * i, 16] for i in range(6)] + [[0, 512, 16]])
    tiles = np.array([0] * 6 + [1])
    got = state_bytes(table, tiles, 2, 6, np.array([True, True, False]))
    assert got.tolist() == [(2 + 2 + 1 + 1) * W, 3 * W]
    # Counted a vertex each, it was 6 x 3 words on tile 0.
    assert got[0] < 6 * 3 * W


def test_pointers_into_different_regions_are_a_worklist():
    table = np.array([[0, 7], [0, 7], [0, 7]])
    region = np.array([[0, -1], [1, -1], [2, -1]])
    got = state_bytes(table, np.zeros(3, np.int64), 1, 6, np.array([True, False]), region)
    assert got.tolist() == [(3 + 1 + 1) * W]


def test_more_vertices_than_workers_are_several_multi_vertices():
    table = np.array([[8 * i, 5] for i in range(8)])
    got = state_bytes(table, np.zeros(8, np.int64), 1, 6, np.array([True, False]))
    assert got.tolist() == [(2 + 1 + 1) * W * 2]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_matches_longhand_and_never_exceeds_a_vertex_per_worker(data):
    nv = data.draw(st.integers(1, 30))
    cols = data.draw(st.integers(0, 4))
    ntiles = data.draw(st.integers(1, 4))
    workers = data.draw(st.integers(1, 6))
    tiles = np.array(data.draw(st.lists(st.integers(0, ntiles - 1), min_size=nv, max_size=nv)))
    # Small values so that agreement and progressions happen often.
    table = np.array(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=cols, max_size=cols),
                                        min_size=nv, max_size=nv)), np.int64).reshape(nv, cols) * 8
    addresses = np.array(data.draw(st.lists(st.booleans(), min_size=cols, max_size=cols)), bool)
    region = None
    if data.draw(st.booleans()):
        region = np.where(addresses[None, :], np.array(data.draw(st.lists(
            st.integers(0, 1), min_size=nv * cols, max_size=nv * cols))).reshape(nv, cols), -1)
    got = state_bytes(table, tiles, ntiles, workers, addresses, region)
    assert got.tolist() == longhand(table, tiles, ntiles, workers, addresses, region).tolist()
    per_vertex = np.bincount(tiles, minlength=ntiles) * cols * W
    assert (got <= per_vertex).all()
