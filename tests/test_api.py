"""The Python API (README: "Python API"), and the simulator's memory as a user can see it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl.artifact import ArtifactError
from popdsl.runtime.simulator import DeviceError

AXPY = """
codelet Axpy(in x: f32[n], inout y: f32[n], a: f32) {
    for i in 0..n { y[i] += a * x[i]; }
}
graph axpy(tiles = 4) {
    input x: f32[16];
    var y: f32[16] = arange();
    map x -> linear;
    for t in 0..4 { map y[4*t : 4*t+4] -> tile 3 - t; }   // y's slices live on other tiles than x's
    compute cs {
        for t in 0..4 { Axpy(x = x[4*t : 4*t+4], y = y[4*t : 4*t+4], a = 2.0) on tile t; }
    }
    output y;
}
"""


def test_compile_source_run_and_feed_steps():
    exe = popdsl.compile(AXPY)
    assert exe.inputs == {"x": ("f32", (16,))}
    assert exe.outputs == ["y"]
    x = np.random.default_rng(0).standard_normal((3 * 16,)).astype(np.float32)
    with popdsl.Simulator(exe) as sim:
        out = sim.run({"x": x}, steps=3)["y"]
    y = np.arange(16, dtype=np.float32)
    want = []
    for s in range(3):
        y = y + np.float32(2.0) * x[16 * s:16 * (s + 1)]
        want.append(y)
    np.testing.assert_allclose(out, np.stack(want), rtol=1e-6)


def test_exchange_is_inserted_and_counted():
    exe = popdsl.compile(AXPY)
    cs = exe.ir.compute_sets[0]
    # y's data is on another tile than each vertex: in and back out by exchange.
    assert cs.pre.exchange_bytes == 16 * 4 and cs.post.exchange_bytes == 16 * 4
    assert exe.ir.memory.exchange_buffers.sum() == 16 * 4


def test_save_load_roundtrip(tmp_path):
    exe = popdsl.compile(AXPY)
    p = tmp_path / "axpy.popx"
    exe.save(p)
    again = popdsl.load(p)
    x = np.ones(16, np.float32)
    with popdsl.Simulator(exe) as a, popdsl.Simulator(again) as b:
        np.testing.assert_array_equal(a.run({"x": x})["y"], b.run({"x": x})["y"])


def test_load_rejects_garbage(tmp_path):
    p = tmp_path / "bad.popx"
    p.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a popdsl executable"):
        popdsl.load(p)


def test_read_write_and_feed_errors():
    exe = popdsl.compile(AXPY)
    with popdsl.Simulator(exe) as sim:
        sim.write("y", np.full(16, 5, np.float32))
        np.testing.assert_array_equal(sim.read("y"), np.full(16, 5, np.float32))
        with pytest.raises(ValueError, match="not fed"):
            sim.run({})
        with pytest.raises(ValueError, match="shape"):
            sim.run({"x": np.ones(15, np.float32)})
        with pytest.raises(ValueError, match="no input named"):
            sim.run({"x": np.ones(16, np.float32), "z": np.ones(1)})
        with pytest.raises(KeyError):
            sim.read("nope")


def test_tensors_live_at_their_planned_offsets():
    """The simulator's memory holds each element at the offset the plan gave it in
    its tile's window (runtime.layout packs the windows: only unused tops go)."""
    exe = popdsl.compile(AXPY)
    with popdsl.Simulator(exe) as sim:
        sim.run({"x": np.ones(16, np.float32)})
        addrs = exe.ir.addresses(exe.ir.tensor_index("y"))
        m = sim.machine
        assert 64 <= m.stride < exe.target.tile_memory and m.mem.size == exe.target.tiles * m.stride
        host = m.host_offsets(addrs)
        np.testing.assert_array_equal(host, addrs // exe.target.tile_memory * m.stride
                                      + addrs % exe.target.tile_memory)
        raw = np.concatenate([m.mem[a:a + 4] for a in host.tolist()]).view(np.float32)
        np.testing.assert_array_equal(raw, sim.read("y"))
        tiles = addrs // exe.target.tile_memory
        assert tiles.tolist() == [3] * 4 + [2] * 4 + [1] * 4 + [0] * 4


