"""Memory report: where each tile's bytes go, by Poplar's categories."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popdsl.runtime.executable import Executable

CATEGORIES = ("variables", "exchange_buffers", "vertex_state", "code")


@dataclass
class MemoryReport:
    exe: Executable

    def per_category(self) -> dict[str, np.ndarray]:
        return {c: getattr(self.exe.memory, c) for c in CATEGORIES}

    def to_json(self) -> dict:
        m = self.exe.memory
        total = m.total
        t = self.exe.target
        worst = int(np.argmax(total)) if total.size else 0
        order = np.argsort(-total, kind="stable")[:5]
        return {
            "graph": self.exe.name,
            "target": {"name": t.name, "tiles": t.tiles, "tile_memory": t.tile_memory},
            "totals": {"planned": int(total.sum())},
            "categories": {c: {"total": int(a.sum()), "max": int(a.max()), "mean": float(a.mean())}
                           for c, a in self.per_category().items()},
            "max_tile": {"tile": worst, "planned": int(total[worst]),
                         **{c: int(a[worst]) for c, a in self.per_category().items()}},
            "worst_tiles": [{"tile": int(i), "planned": int(total[i])} for i in order],
            "tile_bytes": total.tolist(),
        }

    def text(self) -> str:
        j = self.to_json()
        t = j["target"]
        total = self.exe.memory.total
        lines = [f"memory of graph '{j['graph']}' on {t['name']} ({t['tiles']} tiles x {t['tile_memory']:,} B)",
                 f"  planned, all tiles: {j['totals']['planned']:,} B; busiest tile {j['max_tile']['tile']}: "
                 f"{j['max_tile']['planned']:,} B ({100 * j['max_tile']['planned'] / t['tile_memory']:.1f}% of its "
                 f"memory); mean {total.mean():,.0f} B",
                 f"  {'category':<18}{'total':>14}{'max tile':>12}{'mean':>12}"]
        for c, v in j["categories"].items():
            lines.append(f"  {c.replace('_', ' '):<18}{v['total']:>14,}{v['max']:>12,}{v['mean']:>12,.0f}")
        lines.append("  busiest tiles: " + ", ".join(f"{w['tile']} ({w['planned']:,} B)" for w in j["worst_tiles"]))
        return "\n".join(lines)


def memory_report(exe: Executable) -> MemoryReport:
    return MemoryReport(exe)
