"""Config value validators: each returns a description of what was expected, or None.

Shared by :mod:`training.config` and the recipes (each recipe validates its own ``loss``
section).
"""
from __future__ import annotations

from typing import Callable


def integer(lo=None, hi=None, nullable=False):
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            return f"an integer{' or null' if nullable else ''}"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"an integer in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return None
    return check


def number(lo=None, hi=None, lo_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            return "a finite number"
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return f"a number {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        if hi is not None and v > hi:
            return f"a number <= {hi}"
        return None
    return check


def boolean(v):
    return None if isinstance(v, bool) else "true or false"


def choice(*options):
    def check(v):
        return None if v in options else f"one of {list(options)}"
    return check


def string(nullable=False):
    def check(v):
        if v is None and nullable:
            return None
        return None if isinstance(v, str) and v else f"a non-empty string{' or null' if nullable else ''}"
    return check


def listof(item: Callable, allowed=None, nonempty=True, increasing=False):
    def check(v):
        if not isinstance(v, (list, tuple)) or (nonempty and not v):
            return "a non-empty list" if nonempty else "a list"
        for x in v:
            err = item(x)
            if err or (allowed is not None and x not in allowed):
                return f"a list of {err or 'values in ' + str(list(allowed))}"
        if increasing and list(v) != sorted(set(v)):
            return "a strictly increasing list"
        return None
    return check
