"""What training adds to the operation table: the `grad` operation and the optimizers.

Requires `ops.core` and `ops.elementwise`; produces
- the `grad` op: `grad(L, [p, q])` in a program elaborates to one `grad` node per
  parameter (operands: the loss and the parameter's leaf), a stand-in the autodiff
  pass replaces by the gradient it names before anything else sees it;
- `OPTIMIZERS`, the table of optimizers `minimize L with OPT(...)` names: each with
  its hyperparameters (names, defaults and checks as PyTorch's), the state it keeps
  per parameter (`momentum`; `adam_m`, `adam_v`) and shared (Adam's `step`), and its
  update, built from element-wise nodes.  The autodiff pass makes the state vars
  and writes the new values as `graph.updates`.

Update rules, as `torch.optim` computes them:
  sgd   d = g + wd·p;  v = μ·v + d (when μ ≠ 0; v starts at 0, so v₁ = d);  p −= lr·v
  adam  d = g + wd·p;  t += 1;  m = β₁m + (1−β₁)d;  v = β₂v + (1−β₂)d²;
        p −= lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)
"""
from __future__ import annotations

from typing import Callable

from popdsl.node import node
from popdsl.ops import elementwise
from popdsl.ops.core import Builder, OpDef, Param


def _ap(b: Builder, name: str, *xs):
    return elementwise.apply(b, name, list(xs), None)


def _k(b: Builder, v: float):
    return b.const(v, "f32")


def _decayed(b: Builder, h: dict, p, g):
    """g + weight_decay · p (PyTorch's L2 penalty, added to the gradient)."""
    return g if h["weight_decay"] == 0 else _ap(b, "add", g, _ap(b, "mul", _k(b, h["weight_decay"]), p))


def _sgd(b: Builder, h: dict, p, g, state: dict, counters: dict):
    d = _decayed(b, h, p, g)
    new = {}
    if h["momentum"] != 0:
        d = new["momentum"] = _ap(b, "add", d, _ap(b, "mul", _k(b, h["momentum"]), state["momentum"]))
    return _ap(b, "sub", p, _ap(b, "mul", _k(b, h["lr"]), d)), new


def _adam(b: Builder, h: dict, p, g, state: dict, counters: dict):
    d = _decayed(b, h, p, g)
    b1, b2, t = h["beta1"], h["beta2"], counters["step"]
    m = _ap(b, "add", _ap(b, "mul", _k(b, b1), state["adam_m"]), _ap(b, "mul", _k(b, 1 - b1), d))
    v = _ap(b, "add", _ap(b, "mul", _k(b, b2), state["adam_v"]), _ap(b, "mul", _k(b, 1 - b2), _ap(b, "square", d)))
    # Bias corrections from the step count on the device (scalars, computed once).
    bc1 = _ap(b, "sub", _k(b, 1.0), _ap(b, "pow", _k(b, b1), t))
    bc2 = _ap(b, "sqrt", _ap(b, "sub", _k(b, 1.0), _ap(b, "pow", _k(b, b2), t)))
    step = _ap(b, "div", _k(b, h["lr"]), bc1)
    denom = _ap(b, "add", _ap(b, "div", _ap(b, "sqrt", v), bc2), _k(b, h["eps"]))
    return _ap(b, "sub", p, _ap(b, "mul", step, _ap(b, "div", m, denom))), {"adam_m": m, "adam_v": v}


def _check_sgd(h: dict) -> str | None:
    if h["lr"] <= 0:
        return f"sgd: lr must be positive, got {h['lr']:g}"
    if h["momentum"] < 0:
        return f"sgd: momentum must not be negative, got {h['momentum']:g}"
    if h["weight_decay"] < 0:
        return f"sgd: weight_decay must not be negative, got {h['weight_decay']:g}"
    return None


def _check_adam(h: dict) -> str | None:
    if h["lr"] <= 0:
        return f"adam: lr must be positive, got {h['lr']:g}"
    for k in ("beta1", "beta2"):
        if not 0 <= h[k] < 1:
            return f"adam: {k} must be in [0, 1), got {h[k]:g}"
    if h["eps"] <= 0:
        return f"adam: eps must be positive, got {h['eps']:g}"
    if h["weight_decay"] < 0:
        return f"adam: weight_decay must not be negative, got {h['weight_decay']:g}"
    return None


@node
class Optimizer:
    """One optimizer.  slots(h): the state each parameter keeps (a var named
    PARAM.SLOT, zeros at first); counters: scalar state shared by all parameters,
    each counting steps (a var named OPT.NAME, incremented before the update);
    update(b, h, p, g, state, counters) -> (new p, {slot: new state})."""
    name: str
    params: tuple[Param, ...]
    slots: Callable[[dict], tuple[str, ...]]
    counters: tuple[str, ...]
    check: Callable[[dict], str | None]
    update: Callable
    doc: str


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("sgd", (Param("lr", "float"), Param("momentum", "float", 0.0), Param("weight_decay", "float", 0.0)),
              lambda h: ("momentum",) if h["momentum"] != 0 else (), (), _check_sgd, _sgd,
              "stochastic gradient descent, with momentum (torch.optim.SGD)"),
    Optimizer("adam", (Param("lr", "float", 0.001), Param("beta1", "float", 0.9), Param("beta2", "float", 0.999),
                       Param("eps", "float", 1e-8), Param("weight_decay", "float", 0.0)),
              lambda h: ("adam_m", "adam_v"), ("step",), _check_adam, _adam,
              "Adam with bias correction (torch.optim.Adam)"),
)}


def op_defs() -> list[OpDef]:
    # Made by elaboration, replaced by the autodiff pass: no reference, no partition.
    return [OpDef("grad", "deferred", "the gradient of a loss (operand 0) with respect to a parameter (operand 1)")]


def functions() -> list:
    return []        # grad() checks that it differentiates parameters: the elaborator binds it
