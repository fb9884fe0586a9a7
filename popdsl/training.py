"""Running many steps over a data set: batches, a progress bar, test accuracy
(README: "Training from the command line").

Requires the API (`Executable`, `Simulator`); produces what `popc run` does with
data:
- `Stream`: arrays by input name checked against a graph's inputs.  A feed shaped
  like its input is used every step; a feed with more examples along axis 0 (the
  same shape otherwise, or the same number of values per example: MNIST's
  [N, 28, 28] feeds an input [B, 784]) is streamed: step i takes batch i mod the
  whole batches it holds (an epoch), the examples after the last whole batch are
  left out, as PyTorch's `drop_last`.
- `run`: the steps, their outputs stacked, and on a terminal a progress bar (step,
  epoch, loss, accuracy, samples/s, estimated device time per step) from the
  outputs named `loss` and `accuracy`.
- `evaluate`: an inference executable of the same graph given the trained
  parameters and state (by name), run over a test set batch by batch; the mean of
  its `loss` and `accuracy` outputs.

Bad data raises `DataError` (a ValueError) whose message names the input and says
what is wrong.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from popdsl.api import Executable, Simulator, check_values, not_fed
from popdsl.ir.codelet import NUMPY_DTYPE
from popdsl.node import node

REPORTED = ("loss", "accuracy")          # the outputs a progress bar and an evaluation show


class DataError(ValueError):
    """Data that does not fit the graph's inputs (a user error)."""


@node(eq=False)
class Stream:
    every_step: dict[str, np.ndarray]     # one batch, used every step
    streamed: dict[str, np.ndarray]       # examples along axis 0, shaped like the input's rows
    batch: dict[str, int]                 # rows per step of each streamed input
    batches: int                          # whole batches per epoch (1 when nothing streams)
    examples: int                         # examples in the data set (0 when nothing streams)
    left_out: int                         # examples after the last whole batch

    def feeds(self, step: int) -> dict[str, np.ndarray]:
        i = step % self.batches
        out = dict(self.every_step)
        for name, arr in self.streamed.items():
            b = self.batch[name]
            out[name] = arr[i * b:(i + 1) * b]
        return out

    @property
    def samples_per_step(self) -> int:
        return next(iter(self.batch.values()), 0)


def check_feed(inputs: dict, name: str, dtype: np.dtype, shape: tuple, where: str = "") -> bool:
    """Whether a feed of this dtype and shape fits input `name` (True: one batch,
    used by every step; False: examples to stream in batches).  Raises DataError
    saying why not.  Needs only a file's header, so data is refused before it is
    read."""
    at = f" in {where}" if where else ""
    if name not in inputs:
        raise DataError(f"no input named '{name}'{at} (inputs: {', '.join(inputs) or 'none'})")
    dt, want_shape = inputs[name]
    want = np.dtype(NUMPY_DTYPE[dt])
    dtype = np.dtype(dtype)
    if not np.can_cast(dtype, want, "same_kind") and not (dtype.kind in "iub" and want.kind in "iuf"):
        raise DataError(f"feed '{name}'{at} has dtype {dtype}; input is {dt}")
    shape = tuple(int(n) for n in shape)
    if shape == want_shape:
        return True
    per_example = int(np.prod(want_shape[1:], dtype=np.int64)) if want_shape else 0
    ok = bool(want_shape) and len(shape) >= 1 and shape[0] >= want_shape[0] and (
        shape[1:] == want_shape[1:] or int(np.prod(shape[1:], dtype=np.int64)) == per_example)
    if not ok:
        raise DataError(f"feed '{name}'{at} has shape {list(shape)}; input is {list(want_shape)}"
                        + (f" (or [N, {', '.join(map(str, want_shape[1:]))}] to stream N examples in batches "
                           f"of {want_shape[0]})" if want_shape else ""))
    return False


def prepare(exe: Executable, feeds: dict[str, np.ndarray], where: str = "") -> Stream:
    """`feeds` checked against `exe`'s inputs and split into batches.  `where`
    names the data (a file) in messages."""
    inputs = exe.inputs
    at = f" in {where}" if where else ""
    unknown = sorted(set(feeds) - set(inputs))
    if unknown:
        raise DataError(f"no input named {', '.join(map(repr, unknown))}{at} "
                        f"(inputs: {', '.join(inputs) or 'none'})")
    missing = sorted(set(inputs) - set(feeds))
    if missing:
        has = f" ({where} has: {', '.join(sorted(feeds)) or 'nothing'})" if where else ""
        raise DataError(not_fed(exe, missing) + has)
    every, streamed, batch, counts = {}, {}, {}, {}
    for name, arr in feeds.items():
        dtype, shape = inputs[name]
        arr = np.asarray(arr)
        once = check_feed(inputs, name, arr.dtype, arr.shape, where)
        want = np.dtype(NUMPY_DTYPE[dtype])
        try:
            check_values(f"feed '{name}'{at}", arr, dtype)
        except ValueError as e:
            raise DataError(str(e)) from None
        if once:
            every[name] = arr.astype(want)
            continue
        streamed[name] = arr.reshape((arr.shape[0],) + shape[1:]).astype(want)
        batch[name] = shape[0]
        counts[name] = arr.shape[0] // shape[0]
    if len(set(counts.values())) > 1:
        raise DataError(f"streamed feeds{at} hold different numbers of batches: "
                        + ", ".join(f"'{n}' {c} of {batch[n]}" for n, c in sorted(counts.items())))
    batches = next(iter(counts.values()), 1)
    first = next(iter(streamed), None)
    examples = len(streamed[first]) if first else 0
    left = examples - batches * batch[first] if first else 0
    return Stream(every, streamed, batch, batches, examples, left)


