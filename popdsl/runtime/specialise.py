"""Specialised drivers: a host-speed detail of the simulator, not of the model.

Requires an Executable's vertex tables and the codelets' table layouts; produces,
per vertex group, the table columns (row strides, size symbols, state values) that
hold one value in every row.  The JIT then emits a driver with those values as
constants (`llvm.emit_module(specs=...)`), so LLVM unrolls a 16-wide inner loop
into two vector instructions and keeps a row of accumulators in registers where
the generic driver runs a runtime-length loop over memory.

What the model says does not change: a specialised driver runs the same codelet IR
and counts the same cycles (costs are charged per executed IR statement, and a loop
runs as many times with its bound folded), errors report the same field, axis and
index, and the memory plan counts the generic driver's code bytes — on the device
one codelet serves every vertex.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import codelet as ir

# A specialised driver costs one more LLVM compile of the codelet (cached on disk);
# groups smaller than this run the generic driver.
MIN_ROWS = 32


def constant_columns(c: ir.Codelet, table: np.ndarray,
                     min_rows: int | None = None) -> tuple[tuple[int, int], ...]:
    """((column, value), ...) for every non-address column of `c`'s vertex table
    holding one value in all rows; () when the table has fewer than `min_rows`
    (default MIN_ROWS)."""
    if table.shape[0] < max(1, MIN_ROWS if min_rows is None else min_rows):
        return ()
    out = []
    for col, column in enumerate(ir.table_layout(c)):
        if column.kind == "addr":
            continue
        v = table[:, col]
        if (v == v[0]).all():
            out.append((col, int(v[0])))
    return tuple(out)


def group_specs(exe) -> list[list[tuple[tuple[int, int], ...]]]:
    """Per compute set, per vertex group: its constant columns (see above)."""
    return [[constant_columns(exe.codelets[g.codelet], g.table) for g in cs.groups]
            for cs in exe.compute_sets]
