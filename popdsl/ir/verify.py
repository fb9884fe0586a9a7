"""Verifier of codelet IR: accept only what the code generator handles correctly.

Requires `popdsl.ir.codelet`.  Produces `verify_codelet`, which raises ValueError
naming the codelet and the problem.  It runs on everything loaded from a (possibly
damaged or hostile) `.popx` and again inside `popdsl.codegen.llvm.emit_module`, so it
checks every invariant codegen relies on: node classes, field declarations, types of
every expression and operand, index arity, writable fields, locals declared before use
(per scope), loop variables read-only, break/continue inside loops, return shape,
non-zero constant steps, calls to known scalar codelets with matching argument types
and no recursion.
"""
from __future__ import annotations

from typing import Mapping

from popdsl.ir import codelet as ir
from popdsl.ir.intrinsics import INTRINSICS

_EXPR_TYPES = ("f32", "i32", "bool") + tuple(ir.VECTORS)
_ARITH = ("+", "-", "*", "/", "%")
_CMP = ("==", "!=", "<", "<=", ">", ">=")
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def _is_ident(s) -> bool:
    return isinstance(s, str) and s.isidentifier() and s.isascii()


def _is_local(s) -> bool:
    # the front end renames shadowing locals to e.g. "i.1"; LLVM quotes them anyway
    return isinstance(s, str) and 0 < len(s) < 256 and s.isprintable() and s.isascii() \
        and '"' not in s and "\\" not in s


