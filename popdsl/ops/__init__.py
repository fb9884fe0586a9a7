"""The operation table: every tensor-program operation and every function users call,
each defined once: the tables are the compiler's spine.

Requires `ir` only; produces `OPS` (node op → `OpDef`) and `FUNCTIONS` (name → its
overloads).  Passes look operations up here and never switch on their names: the
elaborator binds a call's arguments by the function's signature and runs its shape
rule, the partitioner runs the op's partition rule (or fuses its element-wise `emit`),
tests compare each op with its numpy `ref` (`ops.evaluate` runs a whole tensor program
on the refs).  Families live in their own modules:

    elementwise  arithmetic, comparisons, logic, math functions, select, casts
    reduce       sum mean max min argmax, and the partial sums others leave
    linalg       matmul
    conv         conv2d, max_pool2d, avg_pool2d
    conv_grad    their backward primitives (made by gradient rules)
    shape        reshape transpose slice concat pad gather one_hot, indexing, leaves,
                 broadcast and place (made by gradients)
    train        grad (what elaboration leaves for the autodiff pass); the optimizers

Each entry's `grad` is its reverse-mode rule (`passes.autodiff` runs them).

Adding an operation is an entry in its family (its `op_defs` and `functions`) plus
its tests.
"""
from __future__ import annotations

from popdsl.ops import conv, conv_grad, elementwise, gather, linalg, reduce, shape, train
from popdsl.ops.core import Builder, Function, OpDef, OpError, Param, applies_to, bind, shape_str
from popdsl.ops.train import OPTIMIZERS

_FAMILIES = (elementwise, reduce, linalg, conv, conv_grad, shape, gather, train)

OPS: dict[str, OpDef] = {}
FUNCTIONS: dict[str, list[Function]] = {}
for _family in _FAMILIES:
    for _op in _family.op_defs():
        assert _op.name not in OPS, f"operation {_op.name} defined twice"
        OPS[_op.name] = _op
    for _fn in _family.functions():
        FUNCTIONS.setdefault(_fn.name, []).append(_fn)


def op(name: str) -> OpDef:
    """The entry of node op `name` (`call:NAME`, a scalar codelet applied
    element-wise, shares the entry `call`)."""
    return OPS["call" if name.startswith("call:") else name]


OPS["call"] = OpDef("call", "elementwise", "a scalar codelet applied element-wise")


def function(name: str, npos: int, kwnames: set) -> Function | None:
    """The overload of `name` that takes a call with `npos` positional arguments and
    these keywords, or None when no function has that name."""
    overloads = FUNCTIONS.get(name)
    if not overloads:
        return None
    return next((f for f in overloads if applies_to(f, npos, kwnames)), overloads[-1])


def explain(codelet: str, field: str, axis: int, index: int, size: int) -> str | None:
    """What an index error of a primitive's codelet means, if its op says."""
    for entry in OPS.values():
        msg = entry.explain.get((codelet, field, axis))
        if msg is not None:
            return msg.format(index=index, size=size)
    return None


def is_elementwise(op_name: str) -> bool:
    return op(op_name).kind == "elementwise" or op_name == "const"


__all__ = ["OPS", "FUNCTIONS", "OPTIMIZERS", "Builder", "Function", "OpDef", "OpError", "Param", "bind", "function", "op",
           "is_elementwise", "explain", "shape_str"]
