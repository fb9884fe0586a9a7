"""The operation table is the definition: every element-wise row on every dtype its rule
accepts (and an error on the ones it does not), compiled and simulated, against the
reference evaluator that runs the rows' numpy references; whole example networks
against the same evaluator; and the table's own consistency."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import popdsl
from popdsl import ops
from popdsl.diagnostics import CompileError
from popdsl.ir import graph as g
from popdsl.ir.index import Batch
from popdsl.ir.target import get_target
from popdsl.ops import elementwise
from popdsl.ops.evaluate import run_graph
from popdsl.pipeline import compile_source
from popdsl.passes.partition import prim_codelets

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("f32", "f16", "i32", "bool")
NP = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "bool": np.bool_}


def accepts(row, dt: str) -> bool:
    rule = row.rule
    if rule == "float":
        return dt in ("f32", "f16")
    if rule == "numeric":
        return dt in ("f32", "f16", "i32")
    if rule == "int":
        return dt == "i32"
    if rule == "compare":
        return dt != "bool" or row.name in ("eq", "ne")
    return dt == "bool"


def sample(dt: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dt == "bool":
        return rng.random(shape) < 0.5
    if dt == "i32":
        v = rng.integers(-20, 20, shape).astype(np.int32)
        return np.where(v == 0, 3, v).astype(np.int32)      # a divisor of zero is a runtime error
    return rng.uniform(0.25, 3.0, shape).astype(NP[dt]) * np.where(rng.random(shape) < 0.3, -1, 1).astype(NP[dt])


def expression(row) -> str:
    if row.arity == 1:
        return "-a" if row.name == "neg" else "!a" if row.name == "not" else f"{row.name}(a)"
    return f"a {row.symbol} b" if row.symbol else f"{row.name}(a, b)"


def source(row, dt: str) -> str:
    ins = "    input a: {0}[3, 5];\n".format(dt) + ("    input b: {0}[5];\n".format(dt) if row.arity == 2 else "")
    return f"graph g(tiles = 3) {{\n{ins}    output y = {expression(row)};\n}}\n"


def compare(got: np.ndarray, want: np.ndarray, dt: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype.kind in "fc":
        tol = 2e-3 if got.dtype == np.float16 else 2e-6
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol,
                                   equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


CASES = [(row, dt) for row in elementwise.ROWS for dt in DTYPES]


@pytest.mark.parametrize("row,dt", CASES, ids=[f"{r.name}-{d}" for r, d in CASES])
def test_elementwise_row_on_every_dtype(row, dt):
    src = source(row, dt)
    target = get_target("gc200", tiles=3)
    if not accepts(row, dt):
        with pytest.raises(CompileError) as e:
            popdsl.compile(src, tiles=3)
        assert "<string>:" in str(e.value) and "error:" in str(e.value)
        return
    feeds = {"a": sample(dt, (3, 5), 1)}
    if row.arity == 2:
        feeds["b"] = sample(dt, (5,), 2)
    want = run_graph(compile_source(src, "<string>", target, stop_after="elaborate"), feeds)["y"]
    with popdsl.Simulator(popdsl.compile(src, tiles=3)) as sim:
        got = sim.run(feeds)["y"]
    compare(got, want, dt)


@pytest.mark.parametrize("to", sorted(elementwise.CASTS))
@pytest.mark.parametrize("frm", DTYPES)
def test_casts_between_every_pair_of_dtypes(frm, to):
    src = f"graph g(tiles = 2) {{\n    input a: {frm}[7];\n    output y = {to}(a);\n}}\n"
    values = [0, 1, -1, 2.75, -3.5, 70000 if frm != "f16" else np.inf, 0.3]
    a = np.array(values).astype(NP[frm]) if frm != "bool" else np.array([True, False, True, True, False, False, True])
    want = run_graph(compile_source(src, "<string>", get_target("gc200", tiles=2), stop_after="elaborate"),
                     {"a": a})["y"]
    with popdsl.Simulator(popdsl.compile(src, tiles=2)) as sim:
        got = sim.run({"a": a})["y"]
    compare(got, want, to)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_example_networks_match_the_reference_evaluator(name):
    path = ROOT / "examples" / f"{name}.pop"
    text = path.read_text()
    graph = compile_source(text, str(path), get_target(), stop_after="elaborate")
    exe = popdsl.compile(path)
    rng = np.random.default_rng(5)
    feeds = {n: (rng.integers(0, 10, s).astype(np.int32) if d == "i32" else rng.standard_normal(s).astype(np.float32))
             for n, (d, s) in exe.inputs.items()}
    want = run_graph(graph, feeds)
    with popdsl.Simulator(exe) as sim:
        got = sim.run(feeds)
    assert set(got) == set(want)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_the_table_is_complete():
    """Every operation has a reference and, unless the partitioner fuses or views it,
    a partition rule; the codelets a rule names exist; every function is documented
    and its overloads can all be reached."""
    prims = prim_codelets()
    for name, entry in ops.OPS.items():
        assert entry.doc, name
        if entry.kind in ("compute", "view"):
            assert entry.ref is not None and entry.partition is not None, name
        if entry.kind == "elementwise" and name != "call":
            assert entry.ref is not None and entry.emit is not None, name
        for c in entry.codelets:
            assert c in prims, (name, c)
    for name, overloads in ops.FUNCTIONS.items():
        for f in overloads:
            assert f.doc and f.params, name
    assert ops.function("max", 1, set()).params[0].name == "x"          # a reduction
    assert ops.function("max", 2, set()).params[0].name == "a"          # element-wise
    assert ops.function("max", 0, {"a", "b"}).params[0].name == "a"


def test_an_operand_used_twice_by_an_op_is_computed_once():
    """square(a + b) fuses into one codelet that adds once, into a local, and squares it."""
    src = "graph g(tiles = 2) {\n    input a: f32[8];\n    input b: f32[8];\n    output y = square(a + b);\n}\n"
    graph = compile_source(src, "<string>", get_target("gc200", tiles=2), stop_after="partition")
    fused = [c for n, c in graph.codelets.items() if n.startswith("fused_")]
    assert len(fused) == 1
    text = repr(fused[0].body)
    assert text.count("Binary(op='+'") == 1 and "Declare(name='t0'" in text
    a, b = np.arange(8, dtype=np.float32), np.ones(8, np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_array_equal(sim.run({"a": a, "b": b})["y"], (a + b) ** 2)


def test_leaky_relu_takes_its_slope_and_erf_matches_math():
    """The two rows added as table entries only: leaky_relu's compile-time slope
    (default 0.01, PyTorch's) and erf through the libm intrinsic."""
    import math
    src = ("graph g(tiles = 2) {\n    input x: f32[9];\n    output a = leaky_relu(x);\n"
           "    output b = leaky_relu(x, alpha = 0.2);\n    output c = erf(x);\n}\n")
    x = np.linspace(-3, 3, 9).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        out = sim.run({"x": x})
    np.testing.assert_allclose(out["a"], np.where(x > 0, x, 0.01 * x), rtol=1e-6)
    np.testing.assert_allclose(out["b"], np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    np.testing.assert_allclose(out["c"], [math.erf(v) for v in x], rtol=1e-6, atol=1e-7)
    with pytest.raises(CompileError, match="'alpha' must be a number"):
        popdsl.compile(src.replace("alpha = 0.2", "alpha = x"))


def test_erf_in_a_codelet():
    from popdsl.ir.codelet_eval import map_elements
    from popdsl.sema import compile_codelets
    from popdsl.codegen.jit import NativeCodelets
    [c] = compile_codelets("codelet e(x: f32) -> f32 { return erf(x) * 2.0; }")
    x = np.linspace(-2, 2, 11).astype(np.float32)
    native, ref = np.zeros_like(x), np.zeros_like(x)
    NativeCodelets([c]).map("e", native, x)
    map_elements(c, ref, x)
    np.testing.assert_allclose(native, ref, rtol=1e-6)


# ---------------------------------------------------------------- every other primitive on every dtype

# (expression, inputs {name: shape}, dtypes it accepts); `T` is the dtype under test.
PRIMITIVES = [
    ("sum(a, axis = 1)", {"a": (4, 6)}, ("f32", "f16", "i32")),
    ("mean(a, axis = [0, 1], keepdims = true)", {"a": (4, 6)}, ("f32", "f16")),
    ("max(a, axis = 0)", {"a": (4, 6)}, ("f32", "f16", "i32")),
    ("min(a)", {"a": (4, 6)}, ("f32", "f16", "i32")),
    ("argmax(a, axis = 1)", {"a": (4, 6)}, DTYPES),
    ("a @ b", {"a": (3, 5), "b": (5, 4)}, ("f32", "f16")),
    ("conv2d(a, b, padding = 1)", {"a": (1, 2, 5, 5), "b": (3, 2, 3, 3)}, ("f32", "f16")),
    ("max_pool2d(a, 2)", {"a": (1, 2, 4, 6)}, ("f32", "f16")),
    ("avg_pool2d(a, 3, stride = 1, padding = 1)", {"a": (1, 2, 4, 5)}, ("f32", "f16")),
    ("transpose(reshape(a, [3, 8]))[1:3, 2]", {"a": (4, 6)}, DTYPES),
    ("slice(a, axis = 1, start = 2, stop = 5)", {"a": (4, 6)}, DTYPES),
    ("concat([a, b], axis = 1)", {"a": (3, 2), "b": (3, 4)}, DTYPES),
    ("pad(a, [[1, 0], [2, 1]], value = V)", {"a": (3, 4)}, DTYPES),
    ("gather(a, i, axis = 0)", {"a": (5, 3), "i": (4,)}, DTYPES),
]
PAD_VALUE = {"f32": "2.5", "f16": "-1.5", "i32": "7", "bool": "true"}


def prim_source(expr: str, shapes: dict, dt: str) -> str:
    decl = "".join(f"    input {k}: {'i32' if k == 'i' else dt}{list(s)};\n" for k, s in shapes.items())
    return f"graph g(tiles = 5) {{\n{decl}    output y = {expr.replace('V', PAD_VALUE[dt])};\n}}\n"


PRIM_CASES = [(e, s, ok, dt) for e, s, ok in PRIMITIVES for dt in DTYPES]


@pytest.mark.parametrize("expr,shapes,ok,dt", PRIM_CASES, ids=[f"{e.split('(')[0] or e[:6]}-{d}" for e, s, ok, d in PRIM_CASES])
def test_primitive_on_every_dtype(expr, shapes, ok, dt):
    src = prim_source(expr, shapes, dt)
    if dt not in ok:
        with pytest.raises(CompileError):
            popdsl.compile(src)
        return
    feeds = {k: (np.array([4, -1, 0, -5], np.int32) if k == "i" else sample(dt, s, 7 + n))
             for n, (k, s) in enumerate(shapes.items())}
    want = run_graph(compile_source(src, "<string>", get_target("gc200", tiles=5), stop_after="elaborate"), feeds)["y"]
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        got = sim.run(feeds)["y"]
    compare(got, want, dt)


def test_pow_of_integers_is_a_diagnostic_not_an_internal_error():
    with pytest.raises(CompileError, match="'pow' needs floating-point tensors"):
        popdsl.compile("graph g(tiles = 2) { input a: i32[4]; input b: i32[4]; output y = pow(a, b); }")


def test_pad_values_are_checked_against_the_dtype():
    for dt, value, msg in (("bool", "2", "must be true or false"), ("i32", "1.5", "must be an i32 integer"),
                           ("f32", "true", "must be a number")):
        with pytest.raises(CompileError, match=msg):
            popdsl.compile(f"graph g(tiles = 2) {{ input a: {dt}[4]; output y = pad(a, 1, value = {value}); }}")


def test_labels_outside_the_classes_are_a_runtime_error_naming_the_label():
    src = "graph g(tiles = 3) {\n    input y: i32[4];\n    output h = one_hot(y, 10);\n}\n"
    exe = popdsl.compile(src)
    with popdsl.Simulator(exe) as sim:
        np.testing.assert_array_equal(sim.run({"y": np.array([0, 9, 3, 3], np.int32)})["h"],
                                      np.eye(10, dtype=np.float32)[[0, 9, 3, 3]])
        for bad in (10, -1):
            with pytest.raises(popdsl.DeviceError) as e:
                sim.run({"y": np.array([1, bad, 2, 3], np.int32)})
            text = str(e.value)
            assert f"one_hot: label {bad} is outside 0..10 - 1" in text and "<string>:3:" in text, text


def test_gather_out_of_range_names_the_index():
    src = "graph g(tiles = 2) {\n    input x: f32[5, 2];\n    input i: i32[2];\n    output y = gather(x, i);\n}\n"
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        with pytest.raises(popdsl.DeviceError) as e:
            sim.run({"x": np.zeros((5, 2), np.float32), "i": np.array([1, -6], np.int32)})
    assert "gather: an index is out of range for an axis of size 5" in str(e.value), str(e.value)


def test_a_users_codelet_named_like_a_primitive_does_not_replace_it():
    src = """codelet MatMul(in a: f32[n], out c: f32[n]) { for i in 0..n { c[i] = 0.0; } }
graph g(tiles = 2) { input a: f32[2, 3]; input b: f32[3, 2]; output y = a @ b; }"""
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_array_equal(sim.run({"a": a, "b": b})["y"], a @ b)


def test_nan_propagates_through_max_relu_and_reductions_as_in_numpy():
    """relu, maximum and a max reduction of NaN give NaN (numpy's maximum), never a
    plausible number: an all-NaN input prints NaN probabilities, not real ones."""
    src = ("import \"popnn\";\ngraph g(tiles = 3) {\n    input x: f32[2, 4];\n    output r = relu(x);\n"
           "    output m = maximum(x, 0.5);\n    output s = max(x, axis = 1);\n    output p = softmax(x);\n}\n")
    x = np.array([[np.nan, 1, -2, 3], [np.nan] * 4], np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        out = sim.run({"x": x})
    np.testing.assert_array_equal(out["r"], np.maximum(x, 0))
    np.testing.assert_array_equal(out["m"], np.maximum(x, 0.5))
    np.testing.assert_array_equal(out["s"], np.max(x, axis=1))
    assert np.isnan(out["p"]).all()


def test_a_round_trip_through_f16_rounds_to_half():
    """f32(f16(x)) inside one fused kernel is x rounded to half, not x; f16() in a
    codelet does the same."""
    src = "graph g(tiles = 4) { input x: f32[64]; output half = f32(f16(x)); }"
    x = (np.arange(64) / 7 + 1e-4).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_array_equal(sim.run({"x": x})["half"], x.astype(np.float16).astype(np.float32))
    from popdsl.codegen.jit import NativeCodelets
    from popdsl.sema import compile_codelets
    [c] = compile_codelets("codelet r(x: f32) -> f32 { return f16(x); }")
    out = np.zeros_like(x)
    NativeCodelets([c]).map("r", out, x)
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))


def test_memory_reuse_keeps_bool_outputs_on_several_tiles():
    """The program a user found zeroed under reuse (bool pad and concat next to an
    i32 op on 7 tiles): the same, right answer with and without reuse."""
    src = ("graph g(tiles = 7) { input x: i32[2, 3]; input b: bool[2, 3]; output o = x + 1; "
           "output p = pad(b, [[1, 0], [0, 1]]); output q = concat([b, b], axis = 0); }")
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    b = np.array([[1, 0, 1], [1, 1, 0]], bool)
    for reuse in (True, False):
        with popdsl.Simulator(popdsl.compile(src, reuse=reuse)) as sim:
            out = sim.run({"x": x, "b": b})
        np.testing.assert_array_equal(out["p"], np.pad(b, ((1, 0), (0, 1))))
        np.testing.assert_array_equal(out["q"], np.concatenate([b, b]))
        np.testing.assert_array_equal(out["o"], x + 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 4), st.integers(1, 9), st.integers(1, 3))
