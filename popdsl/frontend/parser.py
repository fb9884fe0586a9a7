"""Parser: source text → `ast.Module` (AST dataclasses with spans), or a CompileError
whose syntax errors have names rather than token lists.

Two parsers build the same trees.  The fast one (`frontend.fastparse`, recursive
descent) parses every program it accepts; any other text, so every text with a syntax
error, goes to the reference (`frontend.lark_parser`, Lark from grammar/pop.lark, the
definition of the language), which reports the error.  Lark is imported only then.
POPDSL_PARSER=lark sends every text to the reference (benchmarks, bisecting a bug).
"""
from __future__ import annotations

import gc
import os

from popdsl.diagnostics import CompileError, Diagnostic, SourceMap, Span
from popdsl.frontend import ast
from popdsl.frontend.fastparse import Handover, parse_fast
from popdsl.limits import MAX_NESTING, MAX_SOURCE_BYTES


def parse(text: str, path: str = "<string>") -> ast.Module:
    """Parse one source file.  Raises CompileError on a syntax error."""
    if len(text) > MAX_SOURCE_BYTES:
        raise CompileError([Diagnostic(Span(path, 0, 0, 0, 0), f"source of {len(text):,} characters: popc "
                                       f"compiles sources of at most {MAX_SOURCE_BYTES:,} bytes", "error",
                                       ("large constant data belongs in a .npz: popc run --load-params",))])
    SourceMap.add(path, text)
    if os.environ.get("POPDSL_PARSER") != "lark":
        # The parser allocates about one object per token and frees none: the cyclic
        # collector would walk the growing tree again and again for nothing (measured:
        # two fifths of the time of a 10,000-line file).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return parse_fast(text, path, MAX_NESTING)
        except (Handover, RecursionError):
            pass
        finally:
            if collecting:
                gc.enable()
    from popdsl.frontend.lark_parser import parse_lark
    return parse_lark(text, path)
