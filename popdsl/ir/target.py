"""The target description: machine models (README: "The IPU model").  A `Target` is a value: presets plus `--tiles` and
`--tile-memory` overrides derive new ones."""
from __future__ import annotations

from dataclasses import replace

from popdsl.node import node


@node
class Target:
    name: str
    tiles: int
    tile_memory: int          # bytes of SRAM per tile
    workers: int = 6
    clock_hz: float = 1.33e9
    exchange_bytes_per_cycle: int = 4
    sync_cycles: int = 150    # assumed cost of one on-chip BSP sync
    # Multiply-accumulates a tile completes per cycle, as the partitioner's cost
    # models assume when they choose a matmul or convolution plan (an estimate of
    # the codelets' own cost; the simulator counts their real instructions).
    macs_per_cycle: int = 8

    def with_overrides(self, tiles: int | None = None, tile_memory: int | None = None) -> "Target":
        t = self
        if tiles is not None:
            t = replace(t, tiles=tiles)
        if tile_memory is not None:
            t = replace(t, tile_memory=tile_memory)
        return t

    def to_json(self) -> dict:
        return {"name": self.name, "tiles": self.tiles, "tile_memory": self.tile_memory,
                "workers": self.workers, "clock_hz": self.clock_hz,
                "exchange_bytes_per_cycle": self.exchange_bytes_per_cycle,
                "sync_cycles": self.sync_cycles, "macs_per_cycle": self.macs_per_cycle}

    @staticmethod
    def from_json(d: dict) -> "Target":
        return Target(**d)


PRESETS = {
    "gc200": Target("gc200", 1472, 638_976, 6, 1.33e9),
    "gc2": Target("gc2", 1216, 262_144, 6, 1.6e9),
}

MAX_TILES = 1472 * 16      # a sanity bound for --tiles: sixteen GC200s
MIN_TILE_MEMORY = 1024
MAX_TILE_MEMORY = 1 << 26


def get_target(name: str = "gc200", tiles: int | None = None, tile_memory: int | None = None) -> Target:
    """Raises ValueError with a user-facing message for an unknown preset or a bad value."""
    if name not in PRESETS:
        raise ValueError(f"unknown target '{name}' (known: {', '.join(PRESETS)})")
    if tiles is not None and not 1 <= tiles <= MAX_TILES:
        raise ValueError(f"--tiles must be between 1 and {MAX_TILES}, not {tiles}")
    if tile_memory is not None and not MIN_TILE_MEMORY <= tile_memory <= MAX_TILE_MEMORY:
        raise ValueError(f"--tile-memory must be between {MIN_TILE_MEMORY} and {MAX_TILE_MEMORY} bytes")
    if tile_memory is not None and tile_memory % 64:
        raise ValueError("--tile-memory must be a multiple of 64 bytes")
    return PRESETS[name].with_overrides(tiles, tile_memory)
