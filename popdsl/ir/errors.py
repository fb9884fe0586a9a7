"""Runtime errors of vertex code, shared by the JIT (`popdsl.codegen.jit`) and the
reference evaluator (`popdsl.ir.codelet_eval`), so both raise the very same type.

Requires nothing; produces `VertexError`.
"""
from __future__ import annotations

from popdsl.ir.codelet import ERR_BOUNDS, ERR_CYCLES, ERR_DIV_ZERO, ERR_INTERRUPT

KIND_NAMES = {ERR_BOUNDS: "index out of bounds", ERR_DIV_ZERO: "integer division by zero",
              ERR_CYCLES: "over its cycle budget", ERR_INTERRUPT: "interrupted"}


class VertexError(Exception):
    """A vertex stopped on a runtime error.

    kind: `ERR_BOUNDS`, `ERR_DIV_ZERO` or `ERR_CYCLES`; vertex: the table row (or
    element index for an element-wise map); field: field name ("" when no field is
    involved); axis, index, size: the failing axis, index value and axis size (-1,
    0, 0 when not a bounds error; for ERR_CYCLES index is the cycles counted when
    the vertex stopped and size its budget).  `codelet` names the codelet when known.
    """

    def __init__(self, kind: int, vertex: int, field: str = "", axis: int = -1,
                 index: int = 0, size: int = 0, codelet: str = ""):
        self.kind, self.vertex, self.field = int(kind), int(vertex), field
        self.axis, self.index, self.size = int(axis), int(index), int(size)
        self.codelet = codelet
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"codelet {self.codelet}, " if self.codelet else ""
        if self.kind == ERR_BOUNDS:
            return (f"{where}vertex {self.vertex}: index {self.index} out of bounds for "
                    f"axis {self.axis} of field '{self.field}' with size {self.size}")
        if self.kind == ERR_CYCLES:
            return (f"{where}vertex {self.vertex}: ran {self.index:,} cycles, over its budget "
                    f"of {self.size:,}")
        return f"{where}vertex {self.vertex}: {KIND_NAMES.get(self.kind, f'error {self.kind}')}"

    def key(self) -> tuple:
        """Everything but the codelet name, for comparing two reports."""
        return (self.kind, self.vertex, self.field, self.axis, self.index, self.size)

    def __reduce__(self):
        return (VertexError, (self.kind, self.vertex, self.field, self.axis, self.index,
                              self.size, self.codelet))
