"""Benchmark of recomputation (README "Recomputation"): what a training step keeps for
its backward pass with and without it, and what it costs.  Not a test.

Requires popdsl (run from the repository).  Compiles one training step of a CNN of
twelve 3x3 conv + batch norm + relu layers (16 channels, 32x32, batch 8; generated
below) on 64 tiles with `--recompute none` (the reference), at level 1 (batch
norm's and relu's element-wise results made again, nothing else), with `all`, and
with `auto` under a budget halfway between `none`'s and `all`'s busiest tiles.  Prints, for
each: activations kept for the backward pass (tensor level), the not-always-live
peak and the data lower bound over all tiles, the busiest tile as planned, the
FLOPs recomputed, and the step's estimated compute cycles from one simulated step
(`popc report --partition`) — each as a ratio to `none` measured in the same run.

Run: `python bench/recompute.py [--layers N] [--tiles N]`.
"""
from __future__ import annotations

import argparse
import time

from popdsl.api import Executable
from popdsl.ir.target import get_target
from popdsl.passes.recompute import Policy
from popdsl.pipeline import compile_source
from popdsl.report.memory import memory_report


def cnn(layers: int, tiles: int) -> str:
    body = "\n".join(f"    let h{i} = relu(conv_bn(h{i - 1}, 16, 3, 1, 1));" for i in range(1, layers + 1))
    return f"""import "popnn";
graph deepcnn(tiles = {tiles}) {{
    input x: f32[8, 16, 32, 32];
    input labels: i32[8];
    let h0 = x;
{body}
    let p = avg_pool2d(h{layers}, 32);
    let logits = dense(reshape(p, [8, 16]), 10);
    let loss = mean(cross_entropy(logits, labels));
    output loss;
    minimize loss with sgd(lr = 0.01, momentum = 0.9);
}}
"""


def measure(text: str, policy: Policy, level: int | None = None) -> dict:
    t = time.perf_counter()
    exe, native = compile_source(text, "deepcnn.pop", get_target(), recompute=policy, level=level)
    s = time.perf_counter() - t
    j = memory_report(exe).to_json()
    part = Executable(exe, native).partition_report()
    tr = j["training"]
    return {"kept": tr["activations_kept_bytes"], "peak": tr["live_peak"],
            "bound": j["totals"]["data"]["lower_bound"], "busiest": j["max_tile"]["planned"],
            "flops": tr["flops"]["recompute"], "forward": tr["flops"]["forward"],
            "segments": f"{tr['level']}: {tr['recomputed_segments']} of {tr['segments']}", "s": s,
            "cycles": part.step_cycles, "recompute_cycles": part.phases["recompute"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tiles", type=int, default=64)
    a = ap.parse_args()
    text = cnn(a.layers, a.tiles)
    rows = {"none": measure(text, Policy("none")), "element-wise (level 1)": measure(text, Policy("auto"), 1),
            "all": measure(text, Policy("all"))}
    budget = (rows["none"]["busiest"] + rows["all"]["busiest"]) // 2
    rows[f"auto, budget {budget:,} B"] = measure(text, Policy("auto", budget))
    ref = rows["none"]
    print(f"recomputation: {a.layers} conv+bn+relu layers, batch 8, {a.tiles} tiles; ratios to 'none' (same run)")
    print(f"  {'':<26}{'level: segs':>14}{'kept B':>14}{'peak B':>14}{'bound B':>14}{'busiest B':>12}"
          f"{'recomputed FLOPs':>26}{'step cycles':>13}{'recomputing':>13}{'compile s':>11}")
    for name, r in rows.items():
        print(f"  {name:<26}{r['segments']:>14}{r['kept']:>14,}{r['peak']:>14,}{r['bound']:>14,}{r['busiest']:>12,}"
              f"{r['flops']:>18,} ({r['flops'] / r['forward']:4.0%})" f"{r['cycles']:>13,}"
              f"{r['recompute_cycles']:>13,}{r['s']:>11.1f}")
        print(f"  {'  ratio to none':<26}{'':>14}{r['kept'] / ref['kept']:>14.2f}{r['peak'] / ref['peak']:>14.2f}"
              f"{r['bound'] / ref['bound']:>14.2f}{r['busiest'] / ref['busiest']:>12.2f}{'':>26}"
              f"{r['cycles'] / ref['cycles']:>13.2f}")


if __name__ == "__main__":
    main()
