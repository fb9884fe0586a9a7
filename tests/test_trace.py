"""`popc run --trace`: the estimated execution as trace events, checked against the
trace-event format's rules (README: "Pictures and traces"): required keys and types
per event kind, times in microseconds at the target's clock, strict nesting on
every track; and the checker itself catches what it must."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl.report.trace import TraceRecorder, check_trace

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def mlp_feeds(tmp_path_factory):
    path = tmp_path_factory.mktemp("feeds") / "mlp.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((64, 784), dtype=np.float32), y=rng.integers(0, 10, 64).astype(np.int32))
    return path


def _x(doc, pid=None):
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and (pid is None or e["pid"] == pid)]


def test_trace_of_a_small_target_has_a_track_per_tile(popc, tmp_path):
    out = tmp_path / "t.json"
    code, stdout, err = popc("run", ROOT / "examples/scale_demo.pop", "--trace", out, "--steps", "2")
    assert code == 0, err
    assert "v: [" in stdout and "trace events" in err
    doc = json.loads(out.read_text())
    assert check_trace(doc) == []
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert [names[(2, t)] for t in range(4)] == ["tile 0", "tile 1", "tile 2", "tile 3"]
    steps = [e for e in _x(doc, 1) if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 1", "step 2"]
    # Every tile computes in each execution of 'scale' (3 a step: execute, then repeat 2).
    compute = [e for e in _x(doc, 2) if e["cat"] == "compute"]
    assert len(compute) == 2 * 3 * 4
    assert not [p for p in os.listdir(tmp_path) if p != "t.json"]     # written atomically, no leftovers


def test_trace_times_are_microseconds_at_the_clock(mlp_feeds, tmp_path):
    exe = popdsl.compile(ROOT / "examples/mlp.pop")
    with popdsl.Simulator(exe, threads=2) as sim:
        rec = sim.record_trace()
        sim.run(dict(np.load(mlp_feeds)))
        total = sim.cycles.total
    path = tmp_path / "mlp.json"
    n = rec.write(str(path))
    doc = json.loads(path.read_text())
    assert n == len(doc["traceEvents"]) and check_trace(doc) == []
    clock = exe.target.clock_hz
    step = [e for e in _x(doc, 1) if e["cat"] == "step"]
    assert len(step) == 1 and step[0]["ts"] == 0
    assert step[0]["dur"] == pytest.approx(total / clock * 1e6, abs=2e-3)
    # Phases on the program track add up to the step: compute + exchange + sync.
    phases = [e for e in _x(doc, 1) if e["cat"] in ("compute", "exchange", "sync")]
    assert sum(e["dur"] for e in phases) == pytest.approx(step[0]["dur"], abs=0.05)
    # 1472 tiles: 16 tracks of tile groups, each event naming its busiest tile.
    tids = {e["tid"] for e in _x(doc, 2)}
    assert tids <= set(range(16)) and len(tids) == 16
    assert all(0 <= e["args"]["busiest tile"] < 1472 for e in _x(doc, 2))
    # No tile computes longer than the compute phase it is in.
    longest = max(e["dur"] for e in _x(doc, 1) if e["cat"] == "compute")
    assert max(e["dur"] for e in _x(doc, 2) if e["cat"] == "compute") <= longest + 1e-9
    # Memory counters: one per action, by category, summing to the plan's timeline.
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    tl = exe.ir.memory.timeline
    assert len(counters) == len(exe.ir.compute_sets)
    assert [sum(c["args"].values()) for c in counters] == tl[:len(counters)].tolist()
    assert set(counters[0]["args"]) == {"always live", "not always live", "exchange buffers"}


def test_trace_tiles_opts_in_to_a_track_per_tile(popc, mlp_feeds, tmp_path):
    out = tmp_path / "t.json"
    code, _, err = popc("run", ROOT / "examples/mlp.pop", "--data", mlp_feeds, "--trace", out, "--trace-tiles")
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert check_trace(doc) == []
    assert len({e["tid"] for e in _x(doc, 2)}) > 1000


def test_trace_flag_errors(popc, tmp_path):
    code, _, err = popc("run", ROOT / "examples/scale_demo.pop", "--trace", tmp_path / "missing" / "t.json")
    assert code == 1 and "cannot write --trace" in err and "no such directory" in err
    code, _, err = popc("run", ROOT / "examples/scale_demo.pop", "--trace", tmp_path)
    assert code == 1 and "is a directory" in err
    code, _, err = popc("run", ROOT / "examples/scale_demo.pop", "--trace-tiles")
    assert code == 2 and "--trace-tiles needs --trace" in err


def test_the_checker_catches_broken_traces():
    ok = {"ph": "X", "name": "a", "pid": 1, "tid": 0, "ts": 0.0, "dur": 2.0}
    assert check_trace({"traceEvents": [ok]}) == []
    assert check_trace({}) == ["no traceEvents list"]
    assert "missing 'dur'" in check_trace({"traceEvents": [{k: v for k, v in ok.items() if k != "dur"}]})[0]
    assert "'ts' is str" in check_trace({"traceEvents": [{**ok, "ts": "0"}]})[0]
    assert "'pid' is bool" in check_trace({"traceEvents": [{**ok, "pid": True}]})[0]
    assert "unknown ph" in check_trace({"traceEvents": [{**ok, "ph": "Q"}]})[0]
    assert "negative" in check_trace({"traceEvents": [{**ok, "dur": -1.0}]})[0]
    # Overlap without nesting on one track; the same spans on two tracks are fine.
    b = {**ok, "ts": 1.0, "dur": 2.0}
    assert "without nesting" in check_trace({"traceEvents": [ok, b]})[0]
    assert check_trace({"traceEvents": [ok, {**b, "tid": 1}]}) == []
    # Nested, and adjacent, are fine.
    assert check_trace({"traceEvents": [ok, {**ok, "ts": 0.5, "dur": 1.0}, {**ok, "ts": 2.0}]}) == []
    assert "counter values" in check_trace({"traceEvents": [{"ph": "C", "name": "m", "pid": 1, "ts": 0,
                                                             "args": {"x": "1"}}]})[0]
    assert "unknown metadata" in check_trace({"traceEvents": [{"ph": "M", "name": "nope", "pid": 1,
                                                               "args": {}}]})[0]


def test_memory_timeline_by_category_adds_up_and_survives_a_popx(tmp_path):
    exe = popdsl.compile(ROOT / "examples/lstm.pop")
    m = exe.ir.memory
    assert set(m.timeline_categories) == {"always_live", "not_always_live", "exchange_buffers"}
    assert np.array_equal(sum(m.timeline_categories.values()), m.timeline)
    assert (m.timeline_categories["always_live"] == m.timeline_categories["always_live"][0]).all()
    exe.save(tmp_path / "l.popx")
    back = popdsl.load(tmp_path / "l.popx").ir.memory
    for k, v in m.timeline_categories.items():
        assert np.array_equal(back.timeline_categories[k], v)


def test_a_recorder_without_runs_writes_an_empty_valid_trace(tmp_path):
    exe = popdsl.compile(ROOT / "examples/scale_demo.pop")
    rec = TraceRecorder(exe.ir)
    rec.write(str(tmp_path / "e.json"))
    doc = json.loads((tmp_path / "e.json").read_text())
    assert check_trace(doc) == [] and not _x(doc)
