"""Codelet IR → LLVM IR (llvmlite.ir), a pure and deterministic function.

Requires verified codelets (`popdsl.ir.verify`; `emit_module` re-verifies, cheaply)
and the cost model of `popdsl.ir.cost`.  Produces one `llvmlite.ir.Module` with,
per codelet (names are identifiers, so they mangle by prefixing):

* vertex codelet `N`:
  ``i64 popdsl_drive_N(ptr noalias mem, ptr noalias table, i64 begin, i64 end,
  ptr noalias cycles, ptr noalias err)`` — runs rows begin..end of the vertex table
  (layout: `codelet.table_layout`), writes each row's cycle count to cycles[row],
  returns -1, or the failing row with err[0..4] = kind, field index (-1 if none),
  axis, index, size.  `err` is a control block of `ERR_SLOTS` i64: besides that
  report, err[5] is the address of the stop flag (an i32 that Ctrl-C sets while
  native code runs) and err[6] the cycle budget of one vertex.  The body is an
  internal always-inline function whose field pointers are `noalias` parameters,
  so after inlining LLVM still knows the fields do not alias (that is what lets
  loops vectorise without runtime checks).
  ``popdsl_spec_N_<hash>`` (`spec_symbol`, asked for by `specs`): the same driver
  with some table columns fixed to constants (`runtime.specialise`), whose row
  loop also prefetches the fields of the vertex PREFETCH_ROWS ahead.
* scalar codelet `s`: internal ``{ret, i1} popdsl_scalar_s(ptr err, args...)``
  (err: the same control block; the i1 says "failed, err filled"; it folds away
  when nothing can fail) and
  ``i64 popdsl_map_s(i64 n, ptr noalias err, ptr noalias out, ptr noalias in0, ...)``,
  the element-wise map over contiguous arrays of the storage types; returns -1 or
  the failing element.

Every exported function lives in its own section ``.text.<symbol>`` so the JIT can
measure real code size per codelet from the object file.

Semantics implemented here (the reference evaluator `popdsl.ir.codelet_eval` is the
definition): wrapping i32 arithmetic; i32 `/ %` truncate, divisor 0 is ERR_DIV_ZERO,
INT_MIN / -1 == INT_MIN and INT_MIN % -1 == 0 (no trapping idiv); float ops carry only
the `contract` fast-math flag; f32→i32 casts saturate (NaN → 0); `select` evaluates
both arms; `&&`/`||` short-circuit; a `for` computes its trip count once in 64 bits,
so it cannot overflow or run forever.  A vertex stops at the check points of
`popdsl.ir.checkpoints` (ERR_CYCLES over its budget, ERR_INTERRUPT on Ctrl-C): a
check is one monotonic atomic load of the stop flag, a compare of the counter and
a branch, never inside a loop without inner loops, and folds away in short loops.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import llvmlite.ir as ll
import numpy as np

from popdsl.ir import cost
from popdsl.ir import codelet as ir
from popdsl.ir.intrinsics import INTRINSICS
from popdsl.ir.checkpoints import BIG_TRIPS, POLL, for_check
from popdsl.ir.verify import verify_codelet

I1, I8, I32, I64 = ll.IntType(1), ll.IntType(8), ll.IntType(32), ll.IntType(64)
F32, F16, PTR = ll.FloatType(), ll.HalfType(), ll.PointerType()
V2F32, V4F16 = ll.VectorType(F32, 2), ll.VectorType(F16, 4)
COMPUTE = {"f32": F32, "i32": I32, "bool": I1, "f32x2": V2F32, "f16x4": V4F16}
STORAGE = {"f32": F32, "f16": F16, "i32": I32, "bool": I8, "f32x2": V2F32, "f16x4": V4F16}
FLAGS = ("contract",)
ERR_SLOTS = 8          # i64s of the control block `err` (see the module docstring)


def _c64(v: int) -> ll.Constant:
    return ll.Constant(I64, v)


def _c32(v: int) -> ll.Constant:
    return ll.Constant(I32, ((int(v) + (1 << 31)) % (1 << 32)) - (1 << 31))


def const(value, ty: str) -> ll.Constant:
    if ty in ir.VECTORS:
        assert value == 0, "vector constants are splats of scalars"
        return ll.Constant(COMPUTE[ty], None)
    if ty == "f32":
        with np.errstate(over="ignore"):
            return ll.Constant(F32, float(np.float32(value)))
    if ty == "bool":
        return ll.Constant(I1, 1 if value else 0)
    return _c32(value)


def _intrinsic(mod: ll.Module, name: str, ret, args) -> ll.Function:
    fn = mod.globals.get(name)
    if fn is None:
        fn = ll.Function(mod, ll.FunctionType(ret, args), name)
    return fn


class _Emitter:
    """Emits one codelet body into `fn`.  `fields` maps field name to
    ("ptr", ptr, stride|None, dims) | ("value", value); `fail_value` is what the
    function returns on failure."""

    def __init__(self, mod, c, scalars, unchecked, fn, err, fields, syms, flags=FLAGS):
        self.mod, self.c, self.scalars, self.unchecked = mod, c, scalars, unchecked
        self.flags = flags
        self.fn, self.err, self.fields, self.syms = fn, err, fields, syms
        self.field_index = {f.name: k for k, f in enumerate(c.fields)}
        self.field_decl = {f.name: f for f in c.fields}
        self.alloca_block = fn.append_basic_block("allocas")
        self.ab = ll.IRBuilder(self.alloca_block)
        self.b = ll.IRBuilder(fn.append_basic_block("start"))
        self.locals: dict[str, ll.Value] = {}
        self.loops: list[tuple] = []          # (continue target, break target)
        self.pending = 0
        self.quiet = 0              # > 0 inside a loop whose cost was charged up front
        self.is_vertex = c.ret is None
        self.cyc = self.ab.alloca(I64, name="cycles") if self.is_vertex else None
        if self.is_vertex:
            self.ab.store(_c64(cost.VERTEX_OVERHEAD), self.cyc)
        # The stop flag and the budget, read once: nothing in the codelet writes them
        # (the flag is read again, atomically, at every check point).
        self.stop_flag = self.ab.inttoptr(
            self.ab.load(self.ab.gep(err, [_c64(5)], source_etype=I64), typ=I64), PTR)
        self.budget = self.ab.load(self.ab.gep(err, [_c64(6)], source_etype=I64), typ=I64) \
            if self.is_vertex else _c64(0)
        self.nblocks = 0

    # ------------------------------------------------------------ plumbing
    def block(self, name):
        self.nblocks += 1
        return self.fn.append_basic_block(f"{name}{self.nblocks}")

    def charge(self, n: int):
        if not self.quiet:
            self.pending += n

    def flush(self):
        # Costs accumulate per straight-line segment; one add per segment keeps the
        # counter a simple reduction the loop vectoriser can handle.
        if self.pending and self.is_vertex and not self.b.block.is_terminated:
            v = self.b.load(self.cyc, typ=I64)
            self.b.store(self.b.add(v, _c64(self.pending)), self.cyc)
        self.pending = 0

    def br(self, target):
        self.flush()
        if not self.b.block.is_terminated:
            self.b.branch(target)

    def cbr(self, cond, t, f):
        self.flush()
        self.b.cbranch(cond, t, f)

    def dead_end(self):
        """After a terminator, keep emitting into an unreachable block."""
        self.b.position_at_end(self.block("dead"))

    def ret_ok(self, value=None):
        self.flush()
        if self.is_vertex:
            r = ll.Constant(self.fn.return_value.type, None)
            r = self.b.insert_value(r, ll.Constant(I1, 0), 0)
            self.b.ret(self.b.insert_value(r, self.b.load(self.cyc, typ=I64), 1))
        else:
            rty = self.fn.return_value.type
            r = self.b.insert_value(ll.Constant(rty, None), value, 0)
            self.b.ret(self.b.insert_value(r, ll.Constant(I1, 0), 1))

    def ret_fail(self, b):
        rty = self.fn.return_value.type
        r = ll.Constant(rty, None)
        r = b.insert_value(r, ll.Constant(I1, 1), 0 if self.is_vertex else 1)
        b.ret(r)

    def fail_with(self, kind, field, axis, index, size):
        """A cold block that reports the error and returns failure."""
        blk = self.block("fail")
        b = ll.IRBuilder(blk)
        for k, v in enumerate((_c64(kind), _c64(field), _c64(axis), index, size)):
            b.store(v, b.gep(self.err, [_c64(k)], source_etype=I64))
        self.ret_fail(b)
        return blk

    def check_point(self, when=None):
        """Stop here (`ir.checkpoints`) if Ctrl-C was pressed or the vertex's
        counter, all charges so far included, is over its budget; only where the
        i1 `when` holds, if given."""
        self.flush()
        if self.b.block.is_terminated:
            return
        b = self.b
        skip = None
        if when is not None:
            check, skip = self.block("check"), self.block("checked")
            b.cbranch(when, check, skip).set_weights([1, 1 << 20])
            b.position_at_end(check)
        flag = b.load_atomic(self.stop_flag, "monotonic", 4, typ=I32)
        interrupted = b.icmp_signed("!=", flag, _c32(0))
        stop, cyc = interrupted, _c64(0)
        if self.is_vertex:
            cyc = b.load(self.cyc, typ=I64)
            stop = b.or_(interrupted, b.icmp_signed(">", cyc, self.budget))
        go, bad = self.block("go"), self.block("stop")
        b.cbranch(stop, bad, go).set_weights([1, 1 << 20])
        fb = ll.IRBuilder(bad)
        kind = fb.select(interrupted, _c64(ir.ERR_INTERRUPT), _c64(ir.ERR_CYCLES))
        for k, v in enumerate((kind, _c64(-1), _c64(-1), cyc, self.budget)):
            fb.store(v, fb.gep(self.err, [_c64(k)], source_etype=I64))
        self.ret_fail(fb)
        b.position_at_end(go)
        if skip is not None:
            b.branch(skip)
            b.position_at_end(skip)

    def var(self, name, ty):
        a = self.locals.get(name)
        if a is None:
            a = self.locals[name] = self.ab.alloca(COMPUTE[ty], name=name)
        return a

    def finish(self, fallthrough_value=None):
        if not self.b.block.is_terminated:
            self.ret_ok(fallthrough_value)
        self.ab.branch(self.fn.blocks[1])

    # ------------------------------------------------------------ statements
    def stmts(self, body):
        for s in body:
            self.stmt(s)

    def stmt(self, s):
        self.charge(cost.stmt_cost(s, self.scalars))
        if isinstance(s, ir.Declare):
            v = self.expr(s.init) if s.init is not None else const(0, s.ty)
            self.b.store(v, self.var(s.name, s.ty))
        elif isinstance(s, ir.Assign):
            v = self.expr(s.value)
            self.b.store(v, self.var(s.name, s.value.ty))
        elif isinstance(s, ir.Store):
            ptr, dtype = self.element_ptr(s.field, s.index, s.checked)
            self.store_field(self.expr(s.value), ptr, dtype)
        elif isinstance(s, ir.If):
            cond = self.expr(s.cond)
            then, orelse, join = self.block("then"), self.block("else"), self.block("endif")
            self.cbr(cond, then, orelse)
            for blk, body in ((then, s.then), (orelse, s.orelse)):
                self.b.position_at_end(blk)
                self.stmts(body)
                self.br(join)
            self.b.position_at_end(join)
        elif isinstance(s, ir.For):
            self.for_loop(s)
        elif isinstance(s, ir.Amp):
            self.amp(s)
        elif isinstance(s, ir.While):
            head, body, done = self.block("while"), self.block("wbody"), self.block("wend")
            self.br(head)
            self.b.position_at_end(head)
            self.check_point()
            self.charge(cost.while_test_cost(s, self.scalars))
            cond = self.expr(s.cond)
            self.cbr(cond, body, done)
            self.b.position_at_end(body)
            self.loops.append((head, done))
            self.stmts(s.body)
            self.loops.pop()
            self.br(head)
            self.b.position_at_end(done)
        elif isinstance(s, (ir.Break, ir.Continue)):
            cont, brk = self.loops[-1]
            self.br(brk if isinstance(s, ir.Break) else cont)
            self.dead_end()
        elif isinstance(s, ir.Return):
            v = self.expr(s.value) if s.value is not None else None
            self.ret_ok(v)
            self.dead_end()
        else:
            raise TypeError(f"not a statement: {s!r}")

    def for_loop(self, s: ir.For):
        b = self.b
        start, stop = self.expr(s.start), self.expr(s.stop)
        # Trip count in i64 once, so `var += step` never overflows and the exit test
        # is a plain counted loop (what the vectoriser wants).
        lo, hi = (start, stop) if s.step > 0 else (stop, start)
        lo64, hi64 = b.sext(lo, I64), b.sext(hi, I64)
        span = b.sub(hi64, lo64)
        trips = b.sdiv(b.add(span, _c64(abs(s.step) - 1)), _c64(abs(s.step)))
        trips = b.select(b.icmp_signed(">", span, _c64(0)), trips, _c64(0))
        var = self.var(s.var, "i32")
        b.store(start, var)
        count = self.ab.alloca(I64, name=f"trip.{s.var}")
        b.store(_c64(0), count)
        head, body, latch, done = (self.block("for"), self.block("fbody"),
                                   self.block("fnext"), self.block("fend"))
        # A straight-line body costs the same every iteration: charge trips * cost
        # once, so the counter is not a reduction inside the loop (an i64 reduction
        # would halve the vector width of an f32 loop).
        check = for_check(s, self.is_vertex)
        upfront = check == "entry"
        big = self.b.icmp_signed(">=", trips, _c64(BIG_TRIPS))
        if upfront:
            per_iter = cost.rpt_iteration(s.body, self.scalars)
            total = self.b.mul(trips, _c64(per_iter))
            self.b.store(self.b.add(self.b.load(self.cyc, typ=I64), total), self.cyc)
            self.check_point(big)
        self.br(head)
        self.b.position_at_end(head)
        k = self.b.load(count, typ=I64)
        self.cbr(self.b.icmp_signed("<", k, trips), body, done)
        self.b.position_at_end(body)
        self.quiet += upfront
        self.charge(cost.LOOP_ITER)
        self.loops.append((latch, done))
        self.stmts(s.body)
        self.loops.pop()
        self.br(latch)
        self.quiet -= upfront
        self.b.position_at_end(latch)
        if check == "latch":
            k = self.b.load(count, typ=I64)
            self.check_point(self.b.icmp_unsigned("==", self.b.and_(k, _c64(POLL - 1)), _c64(POLL - 1)))
        v = self.b.load(var, typ=I32)
        self.b.store(self.b.add(v, _c32(s.step), flags=["nsw"]), var)
        self.b.store(self.b.add(self.b.load(count, typ=I64), _c64(1), flags=["nuw", "nsw"]), count)
        self.br(head)
        self.b.position_at_end(done)
        if check == "exit":
            self.check_point(big)

    def amp(self, s: ir.Amp):
        """`ir.codelet.Amp`, in the reference evaluator's order: charge, check point,
        corners, then for blocks of rows p, for r, for q: c[p, q] += A[p, r] * B[r, q]
        in memory (rows never share an element, so blocking them keeps each row's
        order; the q loop vectorises where b's and c's steps are 1)."""
        b = self.b
        at = [(name, [b.sext(self.expr(i), I64) for i in index]) for name, index in s.operands()]
        m, k, n, astep, bstep, cstep = (b.sext(self.expr(x), I64) for x in s.sizes())
        positive = [b.icmp_signed(">", v, _c64(0)) for v in (m, k, n)]
        work, done = self.block("amp"), self.block("ampdone")
        self.cbr(b.and_(b.and_(positive[0], positive[1]), positive[2]), work, done)
        b.position_at_end(work)
        dtype = self.field_decl[s.a].dtype
        if self.is_vertex:
            self.flush()
            charge = cost.amp_cycles(m, k, n, dtype, ops=_Builder(b))
            b.store(b.add(b.load(self.cyc, typ=I64), charge), self.cyc)
            self.check_point()
        b = self.b
        (c, (ci, cj)), (a, (ai, aj)), (bn, (bi, bj)) = at
        one = _c64(1)
        if not self.unchecked:
            last = lambda x0, count, step: b.add(x0, b.mul(b.sub(count, one), step))   # noqa: E731
            for name, r0, r1, c0, c1 in s.corners(at, m, k, n, astep, bstep, cstep, last, one):
                dims = self.fields[name][3]
                for axis, v in ((0, r0), (1, c0), (0, r1), (1, c1)):
                    size = self.b.sext(self.dim(dims[axis]), I64)
                    ok = self.block("ampin")
                    bad = self.fail_with(ir.ERR_BOUNDS, self.field_index[name], axis, v, size)
                    self.cbr(self.b.icmp_unsigned("<", v, size), ok, bad)
                    self.b.position_at_end(ok)

        def ptr(name, row, col):
            _, base, stride, _ = self.fields[name]
            dt = self.field_decl[name].dtype
            off = self.b.add(self.b.mul(row, stride), col)
            return self.b.gep(base, [off], inbounds=True, source_etype=STORAGE[dt]), dt

        def load(name, row, col):
            p, dt = ptr(name, row, col)
            return self.from_storage(self.b.load(p, typ=STORAGE[dt]), dt)

        def a_at(p, r):
            if s.a_transposed:
                return self.b.add(ai, r), self.b.add(aj, self.b.mul(p, astep))
            return self.b.add(ai, p), self.b.add(aj, self.b.mul(r, astep))

        def b_at(r, q):
            if s.b_transposed:
                return self.b.add(bi, q), self.b.add(bj, self.b.mul(r, bstep))
            return self.b.add(bi, r), self.b.add(bj, self.b.mul(q, bstep))

        def rows(p, count):
            """Rows p..p+count of c: per r, `count` values of a, then the q loop
            updating `count` rows (each c[p, q] still sums r ascending)."""
            def body_r(r):
                avs = [load(a, *a_at(self.b.add(p, _c64(i)), r)) for i in range(count)]

                def body_q(q):
                    bv = load(bn, *b_at(r, q))
                    ccol = self.b.add(cj, self.b.mul(q, cstep))
                    for i, av in enumerate(avs):
                        cp, _ = ptr(c, self.b.add(ci, self.b.add(p, _c64(i))), ccol)
                        acc = self.b.load(cp, typ=F32)
                        self.b.store(self.b.fadd(acc, self.b.fmul(av, bv, flags=self.flags), flags=self.flags), cp)
                self.counted(n, body_q)
            self.counted(k, body_r)

        # Four rows at a time share each load of b (as the stdlib's MatMul once did
        # by hand), then the remaining rows one by one.  The transposed forms go row
        # by row: half the code, which counts on the tiles (their loads are strided
        # anyway).
        if s.a_transposed or s.b_transposed:
            self.counted(m, lambda i: rows(i, 1))
        else:
            blocks = self.b.sdiv(m, _c64(4))
            self.counted(blocks, lambda i: rows(self.b.mul(i, _c64(4)), 4))
            self.counted(self.b.srem(m, _c64(4)), lambda i: rows(self.b.add(self.b.mul(blocks, _c64(4)), i), 1))
        self.br(done)
        self.b.position_at_end(done)

    def counted(self, trips, body):
        """for i in 0..trips (i64): body(i)."""
        count = self.ab.alloca(I64, name="amp.i")
        self.b.store(_c64(0), count)
        head, loop, done = self.block("ampfor"), self.block("ampbody"), self.block("ampend")
        self.br(head)
        self.b.position_at_end(head)
        i = self.b.load(count, typ=I64)
        self.cbr(self.b.icmp_signed("<", i, trips), loop, done)
        self.b.position_at_end(loop)
        body(i)
        self.b.store(self.b.add(self.b.load(count, typ=I64), _c64(1), flags=["nuw", "nsw"]), count)
        self.br(head)
        self.b.position_at_end(done)

    # ------------------------------------------------------------ memory
    def dim(self, d):
        return _c32(d) if isinstance(d, int) else self.syms[d]

    def element_ptr(self, name, index, checked):
        _, ptr, stride, dims = self.fields[name]
        dtype = self.field_decl[name].dtype
        idx = [self.expr(e) for e in index]
        if checked and not self.unchecked:
            for axis, (v, d) in enumerate(zip(idx, dims)):
                dv = self.dim(d)
                ok = self.block("inb")
                bad = self.fail_with(ir.ERR_BOUNDS, self.field_index[name], axis,
                                     self.b.sext(v, I64), self.b.sext(dv, I64))
                self.cbr(self.b.icmp_unsigned("<", v, dv), ok, bad)
                self.b.position_at_end(ok)
        if not idx:
            return ptr, dtype
        # In elements of the lane type: the row stride counts them, a column is
        # `lanes` of them (a vector field's element is its lanes, contiguous).
        lanes = ir.lanes(dtype)
        col = self.b.sext(idx[-1], I64)
        if lanes > 1:
            col = self.b.mul(col, _c64(lanes))
        off = self.b.add(self.b.mul(self.b.sext(idx[0], I64), stride), col) if len(idx) == 2 else col
        return self.b.gep(ptr, [off], inbounds=True, source_etype=STORAGE[ir.lane_type(dtype)]), dtype

    def load_field(self, ptr, dtype):
        if dtype in ir.VECTORS:         # aligned to its lanes only
            return self.b.load(ptr, typ=STORAGE[dtype], align=ir.ELEM_BYTES[ir.lane_type(dtype)])
        return self.from_storage(self.b.load(ptr, typ=STORAGE[dtype]), dtype)

    def store_field(self, value, ptr, dtype):
        if dtype in ir.VECTORS:
            self.b.store(value, ptr, align=ir.ELEM_BYTES[ir.lane_type(dtype)])
        else:
            self.b.store(self.to_storage(value, dtype), ptr)

    def to_storage(self, v, dtype):
        if dtype == "f16":
            return self.b.fptrunc(v, F16)
        if dtype == "bool":
            return self.b.zext(v, I8)
        return v

    def from_storage(self, v, dtype):
        if dtype == "f16":
            return self.b.fpext(v, F32)
        if dtype == "bool":
            return self.b.icmp_unsigned("!=", v, ll.Constant(I8, 0))
        return v

    # ------------------------------------------------------------ expressions
    def expr(self, e):
        b = self.b
        if isinstance(e, ir.Const):
            return const(e.value, e.ty)
        if isinstance(e, ir.Local):
            return b.load(self.var(e.name, e.ty), typ=COMPUTE[e.ty])
        if isinstance(e, ir.Sym):
            return self.syms[e.name]
        if isinstance(e, ir.Len):
            return self.dim(self.field_decl[e.field].dims[e.axis])
        if isinstance(e, ir.Load):
            f = self.fields[e.field]
            if f[0] == "value":
                return f[1]
            ptr, dtype = self.element_ptr(e.field, e.index, e.checked)
            return self.load_field(ptr, dtype)
        if isinstance(e, ir.Unary):
            x = self.expr(e.x)
            if e.op == "not":
                return b.xor(x, ll.Constant(I1, 1))
            return b.fneg(x, flags=self.flags) if e.ty != "i32" else b.sub(_c32(0), x)
        if isinstance(e, (ir.Splat, ir.Vector)):
            xs = [self.expr(e.x)] * ir.lanes(e.ty) if isinstance(e, ir.Splat) else [self.expr(x) for x in e.xs]
            v = ll.Constant(COMPUTE[e.ty], None)
            for i, x in enumerate(xs):
                v = self.b.insert_element(v, self.b.fptrunc(x, F16) if e.ty == "f16x4" else x, _c32(i))
            return v
        if isinstance(e, ir.Lane):
            x = self.b.extract_element(self.expr(e.x), _c32(e.index))
            return self.b.fpext(x, F32) if e.x.ty == "f16x4" else x
        if isinstance(e, ir.Binary):
            return self.binary(e)
        if isinstance(e, ir.Select):
            c, x, y = self.expr(e.cond), self.expr(e.a), self.expr(e.b)
            return self.b.select(c, x, y)
        if isinstance(e, ir.Cast):
            return self.cast(self.expr(e.x), e.x.ty, e.ty)
        if isinstance(e, ir.Intrinsic):
            expand = INTRINSICS[e.name].expand
            if expand is not None:
                return self.expr(expand(*e.args))
            return self.intrinsic(e.name, [self.expr(a) for a in e.args], e.ty)
        if isinstance(e, ir.CallScalar):
            args = [self.expr(a) for a in e.args]
            r = self.b.call(self.mod.globals[f"popdsl_scalar_{e.name}"], [self.err] + args)
            ok = self.block("callok")
            bad = self.block("callfail")
            self.ret_fail(ll.IRBuilder(bad))
            self.cbr(self.b.extract_value(r, 1), bad, ok)
            self.b.position_at_end(ok)
            return self.b.extract_value(r, 0)
        raise TypeError(f"not an expression: {e!r}")

    def binary(self, e: ir.Binary):
        b, op = self.b, e.op
        if op in ("&&", "||"):
            x = self.expr(e.a)
            rhs, join = self.block("rhs"), self.block("join")
            here = self.b.block
            self.cbr(x, rhs, join) if op == "&&" else self.cbr(x, join, rhs)
            self.b.position_at_end(rhs)
            y = self.expr(e.b)
            rhs_end = self.b.block
            self.br(join)
            self.b.position_at_end(join)
            phi = self.b.phi(I1)
            phi.add_incoming(ll.Constant(I1, 0 if op == "&&" else 1), here)
            phi.add_incoming(y, rhs_end)
            return phi
        x, y = self.expr(e.a), self.expr(e.b)
        t = e.a.ty
        if op in ("==", "!=", "<", "<=", ">", ">="):
            if t == "f32":
                return b.fcmp_unordered(op, x, y) if op == "!=" else b.fcmp_ordered(op, x, y)
            return b.icmp_signed(op, x, y)
        if t == "f32" or t in ir.VECTORS:
            fn = {"+": b.fadd, "-": b.fsub, "*": b.fmul, "/": b.fdiv, "%": b.frem}[op]
            return fn(x, y, flags=self.flags)
        if op in ("+", "-", "*"):
            return {"+": b.add, "-": b.sub, "*": b.mul}[op](x, y)
        ok = self.block("divok")
        bad = self.fail_with(ir.ERR_DIV_ZERO, -1, -1, _c64(0), _c64(0))
        self.cbr(self.b.icmp_signed("==", y, _c32(0)), bad, ok)
        self.b.position_at_end(ok)
        b = self.b
        # x86 idiv traps on INT_MIN / -1: divide by 1 instead and fix the result up.
        minus1 = b.icmp_signed("==", y, _c32(-1))
        safe = b.select(minus1, _c32(1), y)
        if op == "/":
            return b.select(minus1, b.sub(_c32(0), x), b.sdiv(x, safe))
        return b.select(minus1, _c32(0), b.srem(x, safe))

    def cast(self, v, src, dst):
        b = self.b
        if src == dst:
            return v
        if dst == "bool":
            if src == "f32":
                return b.fcmp_unordered("!=", v, ll.Constant(F32, 0.0))
            return b.icmp_signed("!=", v, _c32(0))
        if src == "bool":
            return b.uitofp(v, F32) if dst == "f32" else b.zext(v, I32)
        if dst == "f32":
            return b.sitofp(v, F32)
        fn = _intrinsic(self.mod, "llvm.fptosi.sat.i32.f32", I32, [F32])
        return b.call(fn, [v])

    def intrinsic(self, name, args, ty):
        """A call of intrinsic `name` (not an expansion) as its table entry says."""
        entry = INTRINSICS[name]
        lty = COMPUTE[ty]
        if entry.lowering == "round_f16":
            return self.from_storage(self.to_storage(args[0], "f16"), "f16")
        if entry.libm is not None:
            fn = _intrinsic(self.mod, entry.libm, lty, [lty] * len(args))
        else:
            llname = entry.llvm[ty]
            extra = _LLVM_EXTRA_ARGS.get(llname, ())
            fn = _intrinsic(self.mod, llname, lty, [lty] * len(args) + [x.type for x in extra])
            args = list(args) + list(extra)
        return self.b.call(fn, args)


class _Builder:
    """`cost.amp_cycles`'s integer arithmetic, emitted as i64 instructions."""

    def __init__(self, b: ll.IRBuilder):
        self.b = b

    def const(self, v):
        return _c64(v)

    def add(self, x, y):
        return self.b.add(x, y)

    def mul(self, x, y):
        return self.b.mul(x, y)

    def ceil_div(self, x, d: int):
        return self.b.sdiv(self.b.add(x, _c64(d - 1)), _c64(d))


