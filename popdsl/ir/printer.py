"""Deterministic text for the IRs of this layer (AST, codelet IR, tensor graph,
vertex graph): what `popc dump --after STAGE` prints and per-pass tests check.  Large arrays print as summaries, never as Python reprs."""
from __future__ import annotations

from dataclasses import fields, is_dataclass

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir




# ---------------------------------------------------------------- AST

def _ast(node, indent: int = 0) -> list[str]:
    pad = "  " * indent
    if isinstance(node, tuple):
        out = []
        for x in node:
            out.extend(_ast(x, indent))
        return out
    if not is_dataclass(node):
        return [pad + repr(node)]
    simple, nested = [], []
    for f in fields(node):
        v = getattr(node, f.name)
        if isinstance(v, Span):
            continue
        if is_dataclass(v) or (isinstance(v, tuple) and any(is_dataclass(x) for x in v)):
            nested.append((f.name, v))
        else:
            simple.append(f"{f.name}={v!r}")
    out = [f"{pad}{type(node).__name__} {' '.join(simple)}".rstrip()]
    for name, v in nested:
        out.append(f"{pad}  .{name}")
        out.extend(_ast(v, indent + 2))
    return out


def modules(modules) -> str:
    out = []
    for m in modules:
        out.append(f"module {m.path}")
        out.extend(_ast(m.items, 1))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- codelet IR

def expr(e) -> str:
    if isinstance(e, cir.Const):
        return ("true" if e.value else "false") if e.ty == "bool" else repr(e.value)
    if isinstance(e, (cir.Local, cir.Sym)):
        return e.name
    if isinstance(e, cir.Load):
        idx = f"[{', '.join(expr(i) for i in e.index)}]" if e.index else ""
        return f"{e.field}{idx}{'' if e.checked or not e.index else '!'}"
    if isinstance(e, cir.Len):
        return f"len({e.field}, {e.axis})"
    if isinstance(e, cir.Unary):
        return f"{'-' if e.op == 'neg' else '!'}{expr(e.x)}"
    if isinstance(e, cir.Binary):
        return f"({expr(e.a)} {e.op} {expr(e.b)})"
    if isinstance(e, cir.Select):
        return f"select({expr(e.cond)}, {expr(e.a)}, {expr(e.b)})"
    if isinstance(e, cir.Cast):
        return f"{e.ty}({expr(e.x)})"
    if isinstance(e, (cir.Intrinsic, cir.CallScalar)):
        return f"{e.name}({', '.join(expr(a) for a in e.args)})"
    raise AssertionError(e)


def stmts(body, indent: int) -> list[str]:
    pad = "    " * indent
    out = []
    for s in body:
        if isinstance(s, cir.Declare):
            out.append(f"{pad}{s.name}: {s.ty} = {expr(s.init) if s.init is not None else 'zero'}")
        elif isinstance(s, cir.Assign):
            out.append(f"{pad}{s.name} = {expr(s.value)}")
        elif isinstance(s, cir.Store):
            idx = f"[{', '.join(expr(i) for i in s.index)}]" if s.index else ""
            out.append(f"{pad}{s.field}{idx}{'' if s.checked or not s.index else '!'} = {expr(s.value)}")
        elif isinstance(s, cir.For):
            out.append(f"{pad}for {s.var} in {expr(s.start)}..{expr(s.stop)} step {s.step} {{")
            out.extend(stmts(s.body, indent + 1))
            out.append(pad + "}")
        elif isinstance(s, cir.While):
            out.append(f"{pad}while {expr(s.cond)} {{")
            out.extend(stmts(s.body, indent + 1))
            out.append(pad + "}")
        elif isinstance(s, cir.If):
            out.append(f"{pad}if {expr(s.cond)} {{")
            out.extend(stmts(s.then, indent + 1))
            if s.orelse:
                out.append(pad + "} else {")
                out.extend(stmts(s.orelse, indent + 1))
            out.append(pad + "}")
        elif isinstance(s, cir.Break):
            out.append(pad + "break")
        elif isinstance(s, cir.Continue):
            out.append(pad + "continue")
        elif isinstance(s, cir.Return):
            out.append(pad + "return" + (f" {expr(s.value)}" if s.value is not None else ""))
        else:
            raise AssertionError(s)
    return out


