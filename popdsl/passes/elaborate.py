"""Elaboration: run a graph's construction program → `ir.graph.TensorGraph`.

Requires a checked `sema.Program` and a target; produces tensors with their tile
mapping and initial values, compute sets of vertices (grouped per codelet), and the
program tree.  Graph construction is a compile-time program: `for`, `if`, `let` and
integer arithmetic run here; everything left is device work.  User errors are
collected; elaboration goes on past a bad statement so one run reports several.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.frontend import ast
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.passes.elaborate_tensor import TensorMixin
from popdsl.runtime.target import Target
from popdsl.sema import Program

MAX_UNROLL = 1 << 22          # compile-time loop iterations, all loops together


class _Bad(Exception):
    """Already reported; abandon the current statement."""


class _Poisoned:
    """The value of a name whose definition failed (already reported): a use of it
    abandons the statement quietly instead of reporting 'unknown name' again."""


def _cdiv(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_INT_OPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _cdiv, "%": lambda a, b: a - _cdiv(a, b) * b,
}
_CMP_OPS = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
_INITS = {"zeros", "ones", "full", "uniform", "normal", "arange"}


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, (g.View, Node)):
        return "tensor"
    return type(v).__name__


class _Elaborator(TensorMixin):
    Bad = _Bad

    def __init__(self, prog: Program, target: Target, diags: Diagnostics):
        self.prog, self.d = prog, diags
        self.graph: g.TensorGraph | None = None
        self.target = target
        self.scopes: list[dict[str, object]] = [{}]
        self.context = "graph"          # "graph" | "compute" | "program"
        self.cs: g.ComputeSet | None = None
        self.have_program = False
        self.unrolled = 0
        self.has_step = False
        self.let_bound: set[tuple[int, str]] = set()
        self.pre_args = None
        self.init_tensor()
        self.bad_map: set[int] = set()  # tensors a failed 'map' was meant for

    # ---------------------------------------------------------------- entry
    def run(self, node: ast.Graph) -> g.TensorGraph:
        tiles = None
        for a in node.args:
            if not isinstance(a, ast.Kwarg) or a.name != "tiles":
                self.d.error(a.span, "unknown graph argument", "graphs take 'tiles = N'")
                continue
            try:
                tiles = self.int_value(a.value, "tiles")
            except _Bad:
                continue
            if not 1 <= tiles <= self.target.tiles and tiles != self.target.tiles:
                if tiles > self.target.tiles:
                    self.d.error(a.span, f"graph asks for {tiles} tiles; target "
                                 f"'{self.target.name}' has {self.target.tiles}")
                    tiles = None
                elif tiles < 1:
                    self.d.error(a.span, "tiles must be at least 1")
                    tiles = None
        if tiles is not None and tiles != self.target.tiles:
            self.target = self.target.with_overrides(tiles=tiles)
        self.graph = g.TensorGraph(node.name, self.target, dict(self.prog.codelets))
        self.scopes[0]["tiles"] = self.target.tiles
        body = self.block(node.body)
        if not self.have_program:
            self.graph.program = g.Seq(tuple(g.Execute(n, cs.span)
                                             for n, cs in self.graph.compute_sets.items())
                                       + (g.Step(node.span),))
        else:
            self.graph.program = body
            if not self.has_step and any(isinstance(v, Node) for _, v in self.graph.outputs):
                self.d.error(node.span, f"graph '{node.name}' has tensor-program outputs but its "
                             "program never runs 'step;'")
        self.graph.nodes = self.nodes
        self.check_mapping()
        return self.graph

    # ---------------------------------------------------------------- statements
    def block(self, b: ast.Block) -> g.Seq:
        self.scopes.append({})
        out: list[g.Prog] = []
        for s in b.stmts:
            try:
                r = self.stmt(s)
            except _Bad:
                continue
            if r is not None:
                out.extend(r.body if isinstance(r, g.Seq) else (r,))
        self.scopes.pop()
        return g.Seq(tuple(out))

    def need(self, s, ctx: str, what: str) -> None:
        if self.context != ctx:
            where = {"graph": "at the top level of a graph", "compute": "inside a 'compute' block",
                     "program": "inside the 'program' block"}[ctx]
            self.d.error(s.span, f"{what} is only allowed {where}")
            raise _Bad

    def stmt(self, s):
        if isinstance(s, ast.LetStmt):
            try:
                value = self.expr(s.value)
            except _Bad:
                self.poison(s.name)
                raise
            self.bind(s.name, value, s.span)
            self.let_bound.add((id(self.scopes[-1]), s.name))
            return None
        if isinstance(s, ast.AssignStmt) and s.op == "=" and isinstance(s.target, ast.Name) \
                and self.context != "compute":
            return self.rebind(s)
        if isinstance(s, ast.VarStmt) and self.context == "def":
            self.declare_param(s, "var")
            return None
        if isinstance(s, (ast.VarStmt, ast.InputStmt)):
            self.need(s, "graph", "a tensor declaration")
            try:
                self.declare_tensor(s)
            except _Bad:
                self.poison(s.name)
                raise
            return None
        if isinstance(s, ast.MapStmt):
            if self.context == "program":
                self.need(s, "graph", "'map'")
            self.map_stmt(s)
            return None
        if isinstance(s, ast.ComputeStmt):
            self.need(s, "graph", "'compute'")
            if s.name in self.graph.compute_sets:
                self.d.error(s.span, f"compute set '{s.name}' is defined twice")
                raise _Bad
            self.cs = self.graph.compute_sets[s.name] = g.ComputeSet(s.name, s.span)
            self.context = "compute"
            try:
                self.block(s.body)
            finally:
                self.context, self.cs = "graph", None
            return None
        if isinstance(s, ast.VertexStmt):
            self.need(s, "compute", "a vertex")
            self.vertex(s)
            return None
        if isinstance(s, ast.ProgramStmt):
            self.need(s, "graph", "'program'")
            if self.have_program:
                self.d.error(s.span, "a graph has one 'program' block")
                raise _Bad
            self.have_program = True
            self.context = "program"
            try:
                return self.block(s.body)
            finally:
                self.context = "graph"
        if isinstance(s, ast.OutputStmt):
            self.need(s, "graph", "'output'")
            v = self.expr(s.value)
            if not isinstance(v, (g.View, Node)):
                self.d.error(s.value.span, f"output needs a tensor, found {_kind(v)}")
                raise _Bad
            name = s.name or (s.value.id if isinstance(s.value, ast.Name) else None)
            if name is None:
                self.d.error(s.span, "name this output: 'output EXPR as NAME;'")
                raise _Bad
            if any(n == name for n, _ in self.graph.outputs):
                self.d.error(s.span, f"output '{name}' is defined twice")
                raise _Bad
            self.graph.outputs.append((name, v))
            return None
        if isinstance(s, ast.ForStmt):
            return self.for_stmt(s)
        if isinstance(s, ast.IfStmt):
            return self.if_stmt(s)
        if isinstance(s, ast.WhileStmt):
            self.need(s, "program", "'while'")
            cond = self.device_bool(s.cond, "while")
            return g.While(cond, self.block(s.body))
        if isinstance(s, ast.RepeatStmt):
            self.need(s, "program", "'repeat'")
            n = self.int_value(s.count, "a repeat count")
            if n < 0:
                self.d.error(s.count.span, f"repeat count must not be negative, got {n}")
                raise _Bad
            return g.Repeat(n, self.block(s.body))
        if isinstance(s, ast.ExecuteStmt):
            self.need(s, "program", "'execute'")
            if s.name not in self.graph.compute_sets:
                self.d.error(s.span, f"unknown compute set '{s.name}'",
                             "compute sets must be defined before the program")
                raise _Bad
            return g.Execute(s.name, s.span)
        if isinstance(s, ast.CopyStmt):
            self.need(s, "program", "'copy'")
            src = self.tensor_value(s.src, "copy source")
            dst = self.tensor_value(s.dst, "copy destination")
            st, dt = self.graph.tensors[src.tensor], self.graph.tensors[dst.tensor]
            if src.index.size != dst.index.size or (src.shape != dst.shape and dst.index.ndim > 1):
                self.d.error(s.span, f"copy: source shape {list(src.shape)} does not match "
                             f"destination shape {list(dst.shape)}")
                raise _Bad
            if st.dtype != dt.dtype:
                self.d.error(s.span, f"copy: source is {st.dtype}, destination is {dt.dtype}")
                raise _Bad
            return g.Copy(src, dst, s.span)
        if isinstance(s, ast.PrintStmt):
            self.need(s, "program", "'print'")
            v = self.tensor_value(s.value, "print")
            label = s.value.id if isinstance(s.value, ast.Name) else _source_text(s.value.span)
            return g.Print(label, v)
        if isinstance(s, (ast.ParamStmt, ast.MinimizeStmt, ast.StepStmt, ast.ReturnStmt)):
            return self.tensor_stmt(s)
        word = type(s).__name__.removesuffix("Stmt").lower()
        hint = ("graph values are immutable; bind a new name with 'let'",) \
            if isinstance(s, ast.AssignStmt) else ()
        self.d.error(s.span, f"'{word}' is not allowed in a graph", *hint)
        raise _Bad

    def for_stmt(self, s: ast.ForStmt):
        start = self.int_value(s.start, "a loop bound")
        stop = self.int_value(s.stop, "a loop bound")
        step = self.int_value(s.step, "a loop step") if s.step is not None else 1
        if step == 0:
            self.d.error(s.step.span, "a loop step must not be zero")
            raise _Bad
        out: list[g.Prog] = []
        errors = len(self.d.items)
        for i in range(start, stop, step):
            self.unrolled += 1
            if self.unrolled > MAX_UNROLL:
                self.d.error(s.span, f"compile-time loops ran more than {MAX_UNROLL} iterations")
                raise _Bad
            self.scopes.append({s.var: i})
            try:
                out.extend(self.block(s.body).body)
            finally:
                self.scopes.pop()
            if len(self.d.items) > errors:
                # The next iterations would repeat the mistake with other numbers.
                raise _Bad
        return g.Seq(tuple(out))

    def if_stmt(self, s: ast.IfStmt):
        cond = self.expr(s.cond)
        if isinstance(cond, g.View):
            self.need(s, "program", "an 'if' on a device tensor")
            view = self.check_device_bool(cond, s.cond, "if")
            then = self.block(s.then)
            orelse = self.else_part(s.orelse)
            return g.If(view, then, orelse)
        if not isinstance(cond, bool):
            self.d.error(s.cond.span, f"condition must be a bool, found {_kind(cond)}")
            raise _Bad
        if cond:
            return self.block(s.then)
        return self.else_part(s.orelse)

    def else_part(self, orelse) -> g.Seq:
        if orelse is None:
            return g.Seq(())
        if isinstance(orelse, ast.IfStmt):
            r = self.stmt(orelse)
            return r if isinstance(r, g.Seq) else g.Seq((r,) if r is not None else ())
        return self.block(orelse)

    def poison(self, name: str) -> None:
        self.scopes[-1].setdefault(name, _Poisoned())

    def rebind(self, s: ast.AssignStmt) -> None:
        """`h = EXPR;` gives a `let` name a new compile-time value (a loop that
        chains layers); tensors declared with var/input/param are not names to
        rebind."""
        name = s.target.id
        for scope in reversed(self.scopes):
            if name in scope:
                if (id(scope), name) not in self.let_bound:
                    self.d.error(s.target.span, f"cannot assign to '{name}': only names bound with "
                                 "'let' can be given a new value", "to change a tensor's contents, "
                                 "use 'copy' in the program")
                    raise _Bad
                scope[name] = self.expr(s.value)
                return None
        self.d.error(s.target.span, f"unknown name '{name}'", "bind it first with 'let'")
        raise _Bad

    def bind(self, name: str, value, span: Span) -> None:
        if name in self.scopes[-1]:
            self.d.error(span, f"'{name}' is already defined in this scope")
            raise _Bad
        self.scopes[-1][name] = value

    # ---------------------------------------------------------------- tensors
    def shape_of(self, t: ast.TypeRef) -> tuple[str, tuple[int, ...]]:
        if t.name not in cir.SCALARS:
            self.d.error(t.span, f"unknown type '{t.name}'", "types are f32, f16, i32 and bool")
            raise _Bad
        dims = []
        for d in t.dims or ():
            if isinstance(d, str):
                v = self.lookup(d, t.span)
                if not isinstance(v, int) or isinstance(v, bool):
                    self.d.error(t.span, f"dimension '{d}' must be a compile-time integer")
                    raise _Bad
                d = v
            if d <= 0:
                self.d.error(t.span, f"dimensions must be positive, got {d}")
                raise _Bad
            dims.append(d)
        if math.prod(dims) > (1 << 31):
            self.d.error(t.span, "tensor too large")
            raise _Bad
        # Nothing bigger than the whole target can ever be placed (and elaboration
        # would build index arrays of its size on the host first).
        nbytes, total = math.prod(dims) * cir.ELEM_BYTES[t.name], self.target.tiles * self.target.tile_memory
        if nbytes > total:
            self.d.error(t.span, f"tensor too large: {nbytes:,} B is more than the memory of the "
                         f"whole target ({self.target.tiles} tiles of {self.target.tile_memory:,} B)")
            raise _Bad
        return t.name, tuple(dims)

    def declare_tensor(self, s) -> None:
        if s.type is None:
            self.d.error(s.span, f"tensor '{s.name}' needs a type, e.g. 'var {s.name}: f32[8];'")
            raise _Bad
        dtype, shape = self.shape_of(s.type)
        kind = "input" if isinstance(s, ast.InputStmt) else "var"
        init = None
        if kind == "var" and s.value is not None:
            init = self.initial_value(s.value, dtype, shape, s.name)
        gr = self.graph
        t = g.Tensor(len(gr.tensors), s.name, dtype, shape, kind, s.span)
        self.bind(s.name, g.View(t.id, np.arange(t.numel, dtype=np.int64).reshape(shape), s.span), s.span)
        gr.tensors.append(t)
        gr.tile_of[t.id] = np.full(t.numel, -1, dtype=np.int32)
        if init is not None:
            gr.init[t.id] = init
        if kind == "input":
            gr.inputs[s.name] = t.id

    def initial_value(self, e, dtype: str, shape, name: str) -> np.ndarray:
        if isinstance(e, ast.Call) and isinstance(e.fn, ast.Name) and e.fn.id in _INITS:
            return self.init_call(e, dtype, shape)
        v = self.expr(e)
        if isinstance(v, (int, float, bool)):
            return np.full(shape, self.converted(v, dtype, e, name, literal=True))
        if isinstance(v, list):
            arr = self.converted(v, dtype, e, name, literal=True)
            if arr.shape != tuple(shape):
                self.d.error(e.span, f"initializer has shape {list(arr.shape)}, "
                             f"'{name}' has shape {list(shape)}")
                raise _Bad
            return arr
        self.d.error(e.span, "a tensor's initial value must be a number, a list or an "
                     "initializer such as zeros(), uniform(seed = 1)")
        raise _Bad

    def converted(self, values, dtype: str, e, name: str, literal: bool) -> np.ndarray:
        """`values` (a number, nested lists of numbers, or an array) as an array of
        `dtype`, or an error when one does not fit: no silent wrap-around,
        truncation or overflow to infinity."""
        try:
            a = np.asarray(values)
        except (ValueError, TypeError, OverflowError):         # ragged lists
            a = None
        if a is None or a.dtype.kind not in "biuf":
            items = a.ravel().tolist() if a is not None else [None]
            if all(isinstance(x, (int, float)) for x in items):  # integers beyond 64 bits
                self.d.error(e.span, f"initial value {max(items, key=abs)} does not fit in {dtype}")
            else:
                self.d.error(e.span, "initializer must be a rectangular list of numbers")
            raise _Bad
        kind = a.dtype.kind
        if dtype == "i32" and literal and kind == "f":
            self.d.error(e.span, f"'{name}' is i32; its initial values must be integers")
            raise _Bad
        with np.errstate(all="ignore"):
            if dtype == "bool":
                if literal and kind != "b" or not ((a == 0) | (a == 1)).all():
                    self.d.error(e.span, f"'{name}' is bool; its initial values must be true or false")
                    raise _Bad
                out = np.zeros(a.shape, bool)
            elif dtype == "i32":
                out = ~np.isfinite(a) | (a < -2**31) | (a >= 2**31)
            else:
                out = np.isfinite(a) & ~np.isfinite(a.astype(cir.NUMPY_DTYPE[dtype]))
        if out.any():
            self.d.error(e.span, f"initial value {a[out].ravel()[0].item()} does not fit in {dtype}")
            raise _Bad
        return a.astype(cir.NUMPY_DTYPE[dtype])

    def init_call(self, e: ast.Call, dtype: str, shape) -> np.ndarray:
        fn = e.fn.id
        allowed = {"zeros": (), "ones": (), "full": ("value",), "uniform": ("low", "high", "seed"),
                   "normal": ("mean", "std", "seed"), "arange": ("start", "step")}[fn]
        kw: dict[str, float] = {}
        for i, a in enumerate(e.args):
            name = a.name if isinstance(a, ast.Kwarg) else (allowed[i] if i < len(allowed) else None)
            if name not in allowed:
                self.d.error(a.span, f"{fn}() takes {', '.join(allowed) or 'no arguments'}")
                raise _Bad
            v = self.expr(a.value if isinstance(a, ast.Kwarg) else a)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                self.d.error(a.span, f"{fn}(): '{name}' must be a number")
                raise _Bad
            if name == "seed" and (not isinstance(v, int) or v < 0):
                self.d.error(a.span, f"{fn}(): the seed must be a non-negative integer")
                raise _Bad
            if name == "std" and v < 0:
                self.d.error(a.span, f"{fn}(): 'std' must not be negative")
                raise _Bad
            kw[name] = v
        rng = np.random.default_rng(int(kw.get("seed", 0)))
        try:
            with np.errstate(all="ignore"):
                out = self.init_values(fn, e, kw, rng, shape)
        except (ValueError, OverflowError) as ex:
            self.d.error(e.span, f"{fn}(): {ex}")
            raise _Bad
        return self.converted(out, dtype, e, f"{fn}()", literal=False)

    def init_values(self, fn: str, e, kw, rng, shape) -> np.ndarray:
        if fn == "zeros":
            out = np.zeros(shape)
        elif fn == "ones":
            out = np.ones(shape)
        elif fn == "full":
            if "value" not in kw:
                self.d.error(e.span, "full() needs a value")
                raise _Bad
            out = np.full(shape, kw["value"])
        elif fn == "uniform":
            out = rng.uniform(kw.get("low", 0.0), kw.get("high", 1.0), size=shape)
        elif fn == "normal":
            out = rng.normal(kw.get("mean", 0.0), kw.get("std", 1.0), size=shape)
        else:
            n = int(np.prod(shape, dtype=np.int64))
            out = (kw.get("start", 0) + kw.get("step", 1) * np.arange(n, dtype=np.float64)).reshape(shape)
        return out

    def map_stmt(self, s: ast.MapStmt) -> None:
        v = self.tensor_value(s.target, "map")
        flat = v.index.reshape(-1)
        tiles = self.target.tiles
        if s.tile is None:
            chunk = -(-flat.size // tiles) if flat.size else 1
            dest = (np.arange(flat.size) // chunk).astype(np.int32)
        else:
            try:
                tile = self.int_value(s.tile, "a tile")
                if not 0 <= tile < tiles:
                    self.d.error(s.tile.span, f"tile {tile} is out of range: the target has "
                                 f"{tiles} tiles (0..{tiles - 1})")
                    raise _Bad
            except _Bad:
                self.bad_map.add(v.tensor)
                raise
            dest = np.int32(tile)
        self.graph.tile_of[v.tensor][flat] = dest

    def check_mapping(self) -> None:
        """Every element of every tensor is on a tile.  A vertex connected to
        unmapped elements is reported where it is connected; any other unmapped
        tensor where it is declared (not when a 'map' of it already failed)."""
        tile_of = self.graph.tile_of
        # Tensors of the tensor program are mapped by the partitioner.
        unmapped = {t.id for t in self.graph.tensors
                    if t.id not in self.bad_map and t.id not in self.op_tensors and t.kind != "param"
                    and not (t.kind == "input" and self.nodes.nodes)
                    and (tile_of[t.id] < 0).any()}
        if not unmapped:
            return
        at_vertex: set[int] = set()
        for cs in self.graph.compute_sets.values():
            for grp in cs.groups:
                for fname, views in grp.connections.items():
                    for v in ([views] if isinstance(views, g.Stacked) else views):
                        if v.tensor in unmapped and (tile_of[v.tensor][v.index] < 0).any():
                            t = self.graph.tensors[v.tensor]
                            self.d.error(v.span, f"field '{fname}' of {grp.codelet} is connected to "
                                         f"elements of '{t.name}' that are not mapped to any tile",
                                         f"map '{t.name}' with 'map {t.name} -> ...;'")
                            at_vertex.add(v.tensor)
        for t in self.graph.tensors:
            if t.id in unmapped and t.id not in at_vertex:
                n = int((tile_of[t.id] < 0).sum())
                self.d.error(t.span, f"tensor '{t.name}' has {n} of {t.numel} elements "
                             "not mapped to any tile", f"add 'map {t.name} -> linear;' or map its "
                             "slices to tiles")

    # ---------------------------------------------------------------- vertices
    def vertex(self, s: ast.VertexStmt) -> None:
        call = s.call
        if not isinstance(call, ast.Call) or not isinstance(call.fn, ast.Name):
            self.d.error(s.span, "a vertex is written 'Codelet(field = tensor, ...) on tile T;'")
            raise _Bad
        name = call.fn.id
        c = self.prog.codelets.get(name)
        if c is None:
            self.d.error(call.fn.span, f"unknown codelet '{name}'")
            raise _Bad
        if c.ret is not None:
            self.d.error(call.fn.span, f"'{name}' is a scalar codelet (an element-wise "
                         "function), not a vertex")
            raise _Bad
        tile = self.int_value(s.tile, "a tile")
        if not 0 <= tile < self.target.tiles:
            self.d.error(s.tile.span, f"tile {tile} is out of range: the target has "
                         f"{self.target.tiles} tiles (0..{self.target.tiles - 1})")
            raise _Bad
        given: dict[str, ast.Kwarg] = {}
        ok = True
        for a in call.args:
            if not isinstance(a, ast.Kwarg):
                self.d.error(a.span, f"connect fields by name, e.g. {name}({c.fields[0].name if c.fields else 'x'} = ...)")
                raise _Bad
            if a.name in given:
                self.d.error(a.span, f"field '{a.name}' is connected twice")
                ok = False
            given[a.name] = a
        fields = {f.name: f for f in c.fields}
        for n, a in given.items():
            if n not in fields:
                self.d.error(a.span, f"codelet '{name}' has no field '{n}'",
                             f"its fields are: {', '.join(fields)}")
                ok = False
        missing = [f.name for f in c.fields if f.name not in given]
        if missing:
            self.d.error(call.span, f"vertex {name}: field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(m) for m in missing)} not connected")
            ok = False
        if not ok:
            raise _Bad
        conns: dict[str, g.View] = {}
        state: dict[str, object] = {}
        syms: dict[str, tuple[int, Span, str]] = {}
        for f in c.fields:
            a = given[f.name]
            try:
                v = self.expr(a.value)
                if f.direction == "state":
                    state[f.name] = self.state_value(f, v, a)
                    continue
                conns[f.name] = self.connect(name, f, v, a, syms)
            except _Bad:
                ok = False
        if not ok:
            raise _Bad
        grp = next((x for x in self.cs.groups if x.codelet == name), None)
        if grp is None:
            grp = g.VertexGroup(name)
            self.cs.groups.append(grp)
            grp.connections = {f: [] for f in conns}
            grp.state = {f: [] for f in state}
            grp.syms = {s_: [] for s_ in c.symbols}
        grp.tiles.append(tile)
        grp.span_ids.append(self.graph.span_id(s.span))
        for f, v in conns.items():
            grp.connections[f].append(v)
        for f, v in state.items():
            grp.state[f].append(v)
        for s_ in c.symbols:
            grp.syms[s_].append(syms[s_][0])

    def state_value(self, f: cir.Field, v, a: ast.Kwarg):
        ok = {"f32": (int, float), "f16": (int, float), "i32": (int,), "bool": (bool,)}[f.dtype]
        if isinstance(v, bool) and f.dtype != "bool" or not isinstance(v, ok):
            self.d.error(a.value.span, f"vertex state '{f.name}' is {f.dtype}; got {_kind(v)}")
            raise _Bad
        if f.dtype == "i32" and not -2**31 <= v < 2**31:
            self.d.error(a.value.span, f"{v} does not fit in i32")
            raise _Bad
        return v

    def connect(self, cname: str, f: cir.Field, v, a: ast.Kwarg, syms) -> g.View:
        if not isinstance(v, g.View):
            what = "tensor expression (connect a tensor declared with 'var' or 'input')" \
                if isinstance(v, Node) else _kind(v)
            self.d.error(a.value.span, f"field '{f.name}' of {cname} is an '{f.direction}' edge; "
                         f"connect a tensor, not a {what}")
            raise _Bad
        t = self.graph.tensors[v.tensor]
        if t.dtype != f.dtype:
            self.d.error(a.value.span, f"field '{f.name}' of {cname} is {_type_text(f.dtype, f.dims)} "
                         f"but '{t.name}' is {t.dtype}")
            raise _Bad
        shape = v.shape
        if f.rank == 0 and v.index.size == 1:
            return g.View(v.tensor, v.index.reshape(()), a.value.span)
        if len(shape) != f.rank:
            self.d.error(a.value.span, f"field '{f.name}' of {cname} has rank {f.rank} but is "
                         f"connected to shape {list(shape)}")
            raise _Bad
        for axis, (dim, n) in enumerate(zip(f.dims, shape)):
            if isinstance(dim, int):
                if dim != n:
                    self.d.error(a.value.span, f"field '{f.name}' of {cname} needs size {dim} on "
                                 f"axis {axis}; connected to shape {list(shape)}")
                    raise _Bad
            elif dim in syms and syms[dim][0] != n:
                self.d.error(a.value.span, f"size symbol '{dim}' of {cname} is {syms[dim][0]} "
                             f"from field '{syms[dim][2]}' but {n} from field '{f.name}'")
                raise _Bad
            elif n == 0:
                self.d.error(a.value.span, f"field '{f.name}' of {cname} is connected to an empty tensor")
                raise _Bad
            else:
                syms.setdefault(dim, (n, a.span, f.name))
        return g.View(v.tensor, v.index, a.value.span)

    # ---------------------------------------------------------------- expressions
    def lookup(self, name: str, span: Span):
        for scope in reversed(self.scopes):
            if name in scope:
                if isinstance(scope[name], _Poisoned):
                    raise _Bad
                return scope[name]
        if name in self.prog.codelets:
            self.d.error(span, f"'{name}' is a codelet, not a value")
        else:
            self.d.error(span, f"unknown name '{name}'")
        raise _Bad

    def int_value(self, e, what: str) -> int:
        v = self.expr(e)
        if not isinstance(v, int) or isinstance(v, bool):
            self.d.error(e.span, f"{what} must be a compile-time integer, found {_kind(v)}")
            raise _Bad
        return v

    def tensor_value(self, e, what: str) -> g.View:
        v = self.expr(e)
        if isinstance(v, Node):
            self.d.error(e.span, f"{what} needs a tensor declared with 'var' or 'input', not a "
                         "tensor expression")
            raise _Bad
        if not isinstance(v, g.View):
            self.d.error(e.span, f"{what} needs a tensor, found {_kind(v)}")
            raise _Bad
        return g.View(v.tensor, v.index, e.span)

    def device_bool(self, e, what: str) -> g.View:
        return self.check_device_bool(self.tensor_value(e, what), e, what)

    def check_device_bool(self, v: g.View, e, what: str) -> g.View:
        t = self.graph.tensors[v.tensor]
        if t.dtype != "bool" or v.index.size != 1:
            self.d.error(e.span, f"'{what}' needs a device bool with one element; "
                         f"'{t.name}' is {t.dtype}{list(v.shape) if v.shape else ''}")
            raise _Bad
        return g.View(v.tensor, v.index.reshape(()), e.span)

    def expr(self, e):
        if isinstance(e, (ast.IntLit, ast.FloatLit, ast.BoolLit)):
            return e.value
        if isinstance(e, ast.Name):
            return self.lookup(e.id, e.span)
        if isinstance(e, ast.ListLit):
            return [self.expr(x) for x in e.items]
        if isinstance(e, ast.Neg):
            v = self.expr(e.x)
            if isinstance(v, (g.View, Node)):
                return self.tensor_unary("neg", v, e.span)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.d.error(e.span, f"cannot negate a {_kind(v)}")
                raise _Bad
            return -v
        if isinstance(e, ast.Not):
            v = self.expr(e.x)
            if isinstance(v, (g.View, Node)):
                return self.tensor_unary("not", v, e.span)
            if not isinstance(v, bool):
                self.d.error(e.span, f"'!' needs a bool, found {_kind(v)}")
                raise _Bad
            return not v
        if isinstance(e, ast.Binary):
            return self.binary(e)
        if isinstance(e, ast.IndexExpr):
            return self.index(e)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.StringLit):
            self.d.error(e.span, "strings are only used by 'import'")
            raise _Bad
        raise AssertionError(f"unhandled expression {type(e).__name__}")

    def binary(self, e: ast.Binary):
        a, b = self.expr(e.a), self.expr(e.b)
        ka, kb = _kind(a), _kind(b)
        if "tensor" in (ka, kb):
            if not all(k in ("tensor", "int", "float", "bool") for k in (ka, kb)):
                self.d.error(e.span, f"'{e.op}' cannot combine a {ka} with a {kb}")
                raise _Bad
            return self.tensor_binary(e, a, b)
        op = e.op
        if op in ("&&", "||"):
            if ka != "bool" or kb != "bool":
                self.d.error(e.span, f"'{op}' needs bools, found {ka} and {kb}")
                raise _Bad
            return (a and b) if op == "&&" else (a or b)
        if op in _CMP_OPS:
            if (ka == "bool") != (kb == "bool"):
                self.d.error(e.span, f"cannot compare {ka} with {kb}")
                raise _Bad
            return _CMP_OPS[op](a, b)
        if "bool" in (ka, kb) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            self.d.error(e.span, f"'{op}' needs numbers, found {ka} and {kb}")
            raise _Bad
        if ka == kb == "int":
            if op in ("/", "%") and b == 0:
                self.d.error(e.span, "division by zero in a compile-time expression")
                raise _Bad
            if op == "@":
                self.d.error(e.span, "'@' needs tensors")
                raise _Bad
            return _INT_OPS[op](a, b)
        if op in ("%", "@"):
            self.d.error(e.span, f"'{op}' needs integers")
            raise _Bad
        if op == "/" and b == 0:
            self.d.error(e.span, "division by zero in a compile-time expression")
            raise _Bad
        return float({"+": a + b, "-": a - b, "*": a * b}.get(op, a / b if op == "/" else 0.0))

    def index(self, e: ast.IndexExpr) -> g.View:
        base = self.expr(e.base)
        if isinstance(base, Node):
            return self.tensor_index(e, base)
        if not isinstance(base, g.View):
            self.d.error(e.base.span, f"only tensors can be indexed, found {_kind(base)}")
            raise _Bad
        name = self.graph.tensors[base.tensor].name
        shape = base.shape
        if len(e.index) > len(shape):
            self.d.error(e.span, f"too many indices: '{name}' view has shape {list(shape)}")
            raise _Bad
        key = []
        for axis, ix in enumerate(e.index):
            n = shape[axis]
            if isinstance(ix, ast.Slice):
                lo = self.int_value(ix.start, "a slice bound") if ix.start is not None else 0
                hi = self.int_value(ix.stop, "a slice bound") if ix.stop is not None else n
                if not 0 <= lo < hi <= n:
                    self.d.error(ix.span, f"slice {lo}:{hi} is out of range for axis {axis} of "
                                 f"'{name}' (size {n})" if hi > lo else f"slice {lo}:{hi} is empty")
                    raise _Bad
                key.append(slice(lo, hi))
            else:
                i = self.int_value(ix, "an index")
                if not -n <= i < n:
                    self.d.error(ix.span, f"index {i} is out of range for axis {axis} of "
                                 f"'{name}' (size {n})")
                    raise _Bad
                key.append(i)
        return g.View(base.tensor, base.index[tuple(key)], e.span)

    def call(self, e: ast.Call):
        if not isinstance(e.fn, ast.Name):
            self.d.error(e.fn.span, "only named functions can be called")
            raise _Bad
        fn = e.fn.id
        self.pre_args = None
        r = self.tensor_call(e, fn)
        if r is not NotImplemented:
            return r
        if self.pre_args is not None:
            pos, kw = self.pre_args
            if kw:
                self.d.error(e.span, f"{fn}() takes positional arguments here")
                raise _Bad
            args = [v for v, _ in pos]
        else:
            args = [self.expr(a) for a in e.args if not isinstance(a, ast.Kwarg)]
        if self.pre_args is None and any(isinstance(a, ast.Kwarg) for a in e.args):
            self.d.error(e.span, f"{fn}() takes positional arguments here")
            raise _Bad
        if fn in ("min", "max") and len(args) >= 2 and all(_kind(a) == "int" for a in args):
            return (min if fn == "min" else max)(args)
        if fn == "abs" and len(args) == 1 and _kind(args[0]) in ("int", "float"):
            return abs(args[0])
        if fn == "reshape" and len(args) == 2 and isinstance(args[0], g.View) \
                and isinstance(args[1], list) and all(_kind(x) == "int" for x in args[1]):
            v, shape = args
            if int(np.prod(shape, dtype=np.int64)) != v.index.size or any(x <= 0 for x in shape):
                self.d.error(e.span, f"cannot reshape {list(v.shape)} to {shape}")
                raise _Bad
            return g.View(v.tensor, v.index.reshape(shape), e.span)
        if fn == "transpose" and len(args) == 1 and isinstance(args[0], g.View):
            return g.View(args[0].tensor, args[0].index.T, e.span)
        if fn == "flatten" and len(args) == 1 and isinstance(args[0], g.View):
            return g.View(args[0].tensor, args[0].index.reshape(-1), e.span)
        if fn in _INITS:
            self.d.error(e.span, f"{fn}() is an initializer: use it as 'var x: T = {fn}(...);'")
            raise _Bad
        if fn in self.prog.codelets:
            self.d.error(e.span, f"codelet '{fn}' is placed as a vertex inside a compute set: "
                         f"'{fn}(...) on tile T;'")
            raise _Bad
        known = "min, max, abs, reshape, transpose, flatten"
        if fn in known.split(", "):
            self.d.error(e.span, f"bad arguments to {fn}(): {', '.join(_kind(a) for a in args)}")
        else:
            self.d.error(e.fn.span, f"unknown function '{fn}'", f"graph-level functions are {known}")
        raise _Bad


def _type_text(dtype: str, dims) -> str:
    return f"{dtype}[{', '.join(map(str, dims))}]" if dims else dtype


def _source_text(span: Span) -> str:
    from popdsl.diagnostics import SourceMap
    line = SourceMap.line(span.path, span.line)
    if line is None or span.end_line != span.line:
        return "<expr>"
    return line[span.col - 1:span.end_col - 1]


def elaborate(prog: Program, target: Target, graph_name: str | None = None,
              root_path: str | None = None) -> g.TensorGraph:
    """Run the chosen graph (by name, or the one graph of the root file)."""
    diags = Diagnostics()
    graphs = prog.graphs
    if graph_name is not None:
        node = graphs.get(graph_name)
        if node is None:
            from popdsl.diagnostics import CompileError, Diagnostic, Span as S
            raise CompileError([Diagnostic(S(root_path or "<input>", 0, 0, 0, 0),
                                           f"no graph named '{graph_name}' (have: {', '.join(graphs) or 'none'})")])
    else:
        root = [n for n in graphs.values() if root_path is None or n.span.path == root_path] \
            or list(graphs.values())
        if len(root) != 1:
            from popdsl.diagnostics import CompileError, Diagnostic, Span as S
            msg = "no graph to compile" if not root else \
                f"several graphs ({', '.join(n.name for n in root)}); choose one with --graph"
            raise CompileError([Diagnostic(S(root_path or "<input>", 0, 0, 0, 0), msg)])
        node = root[0]
    e = _Elaborator(prog, target, diags)
    graph = e.run(node)
    diags.check()
    return graph