# Arguments some LLVM intrinsics take besides the operands.
_LLVM_EXTRA_ARGS = {"llvm.abs.i32": (ll.Constant(I1, 0),)}     # INT_MIN is not poison: it wraps


def _field_params(c: ir.Codelet):
    """Parameter list of a vertex body: per field a pointer (+ stride) or a state
    value, then one i32 per size symbol."""
    params = []
    for f in c.fields:
        if f.direction == "state":
            params.append(("state", f, COMPUTE[ir.compute_type(f.dtype)]))
        else:
            params.append(("ptr", f, PTR))
            if f.rank == 2:
                params.append(("stride", f, I64))
    params.extend(("sym", s, I32) for s in c.symbols)
    return params


def _emit_vertex(mod, c, scalars, unchecked, flags):
    params = _field_params(c)
    rty = ll.LiteralStructType([I1, I64])
    body = ll.Function(mod, ll.FunctionType(rty, [PTR] + [p[2] for p in params]),
                       f"popdsl_body_{c.name}")
    body.linkage = "internal"
    body.attributes.add("alwaysinline")
    body.attributes.add("nounwind")
    body.args[0].add_attribute("noalias")
    fields, syms = {}, {}
    for arg, (kind, obj, _) in zip(body.args[1:], params):
        if kind == "ptr":
            arg.add_attribute("noalias")
            fields[obj.name] = ("ptr", arg, None, obj.dims)
        elif kind == "stride":
            fields[obj.name] = ("ptr", fields[obj.name][1], arg, obj.dims)
        elif kind == "state":
            fields[obj.name] = ("value", arg)
        else:
            syms[obj] = arg
    em = _Emitter(mod, c, scalars, unchecked, body, body.args[0], fields, syms, flags)
    em.stmts(c.body)
    em.finish()

    return body, params


