"""Benchmark of compile time and memory at scale (issue 11), against the issue's targets.
Not a test.

Requires popdsl (run from the repository).  Builds, each in a fresh process with an
empty cache directory (so native code is compiled too, as on a first build):

- ResNet-50 forward, batch 1 (`examples/resnet50.pop`), then builds it again from the
  build cache;
- the 1M-vertex Poplar-level graph (`bench/scale1m.pop`: 1472 tiles x 680 `Scale`
  vertices of 4 elements, placed by a compile-time loop);
- on request (`b16`: minutes and several GB), ResNet-50 forward at batch 16:
  `examples/resnet50.pop` with its input and its flatten made [16, ...].

For each it prints `popc build --timings`'s table (every stage's wall time and peak
resident memory, see `popdsl/timings.py` for what the peak means), then the whole
process's wall time and peak RSS (os.wait4: interpreter start-up and imports
included, as a user's `popc build` pays them) and their ratios to the targets —
a ratio of at most 1.00 meets the target.  Targets, decimal units (1 GB = 10^9 B):
ResNet-50 <= 10 s and <= 1.5 GB, a second build <= 2 s, the .popx <= 30 MB; the
1M-vertex graph <= 10 s and <= 1 GB; ResNet-50 at batch 16 <= 60 s and <= 4 GB.

Run: `python bench/compile.py [resnet50] [1m] [b16]` (default: resnet50 and 1m).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB, MB = 10**9, 10**6
CASES = {
    "resnet50": ("ResNet-50 forward, batch 1", ROOT / "examples" / "resnet50.pop", 10.0, 1.5 * GB),
    "1m": ("1M-vertex Poplar-level graph (1472 tiles x 680 Scale vertices)", ROOT / "bench" / "scale1m.pop",
           10.0, 1 * GB),
    "b16": ("ResNet-50 forward, batch 16", ROOT / "examples" / "resnet50.pop", 60.0, 4 * GB),
}
DEFAULT = ("resnet50", "1m")
# Batch 16 is examples/resnet50.pop with these two lines changed.
BATCH16 = (("input image: f32[1, 3, 224, 224];", "input image: f32[16, 3, 224, 224];"),
           ("[1, 2048]", "[16, 2048]"))


def batch16(tmp: Path) -> Path:
    text = CASES["b16"][1].read_text()
    for old, new in BATCH16:
        assert text.count(old) == 1, f"examples/resnet50.pop no longer has {old!r} once"
        text = text.replace(old, new)
    path = tmp / "resnet50_b16.pop"
    path.write_text(text)
    return path
SECOND_BUILD_S = 2.0
POPX_BYTES = 30 * MB


def popc_build(src: Path, out: Path, cache: Path) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, stderr) of one `popc build --timings` process."""
    env = dict(os.environ, POPDSL_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("POPDSL_VERIFY", None)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "popdsl", "build", str(src), "-o", str(out), "--timings"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4 gives this child's own rusage (ru_maxrss), not the maximum over all children;
    # the pipes are drained on threads meanwhile.
    chunks: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: chunks.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, wall, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), chunks.get("err", "")


def ratio(value: float, target: float) -> str:
    return f"{value / target:.2f}x the target ({'met' if value <= target else 'not met'})"


def run(case: str) -> None:
    title, src, t_target, rss_target = CASES[case]
    print(f"== {title}: {src.relative_to(ROOT)}" + (" made batch 16" if case == "b16" else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="popdsl-bench-") as tmp:
        tmp = Path(tmp)
        if case == "b16":
            src = batch16(tmp)
        out = tmp / "out.popx"
        code, wall, rss, err = popc_build(src, out, tmp / "cache")
        if code != 0:
            print(err, file=sys.stderr)
            raise SystemExit(f"popc build failed (exit {code})")
        print(err.rstrip())
        print(f"first build: {wall:.2f} s wall, {rss / MB:,.0f} MB peak RSS (whole process)")
        print(f"  time   {ratio(wall, t_target)} (<= {t_target:g} s)")
        print(f"  memory {ratio(rss, rss_target)} (<= {rss_target / GB:g} GB)")
        if case == "resnet50":
            size = out.stat().st_size
            print(f"  .popx  {size:,} B: {ratio(size, POPX_BYTES)} (<= {POPX_BYTES / MB:g} MB)")
            code, wall2, rss2, err2 = popc_build(src, tmp / "again.popx", tmp / "cache")
            if code != 0 or "build cache: hit" not in err2:
                print(err2, file=sys.stderr)
                raise SystemExit("the second build did not come from the build cache")
            # Compared in chunks: a child's peak RSS starts at its parent's at fork, so this
            # process stays small.
            same = filecmp.cmp(tmp / "again.popx", out, shallow=False)
            print(f"second build (build cache hit): {wall2:.2f} s wall, {rss2 / MB:,.0f} MB peak RSS; "
                  f"{ratio(wall2, SECOND_BUILD_S)} (<= {SECOND_BUILD_S:g} s); "
                  f"{'byte-identical' if same else 'NOT byte-identical'} to the first")
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", metavar="CASE", help=f"{', '.join(CASES)} (default: {' and '.join(DEFAULT)})")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    for case in args.cases or DEFAULT:
        run(case)


if __name__ == "__main__":
    main()
