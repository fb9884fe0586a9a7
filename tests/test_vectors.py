"""64-bit vector codelets (`f32x2`, `f16x4`): native code against the reference
evaluator bit for bit (without FMA contraction) and both against numpy lane
arithmetic, on random expressions; 2-D vector fields with row strides; bounds; the
cycle charge of vector instructions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from popdsl.ir import cost
from popdsl.ir.codelet import ERR_BOUNDS
from tests.test_codegen import Vertices, _cache, both, pop  # noqa: F401 - _cache is a fixture

LANE = {"f32x2": np.float32, "f16x4": np.float16}
LANES = {"f32x2": 2, "f16x4": 4}


@st.composite
def exprs(draw, depth: int):
    """(source text, numpy function of (x, z, a)) of an expression: x and z are
    vectors (arrays of the lane type), a and the constants f32 scalars."""
    if depth == 0:
        leaf = draw(st.sampled_from(["x", "z", "a", "c"]))
        if leaf == "c":
            k = draw(st.sampled_from([0.5, 2.0, -1.25, 3.0]))
            return f"{k}", lambda x, z, a, k=k: np.float32(k)
        if leaf == "a":
            return "a", lambda x, z, a: a
        return f"{leaf}[i]", (lambda x, z, a: x) if leaf == "x" else (lambda x, z, a: z)
    kind = draw(st.sampled_from(["+", "-", "*", "/", "min", "max", "abs", "neg", "leaf"]))
    if kind == "leaf":
        return draw(exprs(0))
    if kind in ("abs", "neg"):
        s, f = draw(exprs(depth - 1))
        return (f"abs({s})", lambda x, z, a: np.abs(f(x, z, a))) if kind == "abs" \
            else (f"-({s})", lambda x, z, a: -f(x, z, a))
    (sa, fa), (sb, fb) = draw(exprs(depth - 1)), draw(exprs(depth - 1))
    op = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "min": np.minimum,
          "max": np.maximum}[kind]
    text = f"{kind}({sa}, {sb})" if kind in ("min", "max") else f"({sa} {kind} {sb})"
    return text, lambda x, z, a: _lanewise(op, fa(x, z, a), fb(x, z, a))


def _lanewise(op, u, v):
    """op as the codelet does it: two scalars in f32; a scalar meeting a vector is
    first rounded to the vector's lane type (a splat), then lane by lane."""
    if isinstance(u, np.ndarray) and not isinstance(v, np.ndarray):
        v = np.full(u.shape, v, np.float32).astype(u.dtype)
    elif isinstance(v, np.ndarray) and not isinstance(u, np.ndarray):
        u = np.full(v.shape, u, np.float32).astype(v.dtype)
    return op(u, v)