PREFETCH_ROWS = 8      # how many vertices ahead the driver prefetches fields


def _prefetch_ahead(mod, b, params, mem, table, row, end, ncols):
    """Prefetch the first cache line of every field of vertex row + PREFETCH_ROWS.
    Vertices of one compute set sit on different tiles, so each one's fields are
    cold; a few rows' head start overlaps those misses (longer fields are then
    streamed by the hardware prefetcher)."""
    fields = [(col, obj) for col, (kind, obj, _) in enumerate(params) if kind == "ptr"]
    if not fields:
        return
    pf = _intrinsic(mod, "llvm.prefetch.p0", ll.VoidType(), [PTR, I32, I32, I32])
    ahead = b.add(row, _c64(PREFETCH_ROWS))
    with b.if_then(b.icmp_signed("<", ahead, end)):
        rowp = b.gep(table, [b.mul(ahead, _c64(ncols))], inbounds=True, source_etype=I64)
        for col, f in fields:
            v = b.load(b.gep(rowp, [_c64(col)], inbounds=True, source_etype=I64), typ=I64)
            write = 0 if f.direction == "in" else 1
            b.call(pf, [b.gep(mem, [v], source_etype=I8), _c32(write), _c32(3), _c32(1)])


def _emit_driver(mod, c, body, params, name, consts=None):
    """The row loop `name` over a vertex table calling `body`.  `consts` maps table
    columns to values every row holds there (a specialised driver): those columns
    are not read, and LLVM sees the constants (full unrolling of short loops,
    bounds checks it can prove)."""
    consts = consts or {}
    drv = ll.Function(mod, ll.FunctionType(I64, [PTR, PTR, I64, I64, PTR, PTR]), name)
    drv.section = f".text.{name}"
    drv.attributes.add("nounwind")
    mem, table, begin, end, cycles, err = drv.args
    for a in (mem, table, cycles, err):
        a.add_attribute("noalias")
    entry, head, row_blk, nxt, failed, done = (
        drv.append_basic_block(n) for n in ("entry", "rows", "row", "next", "failed", "done"))
    b = ll.IRBuilder(entry)
    b.branch(head)
    b.position_at_end(head)
    row = b.phi(I64, name="r")
    row.add_incoming(begin, entry)
    b.cbranch(b.icmp_signed("<", row, end), row_blk, done)
    b.position_at_end(row_blk)
    ncols = len(ir.table_layout(c))
    rowp = b.gep(table, [b.mul(row, _c64(ncols))], inbounds=True, source_etype=I64)
    if consts:
        # Only specialised drivers (big uniform groups) prefetch: the generic
        # driver's object size stands for the codelet's code on the device.
        _prefetch_ahead(mod, b, params, mem, table, row, end, ncols)
    args = [err]
    for col, (kind, obj, ty) in enumerate(params):
        if col in consts:
            v = _c64(consts[col])
        else:
            v = b.load(b.gep(rowp, [_c64(col)], inbounds=True, source_etype=I64), typ=I64)
        if kind == "ptr":
            args.append(b.gep(mem, [v], source_etype=I8))
        elif kind == "stride":
            args.append(v)
        elif kind == "sym":
            args.append(b.trunc(v, I32))
        elif ty is F32:
            args.append(b.bitcast(b.trunc(v, I32), F32))
        elif ty is I1:
            args.append(b.icmp_signed("!=", v, _c64(0)))
        else:
            args.append(b.trunc(v, I32))
    r = b.call(body, args)
    b.cbranch(b.extract_value(r, 0), failed, nxt)
    b.position_at_end(nxt)
    b.store(b.extract_value(r, 1), b.gep(cycles, [row], inbounds=True, source_etype=I64))
    row.add_incoming(b.add(row, _c64(1)), nxt)
    b.branch(head)
    b.position_at_end(failed)
    b.ret(row)
    b.position_at_end(done)
    b.ret(_c64(-1))