def test_window_stride_is_the_furthest_reach_or_the_whole_tile():
    """Packed windows hold everything any access reaches; an access that crosses its
    tile's end (no plan makes one, a damaged executable could) keeps the global layout."""
    import dataclasses
    from popdsl.runtime.layout import window_stride
    exe = popdsl.compile(AXPY).ir
    tm = exe.target.tile_memory
    stride = window_stride(exe)
    assert stride % 64 == 0 and stride < tm
    for i in range(len(exe.tensors)):
        assert (exe.addresses(i) % tm + 4 <= stride).all()
    runs = [dataclasses.replace(r, addrs=r.addrs.copy()) for r in exe.tensor_runs]
    runs[0].addrs[0] = tm - 2 - 4 * (int(runs[0].counts[0]) - 1)   # its last element over the end of tile 0
    assert window_stride(dataclasses.replace(exe, tensor_runs=runs)) == tm


def test_packed_windows_compute_what_the_global_layout_does(monkeypatch):
    """Packing tile windows is invisible: the same outputs, cycles and bytes at every
    planned address as a simulator laid out at tile × tile_memory."""
    from popdsl.runtime import simulator
    exe = popdsl.compile(Path(__file__).resolve().parent.parent / "examples" / "mlp.pop")
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((64, 784)).astype(np.float32),
             "y": rng.integers(0, 10, 64).astype(np.int32)}
    packed = popdsl.Simulator(exe)
    monkeypatch.setattr(simulator, "window_stride", lambda e: e.target.tile_memory)
    plain = popdsl.Simulator(exe)
    assert packed.machine.stride < plain.machine.stride == exe.target.tile_memory
    with packed, plain:
        a, b = packed.run(feeds), plain.run(feeds)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        assert packed.cycles.total == plain.cycles.total
        for i, t in enumerate(exe.ir.tensors):
            np.testing.assert_array_equal(packed.read(t.name), plain.read(t.name))


def test_runtime_index_error_names_codelet_vertex_tile_and_index():
    src = """
codelet Peek(in a: f32[n], out r: f32, k: i32) { r = a[k]; }
graph g(tiles = 2) {
    var a: f32[4] = arange();
    var r: f32[2];
    map a -> linear; map r -> linear;
    compute cs {
        Peek(a = a[0:2], r = r[0], k = 1) on tile 0;
        Peek(a = a[2:4], r = r[1], k = 5) on tile 1;
    }
}
"""
    exe = popdsl.compile(src)
    with popdsl.Simulator(exe) as sim, pytest.raises(DeviceError) as e:
        sim.run()
    msg = str(e.value)
    for part in ("index 5", "field 'a'", "codelet Peek", "vertex 1", "tile 1", "<string>:9:"):
        assert part in msg, msg


