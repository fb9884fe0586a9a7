"""Every tensor primitive against numpy, on random shapes, on 1, 7 and 1472 tiles.

Each case writes a small tensor program, compiles it for the tile count, feeds
random inputs and compares the outputs with the numpy expression that defines the
primitive (f32, rtol 1e-5 unless a comment says why not).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

import popdsl

TILES = [1, 7, 1472]
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))


def run(body: str, inputs: dict[str, np.ndarray], tiles: int, outputs=("y",), head: str = ""):
    decl = "\n".join(f"    input {k}: {_dt(v)}{list(v.shape) if v.shape else ''};".replace("[]", "")
                     for k, v in inputs.items())
    src = f"{head}\ngraph g(tiles = {tiles}) {{\n{decl}\n{body}\n}}\n"
    exe = popdsl.compile(src)
    with popdsl.Simulator(exe, threads=2) as sim:
        out = sim.run(inputs)
    return [out[o] for o in outputs]


def _dt(a: np.ndarray) -> str:
    return {np.float32: "f32", np.int32: "i32", np.bool_: "bool"}[a.dtype.type]


def rnd(shape, seed=0, lo=-2.0, hi=2.0):
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(np.float32)


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=6),
       op=st.sampled_from(["+", "-", "*", "/", "max", "min", "<", ">=", "=="]))
def test_binary_broadcasting(tiles, shapes, op):
    (sa, sb), _ = shapes
    a, b = rnd(sa, 1), rnd(sb, 2)
    b = np.where(np.abs(b) < 0.1, 0.5, b).astype(np.float32)
    expr = f"{op}(a, b)" if op in ("max", "min") else f"a {op} b"
    (y,) = run(f"    output y = {expr};", {"a": a, "b": b}, tiles)
    ref = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "max": np.maximum,
           "min": np.minimum, "<": np.less, ">=": np.greater_equal, "==": np.equal}[op](a, b)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_allclose(y, ref, rtol=1e-5)


UNARY = {"exp": np.exp, "tanh": np.tanh, "sin": np.sin, "cos": np.cos, "abs": np.abs, "floor": np.floor,
         "ceil": np.ceil, "relu": lambda x: np.maximum(x, 0), "square": np.square,
         "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "sqrt": lambda x: np.sqrt(np.abs(x)),
         "log": lambda x: np.log(np.abs(x) + 1)}


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(shape=array_shapes(min_dims=0, max_dims=3, max_side=7), fn=st.sampled_from(sorted(UNARY)))
def test_unary_math(tiles, shape, fn):
    x = rnd(shape, 3)
    arg = {"sqrt": "abs(x)", "log": "abs(x) + 1.0"}.get(fn, "x")
    (y,) = run(f"    output y = {fn}({arg});", {"x": x}, tiles)
    # libm and numpy's SIMD transcendental functions differ in the last bits.
    np.testing.assert_allclose(y, UNARY[fn](x.astype(np.float64)), rtol=2e-6, atol=1e-6)


def test_fused_chain_is_one_codelet_and_matches():
    x, b = rnd((4, 33), 4), rnd((33,), 5)
    src = "graph g(tiles = 7) { input x: f32[4, 33]; input b: f32[33]; output y = tanh(x * 2.0 + b) - x / 3.0; }"
    exe = popdsl.compile(src)
    ew = [c for c in exe.ir.codelets if c.startswith("fused_")]
    assert len(ew) == 1, ew                     # the whole chain is one vertex loop
    with popdsl.Simulator(exe) as sim:
        y = sim.run({"x": x, "b": b})["y"]
    np.testing.assert_allclose(y, np.tanh(x * 2 + b) - x / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=9), data=st.data(),
       op=st.sampled_from(["sum", "mean", "max", "min", "argmax"]))
def test_reductions(tiles, shape, data, op):
    x = rnd(shape, 6)
    if op == "argmax":
        axis = data.draw(st.integers(0, len(shape) - 1))
        (y,) = run(f"    output y = argmax(x, axis = {axis});", {"x": x}, tiles)
        np.testing.assert_array_equal(y, np.argmax(x, axis=axis))
        return
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True, max_size=len(shape)))
    keep = data.draw(st.booleans())
    ax = f"[{', '.join(map(str, axes))}]" if axes else "[0]"
    axes = axes or [0]
    (y,) = run(f"    output y = {op}(x, axis = {ax}, keepdims = {str(keep).lower()});", {"x": x}, tiles)
    ref = getattr(np, op)(x.astype(np.float64), axis=tuple(axes), keepdims=keep)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles, split", [(64, True), (4, True), (3, False)])
def test_long_reduction_uses_partial_sums(tiles, split):
    """Two long rows on 64 tiles are summed in two compute sets, through a
    `.partial` tensor of one sum per block of each row, and on 4 tiles (two a row,
    each row longer than a tile's share); on 3 tiles (fewer than two a row) in
    one.  All give numpy's sums."""
    x = rnd((2, 8192), 7, 0, 1)
    exe = popdsl.compile(f"graph g(tiles = {tiles}) {{ input x: f32[2, 8192]; output y = sum(x, axis = 1); }}")
    (op,) = [o for o in exe.ir.ops if o["op"] == "reduce"]
    partial = [t for t in exe.ir.tensors if t.name.endswith(".partial")]
    if split:
        assert len(op["compute_sets"]) == 2, op
        (p,) = partial
        assert p.shape[0] == 2 and p.shape[1] > 1, p.shape        # per row, several blocks
        first, second = (exe.ir.compute_sets[i] for i in op["compute_sets"])
        assert first.name.endswith(".partial.1") and sum(len(g.tiles) for g in first.groups) == 2 * p.shape[1]
    else:
        assert len(op["compute_sets"]) == 1 and not partial, (op, partial)
    with popdsl.Simulator(exe, threads=2) as sim:
        y = sim.run({"x": x})["y"]
    np.testing.assert_allclose(y, x.astype(np.float64).sum(1), rtol=1e-5)


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40),
       batch=st.sampled_from([(), (3,), (2, 1)]))
