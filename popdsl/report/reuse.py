"""Reuse report: what building repeated parts once saves, and what calling them costs.

Requires two executables of one program, compiled with outlining (passes.outline)
and without (`--no-outline`); produces `reuse_report(with_, without)`, which `popc
report --reuse` prints as text or JSON:

- functions: each with its calls, instances, compute sets and vertices (held once),
  the vertex-state bytes the calls after the first would have taken
  (`bytes_saved`), and the bytes each call copies in and out;
- code_and_state_bytes: vertex state plus codelet code over all tiles, with and
  without reuse, and on the busiest tile;
- copies: the bytes the calls copy and the exchange cycles of the program's copies
  with and without (a static estimate, each copy once);
- the graph as Poplar counts it (vertices, compute sets) and the data planned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.codelet import table_layout
from popdsl.ir.executable import Executable, PCopy, PSeq, PRepeat, PWhile, PIf
from popdsl.ir.vertex_state import state_bytes


def _copies(exe: Executable) -> list[int]:
    """Indices of the copies the program runs, each time it names one."""
    out: list[int] = []

    def walk(p) -> None:
        for n in p.body:
            if isinstance(n, PCopy):
                out.append(n.copy)
            elif isinstance(n, (PSeq,)):
                walk(n)
            elif isinstance(n, (PRepeat, PWhile)):
                walk(n.body)
            elif isinstance(n, PIf):
                walk(n.then)
                walk(n.orelse)
    walk(exe.program)
    return out


def _state(exe: Executable, css) -> tuple[int, int]:
    """(vertices, vertex-state bytes) of compute sets `css`, the state counted as
    the memory plan counts it (`ir.vertex_state`) but from the tables' absolute
    addresses: a pointer's progression may run on across regions the plan put
    side by side, which the plan's count, by region, does not take as one."""
    v = s = 0
    tiles, workers = exe.target.tiles, exe.target.workers
    for i in css:
        for grp in exe.compute_sets[i].groups:
            v += len(grp.tiles)
            addresses = np.array([c.kind == "addr" for c in table_layout(exe.codelets[grp.codelet])], bool)
            s += int(state_bytes(grp.table, grp.tiles, tiles, workers, addresses).sum())
    return v, s


@dataclass
class ReuseReport:
    with_: Executable
    without: Executable

    def to_json(self) -> dict:
        a, b = self.with_, self.without
        functions = []
        for f in a.functions:
            verts, state = _state(a, f["compute_sets"])
            functions.append({"name": f["name"], "kind": f["kind"], "calls": f["calls"], "instances": f["instances"],
                              "compute_sets": len(f["compute_sets"]), "vertices": verts, "vertex_state_bytes": state,
                              "bytes_saved": state * (f["calls"] - 1), "copy_in_bytes_per_call": f["copy_in_bytes"],
                              "copy_out_bytes_per_call": f["copy_out_bytes"], "shared_inputs": f["shared_inputs"]})

        def fixed(e: Executable) -> dict:
            m = e.memory
            return {"vertex_state": int(m.vertex_state.sum()), "code": int(m.code.sum()),
                    "total": int(m.fixed.sum()), "busiest_tile": int(m.fixed.max()) if m.fixed.size else 0}

        def copy_cycles(e: Executable) -> int:
            return int(sum(e.copies[i].cycles for i in _copies(e)))

        def graph(e: Executable) -> dict:
            m = e.memory
            return {"vertices": sum(len(g.tiles) for cs in e.compute_sets for g in cs.groups),
                    "compute_sets": len(e.compute_sets), "data_planned": int(m.planned.sum()),
                    "busiest_tile": int(m.total.max()) if m.total.size else 0}
        called = sum(f["calls"] * (f["copy_in_bytes"] + f["copy_out_bytes"]) for f in a.functions)
        return {"graph": a.name, "functions": functions,
                "code_and_state_bytes": {"with_reuse": fixed(a)["total"], "without_reuse": fixed(b)["total"]},
                "code_and_state": {"with_reuse": fixed(a), "without_reuse": fixed(b)},
                "copies": {"bytes_copied_by_calls": called, "copy_cycles_with_reuse": copy_cycles(a),
                           "copy_cycles_without_reuse": copy_cycles(b),
                           "cycles_added": copy_cycles(a) - copy_cycles(b)},
                "with_reuse": graph(a), "without_reuse": graph(b)}

    def text(self) -> str:
        d = self.to_json()
        w, wo = d["code_and_state"]["with_reuse"], d["code_and_state"]["without_reuse"]
        out = [f"reuse: graph '{d['graph']}', {len(d['functions'])} function"
               f"{'s' if len(d['functions']) != 1 else ''} built once and called"]
        for f in d["functions"]:
            out.append(f"  {f['name']}: {f['calls']} calls, {f['compute_sets']} compute sets, {f['vertices']:,} "
                       f"vertices held once; {f['bytes_saved']:,} B of vertex state saved; copies per call "
                       f"{f['copy_in_bytes_per_call']:,} B in, {f['copy_out_bytes_per_call']:,} B out"
                       + (f" ({f['shared_inputs']} inputs shared, not copied)" if f["shared_inputs"] else ""))
            out.append(f"    {', '.join(f['instances'][:4])}" + (", ..." if len(f["instances"]) > 4 else ""))
        ratio = w["total"] / max(wo["total"], 1)
        out += ["",
                f"  code + vertex state, all tiles: {w['total']:,} B with reuse, {wo['total']:,} B without "
                f"({ratio:.2f}x)",
                f"    vertex state {w['vertex_state']:,} / {wo['vertex_state']:,} B; code {w['code']:,} / "
                f"{wo['code']:,} B (a codelet's code is on a tile once however many vertices use it)",
                f"    busiest tile {w['busiest_tile']:,} / {wo['busiest_tile']:,} B",
                f"  vertices {d['with_reuse']['vertices']:,} / {d['without_reuse']['vertices']:,}; compute sets "
                f"{d['with_reuse']['compute_sets']:,} / {d['without_reuse']['compute_sets']:,}",
                f"  calls copy {d['copies']['bytes_copied_by_calls']:,} B; program copies "
                f"{d['copies']['copy_cycles_with_reuse']:,} / {d['copies']['copy_cycles_without_reuse']:,} "
                f"estimated cycles ({d['copies']['cycles_added']:+,})",
                f"  data planned {d['with_reuse']['data_planned']:,} / {d['without_reuse']['data_planned']:,} B; "
                f"busiest tile, all categories {d['with_reuse']['busiest_tile']:,} / "
                f"{d['without_reuse']['busiest_tile']:,} B"]
        return "\n".join(out)


def reuse_report(with_: Executable, without: Executable) -> ReuseReport:
    return ReuseReport(with_, without)

