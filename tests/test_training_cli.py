"""Training from the command line (README: "Training from the command line"): data
streamed in batches, --epochs, --eval, the progress bar, --save-params and
--load-params carrying params, vars and optimizer state, IDX files; and every bad
input of these an error with exit 1 (2 for usage)."""
from __future__ import annotations

import io

import numpy as np
import pytest

import popdsl
from popdsl import training
from popdsl.data import is_idx, read_idx, write_idx

MLP = """import "popnn";
graph mlp(tiles = 8) {
    input x: f32[8, 6];
    input y: i32[8];
    let logits = dense(relu(dense(x, 16)), 3);
    let loss = mean(cross_entropy(logits, y));
    output loss;
    output accuracy = mean(f32(argmax(logits, axis = 1) == y));
    minimize loss with OPT;
}
"""



@pytest.fixture
def src(tmp_path):
    def write(text: str, name: str = "prog.pop"):
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


def dataset(n, seed=0, features=6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)).astype(np.int32)
    return x, y


@pytest.fixture
def mlp(src):
    return lambda opt="sgd(lr = 0.1, momentum = 0.9)": src(MLP.replace("OPT", opt), "mlp.pop")


@pytest.fixture
def data(tmp_path):
    def make(name, n, seed=0, **override):
        x, y = dataset(n, seed)
        arrays = {"x": x, "y": y, **override}
        p = tmp_path / name
        np.savez(p, **{k: v for k, v in arrays.items() if v is not None})
        return p
    return make


# ---------------------------------------------------------------- training runs

def test_epochs_then_eval_prints_the_test_accuracy(popc, mlp, data):
    code, out, err = popc("run", mlp(), "--data", data("train.npz", 800), "--epochs", 4,
                          "--eval", data("test.npz", 200, seed=1))
    assert code == 0, err
    lines = out.splitlines()
    acc = next(float(l.split()[2]) for l in lines if l.startswith("test accuracy: "))
    assert acc > 0.8 and "(200 examples)" in lines[-1]
    assert any(l.startswith("test loss: ") for l in lines)
    assert "samples/s" not in out                  # no progress bar when stdout is not a terminal
    loss = next(l for l in lines if l.startswith("loss: "))
    assert loss.count("...") == 1                  # 400 steps, summarised


def test_eval_takes_name_equals_file_per_input(popc, mlp, data, tmp_path):
    x, y = dataset(16, seed=3)
    np.save(tmp_path / "tx.npy", x)
    np.save(tmp_path / "ty.npy", y)
    code, out, err = popc("run", mlp(), "--data", data("train.npz", 80), "--epochs", 1,
                          "--eval", f"x={tmp_path / 'tx.npy'}", "--eval", f"y={tmp_path / 'ty.npy'}")
    assert code == 0, err
    assert "(16 examples)" in out


def test_examples_after_the_last_whole_batch_are_left_out_with_a_note(popc, mlp, data):
    code, out, err = popc("run", mlp(), "--data", data("train.npz", 803), "--epochs", 1)
    assert code == 0, err
    assert "803 examples make 100 batches of 8; the last 3 are left out of each epoch" in err


def test_saved_state_continues_training_exactly(popc, mlp, data, tmp_path):
    """Params, the optimizer's state (Adam's moments and step) and vars saved after
    6 steps and loaded into a new run continue as one 12-step run does."""
    prog = mlp("adam(lr = 0.01)")
    x, y = dataset(96)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    np.savez(tmp_path / "a.npz", x=x[:48], y=y[:48])
    np.savez(tmp_path / "b.npz", x=x[48:], y=y[48:])
    p, o1, o2, o = (tmp_path / n for n in ("p.npz", "o1.npz", "o2.npz", "o.npz"))
    assert popc("run", prog, "--data", tmp_path / "all.npz", "--steps", 12, "--save", o)[0] == 0
    assert popc("run", prog, "--data", tmp_path / "a.npz", "--steps", 6, "--save", o1, "--save-params", p)[0] == 0
    with np.load(p) as saved:
        assert {"dense_1.w", "dense_1.w.adam_m", "dense_1.w.adam_v", "adam.step"} <= set(saved.files)
        assert saved["adam.step"] == 6
    code, _, err = popc("run", prog, "--data", tmp_path / "b.npz", "--steps", 6, "--save", o2, "--load-params", p)
    assert code == 0, err
    with np.load(o) as whole, np.load(o1) as first, np.load(o2) as second:
        np.testing.assert_allclose(np.concatenate([first["loss"], second["loss"]]), whole["loss"], rtol=1e-6)


