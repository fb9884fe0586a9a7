"""Benchmark of building repeated parts once (README "Built once, called many times";
issue 13).  Not a test.

Requires popdsl (run from the repository).  Builds a program twice, each in a fresh
process with an empty cache directory (native code compiled too, as on a first
build): as `popc build` does by default (repeated parts outlined into functions,
built once and called) and with `--no-outline` (every repeat built again).  Prints,
for each, the compile's wall time and peak RSS (os.wait4: start-up and imports
included), the `.popx` size, and from the executables: functions and their calls,
vertices, compute sets, vertex state, codelet code, their sum (the bytes reuse
saves), the busiest tile and the data planned; each figure's ratio with / without.
With `--run`, one step of each on the IPU model: estimated cycles, and whether the
outputs are bitwise equal.

Run: `python bench/reuse.py [FILE.pop] [--run]` (default examples/resnet50.pop).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from popdsl import api, artifact  # noqa: E402


def build(src: Path, out: Path, cache: Path, outline: bool) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one `popc build` process."""
    env = dict(os.environ, POPDSL_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("POPDSL_VERIFY", None)
    argv = [sys.executable, "-m", "popdsl", "build", str(src), "-o", str(out)] + ([] if outline else ["--no-outline"])
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"popc build failed:\n{err}")
    return wall, usage.ru_maxrss * 1024


def figures(exe) -> dict:
    m = exe.memory
    return {"functions": len(exe.functions), "calls": sum(f["calls"] for f in exe.functions),
            "vertices": sum(len(g.tiles) for cs in exe.compute_sets for g in cs.groups),
            "compute sets": len(exe.compute_sets), "vertex state B": int(m.vertex_state.sum()),
            "code B": int(m.code.sum()), "code + vertex state B": int(m.fixed.sum()),
            "busiest tile B": int(m.total.max()), "data planned B": int(m.planned.sum()),
            "planned / lower bound": float(m.planned.sum() / max(m.lower_bound.sum(), 1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", default=str(ROOT / "examples" / "resnet50.pop"))
    ap.add_argument("--run", action="store_true", help="run one step of each and compare outputs and cycles")
    args = ap.parse_args()
    src = Path(args.file)
    rows: dict[str, dict] = {}
    exes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for outline in (True, False):
            name = "with reuse" if outline else "without"
            out = Path(tmp) / f"{name.replace(' ', '_')}.popx"
            wall, rss = build(src, out, Path(tmp) / f"cache_{outline}", outline)
            exe = artifact.load(str(out))
            exes[name] = exe
            rows[name] = {"compile s": wall, "peak RSS GB": rss / 1e9, ".popx MB": out.stat().st_size / 1e6,
                          **figures(exe)}
        print(f"{src.name}: built once and called (default) vs --no-outline; ratio = with / without")
        print(f"  {'':24} {'with reuse':>16} {'without':>16} {'ratio':>7}")
        for k in rows["with reuse"]:
            a, b = rows["with reuse"][k], rows["without"][k]
            fmt = (lambda v: f"{v:,.3f}") if isinstance(a, float) else (lambda v: f"{v:,}")
            print(f"  {k:24} {fmt(a):>16} {fmt(b):>16} {a / b if b else float('nan'):>7.2f}")
        for f in exes["with reuse"].functions:
            print(f"  function {f['name']}: {f['calls']} calls ({', '.join(f['instances'][:3])}"
                  f"{', ...' if len(f['instances']) > 3 else ''}); copies {f['copy_in_bytes']:,} B in, "
                  f"{f['copy_out_bytes']:,} B out per call")
        if args.run:
            rng = np.random.default_rng(0)
            ex = api.Executable(exes["with reuse"])
            feeds = {n: rng.standard_normal(s).astype(np.float32) for n, (d, s) in ex.inputs.items()}
            outs, cycles = {}, {}
            for name, exe in exes.items():
                sim = api.Simulator(api.Executable(exe))
                outs[name] = sim.run(feeds)
                cycles[name] = sim.cycles.total
            same = all(np.array_equal(outs["with reuse"][k], outs["without"][k]) for k in outs["without"])
            print(f"  estimated cycles {cycles['with reuse']:,} / {cycles['without']:,} "
                  f"({cycles['with reuse'] / cycles['without']:.4f}); outputs bitwise equal: {same}")


if __name__ == "__main__":
    main()
