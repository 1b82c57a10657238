"""Every Orbax private name tpusft uses, and why, in one place (orbax-checkpoint 0.12.8).

conversion/streaming.py writes a native leaf block by block through a type handler of its
own and reads single layers through TensorStore. The specs Orbax writes and reads arrays
with, its TensorStore context and the commit future a handler returns are in
`orbax.checkpoint._src`; using Orbax's own (not a copy) keeps the files exactly those Orbax
and MaxText read. `NAMES` lists each with the parameters tpusft passes;
tests/test_internals.py checks that every one still exists as used.
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

VERSION = "0.12.8"

# (owner, name, parameters it is called with, by name): "attribute" is set in the owner's
# __init__.
NAMES: tuple[tuple[Any, str, Any], ...] = (
    (ts_utils, "build_array_write_spec",
     ("info", "arg", "global_shape", "local_shape", "dtype", "use_ocdbt", "process_index",
      "metadata_key")),
    (ts_utils, "get_ts_context", ("use_ocdbt",)),
    (ts_utils.ArrayReadSpec, "__init__",
     ("directory", "relative_array_filename", "use_zarr3", "use_ocdbt")),
    (ocdbt_utils, "get_process_index_for_subdir", ("use_ocdbt",)),
    (future.CommitFutureAwaitingContractedSignals, "__init__", ("coro", "name")),
    (ocp.type_handlers.NumpyHandler, "_metadata_key", "attribute"),
)


def missing() -> list[str]:
    """The entries of NAMES this Orbax lacks or has without a parameter used, one line each."""
    out = []
    for owner, name, used in NAMES:
        where = f"{getattr(owner, '__qualname__', owner.__name__)}.{name}"
        if used == "attribute":
            if f"self.{name} =" not in inspect.getsource(owner):
                out.append(f"{where}: no longer set by {owner.__qualname__}")
            continue
        member = getattr(owner, name, None)
        if member is None:
            out.append(f"{where}: gone")
            continue
        params = inspect.signature(member).parameters
        lost = [p for p in used if p not in params]
        if lost:
            out.append(f"{where}: no parameter {', '.join(lost)}")
    return out


def array_write_spec(handler: ocp.type_handlers.NumpyHandler, info, arg, *, global_shape,
                     local_shape, dtype) -> dict:
    """The TensorStore spec (json) Orbax writes one array of `info` with, as `handler`."""
    use_ocdbt = info.is_ocdbt_checkpoint
    return ts_utils.build_array_write_spec(
        info=info, arg=arg, global_shape=global_shape, local_shape=local_shape, dtype=dtype,
        use_ocdbt=use_ocdbt,
        process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=use_ocdbt),
        metadata_key=handler._metadata_key).json  # noqa: SLF001


def array_read_spec(directory: str, name: str, use_zarr3: bool) -> dict:
    """The TensorStore spec (json) Orbax reads the array `name` of an OCDBT checkpoint with."""
    return ts_utils.ArrayReadSpec(directory, name, use_zarr3, use_ocdbt=True).json


def tensorstore_context():
    """Orbax's TensorStore context for OCDBT checkpoints."""
    return ts_utils.get_ts_context(use_ocdbt=True)


def commit_future(coro: Coroutine[Any, Any, None], name: str):
    """The future a type handler's serialize returns for a write done by `coro`."""
    return future.CommitFutureAwaitingContractedSignals(coro, name=name)