def test_a_graph_without_minimize_streams_data_too(popc, src, tmp_path):
    prog = src("graph g(tiles = 2) {\n    input x: f32[2, 3];\n    output s = sum(x, axis = 1);\n}\n")
    np.savez(tmp_path / "d.npz", x=np.arange(18, dtype=np.float32).reshape(6, 3))
    code, out, err = popc("run", prog, "--data", tmp_path / "d.npz", "--steps", 4)
    assert code == 0, err
    assert out.splitlines() == ["s: [[3 12] [21 30] [39 48] [3 12]]"]         # the fourth wraps around


# ---------------------------------------------------------------- the progress bar

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal():
    exe = popdsl.compile(MLP.replace("OPT", "sgd(lr = 0.1)"))
    x, y = dataset(32)
    stream = training.prepare(exe, {"x": x, "y": y})
    term = Terminal()
    with popdsl.Simulator(exe) as sim:
        out = training.run(sim, stream, 8, out=term)
    assert out["loss"].shape == (8,)
    lines = [l.strip() for l in term.getvalue().replace("\r", "\n").splitlines() if l.strip()]
    assert lines[-1].startswith("step 8/8  epoch 2/2  loss ")
    for part in ("accuracy ", "samples/s", "device ", "ms/step (est.)"):
        assert part in lines[-1]
    assert any(l.startswith("step 4/8  epoch 1/2") for l in lines)          # each epoch's line is kept
    assert term.getvalue().count("\n") == 2


def test_progress_without_epochs_is_one_line_and_one_step_has_none():
    exe = popdsl.compile("graph g(tiles = 2) {\n    input x: f32[4];\n    output loss = sum(x);\n}\n")
    stream = training.prepare(exe, {"x": np.ones(4, np.float32)})
    with popdsl.Simulator(exe) as sim:
        term = Terminal()
        training.run(sim, stream, 5, out=term)
        assert term.getvalue().count("\n") == 1 and "epoch" not in term.getvalue()
        assert term.getvalue().rstrip().endswith("ms/step (est.)") and "step 5/5  loss 4.0000" in term.getvalue()
        term = Terminal()
        training.run(sim, stream, 1, out=term)
        assert term.getvalue() == ""


# ---------------------------------------------------------------- bad data and flags

def test_steps_and_epochs_exclude_each_other(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80), "--steps", 2, "--epochs", 1)
    assert code == 2 and "not allowed with argument" in err


@pytest.mark.parametrize("flag", ["--epochs", "--steps"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_epochs_and_steps_are_positive(popc, mlp, flag, value):
    code, _, err = popc("run", mlp(), flag, value)
    assert code == 2 and "expected" in err


def test_epochs_need_data_to_stream(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("one.npz", 8), "--epochs", 2)
    assert code == 1 and "--epochs needs data with more examples than one batch" in err


def test_data_with_a_missing_name(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80, y=None), "--epochs", 1)
    assert code == 1 and "input 'y' (" in err and "not fed" in err and "train.npz has: x" in err


def test_data_with_a_wrong_dtype(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80, y=np.zeros(80, np.float32)), "--epochs", 1)
    assert code == 1 and "feed 'y' in" in err and "has dtype float32; input is i32" in err


def test_data_with_a_wrong_shape(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80, x=np.zeros((80, 5), np.float32)), "--epochs", 1)
    assert code == 1 and "has shape [80, 5]; input is [8, 6] (or [N, 6] to stream N examples in batches of 8)" in err


def test_data_with_fewer_examples_than_a_batch(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 5), "--epochs", 1)
    assert code == 1 and "has shape [5, 6]; input is [8, 6]" in err


def test_data_whose_inputs_hold_different_numbers_of_batches(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80, y=np.zeros(72, np.int32)), "--epochs", 1)
    assert code == 1 and "hold different numbers of batches: 'x' 10 of 8, 'y' 9 of 8" in err


def test_data_with_an_unknown_name(popc, mlp, data):
    code, _, err = popc("run", mlp(), "--data", data("train.npz", 80, z=np.zeros(3)), "--epochs", 1)
    assert code == 1 and "no input named 'z'" in err


