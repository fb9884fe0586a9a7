"""Where each tile's memory lives in the simulator's host buffer.

Requires an Executable (its global addresses are tile × tile_memory + offset);
produces the window stride and the mapping to host byte offsets.

A tile only uses the bottom of its memory, up to its planned peak, so the simulator
packs the tiles' windows: offset `o` of tile `t` lives at host byte t × stride + o,
where stride is the furthest byte any tensor, copy or vertex field reaches on any
tile, rounded up to 64.  Every planned offset is kept, only the unused top of each
tile is left out — and the host touches a few megabytes of dense pages instead of
the same bytes spread over 900 MB (on a GC200), which keeps the TLB and the caches
useful.  If an access crosses the end of its tile (a plan never makes one) the
stride stays tile_memory: the layout is then exactly the global one.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import executable as X


def window_stride(exe: X.Executable) -> int:
    tm = exe.target.tile_memory
    reach = 64

    def see(start: np.ndarray, nbytes) -> bool:
        """Record accesses; False if one crosses its tile's end."""
        nonlocal reach
        if not start.size:
            return True
        off = start % tm
        if np.any((nbytes > 0) & (off + nbytes > tm)):
            return False
        reach = max(reach, int((off + nbytes).max()))
        return True

    ok = True
    for cs in exe.compute_sets:
        for c in (cs.pre, cs.post):
            ok = ok and see(c.src, c.nbytes) and see(c.dst, c.nbytes)
        for g in cs.groups:
            for _, addr, extent in X.field_extents(exe.codelets[g.codelet], g.table):
                ok = ok and see(addr, extent)
    for c in exe.copies:
        ok = ok and see(c.src, c.nbytes) and see(c.dst, c.nbytes)
    for t, r in zip(exe.tensors, exe.tensor_runs):
        ok = ok and see(r.addrs, r.counts * X.cir.ELEM_BYTES[t.dtype])
    for r in exe.reads:
        ok = ok and see(r.addrs.reshape(-1), X.cir.ELEM_BYTES[r.dtype])
    if not ok:
        return tm
    return min(tm, -(-reach // 64) * 64)


def to_host(addrs: np.ndarray, tile_memory: int, stride: int) -> np.ndarray:
    """Global byte addresses → host byte offsets (int64, same shape)."""
    if stride == tile_memory:
        return addrs
    tile, off = np.divmod(addrs, tile_memory)
    return tile * stride + off


def host_copy(c: X.CopyTable, tile_memory: int, stride: int) -> X.CopyTable:
    if stride == tile_memory or not c:
        return c
    return X.CopyTable(to_host(c.src, tile_memory, stride), to_host(c.dst, tile_memory, stride), c.nbytes,
                       c.cycles, c.exchange_bytes, c.local_bytes)


def host_table(c, table: np.ndarray, tile_memory: int, stride: int) -> np.ndarray:
    """A vertex table with its address columns in host offsets."""
    if stride == tile_memory:
        return table
    out = table.copy()
    for j, col in enumerate(X.cir.table_layout(c)):
        if col.kind == "addr":
            out[:, j] = to_host(table[:, j], tile_memory, stride)
    return out
