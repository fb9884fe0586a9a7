"""Whole-program checks: read a root file and its imports, check every codelet.

Requires source text (or a path); produces a `Program`: the codelet IR by name and
the graph and def ASTs by name, each defined once.  Graph bodies are checked while
they are elaborated (`passes.elaborate`), because graph construction is itself a
compile-time program.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
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


STDLIB_PREFIX = "<stdlib>/"


def display_path(path: Path) -> str:
    """How diagnostics and reports name a source file: a stdlib module as
    `<stdlib>/popnn.pop`, wherever popdsl is installed; others as given."""
    try:
        stdlib = resources.resource("stdlib")
        if path.resolve().parent == stdlib.resolve():
            return STDLIB_PREFIX + path.name
    except FileNotFoundError:
        pass
    return str(path)


def _resolve_import(name: str, importer: str) -> Path | None:
    if name.endswith(".pop"):
        if importer.startswith(STDLIB_PREFIX):
            base = resources.resource("stdlib")
        else:
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
                    sub = target.read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as e:
                    diags.error(item.span, f"cannot read module '{item.path}': {e}")
                    continue
                try:
                    visit(sub, display_path(target))
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
        # A definition in an importing file replaces an imported one of that name.
        if prev is not None and prev.path == it.span.path:
            diags.error(it.span, f"'{it.name}' is defined twice", f"first defined at {prev}")
            continue
        first[it.name] = it.span
    codelets = [it for it in items if isinstance(it, ast.Codelet) and first.get(it.name) is it.span]
    ordered, recursive = _scalars_callees_first(codelets, diags)
    ordered += [c for c in codelets if c.ret is None]
    scalars: dict[str, ir.Codelet] = {}
    for c in ordered:
        lowered = lower_codelet(c, scalars, diags, recursive)
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
    diags.items.sort(key=lambda d: (d.span.path, d.span.line, d.span.col))
    diags.check()
    return prog


def _calls(node, out: list) -> list:
    """(name, span) of every call of a named function in an AST subtree, in order."""
    if isinstance(node, ast.Call) and isinstance(node.fn, ast.Name):
        out.append((node.fn.id, node.fn.span))
    if isinstance(node, tuple):
        for x in node:
            _calls(x, out)
    elif is_dataclass(node):
        for f in fields(node):
            _calls(getattr(node, f.name), out)
    return out


def _scalars_callees_first(codelets: list[ast.Codelet], diags: Diagnostics):
    """The scalar codelets ordered so that each comes after the scalar codelets it
    calls (definition order does not matter), and the names whose calls close a
    cycle — reported here, as codelets cannot recurse."""
    scalar = {c.name: c for c in codelets if c.ret is not None}
    calls = {n: [(m, sp) for m, sp in _calls(c.body, []) if m in scalar] for n, c in scalar.items()}
    order: list[ast.Codelet] = []
    recursive: set[str] = set()
    state: dict[str, int] = {}               # 1 on the path, 2 done
    for root in scalar:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(calls[root]))]
        while stack:
            name, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[name] = 2
                order.append(scalar[name])
                stack.pop()
            elif state.get(nxt[0]) == 1:
                how = "itself" if nxt[0] == name else f"'{nxt[0]}', which calls it back"
                diags.error(nxt[1], f"codelet '{name}' calls {how}: codelets cannot be recursive")
                recursive.add(nxt[0])
            elif nxt[0] not in state:
                state[nxt[0]] = 1
                stack.append((nxt[0], iter(calls[nxt[0]])))
    return order, recursive


def compile_codelets(source: str, path: str = "<string>") -> list[ir.Codelet]:
    """Parse and check `source`; return its codelets' IR (raises CompileError)."""
    return list(check_program(load_program(source, path)).codelets.values())
