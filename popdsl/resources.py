"""Where the grammar and the stdlib live: inside the installed package
(`popdsl/_data/`, put there by the wheel build) or at the top of a source checkout."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource(*parts: str) -> Path:
    for root in (_PKG / "_data", _PKG.parent):
        p = root.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(f"popdsl resource {'/'.join(parts)} is missing from the installation")
