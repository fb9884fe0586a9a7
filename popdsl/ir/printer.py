"""Deterministic text for the IRs of this layer (AST, codelet IR, tensor graph,
vertex graph): what `popc dump --after STAGE` prints and per-pass tests check.  Large arrays print as summaries, never as Python reprs."""
from __future__ import annotations

from dataclasses import fields, is_dataclass

import numpy as np

from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir
from popdsl.ir.index import unique
from popdsl.ir.mapping import Mapping




# ---------------------------------------------------------------- AST

def _src(e) -> str | None:
    """An expression or type as one line of source, every binary operation in
    parentheses (so the dump shows how the parser grouped it); None for a node
    that is not an expression."""
    from popdsl.frontend import ast
    if isinstance(e, (ast.IntLit, ast.FloatLit)):
        return repr(e.value)
    if isinstance(e, ast.BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, ast.StringLit):
        return '"' + e.value + '"'
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.ListLit):
        return f"[{', '.join(_src(x) for x in e.items)}]"
    if isinstance(e, ast.Neg):
        return f"-{_src(e.x)}"
    if isinstance(e, ast.Not):
        return f"!{_src(e.x)}"
    if isinstance(e, ast.Binary):
        return f"({_src(e.a)} {e.op} {_src(e.b)})"
    if isinstance(e, ast.Kwarg):
        return f"{e.name} = {_src(e.value)}"
    if isinstance(e, ast.Call):
        return f"{_src(e.fn)}({', '.join(_src(a) for a in e.args)})"
    if isinstance(e, ast.Slice):
        return f"{_src(e.start) if e.start is not None else ''}:{_src(e.stop) if e.stop is not None else ''}"
    if isinstance(e, ast.IndexExpr):
        return f"{_src(e.base)}[{', '.join(_src(i) for i in e.index)}]"
    if isinstance(e, ast.TypeRef):
        return e.name + ("" if e.dims is None else f"[{', '.join(map(str, e.dims))}]")
    return None


def _ast(node, indent: int = 0) -> list[str]:
    """Declarations and statements as a tree, one node a line with its plain
    fields; a field holding an expression or a type as `.field = SOURCE`."""
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
        src = [_src(x) for x in v] if isinstance(v, tuple) else [_src(v)]
        if None not in src:
            out.append(f"{pad}  .{name} = {', '.join(src)}")
            continue
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
    if isinstance(e, cir.Splat):
        return f"{e.ty}({expr(e.x)})"
    if isinstance(e, cir.Vector):
        return f"{e.ty}({', '.join(expr(x) for x in e.xs)})"
    if isinstance(e, cir.Lane):
        return f"{expr(e.x)}[{e.index}]"
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
        elif isinstance(s, cir.Amp):
            at = [f"{name}[{expr(i)}, {expr(j)}]" for name, (i, j) in s.operands()]
            sizes = ", ".join(expr(x) for x in s.sizes())
            out.append(f"{pad}{s.intrinsic}({', '.join(at)}, {sizes}){'' if s.checked else '!'}")
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

# Partition names the element-wise codelets it generates `fused_<ops>_<hash>`; the tensor graph
# dump prints their bodies, which no earlier dump shows.
GENERATED_PREFIX = "fused_"
_MAX_RUNS = 6          # a tile mapping prints as runs of elements when it has this few


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _scalar(v, dtype: str) -> str:
    """A vertex state value as its field's type prints it (never a numpy repr)."""
    if dtype == "bool":
        return "true" if v else "false"
    return repr(float(v)) if dtype in ("f32", "f16") else str(int(v))


def _tiles_summary(m: Mapping) -> str:
    """Elements per tile, and the mapping as runs of elements when it has few."""
    if m.numel == 0 or m.unmapped_count() == m.numel:
        return "unmapped"
    on = m.tiles >= 0
    tiles, inverse = np.unique(m.tiles[on], return_inverse=True)
    counts = np.bincount(inverse, weights=m.lengths[on]).astype(np.int64)
    s = ", ".join(f"{t}:{c}" for t, c in zip(tiles[:8].tolist(), counts[:8].tolist()))
    more = f", ... ({len(tiles)} tiles)" if len(tiles) > 8 else ""
    un = m.unmapped_count()
    s += more + (f", {un} unmapped" if un else "")
    if len(m.starts) > _MAX_RUNS:
        return s + f"  ({len(m.starts)} runs)"
    runs = " ".join(f"[{a}:{b}]->{'none' if t < 0 else t}"
                    for a, b, t in zip(m.starts.tolist(), m.ends.tolist(), m.tiles.tolist()))
    return s + "  layout " + runs


def _strides(idx: np.ndarray) -> tuple[int, list[int]] | None:
    """(first index, stride per axis) when the view's flat indices are an affine
    function of its coordinates (a block, a transpose, a broadcast), else None."""
    if idx.ndim == 0 or idx.size == 0:
        return None
    first = int(idx.flat[0])
    strides = []
    for ax, n in enumerate(idx.shape):
        at = [0] * idx.ndim
        at[ax] = 1 if n > 1 else 0
        strides.append(int(idx[tuple(at)]) - first)
    expect = first + sum(s * np.arange(n).reshape([-1 if k == ax else 1 for k in range(idx.ndim)])
                         for ax, (s, n) in enumerate(zip(strides, idx.shape)))
    return (first, strides) if np.array_equal(idx, np.broadcast_to(expect, idx.shape)) else None


