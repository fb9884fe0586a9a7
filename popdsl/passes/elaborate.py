"""Elaboration: run a graph's construction program → `ir.graph.TensorGraph`.

Requires a checked `sema.Program` and a target; produces tensors with their tile
mapping and initial values, compute sets of vertices (grouped per codelet), and the
program tree.  Graph construction is a compile-time program: `for`, `if`, `let` and
integer arithmetic run here; everything left is device work.  User errors are
collected; elaboration goes on past a bad statement so one run reports several.

Being a program, it may not end: the budgets of `popdsl.limits.Budgets` bound
compile-time loop iterations and def calls together, tensor operations and
vertices placed by hand; the error names the budget and the flag that raises it.
"""
from __future__ import annotations


import numpy as np

from popdsl.diagnostics import CompileError, Diagnostic, Diagnostics, Span
from popdsl.frontend import ast
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.passes.elaborate_batch import BatchMixin
from popdsl.passes.elaborate_batch import enabled as batch_enabled
from popdsl.passes.elaborate_poplar import INITS, PoplarMixin, kind_of
from popdsl.passes.elaborate_tensor import Scope, TensorMixin
from popdsl.passes.elaborate_train import TrainMixin, says_minimize
from popdsl.ir.target import Target
from popdsl.limits import BUDGET_FLAGS, CALL_STEPS, Budgets
from popdsl.sema import Program


class _Bad(Exception):
    """Already reported; abandon the current statement."""


class _Poisoned:
    """The value of a name whose definition failed (already reported): a use of it
    abandons the statement quietly instead of reporting 'unknown name' again."""


