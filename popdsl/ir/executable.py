"""The executable: a planned vertex graph, everything as numpy arrays and small
frozen records.  `passes.memplan` produces it; the simulator runs it; `.popx` files
hold it (with codelet IR, never native code)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir
from popdsl.ir.index import ramps
from popdsl.ir.initializers import InitialValues
from popdsl.ir.target import Target
from popdsl.node import node


@node
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str                      # "var" | "input" | "param" | "temp"
    span: Span


@dataclass(eq=False)
class CopyTable:
    """Runs of bytes to copy: global byte addresses src and dst, lengths nbytes
    (int64 arrays of one length).  `cycles` is the exchange estimate (bytes in and
    out of each tile at the target's rate)."""
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    cycles: int = 0
    exchange_bytes: int = 0        # bytes that cross between tiles
    local_bytes: int = 0           # on-tile rearrangement

    def __bool__(self) -> bool:
        return bool(self.src.size)


@dataclass(eq=False)
class VertexTable:
    codelet: str
    table: np.ndarray              # int64 (nverts, ncols), see ir.codelet.table_layout
    tiles: np.ndarray              # int32 per vertex, ascending
    span_ids: np.ndarray           # int32 per vertex, into Executable.spans


@dataclass(eq=False)
class ComputeSetExec:
    name: str
    span: Span
    groups: list[VertexTable]
    pre: CopyTable                 # exchange into the vertices' buffers
    post: CopyTable                # results back from buffers to their tensors


# Program tree with integer references (compute set index, copy index, tensor index).
@node
class PSeq:
    body: tuple["PNode", ...]


@node
class PExecute:
    cs: int


@node
class PCopy:
    copy: int


@node
class PRepeat:
    count: int
    body: PSeq


@node
class PWhile:
    cond: int                      # index into Executable.reads
    body: PSeq


@node
class PIf:
    cond: int
    then: PSeq
    orelse: PSeq


@node
class PPrint:
    read: int


PNode = Union[PSeq, PExecute, PCopy, PRepeat, PWhile, PIf, PPrint]


@dataclass(eq=False)
class TensorRuns:
    """Where a tensor's elements live, as runs: elements [starts[k], starts[k] +
    counts[k]) at global byte addresses from addrs[k] on, contiguous (a run lies in
    one tile).  The runs cover the tensor's elements once, in order."""
    starts: np.ndarray             # int64
    counts: np.ndarray             # int64
    addrs: np.ndarray              # int64

    def addresses(self, elem_bytes: int) -> np.ndarray:
        """The address of every element (the definition; small tensors and tests)."""
        n = int(self.counts.sum())
        out = np.empty(n, np.int64)
        pos = np.repeat(self.starts, self.counts) + ramps(self.counts)
        out[pos] = np.repeat(self.addrs, self.counts) + ramps(self.counts) * elem_bytes
        return out


@dataclass(eq=False)
class Read:
    """Elements read back from device memory: a label, dtype, shape and addresses."""
    label: str
    dtype: str
    addrs: np.ndarray              # int64, shaped as the value


CATEGORIES = ("always_live", "not_always_live", "exchange_buffers", "vertex_state", "code")


@dataclass(eq=False)
class MemoryPlan:
    """Bytes per tile (int64 arrays of length tiles).

    By category, with no sharing: always_live (variables, inputs, parameters),
    not_always_live (results of the tensor program), exchange_buffers,
    vertex_state, code.  Data as planned: `planned` (the top of the tile's plan),
    `lower_bound` (the peak of live bytes), `naive_data` (the plan with no sharing).  `timeline`: live data bytes over all
    tiles at each program point, named by `timeline_labels`; `timeline_categories`
    splits it: always_live, not_always_live, exchange_buffers (empty for a plan
    read from a file that predates it)."""
    always_live: np.ndarray
    not_always_live: np.ndarray
    exchange_buffers: np.ndarray
    vertex_state: np.ndarray
    code: np.ndarray
    planned: np.ndarray
    lower_bound: np.ndarray
    naive_data: np.ndarray
    timeline: np.ndarray
    timeline_labels: list
    timeline_categories: dict = field(default_factory=dict)

    @property
    def fixed(self) -> np.ndarray:
        return self.vertex_state + self.code

    @property
    def naive(self) -> np.ndarray:
        """Every region its own bytes (the --no-reuse plan), plus vertex state and code."""
        return self.naive_data + self.fixed

    @property
    def total(self) -> np.ndarray:
        """What the tile holds as planned."""
        return self.planned + self.fixed

    @property
    def bound_total(self) -> np.ndarray:
        return self.lower_bound + self.fixed


@dataclass(eq=False)
class Executable:
    name: str
    target: Target
    codelets: dict[str, cir.Codelet]
    tensors: list[TensorInfo]
    tensor_runs: list[TensorRuns]           # where each tensor's elements live
    init: InitialValues                     # tensor id → initial values (drawn ones as recipes)
    compute_sets: list[ComputeSetExec]
    copies: list[CopyTable]
    reads: list[Read]
    program: PSeq
    inputs: dict[str, int]
    outputs: dict[str, int]                 # name → index into reads
    spans: list[Span]
    memory: MemoryPlan
    unchecked: bool = False
    ops: list[dict] = field(default_factory=list)   # tensor ops: op, shape, source, compute set indices
    # A training step's recomputation (passes.recompute): mode, segments, bytes kept
    recompute: dict = field(default_factory=dict)
    # Repeated parts built once and called (passes.outline): per function its name,
    # kind, calls, instances, compute set indices, bytes copied in and out per call
    functions: list[dict] = field(default_factory=list)

    def addresses(self, i: int) -> np.ndarray:
        """The global byte address of every element of tensor `i`, in flat order
        (O(elements): for small tensors, tests and tools)."""
        return self.tensor_runs[i].addresses(cir.ELEM_BYTES[self.tensors[i].dtype])

    def tensor_index(self, name: str) -> int | None:
        for i, t in enumerate(self.tensors):
            if t.name == name:
                return i
        return None


def field_extents(c: cir.Codelet, table: np.ndarray):
    """Per edge field of vertex codelet `c`: (field, first byte address per row,
    bytes from there to the end of its last element per row), given the sizes in
    `table` (rows with an empty field have extent 0)."""
    col = {(k.kind, k.name): j for j, k in enumerate(cir.table_layout(c))}
    sym = {s: table[:, col[("sym", s)]] for s in c.symbols}
    out = []
    for f in c.fields:
        if f.direction == "state":
            continue
        es = cir.ELEM_BYTES[f.dtype]
        addr = table[:, col[("addr", f.name)]]
        dims = [sym[x] if isinstance(x, str) else np.int64(x) for x in f.dims]
        if f.rank == 0:
            extent = np.full(addr.shape, es, np.int64)
        elif f.rank == 1:
            extent = np.broadcast_to(dims[0] * es, addr.shape)
        else:
            # The stride counts elements of the lane type (a vector's lanes).
            stride = table[:, col[("stride", f.name)]] * cir.ELEM_BYTES[cir.lane_type(f.dtype)]
            extent = np.where((dims[0] > 0) & (dims[1] > 0), (dims[0] - 1) * stride + dims[1] * es, 0)
            extent = np.broadcast_to(extent, addr.shape)
        out.append((f, addr, extent.astype(np.int64)))
    return out
