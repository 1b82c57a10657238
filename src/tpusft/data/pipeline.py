"""Hugging Face datasets -> grain: format, template, tokenize, mask, pack, batch.

Each source (one data set, or each member of a weighted mixture) is read, cut to max_samples,
split off an eval fraction, sharded by process, shuffled and repeated, then rows become
examples (formats.py), examples become token ids with a loss mask (chat.py), over-length
examples are truncated or dropped, bad rows are counted, and sources are mixed with grain.
Local files load as map-style datasets (exact, cheap resume: the iterator state is an index);
hub data sets are streamed (resume through the stream's own state_dict).
Every batch has fixed shapes [batch, max_target_length]:
  inputs, targets (inputs shifted by one within each example), weights (1.0 where the target
  is trained), segment_ids (0 = padding, 1.. = packed example), positions (per example).
"""

from __future__ import annotations

import glob
import os
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import grain.experimental as grain_exp
import jinja2
import numpy as np

from tpusft.data import chat, formats
from tpusft.errors import DataError

FEATURES = ("inputs", "targets", "weights")
FILE_BUILDERS = ("json", "jsonl", "parquet", "csv", "arrow", "text")


@dataclass
class DataStats:
    """Counts of rows read, bad (by reason, with the first example of each), truncated and
    dropped as over-length; shared by the map functions of one pipeline (thread-safe)."""

    rows: int = 0
    truncated: int = 0
    bad: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    lengths: list | None = None  # token length of every example before truncation, if a list
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dropped(self) -> int:
        return sum(self.bad.values())

    def count_row(self) -> None:
        with self._lock:
            self.rows += 1

    def count_truncated(self) -> None:
        with self._lock:
            self.truncated += 1

    def count_bad(self, reason: str, row: Any, detail: str = "") -> None:
        with self._lock:
            self.bad[reason] += 1
            if reason not in self.examples:
                self.examples[reason] = f"{detail + ' in ' if detail else ''}{str(row)[:160]}"

    def reset(self) -> None:
        with self._lock:
            self.rows = self.truncated = 0
            self.bad.clear()

    def summary(self) -> str:
        """One line per kind of bad row with its count and first example."""
        lines = [f"{self.rows} rows read, {self.dropped} skipped, {self.truncated} truncated"]
        for reason, n in self.bad.most_common():
            lines.append(f"  {n} x {reason}: e.g. {self.examples[reason]}")
        return "\n".join(lines)


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
def bad_row(policy: str, stats: DataStats, row: Any, reason: str, detail: str = "") -> None:
    """A row that cannot be used: raises DataError (bad_row_policy=raise) or counts it."""
    if policy == "raise":
        raise DataError(f"bad row ({reason}{': ' + detail if detail else ''}): "
                        f"{str(row)[:200]}; fix the data or set bad_row_policy=skip")
    stats.count_bad(reason, row, detail)


class ExampleEncoder:
    """row -> {'inputs','targets','weights'} of one example, or None for a skipped row."""

    def __init__(self, tokenizer, fmt: str, fields: dict[str, str], opts: DataOptions,
                 stats: DataStats):
        self.tokenizer, self.fmt, self.fields, self.opts, self.stats = (
            tokenizer, fmt, fields, opts, stats)
        self.kind = formats.FORMATS[fmt].kind

    def _bad(self, row: Any, reason: str, detail: str = "") -> None:
        bad_row(self.opts.bad_row_policy, self.stats, row, reason, detail)

    def __call__(self, row: dict) -> dict | None:
        self.stats.count_row()
        try:
            ex = formats.parse_row(row, self.fmt, self.fields)
            if ex.kind == "text":
                enc = chat.encode_text(self.tokenizer, ex.text)
            else:
                enc = chat.encode_chat(self.tokenizer, ex.messages, self.opts.completion_only)
        except formats.BadRow as e:
            self._bad(row, e.reason, str(e).partition(": ")[2])
            return None
        except (chat.TemplateMismatch, ValueError, TypeError, jinja2.TemplateError) as e:
            # Templates raise on what they do not support (a system turn on Gemma, ...).
            self._bad(row, "rejected by the chat template", str(e).splitlines()[0][:120])
            return None
        ids, trained = enc.ids, enc.trained
        if self.stats.lengths is not None:
            self.stats.lengths.append(len(ids))
        limit = self.opts.max_length + 1
        if len(ids) > limit:
            if self.opts.truncation == "drop":
                self._bad(row, "over max_target_length", f"{len(ids) - 1} tokens")
                return None
            self.stats.count_truncated()
            cut = slice(-limit, None) if self.opts.truncation == "left" else slice(0, limit)
            ids, trained = ids[cut], trained[cut]
        if len(ids) < 2 or not trained[1:].any():
            self._bad(row, "no trained token within max_target_length")
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