def lanes_of(ty, fn):
    """numpy's value of fn over the lane type (numpy rounds f16 after each operation)."""
    def run(x, z, a):
        with np.errstate(all="ignore"):
            v = fn(x, z, np.float32(a))
            if not isinstance(v, np.ndarray):
                v = np.full(x.shape, v, np.float32)
            return v.astype(LANE[ty])
    return run


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ty=st.sampled_from(["f32x2", "f16x4"]), e=exprs(3), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_vector_expressions_match_the_reference_bit_for_bit_and_numpy(ty, e, n, seed):
    src, fn = e
    assume("[i]" in src)             # a vector somewhere: scalars alone do not convert to a vector
    lane = LANE[ty]
    c = pop(f"""
codelet V(in x: {ty}[n], in z: {ty}[n], out y: {ty}[n], a: f32) {{
    for i in 0..n {{ y[i] = {src}; }}
}}""")["V"]
    rng = np.random.default_rng(seed)
    k = LANES[ty]
    x = rng.standard_normal(n * k).astype(lane)
    z = (rng.standard_normal(n * k) + 0.25).astype(lane)
    a = np.float32(rng.choice([0.5, -2.0, 1.5]))
    vs = _VectorVertices(c, [{"x": x, "z": z, "y": np.zeros(n * k, lane), "a": a, "n": n}])
    mj, mr, cj, cr, ej, er = both([c], "V", vs, contract=False)
    assert ej is None and er is None
    np.testing.assert_array_equal(mj, mr)
    np.testing.assert_array_equal(cj, cr)
    # Expressions are evaluated as written (a scalar meeting a vector is splatted
    # first), so numpy on the lane type gives the same bits, NaN included.
    want = lanes_of(ty, fn)(x, z, a)
    got = vs.get(mj, 0, "y")
    np.testing.assert_array_equal(got.view(np.uint16 if lane is np.float16 else np.uint32)[~np.isnan(want)],
                                  want.view(np.uint16 if lane is np.float16 else np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


class _VectorVertices(Vertices):
    """Vertices whose vector fields hold arrays of their lane type."""

    def __init__(self, c, rows):
        import popdsl.ir.codelet as cir
        lane_fields = [cir.Field(f.name, f.direction, cir.lane_type(f.dtype), f.dims) for f in c.fields]
        super().__init__(cir.Codelet(c.name, tuple(lane_fields), c.symbols, c.ret, c.body), rows)
        self.c = c


def test_two_dimensional_vector_fields_count_their_stride_in_lanes():
    # A 3 x 2-vector block of a 3 x 10 f32 matrix (row stride 10 elements).
    c = pop("""
codelet Scale2(inout m: f32x2[r, k], s: f32) {
    for i in 0..r { for j in 0..k { m[i, j] = m[i, j] * s; } }
}""")["Scale2"]
    big = np.arange(30, dtype=np.float32).reshape(3, 10).copy()     # a 2-D base: the harness places it whole
    vs = _VectorVertices(c, [{"m": big[:, 2:6], "s": 2.0, "r": 3, "k": 2}])
    mj, mr, cj, cr, ej, er = both([c], "Scale2", vs, contract=False)
    assert ej is None and er is None and (cj == cr).all()
    np.testing.assert_array_equal(mj, mr)
    want = big.copy()
    want[:, 2:6] *= 2
    np.testing.assert_array_equal(vs.get(mj, 0, "m"), want)


def test_a_vector_index_out_of_range_names_vectors():
    c = pop("""
codelet Poke(inout v: f32x2[n], at: i32) { v[at] = f32x2(1.0, 2.0); }
""")["Poke"]
    vs = _VectorVertices(c, [{"v": np.zeros(6, np.float32), "at": 3, "n": 3}])
    *_, ej, er = both([c], "Poke", vs)
    assert ej.key() == er.key() == (ERR_BOUNDS, 0, "v", 0, 3, 3)


def test_a_vector_instruction_costs_what_a_scalar_one_does():
    # Per iteration: two loads, a multiply, an add and a store whatever the width:
    # the vector codelet does twice the work of the scalar one in the same cycles.
    cs = pop("""
codelet S(in x: f32[n], inout y: f32[n]) { for i in 0..n { y[i] = y[i] + x[i] * 2.0; } }
codelet V(in x: f32x2[n], inout y: f32x2[n]) { for i in 0..n { y[i] = y[i] + x[i] * f32x2(2.0); } }
""")
    per_scalar = cost.rpt_iteration(cs["S"].body[0].body)
    per_vector = cost.rpt_iteration(cs["V"].body[0].body)
    assert per_vector == per_scalar + 1              # the splat of 2.0
    vs = _VectorVertices(cs["V"], [{"x": np.ones(16, np.float32), "y": np.ones(16, np.float32), "n": 8}])
    mj, mr, cj, cr, *_ = both([cs["V"]], "V", vs)
    assert cj[0] == cr[0] == cost.VERTEX_OVERHEAD + cost.LOOP_SETUP + 8 * per_vector
    np.testing.assert_array_equal(vs.get(mj, 0, "y"), np.full(16, 3, np.float32))


@pytest.mark.parametrize("ty", ["f32x2", "f16x4"])
def test_lanes_constructors_and_intrinsics(ty):
    k = LANES[ty]
    c = pop(f"""
codelet L(in x: {ty}[n], out y: {ty}[n], out s: f32[n]) {{
    for i in 0..n {{
        let v = x[i];
        var w: {ty} = {ty}(0.5);
        w = fma(v, v, w);
        y[i] = min(max(w, 1), {ty}({", ".join(str(float(j)) for j in range(k))}));
        s[i] = v[{k - 1}] - v[0];
    }}
}}""")["L"]
    x = np.array([0.0, 1.5, -2.0, 3.0, 4.0, -0.5, 2.5, 6.0], LANE[ty])
    n = 8 // k
    vs = _VectorVertices(c, [{"x": x, "y": np.zeros(8, LANE[ty]), "s": np.zeros(n, np.float32), "n": n}])
    mj, mr, cj, cr, ej, er = both([c], "L", vs)
    assert ej is None and er is None
    np.testing.assert_array_equal(mj, mr)
    w = (x.astype(np.float32) * x + 0.5).astype(LANE[ty])
    want = np.minimum(np.maximum(w, 1), np.tile(np.arange(k, dtype=np.float32), n).astype(LANE[ty]))
    np.testing.assert_array_equal(vs.get(mj, 0, "y"), want)
    np.testing.assert_array_equal(vs.get(mj, 0, "s"), (x.reshape(n, k)[:, -1].astype(np.float32)
                                                       - x.reshape(n, k)[:, 0]))


def test_every_half_through_sqrt_and_fma_rounds_as_the_reference_says():
    # LLVM computes f16 lanes in wider types and rounds once (sqrt through f32, fma
    # through f64); the reference evaluator defines the same.  Every half value for
    # sqrt, 65,536 random triples for fma.
    c = pop("""
codelet H(in x: f16x4[n], in z: f16x4[n], in w: f16x4[n], out y: f16x4[n], out r: f16x4[n]) {
    for i in 0..n { y[i] = sqrt(x[i]); r[i] = fma(x[i], z[i], w[i]); }
}""")["H"]
    rng = np.random.default_rng(0)
    x = np.arange(65536, dtype=np.uint16).view(np.float16)
    z, w = rng.standard_normal(65536).astype(np.float16), (rng.standard_normal(65536) * 8).astype(np.float16)
    vs = _VectorVertices(c, [{"x": x, "z": z, "w": w, "y": np.zeros(65536, np.float16),
                              "r": np.zeros(65536, np.float16), "n": 16384}])
    mj, mr, cj, cr, ej, er = both([c], "H", vs, contract=False)
    assert ej is None and er is None
    np.testing.assert_array_equal(mj, mr)
    with np.errstate(all="ignore"):
        want = np.sqrt(x.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(vs.get(mj, 0, "y").view(np.uint16), want.view(np.uint16))
