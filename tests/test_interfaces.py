"""What a new user meets at the interfaces: names listed when one is wrong, a closed
simulator refusing to run, an executable saying what it holds, feeds checked before
the long stages of a compile, commands that are not commands, flags that do not
apply, and help with examples."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import popdsl
from popdsl import pipeline
from popdsl.cli import main

SRC = """graph g(tiles = 4) {
    input x: f32[8];
    var count: f32[1] = zeros();
    param w: f32[8] = ones();
    count = count + 1.0;
    output y = x * w;
}
"""


def test_an_executable_lists_its_inputs_outputs_params_and_vars():
    exe = popdsl.compile(SRC)
    assert exe.inputs == {"x": ("f32", (8,))} and exe.outputs == ["y"]
    assert exe.params == {"w": ("f32", (8,))} and exe.vars == {"count": ("f32", (1,))}
    assert set(exe.tensors()) == {"x", "w", "count"}
    assert "1 inputs, 1 outputs, 1 params, 1 vars" in repr(exe)


def test_reading_a_wrong_name_lists_the_names_and_a_closed_simulator_refuses():
    sim = popdsl.Simulator(popdsl.compile(SRC))
    with pytest.raises(KeyError, match="did you mean count.*tensors: x, count, w"):
        sim.read("cout")
    sim.close()
    for call in (lambda: sim.run({"x": np.ones(8, np.float32)}), lambda: sim.read("w"),
                 lambda: sim.write("w", np.ones(8, np.float32))):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_missing_feeds_are_found_before_partitioning(tmp_path, capsys, monkeypatch):
    """`popc run` of a program whose input is not fed says so, naming the input's
    type and how to feed it, without partitioning, lowering or planning first."""
    p = tmp_path / "g.pop"
    p.write_text(SRC)

    def never(opts, graph):
        raise AssertionError("partitioned before the feeds were checked")
    stages = tuple(dataclasses.replace(s, run=never) if s.name == "partition" else s for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    assert main(["run", str(p)]) == 1
    err = capsys.readouterr().err
    assert "input 'x' (f32[8]) not fed: give it with --feed NAME=FILE.npy or --data FILE.npz" in err, err


def test_an_unknown_command_is_a_usage_error(capsys):
    assert main(["rnu", "x.pop"]) == 2
    assert "unknown command 'rnu' (did you mean 'run'?)" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_target_flags_do_not_apply_to_a_popx(tmp_path, capsys):
    p = tmp_path / "g.pop"
    p.write_text(SRC)
    out = tmp_path / "g.popx"
    assert main(["build", str(p), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--tiles", "2"]) == 2
    assert "--tiles does not apply to a .popx" in capsys.readouterr().err
    assert main(["report", str(out), "--target", "gc2"]) == 2


@pytest.mark.parametrize("command", ["build", "check", "run", "report", "dump"])
def test_every_command_has_a_description_and_examples(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"popc {command}" in out.split("examples:")[1]
