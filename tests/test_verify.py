"""The verifiers after every pipeline stage (`ir.verify_graph`, `ir.verify_lowered`):
each stage's output of real programs passes, and a deliberate corruption of each
group of invariants is rejected with a message naming it; the memory-plan overlap
check agrees with a brute-force one on random plans and finds planted overlaps;
the pipeline and `popc --verify` run the verifiers."""
from __future__ import annotations

import dataclasses
import re
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from popdsl import pipeline
from popdsl.cli import main
from popdsl.ir import codelet as cir
from popdsl.ir import executable as X
from popdsl.ir import graph as g
from popdsl.ir.mapping import Mapping
from popdsl.ir import verify_lowered as VL
from popdsl.ir.target import get_target
from popdsl.ir.tensor import Node
from popdsl.ir.verify_graph import verify_checked, verify_elaborated, verify_partitioned
from popdsl.passes import autodiff, outline, recompute
from popdsl.pipeline import compile_source

POPLAR = """
codelet Scale(inout x: f32[n], k: f32) {
    for i in 0..n { x[i] = x[i] * k; }
}
codelet RowSum(in a: f32[m, p], out r: f32[m]) {
    for i in 0..m {
        var s: f32 = 0.0;
        for j in 0..p { s += a[i, j]; }
        r[i] = s;
    }
}
codelet Positive(in x: f32, out b: bool) { b = x > 0.0; }
codelet Clear(out b: bool) { b = false; }

graph demo(tiles = 4) {
    var v: f32[8] = [1, 2, 3, 4, 5, 6, 7, 8];
    var w: f32[8];
    var m: f32[4, 6] = [[1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1], [2, 2, 2, 2, 2, 2]];
    var r: f32[4];
    var flag: bool[1];
    map v -> linear;
    map w -> linear;
    map m -> tile 2;
    map r -> tile 2;
    map flag -> tile 0;
    compute scale {
        for t in 0..4 { Scale(x = v[2*t : 2*t+2], k = 10.0) on tile t; }
    }
    compute rows {
        RowSum(a = m[0:4, 1:5], r = r) on tile 2;
        Positive(x = v[0], b = flag[0]) on tile 0;
    }
    compute clear {
        Clear(b = flag[0]) on tile 0;
    }
    program {
        execute scale;
        copy v -> w;
        repeat 2 { execute scale; }
        execute rows;
        if flag[0] { print v; } else { print w; }
        while flag[0] { copy w -> v; execute clear; }
        print r;
    }
}
"""

TENSOR = """
import "popnn";

graph net(tiles = 4) {
    input x: f32[8, 16];
    input y: i32[8];
    let h = relu(dense(x, 32));
    let logits = dense(h - sum(h, axis = 1, keepdims = true) * 0.01, 10);
    output loss = mean(cross_entropy(logits, y));
    output predicted = argmax(logits, axis = 1);
    output e = exp(tanh(logits) * 0.5) + 1.0;
}
"""
PROGRAMS = {"poplar": POPLAR, "tensor": TENSOR}
# The recompute stage's corruption test is in test_recompute.py (it needs a training step).
VERIFIERS = {"check": verify_checked, "elaborate": verify_elaborated, "autodiff": autodiff.verify,
             "recompute": recompute.verify, "outline": outline.verify, "partition": verify_partitioned,
             "lower": VL.verify_lowered, "codegen": VL.verify_generated, "plan": VL.verify_planned}


def stage(program: str, name: str):
    """A fresh result of stage `name` (unverified: the test verifies it)."""
    return compile_source(PROGRAMS[program], "<test>", get_target("gc200", tiles=4), stop_after=name,
                          verify=False)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("name", sorted(VERIFIERS))
def test_real_programs_pass(program, name):
    VERIFIERS[name](stage(program, name))


def test_every_stage_after_parsing_has_its_verifier_and_the_tests_run_them():
    assert [s.name for s in pipeline.STAGES if s.verify is None] == ["parse"]
    assert {s.name: s.verify for s in pipeline.STAGES if s.verify} == VERIFIERS
    assert pipeline.verify_by_default()           # tests/conftest.py


# ---------------------------------------------------------------- corruptions

