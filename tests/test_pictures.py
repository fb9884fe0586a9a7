"""Pictures (README: "Pictures and traces"), tested by what their pixels show, not
only that a file exists: the compiled graph has lit structure in several distinct
colours; the memory map marks the busiest tile where it is; the liveness picture
marks the peak where it is.  The compiled graph's edges are checked against the
program order and across the two ways of building them.  Small examples keep this
fast; matplotlib and igraph come with the `test` extra (and `viz`)."""
from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl.report.dataflow import compiled_graph, cs_order

mpl = pytest.importorskip("matplotlib")
pytest.importorskip("igraph")
from matplotlib.colors import rgb_to_hsv  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from popdsl.report import pictures  # noqa: E402
from popdsl.report.graphpicture import BACKGROUND, draw_graph  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MARK = np.array([0x00, 0xE5, 0xFF]) / 255


@pytest.fixture(scope="module")
def lstm():
    # Every time step drawn where it runs (README's pictures are drawn so): with
    # outlining, the steps alike are one function, drawn once.
    return popdsl.compile(ROOT / "examples/lstm.pop", outline=False)



def _rgb(path) -> np.ndarray:
    return imread(str(path))[:, :, :3].astype(np.float64)


def _hue_clusters(img: np.ndarray) -> int:
    """Hue bins (of 12) holding at least 1% of the picture's bright, saturated pixels
    (one of the digits network's layers, a visible cluster of its own, is 1.5%
    since its convolution's plan has half the vertices)."""
    hsv = rgb_to_hsv(img.reshape(-1, 3))
    lit = hsv[(hsv[:, 2] > 0.3) & (hsv[:, 1] > 0.3)]
    counts = np.bincount((lit[:, 0] * 12).astype(int) % 12, minlength=12)
    return int((counts >= 0.01 * max(lit.shape[0], 1)).sum())


def _near(img: np.ndarray, xy, colour, radius: int = 10, tol: float = 0.12) -> int:
    x, y = int(round(xy[0])), int(round(xy[1]))
    win = img[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1]
    return int((np.abs(win - colour).max(axis=2) < tol).sum())


def _graph_panel(img: np.ndarray) -> np.ndarray:
    """The whole-graph panel: a square of the picture's height less 1.6 inches (at
    100 dpi), its top 0.75 inch down, at the left."""
    side = img.shape[0] - 160
    return img[75:75 + side, 10:10 + side]


def test_graph_picture_shows_structure_in_several_colours(lstm, tmp_path):
    pic = lstm.draw_graph(tmp_path / "g.png", sections=2, pixels=900)
    img = _rgb(pic.path)
    assert img.shape[:2] == (pic.height, pic.width)
    panel = _graph_panel(img)
    lit = (np.abs(panel - BACKGROUND).max(axis=2) > 0.08).mean()
    assert 0.02 < lit < 0.8, lit                   # drawn, and not a flood
    assert _hue_clusters(panel) >= 4               # layers in distinct colours
    assert "one node per vertex" in pic.note


def test_graph_picture_aggregates_big_graphs_and_says_so(lstm, tmp_path):
    pic = draw_graph(lstm.ir, str(tmp_path / "g.png"), max_nodes=300, sections=0, pixels=600)
    assert "one node per (compute set, " in pic.note
    panel = _graph_panel(_rgb(pic.path))
    assert (np.abs(panel - BACKGROUND).max(axis=2) > 0.08).mean() > 0.01
    assert _hue_clusters(panel) >= 3


def test_graph_edges_follow_the_program(lstm):
    # (Without outlining: a call runs its compute sets again, so values would flow
    # back to a compute set that ran before, from one call's results to the next's.)
    g = compiled_graph(lstm.ir, group_tiles=0)
    order = np.empty(len(lstm.ir.compute_sets), np.int64)
    order[cs_order(lstm.ir)] = np.arange(order.size)
    assert g.vertices == sum(len(t.tiles) for cs in lstm.ir.compute_sets for t in cs.groups)
    v = ~g.is_data[g.src]
    # LSTM's program is straight-line: every value is written before it is read.
    assert (order[g.node_cs[g.src[v]]] < order[g.node_cs[g.dst[v]]]).all()
    # Data nodes (weights, inputs) are only read.
    assert not g.is_data[g.dst].any() and g.is_data[g.src].any()
    # Every vertex node joins the graph.
    joined = np.zeros(g.nodes, bool)
    joined[g.src] = joined[g.dst] = True
    assert joined[~g.is_data].mean() > 0.95


