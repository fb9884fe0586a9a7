"""The picture of a compiled graph, as Graphcore drew Poplar's: vertices and edges
laid out by a force-directed layout, coloured by layer, glowing on black.

Requires an `Executable`, matplotlib and igraph (the optional extra, `pip install
'popdsl[viz]'`, imported lazily); produces a PNG (written atomically) and a
`report.pictures.Picture`.

* The graph is `report.dataflow.compiled_graph`: a node per vertex, or per (compute
  set, group of tiles) when there are more than `max_nodes` vertices (the picture
  says which), always-live tensors as data nodes; an edge from the writer of the
  bytes a vertex reads to the vertex.
* Layout: igraph's Fruchterman–Reingold, with its grid above 1,000 nodes
  (repulsion between near nodes only, so an iteration costs about the size of the
  graph), from a random start; a fixed seed makes the picture the same every time.
* Drawing is numpy: each edge is sampled along its length (about a point a pixel)
  and added into an RGB image in its reader's colour, nodes on top, then
  tone-mapped, so a million edges cost seconds and dense bundles glow.  When the
  points would pass `MAX_SAMPLES`, long edges get fewer, each carrying more (the
  picture says so).
* Enlarged sections: beside the whole graph, up to three layers (the largest in
  each third of the program) drawn vertex by vertex as vectors, with the layer
  that feeds them, on the first tiles they use.
"""
from __future__ import annotations

import random
import time

import numpy as np

from popdsl.ir.executable import Executable
from popdsl.ir.index import unique
from popdsl.report.dataflow import CompiledGraph, compiled_graph, cs_layers, subgraph, tensor_regions
from popdsl.report.pictures import Picture, new_figure, require, save

BACKGROUND = (0.02, 0.02, 0.05)
MAX_SAMPLES = 12_000_000
SECTION_VERTICES = 700
SECTION_TILES = 256           # tiles a section's vertices are followed on (`section_tiles`)


def layer_of_nodes(g: CompiledGraph, cs_layer: np.ndarray) -> np.ndarray:
    """Layer per node: its compute set's; a data node takes its earliest reader's."""
    layer = np.where(g.node_cs >= 0, cs_layer[np.maximum(g.node_cs, 0)], np.iinfo(np.int64).max).astype(np.int64)
    data = g.is_data
    reads = data[g.src] & ~data[g.dst]
    np.minimum.at(layer, g.src[reads], layer[g.dst[reads]])
    layer[layer == np.iinfo(np.int64).max] = 0
    return layer


def colours(layer: np.ndarray, nlayers: int) -> np.ndarray:
    """RGB per layer: distinct colours for a few layers, the turbo ramp over depth for many."""
    from matplotlib import colormaps
    if nlayers <= 10:
        table = np.asarray(colormaps["tab10"].colors)[:max(nlayers, 1)]
    elif nlayers <= 20:
        table = np.asarray(colormaps["tab20"].colors)[:nlayers]
    else:
        table = colormaps["turbo"](np.linspace(0.05, 0.95, nlayers))[:, :3]
    return table[np.clip(layer, 0, len(table) - 1)]


def layout(g: CompiledGraph, seed: int = 0, iterations: int | None = None) -> np.ndarray:
    """(nodes, 2) positions by igraph's Fruchterman–Reingold, with its grid above
    1,000 nodes; edges pull by the log of their weight.  Iterations: 1,000 for up
    to 200,000 edges, else 300."""
    import igraph as ig
    n = g.nodes
    if n == 0:
        return np.zeros((0, 2))
    if iterations is None:
        iterations = 1000 if g.src.size <= 200_000 else 300
    G = ig.Graph(n=n, edges=np.column_stack([g.src, g.dst]).tolist())
    w = (1 + np.log1p(g.weight)).tolist() if g.weight.size else None
    # igraph's own random start, from a generator of our seed (then igraph's default again).
    ig.set_random_number_generator(random.Random(seed))
    try:
        pos = G.layout_fruchterman_reingold(weights=w, niter=iterations, grid=n > 1000)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(pos.coords, np.float64)


