"""Diagnostics: user errors collected with spans, rendered `path:line:col: error: msg`
with the source line (cut around the caret when it is long) and a caret.

User mistakes are never exceptions inside a pass: a pass appends to a `Diagnostics`
and goes on where it can, so one run reports several errors.  At a stage boundary
`Diagnostics.check()` raises `CompileError` carrying them all.  A bug of ours is any
other exception; the CLI reports it as an internal compiler error (exit 70).
"""
from __future__ import annotations

from popdsl.node import node


@node
class Span:
    path: str
    line: int          # 1-based
    col: int           # 1-based
    end_line: int
    end_col: int       # exclusive

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


class SourceMap:
    """Every source text the compiler read, by path, for rendering carets."""
    _texts: dict[str, str] = {}

    @classmethod
    def add(cls, path: str, text: str) -> None:
        cls._texts[path] = text

    @classmethod
    def text(cls, path: str) -> str | None:
        return cls._texts.get(path)

    @classmethod
    def line(cls, path: str, line: int) -> str | None:
        text = cls._texts.get(path)
        if text is None or line < 1:
            return None
        lines = text.splitlines()
        return lines[line - 1] if line <= len(lines) else None


MAX_LINE = 100          # columns of a source line shown around the caret


def _window(src: str, col: int, width: int) -> tuple[str, int, int]:
    """A long source line cut to MAX_LINE columns around the caret at `col`
    (1-based), marked '...' where cut: (text, caret column, caret width)."""
    if len(src) <= MAX_LINE:
        return src, col, width
    start = max(0, min(col - 1 - MAX_LINE // 3, len(src) - MAX_LINE))
    end = start + MAX_LINE
    prefix = "..." if start else ""
    text = prefix + src[start:end] + ("..." if end < len(src) else "")
    return text, col - start + len(prefix), max(1, min(width, end - (col - 1)))


@node
class Diagnostic:
    span: Span
    message: str
    severity: str = "error"
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        head = f"{self.span}: {self.severity}: {self.message}" if self.span.line \
            else f"{self.span.path}: {self.severity}: {self.message}"
        out = [head]
        src = SourceMap.line(self.span.path, self.span.line)
        if src is not None:
            width = 1
            if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
                width = self.span.end_col - self.span.col
            src, col, width = _window(src.expandtabs(1), self.span.col, width)
            out.append(f"  {src}")
            out.append("  " + " " * (col - 1) + "^" + "~" * (width - 1))
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)


class CompileError(Exception):
    """One or more user errors.  `str()` is the rendered report."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)

    def __reduce__(self):
        # Pickled as what it was made of (a try in a second process sends it back:
        # popdsl.forked), not as its rendered text.
        return type(self), (self.diagnostics,)


class OutOfMemory(CompileError):
    """The plan does not fit a tile: `tile` needs `need` bytes (of `capacity`).  The
    pipeline may compile again with more recomputed before it reaches the user;
    `bounds`, what every tile needs at least (an array, if known), tells it which
    tiles are the busiest."""

    def __init__(self, diagnostics: list[Diagnostic], tile: int, need: int, capacity: int, bounds=None):
        super().__init__(diagnostics)
        self.tile, self.need, self.capacity, self.bounds = tile, need, capacity, bounds

    def __reduce__(self):
        return type(self), (self.diagnostics, self.tile, self.need, self.capacity, self.bounds)


class Diagnostics:
    """A collector passed through a stage."""

    def __init__(self, limit: int = 50):
        self.items: list[Diagnostic] = []
        self.limit = limit

    def error(self, span: Span, message: str, *notes: str) -> None:
        d = Diagnostic(span, message, "error", tuple(notes))
        # A compile-time loop repeats a mistake once per iteration: say it once.
        if len(self.items) < self.limit and d not in self.items:
            self.items.append(d)

    def __bool__(self) -> bool:
        return bool(self.items)

    def check(self) -> None:
        if self.items:
            raise CompileError(self.items)