class _Checker:
    def __init__(self, c: ir.Codelet, scalars: Mapping[str, ir.Codelet]):
        self.c, self.scalars = c, scalars
        self.fields: dict[str, ir.Field] = {}
        self.loop_depth = 0

    def fail(self, msg):
        raise ValueError(f"codelet {getattr(self.c, 'name', '?')!r}: invalid IR: {msg}")

    # ------------------------------------------------------------ declarations
    def decls(self):
        c = self.c
        if not isinstance(c, ir.Codelet) or not _is_ident(c.name):
            self.fail("not a codelet or bad name")
        if not isinstance(c.fields, tuple) or not isinstance(c.symbols, tuple) \
                or not isinstance(c.body, tuple):
            self.fail("fields, symbols and body must be tuples")
        used_syms = []
        for f in c.fields:
            if not isinstance(f, ir.Field) or not _is_ident(f.name):
                self.fail(f"bad field {f!r}")
            if f.name in self.fields:
                self.fail(f"duplicate field {f.name!r}")
            if f.direction not in ir.DIRECTIONS or f.dtype not in ir.FIELD_TYPES:
                self.fail(f"field {f.name!r}: bad direction or type")
            if f.dtype in ir.VECTORS and (f.direction == "state" or not f.dims or c.ret is not None):
                self.fail(f"vector field {f.name!r} must be an array edge of a vertex codelet")
            if not isinstance(f.dims, tuple) or len(f.dims) > 2:
                self.fail(f"field {f.name!r}: rank must be 0, 1 or 2")
            for d in f.dims:
                if isinstance(d, bool) or not isinstance(d, (int, str)):
                    self.fail(f"field {f.name!r}: bad dimension {d!r}")
                if isinstance(d, int) and not 0 <= d <= _I32_MAX:
                    self.fail(f"field {f.name!r}: dimension {d} out of range")
                if isinstance(d, str):
                    if d not in c.symbols:
                        self.fail(f"field {f.name!r}: unknown size symbol {d!r}")
                    if d not in used_syms:
                        used_syms.append(d)
            if f.direction == "state" and f.rank:
                self.fail(f"state field {f.name!r} must be a scalar")
            self.fields[f.name] = f
        if len(set(c.symbols)) != len(c.symbols) or not all(map(_is_ident, c.symbols)):
            self.fail("bad or duplicate size symbols")
        if set(c.symbols) != set(used_syms):
            self.fail("symbols must be exactly those used by the fields")
        if c.ret is not None:
            if c.ret not in ir.SCALARS:
                self.fail(f"bad return type {c.ret!r}")
            if any(f.direction != "in" or f.rank for f in c.fields) or c.symbols:
                self.fail("scalar codelet parameters must be rank-0 `in` fields")

    # ------------------------------------------------------------ statements
    def block(self, body, scope: dict):
        if not isinstance(body, tuple):
            self.fail("a body must be a tuple of statements")
        scope = dict(scope)
        for s in body:
            self.stmt(s, scope)

    def stmt(self, s, scope: dict):
        if isinstance(s, ir.Declare):
            if not _is_local(s.name) or s.ty not in _EXPR_TYPES:
                self.fail(f"bad declaration {s!r}")
            if s.name in scope or s.name in self.all_locals:
                self.fail(f"local {s.name!r} declared twice")
            if s.init is not None:
                self.expect(s.init, s.ty, scope)
            scope[s.name] = (s.ty, True)
            self.all_locals.add(s.name)
        elif isinstance(s, ir.Assign):
            if s.name not in scope:
                self.fail(f"assignment to unknown local {s.name!r}")
            ty, writable = scope[s.name]
            if not writable:
                self.fail(f"assignment to loop variable {s.name!r}")
            self.expect(s.value, ty, scope)
        elif isinstance(s, ir.Store):
            f = self.field(s.field)
            if f.direction not in ("out", "inout"):
                self.fail(f"store to {f.direction} field {f.name!r}")
            self.indices(f, s.index, scope)
            self.expect(s.value, ir.compute_type(f.dtype), scope)
            self.flag(s.checked)
        elif isinstance(s, ir.Amp):
            self.amp(s, scope)
        elif isinstance(s, ir.If):
            self.expect(s.cond, "bool", scope)
            self.block(s.then, scope)
            self.block(s.orelse, scope)
        elif isinstance(s, ir.For):
            if not _is_local(s.var) or s.var in scope or s.var in self.all_locals:
                self.fail(f"bad or duplicate loop variable {s.var!r}")
            if isinstance(s.step, bool) or not isinstance(s.step, int) or s.step == 0 \
                    or not _I32_MIN < s.step <= _I32_MAX:
                self.fail(f"loop step must be a non-zero i32 constant, got {s.step!r}")
            self.expect(s.start, "i32", scope)
            self.expect(s.stop, "i32", scope)
            self.all_locals.add(s.var)
            self.loop_depth += 1
            self.block(s.body, {**scope, s.var: ("i32", False)})
            self.loop_depth -= 1
        elif isinstance(s, ir.While):
            self.expect(s.cond, "bool", scope)
            self.loop_depth += 1
            self.block(s.body, scope)
            self.loop_depth -= 1
        elif isinstance(s, (ir.Break, ir.Continue)):
            if not self.loop_depth:
                self.fail(f"{type(s).__name__.lower()} outside a loop")
        elif isinstance(s, ir.Return):
            if self.c.ret is None:
                if s.value is not None:
                    self.fail("return with a value in a vertex codelet")
            else:
                if s.value is None:
                    self.fail("return without a value in a scalar codelet")
                self.expect(s.value, ir.compute_type(self.c.ret), scope)
        else:
            self.fail(f"not a statement: {s!r}")

    def amp(self, s: ir.Amp, scope: dict):
        if self.c.ret is not None:
            self.fail("amp in a scalar codelet")
        c, a, b = (self.field(name) for name in (s.c, s.a, s.b))
        if c.direction not in ("out", "inout") or c.dtype != "f32":
            self.fail(f"amp accumulates into an f32 out/inout field, not {c.direction} {c.dtype} {c.name!r}")
        if a.dtype != b.dtype or a.dtype not in ("f32", "f16"):
            self.fail(f"amp multiplies two f32 or two f16 fields, not {a.dtype} and {b.dtype}")
        if c.name in (a.name, b.name):
            self.fail(f"amp reads the field {c.name!r} it accumulates into")
        for f, (_, at) in zip((c, a, b), s.operands()):
            if f.rank != 2:
                self.fail(f"amp operand {f.name!r} has rank {f.rank}, not 2")
            self.indices(f, at, scope)
        for x in s.sizes():
            self.expect(x, "i32", scope)
        for v in (s.checked, s.a_transposed, s.b_transposed):
            self.flag(v)
        if s.a_transposed and s.b_transposed:
            self.fail("amp reads a or b transposed, not both")

    # ------------------------------------------------------------ expressions
    def flag(self, v):
        if not isinstance(v, bool):
            self.fail(f"checked must be a bool, got {v!r}")

    def field(self, name) -> ir.Field:
        f = self.fields.get(name) if isinstance(name, str) else None
        if f is None:
            self.fail(f"unknown field {name!r}")
        return f

    def indices(self, f: ir.Field, index, scope):
        if not isinstance(index, tuple) or len(index) != f.rank:
            self.fail(f"field {f.name!r} of rank {f.rank} indexed with "
                      f"{len(index) if isinstance(index, tuple) else index!r} indices")
        for i in index:
            self.expect(i, "i32", scope)

    def expect(self, e, ty, scope):
        got = self.expr(e, scope)
        if got != ty:
            self.fail(f"expected {ty}, got {got} in {e!r}")

    def expr(self, e, scope) -> str:
        ty = getattr(e, "ty", None)
        if ty not in _EXPR_TYPES:
            self.fail(f"bad expression type in {e!r}")
        if isinstance(e, ir.Const):
            v = e.value
            ok = {"f32": isinstance(v, (int, float)) and not isinstance(v, bool),
                  "i32": isinstance(v, int) and not isinstance(v, bool) and _I32_MIN <= v <= _I32_MAX,
                  "bool": isinstance(v, bool)}[ty]
            if not ok:
                self.fail(f"constant {v!r} is not a {ty}")
        elif isinstance(e, ir.Local):
            if e.name not in scope or scope[e.name][0] != ty:
                self.fail(f"unknown local or wrong type: {e!r}")
        elif isinstance(e, ir.Sym):
            if e.name not in self.c.symbols or ty != "i32":
                self.fail(f"unknown size symbol {e.name!r}")
        elif isinstance(e, ir.Len):
            f = self.field(e.field)
            if ty != "i32" or isinstance(e.axis, bool) or not isinstance(e.axis, int) \
                    or not 0 <= e.axis < f.rank:
                self.fail(f"bad len axis {e.axis!r} of field {f.name!r}")
        elif isinstance(e, ir.Load):
            f = self.field(e.field)
            self.indices(f, e.index, scope)
            self.flag(e.checked)
            if ty != ir.compute_type(f.dtype):
                self.fail(f"load of {f.name!r} typed {ty}, field is {f.dtype}")
            if f.direction == "out":
                pass   # reading back what this vertex wrote is allowed
        elif isinstance(e, ir.Unary):
            x = self.expr(e.x, scope)
            if e.op == "not" and not (x == ty == "bool") or \
                    e.op == "neg" and not (x == ty and ty in ("f32", "i32") + tuple(ir.VECTORS)) or \
                    e.op not in ("not", "neg"):
                self.fail(f"bad unary {e.op!r} on {x}")
        elif isinstance(e, ir.Binary):
            a, b = self.expr(e.a, scope), self.expr(e.b, scope)
            if a != b:
                self.fail(f"operands of {e.op!r} differ: {a} and {b}")
            if e.op in _ARITH:
                if a == "bool" or ty != a or (a in ir.VECTORS and e.op == "%"):
                    self.fail(f"bad arithmetic {e.op!r} on {a} giving {ty}")
            elif e.op in _CMP:
                if ty != "bool" or (a == "bool" and e.op not in ("==", "!=")) or a in ir.VECTORS:
                    self.fail(f"bad comparison {e.op!r} on {a}")
            elif e.op in ("&&", "||"):
                if a != "bool" or ty != "bool":
                    self.fail(f"{e.op!r} needs bools")
            else:
                self.fail(f"unknown operator {e.op!r}")
        elif isinstance(e, ir.Select):
            self.expect(e.cond, "bool", scope)
            self.expect(e.a, ty, scope)
            self.expect(e.b, ty, scope)
        elif isinstance(e, ir.Cast):
            if ty in ir.VECTORS or self.expr(e.x, scope) in ir.VECTORS:
                self.fail(f"a cast to or from a vector: {e!r}")
        elif isinstance(e, ir.Splat):
            if ty not in ir.VECTORS:
                self.fail(f"splat to {ty}")
            self.expect(e.x, "f32", scope)
        elif isinstance(e, ir.Vector):
            if ty not in ir.VECTORS or not isinstance(e.xs, tuple) or len(e.xs) != ir.lanes(ty):
                self.fail(f"bad vector {e!r}")
            for x in e.xs:
                self.expect(x, "f32", scope)
        elif isinstance(e, ir.Lane):
            x = self.expr(e.x, scope)
            if x not in ir.VECTORS or ty != "f32" or isinstance(e.index, bool) or not isinstance(e.index, int) \
                    or not 0 <= e.index < ir.lanes(x):
                self.fail(f"bad lane {e!r}")
        elif isinstance(e, ir.Intrinsic):
            entry = INTRINSICS.get(e.name) if isinstance(e.name, str) else None
            if entry is None:
                self.fail(f"unknown intrinsic {e.name!r}")
            if not isinstance(e.args, tuple) or len(e.args) != entry.arity:
                self.fail(f"{e.name} takes {entry.arity} argument(s)")
            if not entry.accepts(ty):
                self.fail(f"{e.name} on {ty}")
            for a in e.args:
                self.expect(a, ty, scope)
        elif isinstance(e, ir.CallScalar):
            callee = self.scalars.get(e.name)
            if callee is None or callee.ret is None:
                self.fail(f"call of unknown scalar codelet {e.name!r}")
            if ty != ir.compute_type(callee.ret) or not isinstance(e.args, tuple) \
                    or len(e.args) != len(callee.fields):
                self.fail(f"bad call of {e.name!r}")
            for a, f in zip(e.args, callee.fields):
                self.expect(a, ir.compute_type(f.dtype), scope)
        else:
            self.fail(f"not an expression: {e!r}")
        return ty

    def run(self):
        self.decls()
        self.all_locals: set[str] = set()
        params = {}
        if self.c.ret is not None:
            # a scalar codelet reads its parameters as rank-0 loads; nothing else
            params = {}
        self.block(self.c.body, params)


