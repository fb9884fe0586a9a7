"""Elaboration of tensor programs (README: "Graphs as tensor programs").

Mixed into the graph elaborator: tensor expressions build interned `ir.tensor`
nodes; `def` calls run their body with shape symbols bound by the arguments;
`param` (and `var` inside a def) make one tensor per call, named by the call path
(`dense_1.w`).  Requires the elaborator's scopes and diagnostics; produces nodes,
tensors with initial values, and `graph.outputs` entries holding nodes.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from popdsl.diagnostics import Span
from popdsl.frontend import ast
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.initializers import Recipe
from popdsl.ir.mapping import Mapping
from popdsl.ir.tensor import Node, NodeTable
from popdsl import ops
from popdsl.ops import elementwise, linalg
from popdsl.ops import shape as shape_ops
from popdsl.ops.core import Builder, OpError, shape_str

MAX_DEPTH = 64
COMPILE_TIME_TYPES = {"int", "float", "bool"}


class _Return(Exception):
    def __init__(self, value):
        self.value = value


class Scope(dict):
    """Names bound in one block, loop iteration or def call, and what assignment may
    do to them: `lets` were bound by `let` (assigning rebinds them), `states` name
    the var each was found to write.  Kept on the scope itself: keys by `id(scope)`
    outlived their scope, and a later scope at the same address took over its
    entries (a second `batch_norm` wrote the first one's running mean)."""
    __slots__ = ("lets", "states")

    def __init__(self, *args):
        super().__init__(*args)
        self.lets: set[str] = set()
        self.states: dict[str, int] = {}


class TensorMixin:
    """Needs: self.d, self.graph, self.scopes, self.context, self.prog, self.expr,
    self.int_value, self.bind, self.block, self.lookup, self.Bad (exception class)."""

    def init_tensor(self) -> None:
        self.nodes = NodeTable()
        self.builder = Builder(self.nodes, self.d)
        self.path: list[str] = []             # call path: "stage_2", "bottleneck_1", ...
        self.def_names: list[str] = []        # the defs on that path
        self.call_counts: dict[tuple, int] = {}
        self.op_tensors: set[int] = set()

    # ---------------------------------------------------------------- values
    def as_node(self, v, span: Span, like: Node | None = None) -> Node:
        if isinstance(v, Node):
            return v
        if isinstance(v, g.View):
            t = self.graph.tensors[v.tensor]
            self.op_tensors.add(t.id)
            if v.index.shape == t.shape and np.array_equal(v.index.ravel(), np.arange(t.numel)):
                return self.nodes.make("tensor", (), (t.id,), t.shape, t.dtype)
            return self.nodes.make("view", (), (t.id,), v.index.shape, t.dtype, index=v.index)
        if isinstance(v, bool):
            return self.builder.const(v, "bool")
        if isinstance(v, int):
            ty = "f32" if like is not None and like.dtype in ("f32", "f16") else "i32"
            if ty == "i32" and not -2**31 <= v < 2**31:
                self.d.error(span, f"integer {v} does not fit in i32", "i32 holds -2147483648 to 2147483647")
                raise self.Bad
            return self.builder.const(v, ty)
        if isinstance(v, float):
            return self.builder.const(v, "f32")
        self.d.error(span, f"expected a tensor or a number, found {type(v).__name__}")
        raise self.Bad

    def like(self, span: Span, *values) -> Node | None:
        """The first tensor among `values`: a number next to it takes its type."""
        return next((self.as_node(v, span) for v in values if self.is_tensor(v)), None)

    def is_tensor(self, v) -> bool:
        return isinstance(v, (Node, g.View))

    def named(self, label: str) -> None:
        """Nodes made from now on are named `label` after the current call path."""
        self.nodes.site = ".".join(self.path + [label])

    def prim(self, fn, *args):
        self.nodes.span = next((a for a in reversed(args) if isinstance(a, Span)), None)
        try:
            return fn(*args)
        except OpError:
            raise self.Bad from None

    def tensor_binary(self, e: ast.Binary, a, b):
        like = self.like(e.span, a, b)
        na, nb = self.as_node(a, e.a.span, like), self.as_node(b, e.b.span, like)
        if e.op == "@":
            self.named("matmul")
            return self.prim(linalg.matmul, self.builder, na, nb, e.span)
        name = elementwise.BY_SYMBOL[e.op].name
        self.named(name)
        return self.prim(elementwise.apply, self.builder, name, [na, nb], e.span)

    def tensor_unary(self, op: str, v, span: Span):
        self.named(op)
        return self.prim(elementwise.apply, self.builder, op, [self.as_node(v, span)], span)

    def tensor_index(self, e: ast.IndexExpr, base: Node):
        key = self.index_key(e, base.shape, f"a {base.dtype}{shape_str(base.shape)} value")
        self.named("index")
        return self.prim(shape_ops.index, self.builder, base, key, e.span)

    # ---------------------------------------------------------------- calls
    def call_args(self, e: ast.Call):
        pos, kw = [], {}
        for a in e.args:
            if isinstance(a, ast.Kwarg):
                if a.name in kw:
                    self.d.error(a.span, f"argument '{a.name}' given twice")
                    raise self.Bad
                kw[a.name] = (self.expr(a.value), a.value.span)
            else:
                if kw:
                    self.d.error(a.span, "positional argument after a keyword argument")
                    raise self.Bad
                pos.append((self.expr(a), a.span))
        return pos, kw

    def tensor_call(self, e: ast.Call, fn: str):
        """Defs, scalar codelets and tensor primitives; NotImplemented otherwise
        (with the evaluated arguments in self.pre_args for the caller)."""
        if fn in self.prog.defs:
            return self.call_def(self.prog.defs[fn], e)
        c = self.prog.codelets.get(fn)
        if c is not None and c.ret is not None:
            pos, kw = self.call_args(e)
            if kw:
                self.d.error(e.span, f"scalar codelet '{fn}' takes positional arguments")
                raise self.Bad
            like = self.like(e.span, *(v for v, _ in pos))
            self.named(fn)
            return self.prim(elementwise.call_scalar, self.builder, c,
                             [self.as_node(v, sp, like) for v, sp in pos], e.span)
        if fn == "grad":
            return self.grad_call(e)
        if fn == "training":
            return self.training_call(e)
        if fn not in ops.FUNCTIONS:
            return NotImplemented
        pos, kw = self.call_args(e)
        tensors = any(self.is_tensor(v) for v, _ in pos) or any(self.is_tensor(v) for v, _ in kw.values())
        if fn in ("reshape", "transpose") and pos and isinstance(pos[0][0], g.View) and not any(
                isinstance(v, Node) for v, _ in list(pos) + list(kw.values())):
            # A Poplar-level view stays a view (it may be connected to vertices).
            node = self.primitive(fn, pos, kw, span=e.span)
            v = pos[0][0]
            return g.View(v.tensor, v.index.transpose(node.attrs[0]) if node.op == "transpose"
                          else v.index.reshape(node.shape), e.span)
        if fn in ("min", "max", "abs", "f32", "i32", "bool") and not tensors:
            self.pre_args = (pos, kw)
            return NotImplemented
        return self.primitive(fn, pos, kw, e.span)

    def primitive(self, fn: str, pos, kw, span: Span):
        """A call of a function of the operation table: its arguments bound by its
        signature, then its shape rule."""
        f = ops.function(fn, len(pos), set(kw))
        try:
            args = ops.bind(f, pos, kw, span, self.d, self.as_node, self.is_tensor)
        except OpError:
            raise self.Bad from None
        self.named(fn)
        return self.prim(f.build, self.builder, args, span)

    def call_def(self, d: ast.DefDecl, e: ast.Call):
        if len(self.path) >= MAX_DEPTH:
            self.d.error(e.span, f"def calls nested more than {MAX_DEPTH} deep (recursion?)")
            raise self.Bad
        pos, kw = self.call_args(e)
        names = [p.name for p in d.params]
        if len(pos) > len(names):
            self.d.error(e.span, f"'{d.name}' takes {len(names)} argument{'s' if len(names) != 1 else ''}, given {len(pos)}")
            raise self.Bad
        for k, (_, sp) in kw.items():
            if k not in names:
                self.d.error(sp, f"'{d.name}' has no parameter '{k}'", f"its parameters are: {', '.join(names)}")
                raise self.Bad
        scope = Scope()
        syms: dict[str, tuple[int, str]] = {}
        for i, p in enumerate(d.params):
            if i < len(pos):
                v, sp = pos[i]
                if p.name in kw:
                    self.d.error(sp, f"'{d.name}': argument '{p.name}' given twice")
                    raise self.Bad
            elif p.name in kw:
                v, sp = kw[p.name]
            else:
                self.d.error(e.span, f"'{d.name}': missing argument '{p.name}'")
                raise self.Bad
            scope[p.name] = self.bind_param(d, p, v, sp, syms)
        for s, (n, _) in syms.items():
            if s not in scope:
                scope[s] = n
        key = (tuple(self.path), d.name)
        self.call_counts[key] = self.call_counts.get(key, 0) + 1
        saved = (self.scopes, self.context)
        self.scopes = [self.scopes[0], scope]
        self.context = "def"
        self.path.append(f"{d.name}_{self.call_counts[key]}")
        self.def_names.append(d.name)
        result = None
        errors = len(self.d.items)
        first = len(self.nodes.nodes)
        label = ".".join(self.path)
        try:
            self.block(d.body)
        except _Return as r:
            result = r.value
        finally:
            self.nodes.regions.append((label, d.name, first, len(self.nodes.nodes)))
            self.path.pop()
            self.def_names.pop()
            self.scopes, self.context = saved
            # An error inside the def's body says which call led there.
            for i in range(errors, len(self.d.items)):
                item = self.d.items[i]
                self.d.items[i] = dataclasses.replace(
                    item, notes=item.notes + (f"in the call of '{d.name}' at {e.span}",))
        if d.ret is not None:
            if result is None:
                if len(self.d.items) == errors:     # else its 'return' failed, reported
                    self.d.error(d.span, f"def '{d.name}' declares a result but returns nothing")
                raise self.Bad
            self.check_ret(d, result, syms, e.span)
        return result

    def bind_param(self, d: ast.DefDecl, p: ast.Param, v, sp: Span, syms):
        t = p.type
        if t.name in COMPILE_TIME_TYPES:
            ok = {"int": lambda x: isinstance(x, int) and not isinstance(x, bool),
                  "float": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
                  "bool": lambda x: isinstance(x, bool)}[t.name](v)
            if not ok:
                what = "a tensor" if self.is_tensor(v) else type(v).__name__
                self.d.error(sp, f"'{d.name}': argument '{p.name}' must be a compile-time {t.name}, found {what}")
                raise self.Bad
            return float(v) if t.name == "float" else v
        if t.name not in cir.SCALARS:
            self.d.error(t.span, f"unknown type '{t.name}'", "types are f32, f16, i32, bool, int, float")
            raise self.Bad
        node = self.as_node(v, sp)
        dims = t.dims or ()
        want = f"{t.name}{shape_str(dims)}" if dims else t.name
        if node.dtype != t.name:
            self.d.error(sp, f"'{d.name}': argument '{p.name}' is {node.dtype}{shape_str(node.shape)}, expected {want}")
            raise self.Bad
        if len(node.shape) != len(dims):
            self.d.error(sp, f"'{d.name}': argument '{p.name}' has shape {shape_str(node.shape)}, expected {want}")
            raise self.Bad
        for dim, n in zip(dims, node.shape):
            if isinstance(dim, int):
                if dim != n:
                    self.d.error(sp, f"'{d.name}': argument '{p.name}' has shape {shape_str(node.shape)}, expected {want}")
                    raise self.Bad
            elif dim in syms and syms[dim][0] != n:
                self.d.error(sp, f"'{d.name}': size symbol '{dim}' is {syms[dim][0]} from '{syms[dim][1]}' "
                             f"but {n} from '{p.name}' {shape_str(node.shape)}")
                raise self.Bad
            else:
                syms.setdefault(dim, (n, p.name))
        return node

    def check_ret(self, d: ast.DefDecl, result, syms, span: Span) -> None:
        """The result(s) have the declared types; a size symbol only the result
        names must be one size wherever it appears."""
        several = isinstance(d.ret, tuple)
        types = d.ret if several else (d.ret,)
        values = result if isinstance(result, tuple) else (result,)
        if several != isinstance(result, tuple) or len(types) != len(values):
            self.d.error(span, f"'{d.name}' returns {len(values)} result{'s' if len(values) != 1 else ''} "
                         f"but declares {len(types)}")
            raise self.Bad
        scope_ints: dict[str, int] = {}
        for t, value in zip(types, values):
            if not self.is_tensor(value):
                continue
            node = self.as_node(value, span)
            dims = t.dims or ()
            bad = node.dtype != t.name or len(dims) != len(node.shape)
            for dim, n in zip(dims, node.shape):
                if isinstance(dim, str):
                    want = syms.get(dim, (None,))[0]
                    if want is None:
                        want = scope_ints.setdefault(dim, n)
                    bad |= want != n
                else:
                    bad |= dim != n
            if bad:
                self.d.error(span, f"'{d.name}' returns {node.dtype}{shape_str(node.shape)} but declares "
                             f"{t.name}{shape_str(dims) if dims else ''}")
                raise self.Bad

    # ---------------------------------------------------------------- statements
    def tensor_stmt(self, s):
        if isinstance(s, ast.ReturnStmt):
            if self.context != "def":
                self.d.error(s.span, "'return' outside a def")
                raise self.Bad
            raise _Return(self.expr(s.value) if s.value is not None else None)
        if isinstance(s, ast.ParamStmt):
            if self.context not in ("graph", "def"):
                self.d.error(s.span, "'param' is only allowed in a graph or a def")
                raise self.Bad
            self.declare_param(s, "param")
            return None
        if isinstance(s, ast.StepStmt):
            if self.context != "program":
                self.d.error(s.span, "'step' is only allowed inside the 'program' block")
                raise self.Bad
            self.has_step = True
            return g.Step(s.span)
        if isinstance(s, ast.MinimizeStmt):
            self.minimize_stmt(s)
            return None
        raise AssertionError(s)

    def declare_param(self, s, kind: str) -> None:
        """A `param` (trainable) or a `var` inside a def: one tensor per call."""
        try:
            self._declare_param(s, kind)
        except self.Bad:
            self.poison(s.name)       # reported; later uses of the name stay quiet
            raise

    def _declare_param(self, s, kind: str) -> None:
        if s.type is None:
            self.d.error(s.span, f"'{s.name}' needs a type")
            raise self.Bad
        dtype, shape = self.shape_of(s.type)
        if s.shared:
            if self.context != "def":
                self.d.error(s.span, f"'shared' is for the {kind}s of a def: every call of the def from "
                             "one place uses one tensor", "at the top level of a graph a declaration is already one tensor")
                raise self.Bad
            # Named without the call number: every call of this def from the same
            # place (the same enclosing call, or the graph) finds the same tensor.
            full = ".".join(self.path[:-1] + [self.def_names[-1], s.name])
            prev = next((t for t in self.graph.tensors if t.name == full), None)
            if prev is not None:
                if (prev.kind, prev.dtype, prev.shape) != (kind, dtype, shape):
                    self.d.error(s.span, f"shared {kind} '{full}' is {dtype}{list(shape)} in this call but "
                                 f"{prev.dtype}{list(prev.shape)} in an earlier one",
                                 "calls that share a tensor must agree on its type")
                    raise self.Bad
                self.bind(s.name, g.View(prev.id, np.arange(prev.numel, dtype=np.int64).reshape(shape), s.span),
                          s.span)
                return
        else:
            full = ".".join(self.path + [s.name])
        init_expr = getattr(s, "init", None) if kind == "param" else s.value
        values = self.param_init(init_expr, dtype, shape, full) if init_expr is not None \
            else np.zeros(shape, cir.NUMPY_DTYPE[dtype])
        gr = self.graph
        if any(t.name == full for t in gr.tensors):
            self.d.error(s.span, f"'{full}' is declared twice")
            raise self.Bad
        t = g.Tensor(len(gr.tensors), full, dtype, shape, kind, s.span)
        gr.tensors.append(t)
        gr.mappings[t.id] = Mapping.unmapped(t.numel)
        gr.init[t.id] = values
        if kind == "param":
            gr.params.append(t.id)
        self.bind(s.name, g.View(t.id, np.arange(t.numel, dtype=np.int64).reshape(shape), s.span), s.span)

    def param_init(self, e, dtype: str, shape, full: str):
        """The initial values: an array, or the Recipe that draws them (drawn only when read)."""
        if isinstance(e, ast.Call) and isinstance(e.fn, ast.Name) and e.fn.id in ("glorot_uniform", "he_normal"):
            fn = e.fn.id
            seed = zlib.crc32(full.encode())
            for a in e.args:
                if isinstance(a, ast.Kwarg) and a.name == "seed":
                    seed = self.int_value(a.value, "a seed")
                    if not 0 <= seed < 2**63:
                        self.d.error(a.value.span, f"a seed must be a non-negative integer, got {seed}")
                        raise self.Bad
                else:
                    self.d.error(a.span, f"{fn}() takes only 'seed'")
                    raise self.Bad
            if dtype not in ("f32", "f16"):
                self.d.error(e.span, f"{fn}() draws floating-point values; '{full}' is {dtype}")
                raise self.Bad
            return Recipe(fn, seed, tuple(shape), dtype)
        if isinstance(e, ast.Call) and isinstance(e.fn, ast.Name) and e.fn.id in ("uniform", "normal") \
                and not any(isinstance(a, ast.Kwarg) and a.name == "seed" for a in e.args):
            e = ast.Call(e.fn, e.args + (ast.Kwarg("seed", ast.IntLit(zlib.crc32(full.encode()), e.span), e.span),), e.span)
        return self.initial_value(e, dtype, shape, full)