def rasterise(pos: np.ndarray, src, dst, edge_rgb: np.ndarray, node_rgb: np.ndarray,
              size: tuple[int, int], node_px: int = 1, edge_gain: float = 1.0) -> tuple[np.ndarray, float]:
    """An RGB image (h, w, 3) in [0, 1] of the graph on black: edges sampled about
    once a pixel and added in their colours, nodes added on top, tone-mapped.
    Returns (image, fraction of edge samples kept)."""
    h, w = size
    out = np.zeros((3, h * w))
    if pos.shape[0] == 0:
        return np.broadcast_to(np.asarray(BACKGROUND), (h, w, 3)).copy(), 1.0
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    scale = 0.94 * min(w / max(hi[0] - lo[0], 1e-9), h / max(hi[1] - lo[1], 1e-9))
    px = (pos - (lo + hi) / 2) * scale + np.array([w / 2, h / 2])
    keep = 1.0
    if len(src):
        length = np.linalg.norm(px[src] - px[dst], axis=1)
        k = np.maximum(np.ceil(length), 1).astype(np.int64)
        total = int(k.sum())
        if total > MAX_SAMPLES:
            keep = MAX_SAMPLES / total
            k = np.maximum(np.ceil(length * keep), 1).astype(np.int64)
        # A sparser sampling carries more per point, so a line keeps its brightness.
        per_point = np.maximum(length, 1) / k
        # Chunks bound the temporary arrays.
        cuts = np.searchsorted(np.cumsum(k), np.arange(1, 1 + int(k.sum()) // 4_000_000) * 4_000_000)
        for a, b in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(k)]))):
            if a >= b:
                continue
            kk = k[a:b]
            e = np.repeat(np.arange(a, b), kk)
            t = (np.arange(int(kk.sum())) - np.repeat(np.cumsum(kk) - kk, kk) + 0.5) / np.repeat(kk, kk)
            p = px[src[e]] + (px[dst[e]] - px[src[e]]) * t[:, None]
            x, y = p[:, 0].astype(np.int64), p[:, 1].astype(np.int64)
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            idx = y[ok] * w + x[ok]
            wt = per_point[e[ok]]
            for ch in range(3):
                out[ch] += np.bincount(idx, weights=edge_rgb[e[ok], ch] * wt, minlength=h * w)
    out *= edge_gain
    nodes = np.zeros((3, h * w))
    r = node_px
    for dx in range(-r + 1, r):
        for dy in range(-r + 1, r):
            x = (px[:, 0] + dx).astype(np.int64)
            y = (px[:, 1] + dy).astype(np.int64)
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            for ch in range(3):
                nodes[ch] += np.bincount(y[ok] * w + x[ok], weights=node_rgb[ok, ch], minlength=h * w)
    lum = out.sum(axis=0)
    nz = lum[lum > 0]
    ref = np.percentile(nz, 90) if nz.size else 1.0
    img = 1 - np.exp(-(out / max(ref, 1e-12)) * 1.2)
    nl = nodes.sum(axis=0)
    nref = np.percentile(nl[nl > 0], 90) if (nl > 0).any() else 1.0
    img = np.maximum(img, 1 - np.exp(-(nodes / max(nref, 1e-12)) * 2.0))
    img = img.reshape(3, h, w).transpose(1, 2, 0)
    bg = np.asarray(BACKGROUND)
    return bg + (1 - bg) * img, keep



def _sections(exe: Executable, cs_layer: np.ndarray, count: int) -> list[tuple[int, np.ndarray]]:
    """Up to `count` layers to enlarge, one from each part of the program: layers of
    several phases (a matmul's or a convolution's blocks and their reduction) first,
    then the most vertices.  (layer, its compute sets and the previous layer's,
    which feed it.)"""
    nl = int(cs_layer.max()) + 1 if cs_layer.size else 0
    verts = np.zeros(nl, np.int64)
    phases = np.zeros(nl, np.int64)
    for i, cs in enumerate(exe.compute_sets):
        n = sum(len(g.tiles) for g in cs.groups)
        verts[cs_layer[i]] += n
        phases[cs_layer[i]] += n > 0
    score = verts + np.where(phases > 1, verts.max(initial=0) + 1, 0)
    out = []
    for part in np.array_split(np.arange(nl), min(count, nl)):
        if part.size and verts[part].max() > 0:
            lay = int(part[np.argmax(score[part])])
            out.append((lay, np.nonzero((cs_layer == lay) | (cs_layer == lay - 1))[0]))
    return out


