"""Tensor-at-a-time I/O for conversions: host memory stays near the largest single tensor.

* `SafetensorsReader` opens a shard only for the one tensor it reads (its mapping is closed
  again, so pages of tensors already converted do not stay resident).
* `StreamedArray` is a native leaf that Orbax writes block by block: a registered Orbax type
  handler opens the leaf's TensorStore array with one chunk per block (one layer of a stacked
  leaf) and writes the blocks in turn, so a stacked leaf is never whole in memory. On disk
  it is an ordinary Orbax array that any Orbax/MaxText reader restores.
* `NativeReader` reads a native checkpoint's leaves, or single layers of stacked leaves,
  through TensorStore with the specs Orbax itself uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from safetensors import safe_open

from tpusft.errors import CheckpointError
from tpusft.internals import orbax_private

Block = tuple[tuple[slice, ...], np.ndarray]


class ReadClock:
    """Bytes read and the wall time during which at least one read was in progress (reads
    overlap on worker threads, so this is the reading stage's own throughput)."""

    def __init__(self):
        self.bytes = 0
        self.seconds = 0.0
        self._active = 0
        self._since = 0.0
        self._lock = threading.Lock()

    def __enter__(self):
        with self._lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.seconds += time.perf_counter() - self._since

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes


class SafetensorsReader:
    """Tensors of a local HF checkpoint directory by name (single file or sharded + index)."""

    def __init__(self, directory: str):
        d = epath.Path(directory)
        index = d / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: str(d / f) for name, f in weight_map.items()}
            missing = sorted({f for f in self.files.values() if not epath.Path(f).exists()})
            if missing:
                raise CheckpointError(f"{directory}: shard {epath.Path(missing[0]).name} listed "
                                      f"in model.safetensors.index.json is missing "
                                      f"({len(missing)} missing)")
        elif (d / "model.safetensors").exists():
            with _safetensors(str(d / "model.safetensors")) as f:
                self.files = {name: str(d / "model.safetensors") for name in f.keys()}
        else:
            raise CheckpointError(f"{directory} has no model.safetensors or "
                                  f"model.safetensors.index.json")
        self.clock = ReadClock()

    def names(self) -> list[str]:
        return list(self.files)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype such as 'BF16') of a tensor, from its file's header."""
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the HF checkpoint")
        with _safetensors(self.files[name]) as f:
            sl = f.get_slice(name)
            return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A tensor, or its rows [j, k) only."""
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the HF checkpoint")
        with self.clock:
            with _safetensors(self.files[name]) as f:
                t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
        self.clock.add(t.nbytes)
        return t


@contextlib.contextmanager
def _safetensors(path: str):
    """safe_open, with a damaged file (a broken or absurd header, a truncated shard) as one
    CheckpointError naming it."""
    try:
        with safe_open(path, "np") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, MemoryError ...
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({detail}); it may "
                              f"be truncated or damaged: download it again") from None


class StreamedArray:
    """A leaf of known shape/dtype whose contents arrive as blocks of `block_shape`."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, block_shape: tuple[int, ...],
                 blocks: Callable[[], Iterator[Block]]):
        self.shape, self.dtype, self.block_shape = tuple(shape), np.dtype(dtype), block_shape
        self.blocks = blocks
        self.ndim = len(shape)
        self.size = int(np.prod(shape))


