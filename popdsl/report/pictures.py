"""Pictures of memory: the memory map (bytes per tile on the tile grid) and the
liveness timeline (live bytes by category over the program).  The compiled graph's
picture is in `report.graphpicture`; both use the helpers here.

Requires an `Executable` (its memory plan) and matplotlib, the optional extra
(`pip install 'popdsl[viz]'`), imported lazily: without it the functions raise
`PicturesUnavailable` saying what to install.  Produces PNG files, written
atomically, and a `Picture` record: the file's size in pixels, the drawing time, a
note of what was drawn, and the pixel positions of what the picture marks (the
busiest tiles, the peak), which the tests read back.

Figures are made with matplotlib's object API and the Agg canvas (no pyplot, no
global backend switch), so drawing from a program that uses matplotlib itself
leaves its state alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from popdsl.atomic import write_atomically
from popdsl.ir.executable import Executable

INSTALL_HINT = "pip install 'popdsl[viz]'"
MARK = "#00e5ff"                       # what a picture marks (busiest tiles, the peak): cyan, in no colormap used
CATEGORY_COLOURS = {"code": "#6d6875", "vertex_state": "#b5838d", "always_live": "#1f77b4",
                    "not_always_live": "#ff7f0e", "exchange_buffers": "#2ca02c"}
CATEGORY_NAMES = {"code": "codelet code", "vertex_state": "vertex state", "always_live": "always-live variables",
                  "not_always_live": "not-always-live results", "exchange_buffers": "exchange buffers"}


class PicturesUnavailable(ImportError):
    """The optional extra that pictures need is not installed."""


@dataclass
class Picture:
    path: str
    width: int
    height: int
    seconds: float
    note: str
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)   # name → (x, y) pixels from the top left


def require(graph: bool = False):
    """matplotlib (and igraph for the graph), or PicturesUnavailable."""
    missing = []
    try:
        import matplotlib  # noqa: F401  (only whether it is there)
    except ImportError:
        missing.append("matplotlib")
    if graph:
        try:
            import igraph  # noqa: F401
        except ImportError:
            missing.append("igraph")
    if missing:
        raise PicturesUnavailable(f"pictures need {' and '.join(missing)}, which are not installed: {INSTALL_HINT}")


def new_figure(width_in: float, height_in: float, dpi: int = 100, facecolor: str = "white"):
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor=facecolor)
    FigureCanvasAgg(fig)
    return fig


def pixel(fig, ax, x: float, y: float) -> tuple[float, float]:
    """Where data point (x, y) of `ax` lands in the saved PNG (pixels from the top left)."""
    fig.canvas.draw()
    px, py = ax.transData.transform((x, y))
    return float(px), float(fig.bbox.height - py)


def save(fig, path: str, palette: bool = False) -> tuple[int, int]:
    """Write `fig` as PNG atomically (`popdsl.atomic`: the user's umask, nothing
    left behind on failure); `palette`: in 256 colours (a glowing graph's PNG is 3x
    smaller).  Returns (width, height) in pixels.  Raises OSError."""
    def write(f):
        if palette:
            import io
            from PIL import Image                     # matplotlib's own dependency
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
            buf.seek(0)
            Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                f, format="PNG", optimize=True)
        else:
            fig.savefig(f, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
    write_atomically(path, write)
    w, h = fig.canvas.get_width_height()
    return int(w), int(h)


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} KB"


def tile_grid(tiles: int) -> tuple[int, int]:
    """(rows, columns) for `tiles` tiles in index order, row by row: a divisor near
    a 3:2 aspect where there is one (1472 → 32 × 46), else a near-square grid."""
    best = None
    for rows in range(1, int(np.sqrt(tiles)) + 1):
        if tiles % rows == 0:
            cols = tiles // rows
            score = abs(np.log(cols / rows / 1.5))
            if best is None or score < best[0]:
                best = (score, rows, cols)
    if best is not None and best[0] < 0.6:
        return best[1], best[2]
    rows = max(1, int(np.ceil(np.sqrt(tiles / 1.5))))
    return rows, int(np.ceil(tiles / rows))


def _on_grid(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.full(rows * cols, np.nan)
    out[:values.size] = values
    return out.reshape(rows, cols)


# ---------------------------------------------------------------- memory map

def draw_memory_map(exe: Executable, path: str, mark: int = 5) -> Picture:
    """Bytes per tile on the tile grid (planned, as a share of the tile's memory),
    the `mark` busiest tiles outlined and named; bytes per tile by category along
    the tiles; and one small grid per category."""
    t0 = time.perf_counter()
    require()
    from matplotlib.patches import Rectangle
    m, t = exe.memory, exe.target
    total = m.total.astype(np.float64)
    rows, cols = tile_grid(t.tiles)
    busiest = np.argsort(-total, kind="stable")[:mark]
    fig = new_figure(14, 12.5)
    gs = fig.add_gridspec(3, 5, height_ratios=[3.2, 1.5, 1.25], hspace=0.5, wspace=0.25,
                          left=0.06, right=0.94, top=0.91, bottom=0.04)
    fig.suptitle(f"Memory map: graph '{exe.name}' on {t.name}, {t.tiles:,} tiles × {t.tile_memory:,} B",
                 fontsize=15, fontweight="bold")
    fig.text(0.5, 0.935, f"planned {mb(total.sum())} in all; busiest tile {int(busiest[0])}: "
             f"{int(total[busiest[0]]):,} B ({100 * total[busiest[0]] / t.tile_memory:.1f}% of its memory); "
             f"tiles in index order, row by row ({rows} × {cols})", ha="center", fontsize=10.5)
    ax = fig.add_subplot(gs[0, :])
    im = ax.imshow(_on_grid(100 * total / t.tile_memory, rows, cols), cmap="magma", vmin=0,
                   vmax=max(float(100 * total.max() / t.tile_memory), 1e-9), interpolation="nearest", aspect="auto")
    ax.set_title("planned bytes per tile (code, vertex state and data as the plan shares it)", fontsize=11)
    ax.set_xlabel("tile mod %d" % cols, labelpad=1)
    ax.set_ylabel("tile // %d" % cols)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label("% of the tile's memory")
    marks = {}
    for k, tile in enumerate(busiest.tolist()):
        r, c = divmod(tile, cols)
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=MARK, linewidth=2.5))
        ax.annotate(str(k + 1), (c + 0.5, r - 0.5), xytext=(2, 1), textcoords="offset points",
                    color=MARK, fontsize=9, fontweight="bold")
    ax.text(0, -0.11, "busiest (outlined): " + ", ".join(
        f"{k + 1}: tile {tile} ({int(total[tile]):,} B)" for k, tile in enumerate(busiest.tolist())),
        transform=ax.transAxes, fontsize=9.5, va="top", color="#006b7a", fontweight="bold")
    # By category along the tiles: the components that add up to the planned total.
    ax2 = fig.add_subplot(gs[1, :])
    x = np.arange(t.tiles)
    shared = (m.planned - m.always_live).astype(np.float64)
    parts = [("code", m.code), ("vertex_state", m.vertex_state), ("always_live", m.always_live),
             ("not_always_live", shared)]
    ax2.stackplot(x, *[p.astype(np.float64) / 1e3 for _, p in parts],
                  colors=[CATEGORY_COLOURS[k] for k, _ in parts],
                  labels=[CATEGORY_NAMES[k] if k != "not_always_live" else
                          "not-always-live results and exchange buffers (as planned, shared)" for k, _ in parts],
                  step="mid")
    top = float(total.max()) * 1.5                 # room for the legend above the bars
    if top >= 0.5 * t.tile_memory:
        top = max(top, t.tile_memory * 1.08)
        ax2.axhline(t.tile_memory / 1e3, color="black", linestyle="--", linewidth=1)
        ax2.text(t.tiles, t.tile_memory / 1e3, " tile memory", va="center", fontsize=8)
    ax2.plot(busiest, total[busiest] / 1e3, "o", color=MARK, markeredgecolor="black", markersize=7,
             label="busiest tiles")
    ax2.set_xlim(-0.5, t.tiles - 0.5)
    ax2.set_ylim(0, max(top, 1.0) / 1e3)
    ax2.set_xlabel("tile")
    ax2.set_ylabel("KB")
    ax2.set_title("bytes per tile by category", fontsize=11)
    ax2.legend(loc="upper left", fontsize=8, ncol=3, framealpha=0.9)
    for j, cat in enumerate(("code", "vertex_state", "always_live", "not_always_live", "exchange_buffers")):
        a = fig.add_subplot(gs[2, j])
        v = getattr(m, cat).astype(np.float64)
        a.imshow(_on_grid(v / 1e3, rows, cols), cmap="viridis", interpolation="nearest", aspect="auto",
                 vmin=0, vmax=max(float(v.max()) / 1e3, 1e-9))
        a.set_title(f"{CATEGORY_NAMES[cat]}\nmax {mb(v.max())}, all {mb(v.sum())}", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    fig.text(0.5, 0.005, "small grids: bytes by category without sharing (the plan shares not-always-live "
             "results and exchange buffers between tiles' lifetimes)", ha="center", fontsize=8.5, color="#444")
    for k, tile in enumerate(busiest.tolist()):
        r, c = divmod(tile, cols)
        marks[f"busiest_{k + 1}"] = pixel(fig, ax, c - 0.5, r - 0.5)      # the outline's corner
    w, h = save(fig, path)
    note = f"memory map of {t.tiles} tiles; busiest tile {int(busiest[0])}"
    return Picture(path, w, h, time.perf_counter() - t0, note, marks)


# ---------------------------------------------------------------- liveness

def draw_liveness(exe: Executable, path: str) -> Picture:
    """Live bytes over the program (all tiles), stacked by category, the peak marked
    and named by its action and source; the planned total for comparison."""
    t0 = time.perf_counter()
    require()
    m, t = exe.memory, exe.target
    tl = np.asarray(m.timeline, np.float64)
    cats = {k: np.asarray(v, np.float64) for k, v in (m.timeline_categories or {}).items()}
    fixed = {"code": float(m.code.sum()), "vertex_state": float(m.vertex_state.sum())}
    n = tl.size
    x = np.arange(n)
    layers = [(k, np.full(n, v)) for k, v in fixed.items()]
    if cats:
        layers += [(k, cats[k]) for k in ("always_live", "not_always_live", "exchange_buffers") if k in cats]
    else:
        layers.append(("not_always_live", tl))
    live = sum(v for _, v in layers) if layers else np.zeros(n)
    peak = int(np.argmax(live)) if n else 0
    fig = new_figure(14, 7)
    ax = fig.add_axes((0.07, 0.13, 0.9, 0.6))
    fig.suptitle(f"Liveness: graph '{exe.name}' on {t.name}, {t.tiles:,} tiles", fontsize=15,
                 fontweight="bold", y=0.97)
    labels = [CATEGORY_NAMES[k] if cats or k != "not_always_live" else "data (no categories in this file)"
              for k, _ in layers]
    if n:
        ax.stackplot(x, *[v / 1e6 for _, v in layers], colors=[CATEGORY_COLOURS[k] for k, _ in layers],
                     labels=labels, step="mid")
        planned = float(m.total.sum())
        ax.axhline(planned / 1e6, color="black", linestyle="--", linewidth=1,
                   label=f"planned, all tiles ({mb(planned)})")
        ax.plot([peak], [live[peak] / 1e6], "o", color=MARK, markersize=12, markeredgecolor="black",
                markeredgewidth=1.5, label="peak", zorder=10)
        ax.axvline(peak, color=MARK, linewidth=1.2, linestyle=":")
        where = m.timeline_labels[peak] if peak < len(m.timeline_labels) else ""
        src = _source_of(exe, where)
        ax.annotate(f"peak {mb(live[peak])} at point {peak}: {where}{src}", (peak, live[peak] / 1e6),
                    xytext=(0.5, 1.2), textcoords="axes fraction", ha="center", fontsize=10,
                    arrowprops=dict(arrowstyle="->", color="#333"), color="#111")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(0, max(live.max(), planned) / 1e6 * 1.12)
    ax.set_xlabel("program point (each execution of a compute set with its exchange, each copy, each read)")
    ax.set_ylabel("live bytes, all tiles (MB)")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=9, frameon=False, ncol=4)
    fig.text(0.07, 0.015, "Always-live variables, vertex state and code live throughout; results and "
             "exchange buffers from first to last use (loops keep what they carry).\nThe planned total is "
             "the sum of each tile's own peak (plus code and vertex state), so it lies at or above the peak "
             "of the sum.", fontsize=8.5, color="#444")
    marks = {"peak": pixel(fig, ax, peak, live[peak] / 1e6)} if n else {}
    w, h = save(fig, path)
    return Picture(path, w, h, time.perf_counter() - t0,
                   f"liveness over {n} program points; peak {int(live[peak]) if n else 0:,} B at point {peak}", marks)


def _source_of(exe: Executable, label: str) -> str:
    """' (op at source)' for an 'execute CS' label whose compute set an op made."""
    if not label.startswith("execute "):
        return ""
    name = label[len("execute "):]
    for i, cs in enumerate(exe.compute_sets):
        if cs.name == name:
            for op in exe.ops:
                if i in op.get("compute_sets", []):
                    return f" ({op['op']} at {op['source']})"
            return f" ({cs.span})" if cs.span.line else ""
    return ""