def test_matmul(tiles, m, k, n, batch):
    a, b = rnd(batch + (m, k), 8), rnd((k, n) if batch != (2, 1) else (3, k, n), 9)
    (y,) = run("    output y = a @ b;", {"a": a, "b": b}, tiles)
    ref = np.matmul(a.astype(np.float64), b.astype(np.float64))
    # Sums of k products in f32 in another order than numpy's: error grows with k.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * k)


def test_matmul_workers_share_their_a_block(monkeypatch):
    """A tile's matmul block is split into bands of columns for its workers; they
    read one exchanged copy of the a block (the AMP's held block is the same for
    all), so the exchange is what one vertex per tile would need while the tile's
    estimated compute time drops."""
    from popdsl.ops import linalg
    src = """graph g(tiles = 4) {
    input a: f32[16, 48];
    input b: f32[48, 128];
    output y = a @ b;
}"""
    a, b = rnd((16, 48), 3), rnd((48, 128), 4)

    def measure():
        exe = popdsl.compile(src)
        with popdsl.Simulator(exe) as sim:
            y = sim.run({"a": a, "b": b})["y"]
        rows = {r["op"]: r for r in exe.partition_report().rows}
        return y, rows["matmul"]
    y, split = measure()
    monkeypatch.setattr(linalg, "_worker_cols", lambda c0, c1, w: (np.arange(len(c0)), c0, c1))
    y1, single = measure()
    np.testing.assert_allclose(y, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    # The same sums in the same order; a driver specialised to other sizes may fuse
    # other multiply-adds (FMA contraction), so equal within f32 rounding.
    np.testing.assert_allclose(y, y1, rtol=1e-6, atol=1e-6)
    assert split["vertices"] > single["vertices"]
    assert split["exchange_bytes"] == single["exchange_bytes"]
    assert split["max_cycles"] < 0.6 * single["max_cycles"]


def test_only_read_buffers_with_the_same_elements_on_one_tile_are_shared():
    """Vertices needing a buffer share one only when on one tile and reading the same
    runs of elements; written buffers (no keys: lowering hashes only what is read)
    are never shared."""
    from popdsl.passes.shared_buffers import RunKeys, run_keys, shared_buffers
    tiles = np.array([0, 0, 0, 1, 1])
    # Five vertices of two runs each: 0 and 1 read the same runs, 2 other runs, 3
    # the same as 0 but on tile 1, 4 differs from 3 in one run's length.
    ptr = np.array([0, 2, 4, 6, 8, 10])
    rs = np.array([5, 20, 5, 20, 6, 20, 5, 20, 5, 20])
    rl = np.array([4, 4, 4, 4, 4, 4, 4, 4, 4, 3])
    rows = np.arange(5)
    keys = RunKeys.of(tiles, ptr, rs, rl, rows)
    own, share = shared_buffers(keys, ptr, rs, rl, rows)
    assert own.tolist() == [0, 2, 3, 4] and share.tolist() == [0, 0, 1, 2, 3]
    own, share = shared_buffers(None, ptr, rs, rl, rows)
    assert own.tolist() == share.tolist() == [0, 1, 2, 3, 4]
    # A subset's keys are the keys its vertices get hashed alone.
    sub = keys.subset(np.array([4, 1]))
    key, counts = run_keys(tiles[[4, 1]], ptr, rs, rl, rows[[4, 1]])
    assert sub.key.tolist() == key.tolist() and sub.counts.tolist() == counts.tolist() == [2, 2]
    assert sub.tiles.tolist() == [1, 0]


def test_worker_cols_are_bands_of_at_least_eight_columns():
    from popdsl.ops.linalg import _worker_cols

    def bands(c0, c1, workers):
        task, s0, s1 = _worker_cols(np.array([c0, 0]), np.array([c1, 8]), workers)
        assert task[-1] == 1 and (s0[-1], s1[-1]) == (0, 8)       # a second task, after the first's bands
        return list(zip(s0[:-1].tolist(), s1[:-1].tolist()))
    assert bands(0, 16, 6) == [(0, 8), (8, 16)]
    assert bands(8, 21, 6) == [(8, 21)]
    assert bands(0, 3, 6) == [(0, 3)]
    assert bands(0, 64, 6) == [(0, 10), (10, 21), (21, 32), (32, 42), (42, 53), (53, 64)]
    assert bands(0, 64, 1) == [(0, 64)]


@SETTINGS
@given(m=st.integers(1, 6), k=st.integers(1, 90), n=st.integers(1, 120))
def test_matmul_with_a_transposed_operand(m, k, n):
    """x @ wᵀ (a dense layer's input gradient) and vᵀ @ xᵀ: computed as the product
    of the operands as stored, (w xᵀ)ᵀ and (x v)ᵀ, when fewer elements then reach
    the tiles one at a time (AlexNet's dense layers); the same values, and never
    more copy runs."""
    from popdsl.ops import linalg
    x, w, v = rnd((m, k), 5), rnd((n, k), 6), rnd((k, n), 7)
    src = f"""graph g(tiles = 16) {{
    input x: f32[{m}, {k}];
    input w: f32[{n}, {k}];
    input v: f32[{k}, {n}];
    output y = x @ transpose(w);
    output z = transpose(v) @ transpose(x);
}}"""

    def runs():
        exe = popdsl.compile(src, cache=False)
        with popdsl.Simulator(exe) as sim:
            out = sim.run({"x": x, "w": w, "v": v})
        np.testing.assert_allclose(out["y"], x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-6 * k)
        np.testing.assert_allclose(out["z"], (x.astype(np.float64) @ v).T, rtol=1e-5, atol=1e-6 * k)
        return all_runs(exe)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "_copy_first", lambda index, readers: False)
        mp.setattr(linalg, "SWAP_SHARE", 0)         # whatever the copies' share of a tile
        chosen = runs()
        mp.setattr(linalg, "_scattered", lambda index: 0)       # never transposed
        direct = runs()
    assert chosen <= direct, (chosen, direct)
    if n * k >= 64 * m:
        assert chosen < direct
    # By default only copies that would fill more than SWAP_SHARE of the tiles
    # re-plan a product (these are far smaller); a scattered operand several blocks
    # read is copied into rows first: never more runs.
    assert runs() <= direct


