"""Every example compiles, runs, prints what its `// expect:` lines say, and
matches numpy."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def expectations(path: Path) -> list[str]:
    return [m.group(1).rstrip() for m in re.finditer(r"//\s*expect:\s*(.*)$", path.read_text(), re.M)]


SMALL = sorted(p for p in EXAMPLES.glob("*.pop") if p.name != "resnet50.pop")


def random_feeds(exe, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, shape) in exe.inputs.items():
        feeds[name] = (rng.integers(0, 10, shape).astype(np.int32) if dtype == "i32"
                       else rng.standard_normal(shape).astype(np.float32))
    return feeds


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.name)
def test_example_runs_and_prints_its_expectations(path, capsys, tmp_path):
    exe = popdsl.compile(path)
    data = tmp_path / "feeds.npz"
    np.savez(data, **random_feeds(exe))
    assert main(["run", str(path), "--data", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    want = expectations(path)
    printed = [line for line in out if any(line == w for w in want)]
    assert printed == want, f"expected {want}\ngot:\n" + "\n".join(out)


def test_scale_demo_output_exactly(capsys):
    assert main(["run", str(EXAMPLES / "scale_demo.pop")]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "v: [1000 2000 3000 4000 5000 6000 7000 8000]",
        "w: [10 20 30 40 50 60 70 80]",
    ]


def test_matvec_on_all_gc200_tiles_matches_numpy():
    exe = popdsl.compile(EXAMPLES / "matvec.pop")
    assert exe.target.tiles == 1472
    nverts = sum(len(g.tiles) for cs in exe.ir.compute_sets for g in cs.groups)
    assert nverts == 2944
    with popdsl.Simulator(exe) as sim:
        y = sim.run()["y"]
        a, x = sim.read("A").astype(np.float64), sim.read("x").astype(np.float64)
    np.testing.assert_allclose(y, a @ x, rtol=1e-5, atol=1e-5)
    # The data really is spread: every tile holds four rows of A.
    tiles = np.unique(exe.ir.tensor_addrs[exe.ir.tensor_index("A")] // exe.target.tile_memory)
    assert tiles.tolist() == list(range(1472))


def test_reduce_matches_numpy():
    exe = popdsl.compile(EXAMPLES / "reduce.pop")
    with popdsl.Simulator(exe) as sim:
        total = sim.run()["total"]
        data = sim.read("data")
    assert total.shape == ()
    np.testing.assert_allclose(total, data.astype(np.float64).sum(), rtol=1e-5)


def test_newton_loop_on_device_matches_numpy():
    exe = popdsl.compile(EXAMPLES / "newton.pop")
    with popdsl.Simulator(exe) as sim:
        x = sim.run()["x"]
        iterations = int(sim.read("iterations"))
    np.testing.assert_allclose(x, np.sqrt(np.arange(1, 65, dtype=np.float64)), rtol=1e-6)
    assert iterations == 7


def mlp_reference(sim, x, y):
    w1, b1 = sim.read("layer_1.dense_1.w"), sim.read("layer_1.dense_1.b")
    w2, b2 = sim.read("dense_1.w"), sim.read("dense_1.b")
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return np.exp(logp), -logp[np.arange(len(y)), y].mean(), logits.argmax(1)


def test_mlp_on_gc200_matches_numpy():
    exe = popdsl.compile(EXAMPLES / "mlp.pop")
    assert exe.target.tiles == 1472
    feeds = random_feeds(exe, 1)
    with popdsl.Simulator(exe) as sim:
        out = sim.run(feeds)
        probs, loss, pred = mlp_reference(sim, feeds["x"].astype(np.float64), feeds["y"])
    np.testing.assert_allclose(out["probs"], probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_array_equal(out["predicted"], pred)


def test_cnn_on_gc200_matches_numpy():
    from test_prims import conv_ref
    exe = popdsl.compile(EXAMPLES / "cnn.pop")
    feeds = random_feeds(exe, 2)
    with popdsl.Simulator(exe) as sim:
        out = sim.run(feeds)
        P = {t.name: sim.read(t.name) for t in exe.ir.tensors if t.kind in ("param", "var")}

    def stage(h, pre):
        h = conv_ref(h, P[pre + ".conv_bn_1.conv_1.w"], 1, 1, 1)
        bn = pre + ".conv_bn_1.batch_norm_1"
        scale = P[bn + ".gamma"] / np.sqrt(P[bn + ".running_var"] + 1e-5)
        h = np.maximum(h * scale[:, None, None] + (P[bn + ".beta"] - P[bn + ".running_mean"] * scale)[:, None, None], 0)
        n, c, hh, ww = h.shape
        return h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
    h = stage(stage(feeds["images"].astype(np.float64), "stage_1"), "stage_2")
    logits = h.reshape(8, -1) @ P["dense_1.w"] + P["dense_1.b"]
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)


def test_resnet50_compiles_for_gc200_with_its_parameter_count():
    import time
    t = time.perf_counter()
    exe = popdsl.compile(EXAMPLES / "resnet50.pop")
    seconds = time.perf_counter() - t
    params = sum(int(np.prod(t.shape)) for t in exe.ir.tensors if t.kind == "param")
    assert params == 25_557_032
    assert exe.target.tiles == 1472
    assert int(exe.ir.memory.total.max()) <= exe.target.tile_memory
    # The bar is 60 s on the development machine; CI machines vary, so only a
    # runaway is a failure here (the figure is in the issue note).
    assert seconds < 180, seconds