def _trunc_div(a: int, b: int) -> int:
    """a / b rounded toward zero, as the language's integer division."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


_INT_OPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": _trunc_div, "%": lambda a, b: a - _trunc_div(a, b) * b,
}
_CMP_OPS = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
_kind = kind_of         # how a compile-time value reads in a message


class _Elaborator(BatchMixin, PoplarMixin, TensorMixin, TrainMixin):
    Bad = _Bad

    def __init__(self, prog: Program, target: Target, diags: Diagnostics, training: bool | None = None,
                 budgets: Budgets = Budgets()):
        self.prog, self.d = prog, diags
        self.budgets = budgets
        self.vertices = 0
        self.graph: g.TensorGraph | None = None
        self.target = target
        self.scopes: list[Scope] = [Scope()]
        self.context = "graph"          # "graph" | "compute" | "program"
        self.cs: g.ComputeSet | None = None
        self.have_program = False
        self.unrolled = 0
        self.has_step = False
        self.output_spans: dict[str, Span] = {}
        self.pre_args = None
        self.init_tensor()
        self.bad_map: set[int] = set()  # tensors a failed 'map' was meant for
        # 'map' statements not yet applied, per tensor: (elements, tiles) in program
        # order.  Applied together (check_mapping), a loop of maps costs one update
        # of each tensor's runs, not one per statement.
        self.pending_maps: dict[int, list] = {}
        self.training_option = training    # None: training when the graph says 'minimize'
        self.training = False

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
        # Known before the body runs: defs (batch_norm) ask training() before the
        # graph's 'minimize', which usually comes last.
        self.training = says_minimize(node.body) if self.training_option is None else self.training_option
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
        self.check_output_names()
        return self.graph

    def check_output_names(self) -> None:
        """An output may not take the name of another tensor: reading that name back
        (`sim.read`, --save-params) would be ambiguous."""
        for name, v in self.graph.outputs:
            for t in self.graph.tensors:
                if t.name != name:
                    continue
                whole = isinstance(v, g.View) and v.tensor == t.id and v.index.shape == t.shape \
                    and np.array_equal(v.index.ravel(), np.arange(t.numel))
                if not whole:
                    self.d.error(self.output_spans.get(name, t.span), f"output '{name}' has the name of "
                                 f"{t.kind} '{name}' ({t.span})", "name the output otherwise: 'output EXPR as NAME;'")

    # ---------------------------------------------------------------- budgets
    def over_budget(self, span: Span, which: str, what: str) -> None:
        limit = getattr(self.budgets, which)
        self.d.error(span, f"{what}: more than {limit:,}, the compile-time budget",
                     f"a graph-building loop or recursion that never ends? raise the budget with "
                     f"{BUDGET_FLAGS[which]} N")
        raise _Bad

    def tick(self, span: Span, what: str, steps: int = 1) -> None:
        """Compile-time steps: a loop iteration or a def call (`limits.Budgets`);
        also watches the tensor ops built so far (only loops and calls can build
        unboundedly many)."""
        self.unrolled += steps
        if self.unrolled > self.budgets.unroll:
            self.over_budget(span, "unroll", "compile-time steps (loop iterations; a def call "
                             f"counts {CALL_STEPS})")
        if len(self.nodes.nodes) > self.budgets.ops:
            self.over_budget(span, "ops", f"tensor operations built ({what})")

    def call_def(self, d: ast.DefDecl, e: ast.Call):
        self.tick(e.span, f"in calls of '{d.name}'", CALL_STEPS)
        return super().call_def(d, e)

    def vertex(self, s: ast.VertexStmt) -> None:
        if self.vertices >= self.budgets.vertices:
            self.over_budget(s.span, "vertices", "vertices placed")
        super().vertex(s)
        self.vertices += 1

    # ---------------------------------------------------------------- statements
    def block(self, b: ast.Block) -> g.Seq:
        self.scopes.append(Scope())
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
        if self.context in ("graph", "def") and isinstance(s, (ast.LetStmt, ast.AssignStmt)):
            # A statement of the tensor program is a unit outlining may find repeated
            # (a model written layer by layer, without defs).
            first = len(self.nodes.nodes)
            try:
                return self.stmt_(s)
            finally:
                if len(self.nodes.nodes) > first:
                    self.nodes.regions.append((".".join(self.path + [f"line {s.span.line}"]), "statement",
                                               first, len(self.nodes.nodes)))
        return self.stmt_(s)

    def stmt_(self, s):
        if isinstance(s, ast.LetStmt):
            names = s.name if isinstance(s.name, tuple) else (s.name,)
            try:
                values = self.results(self.expr(s.value), len(names), s, isinstance(s.name, tuple))
            except _Bad:
                for n in names:
                    self.poison(n)
                raise
            for n, v in zip(names, values):
                self.bind(n, v, s.span)
                self.scopes[-1].lets.add(n)
            return None
        if isinstance(s, ast.AssignStmt) and s.op == "=" and isinstance(s.target, (ast.Name, ast.TupleLit)) \
                and self.context != "compute":
            return self.rebind(s)
        if isinstance(s, ast.VarStmt) and self.context == "def":
            self.declare_param(s, "var")
            return None
        if isinstance(s, (ast.VarStmt, ast.InputStmt)):
            self.need(s, "graph", "a tensor declaration")
            if getattr(s, "shared", False):
                self.d.error(s.span, "'shared' is for the vars of a def: every call of the def from one place "
                             "uses one tensor", "at the top level of a graph a declaration is already one tensor")
                raise _Bad
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
            if isinstance(v, tuple):
                self.d.error(s.value.span, f"output needs a tensor, found {len(v)} results")
                raise _Bad
            self.graph.outputs.append((name, v))
            self.output_spans[name] = s.span
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
        if isinstance(s, ast.CallStmt):
            hint = ("a vertex needs 'on tile T' (inside 'compute'); a def's result needs 'let NAME = ...'",)
            if not isinstance(s.call, ast.Call):
                self.d.error(s.span, "this expression does nothing on its own", "bind it with 'let NAME = ...'")
                raise _Bad
        self.d.error(s.span, f"'{word}' is not allowed in a graph", *hint)
        raise _Bad

    def for_stmt(self, s: ast.ForStmt):
        start = self.int_value(s.start, "a loop bound")
        stop = self.int_value(s.stop, "a loop bound")
        step = self.int_value(s.step, "a loop step") if s.step is not None else 1
        if step == 0:
            self.d.error(s.step.span, "a loop step must not be zero")
            raise _Bad
        if self.context == "compute" and batch_enabled() and self.batch_for(s):
            return g.Seq(())
        out: list[g.Prog] = []
        errors = len(self.d.items)
        for i in range(start, stop, step):
            self.tick(s.span, "in loops")
            self.scopes.append(Scope({s.var: i}))
            first = len(self.nodes.nodes)
            try:
                out.extend(self.block(s.body).body)
            finally:
                self.scopes.pop()
                if self.context in ("graph", "def") and len(self.nodes.nodes) > first:
                    self.nodes.regions.append((".".join(self.path + [f"line {s.span.line}", f"{s.var}={i}"]),
                                               "loop", first, len(self.nodes.nodes)))
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

    def results(self, value, n: int, s, unpack: bool) -> tuple:
        """`value` as `n` values: a def's several results taken apart, or one value."""
        if isinstance(value, tuple) and not unpack:
            self.d.error(s.span, f"this gives {len(value)} results: take them apart with "
                         "'let (a, b) = ...' or '(a, b) = ...'")
            raise _Bad
        if unpack and (not isinstance(value, tuple) or len(value) != n):
            found = f"{len(value)} results" if isinstance(value, tuple) else f"one {_kind(value)}"
            self.d.error(s.span, f"{n} names take apart {n} results, found {found}")
            raise _Bad
        return value if unpack else (value,)

    def rebind(self, s: ast.AssignStmt) -> None:
        """`h = EXPR;` (or `(h, c) = EXPR;` for a def's several results) gives a name a
        new value.  A `let` name simply takes it (a loop that chains layers).  A `var`
        takes it as the tensor program's new state: later uses of the name in the
        program see the new value, and at the end of each step the var is written
        with it (an RNN's hidden state, a running statistic).  Inputs and params are
        not assigned: the host writes inputs, `minimize` changes params."""
        targets = s.target.items if isinstance(s.target, ast.TupleLit) else (s.target,)
        if any(not isinstance(x, ast.Name) for x in targets):
            self.d.error(s.target.span, "assign to names: '(a, b) = ...'")
            raise _Bad
        values = self.results(self.expr(s.value), len(targets), s, isinstance(s.target, ast.TupleLit))
        for target, value in zip(targets, values):
            self.assign_name(target, value)
        return None

    def assign_name(self, target: ast.Name, value) -> None:
        name = target.id
        for scope in reversed(self.scopes):
            if name not in scope:
                continue
            if name in scope.lets:
                scope[name] = value
                return
            tensor = scope.states.get(name)
            current = scope[name]
            if tensor is None and isinstance(current, g.View):
                t = self.graph.tensors[current.tensor]
                whole = current.index.shape == t.shape and np.array_equal(current.index.ravel(), np.arange(t.numel))
                if t.kind == "var" and whole:
                    tensor = t.id
                elif t.kind in ("input", "param"):
                    why = "the host writes an input before each step" if t.kind == "input" else \
                        "params change only through 'minimize'; state the program writes is a 'var'"
                    self.d.error(target.span, f"cannot assign to {t.kind} '{name}': {why}")
                    raise _Bad
            if tensor is None:
                self.d.error(target.span, f"cannot assign to '{name}': only 'let' names and whole 'var' "
                             "tensors can be given a new value")
                raise _Bad
            if self.context not in ("graph", "def"):
                self.d.error(target.span, f"var '{name}' is written by the tensor program outside the "
                             "'program' block", "inside it, 'copy SRC -> DST;' writes a tensor")
                raise _Bad
            scope[name] = self.var_update(tensor, value, target)
            scope.states[name] = tensor
            return
        self.d.error(target.span, f"unknown name '{name}'", "bind it first with 'let'")
        raise _Bad

    def var_update(self, tensor: int, value, target: ast.Name) -> Node:
        t = self.graph.tensors[tensor]
        self.op_tensors.add(t.id)          # the tensor program places it, even if this fails
        like = self.nodes.make("tensor", (), (t.id,), t.shape, t.dtype)
        node = self.as_node(value, target.span, like)
        if node.dtype != t.dtype or node.shape != t.shape:
            self.d.error(target.span, f"var '{t.name}' is {t.dtype}{list(t.shape)}; the value is "
                         f"{node.dtype}{list(node.shape)}", "convert or reshape the value to the var's type")
            raise _Bad
        self.graph.updates[t.id] = node
        return node

    def bind(self, name: str, value, span: Span) -> None:
        if name in self.scopes[-1]:
            self.d.error(span, f"'{name}' is already defined in this scope")
            raise _Bad
        self.scopes[-1][name] = value

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
        if isinstance(e, ast.TupleLit):
            return tuple(self.expr(x) for x in e.items)
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
        key = self.index_key(e, base.shape, f"'{self.graph.tensors[base.tensor].name}'")
        # np.asarray: indexing every axis gives a numpy scalar; a View holds an array.
        return g.View(base.tensor, np.asarray(base.index[tuple(slice(*k) if isinstance(k, tuple) else k
                                                              for k in key)]), e.span)

    def index_key(self, e: ast.IndexExpr, shape, what: str) -> list:
        """Compile-time indices of `e`, range-checked: per axis an index in 0..n-1
        (negative ones count from the end) or a (lo, hi) slice."""
        if len(e.index) > len(shape):
            self.d.error(e.span, f"too many indices: {what} has shape {list(shape)}")
            raise _Bad
        key = []
        for axis, ix in enumerate(e.index):
            n = shape[axis]
            if isinstance(ix, ast.Slice):
                lo = self.int_value(ix.start, "a slice bound") if ix.start is not None else 0
                hi = self.int_value(ix.stop, "a slice bound") if ix.stop is not None else n
                if not 0 <= lo < hi <= n:
                    self.d.error(ix.span, f"slice {lo}:{hi} is out of range for axis {axis} of "
                                 f"{what} (size {n})" if hi > lo else f"slice {lo}:{hi} is empty")
                    raise _Bad
                key.append((lo, hi))
            else:
                i = self.int_value(ix, "an index")
                if not -n <= i < n:
                    self.d.error(ix.span, f"index {i} is out of range for axis {axis} of "
                                 f"{what} (size {n})")
                    raise _Bad
                key.append(i % n)
        return key

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
        if fn in ("f32", "i32", "bool") and len(args) == 1 and _kind(args[0]) in ("int", "float", "bool"):
            # A compile-time conversion (vertex state computed from a loop variable).
            v = args[0]
            if fn == "f32":
                return float(v)
            if fn == "bool":
                return bool(v)
            if isinstance(v, float) and not -2**31 <= v < 2**31:
                self.d.error(e.span, f"i32({v}) does not fit in i32")
                raise _Bad
            return int(v)
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
        if fn in INITS:
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
            import difflib
            from popdsl.ops import FUNCTIONS
            names = set(FUNCTIONS) | set(self.prog.defs) | {n for n, c in self.prog.codelets.items() if c.ret}
            close = difflib.get_close_matches(fn, sorted(names | set(known.split(", "))), n=3, cutoff=0.75)
            self.d.error(e.fn.span, f"unknown operation '{fn}'",
                         *([f"did you mean {', '.join(close)}?"] if close else []),
                         "operations are the tensor primitives, defs (import \"popnn\" for layers) "
                         f"and scalar codelets; at graph level also {known}")
        raise _Bad


