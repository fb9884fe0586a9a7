"""Tensor-program IR: a hash-consed DAG of operations on whole tensors.

Produced by elaboration for tensor expressions (`x @ w + b`, `relu(...)`, calls of
stdlib primitives; what each `op` means is its entry in `popdsl.ops`); consumed by
`passes.partition`, which turns every node into compute sets of vertices over the
tiles.  Nodes are interned: building the same
operation on the same operands twice yields the same node, so a repeated
subexpression is computed once and repeated structure is cheap to recognise.

Leaves are tensors of the graph (`tensor`, with a tensor id) or views of them
(`view`, never interned: they carry an index array; so does `place`, a gradient's
way back into the tensor a view was taken from).  Everything else is pure.
"""
from __future__ import annotations

import numpy as np

from popdsl.node import node


@node(eq=False)
class Node:
    id: int
    op: str
    args: tuple["Node", ...]
    attrs: tuple
    shape: tuple[int, ...]
    dtype: str
    index: np.ndarray | None = None      # `view` leaves only

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other) -> bool:
        return self is other


class NodeTable:
    """Interning table: one Node per distinct (op, args, attrs, shape, dtype)."""

    def __init__(self):
        self._by_key: dict[tuple, Node] = {}
        self.nodes: list[Node] = []
        self.spans: dict[int, object] = {}       # node id → span of the source that first made it
        self.span = None                         # set by the elaborator while it evaluates a call
        # node id → what made it, by call path: "stage_2.bottleneck_1.conv_bn_1.conv_1.conv2d"
        self.sites: dict[int, str] = {}
        self.site: str | None = None
        # What the source made as a unit, for outlining (passes.outline): (label, kind,
        # first node id, end node id) per def call ("stage_2.bottleneck_1", the def's
        # name), loop iteration ("loop") and statement ("statement"); the nodes the
        # unit made are those with ids in [first, end) (an operation it repeats from
        # before is the earlier node, interned).
        self.regions: list[tuple[str, str, int, int]] = []
        # (forward node id, node ids): the nodes the backward pass made differentiating
        # that node (passes.autodiff; passes.recompute renumbers what it rebuilds),
        # for outlining the backward pass of a repeated part alike.
        self.backward_of: list[tuple[int, tuple[int, ...]]] = []
        # A forward node recomputed in the backward pass: the clone's id -> the
        # original's (passes.recompute), so a recomputed part calls its function again.
        self.clone_of: dict[int, int] = {}

    def make(self, op: str, args=(), attrs=(), shape=(), dtype="f32", index=None, salt=None) -> Node:
        """`salt` tells apart nodes that compute the same thing on purpose (a
        recomputation of a forward result is not the forward result)."""
        key = None
        if index is None:
            key = (op, tuple(a.id for a in args), attrs, tuple(shape), dtype)
            if salt is not None:
                key += (salt,)
            hit = self._by_key.get(key)
            if hit is not None:
                return hit
        n = Node(len(self.nodes), op, tuple(args), attrs, tuple(int(s) for s in shape), dtype, index)
        self.nodes.append(n)
        if self.span is not None:
            self.spans[n.id] = self.span
        if self.site is not None:
            self.sites[n.id] = self.site
        if key is not None:
            self._by_key[key] = n
        return n

    def copy(self) -> "NodeTable":
        """A table a pass may add nodes to without changing this one (the nodes made
        so far are shared: nodes never change)."""
        t = NodeTable()
        t._by_key, t.nodes, t.spans, t.span = dict(self._by_key), list(self.nodes), dict(self.spans), self.span
        t.sites, t.site, t.regions = dict(self.sites), self.site, list(self.regions)
        t.backward_of, t.clone_of = list(self.backward_of), dict(self.clone_of)
        return t


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy's broadcasting rule, or None when the shapes do not broadcast."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None