def codelet(c: cir.Codelet) -> str:
    params = ", ".join(f"{f.direction} {f.name}: {f.dtype}" + (f"[{', '.join(map(str, f.dims))}]" if f.dims else "")
                       for f in c.fields)
    head = f"codelet {c.name}({params})" + (f" -> {c.ret}" if c.ret else "")
    return "\n".join([head + " {", *stmts(c.body, 1), "}"])


def program(prog) -> str:
    out = ["// '!' marks an access whose bounds check was proven unnecessary"]
    out += [codelet(c) for c in prog.codelets.values()]
    out += [f"graph {name}  // elaborated by the next stage" for name in prog.graphs]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- graphs

def _tiles_summary(tile_of: np.ndarray) -> str:
    if (tile_of < 0).all():
        return "unmapped"
    tiles, counts = np.unique(tile_of[tile_of >= 0], return_counts=True)
    s = ", ".join(f"{t}:{c}" for t, c in zip(tiles[:8].tolist(), counts[:8].tolist()))
    more = f", ... ({len(tiles)} tiles)" if len(tiles) > 8 else ""
    un = int((tile_of < 0).sum())
    return s + more + (f", {un} unmapped" if un else "")


def _view(graph, v) -> str:
    t = graph.tensors[v.tensor]
    flat = v.index.ravel()
    if flat.size and np.array_equal(flat, flat[0] + np.arange(flat.size)):
        return f"{t.name}[{flat[0]}:{flat[0] + flat.size}]" + (f" as {list(v.shape)}" if v.index.ndim != 1 else "")
    return f"{t.name}{{{', '.join(map(str, flat[:6].tolist()))}{', ...' if flat.size > 6 else ''}}} as {list(v.shape)}"


def _nth(views, i):
    from popdsl.ir import graph as g
    return g.View(views.tensor, views.index[i], views.span) if isinstance(views, g.Stacked) else views[i]


def _prog_lines(graph, p, indent: int) -> list[str]:
    from popdsl.ir import graph as g
    pad = "  " * indent
    out = []
    for n in p.body:
        if isinstance(n, g.Execute):
            out.append(f"{pad}execute {n.cs}")
        elif isinstance(n, g.Copy):
            out.append(f"{pad}copy {_view(graph, n.src)} -> {_view(graph, n.dst)}")
        elif isinstance(n, g.Repeat):
            out.append(f"{pad}repeat {n.count} {{")
            out += _prog_lines(graph, n.body, indent + 1) + [pad + "}"]
        elif isinstance(n, g.While):
            out.append(f"{pad}while {_view(graph, n.cond)} {{")
            out += _prog_lines(graph, n.body, indent + 1) + [pad + "}"]
        elif isinstance(n, g.If):
            out.append(f"{pad}if {_view(graph, n.cond)} {{")
            out += _prog_lines(graph, n.then, indent + 1)
            out.append(pad + "} else {")
            out += _prog_lines(graph, n.orelse, indent + 1) + [pad + "}"]
        elif isinstance(n, g.Print):
            out.append(f"{pad}print {_view(graph, n.view)}")
        elif isinstance(n, g.Step):
            out.append(f"{pad}step")
    return out