def all_runs(exe) -> int:
    """Copy runs of an executable: into and out of its compute sets, and its copies."""
    return sum(int(c.src.size) for cs in exe.ir.compute_sets for c in (cs.pre, cs.post)) \
        + sum(int(c.src.size) for c in exe.ir.copies)


def test_a_scattered_operand_read_by_several_blocks_is_copied_into_rows_once():
    """xᵀ @ g (a dense layer's weights' gradient): every column block of the grid
    reads xᵀ, whose rows are x's columns.  Copied into rows first, its elements go
    one at a time once, not once per column block; the same values."""
    from popdsl.ops import linalg
    x, gr = rnd((4, 64), 8), rnd((4, 2048), 9)
    src = """graph g(tiles = 64) {
    input x: f32[4, 64];
    input gr: f32[4, 2048];
    output dw = transpose(x) @ gr;
}"""

    def build():
        exe = popdsl.compile(src, cache=False)
        with popdsl.Simulator(exe) as sim:
            out = sim.run({"x": x, "gr": gr})
        np.testing.assert_allclose(out["dw"], x.T.astype(np.float64) @ gr, rtol=1e-5, atol=1e-6)
        return exe
    exe = build()
    assert any(t.name.endswith(".a") and t.shape == (64, 4) for t in exe.ir.tensors)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "_copy_first", lambda index, readers: False)
        direct = build()
    assert 3 * all_runs(exe) < all_runs(direct), (all_runs(exe), all_runs(direct))     # 1,468 vs 5,248


