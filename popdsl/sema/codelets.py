"""Codelet checking: `ast.Codelet` → `ir.codelet.Codelet`.

Requires a parsed codelet and the scalar codelets it may call; produces typed IR
with names resolved, compound assignments expanded and provably-unneeded bounds
checks dropped.  User errors go to the `Diagnostics` passed in; the returned IR is
only meaningful when no error was added.

Integer literals are untyped constants (as in Go): `x * 2` with `x: f32` means
`x * 2.0`.  Everything else converts only by an explicit cast.
"""
from __future__ import annotations

from dataclasses import dataclass

from popdsl.diagnostics import Diagnostics, Span
from popdsl.frontend import ast
from popdsl.ir import codelet as ir
from popdsl.ir.intrinsics import INTRINSICS

CASTS = {"f32", "i32", "bool", "f16"}
# The accumulating matrix product's statements, and how each indexes a and b.
AMPS = {"amp": ("i, k", "k, j"), "amp_at": ("k, i", "k, j"), "amp_bt": ("i, k", "j, k")}
MAX_RANK = 2


class _Bad(Exception):
    """An expression already reported; unwinds to the enclosing statement."""


@dataclass
class _Var:
    ir_name: str
    ty: str
    mutable: bool
    kind: str                    # "var" | "let" | "loop"
    bound: object = None         # loop var: (exclusive upper bound, a Sym name or int) when provably >= 0


