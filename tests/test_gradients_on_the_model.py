"""Gradients computed on the IPU model against the reference evaluator.

Programs that output `grad(...)` of convolutions, pooling, gather, views of params
and broadcasts are compiled for a few tile counts and run on the simulator; the
reference evaluator runs the graph the autodiff stage produced.  This checks the
partition rules and codelets of the backward primitives (`ops.conv_grad`,
`place`, `broadcast`); `test_autodiff.py` checks the rules themselves against
finite differences.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import popdsl
from popdsl.ir.target import get_target
from popdsl.ops.evaluate import run_graph
from popdsl.pipeline import compile_source

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
TILES = [1, 7, 64]


def against_reference(src: str, feeds: dict, tiles: int, rtol=1e-4, atol=1e-5):
    graph = compile_source(src, "<string>", get_target("gc200", tiles=tiles), stop_after="autodiff")
    want = run_graph(graph, feeds)
    with popdsl.Simulator(popdsl.compile(src, tiles=tiles)) as sim:
        got = sim.run(feeds)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
    return got


def distinct(shape, seed):
    n = int(np.prod(shape))
    return ((np.random.default_rng(seed).permutation(n) - n / 2) * 0.01).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("tiles", TILES)
@SETTINGS
@given(n=st.integers(1, 3), cg=st.integers(1, 3), og=st.integers(1, 3), groups=st.integers(1, 2),
       hw=st.integers(3, 9), k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1))
def test_conv2d_gradients(tiles, n, cg, og, groups, hw, k, stride, padding):
    c, o = cg * groups, og * groups
    oh, ow = (hw + 2 * padding - k) // stride + 1, (hw + 1 + 2 * padding - k) // stride + 1
    assume(oh >= 1 and ow >= 1)
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[{n}, {c}, {hw}, {hw + 1}];
    input r: f32[{n}, {o}, {oh}, {ow}];
    param x: f32[{n}, {c}, {hw}, {hw + 1}] = zeros();
    param w: f32[{o}, {cg}, {k}, {k}] = normal(0.0, 1.0);
    let y = conv2d(x + xin, w, stride = {stride}, padding = {padding}, groups = {groups});
    let (gx, gw) = grad(sum(y * r), [x, w]);
    output gx;
    output gw;
}}
"""
    rng = np.random.default_rng(n * 100 + hw)
    feeds = {"xin": rng.standard_normal((n, c, hw, hw + 1)).astype(np.float32),
             "r": rng.standard_normal((n, o, oh, ow)).astype(np.float32)}
    against_reference(src, feeds, tiles)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("stride,padding", [(2, 0), (2, 1), (3, 0)])
def test_strided_1x1_conv_gradients(tiles, stride, padding):
    """A strided 1 x 1 kernel reads its input subsampled (forward and weight
    gradient) and, without padding, computes the input's gradient on that grid
    and places it among zeros: ResNet-50's shortcut convolutions, on odd sizes."""
    n, c, o, h, w = 2, 5, 6, 9, 10
    oh, ow = (h + 2 * padding - 1) // stride + 1, (w + 2 * padding - 1) // stride + 1
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[{n}, {c}, {h}, {w}];
    input r: f32[{n}, {o}, {oh}, {ow}];
    param x: f32[{n}, {c}, {h}, {w}] = zeros();
    param w: f32[{o}, {c}, 1, 1] = normal(0.0, 1.0);
    let y = conv2d(x + xin, w, stride = {stride}, padding = {padding});
    let (gx, gw) = grad(sum(y * r), [x, w]);
    output y;
    output gx;
    output gw;
}}
"""
    rng = np.random.default_rng(stride * 10 + padding)
    feeds = {"xin": rng.standard_normal((n, c, h, w)).astype(np.float32),
             "r": rng.standard_normal((n, o, oh, ow)).astype(np.float32)}
    against_reference(src, feeds, tiles)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("kind", ["max", "avg"])
@SETTINGS
@given(n=st.integers(1, 2), c=st.integers(1, 4), hw=st.integers(2, 9), k=st.integers(1, 3),
       stride=st.integers(1, 3), padding=st.integers(0, 1))
def test_pooling_gradients(tiles, kind, n, c, hw, k, stride, padding):
    assume(2 * padding <= k <= hw + 2 * padding)
    oh = (hw + 2 * padding - k) // stride + 1
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[{n}, {c}, {hw}, {hw}];
    input r: f32[{n}, {c}, {oh}, {oh}];
    param x: f32[{n}, {c}, {hw}, {hw}] = zeros();
    let y = {kind}_pool2d(x + xin, {k}, stride = {stride}, padding = {padding});
    output gx = grad(sum(y * r), x);
}}
"""
    feeds = {"xin": distinct((n, c, hw, hw), hw), "r": np.random.default_rng(c).standard_normal((n, c, oh, oh)).astype(np.float32)}
    against_reference(src, feeds, tiles)


