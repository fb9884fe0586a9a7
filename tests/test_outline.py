"""Outlining (popdsl/passes/outline.py; README "Built once, called many times"):
repeated parts of a program — def calls, loop iterations, statements alike — are
built once and called.  The numbers are the same as without, forward and trained;
the graph holds fewer vertices; the functions show in the reports and `.popx`."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from popdsl import api, artifact
from popdsl.ir.target import get_target
from popdsl.passes import outline as ol
from popdsl.passes.liveness import liveness
from popdsl.passes.recompute import Policy
from popdsl.report.memory import memory_report
from popdsl import pipeline

from test_cli import _tampered, popc  # noqa: F401  (a fixture)

BLOCKS = """import "popnn";
def block(x: f32[N, C, H, W]) -> f32[N, C, H, W] {
    let a = relu(conv_bn(x, C, 3, 1, 1));
    return relu(x + conv_bn(a, C, 3, 1, 1));
}

graph blocks(tiles = 16) {
    input image: f32[2, 8, 8, 8];
    let h = block(image);
    h = block(h);
    h = block(h);
    h = block(h);
    output y = h;
}
"""

# No def of the user's: four layers alike, each a statement, trained.
LAYERS = "\n".join(f"    let h{i} = relu(conv_bn(h{i - 1}, 8, 3, 1, 1));" for i in range(1, 5))
TRAIN = f"""import "popnn";
graph deep(tiles = 16) {{
    input x: f32[2, 8, 8, 8];
    input labels: i32[2];
    let h0 = x;
{LAYERS}
    let logits = dense(reshape(avg_pool2d(h4, 8), [2, 8]), 10);
    let loss = mean(cross_entropy(logits, labels));
    output loss;
    minimize loss with sgd(lr = 0.05, momentum = 0.9);
}}
"""

RNN = """graph rnn(tiles = 8) {
    input x: f32[16, 32];
    param w: f32[32, 32] = normal(0.0, 0.1);
    param u: f32[32, 32] = normal(0.0, 0.1);
    let h = x;
    for t in 0..6 {
        h = tanh(h @ w + x @ u);
    }
    output y = h;
}
"""


def build(src: str, outline: bool, recompute: str = "auto"):
    exe, native = pipeline.compile_source(src, "t.pop", get_target(), outline=outline, verify=True,
                                          recompute=Policy(recompute))
    return api.Executable(exe, native)


def feeds(exe, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 10, s).astype(np.int32) if d == "i32" else rng.standard_normal(s).astype(np.float32)
            for n, (d, s) in exe.inputs.items()}


@pytest.fixture(scope="module")
def blocks():
    return build(BLOCKS, True), build(BLOCKS, False)


def test_repeated_def_calls_are_one_function_with_the_same_results(blocks):
    a, b = blocks
    (f,) = a.ir.functions
    assert (f["name"], f["calls"]) == ("block", 4) and f["instances"] == [f"block_{i}" for i in range(1, 5)]
    assert b.ir.functions == []
    sa, sb = api.Simulator(a, threads=2), api.Simulator(b, threads=2)
    x = feeds(a)
    ya, yb = sa.run(x)["y"], sb.run(x)["y"]
    assert np.array_equal(ya, yb) and np.abs(ya).sum() > 0
    # Each call runs the same compute sets, for the same cycles; what calls add is
    # their copies, an exchange phase and a sync each (on these small blocks 15 % of
    # the time the AMP leaves).
    assert len(a.ir.compute_sets) * 4 == len(b.ir.compute_sets)
    assert sa.cycles.compute == sb.cycles.compute
    assert sb.cycles.total <= sa.cycles.total <= 1.2 * sb.cycles.total


def test_a_function_holds_its_vertices_once(blocks):
    a, b = blocks
    va, vb = (int(e.ir.memory.vertex_state.sum()) for e in blocks)
    assert va * 4 == vb
    verts = [sum(len(g.tiles) for cs in e.ir.compute_sets for g in cs.groups) for e in blocks]
    assert verts[0] * 4 == verts[1]


def test_a_functions_regions_are_live_during_each_call_only(blocks):
    """A function's regions hold nothing between calls: an interval per call,
    what lives between calls may take their bytes, and the plan still reaches
    the lower bound (which counts every region once per call)."""
    a, b = blocks
    low = pipeline.compile_source(BLOCKS, "t.pop", get_target(), stop_after="lower")
    live = liveness(low)
    fr = np.nonzero(live.function >= 0)[0]
    assert fr.size
    r, s, e = live.calls
    counts = np.bincount(r, minlength=len(live.start))[fr]
    assert (counts == 4).all()
    o = np.lexsort((s, r))
    same = r[o][1:] == r[o][:-1]
    assert (s[o][1:][same] > e[o][:-1][same]).all()          # calls in order, never overlapping
    assert (live.call_end[fr] < live.end[fr]).all()
    m, mb = a.ir.memory, b.ir.memory
    assert (m.planned == m.lower_bound).all() and (mb.planned == mb.lower_bound).all()
    # What the calls cost in data: their parameters' and results' copies.
    assert mb.planned.sum() < m.planned.sum() <= 1.1 * mb.planned.sum()


# Six layers: recomputing every one of their segments (cut where the fewest bytes
# cross) recomputes parts alike, which four layers' four segments do not.
TRAIN6 = TRAIN.replace(LAYERS, "\n".join(f"    let h{i} = relu(conv_bn(h{i - 1}, 8, 3, 1, 1));"
                                         for i in range(1, 7))).replace("avg_pool2d(h4, 8)", "avg_pool2d(h6, 8)")


@pytest.mark.parametrize("recompute", ["none", "all"])
def test_training_is_the_same_with_and_without_functions(recompute):
    src = TRAIN if recompute == "none" else TRAIN6
    a, b = build(src, True, recompute), build(src, False, recompute)
    names = [f["name"] for f in a.ir.functions]
    assert names and all(f["calls"] >= 2 for f in a.ir.functions)
    if recompute == "none":
        # The layers' backward passes are one function too (but the first
        # layer's: nothing needs the gradient of x).
        assert names == ["statement", "statement.grad"]
        assert [f["calls"] for f in a.ir.functions] == [4, 3]
    else:
        # A recomputed part alike is a call of its forward function, in the
        # backward pass; the report counts its FLOPs as recomputed.
        assert any(f["recompute_calls"] for f in a.ir.functions)
        fa, fb = (memory_report(e.ir).to_json()["training"]["flops"] for e in (a, b))
        assert fa["forward"] == fb["forward"] and fa["recompute"] == fb["recompute"] > 0
        # (element-wise work fuses a little differently across a call's boundary)
        assert fa["backward"] == pytest.approx(fb["backward"], rel=1e-3)
    sa, sb = api.Simulator(a, threads=2), api.Simulator(b, threads=2)
    for step in range(3):
        x = feeds(a, step)
        np.testing.assert_allclose(sa.run(x)["loss"], sb.run(x)["loss"], rtol=1e-6)
    # The same operations on the same numbers; a reduction whose partial sums sit
    # on other tiles adds them in another order (a last-bit difference, seen in a
    # batch norm's scale gradient).
    for t in a.ir.tensors:
        if t.kind in ("param", "var"):
            np.testing.assert_allclose(sa.read(t.name), sb.read(t.name), rtol=1e-6, atol=1e-7, err_msg=t.name)
    assert a.ir.memory.vertex_state.sum() < b.ir.memory.vertex_state.sum()


def test_weights_every_call_reads_are_bound_once_not_copied():
    a, b = build(RNN, True), build(RNN, False)
    (f,) = a.ir.functions
    # The first iteration reads x for h: another structure.  The others share w
    # and x @ u; only the hidden state is copied in.
    assert f["calls"] == 5 and f["shared_inputs"] == 2
    assert f["copy_in_bytes"] == f["copy_out_bytes"] == 16 * 32 * 4
    x = feeds(a)
    assert np.array_equal(api.Simulator(a).run(x)["y"], api.Simulator(b).run(x)["y"])


def test_a_def_with_other_shapes_is_another_specialisation():
    src = BLOCKS.replace("    output y = h;", "    let k = block(reshape(h, [4, 8, 8, 4]));\n"
                                               "    let k2 = block(k);\n    output y = h;\n    output z = k2;")
    g = pipeline.compile_source(src, "t.pop", get_target(), stop_after="outline")
    calls = sorted((f.name, len(f.instances)) for f in g.functions)
    assert calls == [("block", 4), ("block.2", 2)]


def test_small_repeats_stay_inline():
    """Element-wise work is worth 0.1 an op (PopART's value of a relu), a matrix
    product 1000; a part is outlined from a value of 1, and with a vertex's work
    (16 elements) for every tile."""
    def program(shape, layer):
        return f"graph g(tiles = 8) {{\n input x: f32[{shape}];\n param w: f32[32, 32] = normal(0.0, 0.1);\n" + \
            "".join(f" let a{i} = {layer.format(x='x' if i == 0 else f'a{i - 1}')};\n" for i in range(5)) + \
            " output y = a4;\n}\n"

    def functions(src):
        g = pipeline.compile_source(src, "t.pop", get_target(), stop_after="outline")
        return [len(f.instances) for f in g.functions]
    assert functions(program("160, 32", "relu({x} * 2.0 + 1.0)")) == []
    assert functions(program("16, 32", "relu({x} @ w + 1.0)")) == [5]
    assert functions(program("1, 32", "relu({x} @ w + 1.0)")) == []     # 96 elements of work, 8 tiles


def test_the_verifier_catches_a_rewired_instance(blocks):
    g = pipeline.compile_source(BLOCKS, "t.pop", get_target(), stop_after="outline")
    ol.verify(g)
    f = g.functions[0]
    bad = replace(f.instances[1], inputs=f.instances[0].inputs)
    g.functions[0] = replace(f, instances=(f.instances[0], bad) + f.instances[2:])
    with pytest.raises(AssertionError, match="rewired"):
        ol.verify(g)


def test_popx_keeps_the_functions(blocks, tmp_path):
    a, _ = blocks
    path = tmp_path / "b.popx"
    a.save(path)
    back = artifact.load(str(path))
    assert back.functions == a.ir.functions
    assert [op["calls"] for op in back.ops if op["function"] == "block"] and \
        all(op["calls"] == 4 for op in back.ops if op["function"] == "block")

    def forge(edit):
        def e(doc):
            edit(doc["functions"][0])
        return _tampered(path, tmp_path, e)
    for edit, why in ((lambda f: f.update(calls=1), "calls"),
                      (lambda f: f.update(compute_sets=[10 ** 6]), "compute set"),
                      (lambda f: f.update(tensors=[5, 2]), "range"),
                      (lambda f: f.pop("kind"), "expected fields")):
        with pytest.raises(artifact.ArtifactError, match=why):
            artifact.load(str(forge(edit)))


def test_report_reuse(popc, tmp_path):  # noqa: F811
    src = tmp_path / "blocks.pop"
    src.write_text(BLOCKS)
    code, out, err = popc("report", src, "--reuse", "--json", "--no-cache")
    assert code == 0, err
    doc = json.loads(out)
    (f,) = doc["functions"]
    assert (f["name"], f["calls"]) == ("block", 4) and f["bytes_saved"] == 3 * f["vertex_state_bytes"] > 0
    c = doc["code_and_state_bytes"]
    assert c["with_reuse"] < c["without_reuse"]
    assert doc["copies"]["cycles_added"] > 0 and doc["copies"]["bytes_copied_by_calls"] > 0
    code, out, err = popc("report", src, "--reuse", "--no-cache")
    assert code == 0 and "block: 4 calls" in out and "code + vertex state" in out
    code, out, err = popc("report", src, "--reuse", "--no-outline")
    assert code == 2 and "--reuse compares" in err
    popx = tmp_path / "b.popx"
    assert popc("build", src, "-o", popx, "--no-cache")[0] == 0
    code, out, err = popc("report", popx, "--reuse")
    assert code == 2 and "--reuse does not apply to a .popx" in err


def test_no_outline_on_the_command_line(popc, tmp_path):  # noqa: F811
    src = tmp_path / "blocks.pop"
    src.write_text(BLOCKS)
    x = tmp_path / "x.npy"
    np.save(x, feeds(build(BLOCKS, False))["image"])
    outs = []
    for flags in ((), ("--no-outline",)):
        code, out, err = popc("run", src, "--feed", f"image={x}", "--save", tmp_path / "o.npz", *flags)
        assert code == 0, err
        outs.append(np.load(tmp_path / "o.npz")["y"])
    assert np.array_equal(*outs)


def test_a_functions_weights_spread_over_the_tiles_like_the_steps_parameters():
    """A call copies a layer's weights into its function's parameter: that tensor
    spreads evenly over the tiles, as a training step's parameters do, not onto the
    tiles where its first convolution tasks run (a stage-4 weight of ResNet-50,
    9.4 MB, took 55 KB on each of 184 tiles)."""
    exe = build(TRAIN, True, "none").ir
    tm = exe.target.tile_memory
    weights = [(t, runs) for t, runs in zip(exe.tensors, exe.tensor_runs)
               if ".in" in t.name and t.shape == (8, 8, 3, 3)]
    assert weights
    for t, runs in weights:
        per_tile = np.bincount(runs.addrs // tm, weights=runs.counts, minlength=exe.target.tiles)
        share = -(-int(np.prod(t.shape)) // exe.target.tiles)          # a tile's share, rounded up
        assert (per_tile > 0).all() and per_tile.max() <= share, (t.name, per_tile)