def _view(graph, v) -> str:
    """`t[a:b]` for contiguous elements (`as SHAPE` unless 1-D), `t{from F strides
    [..]} as SHAPE` for a strided block, else the first few flat indices."""
    t = graph.tensors[v.tensor]
    idx = np.asarray(v.index)
    flat = idx.ravel()
    if flat.size and np.array_equal(flat, flat[0] + np.arange(flat.size)):
        return f"{t.name}[{flat[0]}:{flat[0] + flat.size}]" + (f" as {list(idx.shape)}" if idx.ndim != 1 else "")
    affine = _strides(idx)
    if affine is not None:
        return f"{t.name}{{from {affine[0]} strides {affine[1]}}} as {list(idx.shape)}"
    return f"{t.name}{{{', '.join(map(str, flat[:6].tolist()))}{', ...' if flat.size > 6 else ''}}} as {list(idx.shape)}"


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
        out.append(f"  {t.kind} {t.name}: {t.dtype}{list(t.shape)}{init}  tiles {_tiles_summary(graph.mappings[t.id])}")
    for cs in graph.compute_sets.values():
        out.append(f"  compute {cs.name}:")
        for grp in cs.groups:
            ntiles = len(set(np.asarray(grp.tiles).tolist()))
            out.append(f"    {grp.codelet}: {_n(len(grp), 'vertex', 'vertices')} on {_n(ntiles, 'tile')}")
            dtype = {f.name: f.dtype for f in graph.codelets[grp.codelet].fields}
            for i in range(min(len(grp), 4)):
                conns = ", ".join(f"{f}={_view(graph, _nth(vs, i))}" for f, vs in grp.connections.items())
                state = ", ".join(f"{f}={_scalar(vs[i], dtype[f])}" for f, vs in grp.state.items())
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
    r = graph.recompute
    if r:
        out.append(f"  recompute {r['mode']}: level {r['level']} ({r['recomputed_segments']} of "
                   f"{r['segments']} segments, {r['recomputed_elementwise']} element-wise results), "
                   f"{r['recomputed_ops']} ops; activations kept {r['kept_bytes']:,} B "
                   f"(without recomputation {r['kept_bytes_without']:,} B)")
    if m is not None:
        out.append(f"  minimize %{m.loss.id} with {m.optimizer}({', '.join(f'{k} = {v:g}' for k, v in m.hyper)})")
    # What partition records: the compute sets of each tensor op, and the outputs
    # that may take over an operand's memory where it dies.
    for op in graph.ops:
        out.append(f"  op %{op['node']} {op['op']} {op['dtype']}{op['shape']}: {', '.join(op['compute_sets'])}"
                   f" ({_n(op['vertices'], 'vertex', 'vertices')} on {_n(op['tiles'], 'tile')})"
                   + (f" {op['phase']}" if op.get("phase", "forward") != "forward" else ""))
    for out_t, in_t, cs in graph.inplace:
        out.append(f"  in place: {graph.tensors[out_t].name} may take {graph.tensors[in_t].name}'s memory in {cs}")
    used = sorted({grp.codelet for cs in graph.compute_sets.values() for grp in cs.groups})
    for name in used:
        if name.startswith(GENERATED_PREFIX):
            out += ["  " + line for line in codelet(graph.codelets[name]).splitlines()]
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
        again = graph.recomputed.get(n.id)
        lines.append(f"    %{n.id} = {what} : {n.dtype}{list(n.shape)}"
                     + (f"  recomputed (segment {again})" if again is not None else ""))
    return lines


_MAX_REGIONS = 40
_MAX_RUNS_SHOWN = 4


def _region(low, r: int, off: int) -> str:
    """`NAME rR+OFF`: the tensor a region holds a part of, or `buffer`."""
    t = low.region_tensor[r]
    return f"{low.graph.tensors[t].name if t >= 0 else 'buffer'} r{r}+{off}"


def _copy_lines(low, what: str, c, indent: str) -> list[str]:
    """A copy as its runs of bytes (what the executable's copy table holds): the
    count, the bytes, the first few runs."""
    sr, so, dr, do, nb = c.merged()
    if not sr.size:
        return []
    out = [f"{indent}{what}: {int(nb.sum())} B in {sr.size} run{'s' if sr.size != 1 else ''}"]
    for k in range(min(sr.size, _MAX_RUNS_SHOWN)):
        out.append(f"{indent}  {_region(low, int(sr[k]), int(so[k]))} -> {_region(low, int(dr[k]), int(do[k]))}: "
                   f"{int(nb[k])} B")
    if sr.size > _MAX_RUNS_SHOWN:
        out.append(f"{indent}  ... {sr.size - _MAX_RUNS_SHOWN} more runs")
    return out


