"""Benchmark of `popc check` on a large source file, against the Lark parser measured in
the same run.  Not a test.

Requires popdsl (run from the repository) and lark.  Writes FILE (default
out/bench_parse.pop): LINES lines of small codelets (element-wise loops, reductions,
branches, calls, comments) and a graph that runs one of them; then times whole
processes, `python -m popdsl check FILE` (interpreter start-up, imports, parse, check,
the rest of the pipeline), RUNS times each with the fast parser and with
POPDSL_PARSER=lark, interleaved so that a busy machine hurts both alike.  Prints min and
median of wall-clock and CPU time (user + sys) and their ratios; with --examples also a
one-line file and examples/resnet50.pop (fast parser only, the Lark path for ratio).

Run: `python bench/parse.py [--lines 10000] [--runs 5] [--examples]`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SHAPES = (
    """// {k}: scale and shift, then a clamped sum
codelet K{k}(in a: f32[n], in b: f32[n], out c: f32[n], out r: f32, k: f32) {{
    var acc: f32 = 0.0;
    for i in 0..n {{
        let t = a[i] * k + b[i] / (1.0 + abs(a[i]));
        if t > 0.5 && i % 2 == 0 {{ c[i] = t; }} else {{ c[i] = -t * 0.25; }}
        acc += max(t, {m}.0) - sqrt(abs(b[i]));
    }}
    r = acc / f32(n);
}}
""",
    """/* {k}: a block of rows against a vector,
   with a bias */
codelet K{k}(in a: f32[m, n], in x: f32[n], in bias: f32[m], out y: f32[m]) {{
    for i in 0..m {{
        var s: f32 = bias[i];
        for j in 0..n step 1 {{ s += a[i, j] * x[j]; }}
        y[i] = select(s > 0.0, s, 0.01 * s);
    }}
}}
""",
    """// {k}: count down with a while loop
codelet K{k}(inout x: i32[n], out steps: i32) {{
    var left: i32 = {m} + 3;
    var count: i32 = 0;
    while left > 0 && count < 100 {{
        for i in 0..n {{ x[i] = (x[i] * 3 + 1) % 17 - left; }}
        left -= 1;
        count += 1;
    }}
    steps = count;
}}
""",
)

_GRAPH = """
graph bench(tiles = 4) {
    var a: f32[8] = uniform(seed = 1);
    var b: f32[8] = uniform(seed = 2);
    var c: f32[8];
    var r: f32;
    map a -> linear;
    map b -> linear;
    map c -> linear;
    map r -> tile 0;
    compute step0 { K0(a = a, b = b, c = c, r = r, k = 2.0) on tile 0; }
    program { execute step0; }
    output c;
}
"""


def source(lines: int) -> str:
    parts, n, k = [], _GRAPH.count("\n"), 0
    while True:
        text = _SHAPES[k % len(_SHAPES)].format(k=k, m=k % 7)
        if n + text.count("\n") > lines:
            break
        parts.append(text)
        n += text.count("\n")
        k += 1
    parts.append("\n" * (lines - n))
    return "".join(parts) + _GRAPH


def run(path: Path, lark: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one `popc check` process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("POPDSL_PARSER", None)
    if lark:
        env["POPDSL_PARSER"] = "lark"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "popdsl", "check", str(path)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"popc check {path} failed:\n{r.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(path: Path, runs: int, lark_runs: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list] = {"fast": [], "lark": []}
    run(path, False)                      # warm the native-code cache and the OS's
    for k in range(max(runs, lark_runs)):
        if k < runs:
            times["fast"].append(run(path, False))
        if k < lark_runs:
            times["lark"].append(run(path, True))
    return times


def report(name: str, times: dict[str, list[tuple[float, float]]]) -> None:
    print(f"{name}")
    stats = {}
    for kind, ts in times.items():
        if not ts:
            continue
        wall, cpu = [w for w, _ in ts], [c for _, c in ts]
        stats[kind] = (min(wall), statistics.median(wall), min(cpu), statistics.median(cpu))
        print(f"  {kind:4s} parser: wall min {stats[kind][0]:6.2f} s  median {stats[kind][1]:6.2f} s"
              f"   CPU min {stats[kind][2]:6.2f} s  median {stats[kind][3]:6.2f} s   ({len(ts)} runs)")
    if "lark" in stats and "fast" in stats:
        f, lk = stats["fast"], stats["lark"]
        print(f"  Lark / fast: wall (min) {lk[0] / f[0]:5.1f}x, (median) {lk[1] / f[1]:5.1f}x;"
              f"  CPU (min) {lk[2] / f[2]:5.1f}x, (median) {lk[3] / f[3]:5.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5, help="runs with the fast parser")
    ap.add_argument("--lark-runs", type=int, default=3, help="runs with the Lark parser")
    ap.add_argument("--file", type=Path, default=ROOT / "out" / "bench_parse.pop")
    ap.add_argument("--examples", action="store_true",
                    help="also a one-line file and examples/resnet50.pop")
    args = ap.parse_args()
    args.file.parent.mkdir(parents=True, exist_ok=True)
    text = source(args.lines)
    args.file.write_text(text, encoding="utf-8")
    print(f"{args.file}: {text.count(chr(10)):,} lines, {len(text):,} characters; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    report(f"popc check, {args.lines:,} lines", measure(args.file, args.runs, args.lark_runs))
    if args.examples:
        tiny = args.file.with_name("bench_tiny.pop")
        tiny.write_text("graph g { var x: f32[4] = ones(); map x -> tile 0; output x; }\n")
        report("popc check, a one-line file", measure(tiny, args.runs, args.runs))
        report("popc check examples/resnet50.pop",
               measure(ROOT / "examples" / "resnet50.pop", args.runs, args.lark_runs))


if __name__ == "__main__":
    main()
