"""Code generator tests: the JIT against the reference evaluator (and numpy) on the same
memory, properties of the emitted LLVM IR, runtime errors, the object cache and the
IR verifier.  Codelets come from .pop source (popdsl.sema) or are built by hand where
the test needs IR the front end would not produce."""
from __future__ import annotations

import os
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from popdsl.codegen import jit
from popdsl.codegen.jit import NativeCodelets, aligned_zeros
from popdsl.codegen.llvm import emit_module
from popdsl.runtime.specialise import constant_columns
from popdsl.ir import codelet_eval as ev
from popdsl.ir.codelet import (ERR_BOUNDS, ERR_DIV_ZERO, ELEM_BYTES, NUMPY_DTYPE, Amp, Assign,
                               Binary, Break, CallScalar, Cast, Codelet, Const,
                               Declare, Field, For, Intrinsic, Len, Load, Local,
                               Return, Select, Store, Sym, Unary, table_layout)
from popdsl.ir.errors import VertexError
from popdsl.ir.verify import verify_codelet
from popdsl.sema import compile_codelets


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    old = os.environ.get("POPDSL_CACHE_DIR")
    os.environ["POPDSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("popcache"))
    yield
    if old is None:
        del os.environ["POPDSL_CACHE_DIR"]
    else:
        os.environ["POPDSL_CACHE_DIR"] = old


def pop(src: str) -> dict[str, Codelet]:
    return {c.name: c for c in compile_codelets(src, "<test>")}


# ---------------------------------------------------------------- harness

class Vertices:
    """Places per-vertex field data in one aligned memory and builds the table.

    rows: one dict per vertex: field -> np.ndarray (edges; a 2-D array may be a
    column-slice of a bigger one, giving a row stride) or a scalar (state); plus
    size symbols under their names."""

    def __init__(self, c: Codelet, rows: list[dict]):
        self.c = c
        chunks, self.where = [], []
        off = 0
        for r in rows:
            w = {}
            for f in c.fields:
                if f.direction == "state":
                    continue
                a = np.asarray(r[f.name], dtype=NUMPY_DTYPE[f.dtype])
                base, start = a.reshape(-1) if a.ndim == 0 else a, 0
                if a.ndim == 2 and not a.flags.c_contiguous:
                    # a block of a bigger matrix: place the whole matrix, point at [0,0]
                    base = a.base
                    start = (a.ctypes.data - base.ctypes.data) // a.itemsize
                w[f.name] = (off, base, start, a.shape, base.shape[-1] if a.ndim == 2 else 0)
                chunks.append((off, base))
                off += -(-base.nbytes // 64) * 64 + 64
            self.where.append(w)
        self.mem = aligned_zeros(off + 64)
        for o, base in chunks:
            self.mem[o:o + base.nbytes] = base.view(np.uint8).reshape(-1)
        table = []
        for r, w in zip(rows, self.where):
            row = []
            for col in table_layout(c):
                f = next((f for f in c.fields if f.name == col.name), None)
                if col.kind == "addr":
                    o, _, start, _, _ = w[col.name]
                    row.append(o + start * ELEM_BYTES[f.dtype])
                elif col.kind == "stride":
                    row.append(w[col.name][4])
                elif col.kind == "state":
                    v = r[col.name]
                    if f.dtype in ("f32", "f16"):
                        row.append(int(np.array([v], np.float32).view(np.uint32)[0]))
                    else:
                        row.append(int(v))
                else:
                    row.append(int(r[col.name]))
            table.append(row)
        self.table = np.array(table, dtype=np.int64).reshape(len(rows), len(table_layout(c)))

    def get(self, mem, row, name):
        """Field `name` of vertex `row` read back from `mem` (full base array)."""
        o, base, _, _, _ = self.where[row][name]
        return mem[o:o + base.nbytes].view(base.dtype).reshape(base.shape)


def both(codelets, name, vs: Vertices, begin=0, end=None, unchecked=False, contract=True,
         max_cycles=ev.MAX_CYCLES):
    """Run the JIT and the evaluator on copies of the same memory.  Returns
    (mem_jit, mem_ref, cycles_jit, cycles_ref, error_jit, error_ref)."""
    end = len(vs.table) if end is None else end
    by_name = {c.name: c for c in codelets}
    scalars = {c.name: c for c in codelets if c.ret is not None}
    nc = NativeCodelets(codelets, unchecked=unchecked, contract=contract)
    out = []
    for runner in ("jit", "ref"):
        mem = aligned_zeros(vs.mem.size)
        mem[:] = vs.mem
        cyc = np.full(len(vs.table), -7, np.int64)
        err = None
        try:
            if runner == "jit":
                nc.run(name, mem, vs.table, begin, end, cyc, max_cycles=max_cycles)
            else:
                ev.run_vertices(by_name[name], mem, vs.table, begin, end, cyc, scalars, max_cycles)
        except VertexError as e:
            err = e
        out.append((mem, cyc, err))
    (mj, cj, ej), (mr, cr, er) = out
    return mj, mr, cj, cr, ej, er


def assert_same(vs, mj, mr, cj, cr, ej, er, rtol=1e-6):
    assert (ej and ej.key()) == (er and er.key())
    if ej is None:
        np.testing.assert_array_equal(cj, cr)
    for w in vs.where:
        for name, (o, base, _, _, _) in w.items():
            a = mj[o:o + base.nbytes].view(base.dtype)
            b = mr[o:o + base.nbytes].view(base.dtype)
            if base.dtype.kind == "f":
                np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                           rtol=rtol, atol=rtol, equal_nan=True)
            else:
                np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- IR text

FUSED = """
codelet Fused(in a: f32[n], in b: f32[n], out c: f32[n]) {
    for i in 0..n { c[i] = a[i] * b[i] + a[i]; }
}
"""
MATMUL = """
codelet MatMulBlock(in a: f32[m, k], in b: f32[k, p], inout c: f32[m, p]) {
    for i in 0..m { for kk in 0..k { let av = a[i, kk]; for j in 0..p { c[i, j] += av * b[kk, j]; } } }
}
"""


def test_ir_text_properties():
    cs = list(pop(FUSED + MATMUL).values())
    text = str(emit_module(cs))
    assert text == str(emit_module(cs))                       # deterministic
    assert "fmul contract float" in text and "fadd contract float" in text
    drive = next(l for l in text.splitlines() if "@\"popdsl_drive_Fused\"(" in l)
    assert drive.count("noalias") == 4                        # mem, table, cycles, err
    body = next(l for l in text.splitlines() if "@\"popdsl_body_Fused\"(" in l and "define" in l)
    assert body.count("noalias") == 4                         # err + three fields
    assert 'section ".text.popdsl_drive_MatMulBlock"' in text
    assert "fmul float" not in text.replace("fmul contract float", "")


def test_unchecked_drops_checks_and_vectorises():
    c = hand_checked_fused()
    checked = str(emit_module([c]))
    unchecked = str(emit_module([c], unchecked=True))
    assert checked.count("icmp ult") == 4 and unchecked.count("icmp ult") == 0
    opt = str(jit.optimize_ir(unchecked))
    assert "x float>" in opt                                   # the loop vectorised


def hand_checked_fused() -> Codelet:
    i = Local("i", "i32")
    ld = lambda f: Load(f, (i,), "f32", checked=True)
    return Codelet("HFused", (Field("a", "in", "f32", ("n",)), Field("b", "in", "f32", ("n",)),
                              Field("c", "out", "f32", ("n",))), ("n",), None,
                   (For("i", Const(0, "i32"), Sym("n"), 1,
                        (Store("c", (i,), Binary("+", Binary("*", ld("a"), ld("b"), "f32"),
                                                  ld("a"), "f32")),)),))


# ---------------------------------------------------------------- vertex programs

def test_fused_matches_numpy_and_reference():
    cs = list(pop(FUSED).values())
    rng = np.random.default_rng(0)
    rows = [{"a": rng.standard_normal(n).astype(np.float32),
             "b": rng.standard_normal(n).astype(np.float32),
             "c": np.zeros(n, np.float32), "n": n} for n in (0, 1, 5, 37, 1000)]
    vs = Vertices(cs[0], rows)
    r = both(cs, "Fused", vs)
    assert_same(vs, *r)
    for k, row in enumerate(rows):
        np.testing.assert_allclose(vs.get(r[0], k, "c"), row["a"] * row["b"] + row["a"], rtol=1e-6, atol=1e-6)
    assert r[2][4] > 1000                                      # cycles grow with n


def test_matmul_blocks_with_row_stride_and_row_range():
    cs = list(pop(MATMUL).values())
    rng = np.random.default_rng(1)
    big_a = rng.standard_normal((6, 9)).astype(np.float32)
    rows = []
    for v in range(3):
        rows.append({"a": big_a[:, 2 * v:2 * v + 3], "b": rng.standard_normal((3, 4)).astype(np.float32),
                     "c": rng.standard_normal((6, 4)).astype(np.float32), "m": 6, "k": 3, "p": 4})
    vs = Vertices(cs[0], rows)
    assert vs.table[1][1] == 9                                 # a's row stride
    mj, mr, cj, cr, ej, er = both(cs, "MatMulBlock", vs, begin=1, end=3)
    assert_same(vs, mj, mr, cj, cr, ej, er, rtol=1e-5)
    assert cj[0] == -7                                          # row 0 not run
    for v in (1, 2):
        want = rows[v]["c"] + rows[v]["a"] @ rows[v]["b"]
        np.testing.assert_allclose(vs.get(mj, v, "c"), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(vs.get(mj, 0, "c"), rows[0]["c"])


def test_bounds_error_reports_field_axis_index():
    cs = list(pop("""
codelet Gather(in x: f32[n], in idx: i32[m], out y: f32[m]) {
    for i in 0..m { y[i] = x[idx[i]]; }
}""").values())
    rows = [{"x": np.arange(4, dtype=np.float32), "idx": np.array(ix, np.int32),
             "y": np.zeros(len(ix), np.float32), "n": 4, "m": len(ix)}
            for ix in ([0, 3], [1, 2], [2, 4, 0], [-1])]
    vs = Vertices(cs[0], rows)
    mj, mr, cj, cr, ej, er = both(cs, "Gather", vs)
    assert ej.key() == er.key() == (ERR_BOUNDS, 2, "x", 0, 4, 4)
    assert "Gather" in str(ej) and "'x'" in str(ej)
    np.testing.assert_array_equal(vs.get(mj, 1, "y"), [1, 2])   # earlier rows ran
    *_, ej, er = both(cs, "Gather", vs, begin=3)
    assert ej.key() == er.key() == (ERR_BOUNDS, 3, "x", 0, -1, 4)


def test_bounds_error_second_axis():
    c = Codelet("Poke", (Field("c", "out", "i32", ("m", "p")),), ("m", "p"), None,
                (Store("c", (Const(1, "i32"), Sym("p")), Const(5, "i32")),))
    vs = Vertices(c, [{"c": np.zeros((2, 3), np.int32), "m": 2, "p": 3}])
    *_, ej, er = both([c], "Poke", vs)
    assert ej.key() == er.key() == (ERR_BOUNDS, 0, "c", 1, 3, 3)


INTOPS = """
codelet IntOps(in a: i32[n], in b: i32[n], out q: i32[n], out r: i32[n]) {
    for i in 0..n { q[i] = a[i] / b[i]; r[i] = a[i] % b[i]; }
}
"""


def test_int_division_semantics_and_div_zero():
    cs = list(pop(INTOPS).values())
    imin = -2**31
    a = np.array([7, -7, 7, -7, imin, imin, 2**31 - 1, 0], np.int32)
    b = np.array([2, 2, -2, -2, -1, 1, -1, 5], np.int32)
    vs = Vertices(cs[0], [{"a": a, "b": b, "q": np.zeros(8, np.int32), "r": np.zeros(8, np.int32), "n": 8}])
    mj, mr, cj, cr, ej, er = both(cs, "IntOps", vs)
    assert_same(vs, mj, mr, cj, cr, ej, er)
    np.testing.assert_array_equal(vs.get(mj, 0, "q"), [3, -3, -3, 3, imin, imin, -(2**31 - 1), 0])
    np.testing.assert_array_equal(vs.get(mj, 0, "r"), [1, -1, 1, -1, 0, 0, 0, 0])
    vs = Vertices(cs[0], [{"a": a[:2], "b": np.array([1, 0], np.int32),
                           "q": np.zeros(2, np.int32), "r": np.zeros(2, np.int32), "n": 2}])
    *_, ej, er = both(cs, "IntOps", vs)
    assert ej.key() == er.key() == (ERR_DIV_ZERO, 0, "", -1, 0, 0)


def test_f16_storage_and_casts():
    cs = list(pop("""
codelet Half(in x: f16[n], out y: f16[n], out k: i32[n], out z: bool[n]) {
    for i in 0..n { y[i] = x[i] * 3.0; k[i] = i32(x[i] * 1.0e5); z[i] = bool(x[i]); }
}""").values())
    x = np.array([0.1, -2.5, 65504, np.nan, np.inf, -np.inf, 0, 1e-4], np.float16)
    vs = Vertices(cs[0], [{"x": x, "y": np.zeros(8, np.float16), "k": np.zeros(8, np.int32),
                           "z": np.zeros(8, bool), "n": 8}])
    mj, mr, *rest = both(cs, "Half", vs)
    assert_same(vs, mj, mr, *rest)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(vs.get(mj, 0, "y"), (x.astype(np.float32) * 3).astype(np.float16))
    np.testing.assert_array_equal(vs.get(mj, 0, "k")[3:6], [0, 2**31 - 1, -2**31])   # NaN → 0, saturate
    np.testing.assert_array_equal(vs.get(mj, 0, "z"), x != 0)


def test_bool_storage_nonzero_is_true():
    c = list(pop("""
codelet Flip(in a: bool[n], out b: bool[n], out cnt: i32) {
    var s: i32 = 0;
    for i in 0..n { b[i] = !a[i]; if a[i] && a[i] != false { s += 1; } }
    cnt = s;
}""").values())
    vs = Vertices(c[0], [{"a": np.zeros(4, bool), "b": np.zeros(4, bool), "cnt": np.zeros((), np.int32), "n": 4}])
    o = vs.where[0]["a"][0]
    vs.mem[o:o + 4] = [0, 7, 255, 1]
    mj, mr, *rest = both(c, "Flip", vs)
    assert_same(vs, mj, mr, *rest)
    assert list(mj[vs.where[0]["b"][0]:][:4]) == [1, 0, 0, 0]
    assert vs.get(mj, 0, "cnt") == 3


def test_control_flow_negative_step_break_continue_while_return_state():
    cs = list(pop("""
codelet Flow(inout x: i32[n], k: i32, f: f32, on: bool) {
    for i in n - 1..-1 step -2 { x[i] = x[i] + k; }
    var j: i32 = 0;
    while j < n {
        j += 1;
        if j >= 2 && j <= 2 { continue; }   // (`==` does not parse yet)
        if j > 4 { break; }
        x[0] = x[0] * 2;
    }
    for i in 0..n step 3 { if !on { return; } x[i] = x[i] + i32(f); }
    x[n - 1] = 99;
}""").values())
    rows = [{"x": np.arange(n, dtype=np.int32), "k": 10, "f": 2.75, "on": on, "n": n}
            for n, on in ((7, True), (7, False), (1, True), (0, True))]
    vs = Vertices(cs[0], rows)
    mj, mr, cj, cr, ej, er = both(cs, "Flow", vs, end=3)
    assert_same(vs, mj, mr, cj, cr, ej, er)
    assert list(vs.get(mj, 0, "x")) == [82, 1, 12, 5, 14, 5, 99]
    assert list(vs.get(mj, 1, "x")) == [80, 1, 12, 3, 14, 5, 16]
    *_, ej, er = both(cs, "Flow", vs, begin=3)
    assert ej.key() == er.key() == (ERR_BOUNDS, 3, "x", 0, -1, 0)


SCALARS = """
codelet gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
}
codelet idiv(a: i32, b: i32) -> i32 { return a / b; }
codelet ApplyGelu(inout x: f32[n]) {
    for i in 0..n { x[i] = gelu(x[i]) + f32(idiv(7, 2)); }
}
"""


def test_scalar_codelets_call_and_map():
    cs = list(pop(SCALARS).values())
    rng = np.random.default_rng(2)
    x = rng.standard_normal(50).astype(np.float32) * 3
    vs = Vertices(pop(SCALARS)["ApplyGelu"], [{"x": x, "n": 50}])
    mj, mr, *rest = both(cs, "ApplyGelu", vs)
    assert_same(vs, mj, mr, *rest, rtol=1e-5)
    nc = NativeCodelets(cs)
    out = np.zeros(50, np.float32)
    nc.map("gelu", out, x)
    ref = np.zeros(50, np.float32)
    ev.map_elements(pop(SCALARS)["gelu"], ref, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3))),
                               rtol=1e-5, atol=1e-6)
    q = np.zeros(3, np.int32)
    with pytest.raises(VertexError) as e:
        nc.map("idiv", q, np.array([1, 2, 3], np.int32), np.array([1, 0, 1], np.int32))
    assert e.value.kind == ERR_DIV_ZERO and e.value.vertex == 1
    assert nc.object_code_size("ApplyGelu") > 0 and nc.object_code_size("gelu") > 0