def test_memory_plan_has_no_overlaps_on_any_tile():
    """AXPY's tensors are all live for the whole program, so none may share a byte
    with another, nor with the exchange buffers its vertices use during the compute
    set (y's slices are remote: one buffer per vertex, on the vertex's tile)."""
    from popdsl.ir.executable import field_extents
    exe = popdsl.compile(AXPY).ir
    tm = exe.target.tile_memory
    owner: dict[int, str] = {}
    for i, t in enumerate(exe.tensors):
        for a in exe.addresses(i).tolist():
            for b in range(a, a + 4):
                assert b not in owner, f"{t.name} overlaps {owner[b]}"
                owner[b] = t.name
    buffers = []
    for grp in exe.compute_sets[0].groups:
        for f, addr, extent in field_extents(exe.codelets[grp.codelet], grp.table):
            for a, n, tile in zip(addr.tolist(), extent.tolist(), grp.tiles.tolist()):
                inside = {owner.get(b) for b in range(a, a + n)}
                if inside == {None}:
                    buffers.append((f.name, a, n, tile))
                else:           # connected in place: entirely within one tensor
                    assert len(inside) == 1 and None not in inside, (f.name, a, inside)
    assert sorted(b[0] for b in buffers) == ["y"] * 4
    spans = sorted((a, a + n) for _, a, n, _ in buffers)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
    assert all(a // tm == tile for _, a, _, tile in buffers)


def test_out_of_memory_is_a_compile_error():
    with pytest.raises(popdsl.CompileError, match=r"out of memory: tile 0 needs [\d,]+ B but has 1,024 B"):
        popdsl.compile("""
graph big(tiles = 4) {
    var a: f32[512];
    map a -> tile 0;
}
""", tile_memory=1024)


def test_partition_report_names_ops_tiles_cycles_and_exchange(capsys, tmp_path):
    from pathlib import Path
    from popdsl.cli import main
    mlp = Path(__file__).resolve().parent.parent / "examples" / "mlp.pop"
    src_path = tmp_path / "mlp.pop"
    src_path.write_text(mlp.read_text().replace("tiles = 1472", "tiles = 16"))
    assert main(["report", str(src_path), "--partition", "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    ops = {r["op"] for r in doc["ops"]}
    assert {"matmul", "relu", "reduce", "one_hot"} <= ops
    mm = next(r for r in doc["ops"] if r["op"] == "matmul")
    assert mm["tiles"] > 1 and mm["max_cycles"] >= mm["mean_cycles"] > 0 and mm["exchange_bytes"] > 0
    assert mm["source"].endswith(":50:12") and "popnn.pop" in mm["source"]


def test_reports_as_objects():
    exe = popdsl.compile(AXPY)
    mem = exe.memory_report()
    doc = mem.to_json()
    assert doc["totals"]["planned"] == sum(doc["tile_bytes"])
    assert "lower bound" in mem.text()
    part = exe.partition_report().to_json()
    assert part["ops"] == []            # a Poplar-level graph places its own vertices


def test_partition_report_of_a_failing_vertex_is_a_diagnostic(capsys, tmp_path):
    from popdsl.cli import main
    p = tmp_path / "divz.pop"
    p.write_text("""codelet Div(in a: i32[n], out r: i32[n]) { for i in 0..n { r[i] = 10 / a[i]; } }
graph g(tiles = 2) {
    input a: i32[4];
    var r: i32[4];
    map a -> linear; map r -> linear;
    compute cs { Div(a = a[0:2], r = r[0:2]) on tile 0; }
    output s = sum(r);
}
""")
    assert main(["report", str(p), "--partition"]) == 1      # the report runs a step on zeros
    err = capsys.readouterr().err
    assert "divz.pop:6:18: error: integer division by zero in codelet Div" in err
    assert "internal compiler error" not in err


@pytest.mark.parametrize("stage", ["parse", "check", "elaborate", "partition", "lower", "codegen", "plan"])
def test_dump_of_a_tensor_program_after_every_stage(stage, capsys, tmp_path):
    from popdsl.cli import main
    p = tmp_path / "t.pop"
    p.write_text("""import "popnn";
graph g(tiles = 3) {
    input x: f32[4, 8];
    input y: i32[4];
    program { step; step; }
    output loss = mean(cross_entropy(dense(x, 5), y));
}
""")
    assert main(["dump", "--after", stage, str(p)]) == 0
    first = capsys.readouterr().out
    assert main(["dump", "--after", stage, str(p)]) == 0
    assert capsys.readouterr().out == first and first.strip()
    if stage == "elaborate":
        assert "tensor program:" in first and "output loss = %" in first and "step" in first


def test_error_inside_a_def_names_the_calls_that_led_there():
    src = """def inner(x: f32[N, M]) -> f32[N, M] { return x @ x; }
def outer(x: f32[N, M]) -> f32[N, M] { return inner(x); }
graph g(tiles = 2) { input x: f32[4, 8]; output z = outer(x); }
"""
    with pytest.raises(popdsl.CompileError) as e:
        popdsl.compile(src)
    (d,) = e.value.diagnostics
    assert d.span.line == 1
    assert d.notes == ("in the call of 'inner' at <string>:2:47", "in the call of 'outer' at <string>:3:53")