def _group(graph, cs: str, codelet: str) -> g.VertexGroup:
    return next(grp for grp in graph.compute_sets[cs].groups if grp.codelet == codelet)


def _stacked_group(graph) -> g.VertexGroup:
    return next(grp for cs in graph.compute_sets.values() for grp in cs.groups
                if grp.syms and all(isinstance(c, g.Stacked) for c in grp.connections.values()))


def _misfile(prog):
    prog.codelets["Other"] = prog.codelets["Scale"]


def _store_to_in_field(prog):
    c = prog.codelets["RowSum"]
    prog.codelets["RowSum"] = dataclasses.replace(
        c, body=(cir.Store("a", (cir.Const(0, "i32"), cir.Const(0, "i32")), cir.Const(1.0, "f32")),))


def _tensor_id(gr):
    gr.tensors[1] = dataclasses.replace(gr.tensors[1], id=7)


def _mapping_dtype(gr):
    gr.mappings[0].tiles = gr.mappings[0].tiles.astype(np.int64)


def _mapping_runs(gr):
    m = gr.mappings[0]
    m.starts, m.tiles = np.array([0, 6, 3], np.int64), np.array([0, 1, 2], np.int32)


def _mapping_uncoalesced(gr):
    m = gr.mappings[0]
    m.starts, m.tiles = np.array([0, 3], np.int64), np.array([2, 2], np.int32)


def _tile_out_of_range(gr):
    m = gr.mappings[0]
    m.tiles = m.tiles.copy()
    m.tiles[-1] = 4


def _init_shape(gr):
    gr.init[0] = gr.init[0].reshape(2, 4)


def _view_index(gr):
    conns = _group(gr, "scale", "Scale").connections["x"]
    conns[2] = g.View(conns[2].tensor, conns[2].index + 100, conns[2].span)


def _view_other_tensor(gr):
    conns = _group(gr, "scale", "Scale").connections["x"]
    w = next(t.id for t in gr.tensors if t.name == "w")
    conns[2] = g.View(w, conns[2].index, conns[2].span)


def _unknown_codelet(gr):
    _group(gr, "rows", "RowSum").codelet = "Nope"


def _missing_connection(gr):
    del _group(gr, "scale", "Scale").connections["x"]


def _missing_state(gr):
    _group(gr, "scale", "Scale").state["k"].pop()


def _syms_length(gr):
    grp = _group(gr, "scale", "Scale")
    grp.syms["n"] = grp.syms["n"][:-1]


def _span_ids(gr):
    _group(gr, "scale", "Scale").span_ids.append(0)


def _vertex_tile(gr):
    _group(gr, "scale", "Scale").tiles[0] = 9


def _sym_value(gr):
    _group(gr, "rows", "RowSum").syms["p"][0] = 5


def _unknown_cs(gr):
    gr.program = g.Seq(gr.program.body + (g.Execute("nope", gr.program.body[0].span),))


def _copy_sizes(gr):
    body = list(gr.program.body)
    k = next(i for i, n in enumerate(body) if isinstance(n, g.Copy))
    c = body[k]
    body[k] = g.Copy(c.src, g.View(c.dst.tensor, c.dst.index[:4], c.dst.span), c.span)
    gr.program = g.Seq(tuple(body))


def _cond_not_bool(gr):
    body = list(gr.program.body)
    k = next(i for i, n in enumerate(body) if isinstance(n, g.If))
    body[k] = g.If(g.View(0, np.asarray(0), body[k].cond.span), body[k].then, body[k].orelse)
    gr.program = g.Seq(tuple(body))


def _output_not_a_view(gr):
    gr.outputs.append(("junk", 3))


def _later_argument(gr):
    nodes = gr.nodes.nodes
    k = next(i for i, n in enumerate(nodes) if n.args)
    nodes[k] = Node(k, "neg", (nodes[-1],), (), nodes[k].shape, nodes[k].dtype)


def _step_left(gr):
    gr.program = g.Seq(gr.program.body + (g.Step(gr.program.body[0].span),))


def _unmapped(gr):
    m = gr.mappings[len(gr.tensors) - 1]
    m.tiles = m.tiles.copy()
    m.tiles[0] = -1