def test_map_f16():
    c = Codelet("halfsq", (Field("x", "in", "f16", ()),), (), "f16",
                (Return(Binary("*", Load("x", (), "f32"), Load("x", (), "f32"), "f32")),))
    x = np.linspace(-10, 10, 33).astype(np.float16)
    out = np.zeros(33, np.float16)
    NativeCodelets([c]).map("halfsq", out, x)
    np.testing.assert_array_equal(out, (x.astype(np.float32) ** 2).astype(np.float16))


def test_intrinsics_match_reference():
    """Every f32 intrinsic of the table, native against the reference evaluator, on
    ordinary values, NaN and infinity (the later operands are constants)."""
    from popdsl.ir.intrinsics import INTRINSICS
    xs = Load("x", (Local("i", "i32"),), "f32")
    exprs = [Intrinsic(e.name, (xs,) + tuple(Const(0.5 + k, "f32") for k in range(e.arity - 1)), "f32")
             for e in INTRINSICS.values() if e.accepts("f32")]
    i = Local("i", "i32")
    body = tuple(Store("y", (Const(k, "i32"), i), e) for k, e in enumerate(exprs))
    c = Codelet("Intr", (Field("x", "in", "f32", ("n",)), Field("y", "out", "f32", (len(exprs), "n"))),
                ("n",), None, (For("i", Const(0, "i32"), Sym("n"), 1, body),))
    x = np.array([0.0, 0.3, 1.7, -2.2, 40.0, np.nan, np.inf], np.float32)
    vs = Vertices(c, [{"x": x, "y": np.zeros((len(exprs), 7), np.float32), "n": 7}])
    assert_same(vs, *both([c], "Intr", vs), rtol=2e-6)