def _calls(node, out: set):
    if isinstance(node, ir.CallScalar):
        out.add(node.name)
    if isinstance(node, tuple):
        for x in node:
            _calls(x, out)
    elif hasattr(node, "__slots__") and not isinstance(node, (str, int, float)):
        for name in node.__slots__:
            _calls(getattr(node, name, None), out)


def verify_codelet(c: ir.Codelet, scalar_codelets: Mapping[str, ir.Codelet] = {}) -> None:
    """Raise ValueError unless `c` is well-formed, well-typed IR that the code
    generator and the reference evaluator handle.  Scalar codelets called by `c`
    (transitively) must be in `scalar_codelets`; recursion is rejected."""
    _Checker(c, scalar_codelets).run()
    # A call cycle would inline forever / overflow the native stack.
    seen, stack = set(), [(c.name, iter(sorted(direct_calls(c))))]
    path = [c.name]
    while stack:
        name, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            path.pop()
            seen.add(name)
            continue
        if nxt in path:
            raise ValueError(f"codelet {c.name!r}: invalid IR: recursive call of {nxt!r}")
        callee = scalar_codelets.get(nxt)
        if callee is None:
            raise ValueError(f"codelet {c.name!r}: invalid IR: call of unknown scalar codelet {nxt!r}")
        if nxt not in seen:
            path.append(nxt)
            stack.append((nxt, iter(sorted(direct_calls(callee)))))


def direct_calls(c: ir.Codelet) -> set:
    out: set = set()
    _calls(c.body, out)
    return out
