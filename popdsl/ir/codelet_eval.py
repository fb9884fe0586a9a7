"""Reference evaluator of codelet IR: the living definition the JIT is checked against.

Requires `popdsl.ir.codelet`, the cycle model `popdsl.ir.cost` and
`popdsl.ir.errors`.  Produces `run_vertices` (same memory/table contract as the native
driver `popdsl_drive_<Name>`), `call_scalar` and `map_elements` (the element-wise map
of a scalar codelet).  Pure Python + numpy scalars, one vertex at a time: slow by
design, obvious by design.

Semantics (the code generator must agree):
* f32 values are `np.float32` and every op rounds to f32 (the JIT may additionally
  contract a*b+c into an FMA, so compare floats with a tolerance); f16 is loaded and
  stored as half, computed as f32; bool is 1 byte, nonzero loads as true.  A vector
  is a numpy array of its lanes (float32 for f32x2, float16 for f16x4, every op
  rounded to the lane type); a vector field's element is its lanes, contiguous.
* i32 arithmetic wraps; `/` and `%` truncate toward zero; divisor 0 raises
  ERR_DIV_ZERO; INT_MIN / -1 == INT_MIN, INT_MIN % -1 == 0.
* casts: f32→i32 saturates, NaN → 0; x→bool is x != 0 (NaN → true).
* evaluation order: operands left to right; a store evaluates its indices and checks
  them before evaluating the stored value; `select` evaluates all three operands;
  `&&`/`||` short-circuit.
* every index of a rank ≥ 1 access is checked here (even `checked=False` ones, whose
  native behaviour out of range is undefined).
* cycles: `cost.VERTEX_OVERHEAD` per vertex, `cost.stmt_cost` at each statement start,
  `cost.LOOP_ITER` per for-iteration, `cost.while_test_cost` per while test; calls of
  scalar codelets are charged statically by `cost.expr_cost` only.  A vertex `for`
  with a straight-line body (a hardware loop) is charged trips x `cost.rpt_iteration`
  when it starts, as native code does.  An `amp` is charged `cost.amp_cycles` after its
  operands are evaluated, then checks its corners (in 64 bits, never wrapping).
* a vertex whose counter exceeds `max_cycles` at a check point (`ir.checkpoints`)
  stops with ERR_CYCLES (index = its count, size = the budget).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from popdsl.ir import cost
from popdsl.ir import codelet as ir
from popdsl.ir import intrinsics
from popdsl.ir.intrinsics import INTRINSICS
from popdsl.ir.checkpoints import BIG_TRIPS, POLL, for_check
from popdsl.ir.errors import VertexError
from popdsl.limits import MAX_CYCLES

_F32 = np.float32
_DT = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4"),
       "bool": np.dtype("u1")}
_CMP = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def wrap32(x: int) -> int:
    return ((int(x) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def f32_to_i32(x) -> int:
    x = float(x)
    if math.isnan(x):
        return 0
    if x >= 2147483647.0:
        return 2147483647
    if x <= -2147483648.0:
        return -2147483648
    return int(x)


def _zero(ty):
    if ty in ir.VECTORS:
        return _vector(ty, [0.0] * ir.lanes(ty))
    return {"f32": _F32(0.0), "i32": 0, "bool": False}[ty]


def _vector(ty: str, lanes) -> np.ndarray:
    """A vector value: an array of its lane type (f32 lanes rounded to f16 for f16x4)."""
    return np.asarray(lanes, np.float32).astype(ir.NUMPY_DTYPE[ir.VECTORS[ty][0]])


class _Return(Exception):
    def __init__(self, value):
        self.value = value


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Vertex:
    """Evaluation state of one vertex (or one scalar call)."""

    def __init__(self, c, scalars, row, mem, fields, syms, counting, budget=MAX_CYCLES):
        self.c, self.scalars, self.row, self.mem = c, scalars, row, mem
        self.fields, self.syms = fields, syms    # name -> ("mem", addr, stride, dims, dtype) | ("value", v)
        self.decl = {f.name: f for f in c.fields}
        self.locals: dict = {}
        self.cycles = cost.VERTEX_OVERHEAD
        self.counting = counting       # a vertex (not a scalar call): counts cycles
        self.quiet = False             # inside a loop charged up front
        self.budget = budget

    def charge(self, n):
        if self.counting and not self.quiet:
            self.cycles += n

    def check(self):
        """A check point (`ir.checkpoints`)."""
        if self.counting and self.cycles > self.budget:
            raise VertexError(ir.ERR_CYCLES, self.row, "", -1, self.cycles, self.budget)

    # ------------------------------------------------------------ statements
    def block(self, body):
        for s in body:
            self.stmt(s)

    def stmt(self, s):
        self.charge(cost.stmt_cost(s, self.scalars))
        if isinstance(s, ir.Declare):
            self.locals[s.name] = self.expr(s.init) if s.init is not None else _zero(s.ty)
        elif isinstance(s, ir.Assign):
            self.locals[s.name] = self.expr(s.value)
        elif isinstance(s, ir.Store):
            off, dtype = self.address(s.field, s.index)
            self.write(off, dtype, self.expr(s.value))
        elif isinstance(s, ir.If):
            self.block(s.then if self.expr(s.cond) else s.orelse)
        elif isinstance(s, ir.Amp):
            self.amp(s)
        elif isinstance(s, ir.For):
            self.for_loop(s)
        elif isinstance(s, ir.While):
            while True:
                self.check()
                self.charge(cost.while_test_cost(s, self.scalars))
                if not self.expr(s.cond):
                    break
                try:
                    self.block(s.body)
                except _Continue:
                    pass
                except _Break:
                    break
        elif isinstance(s, ir.Break):
            raise _Break()
        elif isinstance(s, ir.Continue):
            raise _Continue()
        elif isinstance(s, ir.Return):
            raise _Return(self.expr(s.value) if s.value is not None else None)
        else:
            raise TypeError(f"not a statement: {s!r}")

    def for_loop(self, s):
        start, stop = self.expr(s.start), self.expr(s.stop)
        where = for_check(s, self.counting)
        trips = range(start, stop, s.step)
        big = len(trips) >= BIG_TRIPS
        if where == "entry":
            self.charge(len(trips) * cost.rpt_iteration(s.body, self.scalars))
            if big:
                self.check()
        quiet, self.quiet = self.quiet, self.quiet or where == "entry"
        try:
            for k, v in enumerate(trips):
                self.charge(cost.LOOP_ITER)
                self.locals[s.var] = v
                try:
                    self.block(s.body)
                except _Continue:
                    pass
                except _Break:
                    break
                if where == "latch" and k % POLL == POLL - 1:
                    self.check()
        finally:
            self.quiet = quiet
        if where == "exit" and big:
            self.check()

    def amp(self, s: ir.Amp):
        at = [(name, [self.expr(i) for i in index]) for name, index in s.operands()]
        m, k, n, astep, bstep, cstep = (self.expr(x) for x in s.sizes())
        if m <= 0 or k <= 0 or n <= 0:
            return
        dtype = self.decl[s.a].dtype
        self.charge(cost.amp_cycles(m, k, n, dtype))
        self.check()
        for name, r0, r1, c0, c1 in s.corners(at, m, k, n, astep, bstep, cstep,
                                              lambda x0, count, step: x0 + (count - 1) * step, 1):
            dims = self.decl[name].dims
            for axis, v in ((0, r0), (1, c0), (0, r1), (1, c1)):
                size = self.dim(dims[axis])
                if not 0 <= v < size:
                    raise VertexError(ir.ERR_BOUNDS, self.row, name, axis, v, size)
        (c, (ci, cj)), (a, (ai, aj)), (b, (bi, bj)) = at
        a_at = (lambda p, r: (ai + r, aj + p * astep)) if s.a_transposed else (lambda p, r: (ai + p, aj + r * astep))
        b_at = (lambda r, q: (bi + q, bj + r * bstep)) if s.b_transposed else (lambda r, q: (bi + r, bj + q * bstep))
        for p in range(m):
            for r in range(k):
                x = self.read(*self.element(a, *a_at(p, r)))
                for q in range(n):
                    off, cty = self.element(c, ci + p, cj + q * cstep)
                    y = self.read(*self.element(b, *b_at(r, q)))
                    self.write(off, cty, _F32(self.read(off, cty) + _F32(x * y)))

    # ------------------------------------------------------------ memory
    def element(self, name, row, col):
        """Address and storage type of element (row, col) of a rank-2 field, unchecked."""
        _, addr, stride, _, dtype = self.fields[name]
        return addr + (row * stride + col) * ir.ELEM_BYTES[dtype], dtype

    def dim(self, d):
        return d if isinstance(d, int) else self.syms[d]

    def address(self, name, index):
        _, addr, stride, dims, dtype = self.fields[name]
        idx = [self.expr(e) for e in index]
        for axis, (v, d) in enumerate(zip(idx, dims)):
            size = self.dim(d)
            if not (v & 0xFFFFFFFF) < (size & 0xFFFFFFFF):   # one unsigned compare, as native
                raise VertexError(ir.ERR_BOUNDS, self.row, name, axis, v, size)
        # The row stride counts tensor elements (a vector's lanes), a column one field element.
        off = 0
        if len(idx) == 1:
            off = idx[0] * ir.ELEM_BYTES[dtype]
        elif len(idx) == 2:
            off = idx[0] * stride * ir.ELEM_BYTES[ir.lane_type(dtype)] + idx[1] * ir.ELEM_BYTES[dtype]
        return addr + off, dtype

    def read(self, off, dtype):
        if dtype in ir.VECTORS:
            return self.mem[off:off + ir.ELEM_BYTES[dtype]].view(_DT[ir.lane_type(dtype)]).copy()
        raw = self.mem[off:off + ir.ELEM_BYTES[dtype]].view(_DT[dtype])[0]
        if dtype == "bool":
            return bool(raw)
        if dtype == "i32":
            return int(raw)
        return _F32(raw)

    def write(self, off, dtype, v):
        if dtype in ir.VECTORS:
            self.mem[off:off + ir.ELEM_BYTES[dtype]].view(_DT[ir.lane_type(dtype)])[:] = v
            return
        self.mem[off:off + ir.ELEM_BYTES[dtype]].view(_DT[dtype])[0] = \
            (1 if v else 0) if dtype == "bool" else v

    # ------------------------------------------------------------ expressions
    def expr(self, e):
        if isinstance(e, ir.Const):
            return {"f32": lambda v: _F32(v), "i32": wrap32, "bool": bool}[e.ty](e.value)
        if isinstance(e, ir.Local):
            return self.locals[e.name]
        if isinstance(e, ir.Sym):
            return self.syms[e.name]
        if isinstance(e, ir.Len):
            return self.dim(self.decl[e.field].dims[e.axis])
        if isinstance(e, ir.Load):
            f = self.fields[e.field]
            if f[0] == "value":
                return f[1]
            return self.read(*self.address(e.field, e.index))
        if isinstance(e, ir.Unary):
            x = self.expr(e.x)
            if e.op == "not":
                return not x
            return -x if e.ty == "f32" or e.ty in ir.VECTORS else wrap32(-x)
        if isinstance(e, ir.Splat):
            return _vector(e.ty, [self.expr(e.x)] * ir.lanes(e.ty))
        if isinstance(e, ir.Vector):
            return _vector(e.ty, [self.expr(x) for x in e.xs])
        if isinstance(e, ir.Lane):
            return _F32(self.expr(e.x)[e.index])
        if isinstance(e, ir.Binary):
            return self.binary(e)
        if isinstance(e, ir.Select):
            c, a, b = self.expr(e.cond), self.expr(e.a), self.expr(e.b)
            return a if c else b
        if isinstance(e, ir.Cast):
            return cast(self.expr(e.x), e.x.ty, e.ty)
        if isinstance(e, ir.Intrinsic):
            entry = INTRINSICS[e.name]
            if entry.expand is not None:
                return self.expr(entry.expand(*e.args))
            return intrinsics.reference(e.name, [self.expr(a) for a in e.args], e.ty)
        if isinstance(e, ir.CallScalar):
            args = [self.expr(a) for a in e.args]
            return call_scalar(self.scalars[e.name], args, self.scalars, self.row)
        raise TypeError(f"not an expression: {e!r}")

    def binary(self, e):
        op = e.op
        if op == "&&":
            return bool(self.expr(e.a)) and bool(self.expr(e.b))
        if op == "||":
            return bool(self.expr(e.a)) or bool(self.expr(e.b))
        a, b = self.expr(e.a), self.expr(e.b)
        if op in _CMP:
            return bool(_CMP[op](a, b))
        if e.ty in ir.VECTORS:             # lane by lane, in the lane type (numpy rounds f16 per op)
            return {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[op](a, b)
        if e.ty == "f32":
            if op == "%":
                return _F32(np.fmod(a, b))
            return _F32({"+": np.add, "-": np.subtract, "*": np.multiply,
                         "/": np.divide}[op](a, b))
        if op in ("+", "-", "*"):
            return wrap32({"+": a + b, "-": a - b, "*": a * b}[op])
        if b == 0:
            raise VertexError(ir.ERR_DIV_ZERO, self.row, "", -1, 0, 0)
        if b == -1:
            return wrap32(-a) if op == "/" else 0
        q = abs(a) // abs(b)
        q = q if (a < 0) == (b < 0) else -q
        return q if op == "/" else a - q * b


def cast(v, src, dst):
    if src == dst:
        return v
    if dst == "bool":
        return bool(v != 0) if src == "i32" else bool(not (v == 0))
    if src == "bool":
        return _F32(1.0 if v else 0.0) if dst == "f32" else int(bool(v))
    if dst == "f32":
        return _F32(v)
    return f32_to_i32(v)


def call_scalar(c: ir.Codelet, args, scalars: Mapping[str, ir.Codelet], row: int = 0):
    """Value of scalar codelet `c` at `args` (compute-type values); errors name `row`."""
    fields = {f.name: ("value", a) for f, a in zip(c.fields, args)}
    v = _Vertex(c, scalars, row, None, fields, {}, counting=False)
    with np.errstate(all="ignore"):
        try:
            v.block(c.body)
        except _Return as r:
            return r.value
    return _zero(ir.compute_type(c.ret))


def _state_value(raw: int, dtype: str):
    raw = int(raw)
    if dtype in ("f32", "f16"):    # an f16 state is held as an f32 bit pattern too
        return _F32(np.array([raw & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0])
    if dtype == "bool":
        return raw != 0
    return wrap32(raw)


def run_vertices(codelet: ir.Codelet, mem: np.ndarray, table: np.ndarray, begin: int,
                 end: int, cycles: np.ndarray | None = None,
                 scalar_codelets: Mapping[str, ir.Codelet] = {}, max_cycles: int = MAX_CYCLES) -> None:
    """Run rows begin..end of `table` (layout `ir.table_layout(codelet)`) over the
    byte array `mem`; write per-vertex cycles to `cycles[row]` if given.  Raises
    `VertexError` for the first failing vertex (earlier rows' effects stay), with
    ERR_CYCLES for one over `max_cycles` at a check point."""
    layout = ir.table_layout(codelet)
    col = {(c.kind, c.name): k for k, c in enumerate(layout)}
    mem = mem.view(np.uint8)
    for row in range(begin, end):
        t = table[row]
        syms = {s: wrap32(t[col[("sym", s)]]) for s in codelet.symbols}
        fields = {}
        for f in codelet.fields:
            if f.direction == "state":
                fields[f.name] = ("value", _state_value(t[col[("state", f.name)]], f.dtype))
            else:
                stride = int(t[col[("stride", f.name)]]) if f.rank == 2 else 0
                fields[f.name] = ("mem", int(t[col[("addr", f.name)]]), stride, f.dims, f.dtype)
        v = _Vertex(codelet, scalar_codelets, row, mem, fields, syms, counting=True, budget=max_cycles)
        with np.errstate(all="ignore"):
            try:
                v.block(codelet.body)
            except _Return:
                pass
            except VertexError as err:
                err.codelet = codelet.name
                raise
        if cycles is not None:
            cycles[row] = v.cycles


def map_elements(codelet: ir.Codelet, out: np.ndarray, *ins: np.ndarray,
                 scalar_codelets: Mapping[str, ir.Codelet] = {}) -> None:
    """out[i] = codelet(ins[0][i], ...) over 1-D arrays of the storage types."""
    conv = [(lambda x, dt=f.dtype: cast_storage(x, dt)) for f in codelet.fields]
    for i in range(out.shape[0]):
        args = [cv(a[i]) for cv, a in zip(conv, ins)]
        out[i] = call_scalar(codelet, args, scalar_codelets, i)


def cast_storage(x, dtype):
    if dtype == "bool":
        return bool(x)
    if dtype == "i32":
        return int(x)
    return _F32(x)