# ---------------------------------------------------------------- hypothesis: expressions

I32_EDGE = [0, 1, -1, 2, 7, -2**31, 2**31 - 1, 1000003]


def exprs(ty: str, depth: int):
    i = Local("i", "i32")
    leaves = {"i32": st.one_of(st.sampled_from(I32_EDGE).map(lambda v: Const(v, "i32")),
                               st.just(Load("xi", (i,), "i32")), st.just(i)),
              "f32": st.one_of(st.sampled_from([0.0, -0.0, 1.5, -3.25, 1e30, float("nan")]).map(lambda v: Const(v, "f32")),
                               st.just(Load("xf", (i,), "f32"))),
              "bool": st.one_of(st.booleans().map(lambda v: Const(v, "bool")),
                                st.just(Load("xb", (i,), "bool")))}[ty]
    if depth == 0:
        return leaves
    sub = lambda t: exprs(t, depth - 1)
    opts = [leaves]
    if ty == "i32":
        opts += [st.builds(lambda op, a, b: Binary(op, a, b, "i32"), st.sampled_from("+-*/%"), sub("i32"), sub("i32")),
                 st.builds(lambda a: Unary("neg", a, "i32"), sub("i32")),
                 st.builds(lambda a: Cast(a, "i32"), sub("f32")),
                 st.builds(lambda a: Cast(a, "i32"), sub("bool")),
                 st.builds(lambda n, a, b: Intrinsic(n, (a, b), "i32"), st.sampled_from(["min", "max"]), sub("i32"), sub("i32")),
                 st.builds(lambda a: Intrinsic("abs", (a,), "i32"), sub("i32")),
                 st.builds(lambda a: Load("xi", (a,), "i32"), sub("i32")),
                 st.builds(lambda c, a, b: Select(c, a, b, "i32"), sub("bool"), sub("i32"), sub("i32"))]
    elif ty == "f32":
        opts += [st.builds(lambda op, a, b: Binary(op, a, b, "f32"), st.sampled_from("+-*/%"), sub("f32"), sub("f32")),
                 st.builds(lambda a: Unary("neg", a, "f32"), sub("f32")),
                 st.builds(lambda a: Cast(a, "f32"), st.one_of(sub("i32"), sub("bool"))),
                 st.builds(lambda n, a: Intrinsic(n, (a,), "f32"), st.sampled_from(["sqrt", "abs", "floor", "ceil"]), sub("f32")),
                 st.builds(lambda n, a, b: Intrinsic(n, (a, b), "f32"), st.sampled_from(["min", "max"]), sub("f32"), sub("f32"))]
    else:
        opts += [st.builds(lambda op, a, b: Binary(op, a, b, "bool"), st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), sub("i32"), sub("i32")),
                 st.builds(lambda op, a, b: Binary(op, a, b, "bool"), st.sampled_from(["==", "!=", "<", ">="]), sub("f32"), sub("f32")),
                 st.builds(lambda op, a, b: Binary(op, a, b, "bool"), st.sampled_from(["==", "!=", "&&", "||"]), sub("bool"), sub("bool")),
                 st.builds(lambda a: Unary("not", a, "bool"), sub("bool")),
                 st.builds(lambda a: Cast(a, "bool"), st.one_of(sub("i32"), sub("f32")))]
    return st.one_of(opts)