def neighbourhood(sg: CompiledGraph, own: np.ndarray, size: int) -> np.ndarray:
    """Up to `size` nodes of `sg` met breadth first from the layer's vertex (`own`
    marks the layer's nodes) with the most edges; not through data nodes, which
    join whole layers."""
    import igraph as ig
    if sg.nodes == 0:
        return np.zeros(0, np.int64)
    deg = np.bincount(np.concatenate([sg.src, sg.dst]), minlength=sg.nodes)
    start = int(np.argmax(np.where(own & ~sg.is_data, deg, -1)))
    walk = ~sg.is_data[sg.src] & ~sg.is_data[sg.dst]
    G = ig.Graph(n=sg.nodes, edges=np.column_stack([sg.src[walk], sg.dst[walk]]).tolist())
    order = np.asarray(G.bfs(start)[0], np.int64)[:size]
    # The data these vertices read, as far as room allows.
    keep = np.zeros(sg.nodes, bool)
    keep[order] = True
    data = unique(sg.src[sg.is_data[sg.src] & keep[sg.dst]])
    return np.concatenate([order, data[:max(size // 4, 0)]])


def section_tiles(g: CompiledGraph, css: np.ndarray, tiles: int) -> np.ndarray:
    """The tiles a section is drawn from (a bool mask): those of the grouped graph
    `g`'s nodes met breadth first from the busiest node of compute sets `css`, until
    about `tiles` tiles.  Following every vertex of a layer over the whole chip only
    to draw SECTION_VERTICES of them cost minutes on AlexNet's training graph; the
    neighbourhood drawn lies on few tiles anyway."""
    ntiles = g.exe.target.tiles
    mask = np.zeros(ntiles, bool)
    own = np.isin(g.node_cs, css)
    if not own.any():
        return mask
    span = max(g.group_tiles, 1)
    for n in neighbourhood(g, own, max(tiles // span, 1)):
        if not g.is_data[n]:
            mask[g.node_tile[n]:g.node_tile[n] + span] = True
    return mask


def _draw_section(fig, box, exe: Executable, section, labels, cs_layer, regions, seed: int,
                  grouped: CompiledGraph):
    """One enlarged section, drawn as vectors: a neighbourhood of SECTION_VERTICES
    nodes in the layer, on the tiles `section_tiles` picks from the `grouped` graph,
    vertices coloured by compute set, edges in their reader's colour, always-live
    data grey."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    lay, css = section
    on = section_tiles(grouped, css[cs_layer[css] == lay], SECTION_TILES)
    full = compiled_graph(exe, group_tiles=0, compute_sets=css.tolist(), regions=regions, tiles=on)
    own = np.isin(full.node_cs, np.nonzero(cs_layer == lay)[0])
    pick = neighbourhood(full, own, SECTION_VERTICES)
    sg = subgraph(full, pick)
    pos = layout(sg, seed, 600)
    pal = np.asarray(colormaps["Set2"].colors)
    rgb = pal[np.searchsorted(css, np.maximum(sg.node_cs, 0)) % len(pal)]
    rgb[sg.is_data] = (0.5, 0.5, 0.5)
    ax = fig.add_axes(box, facecolor=BACKGROUND)
    if sg.src.size:
        lines = np.stack([pos[sg.src], pos[sg.dst]], axis=1)
        ax.add_collection(LineCollection(lines, colors=np.c_[rgb[sg.dst], np.full(sg.src.size, 0.5)],
                                         linewidths=0.6))
    if sg.nodes:
        ax.scatter(pos[:, 0], pos[:, 1], s=np.where(sg.is_data, 6, 12), c=rgb, linewidths=0, zorder=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.margins(0.04)
    for s in ax.spines.values():
        s.set_edgecolor("#666666")
    tiles = unique(sg.node_tile[~sg.is_data]) if sg.nodes else np.zeros(0, np.int64)
    nv = int((~sg.is_data).sum())
    ax.set_title(f"enlarged: {_short(labels[lay], 44)}\n{nv:,} of the {full.vertices:,} vertices of it and "
                 f"its feeders on {int(on.sum())} nearby tiles (drawn: {tiles.size} tiles); {sg.src.size:,} edges",
                 color="#dddddd", fontsize=9)
    handles = []
    for k, c in enumerate(css.tolist()):
        cs = exe.compute_sets[c]
        codelets = sorted({g.codelet for g in cs.groups})
        name = ", ".join(_short(x, 16) for x in codelets[:2]) + ("…" if len(codelets) > 2 else "")
        op = next((o["op"] for o in exe.ops if c in o.get("compute_sets", [])), None)
        name = f"{op}: {name}" if op else name
        handles.append(Line2D([], [], marker="o", linestyle="", color=pal[k % len(pal)],
                              label=name + ("" if cs_layer[c] == lay else " (feeds it)")))
    handles.append(Line2D([], [], marker="o", linestyle="", color="#808080", label="always-live data"))
    ax.legend(handles=handles, loc="lower left", fontsize=7, facecolor="#111111", edgecolor="#444444",
              labelcolor="#dddddd", framealpha=0.8, ncol=2)


def draw_graph(exe: Executable, path: str, max_nodes: int = 40_000, sections: int = 3,
               seed: int = 0, pixels: int = 1500) -> Picture:
    """The whole compiled graph (`pixels` square), and enlarged sections of layers."""
    t0 = time.perf_counter()
    require(graph=True)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    cs_layer, labels = cs_layers(exe)
    nl = max(len(labels), 1)
    t1 = time.perf_counter()
    regions = tensor_regions(exe)
    g = compiled_graph(exe, max_nodes=max_nodes, regions=regions)
    t_graph = time.perf_counter() - t1
    layer = layer_of_nodes(g, cs_layer)
    t1 = time.perf_counter()
    pos = layout(g, seed)
    t_layout = time.perf_counter() - t1
    node_rgb = colours(layer, nl) * np.where(g.is_data, 0.35, 1.0)[:, None]
    t1 = time.perf_counter()
    img, keep = rasterise(pos, g.src, g.dst, colours(layer[g.dst], nl), node_rgb, (pixels, pixels),
                          node_px=1 if g.nodes > 5000 else 2)
    t_pixels = time.perf_counter() - t1
    secs = _sections(exe, cs_layer, sections) if sections else []
    dpi = 100
    side = pixels / dpi
    H = side + 1.6
    W = side + (side * 0.45 + 0.3 if secs else 0.2)
    fig = new_figure(W, H, dpi=dpi, facecolor="black")
    fig.text(0.1 / W, 1 - 0.2 / H, f"The compiled graph of '{exe.name}' on {exe.target.name} "
             f"({exe.target.tiles:,} tiles)", color="white", fontsize=18, fontweight="bold", va="top")
    sub = g.describe()
    if keep < 1:
        sub += f"; long edges drawn with {100 * keep:.0f}% of the points"
    fig.text(0.1 / W, 1 - 0.58 / H, sub, color="#cccccc", fontsize=9.5, va="top")
    ax = fig.add_axes((0.1 / W, 0.85 / H, side / W, side / H))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes((0.1 / W + 0.05 * side / W, 0.35 / H, 0.9 * side / W, 0.16 / H))
    sm = ScalarMappable(norm=Normalize(-0.5, nl - 0.5), cmap=ListedColormap(colours(np.arange(nl), nl)))
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    ticks = unique(np.linspace(0, nl - 1, min(nl, 6)).round().astype(int))
    cb.set_ticks(ticks)
    cb.set_ticklabels([_short(labels[i]) for i in ticks], fontsize=7.5, color="#cccccc")
    cb.outline.set_edgecolor("#555555")
    cax.set_title(f"colour: layer ({nl} tensor ops or compute sets) in program order; "
                  "dim dots: always-live tensors", color="#cccccc", fontsize=9)
    t1 = time.perf_counter()
    for k, sec in enumerate(secs):
        h = (side - 0.2) / len(secs)
        box = ((side + 0.45) / W, (0.85 + side - (k + 1) * h + 0.15) / H, side * 0.43 / W, (h - 0.75) / H)
        _draw_section(fig, box, exe, sec, labels, cs_layer, regions, seed, g)
    t_sections = time.perf_counter() - t1
    timing = (f"graph {t_graph:.1f} s, layout {t_layout:.1f} s, pixels {t_pixels:.1f} s, "
              f"sections {t_sections:.1f} s")
    fig.text(1 - 0.1 / W, 0.08 / H, f"drawn in {time.perf_counter() - t0:.1f} s: {timing}", color="#888888",
             fontsize=8, ha="right")
    w, h = save(fig, path, palette=True)
    return Picture(path, w, h, time.perf_counter() - t0, f"{g.describe()}; {timing}", {})


def _short(label: str, n: int = 30) -> str:
    label = label.replace("<stdlib>/", "")
    return label if len(label) <= n else label[:n - 1] + "…"