def test_matmul_vector_forms():
    a, v = rnd((5, 7), 1), rnd((7,), 2)
    y1, y2 = run("    output y1 = a @ v;\n    output y2 = v @ transpose(a, [1, 0]);",
                 {"a": a, "v": v}, 7, ("y1", "y2"))
    np.testing.assert_allclose(y1, a @ v, rtol=1e-5)
    np.testing.assert_allclose(y2, v @ a.T, rtol=1e-5)


@st.composite
def conv_params(draw):
    """Only valid convolutions: channels divisible by the groups (an input of at
    least 3 rows always holds a kernel of at most 3)."""
    groups = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([x for x in (1, 2, 4) if x % groups == 0]))
    o = draw(st.sampled_from([x for x in (1, 2, 4) if x % groups == 0]))
    return (draw(st.integers(1, 2)), c, o, draw(st.integers(3, 9)), draw(st.sampled_from([1, 2, 3])),
            draw(st.integers(1, 2)), draw(st.integers(0, 1)), groups)


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(params=conv_params())
def test_conv2d(tiles, params):
    n, c, o, hw, k, stride, pad, groups = params
    x, w = rnd((n, c, hw, hw), 10), rnd((o, c // groups, k, k), 11)
    (y,) = run(f"    output y = conv2d(x, w, stride = {stride}, padding = {pad}, groups = {groups});",
               {"x": x, "w": w}, tiles)
    np.testing.assert_allclose(y, conv_ref(x, w, stride, pad, groups), rtol=1e-5, atol=1e-5)


def conv_ref(x, w, s, p, groups):
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (h - kh) // s + 1, (wd - kw) // s + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for oc in range(o):
        g0 = (oc // og) * cg
        for i in range(oh):
            for j in range(ow):
                patch = x[:, g0:g0 + cg, i * s:i * s + kh, j * s:j * s + kw]
                y[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3))
    return y


@st.composite
def pool_params(draw):
    """Only valid poolings: padding at most half the window, the padded input at
    least one window."""
    k = draw(st.integers(1, 3))
    pad = draw(st.integers(0, min(1, k // 2)))
    hw = draw(st.integers(max(2, k - 2 * pad), 9))
    return draw(st.integers(1, 3)), hw, k, draw(st.integers(1, 3)), pad, draw(st.sampled_from(["max", "avg"]))


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(params=pool_params())
def test_pooling(tiles, params):
    c, hw, k, stride, pad, kind = params
    x = rnd((2, c, hw, hw), 12)
    (y,) = run(f"    output y = {kind}_pool2d(x, {k}, stride = {stride}, padding = {pad});", {"x": x}, tiles)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    oh = (hw + 2 * pad - k) // stride + 1
    ref = np.zeros((2, c, oh, oh))
    for i in range(oh):
        for j in range(oh):
            win = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            ref[:, :, i, j] = win.max(axis=(2, 3)) if kind == "max" else win.mean(axis=(2, 3))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tiles", TILES)
def test_shape_operations(tiles):
    a, b = rnd((2, 3, 4), 13), rnd((2, 5, 4), 14)
    idx = np.array([2, 0, 1, 2], np.int32)
    labels = np.array([1, 0, 3], np.int32)
    outs = run("""
    output r = reshape(a, [4, -1]);
    output t = transpose(a, [2, 0, 1]);
    output s = slice(a, axis = 2, start = 1, stop = 3);
    output ix = a[1, 1:3];
    output c = concat([a, b], axis = 1);
    output p = pad(a, [[0, 0], [1, 2], [0, 1]], value = 9.0);
    output gth = gather(a, idx, axis = 1);
    output oh = one_hot(labels, 4);
    output ft = f32(i32(a * 3.0));
""", {"a": a, "b": b, "idx": idx, "labels": labels}, tiles, ("r", "t", "s", "ix", "c", "p", "gth", "oh", "ft"))
    refs = [a.reshape(4, -1), a.transpose(2, 0, 1), a[:, :, 1:3], a[1, 1:3], np.concatenate([a, b], 1),
            np.pad(a, [[0, 0], [1, 2], [0, 1]], constant_values=9.0), np.take(a, idx, axis=1),
            np.eye(4, dtype=np.float32)[labels], np.trunc(a * 3).astype(np.float32)]
    for y, ref in zip(outs, refs):
        np.testing.assert_allclose(y, ref, rtol=1e-6)


def test_integer_and_bool_operations():
    a = np.array([[-7, 3], [8, -2]], np.int32)
    b = np.array([2, -3], np.int32)
    q, r, m, sel = run("""
    output q = a / b;
    output r = a % b;
    output m = sum(a, axis = 0);
    output sel = select(a > b && !(a == 3), a, b * 10);
""", {"a": a, "b": b}, 7, ("q", "r", "m", "sel"))
    np.testing.assert_array_equal(q, np.trunc(a / b).astype(np.int32))   # truncating, as in C
    np.testing.assert_array_equal(r, a - np.trunc(a / b).astype(np.int32) * b)
    np.testing.assert_array_equal(m, a.sum(0))
    np.testing.assert_array_equal(sel, np.where((a > b) & ~(a == 3), a, b * 10))


def test_scalar_codelet_is_an_elementwise_function():
    head = """codelet gelu(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh(0.7978845608 * (x + 0.044715 * x * x * x)));
}"""
    x = rnd((3, 50), 15)
    (y,) = run("    output y = gelu(x) + 1.0;", {"x": x}, 7, head=head)
    xd = x.astype(np.float64)
    ref = 0.5 * xd * (1 + np.tanh(0.7978845608 * (xd + 0.044715 * xd ** 3))) + 1
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def conv_ref_fast(x, w, s, p):
    from numpy.lib.stride_tricks import sliding_window_view
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::s, ::s]     # n c oh ow kh kw
    return np.einsum("ncijab,ocab->noij", win, w.astype(np.float64))


@pytest.mark.parametrize("tiles", [16, 1472])
def test_large_conv_splits_input_channels_and_rows(tiles):
    """A convolution whose input does not fit one vertex: the plan splits input
    channels (partial sums added on the tiles) and output rows."""
    from popdsl.ops import blocks
    x, w = rnd((1, 64, 20, 20), 16), rnd((32, 64, 3, 3), 17)
    src = f"graph g(tiles = {tiles}) {{ input x: f32[1, 64, 20, 20]; input w: f32[32, 64, 3, 3];" \
          " output y = conv2d(x, w, stride = 1, padding = 1); }"
    exe = popdsl.compile(src)
    assert any(t.name.endswith("conv2d.partial") for t in exe.ir.tensors), "expected an input-channel split"
    assert 64 * 22 * 22 * 4 > blocks.SLAB_BYTES
    with popdsl.Simulator(exe) as sim:
        y = sim.run({"x": x, "w": w})["y"]
    np.testing.assert_allclose(y, conv_ref_fast(x, w, 1, 1), rtol=1e-4, atol=1e-4)


def test_number_next_to_a_tensor_takes_its_type():
    x = rnd((6,), 18)
    (y,) = run("    output y = select(x > 0.0, x, 1) + pow(abs(x), 2) + max(1, x);", {"x": x}, 7)
    ref = np.where(x > 0, x, 1) + np.abs(x.astype(np.float64)) ** 2 + np.maximum(1, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5)


def test_a_view_of_a_param_reaches_an_elementwise_op_by_runs():
    """reshape(beta, [C, 1, 1]) (batch norm's shift) is a view leaf, an index array
    per element as elaborated; the partitioner reads it as a strided view, so the
    element-wise op's operands travel as runs, not as one copy per element of the
    output (ResNet-50's stem: 1.6M four-byte copies a step at batch 2)."""
    beta = rnd((16,), 3)
    x = rnd((2, 16, 12, 12), 4)
    src = """graph g(tiles = 8) {
    input x: f32[2, 16, 12, 12];
    param beta: f32[16] = zeros();
    output y = relu(x * 2.0 + reshape(beta, [16, 1, 1]));
}"""
    exe = popdsl.compile(src, cache=False)
    with popdsl.Simulator(exe) as sim:
        sim.write("beta", beta)
        out = sim.run({"x": x})
    np.testing.assert_allclose(out["y"], np.maximum(x * 2 + beta[:, None, None], 0), rtol=1e-6)
    assert all_runs(exe) < x.size // 16, all_runs(exe)


def test_a_plan_with_no_field_within_the_slab_has_at_most_a_task_per_worker():
    """When no split makes a vertex's fields fit SLAB_BYTES (a big batch on few
    tiles), the backward convolutions take the smallest fields among plans of at
    most one task per worker, not the smallest fields at any count (at batch 32 on
    368 tiles, 235M tasks for one weight gradient)."""
    from popdsl.ops import blocks
    src = """graph g(tiles = 4) {
    input xin: f32[8, 16, 12, 12];
    param x: f32[8, 16, 12, 12] = zeros();
    param w: f32[16, 16, 3, 3] = normal(0.0, 1.0);
    let (gx, gw) = grad(sum(conv2d(x + xin, w, padding = 1)), [x, w]);
    output gx;
    output gw;
}"""
    from popdsl.ir.target import get_target
    from popdsl.pipeline import compile_source
    target = get_target("gc200", tiles=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks, "SLAB_BYTES", 4)             # no plan fits (blocks.split_plan)
        graph = compile_source(src, "<string>", target, stop_after="partition")
    seen = set()
    for cs in graph.compute_sets.values():
        for gr in cs.groups:
            if gr.codelet.startswith(("Conv2dGradW", "Conv2dGradX")):
                seen.add(gr.codelet.removesuffix("Rows"))
                assert len(gr) <= 4 * target.workers, (cs.name, gr.codelet, len(gr))
    assert seen == {"Conv2dGradW", "Conv2dGradX"}
