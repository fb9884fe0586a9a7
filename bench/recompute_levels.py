"""Benchmark of recomputation level by level (README "Recomputation"): a training
step compiled at each level (0: nothing recomputed; 1: element-wise results; k + 1:
k segments and the others' element-wise results; the last: every segment), and
what its tiles need at each.  Not a test.

Requires popdsl (run from the repository).  For each level it compiles the step as
`--recompute auto` would try it (one compile per level, a minute or two each for
ResNet-50) and prints the busiest tile as planned (data, vertex state and code),
whether it fits, that tile's lower bound, the activations kept for the backward
pass, the FLOPs recomputed and the compile's seconds.  A level over the tiles' memory is still planned in full (its
out-of-memory error gives the busiest tile's need).

What it shows: the total kept falls with every level, but the busiest tile need
not fall with it.  Each level changes which vertices the partitioner places
where, so the busiest tile can move up by KB from one level to the next (ResNet-50
at batch 1: 8 KB from level 1 to 2, README "Recomputation"):
`auto`'s search assumes lower levels never fit where higher ones do not, and finds
a level that fits with one fewer that does not, not always the least.

Run: `python bench/recompute_levels.py [FILE] [--levels 0,1,2] [--max-vertices N]`
(default: examples/resnet50_train.pop, batch 8, every level, 8,388,608 vertices;
the README's table is of that file with batch 1).
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from popdsl import pipeline
from popdsl.diagnostics import CompileError, OutOfMemory
from popdsl.ir.target import get_target
from popdsl.limits import Budgets
from popdsl.passes import recompute as rc

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=str(ROOT / "examples" / "resnet50_train.pop"))
    ap.add_argument("--levels", help="comma-separated levels (default: all)")
    ap.add_argument("--max-vertices", type=int, default=Budgets().vertices)
    a = ap.parse_args()
    try:
        text = Path(a.file).read_text()
    except OSError as e:
        raise SystemExit(f"recompute_levels: cannot read {a.file}: {e.strerror}") from None
    target, budgets = get_target(), Budgets(vertices=a.max_vertices)
    try:
        trained = pipeline.compile_source(text, a.file, target, budgets=budgets, stop_after="autodiff")
    except CompileError as e:
        raise SystemExit(e.render()) from None
    seg = rc.segments(trained)
    if seg is None:
        raise SystemExit(f"recompute_levels: {a.file} does not train (no 'minimize'): nothing to recompute")
    top = seg.levels - 1
    try:
        levels = [int(x) for x in a.levels.split(",")] if a.levels else list(range(top + 1))
    except ValueError:
        raise SystemExit(f"recompute_levels: --levels takes numbers separated by commas, not {a.levels!r}") from None
    if any(not 0 <= x <= top for x in levels):
        raise SystemExit(f"recompute_levels: levels go from 0 to {top} (the step's {seg.count} segments, "
                         "after nothing and element-wise results)")
    print(f"{a.file}: {seg.count} segments, levels 0 to {top}; tiles of {target.tile_memory:,} B")
    print(f"  {'level':>5}{'busiest B':>12}{'':>6}{'its bound B':>13}{'kept B':>14}"
          f"{'recomputed FLOPs':>20}{'compile s':>11}")
    for level in levels:
        t = time.perf_counter()
        # The recompute stage's record (what is kept, what recomputed) is there
        # whether or not the plan fits.
        graph = pipeline.compile_source(text, a.file, target, budgets=budgets, start=("autodiff", trained),
                                        stop_after="recompute", level=level)
        r = graph.recompute
        kept = f"{r['kept_bytes']:>14,}{r['recomputed_flops']:>20,}"
        try:
            exe, _ = pipeline.compile_source(text, a.file, target, budgets=budgets, start=("recompute", graph))
        except OutOfMemory as e:
            print(f"  {level:>5}{e.need:>12,}{'over':>6}{'':>13}{kept}{time.perf_counter() - t:>11.1f}"
                  f"  (tile {e.tile})", flush=True)
            continue
        m = exe.memory
        print(f"  {level:>5}{int(m.total.max()):>12,}{'fits':>6}{int(m.bound_total[m.total.argmax()]):>13,}{kept}"
              f"{time.perf_counter() - t:>11.1f}", flush=True)
        del exe, m, graph
        gc.collect()


if __name__ == "__main__":
    main()
