"""The compiled graph's figures as Poplar's graph profile gives them.

Requires an `Executable`; produces `graph_stats(exe) -> GraphStats`, which `popc
report` shows in its text and under `graph_stats` in its JSON (and the memory
report embeds).  Counted from the executable's arrays with numpy — one step per
compute set and vertex group, never per vertex — so ResNet-50's half a million
vertices cost milliseconds:

- vertices: every vertex of every compute set (a row of a vertex table);
- edges: Poplar's count, one per vertex field connected to a tensor region — each
  `in`, `out` and `inout` field of each vertex (vertex state is not an edge; a field
  fed by the exchange is connected to its buffer on the vertex's tile, one edge);
- compute_sets: the compute sets of the graph (each once, however often the program
  executes it);
- variables: the graph's tensors (inputs, params, vars and the tensor program's
  results), by kind too; exchange buffers are not counted (they are not tensors
  here);
- exchange_bytes: bytes that cross between tiles in the graph's exchanges, each
  exchange once: every compute set's exchange in and out, every copy between
  tiles — a static figure, like the rest (what one run moves, loops counted, is
  `popc run --cycles`'s exchange traffic).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.executable import Executable


@dataclass(frozen=True)
class GraphStats:
    graph: str
    vertices: int
    edges: int
    compute_sets: int
    variables: int
    variables_by_kind: dict
    exchange_bytes: int
    tiles_with_vertices: int

    def to_json(self) -> dict:
        return {"vertices": self.vertices, "edges": self.edges, "compute_sets": self.compute_sets,
                "variables": self.variables, "variables_by_kind": dict(self.variables_by_kind),
                "exchange_bytes": self.exchange_bytes, "tiles_with_vertices": self.tiles_with_vertices}

    def text(self) -> str:
        kinds = ", ".join(f"{n:,} {k}" for k, n in self.variables_by_kind.items() if n)
        return "\n".join([
            f"graph '{self.graph}' (as Poplar counts it):",
            f"  vertices {self.vertices:,} on {self.tiles_with_vertices:,} tiles; "
            f"edges {self.edges:,} (vertex fields connected to tensor regions)",
            f"  compute sets {self.compute_sets:,}; variables {self.variables:,}" + (f" ({kinds})" if kinds else ""),
            f"  exchange {self.exchange_bytes:,} B between tiles (each exchange of the graph once)"])


KINDS = ("input", "param", "var", "temp")


def graph_stats(exe: Executable) -> GraphStats:
    vertices = edges = 0
    used = np.zeros(exe.target.tiles, bool)
    for cs in exe.compute_sets:
        for g in cs.groups:
            n = len(g.tiles)
            vertices += n
            edges += n * sum(1 for f in exe.codelets[g.codelet].fields if f.direction != "state")
            used[g.tiles] = True
    xbytes = sum(int(cs.pre.exchange_bytes) + int(cs.post.exchange_bytes) for cs in exe.compute_sets)
    xbytes += sum(int(c.exchange_bytes) for c in exe.copies)
    by_kind = {k: 0 for k in KINDS}
    for t in exe.tensors:
        by_kind[t.kind] = by_kind.get(t.kind, 0) + 1
    return GraphStats(exe.name, vertices, edges, len(exe.compute_sets), len(exe.tensors), by_kind,
                      xbytes, int(used.sum()))