@example(1, 3, 4, 6, 1)
def test_per_channel_operands_read_as_scalars_or_vectors_match_numpy(n, c, h, w, tiles):
    """x * s + b with s, b per channel: vertices inside one channel read s and b as
    scalar fields (a codelet of their own), vertices spanning channels as vectors;
    every element must still be numpy's."""
    src = f"""
graph g(tiles = {tiles}) {{
    input x: f32[{n}, {c}, {h}, {w}];
    input s: f32[{c}, 1, 1];
    input b: f32[{c}, 1, 1];
    output y = x * s + b;
}}
"""
    exe = popdsl.compile(src, cache=False)
    x, s, b = sample("f32", (n, c, h, w), 1), sample("f32", (c, 1, 1), 2), sample("f32", (c, 1, 1), 3)
    with popdsl.Simulator(exe) as sim:
        got = sim.run({"x": x, "s": s, "b": b})["y"]
    # (the host contracts a * b + c into one fused multiply-add: one rounding, not two)
    np.testing.assert_allclose(got, x * s + b, rtol=1e-6, atol=1e-6)
    names = {grp.codelet for cs in exe.ir.compute_sets for grp in cs.groups}
    assert names and all(k.startswith("fused_mul_add_") for k in names)
    if (n, c, h, w, tiles) == (1, 3, 4, 6, 1):          # vertices of 18 over channels of 24
        assert {k.endswith("_s1_2") for k in names} == {True, False}
        # The two vertices spanning two channels read s and b once per channel
        # (first stretch 6 and 12 elements, then 12): no copy of a scale per pixel.
        (cs,) = exe.ir.compute_sets
        seg = [g for g in cs.groups if g.codelet.endswith("_g1_2")]
        assert len(seg) == 1 and len(seg[0].tiles) == 2
        assert cs.pre.exchange_bytes + cs.pre.local_bytes == 0


