"""Device time (issue 15): how fast the IPU model says matrix products and each
distinct ResNet-50 convolution run, against the target's peak, and popdsl's cycles for
a tile's convolution task next to what PopLibs' own estimator gives for the same work.
Also each convolution's backward pass (the input's and the weights' gradients)
against the peak and its forward pass.  Run by hand: `python bench/device.py
[--quick]`.  Not a test.

Every figure is the cycle model's estimate (`popc run --cycles` prints its constants
and their sources), from one simulated step of a graph holding just that operation,
on a GC200 (1472 tiles, 1.33 GHz, 16 f32 multiply-accumulates per tile cycle: 62.6
TFLOPS f32).

The PopLibs column re-derives, for the busiest tile's task of the plan the partitioner
chose, the estimate of PopLibs' AMP convolution vertex doing that work
(graphcore/poplibs lib/poplin/PerformanceEstimation.hpp: the supervisor vertices
ConvPartial1x1Out for 1x1 kernels, which zeroes as it goes, and ConvPartialnx1 with
its separate zeroing, getZeroSupervisorVertexCycleEstimate), for fp32 on the GC200's
AMP: 8 output channels a pass (numConvUnits), 8 input channels a group, 32 cycles to
load a pass's weights.  Our figure is the same task's compute
cycles as the model charges them (`ops.conv.conv_tile_cycles`, which
tests/test_amp.py holds equal to the simulated count).

Each matrix product also gets the model's floor (`matmul_floor`): the fewest cycles
any split over the tiles could reach under the same constants, leaving out every
overhead a real plan pays.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np

import popdsl
from popdsl.ir.cost import AMP_COLS, AMP_ELEMENT, AMP_PASS, AMP_ROWS, amp_load_cycles
from popdsl.ir.target import get_target
from popdsl.ops.blocks import ceil_div
from popdsl.ops.conv import _conv_plan, conv_tile_cycles

TARGET = get_target("gc200")
PEAK_FLOPS = 2 * 16 * TARGET.tiles * TARGET.clock_hz          # f32: 16 MACs per tile cycle

# ResNet-50 (v1.5, batch 1, 224 x 224): every distinct convolution as
# (name, in channels, out channels, input size, kernel, stride, padding, how many).
RESNET50_CONVS = [
    ("conv1 7x7/2", 3, 64, 224, 7, 2, 3, 1),
    ("s1 1x1 64->64", 64, 64, 56, 1, 1, 0, 1),
    ("s1 3x3 64", 64, 64, 56, 3, 1, 1, 3),
    ("s1 1x1 64->256", 64, 256, 56, 1, 1, 0, 4),
    ("s1 1x1 256->64", 256, 64, 56, 1, 1, 0, 2),
    ("s2 1x1 256->128", 256, 128, 56, 1, 1, 0, 1),
    ("s2 3x3/2 128", 128, 128, 56, 3, 2, 1, 1),
    ("s2 1x1 128->512", 128, 512, 28, 1, 1, 0, 4),
    ("s2 1x1/2 256->512", 256, 512, 56, 1, 2, 0, 1),
    ("s2 1x1 512->128", 512, 128, 28, 1, 1, 0, 3),
    ("s2 3x3 128", 128, 128, 28, 3, 1, 1, 3),
    ("s3 1x1 512->256", 512, 256, 28, 1, 1, 0, 1),
    ("s3 3x3/2 256", 256, 256, 28, 3, 2, 1, 1),
    ("s3 1x1 256->1024", 256, 1024, 14, 1, 1, 0, 6),
    ("s3 1x1/2 512->1024", 512, 1024, 28, 1, 2, 0, 1),
    ("s3 1x1 1024->256", 1024, 256, 14, 1, 1, 0, 5),
    ("s3 3x3 256", 256, 256, 14, 3, 1, 1, 5),
    ("s4 1x1 1024->512", 1024, 512, 14, 1, 1, 0, 1),
    ("s4 3x3/2 512", 512, 512, 14, 3, 2, 1, 1),
    ("s4 1x1 512->2048", 512, 2048, 7, 1, 1, 0, 3),
    ("s4 1x1/2 1024->2048", 1024, 2048, 14, 1, 2, 0, 1),
    ("s4 1x1 2048->512", 2048, 512, 7, 1, 1, 0, 2),
    ("s4 3x3 512", 512, 512, 7, 3, 1, 1, 2),
]
MATMULS = [(1, 2048, 1000), (256, 256, 256), (1024, 1024, 1024)]


def simulate(src: str, feeds: dict) -> tuple[int, int, int]:
    """(total, compute, exchange) estimated cycles of one step of `src`."""
    exe = popdsl.compile(src)
    with popdsl.Simulator(exe) as sim:
        sim.run(feeds)
        c = sim.cycles
        return c.total, c.compute, c.exchange


def matmul_row(m: int, k: int, n: int) -> str:
    src = f"graph mm(tiles = {TARGET.tiles}) {{ input a: f32[{m}, {k}]; input b: f32[{k}, {n}]; output c = a @ b; }}"
    rng = np.random.default_rng(0)
    total, compute, exchange = simulate(src, {"a": rng.standard_normal((m, k), np.float32),
                                              "b": rng.standard_normal((k, n), np.float32)})
    flops = 2 * m * k * n / (total / TARGET.clock_hz)
    floor = matmul_floor(m, k, n)
    return (f"  {m:>5} x {k:>5} x {n:>5}  {total:>10,}  {compute:>10,}  {exchange:>9,}  "
            f"{flops / 1e12:>7.2f}  {flops / PEAK_FLOPS:>6.1%}  {floor:>10,.0f}  "
            f"{2 * m * k * n / (floor / TARGET.clock_hz) / PEAK_FLOPS:>6.1%}")


def matmul_floor(m: int, k: int, n: int) -> float:
    """A lower bound of the model's cycles for an m x k by k x n f32 product: the best,
    over real-valued tile blocks mt x kt by kt x nt (mt kt nt = m k n / tiles), of
    - the AMP passes, max(mt/8, 1) max(kt/8, 1) of them, each AMP_PASS + a sixth of
      loading its held block + AMP_ELEMENT nt/6 worker cycles on each of the six
      workers (`ir.cost.amp_cycles`; no vertex overhead);
    - the exchange, at the model's bytes per cycle: the a and b blocks but for the one
      tile's share of them that could hold it already (n/nt tiles need each a block,
      m/mt each b block), and (s-1)/s of the partial block when k is split s = k/kt ways;
    - adding the partials, one instruction per element and partial (ReduceSumCols2);
    - four syncs (exchange, compute, exchange, compute).
    It leaves out zeroing c, vertex overheads and whole-number block shapes, so no
    plan reaches it.  (Until 2026-12-02 it also left out loading the held blocks:
    51.6 % of peak for 1024^3 instead of 49.8 %.)"""
    workers, rate = TARGET.workers, TARGET.exchange_bytes_per_cycle
    rows, cols = AMP_ROWS["f32"], AMP_COLS["f32"]
    mt = np.geomspace(1, m, 400)[:, None]
    nt = np.geomspace(1, n, 400)[None, :]
    kt = m * k * n / TARGET.tiles / (mt * nt)
    ok = (kt >= 1) & (kt <= k)
    split = k / kt
    # A pass holds up to rows x cols of a: at least one, however thin the block.
    passes = np.maximum(mt / rows, 1) * np.maximum(kt / cols, 1)
    load = amp_load_cycles("f32")
    amp = workers * passes * (AMP_PASS + load + AMP_ELEMENT * nt / workers)
    partials = mt * nt * (split - 1) / split
    exchange = (mt * kt * (1 - nt / n) + kt * nt * (1 - mt / m) + partials) * 4 / rate
    total = amp + exchange + partials + 4 * TARGET.sync_cycles
    return float(np.min(np.where(ok, total, np.inf)))


def _worker_partitions(rows: int, width: int, workers: int, contiguous: bool = False) -> list[list[int]]:
    """PopLibs' split of an output field of `rows` rows of `width` elements over the
    workers: near-equal runs of elements, each broken where a row ends unless the
    rows are contiguous in input and output (a 1x1 kernel of stride 1)."""
    if contiguous:
        rows, width = 1, rows * width
    total = rows * width
    out = []
    for w in range(min(workers, total)):
        a, b = total * w // workers, total * (w + 1) // workers
        parts = []
        while a < b:
            end = min(b, (a // width + 1) * width)
            parts.append(end - a)
            a = end
        out.append(parts)
    return out


def poplibs_nx1(ob: int, cb: int, rows: int, ow: int, kh: int, kw: int, workers: int = 6) -> int:
    """PopLibs' estimate for ConvPartialnx1 doing one tile's task (fp32, GC200 AMP:
    8 convolution units, input channel groups of 8, weight loads of 32 cycles), its
    output field split over the workers, plus zeroing the partials
    (getZeroSupervisorVertexCycleEstimate, 64-bit stores)."""
    units, in_group, loads = 8, 8, 32
    out_groups, in_groups = ceil_div(ob, units), ceil_div(cb, in_group)
    split = _worker_partitions(rows, ow, workers)

    def partition(n: int) -> int:            # one worker's cycles for a run of n field elements
        return {0: 18, 1: 30, 2: 34}.get(n, 35 + (n - 3) * 4)
    worker = [19 + sum(partition(n) for n in parts) for parts in split]
    busiest, idlest = max(worker) * workers, (min(worker) * workers if len(worker) == workers else 0)
    per_pass = loads + 15 + max(busiest, idlest + 9)
    inner = kh * (15 + kw * (13 + per_pass))
    conv = 93 + (15 + out_groups * (16 + in_groups * (16 + inner)))
    zero = max(ceil_div(sum(parts) * units, 2) + 4 for parts in split) * out_groups * workers + 12
    return conv + zero


def poplibs_1x1(ob: int, cb: int, rows: int, ow: int, stride: int, workers: int = 6) -> int:
    """PopLibs' estimate for ConvPartial1x1Out doing one tile's 1x1 task (fp32, GC200
    AMP as above): per worker 16 + per run of n elements 40 + (n - 3) * 4, the first
    input-channel group zeroing its outputs as it goes (+ 2 + 4 n)."""
    units, in_group, loads = 8, 8, 32
    out_groups, in_groups = ceil_div(ob, units), ceil_div(cb, in_group)
    split = _worker_partitions(rows, ow, workers, contiguous=stride == 1)

    def inner(zeroing: bool) -> int:
        def run(n: int) -> int:
            if n == 0:
                return 15
            return 40 + (2 + 4 * n) * zeroing + max(0, n - 3) * 4
        worker = [16 + sum(run(n) for n in parts) for parts in split]
        busiest, idlest = max(worker) * workers, (min(worker) * workers if len(worker) == workers else 0)
        return max(busiest, idlest + 14)
    return 55 + (13 + (in_groups - 1) * (13 + out_groups * (11 + 6 + loads + inner(False)))
                 + (13 + out_groups * (11 + 6 + loads + inner(True))))


def conv_row(name, c, o, h, k, s, pad, count) -> tuple[str, int, int]:
    oh = (h + 2 * pad - k) // s + 1
    src = (f"graph conv(tiles = {TARGET.tiles}) {{ input x: f32[1, {c}, {h}, {h}]; "
           f"param w: f32[{o}, {c}, {k}, {k}] = he_normal(); "
           f"output y = conv2d(x, w, stride = {s}, padding = {pad}); }}")
    x = np.random.default_rng(0).standard_normal((1, c, h, h), np.float32)
    total, compute, exchange = simulate(src, {"x": x})
    macs = o * c * k * k * oh * oh
    flops = 2 * macs / (total / TARGET.clock_hz)
    # The busiest tile's task of the partitioner's plan, costed both ways.  A strided
    # 1x1 kernel convolves the subsampled input with stride 1 (`shape.subsampled`, as
    # PopLibs' planner expands a kernel-1 dimension), so both vertices stream
    # contiguous rows.
    wp, s = (oh, 1) if k == 1 and s > 1 else (h + 2 * pad, s)
    p = SimpleNamespace(g=SimpleNamespace(target=TARGET), tiles=TARGET.tiles)
    go, gr, gc = _conv_plan(p, 1, o, c, oh, oh, k, s, wp, k * k)
    ob, rb, cb = ceil_div(o, go), ceil_div(oh, gr), ceil_div(c, gc)
    ours = conv_tile_cycles(ob, cb, rb, oh, k, k, TARGET.workers)
    theirs = poplibs_1x1(ob, cb, rb, oh, s) if k == 1 else poplibs_nx1(ob, cb, rb, oh, k, k)
    line = (f"  {name:<22} x{count}  {total:>9,}  {compute:>9,}  {exchange:>8,}  {flops / 1e12:>6.2f}  "
            f"{flops / PEAK_FLOPS:>6.1%}  {ob:>3}x{cb:<4}x{rb:>2}x{oh:<3}  {ours:>7,}  {theirs:>7,}  "
            f"{ours / theirs:>5.2f}")
    return line, total * count, compute


def conv_grad_row(name, c, o, h, k, s, pad, count, forward_compute: int) -> str:
    """The backward pass of one convolution: the input's gradient (Conv2dGradX,
    amp_at) and the weights' (Conv2dGradW, amp_bt), each op's compute cycles on its
    busiest tile (`popc report --partition`), against the peak and the forward
    convolution's compute cycles."""
    oh = (h + 2 * pad - k) // s + 1
    src = (f"graph convgrad(tiles = {TARGET.tiles}) {{ param x: f32[1, {c}, {h}, {h}] = he_normal(); "
           f"param w: f32[{o}, {c}, {k}, {k}] = he_normal(); input gy: f32[1, {o}, {oh}, {oh}]; "
           f"map gy -> linear; let loss = sum(conv2d(x, w, stride = {s}, padding = {pad}) * gy); "
           f"output dx = grad(loss, x); output dw = grad(loss, w); }}")
    rows = popdsl.compile(src).partition_report().rows
    macs = o * c * k * k * oh * oh
    cells, both = [], 0
    # By the primitive each row runs, not its name: a strided 1x1 convolution's
    # gradients number their ops differently (the subsampled input's op comes first).
    for op in ("conv2d_grad_x", "conv2d_grad_w"):
        cycles = sum(r["max_cycles"] for r in rows if r["op"] == op)
        assert cycles, f"no {op} in the gradient graph of {name}"
        both += cycles
        cells.append(f"{cycles:>9,}  {2 * macs / (cycles / TARGET.clock_hz) / PEAK_FLOPS:>6.1%}")
    return f"  {name:<22} x{count}  {cells[0]}  {cells[1]}  {both / forward_compute:>8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the matmuls and three convolutions only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"GC200 model: {TARGET.tiles} tiles at {TARGET.clock_hz / 1e9:.2f} GHz; "
          f"f32 peak {PEAK_FLOPS / 1e12:.1f} TFLOPS (16 MACs per tile cycle)")
    print("\nmatrix products (a @ b, f32): estimated cycles of one step")
    print("      M       K       N       total     compute   exchange  TFLOPS  of peak  model floor  of peak")
    for m, k, n in MATMULS:
        print(matmul_row(m, k, n), flush=True)
    print("\nResNet-50 convolutions (batch 1, f32): one step of each alone; the busiest tile's task\n"
          "(out x in channels x rows x width) costed by popdsl and by PopLibs' estimate (ConvPartial1x1Out or nx1)")
    print("  convolution            n      total    compute  exchange  TFLOPS  of peak  task               "
          "popdsl  PopLibs  ratio")
    convs = RESNET50_CONVS[:3] if args.quick else RESNET50_CONVS
    weighted, forward = 0, {}
    for case in convs:
        line, cycles, forward[case[0]] = conv_row(*case)
        weighted += cycles
        print(line, flush=True)
    if not args.quick:
        print(f"\nResNet-50's convolutions one after another, each alone on the chip: {weighted:,} cycles "
              f"= {weighted / TARGET.clock_hz * 1e3:.2f} ms")
    print("\ntheir backward passes (a training step's gradients, batch 1): compute cycles of the busiest\n"
          "tile and share of peak for the input's gradient (amp_at) and the weights' (amp_bt), and the\n"
          "two together against the forward convolution's compute cycles")
    print("  convolution            n   input grad  of peak  weight grad  of peak  vs forward")
    for case in convs:
        print(conv_grad_row(*case, forward[case[0]]), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
