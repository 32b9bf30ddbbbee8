"""Unpickle plain data without running code, within a memory budget, and without sharing state between reads.

``pickle.Unpickler`` is unfit for untrusted files even with ``find_class`` restricted: it sizes its memo from
the stream (a 9-byte pickle makes it allocate and zero 1 GiB), hashes tuples nested a million deep (the interpreter
crashes), lets BUILD rewrite any object it can name, and inflates a few bytes into large objects by reusing memo
entries. This module decodes opcodes with :func:`pickletools.genops` and runs its own small stack machine: it
builds only plain data (None, bools, numbers, str, bytes, tuple, list, dict, set, frozenset), resolves globals
through the caller's ``find_class``, calls only what the caller allows, applies BUILD only to the types the
caller names, and charges every object to a :class:`Budget` before building it.
"""

from __future__ import annotations

import collections
import io
import pickletools
import sys
from collections.abc import Callable, Iterable
from typing import Any

MAX_DEPTH = 64  # containers nested deeper than this are refused (hashing deep tuples recurses in C)
MAX_TUPLE_KEY = 8  # a tuple used as a dict key or set element holds at most this many scalars
_REF = 8  # one reference: a stack slot, list item or tuple item
_ENTRY = 112  # one dict or set entry, with its share of the table's growth
_NODE = 128  # bookkeeping of one container built (depth table, keep-alive list)
_SMALL_INT = 1 << 31  # int keys beyond this could be chosen to collide in the hash table (quadratic inserts)


class PickleRefused(Exception):
    """The pickle asks for something this reader does not do, or for more memory than the read may use."""