@pytest.mark.parametrize("k, stride, padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_gradient_split_into_row_blocks(k, stride, padding):
    """Few channels on many tiles: the gradient's padded rows are split into blocks,
    each gathering the windows that reach it (MaxPoolGradRows), and a maximum in a
    window that straddles two blocks goes to the block holding it, once."""
    n, c, hw = 1, 2, 24
    oh = (hw + 2 * padding - k) // stride + 1
    src = f"""graph g(tiles = 64) {{
    input xin: f32[{n}, {c}, {hw}, {hw}];
    input r: f32[{n}, {c}, {oh}, {oh}];
    param x: f32[{n}, {c}, {hw}, {hw}] = zeros();
    let y = max_pool2d(x + xin, {k}, stride = {stride}, padding = {padding});
    output gx = grad(sum(y * r), x);
}}
"""
    exe = popdsl.compile(src, tiles=64)
    rows = [gr for cs in exe.ir.compute_sets for gr in cs.groups if gr.codelet.startswith("MaxPoolGradRows")]
    assert sum(len(gr.tiles) for gr in rows) >= 8
    feeds = {"xin": distinct((n, c, hw, hw), hw), "r": np.random.default_rng(k).standard_normal((n, c, oh, oh)).astype(np.float32)}
    against_reference(src, feeds, 64)


def test_max_pool_gradient_goes_to_the_first_maximum():
    """Ties: the window's gradient goes to its first maximum in row order."""
    src = """graph g(tiles = 2) {
    param x: f32[1, 1, 2, 4] = zeros();
    output gx = grad(sum(max_pool2d(x, 2)), x);
}
"""
    with popdsl.Simulator(popdsl.compile(src, tiles=2)) as sim:
        gx = sim.run()["gx"]
    np.testing.assert_array_equal(gx[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("tiles", TILES)
def test_gather_gradient_adds_rows_gathered_twice(tiles):
    src = f"""graph g(tiles = {tiles}) {{
    input idx: i32[5];
    input r: f32[5, 3];
    param table: f32[4, 3] = normal(0.0, 1.0);
    output gt = grad(sum(gather(table, idx) * r), table);
}}
"""
    idx = np.array([1, -1, 1, 0, 3], np.int32)
    r = np.arange(15, dtype=np.float32).reshape(5, 3)
    got = against_reference(src, {"idx": idx, "r": r}, tiles)["gt"]
    want = np.zeros((4, 3), np.float32)
    np.add.at(want, idx % 4, r)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tiles", TILES)
def test_views_of_params_and_broadcasts(tiles):
    """reshape(gamma, ...) and w[1:3] are views of params (view leaves): their
    gradients go back with `place`; a sum's gradient is a broadcast view."""
    src = f"""graph g(tiles = {tiles}) {{
    input x: f32[2, 3, 4, 4];
    param gamma: f32[3] = normal(0.0, 1.0);
    param w: f32[4, 5] = normal(0.0, 1.0);
    let y = x * reshape(gamma, [3, 1, 1]);
    let z = reshape(y, [24, 4]) @ w;
    let loss = sum(square(z[:, 1:3])) + sum(w[1:3]) * 0.5 + mean(y, axis = [0, 2, 3])[1];
    let (gg, gw) = grad(loss, [gamma, w]);
    output gg;
    output gw;
}}
"""
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)
    against_reference(src, {"x": x}, tiles, rtol=2e-4)


@pytest.mark.parametrize("tiles", [7, 64])
def test_conv2d_weight_gradient_split_over_rows(tiles):
    """One image whose padded channel (122 x 122 floats, 59.5 KB) is more than a
    vertex may take: the weight gradient sums over blocks of output rows, each a
    partial sum (ResNet-50's stem at batch 1 needs this)."""
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[1, 2, 120, 120];
    input r: f32[1, 4, 120, 120];
    param w: f32[4, 2, 3, 3] = normal(0.0, 1.0);
    let gw = grad(sum(conv2d(xin, w, stride = 1, padding = 1) * r), w);
    output gw;
}}
"""
    parted = compile_source(src, "<string>", get_target("gc200", tiles=tiles), stop_after="partition")
    assert any(t.name.endswith("conv2d.grad.partial") for t in parted.tensors), [t.name for t in parted.tensors]
    feeds = {"xin": distinct((1, 2, 120, 120), 1), "r": distinct((1, 4, 120, 120), 2)}
    against_reference(src, feeds, tiles, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("tiles", [7, 64])
@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_conv2d_input_gradient_split_over_rows(tiles, k, stride, padding):
    """An input gradient whose padded image is more than a vertex may hold: blocks of
    padded rows, each gathering the output rows whose windows reach it (Conv2dGradXRows),
    strided and padded alike."""
    hw = 120
    oh = (hw + 2 * padding - k) // stride + 1
    src = f"""graph g(tiles = {tiles}) {{
    input xin: f32[1, 2, {hw}, {hw}];
    input r: f32[1, 3, {oh}, {oh}];
    param x: f32[1, 2, {hw}, {hw}] = zeros();
    param w: f32[3, 2, {k}, {k}] = normal(0.0, 1.0);
    let gx = grad(sum(conv2d(x + xin, w, stride = {stride}, padding = {padding}) * r), x);
    output gx;
}}
"""
    parted = compile_source(src, "<string>", get_target("gc200", tiles=tiles), stop_after="partition")
    used = {grp.codelet for cs in parted.compute_sets.values() for grp in cs.groups}
    assert "Conv2dGradXRows" in used
    feeds = {"xin": distinct((1, 2, hw, hw), 1), "r": distinct((1, 3, oh, oh), 2)}
    against_reference(src, feeds, tiles, rtol=1e-3, atol=1e-3)


def test_conv2d_input_gradient_of_a_big_batch_shares_weight_blocks(monkeypatch):
    """More images than the tiles have workers (2 tiles, batch 16): no plan has one
    vertex per worker, so the input's gradient runs tasks of one block of w
    together on a tile (`blocks.Split.runs`, each tile receiving that block once), and
    the gradient still matches the reference."""
    from popdsl.ops import conv_grad
    plans = []
    real = conv_grad.split_plan
    monkeypatch.setattr(conv_grad, "split_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    src = """graph g(tiles = 2) {
    input xin: f32[16, 8, 6, 6];
    input r: f32[16, 8, 6, 6];
    param x: f32[16, 8, 6, 6] = zeros();
    param w: f32[8, 8, 3, 3] = normal(0.0, 1.0);
    let gx = grad(sum(conv2d(x + xin, w, stride = 1, padding = 1) * r), x);
    output gx;
}
"""
    compile_source(src, "<string>", get_target("gc200", tiles=2), stop_after="partition")
    assert any(p.runs for p in plans), plans
    feeds = {"xin": distinct((16, 8, 6, 6), 1), "r": distinct((16, 8, 6, 6), 2)}
    against_reference(src, feeds, 2, rtol=1e-3, atol=1e-3)


def test_input_gradient_plan_at_batch_32_keeps_a_weight_block_per_run():
    """ResNet-50's stage-4 shortcut (1 x 1, 1024 -> 2048 at 7 x 7) at batch 32 on 368
    tiles: the fastest plans of one vertex per worker each take a 256 KB block of
    w (1.5 MB of a tile at the training step's peak); PopLibs' doubling memory
    target picks one whose tasks share a block of w on a tile, receiving less."""
    import types
    from popdsl.ops import conv_grad
    p = types.SimpleNamespace(tiles=368, g=types.SimpleNamespace(target=get_target("gc200")))
    N, O, C, H = 32, 2048, 1024, 7

    def moved(rb, cb, ob):
        return ob * rb * H * 4 + ob * cb * 4, max(cb * rb * H, ob * rb * H) * 4, cb * rb * H * 4

    def macs(rb, cb, ob):
        return cb * ob * rb * H
    args = dict(partial_dims=(2,), partial_bytes=N * C * H * H * 4)
    alone = conv_grad.split_plan(p, N, (H, C, O), moved, macs, **args)
    shared = conv_grad.split_plan(p, N, (H, C, O), moved, macs, **args,
                                   share=lambda splits, rb, cb, ob: (ob * cb * 4, N * splits[0]))
    assert not alone.runs and shared.runs

    def tile_bytes(plan):
        rb, cb, ob = (-(-n // k) for n, k in zip((H, C, O), plan.splits))
        per_tile = -(-N * int(np.prod(plan.splits)) // 368)
        received, _, produced = moved(rb, cb, ob)
        if plan.runs:
            w = ob * cb * 4
            received -= w
            return min(per_tile, 1 + -(-(per_tile - 1) // (N * plan.splits[0]))) * w + per_tile * (received + produced)
        return per_tile * (received + produced)
    assert tile_bytes(shared) < tile_bytes(alone) / 1.5, (shared, alone)