@settings(max_examples=int(os.environ.get("POPDSL_HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ei=exprs("i32", 3), ef=exprs("f32", 3), eb=exprs("bool", 3),
       xi=st.lists(st.sampled_from(I32_EDGE + [3, -5, 12]), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_random_expressions_bit_exact(ei, ef, eb, xi, seed):
    n = len(xi)
    i = Local("i", "i32")
    c = Codelet("Rand", (Field("xi", "in", "i32", ("n",)), Field("xf", "in", "f32", ("n",)),
                         Field("xb", "in", "bool", ("n",)), Field("oi", "out", "i32", ("n",)),
                         Field("of", "out", "f32", ("n",)), Field("ob", "out", "bool", ("n",))),
                ("n",), None,
                (For("i", Const(0, "i32"), Sym("n"), 1,
                     (Store("oi", (i,), ei), Store("of", (i,), ef), Store("ob", (i,), eb))),))
    rng = np.random.default_rng(seed)
    xf = rng.choice(np.array([0, -0.0, 0.5, -1.5, 3e9, -2e10, np.nan, np.inf, 7], np.float32), n)
    vs = Vertices(c, [{"xi": np.array(xi, np.int32), "xf": xf, "xb": rng.random(n) < 0.5,
                       "oi": np.zeros(n, np.int32), "of": np.zeros(n, np.float32),
                       "ob": np.zeros(n, bool), "n": n}])
    mj, mr, cj, cr, ej, er = both([c], "Rand", vs, contract=False)
    assert (ej and ej.key()) == (er and er.key())
    if ej is None:
        np.testing.assert_array_equal(cj, cr)
        assert np.array_equal(mj.view(np.uint8)[:vs.where[0]["of"][0]], mr.view(np.uint8)[:vs.where[0]["of"][0]])
        np.testing.assert_array_equal(vs.get(mj, 0, "of"), vs.get(mr, 0, "of"))   # -0 == 0, nan == nan
        np.testing.assert_array_equal(vs.get(mj, 0, "ob"), vs.get(mr, 0, "ob"))


# ---------------------------------------------------------------- cache

def _fused_adds_ones(nc, cs) -> None:
    """FUSED's vertex on ones: c = a * b + a = 2 (the native code runs and is right)."""
    vs = Vertices(cs[0], [{"a": np.ones(3, np.float32), "b": np.ones(3, np.float32),
                           "c": np.zeros(3, np.float32), "n": 3}])
    nc.run("Fused", vs.mem, vs.table, 0, 1, np.zeros(1, np.int64))
    np.testing.assert_array_equal(vs.get(vs.mem, 0, "c"), [2, 2, 2])


def test_cache_hit_skips_compile_and_survives_corruption(monkeypatch, tmp_path):
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_AHEAD", {})        # compiles earlier tests started and nobody took
    cs = list(pop(FUSED).values())
    calls = []
    real = jit._compile_object
    monkeypatch.setattr(jit, "_compile_object", lambda text, sizes=False: calls.append(sizes) or real(text, sizes))
    assert not NativeCodelets(cs).from_cache and calls == [False]
    nc = NativeCodelets(cs)
    assert nc.from_cache and calls == [False]
    files = list(tmp_path.glob("*.o"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))
    # The sizes' object is compiled when first asked for, and cached beside it.
    assert nc.object_code_size("Fused") > 0 and calls == [False, True]
    assert NativeCodelets(cs).object_code_size("Fused") == nc.object_code_size("Fused") and calls == [False, True]
    host = tmp_path / f"{jit.cache_key(jit._module_text(cs, False))}.o"
    host.write_bytes(host.read_bytes()[:100] + b"garbage")
    nc = NativeCodelets(cs)
    assert not nc.from_cache and calls == [False, True, False]
    _fused_adds_ones(nc, cs)


def test_compile_ahead_is_taken_by_the_next_compile_of_the_same_codelets(monkeypatch, tmp_path):
    """A compile started ahead (on the background thread) is what NativeCodelets gets:
    LLVM runs once, and the object lands in the cache.  A cached object starts none."""
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_AHEAD", {})        # compiles earlier tests started and nobody took
    cs = list(pop(FUSED).values())
    calls = []
    real = jit._compile_object
    monkeypatch.setattr(jit, "_compile_object", lambda text, sizes=False: calls.append(sizes) or real(text, sizes))
    jit.compile_ahead(cs)
    assert len(jit._AHEAD) == 2               # the host's object and the sizes'
    nc = NativeCodelets(cs)
    assert not nc.from_cache and len(jit._AHEAD) == 1
    assert nc.object_code_size("Fused") > 0 and not jit._AHEAD and sorted(calls) == [False, True]
    assert len(list(tmp_path.glob("*.o"))) == 2
    jit.compile_ahead(cs)                    # cached: nothing to do
    assert not jit._AHEAD and len(calls) == 2
    _fused_adds_ones(nc, cs)


def test_compile_ahead_that_fails_is_compiled_again_where_it_is_needed(monkeypatch, tmp_path):
    """The background compile swallows nothing for good: the caller compiles again
    and sees the error itself (here the first compile fails, the second works)."""
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_AHEAD", {})
    cs = list(pop(FUSED).values())
    calls = []
    real = jit._compile_object

    def flaky(text, sizes=False):
        calls.append(sizes)
        if calls == [False]:
            raise RuntimeError("LLVM failed")
        return real(text, sizes)
    monkeypatch.setattr(jit, "_compile_object", flaky)
    jit.compile_ahead(cs)
    nc = NativeCodelets(cs)
    assert calls.count(False) == 2 and not nc.from_cache
    assert nc.object_code_size("Fused") > 0 and not jit._AHEAD
    monkeypatch.setattr(jit, "_compile_object",
                        lambda text, sizes=False: (_ for _ in ()).throw(RuntimeError("LLVM failed")))
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path / "other"))
    jit.compile_ahead(cs)
    with pytest.raises(RuntimeError, match="LLVM failed"):
        NativeCodelets(cs)


def test_run_rejects_bad_arguments():
    cs = list(pop(FUSED).values())
    nc = NativeCodelets(cs)
    vs = Vertices(cs[0], [{"a": np.ones(3, np.float32), "b": np.ones(3, np.float32),
                           "c": np.zeros(3, np.float32), "n": 3}])
    cyc = np.zeros(1, np.int64)
    with pytest.raises(ValueError):
        nc.run("Fused", vs.mem[1:], vs.table, 0, 1, cyc)             # misaligned
    with pytest.raises(ValueError):
        nc.run("Fused", vs.mem, vs.table[:, :3].copy(), 0, 1, cyc)   # wrong column count
    with pytest.raises(ValueError):
        nc.run("Fused", vs.mem, vs.table, 0, 2, cyc)                 # rows past the table


# ---------------------------------------------------------------- verifier

def _vertex(body, fields=(Field("x", "inout", "f32", ("n",)), Field("k", "state", "i32", ())), syms=("n",)):
    return Codelet("V", tuple(fields), syms, None, tuple(body))


_AMP_FIELDS = (Field("a", "in", "f32", ("n", "n")), Field("b", "in", "f32", ("n", "n")),
               Field("c", "out", "f32", ("n", "n")))


def _amp(**flags):
    zero, one = Const(0, "i32"), Const(1, "i32")
    return _vertex([Amp("c", (zero, zero), "a", (zero, zero), "b", (zero, zero), Sym("n"), Sym("n"), Sym("n"),
                        one, one, one, **flags)], _AMP_FIELDS)


BAD = {
    "amp both transposed": _amp(a_transposed=True, b_transposed=True),
    "amp transposed flag": _amp(a_transposed=1),
    "unknown field": _vertex([Store("y", (Const(0, "i32"),), Const(1.0, "f32"))]),
    "store to in": _vertex([Store("a", (), Const(1.0, "f32"))], (Field("a", "in", "f32", ()),), ()),
    "store to state": _vertex([Store("k", (), Const(1, "i32"))]),
    "wrong value type": _vertex([Store("x", (Const(0, "i32"),), Const(1, "i32"))]),
    "index arity": _vertex([Store("x", (), Const(1.0, "f32"))]),
    "index type": _vertex([Store("x", (Const(0.0, "f32"),), Const(1.0, "f32"))]),
    "unknown local": _vertex([Assign("q", Const(1, "i32"))]),
    "read unknown local": _vertex([Declare("q", "i32", Local("r", "i32"))]),
    "return value in vertex": _vertex([Return(Const(1, "i32"))]),
    "step 0": _vertex([For("i", Const(0, "i32"), Sym("n"), 0, ())]),
    "assign loop var": _vertex([For("i", Const(0, "i32"), Sym("n"), 1, (Assign("i", Const(1, "i32")),))]),
    "break outside loop": _vertex([Break()]),
    "unknown symbol": _vertex([Declare("q", "i32", Sym("zz"))]),
    "bad op": _vertex([Declare("q", "i32", Binary("**", Const(1, "i32"), Const(1, "i32"), "i32"))]),
    "mixed operands": _vertex([Declare("q", "f32", Binary("+", Const(1, "i32"), Const(1.0, "f32"), "f32"))]),
    "bool arithmetic": _vertex([Declare("q", "bool", Binary("+", Const(True, "bool"), Const(True, "bool"), "bool"))]),
    "ordered bool compare": _vertex([Declare("q", "bool", Binary("<", Const(True, "bool"), Const(True, "bool"), "bool"))]),
    "f16 expression": _vertex([Declare("q", "f16", None)]),
    "i32 intrinsic": _vertex([Declare("q", "i32", Intrinsic("exp", (Const(1, "i32"),), "i32"))]),
    "len axis": _vertex([Declare("q", "i32", Len("x", 1))]),
    "unknown call": _vertex([Declare("q", "f32", CallScalar("nope", (), "f32"))]),
    "rank 3": _vertex([], (Field("x", "in", "f32", ("n", "n", "n")),)),
    "undeclared symbol": _vertex([], (Field("x", "in", "f32", ("m",)),)),
    "const out of range": _vertex([Declare("q", "i32", Const(2**31, "i32"))]),
    "duplicate local": _vertex([Declare("q", "i32", None), Declare("q", "i32", None)]),
    "not a stmt": _vertex([Const(1, "i32")]),
    "checked flag": _vertex([Store("x", (Const(0, "i32"),), Const(1.0, "f32"), checked="yes")]),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_verifier_rejects(what):
    with pytest.raises(ValueError):
        verify_codelet(BAD[what])


def test_verifier_rejects_recursion_and_accepts_good():
    f = Codelet("f", (Field("x", "in", "f32", ()),), (), "f32",
                (Return(CallScalar("f", (Load("x", (), "f32"),), "f32")),))
    with pytest.raises(ValueError, match="recursive"):
        verify_codelet(f, {"f": f})
    for c in pop(FUSED + MATMUL + SCALARS).values():
        verify_codelet(c, pop(SCALARS))
    for flags in ({}, {"a_transposed": True}, {"b_transposed": True}):
        verify_codelet(_amp(**flags))


# ---------------------------------------------------------------- specialised drivers

PRIMS = {c.name: c for c in compile_codelets(
    (Path(__file__).resolve().parent.parent / "stdlib" / "prims.pop").read_text(), "prims.pop")}


def _run_spec_and_generic(codelets, name, vs, contract=False):
    """(generic, specialised) runs of the same table: (mem, cycles, error) each."""
    nc = NativeCodelets(codelets, contract=contract)
    consts = constant_columns(nc.codelets[name], vs.table, min_rows=1)
    sp = nc.specialised([(name, consts)])
    out = []
    for runner, k in ((nc, ()), (sp, consts)):
        mem = aligned_zeros(vs.mem.size)
        mem[:] = vs.mem
        cyc = np.full(len(vs.table), -7, np.int64)
        err = None
        try:
            runner.run(name, mem, vs.table, 0, len(vs.table), cyc, k)
        except VertexError as e:
            err = e
        out.append((mem, cyc, err))
    return consts, out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 9), k=st.integers(1, 7), p=st.integers(1, 20), n=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_specialised_matmul_is_bit_exact_with_generic_and_reference(m, k, p, n, seed):
    # The MatMul primitive takes rows four at a time with a remainder loop: every
    # m mod 4 is exercised, and a constant-folded driver must not change a bit.
    rng = np.random.default_rng(seed)
    rows = [{"a": rng.standard_normal((m, k)).astype(np.float32),
             "b": rng.standard_normal((k, p)).astype(np.float32),
             "c": np.full((m, p), np.nan, np.float32), "m": m, "k": k, "p": p} for _ in range(n)]
    vs = Vertices(PRIMS["MatMul"], rows)
    consts, [(mg, cg, eg), (ms, cs_, es)] = _run_spec_and_generic([PRIMS["MatMul"]], "MatMul", vs)
    assert {table_layout(PRIMS["MatMul"])[col].name for col, _ in consts} >= {"m", "k", "p"}
    assert eg is None and es is None
    np.testing.assert_array_equal(ms, mg)
    np.testing.assert_array_equal(cs_, cg)
    mr = aligned_zeros(vs.mem.size)
    mr[:] = vs.mem
    cr = np.zeros(n, np.int64)
    ev.run_vertices(PRIMS["MatMul"], mr, vs.table, 0, n, cr, {})
    np.testing.assert_array_equal(mr, mg)
    np.testing.assert_array_equal(cr, cg)
    for v in range(n):
        np.testing.assert_allclose(vs.get(ms, v, "c"), rows[v]["a"] @ rows[v]["b"], rtol=1e-5, atol=1e-5)


def test_specialised_conv_state_and_errors_match_generic():
    # Conv2dBlock's geometry is state (kh, kw, stride, widths): constants too.
    c = PRIMS["Conv2dBlock"]
    rng = np.random.default_rng(3)
    rows = [{"x": rng.standard_normal((2, 5 * 5)).astype(np.float32),
             "w": rng.standard_normal((3, 2 * 3 * 3)).astype(np.float32),
             "y": np.zeros((3, 2 * 2), np.float32), "kh": 3, "kw": 3, "s": 2, "wp": 5, "ow": 2, "ox": 0,
             "c": 2, "xs": 25, "o": 3, "ckk": 18, "ys": 4} for _ in range(4)]
    vs = Vertices(c, rows)
    consts, [(mg, cg, eg), (ms, cs_, es)] = _run_spec_and_generic([c], "Conv2dBlock", vs)
    assert {table_layout(c)[col].name for col, _ in consts} >= {"kh", "kw", "s", "wp", "ow", "ox"}
    assert eg is None and es is None
    np.testing.assert_array_equal(ms, mg)
    np.testing.assert_array_equal(cs_, cg)
    # A failing vertex is reported identically by both drivers.
    g = pop("""
codelet Gather(in x: f32[n], in idx: i32[m], out y: f32[m]) {
    for i in 0..m { y[i] = x[idx[i]]; }
}""")["Gather"]
    rows = [{"x": np.arange(4, dtype=np.float32), "idx": np.array(ix, np.int32),
             "y": np.zeros(2, np.float32), "n": 4, "m": 2} for ix in ([0, 3], [1, 2], [2, 4], [5, 0])]
    vs = Vertices(g, rows)
    consts, [(mg, cg, eg), (ms, cs_, es)] = _run_spec_and_generic([g], "Gather", vs)
    assert consts and eg.key() == es.key() == (ERR_BOUNDS, 2, "x", 0, 4, 4)
    np.testing.assert_array_equal(ms, mg)
    np.testing.assert_array_equal(cs_[:2], cg[:2])


def test_specialisation_needs_enough_rows_and_skips_addresses():
    c = PRIMS["MatMul"]
    table = np.zeros((40, len(table_layout(c))), np.int64)
    table[:, 0] = np.arange(40) * 64                  # a's address differs per row
    table[:, 1] = 7
    cols = dict(constant_columns(c, table))
    assert 0 not in cols and cols[1] == 7
    assert constant_columns(c, table[:10]) == ()
    table[3, 1] = 8
    assert 1 not in dict(constant_columns(c, table))
    with pytest.raises(ValueError, match="outside its table"):
        emit_module([c], specs=[("MatMul", ((99, 1),))])
    with pytest.raises(ValueError, match="no vertex codelet"):
        emit_module([c], specs=[("Nope", ())])


# ---------------------------------------------------------------- copy runs

@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(0, 24)),
                     min_size=0, max_size=12),
       parts=st.integers(1, 4))
