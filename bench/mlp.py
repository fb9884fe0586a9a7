"""MLP forward step (batch 64, 784 → 256 → 10, softmax and cross-entropy) simulated
on all 1472 tiles of a GC200, against the same computation in numpy, measured in
the same run.  Run by hand: `python bench/mlp.py`.  Not a test."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import popdsl

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    t = time.perf_counter()
    exe = popdsl.compile(ROOT / "examples" / "mlp.pop")
    compile_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 784)).astype(np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    with popdsl.Simulator(exe) as sim:
        w1, b1 = sim.read("layer_1.dense_1.w"), sim.read("layer_1.dense_1.b")
        w2, b2 = sim.read("dense_1.w"), sim.read("dense_1.b")

        def numpy_step():
            logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
            z = logits - logits.max(1, keepdims=True)
            e = np.exp(z)
            s = e.sum(1, keepdims=True)
            probs = e / s
            loss = -(z[np.arange(64), y] - np.log(s[:, 0])).mean()
            return probs, loss, logits.argmax(1)

        sim_s = best_of(lambda: sim.run({"x": x, "y": y}))
        np_s = best_of(numpy_step, 200)
        out = sim.run({"x": x, "y": y})
        ok = np.allclose(out["probs"], numpy_step()[0], rtol=1e-4, atol=1e-6)
        c = sim.cycles
        cycles = c.total / c.steps
        moved = (c.exchange_bytes + c.local_bytes) // c.steps

    # What the host must do at the least: the bytes the partition's exchange moves,
    # copied once with numpy (a single contiguous copy, so a generous floor).
    src, dst = np.ones(moved, np.uint8), np.zeros(moved, np.uint8)
    copy_s = best_of(lambda: np.copyto(dst, src), 50)
    print(f"MLP forward, batch 64, 784-256-10, gc200 (1472 tiles); compile {compile_s:.2f} s")
    print(f"  simulated step: {sim_s * 1e3:8.3f} ms   (estimated device time {cycles / exe.target.clock_hz * 1e6:.1f} us)")
    print(f"  numpy step:     {np_s * 1e3:8.3f} ms")
    print(f"  ratio simulator / numpy: {sim_s / np_s:.1f}x  (target: at most 3x)   results match: {ok}")
    print(f"  the step's exchange copies {moved / 1e6:.2f} MB; one numpy copy of that many bytes "
          f"takes {copy_s * 1e3:.3f} ms = {copy_s / np_s:.1f}x the numpy step "
          f"({moved / copy_s / 1e9:.1f} GB/s on this machine)")


if __name__ == "__main__":
    main()
