"""Whether a file being closed is closed by the failure of the ``with`` block that owns it.

A writer is discarded only then: its own ``with``, or the ``with`` of anything holding it —
``fsspec.open``'s ``OpenFile``, ``contextlib.closing``, ``ExitStack``, a ``@contextmanager``
generator, a text or buffered wrapper, pandas' handles, a class of your own — whose
``__exit__`` closes it while an exception unwinds. Every other ``close()`` commits: in an
``except`` or ``finally`` block, in a callback, and in an ``__exit__`` that opened the file
itself (an emergency checkpoint written while a failure unwinds is kept).

How it is told, from the stack at ``close()``:

* the nearest ``__exit__`` frame decides. It owns the file if its object or its locals (an
  ``ExitStack``'s callback in hand) hold the file within a few steps (attributes,
  containers, closures, a generator's locals, a bound method's object); it is failing if one
  of its arguments is an exception (checked first: a clean ``__exit__`` is never walked).
  Looking at someone else's objects is bounded (a few steps, 32 items each, containers never
  iterated to their end); if one raises while looked at, the file is discarded, keeping the
  old one. An ``__exit__`` that was already running when the file was opened
  (``stack_at_open``) opened it itself, so it is not the owner;
* C wrappers (``io.TextIOWrapper``, ``io.BufferedWriter``) have no Python ``__exit__`` frame:
  there the first Python frame above ``close()`` is the ``with`` statement itself, and it is
  failing when it is executing ``WITH_EXCEPT_START`` (the call of ``__exit__`` with an
  exception)."""

from __future__ import annotations

import dis
import itertools
import sys
from collections.abc import Mapping
from typing import Any

_CO_VARARGS = 0x04
_WITH_EXCEPT_START = dis.opmap.get("WITH_EXCEPT_START")
_C_ATTRS = ("buffer", "raw", "__self__", "__wrapped__", "gi_frame")
_DEPTH = 5
_BREADTH = 32

StackMark = frozenset


def stack_at_open(max_frames: int = 64) -> StackMark:
    """The frames running when a file is opened (recorded by identity and code)."""
    frame, seen = sys._getframe(1), set()
    for _ in range(max_frames):
        if frame is None:
            break
        seen.add((id(frame), frame.f_code))
        frame = frame.f_back
    return frozenset(seen)


def closed_by_failing_owner(target: Any, opened_under: StackMark, max_frames: int = 32) -> bool:
    """See the module docstring; called from ``target.close()``."""
    frame = sys._getframe(2)
    if frame is not None and _executing_with_exit_for_exception(frame):
        return True
    for _ in range(max_frames):
        if frame is None:
            return False
        if frame.f_code.co_name == "__exit__":
            if (id(frame), frame.f_code) in opened_under or not any(_is_exception(a) for a in _arguments(frame)[1:]):
                return False
            try:
                return _holds(frame, target, _DEPTH)
            except Exception:  # someone else's object would not be looked at: keep the old file
                return True
        frame = frame.f_back
    return False


def _executing_with_exit_for_exception(frame: Any) -> bool:
    code = frame.f_code.co_code
    return _WITH_EXCEPT_START is not None and 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == _WITH_EXCEPT_START


def _arguments(frame: Any) -> list[Any]:
    code, local = frame.f_code, frame.f_locals
    values = [local.get(n) for n in code.co_varnames[: code.co_argcount]]
    if code.co_flags & _CO_VARARGS:
        values += list(local.get(code.co_varnames[code.co_argcount + code.co_kwonlyargcount], ()))
    return values


def _is_exception(value: Any) -> bool:
    return isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException))


def _holds(obj: Any, target: Any, depth: int, seen: set[int] | None = None) -> bool:
    """``obj`` is ``target`` or reaches it within ``depth`` steps."""
    if obj is target:
        return True
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, bytearray, int, float, bool, type)):
        return False
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    return any(_holds(o, target, depth - 1, seen) for o in _parts(obj))


def _parts(obj: Any) -> list[Any]:
    """At most ``_BREADTH`` of what ``obj`` holds, never iterating a container to its end."""
    kind = type(obj)
    if issubclass(kind, Mapping):
        return list(itertools.islice(obj.values(), _BREADTH))
    if issubclass(kind, (list, tuple, set, frozenset)) or kind.__name__ == "deque":
        return list(itertools.islice(obj, _BREADTH))
    if kind.__name__ == "frame":
        return list(itertools.islice(obj.f_locals.values(), _BREADTH))
    parts = []
    for a in _C_ATTRS:
        try:
            parts.append(getattr(obj, a, None))
        except Exception:  # a property of someone else's object
            pass
    closure = getattr(obj, "__closure__", None)
    if closure:
        parts += [c.cell_contents for c in closure if _filled(c)]
    try:
        parts += list(itertools.islice(vars(obj).values(), _BREADTH))
    except TypeError:
        pass
    return [p for p in parts if p is not None]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True