class Progress:
    """One line on a terminal, redrawn at most `every` seconds and kept at the end
    of each epoch: step, epoch, the epoch's mean loss and accuracy so far,
    samples per second of host time, and the estimated device time per step."""

    def __init__(self, out, steps: int, stream: Stream, clock_hz: float, every: float = 0.1):
        self.out, self.steps, self.stream, self.clock_hz, self.every = out, steps, stream, clock_hz, every
        self.start = self.last = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.count = 0
        # Without streamed data there are no epochs: one line for the whole run.
        self.per_epoch = stream.batches if stream.streamed else steps
        self.epochs = -(-steps // self.per_epoch)

    def update(self, step: int, outputs: dict, cycles) -> None:
        for k in REPORTED:
            if k in outputs and np.asarray(outputs[k]).size == 1:
                self.sums[k] = self.sums.get(k, 0.0) + float(np.asarray(outputs[k]).reshape(()))
        self.count += 1
        now = time.perf_counter()
        end_of_epoch = step % self.per_epoch == 0 or step == self.steps
        if end_of_epoch or now - self.last >= self.every:
            self.last = now
            self.out.write("\r" + self.line(step, now, cycles) + ("\n" if end_of_epoch else ""))
            self.out.flush()
        if end_of_epoch:
            self.sums, self.count = {}, 0

    def line(self, step: int, now: float, cycles) -> str:
        epoch = -(-step // self.per_epoch)
        parts = [f"step {step}/{self.steps}"]
        if self.epochs > 1:
            parts.append(f"epoch {epoch}/{self.epochs}")
        parts += [f"{k} {self.sums[k] / self.count:.4f}" for k in REPORTED if k in self.sums]
        if self.stream.samples_per_step:
            parts.append(f"{step * self.stream.samples_per_step / max(now - self.start, 1e-9):,.0f} samples/s")
        parts.append(f"device {cycles.total / max(cycles.steps, 1) / self.clock_hz * 1e3:.3f} ms/step (est.)")
        return "  ".join(parts).ljust(100)


def run(sim: Simulator, stream: Stream, steps: int, out=None) -> dict[str, np.ndarray]:
    """`steps` steps over the stream; outputs of several steps are stacked on a new
    axis 0.  A progress bar goes to `out` (default stdout) when it is a terminal and
    there is more than one step."""
    out = sys.stdout if out is None else out
    bar = Progress(out, steps, stream, sim.exe.target.clock_hz) if steps > 1 and _is_terminal(out) else None
    results = []
    for i in range(steps):
        results.append(sim.run(stream.feeds(i)))
        if bar is not None:
            bar.update(i + 1, results[-1], sim.cycles)
    if steps == 1:
        return results[0]
    return {n: np.stack([r[n] for r in results]) for n in results[0]}


def _is_terminal(out) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):
        return False


def state_names(exe: Executable) -> list[str]:
    """The tensors a training run carries from step to step and saves: parameters,
    vars (running statistics, RNN state) and the optimizer's state."""
    return [t.name for t in exe.ir.tensors if t.kind in ("param", "var")]


def reported(exe: Executable) -> list[str]:
    """The outputs an evaluation reports, or DataError when the graph has none."""
    names = [n for n in REPORTED if n in exe.outputs]
    if not names:
        raise DataError(f"graph '{exe.name}' has no output named 'loss' or 'accuracy' to report")
    return names


def evaluate(exe: Executable, trained: Simulator, stream: Stream,
             threads: int | None = None) -> tuple[dict[str, float], int]:
    """Means of the `loss` and `accuracy` outputs of inference executable `exe`
    over every whole batch of `stream`, with the trained simulator's parameters
    and vars (those `exe` has, by name), and the number of examples they cover."""
    names = reported(exe)
    known = set(state_names(trained.exe))
    with Simulator(exe, threads=threads) as sim:
        for name in state_names(exe):
            if name in known:
                sim.write(name, trained.read(name))
        sums = dict.fromkeys(names, 0.0)
        for i in range(stream.batches):
            got = sim.run(stream.feeds(i))
            for n in names:
                sums[n] += float(np.mean(got[n]))
    if stream.streamed:
        seen = stream.batches * stream.samples_per_step
    else:
        seen = next((a.shape[0] for a in stream.every_step.values() if a.ndim), 1)
    return {n: v / stream.batches for n, v in sums.items()}, seen