def _output_node(gr):
    gr.outputs[0] = (gr.outputs[0][0], gr.nodes.nodes[-1])


def _stacked_sym(gr):
    grp = _stacked_group(gr)
    s = next(iter(grp.syms))
    grp.syms[s] = grp.syms[s] + 1


def _stacked_tensor(gr):
    grp = _stacked_group(gr)
    f, conn = next(iter(grp.connections.items()))
    grp.connections[f] = g.Stacked(len(gr.tensors), conn.index, conn.span)


def _op_record(gr):
    gr.ops.append({"node": 0, "op": "relu", "compute_sets": ["nope"]})


def _inplace_mapping(gr):
    out, _, _ = gr.inplace[0]
    e = gr.mappings[out].elements()
    e[0] = (e[0] + 1) % 4
    gr.mappings[out] = Mapping.from_elements(e)


def _inplace_tensor(gr):
    gr.inplace.append((len(gr.tensors), 0, gr.inplace[0][2]))


CORRUPT_GRAPHS = [
    ("check", "poplar", _misfile, "after check: codelet 'Other': is filed under another name"),
    ("check", "poplar", _store_to_in_field, "after check: codelet 'RowSum': codelet 'RowSum': invalid IR"),
    ("elaborate", "poplar", _tensor_id, "tensor 1 ('w'): has id 7 at position 1"),
    ("elaborate", "poplar", _mapping_dtype, "tensor 0 ('v'): mapping runs are int64(4,) starts and int64(4,) tiles"),
    ("elaborate", "poplar", _mapping_runs, "tensor 0 ('v'): mapping runs start at [0, 6, 3]: not ascending from 0"),
    ("elaborate", "poplar", _mapping_uncoalesced, "tensor 0 ('v'): mapping has neighbouring runs on one tile"),
    ("elaborate", "poplar", _tile_out_of_range, "tensor 0 ('v'): tile (or -1, unmapped) 4 at 3 is outside [-1, 4)"),
    ("elaborate", "poplar", _init_shape, "tensor 0 ('v'): initial value is float32 of shape (2, 4)"),
    ("elaborate", "poplar", _view_other_tensor, "field 'x': vertex 2 is connected to tensor 1, vertex 0 to 0"),
    ("elaborate", "poplar", _view_index, "field 'x' vertex 2 (a view of 'v', 8 elements): indices span [104, 105]"),
    ("elaborate", "poplar", _unknown_codelet, "codelet 'Nope' is not a vertex codelet"),
    ("elaborate", "poplar", _missing_connection, "(Scale): connections are for [], the codelet's are ['x']"),
    ("elaborate", "poplar", _missing_state, "(Scale): state 'k' has 3 values for 4 vertices"),
    ("elaborate", "poplar", _syms_length, "(Scale): symbol 'n' has (3,) values for 4 vertices"),
    ("elaborate", "poplar", _span_ids, "(Scale): has (5,) span ids for 4 vertices"),
    ("elaborate", "poplar", _vertex_tile, "(Scale): tile 9 at 0 is outside [0, 4)"),
    ("elaborate", "poplar", _sym_value, "(RowSum) field 'a' vertex 0: axis 1 has size 4, symbol 'p' says [5]"),
    ("elaborate", "poplar", _unknown_cs, "program: executes unknown compute set 'nope'"),
    ("elaborate", "poplar", _copy_sizes, "copy v -> w: copies 8 f32 elements to 4 f32 elements"),
    ("elaborate", "poplar", _cond_not_bool, "if condition: is 1 f32 elements, not one bool"),
    ("elaborate", "tensor", _output_not_a_view, "output 'junk': is a int, neither a View nor a node"),
    ("elaborate", "tensor", _later_argument, "argument %"),
    ("partition", "poplar", _tile_out_of_range, "tensor 0 ('v'): tile 4 at 3 is outside [0, 4)"),
    ("partition", "poplar", _sym_value, "axis 1 has size 4, symbol 'p' says [5]"),
    ("partition", "tensor", _step_left, "after partition: program: still holds a Step"),
    ("partition", "tensor", _unmapped, "tile -1 at 0 is outside [0, 4)"),
    ("partition", "tensor", _output_node, "output 'loss': is a Node, not a View"),
    ("partition", "tensor", _stacked_sym, "says ["),
    ("partition", "tensor", _stacked_tensor, "which does not exist"),
    ("partition", "tensor", _op_record, "op record of %0 (relu): names unknown compute set 'nope'"),
    ("partition", "tensor", _inplace_mapping, "are mapped differently (runs [0:"),
    ("partition", "tensor", _inplace_tensor, "names a tensor or compute set that does not exist"),
]


