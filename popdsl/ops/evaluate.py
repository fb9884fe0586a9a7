"""Reference evaluator of tensor programs: the living definition the compiled graph is
checked against (tinygrad's idea: one table of ops, and a plain evaluator over it).

Requires the operation table (each op's numpy `ref`) and, for scalar codelets applied
element-wise, the codelet IR reference evaluator; produces the value of every output
of an elaborated graph, given its inputs: numpy only, one op at a time, in float64
where an op's ref computes in float64, then cast to the node's dtype.  Slow by design
and obvious by design; tests compare the simulator's outputs with it.

`float64=True` keeps every floating value in float64 (f32 and f16 alike, casts
between them the identity): the mode the gradient checks difference, where
rounding to f32 would swamp a central difference.
"""
from __future__ import annotations

import numpy as np

from popdsl.ir import codelet as cir
from popdsl.ir.codelet_eval import map_elements
from popdsl.ir.index import as_array
from popdsl.ir.tensor import Node
from popdsl.ops import op
from popdsl.ops.core import FLOATS, numpy_dtype


def evaluate(roots: list[Node], tensors: dict[int, np.ndarray], codelets: dict[str, cir.Codelet] | None = None,
             memo: dict[int, np.ndarray] | None = None, float64: bool = False) -> list[np.ndarray]:
    """Values of `roots`; `tensors` gives every graph tensor a leaf reads (by id)."""
    memo = {} if memo is None else memo
    codelets = codelets or {}
    order: list[Node] = []
    seen: set[int] = set()
    stack = [(r, False) for r in reversed(roots)]
    while stack:                       # operands before users, without recursion
        n, ready = stack.pop()
        if ready:
            order.append(n)
            continue
        if n.id in seen or n.id in memo:
            continue
        seen.add(n.id)
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args))
    with np.errstate(all="ignore"):
        for n in order:
            memo[n.id] = _value(n, [memo[a.id] for a in n.args], tensors, codelets, float64)
    return [memo[r.id] for r in roots]


def _value(n: Node, args: list[np.ndarray], tensors, codelets, float64: bool) -> np.ndarray:
    dt = np.dtype(np.float64) if float64 and n.dtype in FLOATS else numpy_dtype(n.dtype)
    if n.op == "tensor":
        v = tensors[n.attrs[0]]
    elif n.op == "view":
        v = np.asarray(tensors[n.attrs[0]]).reshape(-1)[as_array(n.index)]
    elif n.op.startswith("call:"):
        c = codelets[n.op[5:]]
        shape = n.shape
        ins = [np.ascontiguousarray(np.broadcast_to(a.astype(numpy_dtype(f.dtype)), shape)).reshape(-1)
               for a, f in zip(args, c.fields)]
        out = np.zeros(int(np.prod(shape, dtype=np.int64)), numpy_dtype(c.ret))
        map_elements(c, out, *ins, scalar_codelets={k: x for k, x in codelets.items() if x.ret is not None})
        v = out.reshape(shape)
    elif n.index is not None:           # an op whose node carries an index array (place)
        v = op(n.op).ref(n.attrs, n.index, *args)
    else:
        v = op(n.op).ref(n.attrs, *args)
    v = np.asarray(v)
    if v.dtype != dt:
        v = v.astype(dt)
    return np.broadcast_to(v, n.shape) if v.shape != n.shape else v


def run_graph(graph, feeds: dict[str, np.ndarray], float64: bool = False) -> dict[str, np.ndarray]:
    """The outputs of elaborated graph `graph` (`ir.graph.TensorGraph`) for one step
    from its initial state: inputs from `feeds`, variables and parameters from their
    initial values.  Poplar-level outputs (views of graph tensors) read the tensor as
    it stands before any compute set runs."""
    return step_graph(graph, feeds, float64)[0]


def step_graph(graph, feeds: dict[str, np.ndarray], float64: bool = False):
    """One step from the initial state: (outputs, {name: the value the step writes
    into each var or param it updates} — an optimizer's new parameters, a running
    statistic)."""
    tensors: dict[int, np.ndarray] = {}
    for t in graph.tensors:
        dt = np.dtype(np.float64) if float64 and t.dtype in FLOATS else numpy_dtype(t.dtype)
        if t.kind == "input":
            tensors[t.id] = np.asarray(feeds[t.name]).astype(dt).reshape(t.shape)
        else:
            tensors[t.id] = np.asarray(graph.init.get(t.id, np.zeros(t.shape, dt))).astype(dt)
    memo: dict[int, np.ndarray] = {}
    out = {}
    for name, v in graph.outputs:
        if isinstance(v, Node):
            out[name] = evaluate([v], tensors, graph.codelets, memo, float64)[0]
        else:
            out[name] = tensors[v.tensor].reshape(-1)[as_array(v.index)]
    new = {graph.tensors[tid].name: evaluate([v], tensors, graph.codelets, memo, float64)[0]
           for tid, v in graph.updates.items()}
    return out, new
