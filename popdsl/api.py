"""The public Python API (README: "Python API").

Requires the build cache (which compiles through the pipeline), the artifact
reader and the simulator; produces `compile`,
`load`, `Executable` and `Simulator`, and `check_feed` (the rule a host feed's
dtype, shape and values must meet, shared with the CLI, which applies it to a
data file's header before reading the data).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from popdsl import artifact, cache as build_cache
from popdsl.codegen.jit import NativeCodelets
from popdsl.ir.codelet import NUMPY_DTYPE
from popdsl.limits import MAX_CYCLES, Budgets
from popdsl.ir import executable as X
from popdsl.runtime.simulator import Machine
from popdsl.ir.target import get_target
from popdsl.passes.recompute import Policy


class Executable:
    """A compiled graph: planned, with its codelets as IR.  Native code is made
    (or fetched from the cache) when a simulator first needs it."""

    def __init__(self, exe: X.Executable, native: NativeCodelets | None = None):
        self.ir = exe
        self._native = native

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def target(self):
        return self.ir.target

    @property
    def inputs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: (self.ir.tensors[i].dtype, self.ir.tensors[i].shape) for n, i in self.ir.inputs.items()}

    @property
    def outputs(self) -> list[str]:
        return list(self.ir.outputs)

    def tensors(self, kind: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (dtype, shape) of the graph's tensors a user can read and write:
        `kind` "input", "param" or "var" (None: all three)."""
        kinds = ("input", "param", "var") if kind is None else (kind,)
        return {t.name: (t.dtype, t.shape) for t in self.ir.tensors if t.kind in kinds}

    @property
    def params(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.tensors("param")

    @property
    def vars(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.tensors("var")

    def __repr__(self) -> str:
        return (f"<Executable '{self.name}' on {self.target.name} ({self.target.tiles} tiles): "
                f"{len(self.inputs)} inputs, {len(self.outputs)} outputs, {len(self.params)} params, "
                f"{len(self.vars)} vars>")

    def native(self) -> NativeCodelets:
        if self._native is None:
            self._native = NativeCodelets(list(self.ir.codelets.values()), self.ir.unchecked)
        return self._native

    def save(self, path: str | os.PathLike) -> None:
        artifact.save(self.ir, os.fspath(path))

    def memory_report(self):
        """Naive, lower-bound and planned bytes per tile and category (`.text()`, `.to_json()`)."""
        from popdsl.report.memory import memory_report
        return memory_report(self.ir)

    def partition_report(self, max_cycles: int = MAX_CYCLES):
        """Per tensor op: tiles, cycles per tile, exchange bytes (runs one step)."""
        from popdsl.report.partition import partition_report
        return partition_report(self.ir, self.native(), max_cycles)

    def draw_graph(self, path: str | os.PathLike, **options):
        """A PNG of the compiled graph (needs `pip install 'popdsl[viz]'`); returns a Picture."""
        from popdsl.report.graphpicture import draw_graph
        return draw_graph(self.ir, os.fspath(path), **options)

    def draw_memory_map(self, path: str | os.PathLike):
        """A PNG of bytes per tile on the tile grid, the busiest tiles marked."""
        from popdsl.report.pictures import draw_memory_map
        return draw_memory_map(self.ir, os.fspath(path))

    def draw_liveness(self, path: str | os.PathLike):
        """A PNG of live bytes by category over the program, the peak marked."""
        from popdsl.report.pictures import draw_liveness
        return draw_liveness(self.ir, os.fspath(path))


def compile(path_or_source: str | os.PathLike, target: str = "gc200", tiles: int | None = None,
            tile_memory: int | None = None, graph: str | None = None,
            unchecked: bool = False, reuse: bool = True, training: bool | None = None,
            budgets: Budgets | None = None, cache: bool = True, recompute: str = "auto",
            memory_budget: int | None = None, outline: bool = True) -> Executable:
    """Compile a `.pop` file (a path) or source text.  `training=False` compiles a
    graph that says `minimize` for inference (training() false, no update); None
    lets the graph say.  `budgets`: the compile-time limits (`popdsl.limits.Budgets`).
    `cache`: take an unchanged build from the build cache and store new ones
    (`popdsl.cache`; README, "Cached builds").  `recompute`: none | auto | all, how a
    training step trades compute for the activations it keeps, `auto` fitting the
    step in `memory_budget` bytes per tile (default: the tile's memory; README,
    "Recomputation").  `outline`: repeated parts of the program (def calls, loop
    iterations, statements alike) built once and called (README, "Built once,
    called many times").  Raises CompileError."""
    if isinstance(path_or_source, os.PathLike) or (
            isinstance(path_or_source, str) and path_or_source.endswith(".pop")
            and "\n" not in path_or_source):
        path = os.fspath(path_or_source)
        text = Path(path).read_text(encoding="utf-8-sig")
    else:
        path, text = "<string>", str(path_or_source)
    b = build_cache.build(text, path, get_target(target, tiles, tile_memory), graph, unchecked,
                          reuse=reuse, training=training, budgets=budgets, cache=cache,
                          recompute=Policy(recompute, memory_budget), outline=outline)
    return Executable(b.exe, b.native)


def load(path: str | os.PathLike) -> Executable:
    """Read a `.popx`.  Raises artifact.ArtifactError."""
    return Executable(artifact.load(os.fspath(path)))


def not_fed(inputs, missing) -> str:
    """What a run with inputs `missing` unfed needs: each input's type and how to
    give it.  `inputs`: an Executable or its `inputs` (name -> (dtype, shape))."""
    inputs = inputs.inputs if isinstance(inputs, Executable) else inputs
    parts = []
    for name in sorted(missing):
        dtype, shape = inputs[name]
        parts.append(f"'{name}' ({dtype}{list(shape) if shape else ''})")
    return (f"input {', '.join(parts)} not fed: give {'each' if len(parts) > 1 else 'it'} with "
            "--feed NAME=FILE.npy or --data FILE.npz (arrays named after the inputs)")


def check_feed(exe: X.Executable, name: str, dtype: np.dtype, shape: tuple, steps: int) -> bool:
    """Whether a feed of this dtype and shape fits input `name` (True: one batch
    for every step; False: `steps` batches along axis 0).  Raises ValueError
    saying why not."""
    if name not in exe.inputs:
        raise ValueError(f"no input named '{name}' (inputs: {', '.join(exe.inputs) or 'none'})")
    t = exe.tensors[exe.inputs[name]]
    want = np.dtype(NUMPY_DTYPE[t.dtype])
    if not np.can_cast(dtype, want, "same_kind") and not (dtype.kind in "iub" and want.kind in "iuf"):
        raise ValueError(f"feed '{name}' has dtype {dtype}; input is {t.dtype}")
    if tuple(shape) == t.shape:
        return True
    if t.shape and tuple(shape[1:]) == t.shape[1:] and len(shape) == len(t.shape) \
            and shape[0] == steps * t.shape[0]:
        return False
    raise ValueError(f"feed '{name}' has shape {list(shape)}; input is {list(t.shape)}"
                     + (f" (or {[steps * t.shape[0], *t.shape[1:]]} for {steps} steps)"
                        if steps > 1 and t.shape else ""))


def check_values(what: str, arr: np.ndarray, dtype: str) -> None:
    """Raise ValueError unless every value of `arr` is representable in `dtype`
    (no silent wrap of an int64 into i32, no 2 becoming true, no overflow to inf)."""
    want = np.dtype(NUMPY_DTYPE[dtype])
    if arr.dtype == want or not arr.size or arr.dtype.kind == "b":
        return
    if arr.dtype.kind in "iu":
        lo, hi = (0, 1) if want.kind == "b" else (np.iinfo(want).min, np.iinfo(want).max) \
            if want.kind in "iu" else (-np.finfo(want).max, np.finfo(want).max)
        bad = arr[(arr < lo) | (arr > hi)]
    elif want.kind == "f" and arr.dtype.itemsize > want.itemsize:
        big = np.finfo(want).max
        bad = arr[np.isfinite(arr) & (np.abs(arr) > big)]
    else:
        return
    if bad.size:
        kind = "0 and 1" if want.kind == "b" else f"{dtype}'s range"
        raise ValueError(f"{what} has values that do not fit {dtype} (e.g. {bad.reshape(-1)[0]}, "
                         f"outside {kind})")


class Simulator:
    """Runs an executable on the IPU model.  `max_cycles`: a vertex counting more
    cycles stops with a DeviceError (a loop that never ends)."""

    def __init__(self, exe: Executable, threads: int | None = None, out=None, max_cycles: int = MAX_CYCLES):
        self.exe = exe
        self.machine = Machine(exe.ir, exe.native(), threads=threads, out=out, max_cycles=max_cycles)

    @property
    def cycles(self):
        return self.machine.cycles

    def run(self, feeds: dict[str, np.ndarray] | None = None, steps: int = 1) -> dict[str, np.ndarray]:
        """Run `steps` steps.  A feed shaped like its input is used every step; one
        with `steps` times the input's leading dimension is split along axis 0,
        one batch per step.  Outputs of several steps are stacked on a new axis 0.
        Raises ValueError for a missing, unknown or misshapen feed or one whose
        values do not fit its input's dtype, DeviceError for a failing vertex,
        KeyboardInterrupt on Ctrl-C."""
        self._open()
        feeds = dict(feeds or {})
        if steps < 1:
            raise ValueError("steps must be at least 1")
        ir = self.exe.ir
        unknown = sorted(set(feeds) - set(ir.inputs))
        if unknown:
            raise ValueError(f"no input named {', '.join(map(repr, unknown))} "
                             f"(inputs: {', '.join(ir.inputs) or 'none'})")
        missing = sorted(set(ir.inputs) - set(feeds))
        if missing:
            raise ValueError(not_fed(self.exe, missing))
        per_step = {}
        for name, arr in feeds.items():
            t = ir.tensors[ir.inputs[name]]
            arr = np.asarray(arr)
            whole = check_feed(ir, name, arr.dtype, arr.shape, steps)
            check_values(f"feed '{name}'", arr, t.dtype)
            if whole:
                per_step[name] = [arr] * steps
            else:
                b = t.shape[0]
                per_step[name] = [arr[i * b:(i + 1) * b] for i in range(steps)]
        results = [self.machine.run_step({n: v[i] for n, v in per_step.items()}) for i in range(steps)]
        if steps == 1:
            return results[0]
        return {n: np.stack([r[n] for r in results]) for n in results[0]}

    def record_trace(self, per_tile: bool | None = None):
        """Record the estimated execution of the runs that follow; returns the
        recorder (`.write(path)` writes a Chrome/Perfetto trace-event file)."""
        from popdsl.report.trace import TraceRecorder
        self.machine.trace = TraceRecorder(self.exe.ir, per_tile)
        return self.machine.trace

    def read(self, name: str) -> np.ndarray:
        """Tensor `name`'s values.  Raises KeyError naming the tensors there are."""
        self._open()
        return self.machine.read(name)

    def write(self, name: str, value) -> None:
        """Set tensor `name`.  Raises KeyError (no such tensor) or ValueError (a
        wrong shape, or values that do not fit its dtype)."""
        self._open()
        i = self.exe.ir.tensor_index(name)
        if i is not None:
            check_values(f"'{name}'", np.asarray(value), self.exe.ir.tensors[i].dtype)
        self.machine.write(name, value)

    def close(self) -> None:
        self.machine.close()
        self.closed = True

    closed = False

    def _open(self) -> None:
        if self.closed:
            raise RuntimeError("this Simulator is closed: make a new one to run again")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
