"""Every example compiles, runs, prints what its `// expect:` lines say, and
matches numpy."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl.cli import main
from numpy.lib.stride_tricks import sliding_window_view
from test_prims import conv_ref, conv_ref_fast

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def expectations(path: Path) -> list[str]:
    return [m.group(1).rstrip() for m in re.finditer(r"//\s*expect:\s*(.*)$", path.read_text(), re.M)]


# Compiled by their own tests (here, test_pictures.py): seconds and gigabytes each.
BIG = ("resnet50.pop", "resnet50_train.pop", "alexnet_train.pop")
SMALL = sorted(p for p in EXAMPLES.glob("*.pop") if p.name not in BIG)


def random_feeds(exe, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dtype, shape) in exe.inputs.items():
        feeds[name] = (rng.integers(0, 10, shape).astype(np.int32) if dtype == "i32"
                       else rng.standard_normal(shape).astype(np.float32))
    return feeds


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.name)
def test_example_runs_and_prints_its_expectations_and_outputs(path, capsys, tmp_path):
    exe = popdsl.compile(path)
    data = tmp_path / "feeds.npz"
    np.savez(data, **random_feeds(exe))
    assert main(["run", str(path), "--data", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    want = expectations(path)
    printed = [line for line in out if any(line == w for w in want)]
    assert printed == want, f"expected {want}\ngot:\n" + "\n".join(out)
    # Examples without `// expect:` lines (their numbers are checked against numpy
    # below) still show every output.
    for name in exe.outputs:
        assert any(line.startswith(f"{name}: ") for line in out), (name, out)


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
    tiles = np.unique(exe.ir.addresses(exe.ir.tensor_index("A")) // exe.target.tile_memory)
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


def test_resnet50_compiles_for_gc200_with_its_parameter_count_and_matches_numpy(tmp_path):
    import time
    t = time.perf_counter()
    exe = popdsl.compile(EXAMPLES / "resnet50.pop")
    seconds = time.perf_counter() - t
    # What runs is the executable saved and loaded again: the loader's proofs and
    # limits accept the largest example.
    exe.save(tmp_path / "resnet50.popx")
    exe = popdsl.load(tmp_path / "resnet50.popx")
    params = sum(int(np.prod(t.shape)) for t in exe.ir.tensors if t.kind == "param")
    assert params == 25_557_032
    assert exe.target.tiles == 1472
    assert int(exe.ir.memory.total.max()) <= exe.target.tile_memory
    # The bar is 60 s on the development machine; CI machines vary, so only a
    # runaway is a failure here (the figure is in the issue note).
    assert seconds < 180, seconds
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with popdsl.Simulator(exe) as sim:
        out = sim.run({"image": image})
        P = {t.name: sim.read(t.name).astype(np.float64) for t in exe.ir.tensors if t.kind in ("param", "var")}
    ref = resnet50_reference(P, image)
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert out["class"][0] == ref.argmax()


def resnet50_reference(P, x):
    """ResNet-50 forward in numpy (float64) from the simulator's parameters."""
    def bn(h, pre):
        sc = P[pre + ".gamma"] / np.sqrt(P[pre + ".running_var"] + 1e-5)
        return h * sc[:, None, None] + (P[pre + ".beta"] - P[pre + ".running_mean"] * sc)[:, None, None]
    def conv_bn(h, pre, stride, pad):
        return bn(conv_ref_fast(h, P[pre + ".conv_1.w"], stride, pad), pre + ".batch_norm_1")
    def bottleneck(h, pre, stride):
        C = h.shape[1]
        width = P[pre + ".conv_bn_1.conv_1.w"].shape[0]
        a = np.maximum(conv_bn(h, pre + ".conv_bn_1", 1, 0), 0)
        b = np.maximum(conv_bn(a, pre + ".conv_bn_2", stride, 1), 0)
        c = conv_bn(b, pre + ".conv_bn_3", 1, 0)
        if stride != 1 or C != 4 * width:
            return np.maximum(c + conv_bn(h, pre + ".conv_bn_4", stride, 0), 0)
        return np.maximum(c + h, 0)
    h = np.maximum(conv_bn(x.astype(np.float64), "conv_bn_1", 2, 3), 0)
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h = sliding_window_view(hp, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))
    for s, (blocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)], start=1):
        for b in range(1, blocks + 1):
            h = bottleneck(h, f"stage_{s}.bottleneck_{b}", stride if b == 1 else 1)
    pooled = h.mean(axis=(2, 3))
    return pooled @ P["dense_1.w"] + P["dense_1.b"]


def test_lstm_shares_its_weights_keeps_its_state_and_matches_numpy():
    """Eight calls of the cell use one set of weights; two runs of eight steps carry
    the hidden and cell state on the device from the first to the second."""
    exe = popdsl.compile(EXAMPLES / "lstm.pop")
    params = {t.name: t.shape for t in exe.ir.tensors if t.kind == "param"}
    assert sorted(params) == ["dense_1.b", "dense_1.w", "lstm_cell.b", "lstm_cell.wh", "lstm_cell.wx"]
    xs = np.random.default_rng(0).standard_normal((16, 4, 16)).astype(np.float32)
    with popdsl.Simulator(exe) as sim:
        P = {n: sim.read(n).astype(np.float64) for n in params}
        out = sim.run({"xs": xs}, steps=2)
        h_end, c_end = sim.read("h"), sim.read("c")

    def sig(v):
        return 1 / (1 + np.exp(-v))
    h, c, H = np.zeros((4, 32)), np.zeros((4, 32)), 32
    for run in range(2):
        for t in range(8):
            z = xs[run * 8 + t] @ P["lstm_cell.wx"] + h @ P["lstm_cell.wh"] + P["lstm_cell.b"]
            i, f, g, o = sig(z[:, :H]), sig(z[:, H:2 * H]), np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
        np.testing.assert_allclose(out["hidden"][run], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["logits"][run], h @ P["dense_1.w"] + P["dense_1.b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_end, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_end, c, rtol=1e-5, atol=1e-6)


def test_digits_trains_to_95_percent_with_the_readme_command(capsys, monkeypatch):
    """The README's command, as written there, trains examples/digits.pop on real
    handwritten digits and tests it on the held-out ones."""
    import shlex
    readme = (EXAMPLES.parent / "README.md").read_text()
    cmd = re.search(r"^popc (run examples/digits\.pop .*)$", readme, re.M).group(1)
    monkeypatch.chdir(EXAMPLES.parent)
    assert main(shlex.split(cmd)) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"^test accuracy: ([0-9.]+) \(360 examples\)$", out, re.M).group(1))
    assert acc >= 0.95, out


def test_resnet50_training_step_has_resnets_parameters_and_a_backward_pass_built_once():
    """examples/resnet50_train.pop (batch 8) compiles in under two minutes and 7 GB
    under the defaults, too much for the suite (its figures are in the README):
    here, up to outlining, its parameters and the functions its forward and
    backward passes become."""
    from popdsl.pipeline import compile_source
    from popdsl.ir.target import get_target
    from popdsl.passes.recompute import Policy
    path = EXAMPLES / "resnet50_train.pop"
    g = compile_source(path.read_text(), str(path), get_target(), stop_after="outline", recompute=Policy("all"))
    assert sum(g.tensors[t].numel for t in g.params) == 25_557_032
    calls = {f.name: len(f.instances) for f in g.functions}
    assert calls["bottleneck.3"] >= 5 and calls["bottleneck.3.grad"] >= 5, calls
