"""The only modules that touch a library's private names: one per library, each with the
version it was checked against and a `missing()` that tests/test_internals.py runs."""

from __future__ import annotations

import inspect
from typing import Any


def missing_names(names: tuple[tuple[Any, str, Any], ...]) -> list[str]:
    """The entries of `names` ((owner, name, parameters in order, or "attribute" for one set
    in the owner's __init__)) the installed library lacks or has with other parameters."""
    out = []
    for owner, name, kind in names:
        qual = f"{owner.__module__}.{owner.__qualname__}" if inspect.isclass(owner) \
            else owner.__name__
        where = f"{qual}.{name}"
        if kind == "attribute":
            source = inspect.getsource(owner)
            if f"self.{name} =" not in source and f"self.{name}:" not in source:
                out.append(f"{where}: no longer set by {owner.__qualname__}")
            continue
        member = inspect.getattr_static(owner, name, None)
        if member is None:
            out.append(f"{where}: gone")
            continue
        params = tuple(inspect.signature(member).parameters)
        if params[:len(kind)] != tuple(kind):
            out.append(f"{where}: parameters {params}, expected {tuple(kind)}")
    return out