def test_a_broadcast_operand_is_read_per_stretch_only_where_the_stretches_fit():
    """A per-row scale of a 4 x 4 output (constant over each row), at vertices
    given as runs of output positions: one inside a row reads it as one element;
    one whose rows are cut 2, 4, 1 reads it once per row (first stretch 2, then 4
    each, the last shorter); one cut 4, 2, 4, 1 (unequal middle stretches) and one
    of single elements read it element by element."""
    from popdsl.ir.index import RunBatch, Strided
    from popdsl.passes.fuse import FULL, ONE, SEGMENTS, _choose_modes, _Operand
    scale = Strided(100, (4, 4), (1, 0))               # element 100 + row
    runs = [[(1, 3)], [(2, 2), (4, 4), (8, 1)], [(0, 4), (4, 2), (8, 4), (12, 1)], [(0, 1), (4, 1), (8, 1)]]
    ptr = np.cumsum([0] + [len(r) for r in runs])
    flat = [x for r in runs for x in r]
    y = RunBatch(ptr, np.array([a for a, _ in flat]), np.array([n for _, n in flat]), None)
    op = _Operand(scale, y)
    modes = _choose_modes([op], len(runs))[:, 0].tolist()
    assert modes == [ONE, SEGMENTS, FULL, FULL]
    assert op.seg_first[1] == 2 and op.seg_len[1] == 4
    assert op.connection(ONE, np.array([0])).tolist() == [100]
    assert op.connection(SEGMENTS, np.array([1]))[0].tolist() == [100, 101, 102]
    full = op.connection(FULL, np.array([2, 3]))
    assert full[0].tolist() == [100] * 4 + [101] * 2 + [102] * 4 + [103]
    assert full[1].tolist() == [100, 101, 102]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.sampled_from([1, 2, 5, 39, 40, 45]), st.integers(0, 2**32 - 1))
