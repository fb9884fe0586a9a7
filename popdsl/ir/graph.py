"""Tensor graph IR: what elaboration produces and lowering consumes.

Tensors with their per-element tile mapping, views of them (flat element indices,
shaped), compute sets of vertices grouped by codelet (numpy arrays, not an object
per vertex), and the program tree.  Views are plain index arrays so that any slice,
index or reshape a user writes connects the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir
from popdsl.ir.initializers import InitialValues
from popdsl.ir.mapping import Mapping
from popdsl.ir.target import Target
from popdsl.node import node


@node
class Tensor:
    id: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str                  # "var" | "input" | "param" | "temp" (a result of the tensor program)
    span: Span

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def elem_bytes(self) -> int:
        return cir.ELEM_BYTES[self.dtype]


@node(eq=False)
class View:
    """Elements `index` (flat indices into tensor `tensor`, any shape)."""
    tensor: int
    index: np.ndarray
    span: Span

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.index.shape)


@node(eq=False)
class Stacked:
    """One field's connections for a whole group of vertices with equal shapes:
    index[v] is vertex v's view of tensor `tensor`.  The partitioner builds these
    instead of a View per vertex, so a million vertices cost a few numpy arrays."""
    tensor: int
    index: np.ndarray              # (nverts, *field shape)
    span: Span


@dataclass(eq=False)
class VertexGroup:
    """The vertices of one codelet in one compute set.

    tiles, span_ids: one entry per vertex.  connections[field]: one View per vertex,
    or a Stacked; state[field]: one value per vertex; syms[symbol]: bound sizes."""
    codelet: str
    tiles: list[int] = field(default_factory=list)
    span_ids: list[int] = field(default_factory=list)
    connections: dict[str, list[View]] = field(default_factory=dict)
    state: dict[str, list] = field(default_factory=dict)
    syms: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tiles)


@dataclass(eq=False)
class ComputeSet:
    name: str
    span: Span
    groups: list[VertexGroup] = field(default_factory=list)


# ---------------------------------------------------------------- programs

@node
class Seq:
    body: tuple["Prog", ...]


@node
class Execute:
    cs: str
    span: Span


@node(eq=False)
class Copy:
    src: View
    dst: View
    span: Span


@node
class Repeat:
    count: int
    body: Seq


@node(eq=False)
class While:
    cond: View
    body: Seq


@node(eq=False)
class If:
    cond: View
    then: Seq
    orelse: Seq


@node(eq=False)
class Print:
    label: str
    view: View


@node
class Step:
    """Run the tensor program once (replaced by its compute sets in `partition`)."""
    span: Span


Prog = Union[Seq, Execute, Copy, Repeat, While, If, Print, Step]


@node(eq=False)
class Minimize:
    """`minimize LOSS with OPT(...)`: what the autodiff pass differentiates (a scalar
    tensor-program node) and the optimizer that updates the parameters."""
    loss: object
    optimizer: str                             # a name in ops.OPTIMIZERS
    hyper: tuple[tuple[str, float], ...]       # its hyperparameters, every one given or defaulted
    span: Span


@dataclass(eq=False)
class TensorGraph:
    name: str
    target: Target
    codelets: dict[str, cir.Codelet]
    tensors: list[Tensor] = field(default_factory=list)
    # tensor id → initial values; drawn ones held as their recipe (ir.initializers)
    init: InitialValues = field(default_factory=InitialValues)
    mappings: dict[int, Mapping] = field(default_factory=dict)      # tensor id → its tiles, as runs of elements
    compute_sets: dict[str, ComputeSet] = field(default_factory=dict)
    program: Seq = Seq(())
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: list[tuple[str, object]] = field(default_factory=list)  # View, or a tensor-program Node
    nodes: object = None                                             # ir.tensor.NodeTable
    spans: list[Span] = field(default_factory=list)                  # vertex span table
    params: list[int] = field(default_factory=list)                  # trainable tensors (tensor programs)
    ops: list[dict] = field(default_factory=list)                    # per tensor op: its compute sets (partition)
    # (output tensor, input tensor, compute set): an element-wise op whose output may
    # take its input's memory where the input dies there (same layout, element by element)
    inplace: list[tuple[int, int, str]] = field(default_factory=list)
    # var tensor id -> the tensor-program node each step writes into it (at the step's end)
    updates: dict[int, object] = field(default_factory=dict)
    # `minimize`, until the autodiff pass turns it into updates
    minimize: Minimize | None = None
    # Nodes with ids from here on are the backward pass `minimize` made (autodiff);
    # None for a graph that does not train.  Recomputation and the reports use it.
    backward_from: int | None = None
    # What recomputation did (passes.recompute): node id of each forward result the
    # backward pass recomputes -> its segment; the summary the reports print.
    recomputed: dict[int, int] = field(default_factory=dict)
    needs: dict[int, int] = field(default_factory=dict)     # node id -> latest recomputed segment it reads
    recompute: dict = field(default_factory=dict)
    # Repeated parts built once (passes.outline): its Functions, which partitioning
    # builds once and calls; then what partitioning made of them, for the reports
    # (name, kind, calls, instances, compute sets, bytes copied per call).
    functions: list = field(default_factory=list)
    function_summary: list[dict] = field(default_factory=list)

    def span_id(self, span: Span) -> int:
        self.spans.append(span)
        return len(self.spans) - 1

    def copy(self) -> "TensorGraph":
        """A graph a pass may extend without changing this one: new containers, new
        mapping arrays; tensors, views, compute sets already made and nodes are
        shared (no pass changes them)."""
        return replace(self, codelets=dict(self.codelets), tensors=list(self.tensors), init=self.init.copy(),
                       mappings={k: v.copy() for k, v in self.mappings.items()},
                       compute_sets=dict(self.compute_sets), inputs=dict(self.inputs),
                       outputs=list(self.outputs), spans=list(self.spans), params=list(self.params),
                       ops=list(self.ops), inplace=list(self.inplace), updates=dict(self.updates),
                       recomputed=dict(self.recomputed), needs=dict(self.needs),
                       recompute=dict(self.recompute), functions=list(self.functions),
                       function_summary=list(self.function_summary))
