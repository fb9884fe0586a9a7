"""`@node`: the class `@dataclass(frozen=True, slots=True)` makes, made in half the time.

IR and AST nodes are frozen, slotted dataclasses.  Python 3.11 makes each method a
dataclass generates by compiling a little source text (one `exec` per method, six for a
frozen class with equality), and it does so at import: the hundred node classes on the
way of every `popc` command took a seventh of `popc check`'s time on a 10,000-line
file (bench/parse.py).  `node` lets `dataclass` make `__init__` and the frozen
`__setattr__` / `__delattr__`, and gives the class `__eq__`, `__hash__` and `__repr__`
made of closures, which mean what dataclass's would: equal when of the same class with
equal fields (those with `compare`), hashed on the same fields (or those with `hash`),
shown as `Name(field=value, ...)`.  Everything else (`fields`, `replace`, pickling,
`__match_args__`) is dataclass's own.  Python 3.13 makes a class's methods in one exec;
with it, this module can go.

Requires nothing of popdsl (any layer may use it).
"""
from __future__ import annotations

import dataclasses
import operator

__all__ = ["node"]


def node(cls=None, /, **options):
    """`@node` or `@node(eq=False)`: a frozen, slotted dataclass.  `options` go to
    `dataclasses.dataclass` (not `frozen`, `slots` or `repr`); with `eq=False`, equality
    and hash are identity, as dataclass's."""
    eq = options.pop("eq", True)

    def wrap(c):
        c = dataclasses.dataclass(frozen=True, slots=True, eq=False, repr=False, **options)(c)
        fields = dataclasses.fields(c)
        made = {"__repr__": _repr(tuple(f.name for f in fields if f.repr))}
        if eq:
            made["__eq__"] = _eq(_key(tuple(f.name for f in fields if f.compare)))
            made["__hash__"] = _hash(_key(tuple(f.name for f in fields
                                                if (f.compare if f.hash is None else f.hash))))
        for name, method in made.items():
            if name not in c.__dict__:      # as dataclass: what the class defines stays
                method.__qualname__ = f"{c.__qualname__}.{name}"
                setattr(c, name, method)
        return c
    return wrap if cls is None else wrap(cls)


def _key(names: tuple[str, ...]):
    """The fields' values as a tuple: compared as dataclass compares them (a tuple
    takes an element that `is` the other's as equal, a NaN included)."""
    if len(names) > 1:
        return operator.attrgetter(*names)
    if names:
        get = operator.attrgetter(names[0])
        return lambda self: (get(self),)
    return lambda self: ()


def _eq(key):
    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return key(self) == key(other)
        return NotImplemented
    return __eq__


def _hash(key):
    def __hash__(self):
        return hash(key(self))
    return __hash__


def _repr(names: tuple[str, ...]):
    # A loop, not a generator: a generator's frame under each level of a deep tree
    # would make repr give up sooner than dataclass's (fuse hashes the repr of an
    # element-wise chain 300 operations deep).
    def __repr__(self):
        parts = []
        for n in names:
            parts.append(f"{n}={getattr(self, n)!r}")
        return f"{self.__class__.__qualname__}({', '.join(parts)})"
    return __repr__