@pytest.mark.parametrize("group", [1, 4])
def test_grouped_graph_is_the_vertex_graph_grouped(lstm, group):
    """Grouped, exchange is followed to the reading group directly, not through
    the buffers: the same edges as the vertex graph's, grouped."""
    nt = lstm.ir.target.tiles
    full, grouped = compiled_graph(lstm.ir, group_tiles=0), compiled_graph(lstm.ir, group_tiles=group)

    def keys(g):
        return np.where(g.node_cs >= 0, g.node_cs.astype(np.int64) * nt + g.node_tile // group,
                        -1 - (g.node_tensor.astype(np.int64) * nt + g.node_tile // group))
    kf, kg = keys(full), keys(grouped)
    a = {e for e in zip(kf[full.src].tolist(), kf[full.dst].tolist()) if e[0] != e[1]}
    b = set(zip(kg[grouped.src].tolist(), kg[grouped.dst].tolist()))
    assert a == b


def test_memory_map_marks_the_busiest_tile(lstm, tmp_path):
    pic = lstm.draw_memory_map(tmp_path / "m.png")
    img = _rgb(pic.path)
    total = lstm.ir.memory.total
    assert pic.note.endswith(f"busiest tile {int(np.argmax(total))}")
    assert set(pic.marks) == {f"busiest_{k}" for k in range(1, 6)}
    for xy in pic.marks.values():
        assert _near(img, xy, MARK, radius=14) >= 10, xy
    # The mark's colour is the mark's alone: far from the marks it is rare.
    far = np.ones(img.shape[:2], bool)
    for x, y in pic.marks.values():
        far[max(int(y) - 30, 0):int(y) + 30, max(int(x) - 60, 0):int(x) + 60] = False
    assert (np.abs(img - MARK).max(axis=2) < 0.12)[far].mean() < 0.002
    # The heat map is not flat: several distinct colours.
    assert len(np.unique((img * 8).astype(int).reshape(-1, 3), axis=0)) > 20


def test_liveness_marks_the_peak_where_it_is(lstm, tmp_path):
    pic = lstm.draw_liveness(tmp_path / "l.png")
    img = _rgb(pic.path)
    m = lstm.ir.memory
    live = sum(m.timeline_categories.values()) + m.code.sum() + m.vertex_state.sum()
    peak = int(np.argmax(live))
    assert f"at point {peak}" in pic.note
    assert _near(img, pic.marks["peak"], MARK, radius=8) >= 20
    # The mark stands at the peak: left of it the plot has lower points.
    x0 = pic.marks["peak"][0]
    n = live.size
    assert abs(x0 - (0.07 + 0.9 * (peak + 0.5) / n) * pic.width) < 0.05 * pic.width
    # Three categories that change plus two constant ones are drawn in their colours.
    for cat in ("always_live", "not_always_live", "code"):
        colour = np.array(mpl.colors.to_rgb(pictures.CATEGORY_COLOURS[cat]))
        assert (np.abs(img - colour).max(axis=2) < 0.05).sum() > 200, cat


def test_report_draws_all_three(popc, tmp_path):
    out = [tmp_path / f"{k}.png" for k in "gml"]
    code, stdout, err = popc("report", ROOT / "examples/scale_demo.pop", "--graph-picture", out[0],
                             "--memory-map", out[1], "--liveness", out[2])
    assert code == 0, err
    assert stdout == ""                                 # pictures only: no text report
    assert all(p.stat().st_size > 10_000 for p in out)
    assert err.count("wrote ") == 3
    code, stdout, _ = popc("report", ROOT / "examples/scale_demo.pop", "--memory", "--memory-map", out[1])
    assert code == 0 and "memory of graph" in stdout


def test_report_picture_errors(popc, tmp_path, monkeypatch):
    f = ROOT / "examples/scale_demo.pop"
    code, _, err = popc("report", f, "--liveness", tmp_path / "no" / "l.png")
    assert code == 1 and "cannot write --liveness" in err
    code, _, err = popc("report", f, "--memory-map", tmp_path)
    assert code == 1 and "is a directory" in err
    real = builtins.__import__

    def no_viz(name, *a, **k):
        if name.split(".")[0] in ("matplotlib", "igraph"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_viz)
    code, _, err = popc("report", f, "--graph-picture", tmp_path / "g.png")
    assert code == 1
    assert "pip install 'popdsl[viz]'" in err and "matplotlib and igraph" in err
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(pictures.PicturesUnavailable, match=r"popdsl\[viz\]"):
        pictures.draw_liveness(popdsl.compile(f).ir, str(tmp_path / "l.png"))


@pytest.mark.parametrize("name, note", [("digits.pop", "one node per vertex"),
                                        ("resnet50.pop", "one node per (compute set, ")])
def test_example_graphs_are_drawn_with_their_layers(name, note, tmp_path):
    """The README's pictures: the digits network's training graph (a node per vertex)
    and ResNet-50's (grouped, saying so), each lit in several layer colours.
    ResNet-50 comes from the build cache when test_examples compiled it first."""
    exe = popdsl.compile(ROOT / "examples" / name)
    pic = exe.draw_graph(tmp_path / "g.png", sections=3)
    assert note in pic.note
    panel = _graph_panel(_rgb(pic.path))
    lit = (np.abs(panel - BACKGROUND).max(axis=2) > 0.08).mean()
    assert 0.02 < lit < 0.8, lit
    assert _hue_clusters(panel) >= 4


def test_alexnet_training_graph_is_drawn_with_its_layers(tmp_path):
    """examples/alexnet_train.pop (forward, backward and SGD update at batch 35, the
    largest that fits) on a GC200: its 61,100,840 parameters, its busiest tile within
    the tile's memory, and its compiled graph drawn grouped, saying so, with the
    layers in distinct colours.  Under the defaults `auto` recomputes 2 of its 4
    segments (four tries, 94 B to spare with this llvmlite's code sizes), so only
    fitting is asserted."""
    exe = popdsl.compile(ROOT / "examples/alexnet_train.pop")
    assert sum(int(np.prod(t.shape)) for t in exe.ir.tensors if t.kind == "param") == 61_100_840
    assert int(exe.ir.memory.total.max()) <= exe.target.tile_memory
    assert {"forward", "backward"} <= {o["phase"] for o in exe.ir.ops}
    pic = exe.draw_graph(tmp_path / "alexnet.png", sections=3)
    assert "one node per (compute set, " in pic.note
    panel = _graph_panel(_rgb(pic.path))
    lit = (np.abs(panel - BACKGROUND).max(axis=2) > 0.08).mean()
    assert 0.02 < lit < 0.8, lit
    assert _hue_clusters(panel) >= 4