def _source_text(span: Span) -> str:
    from popdsl.diagnostics import SourceMap
    line = SourceMap.line(span.path, span.line)
    if line is None or span.end_line != span.line:
        return "<expr>"
    return line[span.col - 1:span.end_col - 1]


def elaborate(prog: Program, target: Target, graph_name: str | None = None,
              root_path: str | None = None, training: bool | None = None,
              budgets: Budgets = Budgets()) -> g.TensorGraph:
    """Run the chosen graph (by name, or the one graph of the root file), in training
    mode when `training` says so (None: when the graph says 'minimize')."""
    diags = Diagnostics()
    graphs = prog.graphs
    if graph_name is not None:
        node = graphs.get(graph_name)
        if node is None:
            raise CompileError([Diagnostic(Span(root_path or "<input>", 0, 0, 0, 0),
                                           f"no graph named '{graph_name}' (have: {', '.join(graphs) or 'none'})")])
    else:
        root = [n for n in graphs.values() if root_path is None or n.span.path == root_path] \
            or list(graphs.values())
        if len(root) != 1:
            msg = "no graph to compile" if not root else \
                f"several graphs ({', '.join(n.name for n in root)}); choose one with --graph"
            raise CompileError([Diagnostic(Span(root_path or "<input>", 0, 0, 0, 0), msg)])
        node = root[0]
    e = _Elaborator(prog, target, diags, training, budgets)
    graph = e.run(node)
    diags.check()
    return graph