def test_independent_runs_agree_with_brute_force_and_any_order(runs, parts):
    from popdsl.runtime.copies import copy_runs, independent, split_runs
    src = np.array([r[0] for r in runs], np.int64)
    dst = np.array([r[1] for r in runs], np.int64)
    nb = np.array([r[2] for r in runs], np.int64)
    writes = [set(range(d, d + n)) for d, n in zip(dst, nb)]
    reads = [set(range(s, s + n)) for s, n in zip(src, nb)]
    brute = all(not (writes[i] & (writes[j] | reads[j]))
                for i in range(len(runs)) for j in range(len(runs)) if i != j) and \
        all(not (writes[i] & reads[i]) for i in range(len(runs)))
    assert independent(src, dst, nb) == brute
    cuts = split_runs(nb, parts)
    assert cuts[0] == 0 and cuts[-1] == len(runs) and np.all(np.diff(cuts) >= 0)
    if brute:
        mem = aligned_zeros(256)
        mem[:] = np.random.default_rng(len(runs)).integers(0, 255, 256)
        want = mem.copy()
        copy_runs(want, src, dst, nb)
        for a, b in reversed(list(zip(cuts[:-1], cuts[1:]))):       # pieces in any order
            copy_runs(mem, src[a:b], dst[a:b], nb[a:b])
        np.testing.assert_array_equal(mem, want)


