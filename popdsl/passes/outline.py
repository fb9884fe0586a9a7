"""Outlining: repeated parts of the tensor program become functions, built once.

Requires the recompute stage's graph, with the units elaboration recorded
(`NodeTable.regions`: each def call, loop iteration and statement of the tensor
program, as the range of node ids it made).  Produces the same graph with
`graph.functions`: groups of units with the same structure, which the partitioner
builds once (compute sets, vertices, vertex state, exchange) and calls at each
instance.  Nothing else changes: outlining is a decision, partitioning carries it
out.

- A unit's body is the nodes it made that the step computes (leaves, constants and
  nodes made before it are not in it).  Its inputs are what its body reads from
  outside; its outputs, body nodes read from outside (a later layer, a var's new
  value, the backward pass of a training step).
- Its structural key: each body node's op, attributes, shape, dtype (and index,
  for the ops that hold one), with operands numbered by body position or input
  position; the inputs' shapes and dtypes.  Units
  with equal keys compute the same function of their inputs.  Two calls of a def
  with other shapes or compile-time arguments have other keys: one function per
  specialisation.
- The largest units are taken first; a unit whose nodes a chosen function already
  holds is not considered again (a def call inside a repeated def call is part of
  the outer function).  A function needs at least two disjoint instances, a
  value of at least `THRESHOLD` (its ops' values from the operation table:
  PopART's, where a convolution or matrix product is worth 1000 and a relu 0.1,
  and its threshold, 1), and work enough to give every tile a vertex (`GRAIN`
  elements each, results of ops that place vertices): below that, what a call
  adds (copies, a sync each) outweighs what it saves.
- An input that is the same node at every instance (a weight the calls share, a
  constant tensor) is bound once, not copied at each call (`Function.shared`).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import replace

import numpy as np

from popdsl import ops
from popdsl.ir import graph as g
from popdsl.ir import printer
from popdsl.ir.tensor import Node
from popdsl.node import node
from popdsl.ops.blocks import GRAIN
from popdsl.passes.autodiff import topological

_RANK = {"statement": 0, "loop": 1}     # a def call: 2
THRESHOLD = 1.0      # PopART's outlineThreshold


@node(eq=False)
class Instance:
    label: str                       # the unit's call path ("stage_3.bottleneck_2")
    body: tuple[int, ...]            # node ids, ascending (operands before users)
    made: tuple[int, int]            # the range of node ids the unit made
    inputs: tuple[Node, ...]         # in the order the body first reads them
    outputs: tuple[Node, ...]        # body nodes read from outside, ascending


@node(eq=False)
class Function:
    name: str                        # "bottleneck", "bottleneck.2" (one per specialisation)
    kind: str                        # the def's name, "loop" or "statement"
    instances: tuple[Instance, ...]  # in program order
    shared: tuple[bool, ...]         # per input: the same node at every instance
    ops: int                         # body operations that place vertices


def _roots(graph: g.TensorGraph) -> list[Node]:
    return [v for _, v in graph.outputs if isinstance(v, Node)] + list(graph.updates.values())


def _places_vertices(n: Node) -> bool:
    return n.op != "const" and ops.op(n.op).kind in ("elementwise", "compute")


def _worth(work: list[Node], graph: g.TensorGraph) -> bool:
    """Whether a unit doing `work` (its ops that place vertices) is worth a function."""
    return sum(ops.op(n.op).value for n in work) >= THRESHOLD and \
        sum(n.numel for n in work) >= GRAIN * graph.target.tiles


def _unit(label: str, body: list[Node], users: dict[int, list[int]], roots: set[int], made=(0, 0)):
    """(Instance, structural key) of a unit whose body is `body` (ascending ids)."""
    local: dict[int, int] = {}
    inputs: list[Node] = []
    where: dict[int, int] = {}
    sig = []
    for n in body:
        refs = []
        for a in n.args:
            if a.id in local:
                refs.append(local[a.id])
            elif a.op == "const":
                refs.append(("c", a.attrs, a.shape, a.dtype))
            else:
                if a.id not in where:
                    where[a.id] = len(inputs)
                    inputs.append(a)
                refs.append(("i", where[a.id]))
        index = hashlib.sha1(n.index.tobytes()).hexdigest() + str(n.index.shape) if n.index is not None else None
        sig.append((n.op, n.attrs, n.shape, n.dtype, index, tuple(refs)))
        local[n.id] = len(local)
    ids = set(local)
    outputs = tuple(n for n in body if n.id in roots or any(u not in ids for u in users.get(n.id, ())))
    key = (tuple(sig), tuple((a.shape, a.dtype) for a in inputs))
    return Instance(label, tuple(n.id for n in body), made, tuple(inputs), outputs), key


def outline(graph: g.TensorGraph, enabled: bool = True) -> g.TensorGraph:
    """A new graph with `functions` set (none when `enabled` is false)."""
    out = graph.copy()
    out.functions = []
    if not enabled or graph.nodes is None or not graph.nodes.regions:
        return out
    order = topological(_roots(graph))
    live = {n.id: n for n in order}
    roots = {n.id for n in _roots(graph)}
    users: dict[int, list[int]] = {}
    for n in order:
        for a in n.args:
            users.setdefault(a.id, []).append(n.id)
    live_ids = sorted(i for i, n in live.items() if n.op != "const" and ops.op(n.op).kind != "leaf")
    units: dict[tuple[int, ...], tuple[int, Instance, tuple, str, int]] = {}
    for label, kind, first, end in graph.nodes.regions:
        lo, hi = bisect.bisect_left(live_ids, first), bisect.bisect_left(live_ids, end)
        body = [live[i] for i in live_ids[lo:hi]]
        work = [n for n in body if _places_vertices(n)]
        if not _worth(work, graph):
            continue
        nops = len(work)
        inst, key = _unit(label, body, users, roots, (first, end))
        # A statement that is one def call, a loop iteration of one statement: one
        # unit, named by the def, else the loop.
        rank = _RANK.get(kind, 2)
        if inst.body not in units or units[inst.body][0] < rank:
            units[inst.body] = (rank, inst, key, kind, nops)
    # A part the backward pass recomputes (passes.recompute) is the same function of
    # its checkpoints: another instance, a call of the same function.
    clone = {orig: c for c, orig in graph.nodes.clone_of.items()}
    for _, inst, key, kind, nops in list(units.values()):
        ids = [clone.get(i) for i in inst.body]
        if ids and all(i is not None and i in live for i in ids):
            again, k2 = _unit(inst.label + ".recompute", [live[i] for i in sorted(ids)], users, roots)
            if k2 == key and again.body not in units:
                units[again.body] = (_RANK.get(kind, 2), again, key, kind, nops)
    groups: dict[tuple, list[Instance]] = {}
    size: dict[tuple, int] = {}
    kind_of: dict[tuple, str] = {}
    for _, inst, key, kind, nops in units.values():
        groups.setdefault(key, []).append(inst)
        size[key] = nops
        kind_of.setdefault(key, kind)
    claimed: set[int] = set()
    names: dict[str, int] = {}
    for key in sorted(groups, key=lambda k: (-size[k], groups[k][0].body[0])):
        free = [i for i in groups[key] if not claimed.intersection(i.body)]
        chosen: list[Instance] = []
        for inst in sorted(free, key=lambda i: i.body[0]):
            if not any(set(inst.body).intersection(c.body) for c in chosen):
                chosen.append(inst)
        if len(chosen) < 2:
            continue
        for inst in chosen:
            claimed.update(inst.body)
        out.functions.append(_function(kind_of[key], kind_of[key], names, chosen, size[key], live))
    # The backward pass of each function's instances, where it has the same
    # structure in each: one backward function (PopXL's gradient graph per block).
    for f in list(out.functions):
        for backward in _backward_units(graph, f, live, users, roots):
            if not claimed.intersection(*(i.body for i in backward)):
                for inst in backward:
                    claimed.update(inst.body)
                out.functions.append(_function(f.name + ".grad", f.kind + ".grad", names, backward,
                                               _count_ops(graph, backward[0]), live))
    return out


def _function(name: str, kind: str, names: dict[str, int], chosen: list[Instance], nops: int, live) -> Function:
    """A function named `name`, numbered if a function has the name already.  Its
    outputs are what any instance's outside reads (a forward layer the backward
    pass recomputes has its activations read by the backward pass, not by the
    forward one's): every call copies them all out."""
    at = sorted({i.body.index(o.id) for i in chosen for o in i.outputs})
    chosen = [replace(i, outputs=tuple(live[i.body[k]] for k in at)) for i in chosen]
    names[name] = names.get(name, 0) + 1
    shared = tuple(all(i.inputs[k] is chosen[0].inputs[k] for i in chosen) for k in range(len(chosen[0].inputs)))
    return Function(name if names[name] == 1 else f"{name}.{names[name]}", kind, tuple(chosen), shared, nops)