@pytest.mark.parametrize("name, program, corrupt, message", CORRUPT_GRAPHS,
                         ids=[c[2].__name__.strip("_") for c in CORRUPT_GRAPHS])
def test_corrupt_graph_is_rejected(name, program, corrupt, message):
    result = stage(program, name)
    if name == "partition" and program == "tensor":
        assert result.inplace, "the program must have an in-place record to corrupt"
    corrupt(result)
    with pytest.raises(AssertionError, match="^after ") as e:
        VERIFIERS[name](result)
    assert message in str(e.value)


# ---------------------------------------------------------------- lowered and planned

def _tensor_id_of(low, name):
    return next(t.id for t in low.graph.tensors if t.name == name)


def _region_lengths(low):
    low.region_size = np.append(low.region_size, 8)


def _region_size(low):
    low.region_size[0] = -8


def _region_tile(low):
    low.region_tile[0] = 4


def _layout_of(low, name):
    return low.layouts[_tensor_id_of(low, name)]


def _misaligned(low):
    _layout_of(low, "v").layout.run_off[-1] += 1


def _wrong_tile(low):
    lay = _layout_of(low, "v").layout
    lay.tiles[0] = (lay.tiles[0] + 1) % 4


def _outside_region(low):
    _layout_of(low, "v").layout.counts[0] += 1


def _foreign_region(low):
    low.region_tensor[_layout_of(low, "v").first] = _tensor_id_of(low, "w")


def _vertex_outside(low):
    grp = low.compute_sets[0].groups[0]
    grp.table[1, 0] += 1000


def _vertex_region_tile(low):
    grp = low.compute_sets[0].groups[0]
    grp.region[1, 0] = grp.region[0, 0]


def _vertex_order(low):
    grp = low.compute_sets[0].groups[0]
    grp.tiles[:] = grp.tiles[::-1].copy()


def _copy_run(low):
    low.copies[0].parts[0][4][0] += 1000


def _program_index(low):
    low.program = X.PSeq(low.program.body + (X.PExecute(99),))


def _read_dtype(low):
    label, _, t, idx = low.reads[0]
    low.reads[0] = (label, "i32", t, idx)


def _missing_native(gen):
    gen.codelets.pop("Scale")


def _plan_vertex_tile(result):
    exe, _ = result
    exe.compute_sets[0].groups[0].table[0, 0] += exe.target.tile_memory


def _plan_vertex_misaligned(result):
    exe, _ = result
    exe.compute_sets[0].groups[0].table[0, 0] += 2


def _plan_copy_crosses(result):
    exe, _ = result
    c = exe.copies[0]
    c.src[0] = exe.target.tile_memory - 2


def _plan_tensor_addr(result):
    exe, _ = result
    exe.tensor_runs[0].addrs[0] = exe.target.tiles * exe.target.tile_memory


def _plan_shape(result):
    result[0].memory.planned = result[0].memory.planned[:-1]


def _plan_over_capacity(result):
    result[0].memory.code[1] = result[0].target.tile_memory


def _plan_below_bound(result):
    result[0].memory.lower_bound[2] = result[0].memory.planned[2] + 8


def _plan_native(result):
    return result[0], types.SimpleNamespace(codelets={})


def _plan_program(result):
    exe = result[0]
    exe.program = X.PSeq(exe.program.body + (X.PPrint(len(exe.reads)),))