@settings(max_examples=100, deadline=None)
@given(addrs=st.lists(st.integers(0, 60), min_size=0, max_size=30, unique=True))
def test_scatter_and_gather_by_runs_round_trip(addrs):
    from popdsl.runtime.copies import element_runs, gather_runs, scatter_runs
    a = np.array(addrs, np.int64) * 4
    values = np.arange(len(addrs), dtype=np.float32) + 0.5
    runs = element_runs(a, 4)
    assert runs[2].sum() == 4 * len(addrs)
    mem = aligned_zeros(256)
    scatter_runs(mem, values, runs)
    want = np.zeros(64, np.float32)
    want[a // 4] = values
    np.testing.assert_array_equal(mem.view(np.float32), want)
    out = np.empty(len(addrs), np.float32)
    gather_runs(mem, out, runs)
    np.testing.assert_array_equal(out, values)


def test_scatter_and_gather_refuse_runs_outside_their_arrays():
    from popdsl.runtime.copies import element_runs, gather_runs, scatter_runs
    mem = aligned_zeros(64)
    with pytest.raises(ValueError, match="outside"):
        scatter_runs(mem, np.ones(4, np.float32), element_runs(np.array([0, 4, 8, 64]), 4))
    with pytest.raises(ValueError, match="outside"):
        scatter_runs(mem, np.ones(2, np.float32), element_runs(np.array([0, 4, 8]), 4))
    with pytest.raises(ValueError, match="outside"):
        gather_runs(mem, np.ones(1, np.float32), element_runs(np.array([0, 4]), 4))


def test_code_sizes_are_the_same_whatever_the_host_cpu(monkeypatch, tmp_path):
    """The memory plan's code bytes come from SIZE_MACHINE's object, not the host's:
    an AVX-512 host's vectorised loop is larger (which once made a training step
    one that fitted on one machine and not on another)."""
    from popdsl.ir import host_llvm
    if not llvm.get_process_triple().startswith("x86_64"):
        pytest.skip("the CPUs compared are x86-64 ones")
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_AHEAD", {})
    cs = list(pop("codelet Saxpy(in x: f32[n], inout y: f32[n], a: f32) "
                  "{ for i in 0..n { y[i] = y[i] + a * x[i]; } }").values())
    jit._target_machine()
    host_sizes, sizes = set(), set()
    for cpu in ("x86-64", "skylake-avx512", "znver4"):
        tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
            cpu=cpu, features="", opt=3, jit=True)
        monkeypatch.setattr(host_llvm, "_TM", tm)
        monkeypatch.setattr(jit, "_host", lambda cpu=cpu: (tm.triple, cpu, ""))
        nc = NativeCodelets(cs)             # compiled (and loaded, not run) for that CPU
        host_sizes.add(jit._section_sizes(jit.object_code(cs)[0])[".text.popdsl_drive_Saxpy"])
        sizes.add(nc.object_code_size("Saxpy"))
    assert len(host_sizes) > 1 and len(sizes) == 1