def _count_ops(graph: g.TensorGraph, inst: Instance) -> int:
    return sum(_places_vertices(graph.nodes.nodes[i]) for i in inst.body)


def _backward_units(graph: g.TensorGraph, f: Function, live: dict, users, roots) -> list[list[Instance]]:
    """The backward pass of f's instances (the nodes autodiff made differentiating
    the nodes each instance made), grouped by structural key, the groups of at
    least two disjoint instances.  The first block of a network differs from the
    rest here: nothing needs the gradient of its input."""
    made = graph.nodes.backward_of
    if not made:
        return []
    fid = np.fromiter((m[0] for m in made), np.int64, len(made))
    order = np.argsort(fid, kind="stable")
    fid = fid[order]
    groups: dict[tuple, list[Instance]] = {}
    held: set[int] = set()
    for inst in f.instances:
        lo, hi = np.searchsorted(fid, inst.made)
        ids = sorted({i for k in order[lo:hi].tolist() for i in made[k][1] if i in live and _holds_work(live[i])})
        if not _worth([live[i] for i in ids if _places_vertices(live[i])], graph) or held.intersection(ids):
            continue
        held.update(ids)
        unit, key = _unit(inst.label + ".grad", [live[i] for i in ids], users, roots)
        groups.setdefault(key, []).append(unit)
    return [units for units in groups.values() if len(units) >= 2]


