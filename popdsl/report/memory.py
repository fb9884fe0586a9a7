"""Memory report: why the graph needs the memory it needs, and where it goes.

Per category (Poplar's: always-live variables, not-always-live results, exchange
buffers, vertex state, codelet code) and per tile: naive (no sharing), lower bound
(peak of live bytes) and planned, fragmentation (planned − bound), the worst
tiles, the largest tensors with their source lines, and the liveness timeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.ir.executable import CATEGORIES, Executable
from popdsl.report.graphstats import graph_stats

TIMELINE_WIDTH = 48


@dataclass
class MemoryReport:
    exe: Executable

    def largest_tensors(self, k: int = 8) -> list[dict]:
        rows = []
        for t in self.exe.tensors:
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * {"f32": 4, "f16": 2, "i32": 4, "bool": 1}[t.dtype]
            rows.append({"name": t.name, "kind": t.kind, "dtype": t.dtype, "shape": list(t.shape),
                         "bytes": nbytes, "source": str(t.span) if t.span.line else t.span.path})
        rows.sort(key=lambda r: -r["bytes"])
        return rows[:k]

    def to_json(self) -> dict:
        m = self.exe.memory
        t = self.exe.target
        total = m.total
        worst = int(np.argmax(total)) if total.size else 0
        order = np.argsort(-total, kind="stable")[:5]
        cats = {c: getattr(m, c) for c in CATEGORIES}
        return {
            "graph": self.exe.name,
            "target": {"name": t.name, "tiles": t.tiles, "tile_memory": t.tile_memory},
            "totals": {"naive": int(m.naive.sum()), "lower_bound": int(m.bound_total.sum()),
                       "planned": int(total.sum()),
                       "fragmentation": int(total.sum() - m.bound_total.sum()),
                       "data": {"naive": int(m.naive_data.sum()), "lower_bound": int(m.lower_bound.sum()),
                                "planned": int(m.planned.sum())}},
            "categories": {c: {"total": int(a.sum()), "max": int(a.max()), "mean": float(a.mean())}
                           for c, a in cats.items()},
            "max_tile": {"tile": worst, "planned": int(total[worst]), "naive": int(m.naive[worst]),
                         "lower_bound": int(m.bound_total[worst]), **{c: int(a[worst]) for c, a in cats.items()}},
            "worst_tiles": [{"tile": int(i), "planned": int(total[i])} for i in order],
            "largest_tensors": self.largest_tensors(),
            "timeline": [{"point": i, "action": lbl, "live_bytes": int(v)}
                         for i, (lbl, v) in enumerate(zip(m.timeline_labels, m.timeline.tolist()))],
            "tile_bytes": total.tolist(),
            "graph_stats": graph_stats(self.exe).to_json(),
            **({"training": self.training()} if self.exe.recompute else {}),
        }

    def training(self) -> dict:
        """What a training step keeps for its backward pass and what recomputation
        did (passes.recompute): the tensor-level bytes the backward pass reads from
        the forward pass, with and without recomputation, and the live data where
        the backward pass begins (as planned, all tiles)."""
        r = self.exe.recompute
        ops = self.exe.ops
        # An op of a function runs once per call; a forward function's calls in the
        # backward pass recompute.
        again = {f["name"]: f["recompute_calls"] for f in self.exe.functions}
        flops = dict.fromkeys(("forward", "backward", "recompute"), 0)
        for o in ops:
            k = again.get(o["function"], 0)
            flops[o["phase"]] += o["flops"] * (o["calls"] - k)
            flops["recompute"] += o["flops"] * k
        backward = {self.exe.compute_sets[i].name for o in ops if o["phase"] != "forward" for i in o["compute_sets"]}
        m = self.exe.memory
        labels = m.timeline_labels
        start = next((i for i, lbl in enumerate(labels) if lbl.startswith("execute ") and lbl[8:] in backward), None)
        live = m.timeline_categories.get("not_always_live", m.timeline)
        return {"recompute": r["mode"], "level": r["level"], "segments": r["segments"],
                "recomputed_segments": r["recomputed_segments"], "recomputed_elementwise": r["recomputed_elementwise"],
                "activations_kept_bytes": r["kept_bytes"], "activations_kept_bytes_without_recompute": r["kept_bytes_without"],
                "recomputed_ops": r["recomputed_ops"], "flops": flops,
                "live_at_backward_start": int(live[max(start - 1, 0)]) if start is not None and live.size else 0,
                "live_peak": int(live.max()) if live.size else 0}

    def text(self) -> str:
        j = self.to_json()
        t, tot, mx = j["target"], j["totals"], j["max_tile"]
        m = self.exe.memory
        cap = t["tile_memory"]
        out = [f"memory of graph '{j['graph']}' on {t['name']} ({t['tiles']} tile{'s' if t['tiles'] != 1 else ''} x {cap:,} B)",
               f"  {'':<22}{'naive':>15}{'lower bound':>15}{'planned':>15}",
               f"  {'all tiles':<22}{tot['naive']:>15,}{tot['lower_bound']:>15,}{tot['planned']:>15,}",
               f"  {'busiest tile ' + str(mx['tile']):<22}{mx['naive']:>15,}{mx['lower_bound']:>15,}{mx['planned']:>15,}"
               f"   ({100 * mx['planned'] / cap:.1f}% of the tile)",
               f"  sharing saves {tot['naive'] / max(tot['planned'], 1):.2f}x; fragmentation "
               f"{tot['fragmentation']:,} B ({100 * tot['fragmentation'] / max(tot['lower_bound'], 1):.1f}% over the bound)",
               "", f"  {'category (no sharing)':<26}{'total':>15}{'max tile':>12}{'mean':>12}"]
        for c, v in j["categories"].items():
            out.append(f"  {c.replace('_', ' '):<26}{v['total']:>15,}{v['max']:>12,}{v['mean']:>12,.0f}")
        out.append("  busiest tiles: " + ", ".join(f"{w['tile']} ({w['planned']:,} B)" for w in j["worst_tiles"]))
        out += ["", "  " + graph_stats(self.exe).text().replace("\n", "\n  ")]
        if "training" in j:
            tr = j["training"]
            f = tr["flops"]
            out += ["", f"  training step: activations kept for the backward pass {tr['activations_kept_bytes']:,} B "
                    f"({tr['activations_kept_bytes_without_recompute']:,} B without recomputation)",
                    f"    recomputation {tr['recompute']} (level {tr['level']}): {tr['recomputed_segments']} of "
                    f"{tr['segments']} segments of the forward pass and {tr['recomputed_elementwise']} element-wise "
                    f"results of the others, {tr['recomputed_ops']} ops, {f['recompute']:,} FLOPs "
                    f"({100 * f['recompute'] / max(f['forward'], 1):.0f}% of the forward pass's {f['forward']:,})",
                    f"    not-always-live data (all tiles): {tr['live_at_backward_start']:,} B where the backward pass "
                    f"begins, {tr['live_peak']:,} B at the peak",
                    "    compute cycles by phase, with and without the recomputation: popc report --partition "
                    "(one simulated step)"]
        out += ["", "  largest tensors:"]
        for r in j["largest_tensors"]:
            out.append(f"    {r['bytes']:>12,} B  {r['kind']:<6} {r['name']} {r['dtype']}{r['shape']}  {r['source']}")
        out += ["", "  live data over the program (all tiles):"]
        tl = m.timeline
        if tl.size:
            peak = max(int(tl.max()), 1)
            step = max(1, -(-tl.size // TIMELINE_WIDTH))
            for i in range(0, tl.size, step):
                v = int(tl[i:i + step].max())
                bar = "#" * max(1, round(30 * v / peak)) if v else ""
                out.append(f"    {i:>5} {v:>14,} B {bar:<30} {m.timeline_labels[i]}")
        return "\n".join(out)


def memory_report(exe: Executable) -> MemoryReport:
    return MemoryReport(exe)
