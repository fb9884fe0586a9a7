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


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.pop")), ids=lambda p: p.name)
def test_example_runs_and_prints_its_expectations(path, capsys):
    assert main(["run", str(path)]) == 0
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
