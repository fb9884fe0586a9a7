"""Recomputation: trade compute for the activations a training step keeps.

Requires the autodiff stage's graph (`backward_from` marks where `minimize`'s
backward pass begins; a graph that does not train passes through unchanged).
Produces the same graph where the backward pass reads, instead of some forward
results, copies of them computed again just before it needs them, so the forward
results die at their last forward use instead of living until the backward pass.

How (PopART's "Standard" recomputation, Chen et al.'s √n checkpoints):
- The forward ops, in the order partitioning will run them, are cut into
  segments (about √ of the results the backward pass reads), each holding about an
  equal share of the bytes the backward pass reads, each cut where the fewest
  bytes cross near its share's end: what crosses a cut (the frontier) is kept,
  the checkpoints.
- Recomputing a segment: every result of it the backward pass reads is made again
  from the checkpoints at its start (nodes made with a salt, so interning does not
  hand back the forward node), and the backward nodes are rebuilt to read those.
- Element-wise results (PopART's NormOnly): a result the backward pass reads that
  element-wise ops and views make again from what it keeps anyway — a relu's output
  from batch norm's centred input, its scale and its parameters — is made again
  just before its backward use, a fused element-wise vertex per layer instead of a
  whole activation kept (`_elementwise`; chains of at most CHEAP_DEPTH ops).
- Levels, cheapest first: 0 recomputes nothing; 1 the element-wise results; k + 1
  the k segments that keep the most bytes and the element-wise results of the
  others; the last (`all`) every segment.  The pipeline's `auto` policy searches
  for the least level whose plan fits (pipeline.compile_source).

When: `graph.recomputed` maps each recomputed node to its segment; the partitioner
evaluates, of a node's operands, those that need later segments (or none) first, so
a segment is recomputed after the backward pass of the segments above it and dies
before the next is recomputed.  `graph.recompute` is the summary the reports print.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl import ops
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.limits import RECOMPUTE_MODES
from popdsl.node import node
from popdsl.passes.autodiff import topological
from popdsl.passes.liveness import ALWAYS_LIVE_KINDS

MODES = RECOMPUTE_MODES
CHEAP_DEPTH = 4          # element-wise ops a chain made again may have (views are free)
# A try `auto` expects not to fit is first lowered and bounded on this many of the
# tiles busiest in its last whole try (recompute_auto.fit): at ResNet-50's batch 8, the
# 64 busiest with nothing recomputed are all over their memory at level 7, where
# every 23rd tile is not.  Lowering 64 tiles takes 4 s to the whole graph's 16-24.
SAMPLE_TILES = 64
# Before any whole try, a sample of tiles spread evenly: at batch 8 the 64 busiest
# of 256 spread tiles with nothing recomputed are 55 of them over at level 7.
SPREAD_TILES = 256
# The busiest tile of a training step with nothing recomputed holds at least this
# many times its share of the step's always-live tensors and the activations it
# keeps, spread evenly (measured, gc200: ResNet-50 1.56-1.76 at batches 1-8,
# AlexNet batch 35 over 2.7): `expect_over`.
BUSIEST_OVER_EVEN = 1.5
# `guessed_need` below this share of the budget: everything recomputed is taken to
# fit without a try, the search's bracket (its guesses were within 2.4 % below the
# plans placed at ResNet-50's batches 1 and 8).
GUESS_MARGIN = 0.95


@node
class Policy:
    """`mode`: none | auto | all.  `budget`: bytes per tile `auto` must fit the step
    in (None: the tile's memory)."""
    mode: str = "auto"
    budget: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"recomputation is one of {', '.join(MODES)}, not {self.mode!r}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError("a memory budget is a positive number of bytes per tile")


@node(eq=False)
class Segments:
    """The forward pass cut for recomputation."""
    forward: list[Node]                  # forward results, in the order they run
    saved: set[int]                      # ids of those the backward pass reads
    cuts: list[int]                      # positions in `forward` after which a cut falls
    segment: np.ndarray                  # segment of each forward position
    checkpoints: set[int]                # ids kept across a cut
    frees: np.ndarray                    # per segment: bytes of saved results recomputing it frees
    cheap: np.ndarray                    # per segment: bytes its element-wise results free (level 1)
    held: int = 0                        # bytes of the results the backward pass reads

    @property
    def count(self) -> int:
        return len(self.cuts) + 1

    @property
    def levels(self) -> int:
        """Levels 0 .. levels - 1 (nothing, element-wise results, then segments)."""
        return self.count + 2

    def describe(self, level: int) -> str:
        if level == 0:
            return "nothing recomputed"
        if level == 1:
            return "element-wise results recomputed"
        if level == self.levels - 1:
            return f"all {self.count} segments recomputed"
        return f"{level - 1} of {self.count} segments and the others' element-wise results recomputed"

    def by_saving(self) -> list[int]:
        """Segments in the order recomputation takes them: most bytes freed first."""
        return sorted(range(self.count), key=lambda s: (-int(self.frees[s]), s))

    def freed(self) -> np.ndarray:
        """Bytes each level frees (its segments' and the others' element-wise results)."""
        order = self.by_saving()
        seg = np.concatenate(([0], np.cumsum(self.frees[order])))
        rest = int(self.cheap.sum()) - np.concatenate(([0], np.cumsum(self.cheap[order])))
        return np.concatenate(([0], seg + np.where(np.arange(self.count + 1) < self.count, rest, 0))).astype(np.int64)


def next_try(lo: int, hi: int, need_lo: int, need_hi: int, freed: np.ndarray, budget: int) -> int:
    """The level `auto` tries next, strictly between `lo` (does not fit: its busiest
    tile needs at least `need_lo` bytes) and `hi` (fits: `need_hi`): one below the
    least level predicted to fit, the busiest tile falling in proportion to the
    bytes recomputation frees (`freed`, by level) — so the search ends with a try
    that fails just below one that fits, and keeps no fitting try only to drop it.
    Kept within the middle half of (lo, hi): a poor prediction costs at most about
    twice bisection's tries."""
    assert hi - lo > 1
    least = predicted_fit(lo, hi, need_lo, need_hi, freed, budget)
    quarter = (hi - lo) // 4
    return int(min(max(least - 1, lo + 1, lo + quarter), hi - 1, hi - quarter))


def expect_over(graph: g.TensorGraph, seg: Segments, budget: int) -> bool:
    """Whether the step with nothing recomputed is expected over `budget` on its
    busiest tile: its always-live tensors and the activations it keeps for the
    backward pass, spread evenly, times BUSIEST_OVER_EVEN.  Only how `auto`
    searches depends on it (recompute_auto.fit), never what it finds."""
    always = sum(t.numel * t.elem_bytes for t in graph.tensors if t.kind in ALWAYS_LIVE_KINDS)
    return BUSIEST_OVER_EVEN * (always + seg.held) > budget * graph.target.tiles


def guessed_need(need_lo: int, freed: np.ndarray, tiles: int) -> int:
    """The busiest tile's bytes with every segment recomputed, guessed from the step
    with nothing recomputed (`need_lo`): less an even share of the bytes that frees
    (`freed`, by level; ResNet-50 batch 8: 930,740 - 354,620 = 576,120 B, placed
    578,826 B; batch 1: 344,937 - 44,391 = 300,546 B, placed 307,721 B).  It only
    steers `auto`'s search (recompute_auto.fit)."""
    return int(need_lo - int(freed[-1]) / tiles)


def predicted_fit(lo: int, hi: int, need_lo: int, need_hi: int, freed: np.ndarray, budget: int) -> int:
    """The least level in (lo, hi] predicted to fit, as `next_try` predicts it."""
    span = max(int(freed[hi] - freed[lo]), 1)
    levels = np.arange(lo + 1, hi + 1)
    predicted = need_lo + (need_hi - need_lo) * (freed[levels] - freed[lo]) / span
    return int(levels[np.argmax(predicted <= budget)]) if (predicted <= budget).any() else hi


def _nbytes(n: Node) -> int:
    return n.numel * cir.ELEM_BYTES.get(n.dtype, 4)


def _holds_data(n: Node) -> bool:
    """A result partitioning materialises (not a leaf, constant or view of another)."""
    return n.op != "const" and ops.op(n.op).kind not in ("leaf", "view")


def _is_result(n: Node) -> bool:
    return n.op != "const" and ops.op(n.op).kind != "leaf"


def _roots(graph: g.TensorGraph) -> list[Node]:
    return [v for _, v in graph.outputs if isinstance(v, Node)] + list(graph.updates.values())


def segments(graph: g.TensorGraph) -> Segments | None:
    """The forward pass of a training graph cut into about √(results kept) segments;
    None when the graph does not train or keeps nothing for its backward pass."""
    wm = graph.backward_from
    if wm is None:
        return None
    order = topological(_roots(graph))
    forward = [n for n in order if n.id < wm and _is_result(n)]
    pos = {n.id: i for i, n in enumerate(forward)}
    saved = {a.id for n in order if n.id >= wm for a in n.args if a.id in pos}
    if not saved:
        return None
    nf = len(forward)
    # A result lives (in the forward pass) until its last forward reader; a view's
    # readers keep what it views alive.
    last = np.arange(nf)
    for i in range(nf - 1, -1, -1):
        n = forward[i]
        until = int(last[i]) if ops.op(n.op).kind == "view" else i
        for a in n.args:
            j = pos.get(a.id)
            if j is not None and until > last[j]:
                last[j] = until
    size = np.array([_nbytes(n) if _holds_data(n) else 0 for n in forward], np.int64)
    # frontier[i]: bytes made at or before i and read after i (what a cut after i keeps).
    delta = np.zeros(nf + 1, np.int64)
    np.add.at(delta, np.arange(nf), size)
    np.add.at(delta, last, -size)
    frontier = np.cumsum(delta)[:nf]
    # √n segments (Chen et al.), each about an equal share of the bytes the backward
    # pass reads; each cut where the fewest bytes cross within its share's window.
    held = np.array([n.id in saved for n in forward]) & (size > 0)
    k = max(1, round(math.sqrt(int(held.sum()))))
    reads = np.cumsum(np.where(held, size, 0))
    total = int(reads[-1])
    cuts: list[int] = []
    for j in range(1, k):
        lo, hi = total * (2 * j - 1) // (2 * k), total * (2 * j + 1) // (2 * k)
        window = np.nonzero((reads >= lo) & (reads <= hi))[0]
        window = window[(window > (cuts[-1] if cuts else -1)) & (window < nf - 1)]
        if window.size:
            # the latest of equal frontiers: what the segment before it reads stays whole
            best = window[frontier[window] == frontier[window].min()]
            cuts.append(int(best[-1]))
    segment = np.searchsorted(np.asarray(cuts, np.int64), np.arange(nf), side="left")
    checkpoints = {forward[i].id for c in cuts for i in range(c + 1) if last[i] > c}
    kept = np.zeros(len(cuts) + 1, np.int64)
    for i, n in enumerate(forward):
        if n.id in saved and n.id not in checkpoints:
            kept[segment[i]] += size[i]
    seg = Segments(forward, saved, cuts, segment, checkpoints, kept, np.zeros(len(cuts) + 1, np.int64), total)
    for nid, s in _elementwise(seg, set())[0].items():
        seg.cheap[s] += size[pos[nid]]
    return seg


def _elementwise(seg: Segments, chosen: set[int]) -> tuple[dict[int, int], dict[int, int]]:
    """The saved results of segments not in `chosen` that element-wise ops and views
    make again from what the backward pass keeps anyway (saved results left kept,
    leaves, constants), in at most CHEAP_DEPTH element-wise ops: ({id: segment},
    {id: ops to make it} for every forward result a chain may read or pass
    through, 0 for one read as it is).  Checkpoints stay: a recomputed segment
    reads them.  A saved result of a chosen segment is no source (it is dropped)."""
    depth: dict[int, int] = {}
    out: dict[int, int] = {}
    fpos = {n.id: i for i, n in enumerate(seg.forward)}
    for i, n in enumerate(seg.forward):
        s = int(seg.segment[i])
        saved = n.id in seg.saved
        if saved and s in chosen and n.id not in seg.checkpoints:
            continue
        kind = ops.op(n.op).kind
        d = None
        if kind in ("elementwise", "view"):
            ds = [depth.get(a.id) if a.id in fpos else 0 for a in n.args]
            if None not in ds:
                d = max(ds, default=0) + (kind == "elementwise")
                d = d if d <= CHEAP_DEPTH else None
        if saved:
            if d is not None and d > 0 and n.id not in seg.checkpoints:
                out[n.id] = s
                depth[n.id] = d
            else:
                depth[n.id] = 0
        elif d is not None:
            depth[n.id] = d
    return out, depth


def kept_bytes(graph: g.TensorGraph) -> int:
    """Bytes of the forward results the backward pass (recomputations included)
    reads: what a training step keeps from its forward pass for its backward pass
    (a view keeps what it views)."""
    wm = graph.backward_from
    kept: dict[int, Node] = {}
    for n in topological(_roots(graph)):
        if n.id < wm:
            continue
        for a in n.args:
            while a.id < wm and ops.op(a.op).kind == "view":
                a = a.args[0]
            if a.id < wm and _holds_data(a):
                kept[a.id] = a
    return int(sum(_nbytes(a) for a in kept.values()))


def recompute(graph: g.TensorGraph, mode: str, level: int | None = None) -> g.TensorGraph:
    """A new graph whose backward pass recomputes what `level` says (module doc;
    `all`: every segment; `none`, or `auto` without a level: nothing)."""
    seg = segments(graph)
    if seg is None:
        return graph
    if level is None:
        level = seg.levels - 1 if mode == "all" else 0
    if not 0 <= level < seg.levels:
        raise ValueError(f"recomputation level {level} is not between 0 and {seg.levels - 1}")
    out = graph.copy()
    kept_before = kept_bytes(graph)
    chosen = set(seg.by_saving()[:max(level - 1, 0)])
    cheap, depth = _elementwise(seg, chosen) if 0 < level < seg.levels - 1 else ({}, {})
    fwd = {n.id: n for n in seg.forward}
    out.recompute = {"mode": mode, "level": level, "segments": seg.count, "recomputed_segments": len(chosen),
                     "recomputed_elementwise": sum(_holds_data(fwd[i]) for i in cheap),
                     "kept_bytes_without": kept_before}
    if level == 0:
        out.recompute.update(kept_bytes=kept_before, recomputed_ops=0, recomputed_flops=0)
        return out
    out.nodes = graph.nodes.copy()
    t = out.nodes
    pos = {n.id: i for i, n in enumerate(seg.forward)}
    redo = {n.id for i, n in enumerate(seg.forward)
            if int(seg.segment[i]) in chosen and n.id not in seg.checkpoints}
    clones: dict[int, Node] = {}
    wm = graph.backward_from
    saved_span, saved_site = t.span, t.site

    def clone(n: Node) -> Node:
        """n made again from its segment's checkpoints (iteratively: segments are long)."""
        stack = [n]
        while stack:
            m = stack[-1]
            if m.id in clones:
                stack.pop()
                continue
            todo = [a for a in m.args if a.id in redo and a.id not in clones]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            s = int(seg.segment[pos[m.id]])
            t.span, t.site = graph.nodes.spans.get(m.id), graph.nodes.sites.get(m.id, m.op) + ".recompute"
            c = t.make(m.op, tuple(clones.get(a.id, a) for a in m.args), m.attrs, m.shape, m.dtype,
                       index=m.index, salt=("recompute", s))
            clones[m.id] = c
            t.clone_of[c.id] = m.id
            out.recomputed[c.id] = s
        return clones[n.id]

    remade: dict[tuple[int, int], Node] = {}

    def remake(n: Node, s: int) -> Node:
        """Element-wise result n made again for segment s's backward pass from what
        it keeps (`_elementwise`'s chains: short, so recursion is safe)."""
        got = remade.get((n.id, s))
        if got is None:
            args = tuple(remake(a, s) if depth.get(a.id, 0) > 0 else a for a in n.args)
            t.span, t.site = graph.nodes.spans.get(n.id), graph.nodes.sites.get(n.id, n.op) + ".recompute"
            got = remade[(n.id, s)] = t.make(n.op, args, n.attrs, n.shape, n.dtype, index=n.index,
                                             salt=("recompute", s))
            t.clone_of[got.id] = n.id
            out.recomputed[got.id] = s
        return got

    def backward_arg(a: Node) -> Node:
        if a.id in redo:
            return clone(a)
        if a.id in cheap:
            return remake(a, cheap[a.id])
        return new.get(a.id, a)

    new: dict[int, Node] = {}
    try:
        for n in topological(_roots(graph)):
            if n.id < wm:
                continue
            args = tuple(backward_arg(a) for a in n.args)
            if all(x is a for x, a in zip(args, n.args)):
                continue
            t.span, t.site = graph.nodes.spans.get(n.id), graph.nodes.sites.get(n.id)
            new[n.id] = t.make(n.op, args, n.attrs, n.shape, n.dtype, index=n.index)
    finally:
        t.span, t.site = saved_span, saved_site
    t.backward_of = [(fid, tuple(new[i].id if i in new else i for i in ids)) for fid, ids in t.backward_of]
    out.outputs = [(name, new.get(v.id, v) if isinstance(v, Node) else v) for name, v in graph.outputs]
    out.updates = {tid: new.get(v.id, v) for tid, v in graph.updates.items()}
    recomputed = [n for n in seg.forward if n.id in clones] + [fwd[i] for i, _ in remade]
    flops = 0
    for n in recomputed:
        rule = ops.op(n.op).flops
        flops += rule(n) if rule is not None else (n.numel if _holds_data(n) else 0)
    out.recompute.update(kept_bytes=kept_bytes(out), recomputed_ops=len(recomputed), recomputed_flops=int(flops))
    _order(out)
    return out


def _order(graph: g.TensorGraph) -> None:
    """graph.needs: for every node that depends on a recomputed one, the latest
    segment it needs.  The partitioner runs operands needing later segments (or none)
    first: the backward pass reaches late segments first, so what needs them (the
    gradient coming down) is made before an early segment is recomputed."""
    need = graph.needs = dict(graph.recomputed)
    for n in topological(_roots(graph)):
        if n.id in need:
            continue
        got = [need[a.id] for a in n.args if a.id in need]
        if got:
            need[n.id] = max(got)


def verify(graph: g.TensorGraph) -> None:
    """What the stage promises: a recomputed node reads only recomputed nodes of its
    own segment and forward nodes (checkpoints, leaves); it is never a forward node
    itself; the summary is whole."""
    if not graph.recomputed:
        return
    wm = graph.backward_from
    for n in topological(_roots(graph)):
        s = graph.recomputed.get(n.id)
        if s is None:
            continue
        assert n.id >= wm, f"node {n.id} is both forward and recomputed"
        for a in n.args:
            assert a.id < wm or graph.recomputed.get(a.id) == s, \
                f"recomputed node {n.id} (segment {s}) reads node {a.id} of the backward pass or another segment"
    assert set(graph.recompute) >= {"mode", "level", "segments", "recomputed_segments", "recomputed_elementwise",
                                    "kept_bytes", "kept_bytes_without"}


__all__ = ["GUESS_MARGIN", "MODES", "Policy", "SAMPLE_TILES", "SPREAD_TILES", "Segments", "expect_over",
           "guessed_need", "next_try", "predicted_fit", "recompute", "segments", "verify"]
