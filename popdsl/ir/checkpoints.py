"""Where a running vertex may be stopped: the check points of codelet IR.

Requires `popdsl.ir.codelet`; produces the rule that the code generator
(`popdsl.codegen.llvm`) and the reference evaluator (`popdsl.ir.codelet_eval`) both
implement, so that a vertex over its cycle budget stops at exactly the same point
in both, with the same memory and the same count.

At a check point a vertex stops, failing with ERR_CYCLES, if its cycle counter
(`ir.cost`: everything charged so far, the current statement included) exceeds the
budget (`--max-cycles`); native code also stops there, with ERR_INTERRUPT, when
Ctrl-C has been pressed.  The check points:

* every `while` test, before its cost is charged;
* a `for` whose body is straight-line code, in a vertex codelet (its whole cost,
  trips x per-iteration cost, is charged up front): right after that charge, if
  it makes at least `BIG_TRIPS` trips — so a loop over budget stops before it
  starts;
* a `for` whose body holds a loop: after every `POLL`-th iteration (counting from
  the first; an iteration ended by `continue` counts, one ended by `break` does not
  reach the check);
* any other `for`: when it ends (normally or by `break`), if it makes at least
  `BIG_TRIPS` trips;
* every `amp` that does work, right after its cycles are charged (before it
  computes), so an amp over budget stops before it starts.

So there is no check inside a loop without inner loops, and none at all in a
nest of short loops: with the sizes of a specialised driver folded in, every check
of a small vertex folds away, and vectorised and unrolled code pays nothing.  Yet
the time between two checks stays bounded: a loop without inner loops runs fewer
than BIG_TRIPS trips unchecked, and a loop of loops fewer than POLL iterations.
Scalar codelets count no cycles: their checks only see Ctrl-C.
"""
from __future__ import annotations

from popdsl.ir import codelet as ir

POLL = 16                 # iterations of a loop of loops between two checks
BIG_TRIPS = 1 << 16       # a loop without inner loops this long is checked


def straight(body) -> bool:
    """No statement of `body` can change how many statements run after it."""
    return all(isinstance(s, (ir.Declare, ir.Assign, ir.Store)) for s in body)


def has_loop(body) -> bool:
    for s in body:
        if isinstance(s, (ir.For, ir.While)):
            return True
        if isinstance(s, ir.If) and (has_loop(s.then) or has_loop(s.orelse)):
            return True
    return False


def for_check(s: ir.For, counting: bool) -> str:
    """'entry', 'latch' or 'exit': where loop `s` is checked (see above);
    `counting`: in a vertex codelet (one that counts cycles)."""
    if counting and straight(s.body):
        return "entry"
    return "latch" if has_loop(s.body) else "exit"
