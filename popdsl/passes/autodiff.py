"""Automatic differentiation: reverse mode over the tensor program (README: "Training").

Requires an elaborated `TensorGraph`: its node DAG (defs and compile-time loops are
already unrolled into it, so they need nothing special), the `grad` nodes
elaboration left for `grad(L, [p, q])`, and `graph.minimize` for `minimize L with
OPT(...)`.  Produces a new graph (the given one is left as it was) where
- every `grad` node is replaced by the gradient it names, wherever it is used;
- for `minimize`, every floating parameter the loss depends on gets its optimizer
  update: its new value, and its state's (a momentum buffer, Adam's moments, made
  here as `var` tensors named after the parameter: `dense_1.w.momentum`), are
  `graph.updates` entries, written at the end of each step like any var the
  program assigns, so partitioning and memory planning treat them like everything
  else and `--save-params` saves them.

Reverse mode: the nodes on a path from a differentiated tensor to the loss, taken
in reverse topological order; each asks its op's rule (`OpDef.grad`) for its
operands' gradients, built with the shape rules users get; contributions to one
node are added; `reduce.unbroadcast` sums the axes an operand was broadcast along.
Only floating nodes that depend on a differentiated tensor are on a path, so
integer labels, comparisons and argmax need no rule.  A view leaf of a parameter
(`reshape(gamma, [C, 1, 1])`, `w[0]`) sends its gradient back with `place`.  An op
without a rule on a path is an error at its call site.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.ir import graph as g
from popdsl.ir.mapping import Mapping
from popdsl.ir.tensor import Node
from popdsl.ops import OPTIMIZERS, elementwise, op
from popdsl.ops.core import FLOATS, Builder
from popdsl.ops.reduce import unbroadcast
from popdsl.ops.shape import broadcast_to, place

LEAVES = ("tensor", "view")              # the IR's leaves that read a graph tensor (attrs[0])


def topological(roots: list[Node]) -> list[Node]:
    """Every node under `roots`, operands before users (no recursion: backward
    programs are deep)."""
    order: list[Node] = []
    seen: set[int] = set()
    stack = [(r, False) for r in reversed(roots)]
    while stack:
        n, ready = stack.pop()
        if ready:
            order.append(n)
            continue
        if n.id in seen:
            continue
        seen.add(n.id)
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args))
    return order


def gradients(b: Builder, loss: Node, wrt: dict[int, tuple], no_rule) -> dict[int, Node]:
    """The gradient of scalar `loss` with respect to each graph tensor in `wrt`
    (tensor id → (shape, dtype)) that it depends on.  no_rule(node) is called for
    each node on a path whose op has no gradient rule."""
    order = topological([loss])
    live: set[int] = set()
    for n in order:
        if n.dtype not in FLOATS:
            continue
        if n.op in LEAVES:
            if n.attrs[0] in wrt:
                live.add(n.id)
        elif any(a.id in live for a in n.args):
            live.add(n.id)
    if loss.id not in live:
        return {}
    spans = b.t.spans
    grads: dict[int, Node] = {loss.id: broadcast_to(b, b.const(1.0, "f32"), loss.shape)}
    out: dict[int, Node] = {}
    saved = b.t.span
    try:
        for n in reversed(order):
            gn = grads.pop(n.id, None)
            if gn is None or n.id not in live:
                continue
            # Backward nodes point at the source of the forward op they come from,
            # and are named after it.
            b.t.span = spans.get(n.id, saved)
            b.t.site = b.t.sites.get(n.id, n.op) + ".grad"
            first = len(b.t.nodes)
            _backward(b, n, gn, live, grads, out, wrt, no_rule)
            if len(b.t.nodes) > first:
                # Which forward node the new nodes differentiate: outlining makes the
                # backward pass of a repeated part one function too.
                b.t.backward_of.append((n.id, tuple(range(first, len(b.t.nodes)))))
    finally:
        b.t.span, b.t.site = saved, None
    return out


def _backward(b: Builder, n: Node, gn: Node, live: set[int], grads: dict, out: dict, wrt, no_rule) -> None:
    """Node n's part of the backward pass, given gn, the gradient with respect to n:
    its operands' gradients added to `grads` (a leaf's to `out`)."""
    if n.op in LEAVES:
        shape, dtype = wrt[n.attrs[0]]
        part = gn if n.op == "tensor" else place(b, gn, n.index, shape, dtype)
        part = elementwise.cast(b, dtype, part)
        prev = out.get(n.attrs[0])
        out[n.attrs[0]] = part if prev is None else elementwise.apply(b, "add", [prev, part], None)
        return
    rule = op(n.op).grad
    if rule is None:
        no_rule(n)
        return
    for i, a in enumerate(n.args):
        if a.id not in live:
            continue
        part = rule(b, n, gn, i)
        if part is None:
            continue
        part = elementwise.cast(b, a.dtype, unbroadcast(b, part, a.shape))
        prev = grads.get(a.id)
        grads[a.id] = part if prev is None else elementwise.apply(b, "add", [prev, part], None)


class _Pass:
    def __init__(self, graph: g.TensorGraph):
        self.g = graph.copy()
        self.g.nodes = graph.nodes.copy()
        self.d = Diagnostics()
        self.b = Builder(self.g.nodes, self.d)
        self.new: dict[int, Node] = {}        # node id → the node that replaces it
        self.reported: set[int] = set()

    def run(self) -> g.TensorGraph:
        gr = self.g
        gr.outputs = [(name, self.rebuild(v) if isinstance(v, Node) else v) for name, v in gr.outputs]
        gr.updates = {tid: self.rebuild(v) for tid, v in gr.updates.items()}
        if gr.minimize is not None:
            self.minimize(gr.minimize)
            gr.minimize = None
        self.d.check()
        return gr

    # ---------------------------------------------------------------- grad(L, [p, q])
    def rebuild(self, root: Node) -> Node:
        """`root` with every `grad` node under it replaced by its gradient."""
        for n in topological([root]):
            if n.id in self.new:
                continue
            args = tuple(self.new.get(a.id, a) for a in n.args)
            if n.op == "grad":
                self.new[n.id] = self.expand(n, *args)
            elif any(x is not a for x, a in zip(args, n.args)):
                self.new[n.id] = self.g.nodes.make(n.op, args, n.attrs, n.shape, n.dtype, index=n.index)
            else:
                self.new[n.id] = n
        return self.new[root.id]

    def expand(self, n: Node, loss: Node, leaf: Node) -> Node:
        t = self.g.tensors[leaf.attrs[0]]
        span = self.g.nodes.spans.get(n.id)
        got = gradients(self.b, loss, {t.id: (t.shape, t.dtype)}, lambda m: self.no_rule(m, "grad", span))
        if t.id in got:
            return got[t.id]
        # The loss does not depend on it: the gradient is zero.
        return broadcast_to(self.b, elementwise.cast(self.b, t.dtype, self.b.const(0.0, "f32")), t.shape)

    def no_rule(self, n: Node, what: str, span: Span | None) -> None:
        if n.id in self.reported:
            return
        self.reported.add(n.id)
        name = f"scalar codelet '{n.op[5:]}'" if n.op.startswith("call:") else f"'{n.op}' ({op(n.op).doc})"
        where = self.g.nodes.spans.get(n.id) or span
        self.d.error(where, f"cannot differentiate through {name}: it has no gradient rule",
                     *([f"'{what}' at {span} differentiates through it"] if span is not None and span != where else []),
                     *(["write the function as a def of tensor primitives to train through it"]
                       if n.op.startswith("call:") else []))

    # ---------------------------------------------------------------- minimize
    def minimize(self, m: g.Minimize) -> None:
        gr, b = self.g, self.b
        loss = self.rebuild(m.loss)
        params = [gr.tensors[tid] for tid in gr.params if gr.tensors[tid].dtype in FLOATS]
        gr.backward_from = len(gr.nodes.nodes)
        got = gradients(b, loss, {t.id: (t.shape, t.dtype) for t in params}, lambda n: self.no_rule(n, "minimize", m.span))
        if not got and not self.d.items:
            self.d.error(m.span, "minimize: the loss depends on no parameter, so there is nothing to train",
                         "params are declared with 'param NAME: TYPE = INIT;'")
            return
        opt = OPTIMIZERS[m.optimizer]
        h = dict(m.hyper)
        saved = b.t.span
        b.t.span = m.span                     # the update's nodes point at the minimize statement
        b.t.site = m.optimizer
        try:
            counters = {}
            for c in opt.counters:
                t = self.new_var(f"{opt.name}.{c}", "f32", (), m.span)
                counters[c] = elementwise.apply(b, "add", [self.leaf(t), b.const(1.0, "f32")], None)
                gr.updates[t.id] = counters[c]
            made = []
            for t in params:
                if t.id not in got:
                    continue               # as PyTorch skips a parameter without a gradient
                state = {s: self.leaf(self.new_var(f"{t.name}.{s}", t.dtype, t.shape, t.span))
                         for s in opt.slots(h)}
                new_p, new_state = opt.update(b, h, self.leaf(t), got[t.id], state, counters)
                made.append((t, [(t.id, elementwise.cast(b, t.dtype, new_p))] +
                             [(state[s].attrs[0], elementwise.cast(b, t.dtype, v)) for s, v in new_state.items()]))
            # Updates run in this order: the last layer's first, so each layer's
            # weight gradient is made as soon as the gradient coming down reaches
            # it, and what it reads (its activations, that gradient) dies then, not
            # at the end of the backward pass.
            first_read: dict[int, int] = {}
            for i, n in enumerate(topological([loss])):
                if n.op in LEAVES:
                    first_read.setdefault(n.attrs[0], i)
            for t, writes in sorted(made, key=lambda m: -first_read.get(m[0].id, -1)):
                gr.updates.update(writes)
        finally:
            b.t.span, b.t.site = saved, None

    def leaf(self, t: g.Tensor) -> Node:
        return self.g.nodes.make("tensor", (), (t.id,), t.shape, t.dtype)

    def new_var(self, name: str, dtype: str, shape, span: Span) -> g.Tensor:
        gr = self.g
        if any(t.name == name for t in gr.tensors):
            self.d.error(span, f"the optimizer's state '{name}' has the name of another tensor")
        t = g.Tensor(len(gr.tensors), name, dtype, tuple(shape), "var", span)
        gr.tensors.append(t)
        gr.mappings[t.id] = Mapping.unmapped(t.numel)
        gr.init[t.id] = np.zeros(shape, np.float16 if dtype == "f16" else np.float32)
        return t


def verify(graph: g.TensorGraph) -> None:
    """What the stage promises: no `grad` node and no `minimize` left for partition,
    and every update of the tensor's own shape and dtype."""
    assert graph.minimize is None
    roots = [v for _, v in graph.outputs if isinstance(v, Node)] + list(graph.updates.values())
    assert not any(n.op == "grad" for n in topological(roots)), "a grad node survived autodiff"
    for tid, node in graph.updates.items():
        t = graph.tensors[tid]
        assert (node.shape, node.dtype) == (t.shape, t.dtype), f"update of {t.name}: {node.dtype}{list(node.shape)}"


def autodiff(graph: g.TensorGraph) -> g.TensorGraph:
    """Gradients and optimizer updates in place of `grad` nodes and `minimize`; a
    graph with neither is returned as it is.  Raises CompileError for an operation
    without a gradient rule on the way."""
    if graph.minimize is None and not any(n.op == "grad" for n in graph.nodes.nodes):
        return graph
    return _Pass(graph).run()


__all__ = ["autodiff", "gradients", "topological", "verify"]