def test_fused_vertices_are_grouped_by_their_operands_modes_as_distinct_rows_are(nv, n, seed):
    """`_kinds` (one base-3 integer per vertex up to 39 operands, np.unique over
    rows above) gives the distinct rows of the modes in lexicographic order, each
    with the vertices that have it: what np.unique(axis=0) defines."""
    from popdsl.passes.fuse import _kinds
    modes = np.random.default_rng(seed).integers(0, 3, (nv, n)).astype(np.int8)
    modes[nv // 2:] = modes[0]                         # repeated rows, not only distinct ones
    want, which = np.unique(modes, axis=0, return_inverse=True)
    got = list(_kinds(modes))
    assert [kind for _, kind in got] == [tuple(int(x) for x in row) for row in want]
    for j, (rows, _) in enumerate(got):
        assert rows.tolist() == np.nonzero(which.reshape(-1) == j)[0].tolist()


def test_a_fused_op_is_laid_out_like_a_real_operand_not_a_broadcast_scalar():
    """The gradient of sum(x * gy) with respect to x is gy times a broadcast scalar
    (the sum's gradient).  Aligned with that scalar, the whole result sat on the
    scalar's one tile (a 64-channel 56x56 gradient did not fit there); it follows
    gy instead."""
    src = """graph g(tiles = 8) {
    param x: f32[64, 64] = he_normal();
    input gy: f32[64, 64];
    map gy -> linear;
    output dx = grad(sum(x * gy), x);
}"""
    exe = popdsl.compile(src)
    ir = exe.ir
    tiles = {t.name: np.unique(r.addrs // ir.target.tile_memory) for t, r in zip(ir.tensors, ir.tensor_runs)}
    assert tiles["mul.grad"].tolist() == tiles["gy"].tolist() == list(range(8))
    gy = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    with popdsl.Simulator(exe) as sim:
        np.testing.assert_array_equal(sim.run({"gy": gy})["dx"], gy)


def test_batch_statistics_and_weight_gradients_connect_strided_fields_at_any_batch():
    """Batch norm's statistics over (N, H, W) and a convolution's weight gradient
    over images: at batch > 1 one field over images and channels would be no strided
    view (an index array per element: gigabytes for ResNet-50 at batch 8), so the
    reduction runs in two steps (H*W per image and channel, then the images) and the
    weight gradient's plan keeps its fields strided.  The results match numpy."""
    src = """import "popnn";
graph g(tiles = 16) {
    input x: f32[4, 6, 5, 7];
    input y: f32[4, 32, 8, 8];
    param w: f32[32, 32, 3, 3] = he_normal();
    output s = sum(x, axis = [0, 2, 3]);
    output m = max(x, axis = [0, 2, 3], keepdims = true);
    output t = sum(x, axis = [0, 3]);
    output dw = grad(sum(conv2d(y, w, padding = 1)), w);
}"""
    graph = compile_source(src, "<string>", get_target("gc200", tiles=16), stop_after="partition")
    fields = [(cs, grp.codelet, c) for cs in graph.compute_sets.values() for grp in cs.groups
              for c in grp.connections.values()]
    assert any("inner" in cs.name for cs, _, _ in fields)
    for cs, codelet, c in fields:
        if codelet.startswith("Reduce") or codelet == "Conv2dGradW":
            assert isinstance(c, g.Stacked) and isinstance(c.index, Batch), (cs.name, codelet)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6, 5, 7)).astype(np.float32)
    y = rng.standard_normal((4, 32, 8, 8)).astype(np.float32)
    exe = popdsl.compile(src)
    with popdsl.Simulator(exe) as sim:
        out = sim.run({"x": x, "y": y})
    np.testing.assert_allclose(out["s"], x.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["m"], x.max((0, 2, 3), keepdims=True))
    np.testing.assert_allclose(out["t"], x.sum((0, 3)), rtol=1e-5, atol=1e-4)
    # d sum(conv(x, w)) / dw[o, c, i, j] = the sum of x's padded window at (i, j)
    yp = np.pad(y.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.array([[yp[:, :, i:i + 8, j:j + 8].sum((0, 2, 3)) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(out["dw"], np.broadcast_to(win.transpose(2, 0, 1), (32, 32, 3, 3)), rtol=1e-4, atol=1e-3)


def test_rows_longer_than_a_tiles_share_are_reduced_in_blocks_where_they_live():
    """Six rows of 4096 over 16 tiles: each row spans tiles, so it is cut into
    blocks reduced where they live (no vertex receives a whole row), then the
    blocks' partial results are added; the sums match numpy."""
    src = "graph g(tiles = 16) { input x: f32[6, 4096]; map x -> linear; output s = sum(x, axis = 1); }"
    graph = compile_source(src, "<string>", get_target("gc200", tiles=16), stop_after="partition")
    widths = [c.index.shape[-1] for cs in graph.compute_sets.values() for grp in cs.groups
              if grp.codelet.startswith("ReduceSum") for f, c in grp.connections.items() if f == "a"]
    assert any(".partial" in cs for cs in graph.compute_sets) and max(widths) < 4096
    x = np.random.default_rng(5).standard_normal((6, 4096)).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_allclose(sim.run({"x": x})["s"], x.sum(axis=1), rtol=1e-5, atol=1e-3)


def test_long_rows_starting_on_one_tile_are_reduced_spread_over_the_tiles():
    """Four rows of 2048 whose first elements all sit on tile 0: reduced where they
    start, tile 0 would receive all four whole; spread, each tile reduces one."""
    src = """graph g(tiles = 4) {
    input x: f32[4, 2048];
    map x[:, 0:8] -> tile 0;
    map x[:, 8:2048] -> tile 1;
    output s = sum(x, axis = 1);
}"""
    graph = compile_source(src, "<string>", get_target("gc200", tiles=4), stop_after="partition")
    tiles = [t for cs in graph.compute_sets.values() for grp in cs.groups
             if grp.codelet.startswith("ReduceSum") for t in grp.tiles]
    assert sorted(tiles) == [0, 1, 2, 3]
    x = np.random.default_rng(6).standard_normal((4, 2048)).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_allclose(sim.run({"x": x})["s"], x.sum(axis=1), rtol=1e-5, atol=1e-3)


def test_blocks_of_long_rows_starting_on_one_tile_are_spread_over_the_tiles():
    """Eight rows of 4096 over 16 tiles are cut into two blocks each; every block's
    first elements sit on tile 0 and the rest elsewhere.  Reduced where they
    start, tile 0 would receive all sixteen blocks; spread, no tile takes more
    than two (ResNet-50's stem batch norm gradient at batch 8: 401 KB of buffers
    on one tile)."""
    src = """graph g(tiles = 16) {
    input x: f32[8, 4096];
    map x[:, 0:8] -> tile 0;
    map x[:, 2048:2056] -> tile 0;
    map x[:, 8:2048] -> tile 1;
    map x[:, 2056:4096] -> tile 2;
    output s = sum(x, axis = 1);
}"""
    graph = compile_source(src, "<string>", get_target("gc200", tiles=16), stop_after="partition")
    first = [cs for name, cs in graph.compute_sets.items() if ".partial" in name]
    assert len(first) == 1
    tiles = np.concatenate([grp.tiles for grp in first[0].groups])
    assert len(tiles) == 16 and np.bincount(tiles).max() <= 2, np.bincount(tiles)
    x = np.random.default_rng(7).standard_normal((8, 4096)).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_allclose(sim.run({"x": x})["s"], x.sum(axis=1), rtol=1e-5, atol=1e-3)


def test_large_partial_sums_are_added_in_waves_each_spread_over_the_tiles():
    """A matrix product whose reduction is split leaves K copies of its output: a
    tile's share of them beyond WAVE_BYTES is added in several compute sets, each
    over all tiles, so its exchange buffers live one wave at a time (ResNet-50's
    stage-4 weight gradient at batch 8: 51 KB a tile at once)."""
    from popdsl.ops.reduce import WAVE_BYTES
    src = """graph g(tiles = 2) {
    input a: f32[64, 1024];
    input b: f32[1024, 256];
    output y = matmul(a, b);
}"""
    target = get_target("gc200", 2, 8 << 20)
    graph = compile_source(src, "<string>", target, stop_after="partition")
    waves = [cs for name, cs in graph.compute_sets.items()
             if any(grp.codelet.startswith("ReduceSumCols") for grp in cs.groups)]
    assert len(waves) > 1
    for cs in waves:
        assert sorted({int(t) for grp in cs.groups for t in grp.tiles}) == [0, 1]
    # Each wave a part of every tile's columns: the result stays one run a tile
    # (the element-wise ops after it read it by runs, not an index per element).
    (y,) = [v for name, v in graph.outputs if name == "y"]
    m = graph.mappings[y.tensor]
    assert len(m.tiles[m.lengths > 0]) == 2
    exe = popdsl.compile(src, tiles=2, tile_memory=8 << 20, cache=False)
    m = exe.ir.memory
    live = m.timeline_categories["exchange_buffers"]           # over both tiles, at each point
    assert live.max() <= 2 * WAVE_BYTES < m.exchange_buffers.sum()
    rng = np.random.default_rng(8)
    a = rng.standard_normal((64, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 256)).astype(np.float32)
    with popdsl.Simulator(exe) as sim:
        np.testing.assert_allclose(sim.run({"a": a, "b": b})["y"], a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
