"""Partition report: how each tensor operation was spread over the tiles.

Per op: the tiles its vertices use, the compute cycles of the busiest tile and the
mean over the tiles it uses (their ratio is the balance), its share of the step's
compute cycles, its floating-point operations and the rate they run at on the model,
how many of each tile's workers it keeps busy (a tile has six; one vertex per tile
leaves five idle), and the bytes its exchange moves.  Cycles come from running one
step on the IPU model (inputs zero): a vertex's cycles are counted by its own native
code.

For a training step, the step's compute cycles by phase (forward, backward,
recomputation of the forward pass) and so the step without its recomputation: a
compute set counts for the phase of the op that made it; one of a function called
both to compute and to recompute counts for each in proportion to its calls (every
call runs the same vertices).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from popdsl.ir.codelet import NUMPY_DTYPE
from popdsl.ir.executable import Executable
from popdsl.limits import MAX_CYCLES


@dataclass
class PartitionReport:
    exe: Executable
    rows: list[dict]
    step_cycles: int
    phases: dict[str, int]          # step compute cycles by the phase of the op

    def to_json(self) -> dict:
        out = {"graph": self.exe.name, "tiles": self.exe.target.tiles, "ops": self.rows,
               "step_compute_cycles": self.step_cycles,
               "assumption": "cycles measured by one simulated step with zero inputs"}
        if self.training:
            out["step_compute_cycles_by_phase"] = dict(self.phases)
            out["step_compute_cycles_without_recompute"] = self.step_cycles - self.phases["recompute"]
        return out

    @property
    def training(self) -> bool:
        return any(op["phase"] != "forward" for op in self.exe.ops)

    def text(self) -> str:
        t = self.exe.target
        out = [f"partition of graph '{self.exe.name}' over {t.tiles} tiles ({t.name}); cycles from one "
               f"simulated step with zero inputs ({self.step_cycles:,} compute cycles)",
               f"  {'op':<52}{'shape':<20}{'vertices':>9}{'tiles':>7}{'max cyc':>10}{'share':>7}{'balance':>8}"
               f"{'workers':>8}{'GFLOP/s':>9}{'exchange B':>12}  source"]
        for r in self.rows:
            out.append(f"  {_clip(r['name'], 51):<52}{str(r['shape']):<20}{r['vertices']:>9}{r['tiles']:>7}"
                       f"{r['max_cycles']:>10,}{100 * r['cycle_share']:>6.1f}%{r['balance']:>8.2f}"
                       f"{r['workers_busy']:>6.1f}/{t.workers}{r['gflops_per_s']:>9.1f}"
                       f"{r['exchange_bytes']:>12,}  {r['source']}")
        if not self.rows:
            out.append("  (no tensor operations: this graph places its vertices itself)")
        if self.training:
            ph, without = self.phases, self.step_cycles - self.phases["recompute"]
            out.append(f"  training step, compute cycles by phase: forward {ph['forward']:,}, backward "
                       f"{ph['backward']:,}, recomputation {ph['recompute']:,}; without recomputation "
                       f"{without:,} (recomputing adds {100 * ph['recompute'] / max(without, 1):.1f}%)")
        return "\n".join(out)


def _clip(name: str, width: int) -> str:
    """A long call path keeps its end (the op and its nearest calls)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def partition_report(exe: Executable, native, max_cycles: int = MAX_CYCLES) -> PartitionReport:
    from popdsl.runtime.simulator import Machine
    machine = Machine(exe, native, threads=2, out=io.StringIO(),     # the program's prints are not the report
                      max_cycles=max_cycles)
    try:
        zeros = {name: np.zeros(exe.tensors[i].shape, NUMPY_DTYPE[exe.tensors[i].dtype])
                 for name, i in exe.inputs.items()}
        machine.run_step(zeros)
        step = max(1, machine.cycles.compute)
        rows = [_row(exe, machine, op, step) for op in exe.ops]
        return PartitionReport(exe, rows, machine.cycles.compute, _phases(exe, machine.cycles.per_compute_set))
    finally:
        machine.close()


def _phases(exe: Executable, per_cs: dict[str, int]) -> dict[str, int]:
    """The step's compute cycles by phase (see the module's note); compute sets no
    op made (a graph's own vertices) count for the forward pass."""
    out = dict.fromkeys(("forward", "backward", "recompute"), 0)
    again = {f["name"]: f["recompute_calls"] for f in exe.functions}
    left = dict(per_cs)
    for op in exe.ops:
        cycles = sum(left.pop(exe.compute_sets[i].name, 0) for i in op["compute_sets"])
        k, calls = again.get(op["function"], 0), max(op["calls"], 1)
        redo = cycles * k // calls
        out[op["phase"]] += cycles - redo
        out["recompute"] += redo
    out["forward"] += sum(left.values())
    return out


def _row(exe: Executable, machine, op: dict, step: int) -> dict:
    target = exe.target
    per_tile = np.zeros(target.tiles, np.int64)
    used = np.zeros(target.tiles, bool)
    xbytes, busiest, busy = 0, -1, 0.0
    for csi in op["compute_sets"]:
        cs = exe.compute_sets[csi]
        cycles = machine.tile_cycles.get(csi, 0)
        per_tile += cycles
        verts = np.zeros(target.tiles, np.int64)
        for grp in cs.groups:
            used[grp.tiles] = True
            verts += np.bincount(grp.tiles, minlength=target.tiles)
        peak = int(np.max(cycles)) if np.ndim(cycles) else 0
        on = verts > 0
        if on.any() and peak > busiest:
            # Workers kept busy, on the tiles this compute set uses, in the op's dearest compute set.
            busiest, busy = peak, float(np.minimum(verts[on], target.workers).mean())
        xbytes += cs.pre.exchange_bytes + cs.post.exchange_bytes
    mx = int(per_tile.max()) if used.any() else 0
    mean = float(per_tile[used].mean()) if used.any() else 0.0
    flops = int(op.get("flops", 0))
    return {"op": op["op"], "name": op.get("name", op["op"]), "shape": op["shape"], "vertices": op["vertices"],
            "tiles": int(used.sum()), "max_cycles": mx, "mean_cycles": mean,
            "balance": mx / mean if mean else 1.0, "cycle_share": mx / step,
            "workers_busy": busy, "flops": flops,
            "gflops_per_s": flops / (mx / target.clock_hz) / 1e9 if mx else 0.0,
            "exchange_bytes": int(xbytes), "source": op["source"]}