class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Writes StreamedArrays one block at a time; stored exactly as Orbax stores arrays."""

    async def _write_all(self, values, infos, args):
        for value, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            tspec = orbax_private.array_write_spec(
                self, info, arg, global_shape=value.shape, local_shape=value.block_shape,
                dtype=value.dtype)
            base = tspec.get("kvstore", {}).get("base")
            if isinstance(base, dict) and base.get("driver") == "file":
                # Data files go through the page cache without an fsync per chunk (like any
                # file copy); the OCDBT manifest is still synced.
                base["file_io_sync"] = False
            t = await ts.open(ts.Spec(tspec), create=True, open=True,
                              context=info.ts_context)
            # One block is written (TensorStore's threads, no copy) while the next is read
            # and transformed: at most two blocks are alive.
            pending = None
            for index, block in value.blocks():
                write = t[index].write(block.astype(value.dtype, copy=False),
                                       can_reference_source_data_indefinitely=True)
                if pending is not None:
                    await pending
                pending = write
            if pending is not None:
                await pending

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [orbax_private.commit_future(self._write_all(values, infos, args),
                                            name="tpusft_streamed_array")]


def _register() -> None:
    # Orbax logs a warning because the handler shares np.ndarray's type name on purpose: the
    # stored leaves are plain arrays to every reader.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(StreamedArray, StreamedArrayHandler(),
                                                override=True)
    finally:
        absl_logger.setLevel(level)


_register()


def save_native(directory: str, params: dict, scan_layers: bool) -> str:
    """Writes `params` as a MaxText-layout checkpoint at <directory>/0/items."""
    root = epath.Path(directory)
    if "://" not in directory:
        root = root.absolute()
    if (root / "0").exists():
        raise CheckpointError(f"{root}/0 already exists; choose an empty output directory")
    tree = {"step": 0, "opt_state": {}, "params": {"params": params}}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    # zarr3 like MaxText's checkpoints; uncompressed (weights barely compress, and zstd
    # would bound the conversion speed).
    handler = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("items", ocp.args.PyTreeSave, handler)
    with ocp.CheckpointManager(root, options=options, handler_registry=registry) as mngr:
        mngr.save(0, args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree)),
                  custom_metadata={"scan_layers": scan_layers})
        mngr.wait_until_finished()
    return str(root / "0" / "items")


def read_index(items: epath.Path) -> tuple[dict, str | None]:
    """An Orbax PyTree directory's index of arrays (`_METADATA`), or what makes it unreadable
    (an empty, truncated or overwritten file)."""
    try:
        meta = json.loads((items / "_METADATA").read_text())
        if not isinstance(meta.get("tree_metadata"), dict):
            raise ValueError("no tree_metadata")
        return meta, None
    except (OSError, ValueError, AttributeError) as e:
        detail = " ".join(str(e).split())[:160] or type(e).__name__
        return {}, f"its index of arrays (_METADATA) cannot be read ({detail})"


class NativeReader:
    """Leaves of a native parameter PyTree (`items` directory), whole or one layer at a time."""

    def __init__(self, items: epath.Path, prefix: tuple[str, ...]):
        self.items = items
        meta, problem = read_index(items)
        if problem:
            raise CheckpointError(f"checkpoint {items} is damaged: {problem}")
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.entries: dict[tuple[str, ...], tuple[str, ...]] = {}
        for entry in meta["tree_metadata"].values():
            keys = tuple(k["key"] for k in entry["key_metadata"])
            if keys[:len(prefix)] == prefix:
                rel = keys[len(prefix):]
                if rel and rel[-1] == "value":  # Tunix/NNX training checkpoints
                    rel = rel[:-1]
                self.entries[rel] = keys
        self.clock = ReadClock()
        self._context = orbax_private.tensorstore_context()
        self._handles: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def _open(self, rel: tuple[str, ...]):
        if rel not in self.entries:
            raise CheckpointError(f"{self.items}: parameter {'/'.join(rel)} is missing; check "
                                  f"the model preset and scan_layers")
        with self._lock:
            if rel not in self._handles:
                spec = orbax_private.array_read_spec(str(self.items),
                                                     ".".join(self.entries[rel]), self.use_zarr3)
                self._handles[rel] = ts.open(ts.Spec(spec), open=True,
                                             context=self._context).result()
            return self._handles[rel]

    def shape(self, rel: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._open(rel).shape)

    def dtype(self, rel: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._open(rel).dtype.numpy_dtype)

    def read(self, rel: tuple[str, ...], index: int | None = None,
             columns: tuple[int, int] | None = None) -> np.ndarray:
        """A leaf, layer `index` of a stacked leaf, or columns [j, k) of a 2-D leaf
        (thread-safe)."""
        t = self._open(rel)
        view = t if index is None else t[:, index]
        if columns is not None:
            view = view[:, columns[0]:columns[1]]
        with self.clock:
            out = view.read().result()
        self.clock.add(out.nbytes)
        return out

    def close(self) -> None:
        self._handles.clear()
