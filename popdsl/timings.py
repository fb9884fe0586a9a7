"""Where a compile's time and memory go, and a progress line on a terminal.

Requires the standard library only (it sits at the bottom of the layers: the
pipeline knows nothing of it, a caller passes `StageMonitor.stage` as the
pipeline's `monitor` hook).  Produces `StageMonitor`: entered around each stage of
a compile, it records the stage's wall time and peak resident memory, renders them
as a table (`popc build --timings`), and — when given a terminal — keeps one line
on it saying which stage is running, for how long, and the counts known so far.

Peak memory per stage, honestly: the kernel keeps one high-water mark of the
process's resident set (`getrusage` ru_maxrss), which cannot be reset without
falsifying what `time -v` and others later report.  So a stage that raised that
mark gets it exactly (the new peak was reached inside the stage); a stage that did
not gets the highest of samples of the resident set (/proc/self/statm) taken every
10 ms while it ran, marked `~` — a lower bound that can miss a spike shorter than
the sampling period.  tracemalloc would see only Python's allocations (not LLVM's)
and slow the compile down several times, so it is not used.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

SAMPLE_SECONDS = 0.01        # resident-set samples while a stage runs
REDRAW_SECONDS = 0.25        # the progress line's refresh
QUIET_SECONDS = 1.0          # a compile shorter than this shows no progress at all
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# ru_maxrss is in kilobytes on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def max_rss() -> int:
    """The process's resident high-water mark so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT


def current_rss() -> int | None:
    """The process's resident set now, in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Row:
    name: str
    seconds: float
    peak: int                 # bytes
    exact: bool               # the kernel's high-water mark (True) or the highest sample (False)
    note: str = ""


@dataclass
class StageMonitor:
    """`with mon.stage(NAME): ...` times a stage.  `progress`: a text stream (a
    terminal) for the progress line, or None.  `sample`: sample the resident set
    while stages run (for the table's peaks; costs one short read every 10 ms)."""
    progress: object = None
    sample: bool = True
    label: str = "popc"
    rows: list[Row] = field(default_factory=list)
    counts: str = ""          # shown on the progress line: what the stages so far produced
    order: tuple = ()         # the pipeline's stages, for "(3/8)" on the progress line

    def __post_init__(self):
        self._t0 = time.perf_counter()
        self._current: str | None = None
        self._stage_t0 = self._t0
        self._peak_sample = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._shown = False
        self._thread = None
        if self.progress is not None or self.sample:
            self._thread = threading.Thread(target=self._watch, name="popdsl-stage-monitor", daemon=True)
            self._thread.start()

    @contextmanager
    def stage(self, name: str, note: str = ""):
        before = max_rss()
        rss = current_rss()
        with self._lock:
            self._current, self._stage_t0 = name, time.perf_counter()
            self._peak_sample = rss or 0
        try:
            yield
        finally:
            t = time.perf_counter()
            after = max_rss()
            rss = current_rss() or 0
            with self._lock:
                sampled = max(self._peak_sample, rss)
                self._current = None
            # A stage that raised the process's high-water mark reached it inside.
            exact = after > before
            self.rows.append(Row(name, t - self._stage_t0, after if exact else sampled, exact, note))

    def note(self, text: str) -> None:
        """Add to the last row's note (a cache hit or miss)."""
        if self.rows:
            self.rows[-1].note = (self.rows[-1].note + "; " if self.rows[-1].note else "") + text

    def close(self) -> None:
        """Stop the watcher and clear the progress line (before any other output)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._shown:
            self._write("\r\x1b[K")
            self._shown = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the watcher

    def _watch(self) -> None:
        next_draw = self._t0 + QUIET_SECONDS
        while not self._stop.wait(max(SAMPLE_SECONDS if self.sample else REDRAW_SECONDS, 0.005)):
            if self.sample:
                rss = current_rss()
                if rss is not None:
                    with self._lock:
                        if self._current is not None and rss > self._peak_sample:
                            self._peak_sample = rss
            now = time.perf_counter()
            if self.progress is not None and now >= next_draw:
                next_draw = now + REDRAW_SECONDS
                self._draw(now)

    def _draw(self, now: float) -> None:
        with self._lock:
            name = self._current
        if name is None:
            return
        base = name.split()[-1]
        step = f" ({self.order.index(base) + 1}/{len(self.order)})" if base in self.order else ""
        counts = f", {self.counts}" if self.counts else ""
        self._write(f"\r\x1b[K{self.label}: {name}{step}{counts}, {now - self._t0:.1f} s")
        self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.progress.write(text)
            self.progress.flush()
        except (OSError, ValueError):      # a closed or vanished terminal: no progress
            pass

    # ------------------------------------------------------------ the table

    def total_seconds(self) -> float:
        return time.perf_counter() - self._t0

    def table(self, title: str = "") -> str:
        out = [title] if title else []
        w = max([14] + [len(r.name) + 1 for r in self.rows])
        out.append(f"  {'stage':<{w}}{'wall s':>9}{'peak RSS MiB':>14}  ")
        for r in self.rows:
            peak = f"{'' if r.exact else '~'}{r.peak / 2**20:,.0f}"
            out.append(f"  {r.name:<{w}}{r.seconds:>9.2f}{peak:>14}  {r.note}".rstrip())
        out.append(f"  {'total':<{w}}{self.total_seconds():>9.2f}{max_rss() / 2**20:>14,.0f}  "
                   "(process peak)")
        out.append("  wall s: the stage's own time (its verifier's too, with --verify); total: "
                   "from the start of the compile, reading the source included")
        out.append("  peak RSS: the process's resident high-water mark where the stage raised it; "
                   f"~: the stage did not, and this is the highest resident size sampled every "
                   f"{SAMPLE_SECONDS * 1000:.0f} ms while it ran")
        return "\n".join(out)
