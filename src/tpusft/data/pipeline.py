"""Hugging Face datasets -> grain: format, template, tokenize, mask, pack, batch.

Local files load as map-style datasets (exact, cheap resume: the iterator state is an index);
hub data sets are streamed (resume through the stream's own state_dict).
Every batch has fixed shapes [batch, max_target_length]:
  inputs, targets (inputs shifted by one within each example), weights (1.0 where the target
  is trained), segment_ids (0 = padding, 1.. = packed example), positions (per example).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import grain.experimental as grain_exp
import numpy as np

from tpusft.data import chat, formats
from tpusft.errors import DataError

FEATURES = ("inputs", "targets", "weights")
FILE_BUILDERS = ("json", "jsonl", "parquet", "csv", "arrow", "text")


@dataclass
class DataStats:
    """Counts of rows seen and dropped, shared by the map functions of one pipeline."""

    rows: int = 0
    dropped: int = 0
    truncated: int = 0
    dropped_example: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------- sources
def _expand_files(files: str | list, key: str) -> list[str]:
    items = [files] if isinstance(files, str) else list(files)
    out = []
    for item in items:
        if "://" in item:
            out.append(item)
            continue
        matches = sorted(glob.glob(os.path.expanduser(item)))
        if not matches:
            raise DataError(f"{key}: no file matches {item!r}; check the path")
        out.extend(matches)
    return out


def load_split(hf_path: str, split: str, *, data_files: str | list | None = None,
               name: str | None = None, key: str = "hf_data_files"):
    """A datasets.Dataset (local data) or IterableDataset (hub, streamed)."""
    import datasets

    datasets.disable_progress_bars()
    builder = "json" if hf_path == "jsonl" else hf_path
    try:
        if hf_path in FILE_BUILDERS:
            if not data_files:
                raise DataError(f"hf_path={hf_path!r} needs {key}= (a path, glob or list)")
            files = _expand_files(data_files, key)
            return datasets.load_dataset(builder, data_files=files, split="train")
        local = Path(hf_path).expanduser()
        if local.exists():
            if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DataError(f"{hf_path} has no split {split!r} (splits: "
                                        f"{', '.join(ds)})")
                    ds = ds[split]
                return ds
            return datasets.load_dataset(str(local), name=name, split=split)
        if hf_path.startswith((".", "/", "~")):
            raise DataError(f"hf_path={hf_path!r} does not exist; check the path")
        return datasets.load_dataset(hf_path, name=name, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (empty files raise StopIteration)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, StopIteration):
            msg = "the file holds no rows"
        raise DataError(f"cannot load data set hf_path={hf_path!r} split={split!r}: "
                        f"{msg[:300]}") from None


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, hf_iterable):
        super().__init__()
        self._ds = hf_iterable
        self._it = iter(self._ds)

    def __next__(self):
        return next(self._it)

    def get_state(self):
        return {"hf_state": self._ds.state_dict()}

    def set_state(self, state):
        self._ds.load_state_dict(state["hf_state"])
        self._it = iter(self._ds)


class StreamDataset(grain.IterDataset):
    """A streamed Hugging Face IterableDataset as a grain IterDataset with resumable state."""

    def __init__(self, hf_iterable):
        super().__init__()
        self._hf = hf_iterable

    def __iter__(self):
        return _StreamIterator(self._hf)


# ------------------------------------------------------------------------- examples
class ExampleEncoder:
    """row -> {'inputs','targets','weights'} of one example, or None for a bad row."""

    def __init__(self, tokenizer, fmt: str, columns: Sequence[str], max_length: int,
                 completion_only: bool, stats: DataStats):
        self.tokenizer, self.fmt, self.columns = tokenizer, fmt, list(columns)
        self.max_length, self.completion_only, self.stats = max_length, completion_only, stats

    def _drop(self, row: Any, why: str) -> None:
        self.stats.dropped += 1
        if not self.stats.dropped_example:
            self.stats.dropped_example = f"{why}: {str(row)[:200]}"

    def __call__(self, row: dict) -> dict | None:
        self.stats.rows += 1
        if self.fmt == "text":
            text = formats.to_text(row, self.columns)
            if text is None:
                self._drop(row, "empty or non-text 'text'")
                return None
            enc = chat.encode_text(self.tokenizer, text)
        else:
            msgs = formats.to_messages(row, self.fmt, self.columns)
            if msgs is None:
                self._drop(row, f"not a valid {self.fmt} row")
                return None
            try:
                enc = chat.encode_chat(self.tokenizer, msgs, self.completion_only)
            except (chat.TemplateMismatch, ValueError, TypeError) as e:
                self._drop(row, str(e))
                return None
        ids, trained = enc.ids, enc.trained
        if len(ids) > self.max_length + 1:
            self.stats.truncated += 1
            ids, trained = ids[: self.max_length + 1], trained[: self.max_length + 1]
        if len(ids) < 2 or not trained[1:].any():
            self._drop(row, "no trained token within max_target_length")
            return None
        return {"inputs": ids[:-1], "targets": ids[1:],
                "weights": trained[1:].astype(np.float32)}


def _pad_example(ex: dict, length: int) -> dict:
    n = len(ex["inputs"])
    out = {k: np.pad(ex[k], (0, length - n)) for k in FEATURES}
    out["segment_ids"] = (np.arange(length) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)
    return out


def _from_packed(ex: dict) -> dict:
    out = {k: ex[k] for k in FEATURES}
    out["segment_ids"] = ex["inputs_segment_ids"].astype(np.int32)
    out["positions"] = ex["inputs_positions"].astype(np.int32)
    return out


def _pad_batch(batch: dict, size: int) -> dict:
    n = len(batch["inputs"])
    if n == size:
        return batch
    return {k: np.pad(v, [(0, size - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


# ------------------------------------------------------------------------- pipeline
@dataclass
class DataSpec:
    """What the pipeline needs from the config (keeps this module free of the schema)."""

    hf_path: str
    split: str
    data_files: str | list | None
    hf_name: str | None
    data_format: str
    columns: Sequence[str] | None
    max_length: int
    packing: bool
    completion_only: bool
    seed: int
    num_epochs: int | None
    files_key: str = "hf_data_files"


def build_dataset(spec: DataSpec, tokenizer, batch_size: int, *, train: bool,
                  stats: DataStats | None = None) -> tuple[grain.IterDataset, DataStats]:
    """A grain IterDataset of fixed-shape batches of `batch_size` sequences.

    train=True: shuffled, repeated num_epochs times (forever when None), incomplete final
    batch dropped. train=False: data order, one pass, the final batch padded with empty rows.
    """
    import datasets

    stats = stats or DataStats()
    source = load_split(spec.hf_path, spec.split, data_files=spec.data_files, name=spec.hf_name,
                        key=spec.files_key)
    where = f"data set {spec.hf_path!r} split {spec.split!r}"
    columns = list(source.column_names) if source.column_names else None
    if columns is None:  # a stream whose features are unknown: peek at one row
        try:
            columns = list(next(iter(source)).keys())
        except StopIteration:
            raise DataError(f"{where} is empty") from None
    fmt = formats.detect_format(columns, spec.data_format)
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer has no chat_template, needed for data_format={fmt}; "
                        f"use a chat/instruct tokenizer or data_format=text")
    wanted = formats.check_columns(columns, fmt, spec.columns, where)
    encoder = ExampleEncoder(tokenizer, fmt, wanted, spec.max_length, spec.completion_only, stats)

    if isinstance(source, datasets.Dataset):
        if len(source) == 0:
            raise DataError(f"{where} is empty (0 rows); check the file or split")
        ds = grain.MapDataset.source(source)
        if train:
            ds = ds.shuffle(seed=spec.seed).repeat(spec.num_epochs)
        # Few threads: on small hosts the default 16 fight the trainer for the GIL.
        ds = ds.map(encoder).filter(lambda x: x is not None).to_iter_dataset(
            grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size))
    else:
        if train:
            source = source.shuffle(seed=spec.seed, buffer_size=10_000)
        ds = StreamDataset(source).map(encoder).filter(lambda x: x is not None)

    length = spec.max_length
    if spec.packing:
        ds = grain_exp.FirstFitPackIterDataset(
            ds, length_struct={k: length for k in FEATURES},
            num_packing_bins=max(batch_size, 16), seed=spec.seed, shuffle_bins=train)
        ds = ds.map(_from_packed)
    else:
        ds = ds.map(lambda ex: _pad_example(ex, length))
    ds = ds.batch(batch_size, drop_remainder=train)
    if not train:
        ds = ds.map(lambda b: _pad_batch(b, batch_size))
    # Build the next batches in a background thread while the device computes; the iterator
    # state still counts only the batches handed out.
    ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
    return ds, stats


def data_spec(cfg: Any, *, train: bool) -> DataSpec:
    if not train and cfg.hf_path in FILE_BUILDERS and not cfg.hf_eval_files:
        raise DataError(f"eval_split={cfg.eval_split!r} cannot select rows of hf_path="
                        f"{cfg.hf_path!r} files; give the eval file(s) with hf_eval_files=")
    split = cfg.train_split if train else (cfg.eval_split or cfg.train_split)
    files = cfg.hf_data_files if train else (cfg.hf_eval_files or cfg.hf_data_files)
    return DataSpec(
        hf_path=cfg.hf_path, split=split, data_files=files, hf_name=cfg.hf_name,
        data_format=cfg.data_format, columns=cfg.train_data_columns,
        max_length=cfg.max_target_length, packing=cfg.packing,
        completion_only=cfg.sft_train_on_completion_only, seed=cfg.shuffle_seed,
        num_epochs=cfg.num_epochs if train else 1,
        files_key="hf_data_files" if train or not cfg.hf_eval_files else "hf_eval_files")


def has_eval_data(cfg: Any) -> bool:
    return bool(cfg.eval_split or cfg.hf_eval_files)


def first_batch_or_error(dataset, stats: DataStats | None, what: str) -> None:
    """Reads one batch so an empty or fully-dropped data set fails before compilation."""
    try:
        next(iter(dataset))
    except StopIteration:
        detail = ""
        if stats is not None and stats.dropped:
            detail = f"; all {stats.dropped} rows were dropped (first: {stats.dropped_example})"
        raise DataError(f"the {what} data yields no batch{detail}; check the data set, "
                        f"data_format and max_target_length") from None
    if stats is not None:  # counts restart with the real iteration
        stats.rows = stats.dropped = stats.truncated = 0
