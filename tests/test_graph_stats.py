"""`popc report`'s graph figures, as Poplar counts them (README: "Graph figures"),
checked against a program small enough to count by hand."""
from __future__ import annotations

import json

import popdsl
from popdsl import cli
from popdsl.report.graphstats import graph_stats

# Tile 0 holds a, tile 1 holds b; c is spread: c[0:2] on tile 0, c[2:4] on tile 1.
PROGRAM = """\
codelet AddK(in x: f32[n], out y: f32[n], k: f32) {
    for i in 0..n { y[i] = x[i] + k; }
}
codelet Scale(inout x: f32[n], k: f32) {
    for i in 0..n { x[i] = x[i] * k; }
}
graph g(tiles = 2) {
    var a: f32[4] = [1, 2, 3, 4];
    var b: f32[4];
    var c: f32[4];
    map a -> tile 0;
    map b -> tile 1;
    map c -> linear;
    compute one {
        AddK(x = a[0:2], y = b[0:2], k = 1.0) on tile 1;
        AddK(x = a[2:4], y = b[2:4], k = 1.0) on tile 1;
    }
    compute two {
        Scale(x = c[0:1], k = 2.0) on tile 0;
        Scale(x = c[1:2], k = 2.0) on tile 0;
        Scale(x = c[2:4], k = 2.0) on tile 1;
    }
    program {
        execute one;
        copy b -> c;
        repeat 3 { execute two; }
        print c;
    }
}
"""
# By hand:
#   vertices      2 AddK + 3 Scale = 5, on both tiles
#   edges         AddK has two edge fields (x, y; k is state), Scale one (x): 2*2 + 3*1 = 7
#   compute sets  one, two = 2 (two runs three times: still one compute set)
#   variables     a, b, c = 3 vars
#   exchange      one reads all of a (tile 0) on tile 1: 4 x 4 B = 16 B; the copy moves
#                 b[0:2] (tile 1) to c[0:2] (tile 0): 8 B (b[2:4] -> c[2:4] stays on tile 1); two: none
EXPECTED = {"vertices": 5, "edges": 7, "compute_sets": 2, "variables": 3,
            "variables_by_kind": {"input": 0, "param": 0, "var": 3, "temp": 0},
            "exchange_bytes": 24, "tiles_with_vertices": 2}


def test_graph_stats_by_hand():
    exe = popdsl.compile(PROGRAM, cache=False)
    assert graph_stats(exe.ir).to_json() == EXPECTED
    with popdsl.Simulator(exe, threads=1) as sim:
        sim.run()
        assert sim.read("c").tolist() == [16, 24, 32, 40]      # (a + 1) * 2^3


def test_graph_stats_in_popc_report(tmp_path, capsys):
    src = tmp_path / "g.pop"
    src.write_text(PROGRAM)
    assert cli.main(["report", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_stats"] == EXPECTED
    assert cli.main(["report", str(src), "--partition", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_stats"] == EXPECTED
    assert cli.main(["report", str(src)]) == 0
    text = capsys.readouterr().out
    assert "vertices 5 on 2 tiles; edges 7 (vertex fields connected to tensor regions)" in text
    assert "compute sets 2; variables 3 (3 var)" in text
    assert "exchange 24 B between tiles (each exchange of the graph once)" in text
    # A .popx gives the figures of the program it was built from.
    assert cli.main(["build", str(src), "-o", str(tmp_path / "g.popx")]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "g.popx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_stats"] == EXPECTED


def test_graph_stats_of_a_tensor_program():
    """The partitioner's vertices are counted like hand-placed ones: a dense layer
    on 4 tiles, with params, an input and results of the tensor program."""
    exe = popdsl.compile('import "popnn";\ngraph m(tiles = 4) {\n  input x: f32[2, 8];\n'
                         '  output y = relu(dense(x, 6));\n}\n', cache=False)
    s = graph_stats(exe.ir)
    nv = sum(len(g.tiles) for cs in exe.ir.compute_sets for g in cs.groups)
    assert s.vertices == nv > 0 and s.edges >= s.vertices
    assert s.variables_by_kind["input"] == 1 and s.variables_by_kind["param"] == 2
    assert s.variables == len(exe.ir.tensors) and s.compute_sets == len(exe.ir.compute_sets)