def _holds_work(n: Node) -> bool:
    return n.op != "const" and ops.op(n.op).kind != "leaf"


def verify(graph: g.TensorGraph) -> None:
    """Instances of a function have equal structural keys, disjoint bodies, and
    read from outside only their inputs.  A failure is a compiler bug."""
    live = {n.id: n for n in topological(_roots(graph))}
    roots = {n.id for n in _roots(graph)}
    users: dict[int, list[int]] = {}
    for n in live.values():
        for a in n.args:
            users.setdefault(a.id, []).append(n.id)
    held: set[int] = set()
    for f in graph.functions:
        keys = set()
        for inst in f.instances:
            assert not held.intersection(inst.body), f"{f.name}: {inst.label} overlaps another instance"
            held.update(inst.body)
            again, key = _unit(inst.label, [live[i] for i in inst.body], users, roots)
            assert again.inputs == inst.inputs and set(again.outputs) <= set(inst.outputs), \
                f"{f.name}: {inst.label} rewired"
            keys.add(key)
        assert len(keys) == 1, f"{f.name}: instances of different structure"
        assert len(f.instances) >= 2, f"{f.name}: a function of one instance"


def dump(graph: g.TensorGraph) -> str:
    lines = [printer.tensor_graph(graph).rstrip("\n"), "", f"functions: {len(graph.functions)}"]
    for f in graph.functions:
        inst = f.instances[0]
        lines.append(f"  {f.name} ({f.kind}): {len(f.instances)} calls, {len(inst.body)} nodes, {f.ops} ops, "
                     f"{len(inst.inputs)} inputs ({sum(f.shared)} shared), {len(inst.outputs)} outputs")
        for i in f.instances:
            lines.append(f"    {i.label}")
    return "\n".join(lines) + "\n"