def _declare_scalar(mod, c):
    rty = ll.LiteralStructType([COMPUTE[ir.compute_type(c.ret)], I1])
    args = [COMPUTE[ir.compute_type(f.dtype)] for f in c.fields]
    fn = ll.Function(mod, ll.FunctionType(rty, [PTR] + args), f"popdsl_scalar_{c.name}")
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    fn.section = f".text.popdsl_scalar_{c.name}"   # measurable if it survives inlining
    return fn


def _emit_scalar(mod, c, scalars, unchecked, flags):
    fn = mod.globals[f"popdsl_scalar_{c.name}"]
    fields = {f.name: ("value", a) for f, a in zip(c.fields, fn.args[1:])}
    em = _Emitter(mod, c, scalars, unchecked, fn, fn.args[0], fields, {}, flags)
    em.stmts(c.body)
    em.finish(const(0, ir.compute_type(c.ret)))

    # The element-wise map over contiguous arrays (storage types).
    mp = ll.Function(mod, ll.FunctionType(I64, [I64, PTR, PTR] + [PTR] * len(c.fields)),
                     f"popdsl_map_{c.name}")
    mp.section = f".text.popdsl_map_{c.name}"
    mp.attributes.add("nounwind")
    n, err, out, ins = mp.args[0], mp.args[1], mp.args[2], mp.args[3:]
    for a in mp.args[1:]:
        a.add_attribute("noalias")
    entry, head, body, nxt, failed, done = (
        mp.append_basic_block(x) for x in ("entry", "head", "body", "next", "failed", "done"))
    b = ll.IRBuilder(entry)
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name="i")
    i.add_incoming(_c64(0), entry)
    b.cbranch(b.icmp_signed("<", i, n), body, done)
    b.position_at_end(body)
    em2 = _Emitter.__new__(_Emitter)   # only its storage conversions are needed
    em2.b = b
    vals = [em2.from_storage(b.load(b.gep(p, [i], inbounds=True, source_etype=STORAGE[f.dtype]), typ=STORAGE[f.dtype]), f.dtype)
            for p, f in zip(ins, c.fields)]
    r = b.call(fn, [err] + vals)
    b.cbranch(b.extract_value(r, 1), failed, nxt)
    b.position_at_end(nxt)
    b.store(em2.to_storage(b.extract_value(r, 0), c.ret),
            b.gep(out, [i], inbounds=True, source_etype=STORAGE[c.ret]))
    i.add_incoming(b.add(i, _c64(1)), nxt)
    b.branch(head)
    b.position_at_end(failed)
    b.ret(i)
    b.position_at_end(done)
    b.ret(_c64(-1))