def _state(value: int, dtype: str) -> str:
    # The table holds an f32 state's bits.
    if dtype in ("f32", "f16"):
        return _scalar(np.array([value], np.int64).astype(np.int32).view(np.float32)[0], dtype)
    return _scalar(value, dtype)


def _vertex_row(low, c, layout, grp, r: int) -> str:
    col = {(k.kind, k.name): j for j, k in enumerate(layout)}
    cells = []
    for f in c.fields:
        if f.direction == "state":
            cells.append(f"{f.name}={_state(int(grp.table[r, col[('state', f.name)]]), f.dtype)}")
            continue
        j = col[("addr", f.name)]
        reg = int(grp.region[r, j])
        cell = f"{f.name}={_region(low, reg, int(grp.table[r, j]))}" if reg >= 0 else f"{f.name}=unconnected"
        if f.rank == 2:
            cell += f" stride {int(grp.table[r, col[('stride', f.name)]])}"
        cells.append(cell)
    cells += [f"{s}={int(grp.table[r, col[('sym', s)]])}" for s in c.symbols]
    return f"tile {grp.tiles[r]}: " + ", ".join(cells)


def _lowered_prog(low, p, indent: int) -> list[str]:
    from popdsl.ir import executable as X
    pad = "  " * indent
    out = []
    for n in p.body:
        if isinstance(n, X.PExecute):
            out.append(f"{pad}execute {low.compute_sets[n.cs].name}")
        elif isinstance(n, X.PCopy):
            lines = _copy_lines(low, f"copy {n.copy}", low.copies[n.copy], pad)
            out += lines or [f"{pad}copy {n.copy}: 0 B"]
        elif isinstance(n, X.PRepeat):
            out += [f"{pad}repeat {n.count} {{", *_lowered_prog(low, n.body, indent + 1), pad + "}"]
        elif isinstance(n, X.PWhile):
            out += [f"{pad}while {low.reads[n.cond][0]} {{", *_lowered_prog(low, n.body, indent + 1), pad + "}"]
        elif isinstance(n, X.PIf):
            out += [f"{pad}if {low.reads[n.cond][0]} {{", *_lowered_prog(low, n.then, indent + 1),
                    pad + "} else {", *_lowered_prog(low, n.orelse, indent + 1), pad + "}"]
        elif isinstance(n, X.PPrint):
            out.append(f"{pad}print {low.reads[n.read][0]}")
        elif isinstance(n, X.PSeq):
            out += _lowered_prog(low, n, indent)
    return out


def lowered(low) -> str:
    """Regions (a tensor's part on one tile, or a vertex's exchange buffer and the
    compute set it lives during), each compute set's copies in and out as runs of
    bytes, its vertex tables with every address as `NAME rREGION+OFFSET`, and the
    program with its copies."""
    g = low.graph
    rt = np.asarray(low.region_tile)
    out = [f"vertex graph {g.name}: {_n(len(rt), 'region')} on {_n(len(unique(rt)), 'tile')}"]
    # How many vertex fields connect to each region (a shared buffer shows > 1).
    users = np.zeros(len(rt) + 1, np.int64)
    for cs in low.compute_sets:
        for grp in cs.groups:
            users += np.bincount(grp.region.ravel() + 1, minlength=len(rt) + 1)[:len(rt) + 1]
    for i in range(min(len(rt), _MAX_REGIONS)):
        cs, t = low.region_cs[i], low.region_tensor[i]
        what = f"tensor {g.tensors[t].name}" if t >= 0 else low.region_label[i][0]
        life = "" if cs < 0 else f", during {low.compute_sets[cs].name}, used by {_n(int(users[i + 1]), 'vertex', 'vertices')}"
        out.append(f"  region {i}: tile {rt[i]}, {low.region_size[i]} B, {what}{life}")
    if len(rt) > _MAX_REGIONS:
        out.append(f"  ... {len(rt) - _MAX_REGIONS} more regions")
    for cs in low.compute_sets:
        out.append(f"  compute set {cs.name}: copies in {cs.pre.nbytes()} B, out {cs.post.nbytes()} B")
        out += _copy_lines(low, "in", cs.pre, "    ") + _copy_lines(low, "out", cs.post, "    ")
        for grp in cs.groups:
            c = g.codelets[grp.codelet]
            layout = cir.table_layout(c)
            out.append(f"    {grp.codelet}: {_n(len(grp.tiles), 'vertex', 'vertices')}, table columns "
                       + " ".join(f"{k.kind}:{k.name}" for k in layout))
            for r in range(min(len(grp.tiles), 4)):
                out.append("      " + _vertex_row(low, c, layout, grp, r))
            if len(grp.tiles) > 4:
                out.append(f"      ... {len(grp.tiles) - 4} more")
    out += ["  program {", *_lowered_prog(low, low.program, 2), "  }"]
    for name, i in low.outputs.items():
        out.append(f"  output {name} = {g.tensors[low.reads[i][2]].name}")
    return "\n".join(out) + "\n"
