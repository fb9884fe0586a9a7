"""Whole-program checks: read a root file and its imports, check every codelet.

Requires source text (or a path); produces a `Program`: the codelet IR by name and
the graph and def ASTs by name, each defined once.  Graph bodies are checked while
they are elaborated (`passes.elaborate`), because graph construction is itself a
compile-time program.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from popdsl import resources
from popdsl.diagnostics import CompileError, Diagnostics, Span
from popdsl.frontend import ast, parse
from popdsl.ir import codelet as ir
from popdsl.sema.codelets import lower_codelet


@dataclass
class Program:
    codelets: dict[str, ir.Codelet] = field(default_factory=dict)
    codelet_spans: dict[str, Span] = field(default_factory=dict)
    graphs: dict[str, ast.Graph] = field(default_factory=dict)
    defs: dict[str, ast.DefDecl] = field(default_factory=dict)
    modules: list[ast.Module] = field(default_factory=list)


def _resolve_import(name: str, importer: str) -> Path | None:
    if name.endswith(".pop"):
        base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
        p = (base / name)
        return p if p.is_file() else None
    try:
        return resources.resource("stdlib", f"{name}.pop")
    except FileNotFoundError:
        return None


def load_program(text: str, path: str = "<string>") -> list[ast.Module]:
    """Parse the root source and, depth first, every file it imports (each once)."""
    diags = Diagnostics()
    modules: list[ast.Module] = []
    seen: set[str] = set()

    def visit(text: str, path: str) -> None:
        mod = parse(text, path)
        for item in mod.items:
            if isinstance(item, ast.ImportDecl):
                target = _resolve_import(item.path, path)
                if target is None:
                    diags.error(item.span, f"cannot find module '{item.path}'",
                                "a name without '.pop' is a stdlib module; a path ending in "
                                "'.pop' is relative to the importing file")
                    continue
                key = str(target.resolve())
                if key in seen:
                    continue
                seen.add(key)
                try:
                    sub = target.read_text()
                except (OSError, UnicodeDecodeError) as e:
                    diags.error(item.span, f"cannot read module '{item.path}': {e}")
                    continue
                try:
                    visit(sub, str(target))
                except CompileError as e:
                    diags.items.extend(e.diagnostics)
        modules.append(mod)

    seen.add(str(Path(path).resolve()) if not path.startswith("<") else path)
    visit(text, path)
    diags.check()
    return modules


def check_program(modules: list[ast.Module]) -> Program:
    diags = Diagnostics()
    prog = Program(modules=modules)
    first: dict[str, Span] = {}
    # Scalar codelets first: vertex codelets may call them.
    items = [it for m in modules for it in m.items if not isinstance(it, ast.ImportDecl)]
    for it in items:
        prev = first.get(it.name)
        if prev is not None:
            diags.error(it.span, f"'{it.name}' is defined twice", f"first defined at {prev}")
            continue
        first[it.name] = it.span
    ordered = sorted((it for it in items if isinstance(it, ast.Codelet)),
                     key=lambda c: c.ret is None)
    scalars: dict[str, ir.Codelet] = {}
    for c in ordered:
        if first.get(c.name) is not c.span:
            continue
        lowered = lower_codelet(c, scalars, diags)
        prog.codelets[c.name] = lowered
        prog.codelet_spans[c.name] = c.span
        if lowered.ret is not None:
            scalars[c.name] = lowered
    for it in items:
        if first.get(it.name) is not it.span:
            continue
        if isinstance(it, ast.Graph):
            prog.graphs[it.name] = it
        elif isinstance(it, ast.DefDecl):
            prog.defs[it.name] = it
    diags.check()
    return prog


def compile_codelets(source: str, path: str = "<string>") -> list[ir.Codelet]:
    """Parse and check `source`; return its codelets' IR (raises CompileError)."""
    return list(check_program(load_program(source, path)).codelets.values())