CORRUPT_LOWERED = [
    ("lower", _region_lengths, "region arrays: differ in length"),
    ("lower", _region_size, "regions: size -8 at 0 is outside"),
    ("lower", _region_tile, "regions: tile 4 at 0 is outside [0, 4)"),
    ("lower", _misaligned, "tensor 0 ('v'): run at offset"),
    ("lower", _wrong_tile, "tensor 0 ('v'): regions on other tiles than its mapping's"),
    ("lower", _outside_region, "tensor 0 ('v'): regions sized unlike its elements per tile"),
    ("lower", _foreign_region, "tensor 0 ('v'): a region of its layout is another's"),
    ("lower", _vertex_outside, "group 0 (Scale) field 'x': vertex 1: bytes [1000, 1008) are misaligned or outside region 1 (size 8)"),
    ("lower", _vertex_region_tile, "group 0 (Scale) field 'x': vertex 1 on tile 1 points into region"),
    ("lower", _vertex_order, "group 0 (Scale): vertex 1 is on a lower tile than vertex 0"),
    ("lower", _copy_run, "program copy 0: run 0 of 1008 bytes"),
    ("lower", _program_index, "program: executes compute set 99 of 3"),
    ("lower", _read_dtype, "read 0 ('flag'): of tensor 4 as i32 does not match the tensor"),
    ("codegen", _missing_native, "after codegen: codelets: vertices use ['Scale'], which have no native code"),
    ("plan", _plan_vertex_tile, "group 0 (Scale) field 'x': vertex 0: bytes"),
    ("plan", _plan_vertex_misaligned, "are not inside the data planned on tile 0 (tile memory 638976 B), or not 4-aligned"),
    ("plan", _plan_copy_crosses, "program copy 0: source run 0: bytes"),
    ("plan", _plan_tensor_addr, "tensor 0 ('v'): run 0: bytes [2555904, "),
    ("plan", _plan_shape, "memory plan: planned has shape (3,), not (4,)"),
    ("plan", _plan_over_capacity, "memory plan: tile 1 holds"),
    ("plan", _plan_below_bound, "memory plan: tile 2 is planned in"),
    ("plan", _plan_native, "names no vertex codelet of the executable with native code"),
    ("plan", _plan_program, "program: PPrint reads 5 of 5"),
]


@pytest.mark.parametrize("name, corrupt, message", CORRUPT_LOWERED,
                         ids=[c[1].__name__.strip("_") for c in CORRUPT_LOWERED])
def test_corrupt_vertex_graph_or_plan_is_rejected(name, corrupt, message):
    result = stage("poplar", name)
    result = corrupt(result) or result
    with pytest.raises(AssertionError, match="^after ") as e:
        VERIFIERS[name](result)
    assert message in str(e.value)


# ---------------------------------------------------------------- no two live regions share a byte

def _brute_clash(t, lo, size, s, e) -> bool:
    n = len(t)
    return any(t[i] == t[j] and size[i] and size[j] and lo[i] < lo[j] + size[j] and lo[j] < lo[i] + size[i]
               and s[i] <= e[j] and s[j] <= e[i] for i in range(n) for j in range(i))


_REGION = st.tuples(st.integers(0, 2), st.integers(0, 160), st.integers(0, 40), st.integers(0, 6),
                    st.integers(0, 3))


@settings(max_examples=400, deadline=None)
@given(regions=st.lists(_REGION, max_size=24), chunk=st.sampled_from([1, 3, 1 << 22]))
def test_overlap_check_agrees_with_brute_force(regions, chunk):
    """Random regions (tile, offset, size, first point, length of life): the check
    fails exactly when some pair shares a byte while both live."""
    t, lo, size, s, ln = (np.array([r[k] for r in regions], np.int64) for k in range(5))
    e = s + ln
    clash = _brute_clash(t, lo, size, s, e)
    old, VL.PAIR_CHUNK = VL.PAIR_CHUNK, chunk
    try:
        if clash:
            with pytest.raises(AssertionError, match="share bytes of tile"):
                VL.verify_no_overlap(t, lo, size, s, e)
        else:
            VL.verify_no_overlap(t, lo, size, s, e)
    finally:
        VL.PAIR_CHUNK = old