class Budget:
    """The bytes one read may allocate. Every allocation is charged before it is made."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if self.used + int(nbytes) > self.limit:
            raise OverBudget(f"{what} would take the read past its memory bound of {self.limit} bytes")
        self.used += int(nbytes)


class OverBudget(PickleRefused):
    """An allocation the budget refused (nothing was allocated, and nothing was charged)."""


def _check_key(key: Any) -> None:
    """Dict keys and set elements: str, bytes, None, bool, small int, or a short tuple of these.

    Anything else could be chosen to collide in the hash table, turning n inserts into n**2 comparisons.
    """
    t = type(key)
    if t is str or t is bytes or key is None or t is bool or (t is int and -_SMALL_INT < key < _SMALL_INT):
        return
    if t is tuple and len(key) <= MAX_TUPLE_KEY and all(type(k) is not tuple for k in key):
        for k in key:
            _check_key(k)
        return
    raise PickleRefused(f"a dict key or set element of type {t.__name__} is not supported")


_DICTS = (dict, collections.OrderedDict)


class _Machine:
    """One unpickling: its stack, memo and depth table live and die with it."""

    def __init__(self, budget: Budget, find_class: Callable[[str, str], Any], persistent_load: Callable[[Any], Any],
                 callables: Iterable[Any], buildable: tuple[type, ...]):
        self.budget = budget
        self.find_class = find_class
        self.persistent_load = persistent_load
        self.callables = tuple(callables)
        self.buildable = buildable
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, Any] = {}
        self.depth: dict[int, int] = {}  # id -> nesting depth of each container built here
        self.keep: list = []  # keeps those containers alive so that their ids stay theirs
        self.ops = 0
        self._name = ""

    # -- helpers ------------------------------------------------------------------------------------------
    def charge(self, nbytes: int, what: str = "the pickled object tree") -> None:
        self.budget.charge(nbytes, what)

    def push(self, value: Any, size: int = 0) -> None:
        self.charge(size + _REF)
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            raise PickleRefused("pickle stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise PickleRefused("pickle stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise PickleRefused("pickle MARK missing")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def depth_of(self, obj: Any) -> int:
        return self.depth.get(id(obj), 0)

    def record(self, obj: Any, items: Iterable[Any], base: int = 0) -> Any:
        """Note a container's nesting depth (refusing depths past MAX_DEPTH) and keep it alive."""
        d = max(base, 1 + max((self.depth_of(x) for x in items), default=0))
        if d > MAX_DEPTH:
            raise PickleRefused(f"containers nested more than {MAX_DEPTH} deep")
        if id(obj) not in self.depth:
            self.charge(_NODE)
            self.keep.append(obj)
        self.depth[id(obj)] = d
        return obj

    def new_set(self, kind: type, items: list) -> Any:
        self.charge(sys.getsizeof(kind()) + _ENTRY * len(items))
        for k in items:
            _check_key(k)
        return self.record(kind(items), items)

    def fill_dict(self, d: dict, items: list) -> None:
        if len(items) % 2:
            raise PickleRefused("odd number of items for a dict")
        self.charge(_ENTRY * (len(items) // 2))
        keys, values = items[0::2], items[1::2]
        for k in keys:
            _check_key(k)
        d.update(zip(keys, values))
        self.record(d, values, base=self.depth_of(d))

    def add_items(self, container: Any, kind: type, items: list) -> None:
        if type(container) is not kind:
            raise PickleRefused(f"cannot add items to a {type(container).__name__}")
        if kind is list:
            self.charge(2 * _REF * len(items))
            container.extend(items)
        else:
            self.charge(_ENTRY * len(items))
            for k in items:
                _check_key(k)
            container.update(items)
        self.record(container, items, base=self.depth_of(container))

    def call(self, func: Any, args: Any) -> Any:
        """REDUCE: the caller's functions, or one of the plain containers built here."""
        if type(args) is not tuple:
            raise PickleRefused("REDUCE arguments are not a tuple")
        if func is set or func is frozenset:
            if len(args) > 1 or (args and type(args[0]) not in (list, tuple, set, frozenset)):
                raise PickleRefused(f"unsupported arguments to {func.__name__}()")
            return self.new_set(func, list(args[0]) if args else [])
        if func is collections.OrderedDict:
            if args:
                raise PickleRefused("OrderedDict() with arguments is not supported")
            self.charge(sys.getsizeof(collections.OrderedDict()))
            return self.record(collections.OrderedDict(), ())
        if func is slice:
            if len(args) > 3 or any(a is not None and type(a) is not int for a in args):
                raise PickleRefused("unsupported arguments to slice()")
            self.charge(sys.getsizeof(slice(None)))
            return slice(*args)
        if not any(func is c for c in self.callables):
            raise PickleRefused(f"calling {getattr(func, '__name__', type(func).__name__)} is not allowed")
        self.charge(_NODE)
        return func(*args)

    # -- opcodes --------------------------------------------------------------------------------------------
    def run(self, data: bytes) -> Any:
        dispatch = _DISPATCH
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            self.ops += 1
            handler = dispatch.get(op.name)
            self._name = op.name
            if handler is None:
                raise PickleRefused(f"pickle opcode {op.name} (at byte {pos}) is not allowed")
            if op.name == "STOP":
                return self.pop()
            handler(self, arg)
        raise PickleRefused("pickle ended without STOP")  # pragma: no cover (genops raises first)

    def op_nothing(self, arg):
        pass

    def op_mark(self, arg):
        self.charge(64)
        self.marks.append(self.stack)
        self.stack = []

    def op_pop(self, arg):
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self, arg):
        self.pop_mark()

    def op_dup(self, arg):
        self.push(self.top())

    def op_value(self, arg):  # None, bools, numbers, str, bytes: genops has decoded them
        value = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(self._name, arg)
        self.push(value, sys.getsizeof(value))

    def op_bytearray(self, arg):
        self.push(bytearray(arg), sys.getsizeof(arg))

    def op_empty_list(self, arg):
        self.push(self.record([], ()), 64)

    def op_empty_dict(self, arg):
        self.push(self.record({}, ()), 64)

    def op_empty_set(self, arg):
        self.push(self.new_set(set, []))

    def op_empty_tuple(self, arg):
        self.push((), 0)

    def op_tuple(self, arg):
        self._tuple(self.pop_mark())

    def op_tuple_n(self, arg):
        n = int(self._name[-1])
        if len(self.stack) < n:
            raise PickleRefused("pickle stack underflow")
        items = self.stack[-n:]
        del self.stack[-n:]
        self._tuple(items)

    def _tuple(self, items):
        self.charge(48 + _REF * len(items))
        self.push(self.record(tuple(items), items))

    def op_list(self, arg):
        items = self.pop_mark()
        self.charge(64 + 2 * _REF * len(items))
        self.push(self.record(list(items), items))

    def op_append(self, arg):
        item = self.pop()
        self.add_items(self.top(), list, [item])

    def op_appends(self, arg):
        items = self.pop_mark()
        self.add_items(self.top(), list, items)

    def op_dict(self, arg):
        items = self.pop_mark()
        d = {}
        self.charge(64)
        self.record(d, ())
        self.fill_dict(d, items)
        self.push(d)

    def op_setitem(self, arg):
        value = self.pop()
        key = self.pop()
        self._setitems([key, value])

    def op_setitems(self, arg):
        self._setitems(self.pop_mark())

    def _setitems(self, items):
        d = self.top()
        if type(d) not in _DICTS:
            raise PickleRefused(f"cannot set items on a {type(d).__name__}")
        self.fill_dict(d, items)

    def op_additems(self, arg):
        items = self.pop_mark()
        self.add_items(self.top(), set, items)

    def op_frozenset(self, arg):
        self.push(self.new_set(frozenset, self.pop_mark()))

    def op_put(self, arg):
        if type(arg) is not int or arg < 0:
            raise PickleRefused("bad memo index")
        if arg not in self.memo:
            self.charge(_ENTRY)
        self.memo[arg] = self.top()

    def op_memoize(self, arg):
        self.op_put(len(self.memo))

    def op_get(self, arg):
        try:
            self.push(self.memo[arg])
        except (KeyError, TypeError):
            raise PickleRefused(f"pickle refers to memo entry {arg!r}, which was never stored") from None

    def op_global(self, arg):
        module, _, name = str(arg).partition(" ")
        self.push(self.find_class(module, name))

    def op_stack_global(self, arg):
        name = self.pop()
        module = self.pop()
        if type(module) is not str or type(name) is not str:
            raise PickleRefused("STACK_GLOBAL needs two strings")
        self.push(self.find_class(module, name))

    def op_binpersid(self, arg):
        self.push(self.persistent_load(self.pop()))

    def op_reduce(self, arg):
        args = self.pop()
        func = self.pop()
        self.push(self.call(func, args))

    def op_newobj(self, arg):
        args = self.pop()
        cls = self.pop()
        if not any(cls is t for t in self.buildable) or args != ():
            raise PickleRefused(f"creating a {getattr(cls, '__name__', type(cls).__name__)} object is not allowed")
        self.charge(_NODE)
        self.push(self.record(cls.__new__(cls), ()))

    def op_build(self, arg):
        state = self.pop()
        inst = self.top()
        if not any(type(inst) is t for t in self.buildable):
            what = getattr(inst, "__name__", None) or type(inst).__name__
            raise PickleRefused(f"pickle BUILD on {what} is not allowed (only {[t.__name__ for t in self.buildable]})")
        if type(state) is not dict:
            raise PickleRefused(f"state for {type(inst).__name__} is not a plain dict")
        self.charge(_ENTRY * len(state))
        if getattr(type(inst), "__setstate__", None) is not None:
            inst.__setstate__(state)
        elif all(type(k) is str for k in state):  # e.g. the _metadata torch attaches to a state_dict
            vars(inst).update(state)
        else:
            raise PickleRefused(f"state for {type(inst).__name__} has names that are not strings")
        self.record(inst, state.values(), base=self.depth_of(inst))


_VALUE_OPS = (
    "NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT "
    "STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 "
    "UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8"
).split()
_DISPATCH: dict[str, Callable[[_Machine, Any], None]] = {
    "PROTO": _Machine.op_nothing, "FRAME": _Machine.op_nothing, "STOP": _Machine.op_nothing,
    "MARK": _Machine.op_mark, "POP": _Machine.op_pop, "POP_MARK": _Machine.op_pop_mark, "DUP": _Machine.op_dup,
    "BYTEARRAY8": _Machine.op_bytearray,
    "EMPTY_LIST": _Machine.op_empty_list, "LIST": _Machine.op_list,
    "APPEND": _Machine.op_append, "APPENDS": _Machine.op_appends,
    "EMPTY_TUPLE": _Machine.op_empty_tuple, "TUPLE": _Machine.op_tuple,
    "TUPLE1": _Machine.op_tuple_n, "TUPLE2": _Machine.op_tuple_n, "TUPLE3": _Machine.op_tuple_n,
    "EMPTY_DICT": _Machine.op_empty_dict, "DICT": _Machine.op_dict,
    "SETITEM": _Machine.op_setitem, "SETITEMS": _Machine.op_setitems,
    "EMPTY_SET": _Machine.op_empty_set, "ADDITEMS": _Machine.op_additems, "FROZENSET": _Machine.op_frozenset,
    "PUT": _Machine.op_put, "BINPUT": _Machine.op_put, "LONG_BINPUT": _Machine.op_put,
    "MEMOIZE": _Machine.op_memoize,
    "GET": _Machine.op_get, "BINGET": _Machine.op_get, "LONG_BINGET": _Machine.op_get,
    "GLOBAL": _Machine.op_global, "STACK_GLOBAL": _Machine.op_stack_global, "BINPERSID": _Machine.op_binpersid,
    "REDUCE": _Machine.op_reduce, "NEWOBJ": _Machine.op_newobj, "BUILD": _Machine.op_build,
    **{name: _Machine.op_value for name in _VALUE_OPS},
}


def loads(data: bytes, *, budget: Budget, find_class: Callable[[str, str], Any],
          persistent_load: Callable[[Any], Any], callables: Iterable[Any] = (),
          buildable: tuple[type, ...] = ()) -> tuple[Any, int]:
    """Unpickle ``data``; return ``(object, number of opcodes)``. Raises :class:`PickleRefused` (or what a
    callback raises); the decoder's own complaints (truncation, bad UTF-8) surface as ValueError and friends.

    ``find_class(module, name)`` resolves globals (raise to refuse); REDUCE may call only ``callables`` and the
    plain containers set, frozenset, OrderedDict and slice; NEWOBJ and BUILD apply only to ``buildable`` types,
    whose ``__setstate__`` receives a plain dict.
    """
    machine = _Machine(budget, find_class, persistent_load, callables, buildable)
    return machine.run(data), machine.ops
