"""Partition report: how each tensor operation was spread over the tiles.

Per op: the tiles its vertices use, the compute cycles of the busiest tile and the
mean over the tiles it uses (their ratio is the balance), and the bytes its
exchange moves.  Cycles come from running one step on the IPU model (inputs
zero): a vertex's cycles are counted by its own native code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.executable import Executable
from popdsl.limits import MAX_CYCLES


@dataclass
class PartitionReport:
    exe: Executable
    rows: list[dict]

    def to_json(self) -> dict:
        return {"graph": self.exe.name, "tiles": self.exe.target.tiles, "ops": self.rows,
                "assumption": "cycles measured by one simulated step with zero inputs"}

    def text(self) -> str:
        t = self.exe.target
        out = [f"partition of graph '{self.exe.name}' over {t.tiles} tiles ({t.name}); cycles from one "
               "simulated step with zero inputs",
               f"  {'op':<10}{'shape':<22}{'vertices':>9}{'tiles':>7}{'max cyc':>10}{'mean cyc':>10}"
               f"{'balance':>9}{'exchange B':>13}  source"]
        for r in self.rows:
            out.append(f"  {r['op']:<10}{str(r['shape']):<22}{r['vertices']:>9}{r['tiles']:>7}"
                       f"{r['max_cycles']:>10,}{r['mean_cycles']:>10,.0f}{r['balance']:>9.2f}"
                       f"{r['exchange_bytes']:>13,}  {r['source']}")
        if not self.rows:
            out.append("  (no tensor operations: this graph places its vertices itself)")
        return "\n".join(out)


def partition_report(exe: Executable, native, max_cycles: int = MAX_CYCLES) -> PartitionReport:
    from popdsl.runtime.simulator import Machine
    import io
    machine = Machine(exe, native, threads=2, out=io.StringIO(),     # the program's prints are not the report
                      max_cycles=max_cycles)
    try:
        zeros = {}
        from popdsl.ir.codelet import NUMPY_DTYPE
        for name, i in exe.inputs.items():
            t = exe.tensors[i]
            zeros[name] = np.zeros(t.shape, NUMPY_DTYPE[t.dtype])
        machine.run_step(zeros)
        rows = []
        for op in exe.ops:
            per_tile = np.zeros(exe.target.tiles, np.int64)
            used = np.zeros(exe.target.tiles, bool)
            xbytes = 0
            for csi in op["compute_sets"]:
                cs = exe.compute_sets[csi]
                per_tile += machine.tile_cycles.get(csi, 0)
                for grp in cs.groups:
                    used[grp.tiles] = True
                xbytes += cs.pre.exchange_bytes + cs.post.exchange_bytes
            mx = int(per_tile.max()) if used.any() else 0
            mean = float(per_tile[used].mean()) if used.any() else 0.0
            rows.append({"op": op["op"], "shape": op["shape"], "vertices": op["vertices"],
                         "tiles": int(used.sum()), "max_cycles": mx, "mean_cycles": mean,
                         "balance": mx / mean if mean else 1.0, "exchange_bytes": int(xbytes),
                         "source": op["source"]})
        return PartitionReport(exe, rows)
    finally:
        machine.close()
