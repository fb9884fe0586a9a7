"""Elaboration of what training adds to tensor programs (README: "Training").

Mixed into the graph elaborator, next to `elaborate_tensor`:
- training mode: a graph that says `minimize` anywhere in its body is elaborated in
  training mode unless the compile asks otherwise (`popc run --eval` compiles the
  same file for inference); `training()` is that mode as a compile-time bool, which
  is how popnn's `batch_norm` chooses batch statistics;
- `grad(L, p)` / `grad(L, [p, q])`: one `grad` node per parameter (what the
  autodiff pass replaces by the gradient), one value or a tuple;
- `minimize L with OPT(...)`: checked (a scalar floating loss, a known optimizer,
  its hyperparameters bound and checked by the optimizer table) and recorded as
  `graph.minimize` for the autodiff pass.  In inference mode it is checked and
  left out.

Requires the elaborator's scopes, diagnostics, `expr`, `call_args` and node table.
"""
from __future__ import annotations

import numpy as np

from popdsl.frontend import ast
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.ops import OPTIMIZERS
from popdsl.ops.core import FLOATS, Function, OpError, bind, describe
from popdsl.passes.elaborate_poplar import kind_of


def says_minimize(stmt) -> bool:
    """Whether a statement (or any statement nested in it) is a `minimize`."""
    if isinstance(stmt, ast.MinimizeStmt):
        return True
    if isinstance(stmt, ast.Block):
        return any(says_minimize(s) for s in stmt.stmts)
    return any(says_minimize(getattr(stmt, f)) for f in ("body", "then", "orelse")
               if isinstance(getattr(stmt, f, None), (ast.Block, ast.IfStmt)))


class TrainMixin:
    """Needs: self.d, self.graph, self.nodes, self.builder, self.context, self.expr,
    self.call_args, self.as_node, self.is_tensor, self.Bad, self.training."""

    def training_call(self, e: ast.Call) -> bool:
        if e.args:
            self.d.error(e.span, "training() takes no arguments: it says whether this compile trains")
            raise self.Bad
        return self.training

    # ---------------------------------------------------------------- grad
    def grad_call(self, e: ast.Call):
        pos, kw = self.call_args(e)
        if kw or len(pos) != 2:
            self.d.error(e.span, "grad takes a loss and the params: grad(loss, w) or grad(loss, [w, b])")
            raise self.Bad
        (loss, loss_span), (wrt, wrt_span) = pos
        node = self.scalar_loss(loss, loss_span, "grad")
        several = isinstance(wrt, list)
        leaves = [self.param_leaf(x, wrt_span) for x in (wrt if several else [wrt])]
        if not leaves:
            self.d.error(wrt_span, "grad: give at least one param")
            raise self.Bad
        self.nodes.span = e.span
        out = tuple(self.builder.make("grad", (node, leaf), (), leaf.shape, leaf.dtype) for leaf in leaves)
        return out if several and len(out) > 1 else out[0]

    def param_leaf(self, v, span) -> Node:
        """The leaf of a whole param, or an error: grad differentiates parameters."""
        if isinstance(v, g.View):
            t = self.graph.tensors[v.tensor]
            if t.kind != "param":
                what = {"input": "an input", "var": "a var (state, not trained)"}.get(t.kind, f"a {t.kind}")
                self.d.error(span, f"grad: '{t.name}' is {what}, not a parameter",
                             "grad differentiates with respect to params, declared with 'param'")
                raise self.Bad
            if v.index.shape != t.shape or not np.array_equal(v.index.ravel(), np.arange(t.numel)):
                self.d.error(span, f"grad: this is part of param '{t.name}'; give the whole param")
                raise self.Bad
            return self.as_node(v, span)
        what = "a tensor expression" if isinstance(v, Node) else f"{kind_of(v)} {v!r}"
        self.d.error(span, f"grad: differentiates with respect to params, found {what}",
                     "name params declared with 'param': grad(loss, [w, b])")
        raise self.Bad

    def scalar_loss(self, v, span, what: str) -> Node:
        if not self.is_tensor(v):
            self.d.error(span, f"{what}: the loss must be a tensor, found {kind_of(v)} {v!r}")
            raise self.Bad
        node = self.as_node(v, span)
        if node.shape != () or node.dtype not in FLOATS:
            self.d.error(span, f"{what} needs a scalar floating-point loss, found {describe(node)}",
                         "reduce it to one number: mean(...) or sum(...)")
            raise self.Bad
        return node

    # ---------------------------------------------------------------- minimize
    def minimize_stmt(self, s: ast.MinimizeStmt) -> None:
        if self.context != "graph":
            self.d.error(s.span, "'minimize' is only allowed at the top level of a graph")
            raise self.Bad
        loss = self.scalar_loss(self.expr(s.loss), s.loss.span, "minimize")
        opt_expr = s.optimizer
        if not isinstance(opt_expr, ast.Call) or not isinstance(opt_expr.fn, ast.Name):
            self.d.error(opt_expr.span, "minimize ... with an optimizer: sgd(lr = 0.1, momentum = 0.9) or adam(lr = 0.001)")
            raise self.Bad
        opt = OPTIMIZERS.get(opt_expr.fn.id)
        if opt is None:
            self.d.error(opt_expr.fn.span, f"unknown optimizer '{opt_expr.fn.id}'",
                         f"optimizers: {', '.join(OPTIMIZERS)}")
            raise self.Bad
        pos, kw = self.call_args(opt_expr)
        try:
            h = bind(Function(opt.name, opt.params, lambda *a: None, opt.doc), pos, kw, opt_expr.span, self.d,
                     self.as_node, self.is_tensor)
        except OpError:
            raise self.Bad from None
        problem = opt.check(h)
        if problem is not None:
            self.d.error(opt_expr.span, problem)
            raise self.Bad
        first = getattr(self, "minimized_at", None)
        if first == s.span:
            self.d.error(s.span, "'minimize' runs more than once: it is inside a compile-time loop",
                         "a graph minimizes one loss: add the losses, minimize a + b with ...")
            raise self.Bad
        if first is not None:
            self.d.error(s.span, f"a graph minimizes one loss; the first is at {first}",
                         "add the losses: minimize a + b with ...")
            raise self.Bad
        self.minimized_at = s.span
        if self.training:                 # an inference compile checks it and leaves it out
            self.graph.minimize = g.Minimize(loss, opt.name, tuple(h.items()), s.span)