def packing_efficiency(batch: dict) -> float:
    """Fraction of the batch's token slots that hold a real token (not padding)."""
    segs = batch["segment_ids"]
    return float(np.count_nonzero(segs)) / segs.size


# ------------------------------------------------------------------------- pipeline
@dataclass
class Source:
    """One data set of a run (the run's hf_* keys, or a registry entry of a mixture)."""

    name: str
    hf_path: str
    split: str = "train"
    data_files: str | list | None = None
    hf_name: str | None = None
    data_format: str = "auto"
    column_map: dict = field(default_factory=dict)
    max_samples: int | None = None
    weight: float = 1.0
    files_key: str = "hf_data_files"


@dataclass
class DataOptions:
    """What the pipeline needs from the config besides the sources."""

    max_length: int
    packing: bool = True
    packing_strategy: str = "best_fit"
    truncation: str = "right"
    bad_row_policy: str = "skip"
    completion_only: bool = True
    seed: int = 0
    num_epochs: int | None = None
    eval_fraction: float = 0.0
    shard_index: int | None = None  # None: jax.process_index()
    shard_count: int | None = None


def _shard(opts: DataOptions) -> tuple[int, int]:
    if opts.shard_index is not None:
        return opts.shard_index, opts.shard_count or 1
    import jax

    return jax.process_index(), jax.process_count()


def read_source(src: Source, opts: DataOptions, part: str):
    """The rows of `src` this process reads: part is 'train', 'eval' (eval_fraction's share of
    the same split) or 'all'."""
    import datasets

    data = load_split(src.hf_path, src.split, data_files=src.data_files, name=src.hf_name,
                      key=src.files_key)
    where = f"data set {src.name!r} (split {src.split!r})"
    streamed = not isinstance(data, datasets.Dataset)
    if not streamed and len(data) == 0:
        raise DataError(f"{where} is empty (0 rows); check the file or split")
    if src.max_samples:
        data = (data.take(src.max_samples) if streamed
                else data.select(range(min(src.max_samples, len(data)))))
    if part != "all" and opts.eval_fraction:
        if streamed:
            raise DataError(f"eval_fraction needs a local data set; {where} is streamed from "
                            f"the hub (set eval_split= instead)")
        if len(data) < 2:
            raise DataError(f"{where} has {len(data)} row(s); too few for eval_fraction")
        halves = data.train_test_split(test_size=opts.eval_fraction, seed=opts.seed,
                                       shuffle=True)
        data = halves["train" if part == "train" else "test"]
    index, count = _shard(opts)
    if count > 1:
        from datasets.distributed import split_dataset_by_node

        if streamed:
            data = split_dataset_by_node(data, rank=index, world_size=count)
        else:  # every process the same number of rows (steps stay in lockstep)
            per = len(data) // count
            if per == 0:
                raise DataError(f"{where} has {len(data)} rows, fewer than the {count} "
                                f"processes reading it")
            data = data.select(range(index * per, (index + 1) * per))
    columns = list(data.column_names) if data.column_names else None
    if columns is None:  # a stream whose features are unknown: peek at one row
        try:
            columns = list(next(iter(data)).keys())
        except StopIteration:
            raise DataError(f"{where} is empty") from None
    return data, columns, streamed, where