def tensor_graph(graph) -> str:
    out = [f"graph {graph.name} on {graph.target.name} ({graph.target.tiles} tiles)"]
    for t in graph.tensors:
        init = " init" if t.id in graph.init else ""
        out.append(f"  {t.kind} {t.name}: {t.dtype}{list(t.shape)}{init}  tiles {_tiles_summary(graph.tile_of[t.id])}")
    for cs in graph.compute_sets.values():
        out.append(f"  compute {cs.name}:")
        for grp in cs.groups:
            out.append(f"    {grp.codelet}: {len(grp)} vertices on {len(set(np.asarray(grp.tiles).tolist()))} tiles")
            for i in range(min(len(grp), 4)):
                conns = ", ".join(f"{f}={_view(graph, _nth(vs, i))}" for f, vs in grp.connections.items())
                state = ", ".join(f"{f}={vs[i]!r}" for f, vs in grp.state.items())
                out.append(f"      tile {grp.tiles[i]}: {', '.join(x for x in (conns, state) if x)}")
            if len(grp) > 4:
                out.append(f"      ... {len(grp) - 4} more")
    out.append("  program {")
    out += _prog_lines(graph, graph.program, 2)
    out.append("  }")
    from popdsl.ir.tensor import Node
    m = getattr(graph, "minimize", None)
    roots = [v for _, v in graph.outputs if isinstance(v, Node)] + list(graph.updates.values()) \
        + ([m.loss] if m is not None else [])
    if roots:
        out.append("  tensor program:")
        out += _node_lines(graph, roots)
    for name, v in graph.outputs:
        out.append(f"  output {name} = {f'%{v.id}' if isinstance(v, Node) else _view(graph, v)}")
    for tid, v in graph.updates.items():
        out.append(f"  update {graph.tensors[tid].name} = %{v.id}")
    if m is not None:
        out.append(f"  minimize %{m.loss.id} with {m.optimizer}({', '.join(f'{k} = {v:g}' for k, v in m.hyper)})")
    return "\n".join(out) + "\n"


def _node_lines(graph, roots) -> list[str]:
    """The op DAG under `roots`, operands before users, one line per node (without
    recursion: backward programs are deep)."""
    order, seen = [], set()
    stack = [(r, False) for r in reversed(roots)]
    while stack:
        n, ready = stack.pop()
        if ready:
            order.append(n)
            continue
        if n.id in seen:
            continue
        seen.add(n.id)
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(n.args))
    lines = []
    for n in order:
        if n.op in ("tensor", "view"):
            what = graph.tensors[n.attrs[0]].name + ("" if n.op == "tensor" else " (view)")
        else:
            attrs = f" {list(n.attrs)}" if n.attrs else ""
            what = f"{n.op}({', '.join(f'%{a.id}' for a in n.args)}){attrs}"
        lines.append(f"    %{n.id} = {what} : {n.dtype}{list(n.shape)}")
    return lines


def lowered(low) -> str:
    g = low.graph
    rt = np.asarray(low.region_tile)
    out = [f"vertex graph {g.name}: {len(rt)} regions on {len(np.unique(rt))} tiles"]
    for i in range(min(len(rt), 40)):
        cs = low.region_cs[i]
        life = "whole program" if cs < 0 else f"during {low.compute_sets[cs].name}"
        out.append(f"  region {i}: tile {rt[i]}, {low.region_size[i]} B, {low.region_label[i][0]} ({life})")
    if len(rt) > 40:
        out.append(f"  ... {len(rt) - 40} more regions")
    for cs in low.compute_sets:
        out.append(f"  compute set {cs.name}: copies in {cs.pre.nbytes()} B, out {cs.post.nbytes()} B")
        for grp in cs.groups:
            layout = cir.table_layout(g.codelets[grp.codelet])
            out.append(f"    {grp.codelet}: {len(grp.tiles)} vertices, columns "
                       + " ".join(f"{c.kind}:{c.name}" for c in layout))
            for r in range(min(len(grp.tiles), 4)):
                cells = " ".join(f"r{grp.region[r, j]}+{grp.table[r, j]}" if grp.region[r, j] >= 0
                                 else str(grp.table[r, j]) for j in range(grp.table.shape[1]))
                out.append(f"      tile {grp.tiles[r]}: {cells}")
    return "\n".join(out) + "\n"