class _Checker:
    def __init__(self, node: ast.Codelet, scalars: dict[str, ir.Codelet], diags: Diagnostics,
                 recursive=frozenset()):
        self.node, self.scalars, self.d = node, scalars, diags
        self.recursive = recursive      # codelets whose recursive calls are already reported
        self.fields: dict[str, ir.Field] = {}
        self.symbols: list[str] = []
        self.scopes: list[dict[str, _Var]] = []
        self.used_names: set[str] = set()
        self.loop_depth = 0
        self.ret: str | None = None

    # ---------------------------------------------------------------- signature
    def signature(self) -> tuple[ir.Field, ...]:
        n = self.node
        scalar = n.ret is not None
        if scalar:
            self.ret = self.scalar_type(n.ret)
            if self.ret in ir.VECTORS:
                self.d.error(n.ret.span, "a scalar codelet returns a scalar", "write vectors to an 'out' field")
                self.ret = "f32"
        out = []
        for p in n.params:
            if p.name in self.fields:
                self.d.error(p.span, f"duplicate field '{p.name}' in codelet '{n.name}'")
                continue
            dtype = self.scalar_type(p.type)
            dims = p.type.dims or ()
            if scalar and (p.direction is not None or dims):
                self.d.error(p.span, f"parameters of scalar codelet '{n.name}' are plain "
                             "scalars (no direction, no dimensions)")
            if p.direction is None and dims and not scalar:
                self.d.error(p.type.span, f"vertex state '{p.name}' must be a scalar",
                             "give the field a direction (in, out, inout) to connect it to a tensor")
            if len(dims) > MAX_RANK:
                self.d.error(p.type.span, f"field '{p.name}' has {len(dims)} dimensions; "
                             f"codelet fields have at most {MAX_RANK}")
            for dim in dims:
                if isinstance(dim, int) and dim <= 0:
                    self.d.error(p.type.span, f"dimension of '{p.name}' must be positive, not {dim}")
                elif isinstance(dim, int) and dim > 2**31 - 1:
                    # Sizes and indices are i32 in a codelet (and its native code).
                    self.d.error(p.type.span, f"dimension of '{p.name}' is {dim:,}: more than {2**31 - 1:,}, "
                                 "the largest a codelet's i32 sizes hold")
                elif isinstance(dim, str) and dim not in self.symbols:
                    self.symbols.append(dim)
            if dtype in ir.VECTORS and (scalar or p.direction is None or not dims):
                self.d.error(p.type.span, f"'{p.name}': a {dtype} field is an array edge of a vertex codelet",
                             f"declare it 'in {p.name}: {dtype}[n]' (n vectors of what it connects to)")
            direction = p.direction or ("in" if scalar else "state")
            f = ir.Field(p.name, direction, dtype, tuple(dims))
            self.fields[p.name] = f
            out.append(f)
        for s in self.symbols:
            if s in self.fields:
                self.d.error(n.span, f"'{s}' is both a field and a size symbol of codelet '{n.name}'")
        return tuple(out)

    def scalar_type(self, t: ast.TypeRef) -> str:
        if t.name not in ir.FIELD_TYPES:
            self.d.error(t.span, f"unknown type '{t.name}'", "types are f32, f16, i32, bool and the vectors f32x2 "
                         "and f16x4")
            return "f32"
        return t.name

    # ---------------------------------------------------------------- scopes
    def lookup(self, name: str) -> _Var | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def declare(self, name: str, ty: str, kind: str, span: Span, bound=None) -> str:
        if name in self.fields or name in self.symbols:
            self.d.error(span, f"'{name}' shadows a field or size symbol of codelet '{self.node.name}'")
        ir_name, k = name, 1
        while ir_name in self.used_names:
            ir_name, k = f"{name}.{k}", k + 1
        self.used_names.add(ir_name)
        self.scopes[-1][name] = _Var(ir_name, ty, kind == "var", kind, bound)
        return ir_name

    # ---------------------------------------------------------------- statements
    def block(self, b: ast.Block) -> tuple[ir.Stmt, ...]:
        self.scopes.append({})
        out: list[ir.Stmt] = []
        for s in b.stmts:
            try:
                out.extend(self.stmt(s))
            except _Bad:
                pass
        self.scopes.pop()
        return tuple(out)

    def stmt(self, s) -> list[ir.Stmt]:
        if isinstance(s, (ast.LetStmt, ast.VarStmt)):
            kind = "let" if isinstance(s, ast.LetStmt) else "var"
            if isinstance(s.name, tuple):
                self.d.error(s.span, "'let (a, b) = ...' takes apart the results of a def; "
                             "codelets have no tuples")
                raise _Bad
            if getattr(s, "shared", False):
                self.d.error(s.span, "'shared' is for the params and vars of a def, not a codelet's locals")
                raise _Bad
            want = self.scalar_type(s.type) if s.type is not None else None
            if s.type is not None and s.type.dims:
                self.d.error(s.type.span, "codelet locals are scalars (or the vectors f32x2 and f16x4)")
            if want == "f16":
                want = "f32"
            if s.value is None:
                if want is None:
                    self.d.error(s.span, f"'{s.name}' needs a type or an initial value")
                    raise _Bad
                init = None
            else:
                init = self.expr(s.value, want)
                if want is not None:
                    init = self.coerce(init, want, s.value)
            ty = want or init.ty
            return [ir.Declare(self.declare(s.name, ty, kind, s.span), ty, init)]
        if isinstance(s, ast.AssignStmt):
            return [self.assign(s)]
        if isinstance(s, ast.ForStmt):
            return [self.for_stmt(s)]
        if isinstance(s, ast.WhileStmt):
            cond = self.cond(s.cond)
            self.loop_depth += 1
            body = self.block(s.body)
            self.loop_depth -= 1
            return [ir.While(cond, body)]
        if isinstance(s, ast.IfStmt):
            cond = self.cond(s.cond)
            then = self.block(s.then)
            if s.orelse is None:
                orelse = ()
            elif isinstance(s.orelse, ast.IfStmt):
                self.scopes.append({})
                orelse = tuple(self.stmt(s.orelse))
                self.scopes.pop()
            else:
                orelse = self.block(s.orelse)
            return [ir.If(cond, then, orelse)]
        if isinstance(s, (ast.BreakStmt, ast.ContinueStmt)):
            word = "break" if isinstance(s, ast.BreakStmt) else "continue"
            if not self.loop_depth:
                self.d.error(s.span, f"'{word}' outside a loop")
                raise _Bad
            return [ir.Break() if word == "break" else ir.Continue()]
        if isinstance(s, ast.CallStmt):
            return [self.call_stmt(s)]
        if isinstance(s, ast.ReturnStmt):
            if self.ret is None:
                if s.value is not None:
                    self.d.error(s.value.span, f"vertex codelet '{self.node.name}' returns no value",
                                 "write results to an 'out' field; declare '-> TYPE' for a scalar codelet")
                    raise _Bad
                return [ir.Return(None)]
            if s.value is None:
                self.d.error(s.span, f"scalar codelet '{self.node.name}' must return a {self.ret}")
                raise _Bad
            want = ir.compute_type(self.ret)
            return [ir.Return(self.coerce(self.expr(s.value, want), want, s.value))]
        word = type(s).__name__.removesuffix("Stmt").lower()
        self.d.error(s.span, f"'{word}' is not allowed inside a codelet",
                     "codelets hold scalar code; graph statements belong in a graph")
        raise _Bad

    def call_stmt(self, s: ast.CallStmt) -> ir.Amp:
        e = s.call
        if not isinstance(e, ast.Call) or not isinstance(e.fn, ast.Name):
            self.d.error(s.span, "this expression does nothing on its own",
                         "assign it ('x = ...;', 'y[i] = ...;') or bind it with 'let'")
            raise _Bad
        name = e.fn.id
        if name not in AMPS:
            known = name in INTRINSICS or name in CASTS or name in self.scalars \
                or name in ("select", "len")
            self.d.error(s.span, f"'{name}(...)' returns a value that nothing uses" if known
                         else f"unknown statement '{name}(...)'",
                         "the only calls that stand alone in a codelet are amp(...), amp_at(...) and amp_bt(...)")
            raise _Bad
        if self.ret is not None:
            self.d.error(s.span, f"{name} writes a field: it belongs in a vertex codelet, not a scalar one")
            raise _Bad
        return self.amp(e, name)

    def amp(self, e: ast.Call, name: str) -> ir.Amp:
        """amp(c[i, j], a[i, k], b[k, j], m, k, n[, astep, bstep[, cstep]]), and
        amp_at / amp_bt with a or b read transposed: see `ir.codelet.Amp`."""
        a_ix, b_ix = AMPS[name]
        usage = (f"{name}(c[i, j], a[{a_ix}], b[{b_ix}], m, k, n), {name}(..., m, k, n, astep, bstep) or "
                 f"{name}(..., m, k, n, astep, bstep, cstep)")
        if any(isinstance(x, ast.Kwarg) for x in e.args) or len(e.args) not in (6, 8, 9):
            self.d.error(e.span, f"{name} takes 6, 8 or 9 arguments, given {len(e.args)}", usage)
            raise _Bad
        operands = []
        for role, x in zip("cab", e.args[:3]):
            f = self.fields.get(x.base.id) if isinstance(x, ast.IndexExpr) and isinstance(x.base, ast.Name) else None
            if f is None or f.rank != 2 or len(x.index) != 2 or any(isinstance(i, ast.Slice) for i in x.index):
                self.d.error(x.span, f"{name}'s '{role}' is an element of a 2-D field, such as {role}[0, 0]: "
                             "where the block starts", usage)
                raise _Bad
            operands.append((f, tuple(self.coerce(self.expr(i, "i32"), "i32", i) for i in x.index), x))
        (c, c_at, cx), (a, a_at, ax), (b, b_at, bx) = operands
        if c.direction not in ("out", "inout"):
            self.d.error(cx.span, f"{name} accumulates into '{c.name}', an '{c.direction}' field",
                         f"declare it 'inout' ({name} adds to what it holds)")
            raise _Bad
        if c.dtype != "f32":
            self.d.error(cx.span, f"{name} accumulates in f32; '{c.name}' is {c.dtype}")
            raise _Bad
        if a.dtype != b.dtype or a.dtype not in ("f32", "f16"):
            # Point at the operand that breaks the rule: a's type, or b's next to it.
            self.d.error((ax if a.dtype not in ("f32", "f16") else bx).span,
                         f"{name} multiplies two f32 or two f16 fields, not {a.dtype} '{a.name}' "
                         f"and {b.dtype} '{b.name}'")
            raise _Bad
        if c.name in (a.name, b.name):
            self.d.error(e.span, f"{name} reads '{c.name}' while it accumulates into it",
                         "give the result its own field")
            raise _Bad
        sizes = [self.coerce(self.expr(x, "i32"), "i32", x) for x in e.args[3:]]
        sizes += [ir.Const(1, "i32")] * (6 - len(sizes))
        return ir.Amp(c.name, c_at, a.name, a_at, b.name, b_at, *sizes, checked=True,
                      a_transposed=name == "amp_at", b_transposed=name == "amp_bt")

    def for_stmt(self, s: ast.ForStmt) -> ir.For:
        start = self.coerce(self.expr(s.start, "i32"), "i32", s.start)
        stop = self.coerce(self.expr(s.stop, "i32"), "i32", s.stop)
        step = 1
        if s.step is not None:
            step = const_int(s.step)
            if step is None or step == 0 or not -2**31 <= step < 2**31:
                self.d.error(s.step.span, "a loop step must be a non-zero integer constant"
                             + (" that fits in i32" if step else ""))
                step = 1
        bound = None
        if step > 0 and isinstance(start, ir.Const) and start.value >= 0:
            if isinstance(stop, ir.Sym):
                bound = stop.name
            elif isinstance(stop, ir.Const):
                bound = stop.value
        self.scopes.append({})
        var = self.declare(s.var, "i32", "loop", s.span, bound)
        self.loop_depth += 1
        body = self.block(s.body)
        self.loop_depth -= 1
        self.scopes.pop()
        return ir.For(var, start, stop, step, body)

    def assign(self, s: ast.AssignStmt) -> ir.Stmt:
        t = s.target
        if isinstance(t, ast.Name) and self.lookup(t.id) is not None:
            v = self.lookup(t.id)
            if not v.mutable:
                what = "loop variable" if v.kind == "loop" else "'let' binding"
                self.d.error(t.span, f"cannot assign to {what} '{t.id}'",
                             *(["declare it with 'var' to make it mutable"] if v.kind == "let" else []))
                raise _Bad
            value = self.rhs(s, ir.Local(v.ir_name, v.ty))
            return ir.Assign(v.ir_name, value)
        if isinstance(t, ast.Name):
            field, index = t.id, ()
        elif isinstance(t, ast.IndexExpr) and isinstance(t.base, ast.Name) and self.lookup(t.base.id) is not None:
            v = self.lookup(t.base.id)
            self.d.error(t.span, f"cannot assign to a lane of '{t.base.id}'" if v.ty in ir.VECTORS
                         else f"'{t.base.id}' is a {v.ty}, not a field: it cannot be indexed",
                         *([f"build a new vector: {t.base.id} = {v.ty}(...)"] if v.ty in ir.VECTORS else []))
            raise _Bad
        elif isinstance(t, ast.IndexExpr) and isinstance(t.base, ast.Name):
            field, index = t.base.id, t.index
        else:
            self.d.error(t.span, "cannot assign to this expression")
            raise _Bad
        f = self.fields.get(field)
        if f is None:
            self.d.error(t.span, f"unknown name '{field}'")
            raise _Bad
        if f.direction not in ("out", "inout"):
            what = "vertex state" if f.direction == "state" else f"'{f.direction}' field"
            self.d.error(t.span, f"cannot write to {what} '{field}'",
                         "only 'out' and 'inout' fields can be written")
            raise _Bad
        load = self.load(f, index, t.span)
        value = self.rhs(s, load)
        return ir.Store(field, load.index, value, load.checked)

    def rhs(self, s: ast.AssignStmt, current: ir.Expr) -> ir.Expr:
        value = self.expr(s.value, current.ty)
        if s.op != "=":
            value = self.arith(s.op[0], current, value, s.span, s.value, None)
        return self.coerce(value, current.ty, s.value)

    # ---------------------------------------------------------------- expressions
    def cond(self, e) -> ir.Expr:
        c = self.expr(e, "bool")
        if c.ty != "bool":
            self.d.error(e.span, f"condition must be bool, found {c.ty}",
                         "compare explicitly, e.g. 'x != 0'")
            raise _Bad
        return c

    def coerce(self, x: ir.Expr, want: str, node) -> ir.Expr:
        want = ir.compute_type(want)
        if x.ty == want:
            return x
        if isinstance(x, ir.Const) and x.ty == "i32" and want == "f32":
            return ir.Const(float(x.value), "f32")
        self.d.error(node.span, f"type mismatch: expected {want}, found {x.ty}",
                     f"convert explicitly, e.g. {want}(...)")
        raise _Bad

    def expr(self, e, hint: str | None = None) -> ir.Expr:
        if isinstance(e, ast.IntLit):
            if e.value > 2**31 - 1:
                self.d.error(e.span, f"integer literal {e.value} does not fit in i32")
                raise _Bad
            return ir.Const(float(e.value), "f32") if hint == "f32" else ir.Const(e.value, "i32")
        if isinstance(e, ast.FloatLit):
            return ir.Const(e.value, "f32")
        if isinstance(e, ast.BoolLit):
            return ir.Const(e.value, "bool")
        if isinstance(e, ast.Name):
            v = self.lookup(e.id)
            if v is not None:
                return ir.Local(v.ir_name, v.ty)
            if e.id in self.fields:
                f = self.fields[e.id]
                if f.rank:
                    self.d.error(e.span, f"field '{e.id}' is an array of rank {f.rank}; index it")
                    raise _Bad
                return ir.Load(e.id, (), ir.compute_type(f.dtype))
            if e.id in self.symbols:
                return ir.Sym(e.id)
            self.d.error(e.span, f"unknown name '{e.id}'")
            raise _Bad
        if isinstance(e, ast.IndexExpr):
            if isinstance(e.base, ast.Name) and e.base.id in self.fields and self.lookup(e.base.id) is None:
                return self.load(self.fields[e.base.id], e.index, e.span)
            known = not isinstance(e.base, ast.Name) or self.lookup(e.base.id) is not None
            x = self.expr(e.base) if known else None
            if x is None or x.ty not in ir.VECTORS:
                what = e.base.id if isinstance(e.base, ast.Name) else "this expression"
                self.d.error(e.base.span, f"'{what}' is not a field and cannot be indexed")
                raise _Bad
            n = ir.lanes(x.ty)
            k = const_int(e.index[0]) if len(e.index) == 1 and not isinstance(e.index[0], ast.Slice) else None
            if k is None or not 0 <= k < n:
                self.d.error(e.span, f"a lane of {x.ty} is a constant from 0 to {n - 1}")
                raise _Bad
            return ir.Lane(x, k)
        if isinstance(e, ast.Neg):
            if isinstance(e.x, ast.IntLit):
                return self.expr(ast.IntLit(-e.x.value, e.span), hint) if e.x.value <= 2**31 \
                    else self.expr(e.x, hint)
            x = self.expr(e.x, hint)
            if x.ty == "bool":
                self.d.error(e.span, "cannot negate a bool (use '!')")
                raise _Bad
            return ir.Unary("neg", x, x.ty)
        if isinstance(e, ast.Not):
            x = self.expr(e.x, "bool")
            if x.ty != "bool":
                self.d.error(e.span, f"'!' needs a bool, found {x.ty}")
                raise _Bad
            return ir.Unary("not", x, "bool")
        if isinstance(e, ast.Binary):
            return self.binary(e, hint)
        if isinstance(e, ast.Call):
            return self.call(e, hint)
        if isinstance(e, ast.ListLit):
            self.d.error(e.span, "list literals are not allowed inside a codelet")
            raise _Bad
        if isinstance(e, ast.TupleLit):
            self.d.error(e.span, "tuples are not allowed inside a codelet",
                         "a def returns several results as (a, b); a codelet writes its 'out' fields")
            raise _Bad
        if isinstance(e, ast.StringLit):
            self.d.error(e.span, "strings are not allowed inside a codelet")
            raise _Bad
        raise AssertionError(f"unhandled expression {type(e).__name__}")

    def operands(self, a_node, b_node, hint):
        """Lower two operands, letting an integer literal take the other's type."""
        a = self.expr(a_node, hint)
        b = self.expr(b_node, a.ty if a.ty != "bool" else hint)
        if a.ty == "i32" and b.ty == "f32" and isinstance(a, ir.Const):
            a = ir.Const(float(a.value), "f32")
        return a, b

    def binary(self, e: ast.Binary, hint) -> ir.Expr:
        op = e.op
        if op in ("&&", "||"):
            a, b = self.expr(e.a, "bool"), self.expr(e.b, "bool")
            for x, n in ((a, e.a), (b, e.b)):
                if x.ty != "bool":
                    self.d.error(n.span, f"'{op}' needs bool operands, found {x.ty}")
                    raise _Bad
            return ir.Binary(op, a, b, "bool")
        if op in ("==", "!=", "<", "<=", ">", ">="):
            a, b = self.operands(e.a, e.b, None)
            if a.ty != b.ty:
                self.d.error(e.span, f"cannot compare {a.ty} with {b.ty}")
                raise _Bad
            if a.ty == "bool" and op not in ("==", "!="):
                self.d.error(e.span, f"'{op}' is not defined on bool")
                raise _Bad
            if a.ty in ir.VECTORS:
                self.d.error(e.span, f"'{op}' is not defined on {a.ty}", "compare lanes: v[0] < w[0]")
                raise _Bad
            return ir.Binary(op, a, b, "bool")
        if op == "@":
            self.d.error(e.span, "'@' (matrix product) is a graph operation, not codelet code")
            raise _Bad
        a, b = self.operands(e.a, e.b, hint)
        return self.arith(op, a, b, e.span, e.b, e)

    def arith(self, op, a: ir.Expr, b: ir.Expr, span: Span, b_node, node) -> ir.Expr:
        if isinstance(b, ir.Const) and b.ty == "i32" and a.ty in ("f32",) + tuple(ir.VECTORS):
            b = ir.Const(float(b.value), "f32")
        if isinstance(a, ir.Const) and a.ty == "i32" and b.ty in ir.VECTORS:
            a = ir.Const(float(a.value), "f32")
        # A scalar operand of vector arithmetic applies to every lane.
        if a.ty in ir.VECTORS and b.ty == "f32":
            b = ir.Splat(b, a.ty)
        elif b.ty in ir.VECTORS and a.ty == "f32":
            a = ir.Splat(a, b.ty)
        if a.ty != b.ty:
            self.d.error(span, f"type mismatch: {a.ty} {op} {b.ty}",
                         "convert explicitly, e.g. f32(i)")
            raise _Bad
        if a.ty == "bool":
            self.d.error(span, f"'{op}' is not defined on bool")
            raise _Bad
        if op == "%" and a.ty != "i32":
            self.d.error(span, "'%' needs i32 operands")
            raise _Bad
        return ir.Binary(op, a, b, a.ty)

    def call(self, e: ast.Call, hint) -> ir.Expr:
        if not isinstance(e.fn, ast.Name):
            self.d.error(e.fn.span, "only named functions can be called")
            raise _Bad
        name = e.fn.id
        if any(isinstance(a, ast.Kwarg) for a in e.args):
            self.d.error(e.span, f"'{name}' takes positional arguments only")
            raise _Bad
        args = e.args

        def arity(n):
            if len(args) != n:
                self.d.error(e.span, f"'{name}' takes {n} argument{'s' if n != 1 else ''}, "
                             f"given {len(args)}")
                raise _Bad
        if name in ir.VECTORS:
            n = ir.lanes(name)
            if len(args) not in (1, n):
                self.d.error(e.span, f"{name}(x) repeats one f32; {name}(...) takes 1 or {n} values, given {len(args)}")
                raise _Bad
            xs = tuple(self.coerce(self.expr(a, "f32"), "f32", a) for a in args)
            return ir.Splat(xs[0], name) if len(xs) == 1 else ir.Vector(xs, name)
        if name in CASTS:
            arity(1)
            x = self.expr(args[0], None)
            if x.ty in ir.VECTORS:
                self.d.error(e.span, f"{name}(...) of a {x.ty}: take a lane, x[0]")
                raise _Bad
            if name == "f16":       # computed in f32: the value an f16 store would keep
                return ir.Intrinsic("f16", (x if x.ty == "f32" else ir.Cast(x, "f32"),), "f32")
            return x if x.ty == name else ir.Cast(x, name)
        if name == "select":
            arity(3)
            c = self.cond(args[0])
            a, b = self.operands(args[1], args[2], hint)
            if a.ty != b.ty:
                self.d.error(e.span, f"select: branches have types {a.ty} and {b.ty}")
                raise _Bad
            return ir.Select(c, a, b, a.ty)
        if name == "len":
            if len(args) not in (1, 2) or not isinstance(args[0], ast.Name) \
                    or args[0].id not in self.fields or not self.fields[args[0].id].rank:
                self.d.error(e.span, "len(field) or len(field, axis) takes an array field")
                raise _Bad
            axis = const_int(args[1]) if len(args) == 2 else 0
            f = self.fields[args[0].id]
            if axis is None or not 0 <= axis < f.rank:
                self.d.error(e.span, f"axis must be a constant in 0..{f.rank - 1}")
                raise _Bad
            dim = f.dims[axis]
            return ir.Sym(dim) if isinstance(dim, str) else ir.Const(dim, "i32")
        intr = INTRINSICS.get(name)
        if intr is not None:
            arity(intr.arity)
            if any(t in ir.VECTORS for t in intr.types):
                xs = [self.expr(a, hint) for a in args]
                vec = next((x.ty for x in xs if x.ty in ir.VECTORS), None)
                if vec is not None:      # a scalar next to a vector applies to every lane
                    xs = [ir.Splat(ir.Const(float(x.value), "f32"), vec) if isinstance(x, ir.Const) and x.ty == "i32"
                          else ir.Splat(x, vec) if x.ty == "f32" else x for x in xs]
                    if any(x.ty != vec for x in xs):
                        self.d.error(e.span, f"{name}: arguments have types {', '.join(x.ty for x in xs)}")
                        raise _Bad
                    return ir.Intrinsic(name, tuple(xs), vec)
            if tuple(t for t in intr.types if t not in ir.VECTORS) == ("f32",):
                xs = tuple(self.coerce(self.expr(a, "f32"), "f32", a) for a in args)
                return ir.Intrinsic(name, xs, "f32")
            # Several operand types: the operands agree (an integer literal takes the
            # other operand's type) and pick the result type.
            xs = [self.expr(args[0], hint)]
            if len(args) == 2:
                xs = list(self.operands(args[0], args[1], hint))
            else:
                xs += [self.coerce(self.expr(a, xs[0].ty), xs[0].ty, a) for a in args[1:]]
            if any(x.ty != xs[0].ty for x in xs):
                self.d.error(e.span, f"{name}: arguments have types {', '.join(x.ty for x in xs)}")
                raise _Bad
            if not intr.accepts(xs[0].ty):
                self.d.error(e.span, f"{name} is not defined on {xs[0].ty}")
                raise _Bad
            return ir.Intrinsic(name, tuple(xs), xs[0].ty)
        sc = self.scalars.get(name)
        if sc is not None:
            arity(len(sc.fields))
            xs = tuple(self.coerce(self.expr(a, ir.compute_type(f.dtype)), f.dtype, a)
                       for a, f in zip(args, sc.fields))
            return ir.CallScalar(name, xs, ir.compute_type(sc.ret))
        if name in AMPS:
            self.d.error(e.fn.span, f"{name}(...) is a statement: it adds into its first field and has no value",
                         f"write it on a line of its own: {name}(c[i, j], ...);")
        elif name not in self.recursive:
            self.d.error(e.fn.span, f"unknown function '{name}'")
        raise _Bad

    def load(self, f: ir.Field, index, span: Span) -> ir.Load:
        if len(index) != f.rank:
            self.d.error(span, f"field '{f.name}' has {f.rank} dimension{'s' if f.rank != 1 else ''}, "
                         f"indexed with {len(index)}")
            raise _Bad
        idx, checked = [], False
        for axis, i in enumerate(index):
            if isinstance(i, ast.Slice):
                self.d.error(i.span, "slices are not allowed inside a codelet")
                raise _Bad
            x = self.coerce(self.expr(i, "i32"), "i32", i)
            checked |= not self.provably_in_range(x, f.dims[axis])
            idx.append(x)
        return ir.Load(f.name, tuple(idx), ir.compute_type(f.dtype), checked)

    def provably_in_range(self, x: ir.Expr, dim) -> bool:
        if isinstance(x, ir.Const):
            return isinstance(dim, int) and 0 <= x.value < dim
        if isinstance(x, ir.Local):
            for scope in reversed(self.scopes):
                for v in scope.values():
                    if v.ir_name == x.name and v.kind == "loop" and v.bound is not None:
                        b = v.bound
                        return b == dim or (isinstance(b, int) and isinstance(dim, int) and b <= dim)
        return False


