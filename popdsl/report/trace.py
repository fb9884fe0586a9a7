"""Execution traces: the IPU model's estimated run as Chrome / Perfetto trace events.

Requires an `Executable` and a `runtime.simulator.Machine` to attach to (its `trace`
hook tells the recorder every action and phase with the cycle it starts at — no
second simulation); produces a trace-event JSON file (open it in ui.perfetto.dev or
chrome://tracing), written atomically.

What is in it, in time at the target's clock (`ts`, `dur` in microseconds, whole
nanoseconds so that adjacent events meet exactly):

* process "program": one track with an `X` event per step, inside it one per action
  (a compute set's execution, a copy), inside those their phases — exchange in,
  compute, exchange out, each followed by its sync — as the cycle model counts them;
  `C` counter events of live data bytes by category (all tiles) at each action,
  from the memory plan's timeline.
* process "tiles": one track per tile on targets of up to `PER_TILE_MAX` tiles (or
  with `per_tile=True`), else `GROUPS` tracks of consecutive tiles, each showing the
  busiest tile of its group (the mean is in the event's args).  A tile's compute
  event lasts its own cycles; its exchange event the cycles its bytes take at the
  exchange rate (the busiest of bytes out, in, or moved on the tile).  The gap to
  the next phase is the wait for the busiest tile, then the sync.
* `M` metadata events name the processes and tracks.

Events on one track nest strictly (`check_trace` checks it, and the tests run it).
"""
from __future__ import annotations

import json

import numpy as np

from popdsl.atomic import write_atomically
from popdsl.ir import executable as X
from popdsl.ir.cost import assumptions, tile_bytes

PER_TILE_MAX = 64
GROUPS = 16
PROGRAM_PID, TILES_PID = 1, 2