def emit_module(codelets: Sequence[ir.Codelet], unchecked: bool = False, *,
                contract: bool = True, specs: Sequence[tuple[str, tuple]] = (),
                generic: bool = True) -> ll.Module:
    """One LLVM module holding every codelet of `codelets` (scalar codelets called by
    them must be in the list).  Raises ValueError on IR that does not verify.
    contract=False drops the `contract` flag (bit-exact differential tests only).
    `specs` adds specialised drivers (`spec_symbol`), each a (codelet name,
    ((column, value), ...)) pair; generic=False leaves out the generic drivers."""
    flags = FLAGS if contract else ()
    scalars = {c.name: c for c in codelets if c.ret is not None}
    names = [c.name for c in codelets]
    if len(set(names)) != len(names):
        raise ValueError("duplicate codelet names")
    for c in codelets:
        verify_codelet(c, scalars)
    by_name = {c.name: c for c in codelets}
    for name, consts in specs:
        c = by_name.get(name)
        if c is None or c.ret is not None:
            raise ValueError(f"no vertex codelet '{name}' to specialise")
        ncols = len(ir.table_layout(c))
        if any(not 0 <= col < ncols for col, _ in consts):
            raise ValueError(f"specialisation of '{name}' names a column outside its table")
    mod = ll.Module(name="popdsl")
    for c in codelets:
        if c.ret is not None:
            _declare_scalar(mod, c)
    bodies = {}
    for c in codelets:
        if c.ret is not None:
            _emit_scalar(mod, c, scalars, unchecked, flags)
        else:
            bodies[c.name] = _emit_vertex(mod, c, scalars, unchecked, flags)
            if generic:
                _emit_driver(mod, c, *bodies[c.name], f"popdsl_drive_{c.name}")
    for name, consts in sorted(set(specs)):
        _emit_driver(mod, by_name[name], *bodies[name], spec_symbol(name, consts), dict(consts))
    return mod


def spec_symbol(name: str, consts: tuple) -> str:
    """The symbol of codelet `name`'s driver specialised to `consts`."""
    key = ",".join(f"{c}={v}" for c, v in sorted(consts))
    return f"popdsl_spec_{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