@st.composite
def valid_plans(draw):
    """Regions placed first-fit with 8-byte alignment among those live at once:
    valid plans with reuse over time, padding and neighbours of one lifetime."""
    n = draw(st.integers(2, 40))
    t = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.int64)
    size = np.array(draw(st.lists(st.integers(1, 70), min_size=n, max_size=n)), np.int64)
    s = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), np.int64)
    e = s + np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int64)
    lo = np.zeros(n, np.int64)
    for i in range(n):
        at = 0
        others = [j for j in range(i) if t[j] == t[i] and s[j] <= e[i] and s[i] <= e[j]]
        for j in sorted(others, key=lambda j: lo[j]):
            if at + size[i] <= lo[j]:
                break
            at = max(at, -(-(lo[j] + size[j]) // 8) * 8)
        lo[i] = at
    return t, lo, size, s, e


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=valid_plans(), data=st.data())
def test_overlap_check_passes_valid_plans_and_finds_a_planted_overlap(plan, data):
    t, lo, size, s, e = plan
    assert not _brute_clash(t, lo, size, s, e)
    VL.verify_no_overlap(t, lo, size, s, e)
    pairs = [(i, j) for i in range(len(t)) for j in range(len(t))
             if i != j and t[i] == t[j] and s[i] <= e[j] and s[j] <= e[i]]
    assume(pairs)
    i, j = data.draw(st.sampled_from(pairs))
    lo = lo.copy()
    lo[i] = lo[j] + data.draw(st.integers(0, int(size[j]) - 1))     # i now starts inside j
    with pytest.raises(AssertionError, match="share bytes of tile") as err:
        VL.verify_no_overlap(t, lo, size, s, e)
    named = {int(k) for k in re.search(r"regions (\d+) and (\d+)", str(err.value)).groups()}
    assert named == {i, j} or _several_clash(t, lo, size, s, e)


def _several_clash(t, lo, size, s, e) -> bool:
    return sum(t[i] == t[j] and lo[i] < lo[j] + size[j] and lo[j] < lo[i] + size[i] and s[i] <= e[j]
               and s[j] <= e[i] for i in range(len(t)) for j in range(i)) > 1


def test_memplan_verifies_its_plan_and_finds_a_planted_overlap(monkeypatch):
    from popdsl.passes import memplan
    target = get_target("gc200", tiles=4)
    compile_source(TENSOR, "<test>", target, verify=True)
    # A planner that puts every allocation at offset 0: overlaps everywhere.
    monkeypatch.setattr(memplan, "_plan_tiles",
                        lambda problems, reuse, bounds: [(np.zeros(len(p[0]), np.int64), int(p[0].max(initial=0)))
                                                         for p in problems])
    monkeypatch.setenv("POPDSL_VERIFY", "0")
    compile_source(TENSOR, "<test>", target)                  # not verified: nothing notices
    with pytest.raises(AssertionError, match="after plan: memory plan: regions .* share bytes of tile"):
        compile_source(TENSOR, "<test>", target, verify=True)


# ---------------------------------------------------------------- the pipeline and popc run them

def _broken_lowering(monkeypatch):
    """The lower stage made to give a vertex an address outside its region."""
    def run(opts, graph, real=next(s for s in pipeline.STAGES if s.name == "lower").run):
        low = real(opts, graph)
        low.compute_sets[0].groups[0].table[0, 0] += 1 << 20
        return low
    stages = tuple(dataclasses.replace(s, run=run) if s.name == "lower" else s for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)


def test_pipeline_runs_the_verifiers_only_when_asked(monkeypatch):
    _broken_lowering(monkeypatch)
    target = get_target("gc200", tiles=4)
    compile_source(POPLAR, "<test>", target, verify=False)
    with pytest.raises(AssertionError, match="after lower: compute set 0 .* field 'x': vertex 0"):
        compile_source(POPLAR, "<test>", target, verify=True)


def test_popc_verify(tmp_path, capsys, monkeypatch):
    p = tmp_path / "demo.pop"
    p.write_text(POPLAR)
    monkeypatch.setenv("POPDSL_VERIFY", "0")
    assert main(["check", str(p), "--verify"]) == 0
    assert "ok (graph 'demo'" in capsys.readouterr().out
    _broken_lowering(monkeypatch)
    assert main(["check", str(p)]) == 0
    capsys.readouterr()
    assert main(["check", str(p), "--verify"]) == 70
    err = capsys.readouterr().err
    assert "internal compiler error: AssertionError: after lower: compute set 0 ('scale')" in err
    assert main(["dump", str(p), "--after", "lower", "--verify"]) == 70