class TraceRecorder:
    """Attach with `machine.trace = TraceRecorder(exe)`; `write(path)` after running."""

    def __init__(self, exe: X.Executable, per_tile: bool | None = None):
        self.exe = exe
        t = exe.target
        self.per_tile = t.tiles <= PER_TILE_MAX if per_tile is None else per_tile
        if self.per_tile:
            self.cuts = np.arange(t.tiles + 1)
        else:
            self.cuts = np.linspace(0, t.tiles, min(GROUPS, t.tiles) + 1).round().astype(np.int64)
        self.points = _program_points(exe.program)
        self.records: list[tuple] = []           # (what, start cycle, ...)
        self._exchange: dict[tuple[str, int], np.ndarray] = {}

    # ------------------------------------------------------------ the simulator's hook
    def action(self, node, cycle: int) -> None:
        self.records.append(("action", cycle, node))

    def copy(self, kind: str, index: int, cycle: int) -> None:
        self.records.append(("copy", cycle, kind, index))

    def compute(self, cs: int, cycle: int, per_tile) -> None:
        self.records.append(("compute", cycle, cs, per_tile))

    def step(self, n: int, start: int, end: int) -> None:
        self.records.append(("step", start, n, end))

    # ------------------------------------------------------------ events
    def _table(self, kind: str, index: int) -> X.CopyTable:
        if kind == "pre":
            return self.exe.compute_sets[index].pre
        if kind == "post":
            return self.exe.compute_sets[index].post
        return self.exe.copies[index]

    def exchange_per_tile(self, kind: str, index: int) -> np.ndarray:
        """Cycles each tile's part of a copy takes (`ir.cost.tile_bytes`: its busiest
        of bytes sent, received and moved on the tile, at the exchange rate)."""
        key = (kind, index)
        hit = self._exchange.get(key)
        if hit is None:
            c, t = self._table(kind, index), self.exe.target
            busiest = tile_bytes(c.src, c.dst, c.nbytes, t) if c.src.size else np.zeros(t.tiles, np.int64)
            hit = self._exchange[key] = -(-busiest // t.exchange_bytes_per_cycle)
        return hit

    def events(self) -> list[dict]:
        exe, t = self.exe, self.exe.target
        sync = t.sync_cycles
        ns = 1e9 / t.clock_hz
        ev: list[dict] = []

        def us(cycle) -> float:
            return round(cycle * ns) / 1000.0

        def x(pid, tid, name, cat, start, end, args=None):
            if end <= start and cat != "step":
                return
            e = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid,
                 "ts": us(start), "dur": round(round(end * ns) - round(start * ns)) / 1000.0}
            if args:
                e["args"] = args
            ev.append(e)

        ev += self._metadata()
        starts = self.cuts[:-1]
        ops = _cs_ops(exe)
        timeline = _timeline_by_category(exe)
        open_action = None

        def close_action(end):
            nonlocal open_action
            if open_action is not None:
                name, start, args = open_action
                if end > start:
                    x(PROGRAM_PID, 0, name, "action", start, end, args)
                open_action = None

        def tiles_event(name, cat, start, per_tile, args):
            if per_tile is None:
                return
            if self.per_tile:
                for tile in np.nonzero(per_tile)[0].tolist():
                    x(TILES_PID, tile, name, cat, start, start + int(per_tile[tile]),
                      {**args, "cycles": int(per_tile[tile])})
                return
            mx = np.maximum.reduceat(per_tile, starts)
            mean = np.add.reduceat(per_tile, starts) / np.diff(self.cuts)
            for gi in np.nonzero(mx)[0].tolist():
                a, b = int(self.cuts[gi]), int(self.cuts[gi + 1])
                busiest = a + int(np.argmax(per_tile[a:b]))
                x(TILES_PID, gi, name, cat, start, start + int(mx[gi]),
                  {**args, "busiest tile": busiest, "max cycles": int(mx[gi]),
                   "mean cycles": round(float(mean[gi]), 1)})

        for rec in self.records:
            what, cycle = rec[0], rec[1]
            if what == "action":
                close_action(cycle)
                node = rec[2]
                point = self.points.get(id(node))
                if isinstance(node, X.PExecute):
                    cs = exe.compute_sets[node.cs]
                    args = {"compute set": cs.name, "source": str(cs.span), **ops.get(node.cs, {})}
                    open_action = (f"execute {cs.name}", cycle, args)
                elif isinstance(node, X.PCopy):
                    open_action = ("copy", cycle, {"copy": node.copy})
                if point is not None and timeline and point < len(next(iter(timeline.values()))):
                    ev.append({"ph": "C", "name": "live data (all tiles, bytes)", "pid": PROGRAM_PID,
                               "tid": 0, "ts": us(cycle),
                               "args": {k: int(v[point]) for k, v in timeline.items()}})
            elif what == "copy":
                kind, index = rec[2], rec[3]
                c = self._table(kind, index)
                label = {"pre": "exchange in", "post": "exchange out", "copy": "exchange"}[kind]
                args = {"bytes between tiles": int(c.exchange_bytes), "bytes on tiles": int(c.local_bytes),
                        "cycles": int(c.cycles - sync)}
                x(PROGRAM_PID, 0, label, "exchange", cycle, cycle + c.cycles - sync, args)
                x(PROGRAM_PID, 0, "sync", "sync", cycle + c.cycles - sync, cycle + c.cycles)
                name = label if kind == "copy" else f"{label}: {exe.compute_sets[index].name}"
                tiles_event(name, "exchange", cycle, self.exchange_per_tile(kind, index), {})
            elif what == "compute":
                csi, per_tile = rec[2], rec[3]
                cs = exe.compute_sets[csi]
                phase = int(per_tile.max()) if per_tile is not None and per_tile.size else 0
                x(PROGRAM_PID, 0, "compute", "compute", cycle, cycle + phase,
                  {"compute set": cs.name, "cycles (busiest tile)": phase})
                x(PROGRAM_PID, 0, "sync", "sync", cycle + phase, cycle + phase + sync)
                tiles_event(cs.name, "compute", cycle, per_tile, {"compute set": cs.name})
            elif what == "step":
                close_action(rec[3])
                x(PROGRAM_PID, 0, f"step {rec[2] + 1}", "step", cycle, rec[3])
        close_action(self.records[-1][1] if self.records else 0)
        return ev

    def _metadata(self) -> list[dict]:
        exe, t = self.exe, self.exe.target
        meta = [_m("process_name", PROGRAM_PID, 0, f"{exe.name} on {t.name}: program (estimated)"),
                _m("process_sort_index", PROGRAM_PID, 0, None, sort_index=0),
                _m("thread_name", PROGRAM_PID, 0, "steps, actions, phases"),
                _m("process_name", TILES_PID, 0, f"tiles ({'one track per tile' if self.per_tile else 'busiest tile of each group'})"),
                _m("process_sort_index", TILES_PID, 0, None, sort_index=1)]
        for gi in range(len(self.cuts) - 1):
            a, b = int(self.cuts[gi]), int(self.cuts[gi + 1])
            meta.append(_m("thread_name", TILES_PID, gi, f"tile {a}" if b - a == 1 else f"tiles {a}-{b - 1}"))
            meta.append(_m("thread_sort_index", TILES_PID, gi, None, sort_index=gi))
        return meta

    def to_json(self) -> dict:
        t = self.exe.target
        return {"traceEvents": self.events(), "displayTimeUnit": "ns",
                "otherData": {"graph": self.exe.name, "target": t.name, "tiles": int(t.tiles),
                              "clock_hz": float(t.clock_hz),
                              "tracks": "per tile" if self.per_tile else f"{len(self.cuts) - 1} tile groups",
                              "assumptions": assumptions(t)}}

    def write(self, path: str) -> int:
        """Write the trace atomically (`popdsl.atomic`); returns the number of
        events.  Raises OSError."""
        doc = self.to_json()
        data = json.dumps(doc, separators=(",", ":")).encode()
        write_atomically(path, lambda f: f.write(data))
        return len(doc["traceEvents"])