def const_int(e) -> int | None:
    if isinstance(e, ast.IntLit):
        return e.value
    if isinstance(e, ast.Neg) and isinstance(e.x, ast.IntLit):
        return -e.x.value
    return None


def _always_returns(stmts) -> bool:
    """Whether the statements (AST, so that a 'return' whose expression had an
    error still counts) end in a 'return' on every path."""
    if not stmts:
        return False
    last = stmts[-1]
    if isinstance(last, ast.ReturnStmt):
        return True
    if isinstance(last, ast.IfStmt):
        orelse = last.orelse
        rest = () if orelse is None else (orelse,) if isinstance(orelse, ast.IfStmt) else orelse.stmts
        return _always_returns(last.then.stmts) and _always_returns(rest)
    return False


def lower_codelet(node: ast.Codelet, scalars: dict[str, ir.Codelet], diags: Diagnostics,
                  recursive=frozenset()) -> ir.Codelet:
    c = _Checker(node, scalars, diags, recursive)
    fields = c.signature()
    c.scopes.append({})
    body = c.block(node.body)
    if node.ret is not None and not _always_returns(node.body.stmts):
        diags.error(node.span, f"scalar codelet '{node.name}' must end with 'return'")
    return ir.Codelet(node.name, fields, tuple(c.symbols), c.ret, body)