def source_examples(src: Source, opts: DataOptions, tokenizer, stats: DataStats, *,
                    train: bool, part: str) -> tuple[Any, bool]:
    """(grain dataset of encoded examples, whether it is map-style before encoding)."""
    data, columns, streamed, where = read_source(src, opts, part)
    fmt = formats.detect_format(columns, src.data_format, src.column_map, where)
    kind = formats.FORMATS[fmt].kind
    if kind not in ("chat", "text"):
        raise DataError(f"{where} is in data_format={fmt}, which supervised fine-tuning cannot "
                        f"train on (it is for {'DPO' if kind == 'preference' else 'GRPO'}); "
                        f"choose a data set with responses, or set data_format=")
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer has no chat_template, needed for data_format={fmt}; "
                        f"use a chat/instruct tokenizer or data_format=text")
    encoder = ExampleEncoder(tokenizer, fmt, formats.fields_of(fmt, columns, src.column_map),
                             opts, stats)
    if not streamed:
        ds = grain.MapDataset.source(data)
        if train:
            ds = ds.shuffle(seed=opts.seed).repeat(opts.num_epochs)
        return ds.map(encoder).filter(lambda x: x is not None), True
    if train:
        data = data.shuffle(seed=opts.seed, buffer_size=10_000)
    return StreamDataset(data).map(encoder).filter(lambda x: x is not None), False


def build_dataset(sources: Sequence[Source], opts: DataOptions, tokenizer, batch_size: int, *,
                  train: bool, part: str = "all", stats: DataStats | None = None
                  ) -> tuple[grain.IterDataset, DataStats]:
    """A grain IterDataset of fixed-shape batches of `batch_size` sequences.

    train=True: shuffled, repeated num_epochs times (forever when None), sources mixed by
    weight, incomplete final batch dropped. train=False: data order, one pass, sources one
    after another, the final batch padded with empty rows.
    """
    stats = stats or DataStats()
    parts = [source_examples(s, opts, tokenizer, stats, train=train, part=part)
             for s in sources]
    # Rows are read and encoded in the prefetch thread below: tokenizing and rendering hold
    # the GIL, so reader threads only contend with each other and with the trainer.
    read = grain.ReadOptions(num_threads=0)
    if len(parts) == 1:
        ds, mapped = parts[0]
        ds = ds.to_iter_dataset(read) if mapped else ds
    elif not train and all(m for _, m in parts):
        ds = grain.MapDataset.concatenate([d for d, _ in parts]).to_iter_dataset(read)
    else:
        members = {s.name: (d.to_iter_dataset(read) if m else d)
                   for s, (d, m) in zip(sources, parts, strict=True)}
        ds = grain.IterDataset.mix(members, {s.name: s.weight for s in sources})

    length = opts.max_length
    if opts.packing:
        lengths = {k: length for k in FEATURES}
        if opts.packing_strategy == "concat_then_split":
            ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct=lengths)
        else:
            pack = (grain_exp.BestFitPackIterDataset if opts.packing_strategy == "best_fit"
                    else grain_exp.FirstFitPackIterDataset)
            ds = pack(ds, length_struct=lengths, num_packing_bins=max(batch_size, 16),
                      seed=opts.seed, shuffle_bins=train)
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


def first_batch_or_error(dataset, stats: DataStats | None, what: str) -> None:
    """Reads one batch so an empty or fully-skipped data set fails before compilation."""
    try:
        next(iter(dataset))
    except StopIteration:
        detail = ""
        if stats is not None and stats.dropped:
            reason, _ = stats.bad.most_common(1)[0]
            detail = (f"; all {stats.dropped} rows were skipped (most as {reason}: "
                      f"{stats.examples[reason]})")
        raise DataError(f"the {what} data yields no batch{detail}; check the data set, "
                        f"data_format and max_target_length") from None
    if stats is not None:  # counts restart with the real iteration
        stats.reset()