def test_eval_with_bad_data(popc, mlp, data):
    train = data("train.npz", 80)
    for test, want in [(data("t1.npz", 40, y=None), "--eval: input 'y' ("),
                       (data("t2.npz", 40, x=np.zeros((40, 2), np.float32)), "--eval: feed 'x'"),
                       (data("t3.npz", 40, y=np.zeros(40, np.float32)), "has dtype float32; input is i32")]:
        code, out, err = popc("run", mlp(), "--data", train, "--epochs", 1, "--eval", test)
        assert code == 1 and want in err, err
        assert out == ""                             # checked before training


def test_eval_needs_the_source_and_a_loss_or_accuracy(popc, mlp, data, src, tmp_path):
    prog = mlp()
    assert popc("build", prog, "-o", tmp_path / "m.popx")[0] == 0
    code, _, err = popc("run", tmp_path / "m.popx", "--data", data("train.npz", 80), "--eval", data("t.npz", 16))
    assert code == 1 and "give the .pop file, not a .popx" in err
    quiet = src(MLP.replace("OPT", "sgd(lr = 0.1)").replace("output loss;", "").replace("output accuracy", "let a"),
                "quiet.pop")
    code, _, err = popc("run", quiet, "--data", data("train.npz", 80), "--eval", data("t.npz", 16))
    assert code == 1 and "has no output named 'loss' or 'accuracy'" in err
    code, _, err = popc("run", prog, "--eval", data("a.npz", 16), "--eval", data("b.npz", 16), "--data", data("c.npz", 16))
    assert code == 1 and "--eval takes one .npz file" in err
    code, _, err = popc("run", prog, "--data", data("c.npz", 16), "--eval", "x=")
    assert code == 1 and "--eval expects NAME=FILE" in err


# ---------------------------------------------------------------- IDX files

@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 255, (5, 4, 3)).astype(np.uint8)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a)
    assert is_idx(p)
    b = read_idx(p)
    assert b.dtype == np.uint8 and np.array_equal(a, b)
    f = np.linspace(-1, 1, 6).astype(np.float32).reshape(2, 3)
    write_idx(tmp_path / "f.idx", f)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), f)


@pytest.mark.parametrize("raw,want", [
    (b"\0\0\x08\x01\0\0\0\x05abc", "the IDX header says [5] (5 bytes of data) but the file holds 3"),
    (b"\0\0\x08\x02\0\0\0\x01", "promises 2 dimensions but the file ends first"),
    (b"\0\0\x07\x01\0\0\0\x01a", "unknown type code 0x07"),
    (b"\x01\0\x08\x01", "does not start with two zero bytes"),
    (b"\0\0\x0d\x02\xff\xff\xff\xff\xff\xff\xff\xff", "the IDX header claims"),
    (b"\x1f\x8b\x08\0garbage", "a broken gzip file"),
])
def test_bad_idx_files(tmp_path, raw, want):
    p = tmp_path / "bad.idx"
    p.write_bytes(raw)
    with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        read_idx(p)


def test_training_on_idx_files_like_mnist(popc, src, tmp_path):
    """MNIST's files: u8 images [N, rows, cols] feed an input [B, rows * cols] (one
    example's values reshaped), u8 labels an i32 input."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 64).astype(np.uint8)
    images = (rng.integers(0, 60, (64, 4, 4)) + labels[:, None, None] * 60).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    prog = src("""import "popnn";
graph mnist_like(tiles = 4) {
    input images: f32[16, 16];
    input labels: i32[16];
    let logits = dense(images / 255.0, 3);
    let loss = mean(cross_entropy(logits, labels));
    output loss;
    minimize loss with sgd(lr = 0.5);
}
""")
    code, out, err = popc("run", prog, "--feed", f"images={tmp_path / 'train-images-idx3-ubyte.gz'}",
                          "--feed", f"labels={tmp_path / 'train-labels-idx1-ubyte'}", "--epochs", 5, "--save",
                          tmp_path / "o.npz")
    assert code == 0, err
    with np.load(tmp_path / "o.npz") as o:
        assert o["loss"].shape == (20,) and o["loss"][-4:].mean() < o["loss"][:4].mean()
    bad = tmp_path / "short-idx1-ubyte"
    bad.write_bytes(b"\0\0\x08\x01\0\0\0\x40abc")
    code, _, err = popc("run", prog, "--feed", f"images={tmp_path / 'train-images-idx3-ubyte.gz'}",
                        "--feed", f"labels={bad}", "--epochs", 1)
    assert code == 1 and "cannot read" in err and "the IDX header says [64]" in err