def _m(name: str, pid: int, tid: int, value, sort_index: int | None = None) -> dict:
    args = {"sort_index": sort_index} if sort_index is not None else {"name": value}
    return {"ph": "M", "name": name, "pid": pid, "tid": tid, "args": args}


def _program_points(program: X.PSeq) -> dict[int, int]:
    """id(program node) → its point in the memory plan's timeline (the order in
    which `passes.liveness` numbers actions: both arms of an `if`, loop bodies once)."""
    points: dict[int, int] = {}

    def walk(p):
        for n in p.body:
            if isinstance(n, (X.PExecute, X.PCopy, X.PPrint)):
                points[id(n)] = len(points)
            elif isinstance(n, X.PRepeat):
                walk(n.body)
            elif isinstance(n, X.PWhile):
                points[id(n)] = len(points)
                walk(n.body)
            elif isinstance(n, X.PIf):
                points[id(n)] = len(points)
                walk(n.then)
                walk(n.orelse)
            elif isinstance(n, X.PSeq):
                walk(n)
    walk(program)
    return points


def _cs_ops(exe: X.Executable) -> dict[int, dict]:
    out = {}
    for op in exe.ops:
        for c in op.get("compute_sets", []):
            out.setdefault(c, {"op": op["op"], "op source": op["source"]})
    return out


def _timeline_by_category(exe: X.Executable) -> dict[str, np.ndarray]:
    m = exe.memory
    cats = getattr(m, "timeline_categories", None)
    if cats:
        return {k.replace("_", " "): np.asarray(v) for k, v in cats.items()}
    return {"data": np.asarray(m.timeline)} if np.size(m.timeline) else {}


# ---------------------------------------------------------------- checking

REQUIRED = {"X": {"name": str, "ph": str, "ts": (int, float), "dur": (int, float), "pid": int, "tid": int},
            "C": {"name": str, "ph": str, "ts": (int, float), "pid": int, "args": dict},
            "M": {"name": str, "ph": str, "pid": int, "args": dict}}


def check_trace(doc: dict) -> list[str]:
    """Problems with a trace document by the trace-event format's rules: required
    keys and types per event kind, non-negative times, counters' numeric values,
    metadata names, and strict nesting of `X` events on every (pid, tid) track."""
    problems: list[str] = []
    events = doc.get("traceEvents")
    if not isinstance(events, list):
        return ["no traceEvents list"]
    tracks: dict[tuple, list] = {}
    for i, e in enumerate(events):
        ph = e.get("ph")
        if ph not in REQUIRED:
            problems.append(f"event {i}: unknown ph {ph!r}")
            continue
        for key, typ in REQUIRED[ph].items():
            if key not in e:
                problems.append(f"event {i} ({ph}): missing {key!r}")
            elif not isinstance(e[key], typ) or isinstance(e[key], bool):
                problems.append(f"event {i} ({ph}): {key!r} is {type(e[key]).__name__}")
        if ph in "XC" and isinstance(e.get("ts"), (int, float)) and e["ts"] < 0:
            problems.append(f"event {i}: negative ts")
        if ph == "X" and all(isinstance(e.get(k), (int, float)) for k in ("ts", "dur")):
            if e["dur"] < 0:
                problems.append(f"event {i}: negative dur")
            tracks.setdefault((e.get("pid"), e.get("tid")), []).append(
                (round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000), i))
        if ph == "C" and not all(isinstance(v, (int, float)) for v in e.get("args", {}).values()):
            problems.append(f"event {i}: counter values must be numbers")
        if ph == "M" and e.get("name") not in ("process_name", "thread_name", "process_sort_index",
                                                "thread_sort_index", "process_labels"):
            problems.append(f"event {i}: unknown metadata {e.get('name')!r}")
    for key, spans in tracks.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple] = []
        for a, b, i in spans:
            while stack and stack[-1][1] <= a:
                stack.pop()
            if stack and b > stack[-1][1]:
                problems.append(f"track {key}: event {i} [{a}, {b}) ns overlaps event {stack[-1][2]} "
                                f"[{stack[-1][0]}, {stack[-1][1]}) without nesting")
            stack.append((a, b, i))
    return problems
