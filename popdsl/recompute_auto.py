"""Recomputation `auto`: the least level of recomputation whose plan fits.

Requires a training step after autodiff and a way to compile it from the recompute
stage (`compile_at`, made by pipeline.compile_source); produces that compile's
result — the one loop of the pipeline that goes back.  The search predicts from
each try's busiest tile (passes.recompute: `next_try`, `predicted_fit`), samples a
try it expects not to fit on a few tiles, and — on a machine with a second core —
makes that try in a second process (`popdsl.forked`) beside the whole try it
expects to keep, which it would make next.
"""
from __future__ import annotations

import io
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import numpy as np

from popdsl import artifact, forked
from popdsl.codegen.jit import NativeCodelets
from popdsl.diagnostics import CompileError, OutOfMemory
from popdsl.ir import executable as X
from popdsl.passes import recompute as rc


# The least a search waits for a try made beside another, past the other's end.
BESIDE_WAIT = 120.0


def fit(opts, graph, compile_at, monitor=None):
    """Recomputation `auto`: the step as it is if it fits its tiles (and the policy's
    budget), else a level of recomputation (element-wise results, then segments:
    passes.recompute) that makes it fit where one level fewer does not (found by a
    search that predicts the busiest tile from the bytes each level frees,
    `recompute.next_try`, each try `compile_at(options, note)` from the recompute
    stage: the least, where fewer never fit if more do not; the busiest tile need
    not fall with every level, bench/recompute_levels.py).  A try the search
    expects not to fit is partitioned (`compile_at(..., until="partition")`), then
    lowered and bounded on the tiles busiest in the last whole try alone
    (`Options.only`, `recompute.SAMPLE_TILES` of them): a tile over the budget
    there is over it in the whole try too, shown in seconds where a whole try takes
    a minute; else the whole try goes on from the same partition
    (`compile_at(..., partitioned=...)`).  The first try, nothing recomputed, is
    sampled so only when `recompute.expect_over` expects it over, on tiles spread
    over the chip (its busiest among them then stand for the busiest).  The try
    with every segment recomputed brackets the search unless
    `recompute.guessed_need` expects it well within the budget.  Out of memory
    even with every segment recomputed is the error of that try, saying so;
    fitting the tiles but not the budget, the closest there is.  With a second
    core (`forked.available`), a sampled try one below the level predicted to fit
    runs in a forked process beside that level's whole try (`beside`): the same
    tries' answers, so the same level and result.  `monitor`: as
    `compile_source`'s, around keeping and reloading the best try, and a row for
    the forked try's stages (`beside`).  `compile_at(options, note, until=,
    partitioned=, monitor=, check=)`: `monitor` replaces the caller's (the forked
    try records its stages), `check()` runs before each stage and may raise to stop
    the try."""
    budget = opts.recompute.budget or opts.target.tile_memory
    stage = (lambda name, note: monitor(name, note)) if monitor is not None else (lambda name, note: nullcontext())
    seg = rc.segments(graph)
    count = seg.levels - 1 if seg is not None else 0          # the last level: every segment
    # The tiles a sample bounds: the busiest of the last whole try, or before any, a
    # spread over the chip when the step is expected over its budget from the start.
    ntiles = graph.target.tiles               # the graph's own (a graph may ask for fewer)
    sampling = bool(count) and ntiles > 4 * rc.SAMPLE_TILES
    spread_out = sampling and rc.expect_over(graph, seg, budget)         # whether `busiest` is that spread
    busiest = tuple(np.unique(np.linspace(0, ntiles - 1, min(rc.SPREAD_TILES, ntiles // 4)).round().astype(int))
                    .tolist()) if spread_out else None

    def attempt(level: int, measure: bool = False, sample: bool = False, then_whole: bool = True):
        """(the compile's result, its OutOfMemory, or with `measure` its memory plan
        of lower bounds; whether it fits the budget).  `sample`: bounded on the
        busiest tiles first, where a try over the budget stops, and a measuring
        try within it too (its bound only steers the search, which ends on whole
        tries); without `then_whole`, a sample within the budget stops there too."""
        note = (f"auto: {seg.describe(level)}" + (", lower bound only" if measure else "")) if count else ""
        # Only the try with every segment recomputed shows its error (if all
        # fail): the others may stop at a lower bound already over a tile.
        o = replace(opts, level=level, probe=level < count, measure=measure)
        tiles = busiest
        if not sample or tiles is None:
            return tried(o, note, whole=True)
        part = compile_at(o, note, until="partition", **extra)
        res, ok = tried(replace(o, measure=True, only=tiles),
                        f"{note}, on {len(tiles)} tiles spread over the chip" if spread_out else
                        f"{note}, on the {len(tiles)} tiles busiest before", partitioned=part)
        if measure and ok or not measure and not ok or not then_whole:
            return res, ok
        # A measuring try over the budget on those tiles is measured whole: its
        # error, if it is the last word, names the tiles of the whole step.
        return tried(o, note, whole=True, partitioned=part)

    def tried(o, note: str, whole: bool = False, **kw):
        """A try's result (or OutOfMemory) and whether it fits.  The busiest tiles
        of a whole try are remembered, or of a spread's sample among its tiles."""
        nonlocal busiest, spread_out
        try:
            res = compile_at(o, note, **kw, **extra)
        except OutOfMemory as e:
            res = e.with_traceback(None)     # its frames hold the whole plan
        if sampling and (whole or spread_out):
            bounds = res.bounds if isinstance(res, OutOfMemory) else memory(res).bound_total
            if bounds is not None:
                bounds = np.asarray(bounds, np.int64)
                if not whole:                # a spread's sample: its own tiles only
                    bounds = np.where(np.isin(np.arange(bounds.size), o.only), bounds, -1)
                busiest = tuple(np.argsort(-bounds, kind="stable")[:rc.SAMPLE_TILES].tolist())
                spread_out = False
        return res, need(res) <= budget

    def memory(res) -> X.MemoryPlan:
        """A try's memory plan: a measuring try's result, or its executable's."""
        return res[0] if isinstance(res[0], X.MemoryPlan) else res[0].memory

    def need(res) -> int:
        """The busiest tile's bytes (at least, for a try stopped at its lower bound
        or measuring only that)."""
        return res.need if isinstance(res, OutOfMemory) else int(memory(res).total.max())

    extra = {}                # compile_at's monitor in a forked try, the check of a try beside one

    def step(lo: int, hi: int, need_lo: int, need_hi: int) -> tuple[int, int]:
        """The search's next try between `lo` and `hi`, and the least level it
        expects to fit (a try below that is sampled first)."""
        return (rc.next_try(lo, hi, need_lo, need_hi, freed, budget),
                rc.predicted_fit(lo, hi, need_lo, need_hi, freed, budget))

    def beside(mid: int, ahead: int, hi: int, need_hi: int):
        """Level `mid`'s sampled try, which the search expects over the budget, in a
        second process (`popdsl.forked`), while this one makes level `ahead`'s
        whole try, the search's next if `mid` is over as expected: (`mid`'s (need,
        within the budget on its sample), or None if the second process died;
        `ahead`'s try, or None if the search would not make it next).  Told that
        it would not, this one stops its try at the next stage.  What either
        raises is raised in the order the search would meet it."""
        def side():
            rows = []
            extra["monitor"] = _recorder(rows)
            res, ok = attempt(mid, sample=True, then_whole=False)
            return need(res), ok, rows

        def follows(answer) -> bool:
            # The search's next step once `mid` is over by `need_mid`: `ahead`, whole?
            need_mid, ok = answer[:2]
            if ok:
                return False
            nxt, expected = step(mid, hi, need_mid, need_hi)
            return nxt == ahead and nxt >= expected

        def check():
            # Run before each stage of this process's try: a try the search would
            # not make next stops (what the child raised is raised below, by its
            # `answer`, not from inside this try, where it could pass for the try's).
            if proc.ready():
                try:
                    answer = proc.answer()
                except Exception:
                    raise _Dropped from None
                if answer is None or not follows(answer):
                    raise _Dropped

        proc = forked.Forked(side)
        try:
            nxt = err = None
            extra["check"] = check
            t0 = time.perf_counter()
            try:
                nxt = attempt(ahead)
            except _Dropped:
                pass
            except CompileError as e:
                err = e
            finally:
                del extra["check"]
            # A sample takes a fraction of a whole try: a child this late is stuck
            # (killed; the search makes its try alone).
            answer = proc.answer(timeout=max(BESIDE_WAIT, 2 * (time.perf_counter() - t0)))
        finally:
            proc.close()
        if answer is None:
            return None, None
        need_mid, ok, rows = answer
        peak = proc.peak_rss()
        with stage("beside", f"{rows[-1][2] if rows else f'auto: {seg.describe(mid)}'}: in a second process, "
                   "beside the try above: "
                   + ", ".join(f"{name} {secs:.2f} s" for name, secs, _ in rows)
                   + (f"; its peak RSS {peak / 2**20:,.0f} MiB, pages shared with this one included" if peak else "")):
            pass
        if not follows(answer):
            return (need_mid, ok), None
        if err is not None:
            raise err
        return (need_mid, ok), nxt

    got, fits = attempt(0, sample=True)
    if not fits and count:
        need_lo, got, freed = need(got), None, seg.freed()
        guess = rc.guessed_need(need_lo, freed, ntiles)
        if guess <= rc.GUESS_MARGIN * budget:
            # Every segment recomputed is expected to fit with room to spare: the
            # bracket is taken on trust, and the search's last try checks it.
            fits, need_hi = True, guess
        else:
            # Every segment recomputed, measured by its lower bound only: it brackets
            # the search, and is rarely the level kept (its placement, a third of a
            # try at ResNet-50's batch 8, is spent only if it is).
            got, fits = attempt(count, measure=True, sample=True)
            need_hi = need(got)
        if fits:
            lo, hi = 0, count
            got = best = None
            while hi - lo > 1:
                # One try's result at a time: each is a whole compile's memory (a
                # ResNet-50 training step's is several GB).  The best so far waits
                # as its `.popx` bytes (ResNet-50's: 60 MB, 10 s to write, 14 s to
                # load) while later tries run, and is loaded if none of them does
                # better: a compile again would take minutes.
                if got is not None:
                    with stage("keep", f"auto: the try with {seg.describe(hi)}, as .popx bytes"):
                        best, got = artifact.dumps(got[0]), None
                mid, ahead = step(lo, hi, need_lo, need_hi)
                if mid < ahead < hi and forked.available():
                    # `mid`, expected over, tried beside `ahead`, expected to fit.
                    answer, nxt = beside(mid, ahead, hi, need_hi)
                    if answer is not None and not answer[1]:
                        lo, need_lo, got = mid, answer[0], None
                        if nxt is None:
                            continue
                        # `nxt` let go of: a try that does not fit is dropped below,
                        # not held through the next (9.2 GB at ResNet-50's batch 8
                        # under a budget that takes two whole tries; 6.4 GB now).
                        mid, (got, ok), nxt = ahead, nxt, None
                    else:         # within the budget on its sample (or no answer): as alone
                        got, ok = attempt(mid, sample=answer is None)
                else:
                    got, ok = attempt(mid, sample=mid < ahead)
                if ok:
                    hi, need_hi = mid, need(got)
                else:
                    lo, need_lo, got = mid, need(got), None
            if got is None and best is not None:
                with stage("reload", f"auto: the try with {seg.describe(hi)}"):
                    exe = artifact.load(io.BytesIO(best), unchecked=opts.unchecked)
                    got = exe, NativeCodelets(list(exe.codelets.values()), exe.unchecked)
            elif got is None:        # only everything recomputed fits (if it does): now placed
                got, fits = attempt(count)
        elif not isinstance(got, OutOfMemory):
            # Within the tiles' memory by its lower bound but not the budget: placed,
            # the closest there is (or out of memory, as planned).
            got, fits = attempt(count)
        if isinstance(got, OutOfMemory):
            d = got.diagnostics[0]
            raise OutOfMemory([replace(d, notes=d.notes + (
                f"this is with every one of the {seg.count} segments of the forward pass recomputed "
                "(--recompute all); the step needs a smaller batch or more tiles",))], got.tile, got.need, got.capacity,
                got.bounds)
    if isinstance(got, OutOfMemory):
        raise got
    return got


class _Dropped(Exception):
    """A try made beside another that the other's answer shows the search would
    not make (`fit`)."""


def _recorder(rows: list):
    """A monitor for a try in a second process: each stage's (name, seconds, note)."""
    @contextmanager
    def stage(name: str, note: str = ""):
        t = time.perf_counter()
        try:
            yield
        finally:
            rows.append((name, time.perf_counter() - t, note))
    return stage
