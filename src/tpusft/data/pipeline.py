"""The data front end every training method shares: Hugging Face datasets -> grain examples.

Each source (one data set, or each member of a weighted mixture) is read, cut to max_samples,
split off an eval fraction, sharded by process, its format detected from the columns and
checked against what the method trains on, shuffled and repeated; then each row goes through
the method's encoder (encoders.py: rows become examples through formats.py, then token ids
with a loss mask through chat.py; over-length examples are truncated or dropped and bad rows
counted), and sources are mixed by weight with grain.
Local files load as map-style datasets (exact, cheap resume: the iterator state is an index);
hub data sets are streamed (resume through the stream's own state_dict).

The tails turn examples into each method's batches: packing.py (SFT: packed sequences),
prompts.py (GRPO: prompt batches), pairs.py (DPO: chosen/rejected pairs).
"""

from __future__ import annotations

import glob
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import grain.experimental as grain_exp

from tpusft.data import formats
from tpusft.errors import DataError

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

    def snapshot(self) -> dict:
        with self._lock:
            return {"rows": self.rows, "truncated": self.truncated, "bad": dict(self.bad),
                    "examples": dict(self.examples)}

    @classmethod
    def combined(cls, snapshots: Sequence[dict]) -> DataStats:
        """The counts of several processes' pipelines (their `snapshot()`s) added up."""
        out = cls()
        for snap in snapshots:
            out.rows += snap["rows"]
            out.truncated += snap["truncated"]
            out.bad.update(snap["bad"])
            for reason, example in snap["examples"].items():
                out.examples.setdefault(reason, example)
        return out

    def reasons(self) -> str:
        """The skip reasons with their counts and the first example of the commonest."""
        if not self.bad:
            return "no row was read"
        (top, _), *_ = self.bad.most_common(1)
        counts = ", ".join(f"{n} x {reason}" for reason, n in self.bad.most_common())
        return f"{counts} (e.g. {self.examples[top]})"

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


def _as_text(builder: str, files: list[str]) -> dict:
    """CSV cells stay the strings they are ("007", "12", "NA"): every column is read as text
    instead of pandas' inferred numbers and missing values."""
    if builder != "csv" or not files:
        return {}
    import csv

    import datasets
    from etils import epath

    with epath.Path(files[0]).open() as f:
        header = next(csv.reader(f), None)
    if not header:
        return {}
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}),
            "keep_default_na": False}


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
            return datasets.load_dataset(builder, data_files=files, split="train",
                                         **_as_text(builder, files))
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
            ds = datasets.load_dataset(str(local), name=name, split=split)
            _say_ignored_kinds(local, ds)
            return ds
        if hf_path.startswith((".", "/", "~")):
            raise DataError(f"hf_path={hf_path!r} does not exist; check the path")
        return datasets.load_dataset(hf_path, name=name, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (empty files raise StopIteration)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, StopIteration):
            msg = "the file holds no rows"
        what = (f"{key}={data_files}" if hf_path in FILE_BUILDERS and data_files
                else f"split={split!r}")  # file builders read their files, not a split
        raise DataError(f"cannot load data set hf_path={hf_path!r} {what}: "
                        f"{msg[:300]}") from None


# Data file kinds a folder may hold, by the datasets builder that reads them.
_KINDS = {"json": (".json", ".jsonl"), "csv": (".csv",), "parquet": (".parquet",),
          "arrow": (".arrow",), "text": (".txt",)}


def _say_ignored_kinds(folder: Path, ds) -> None:
    """datasets reads one kind of file from a folder; when it holds several, one line says
    which were read and which were left out."""
    counts = {kind: sum(1 for p in folder.rglob("*") if p.suffix in suffixes)
              for kind, suffixes in _KINDS.items()}
    present = {kind: n for kind, n in counts.items() if n}
    read = getattr(ds.info, "builder_name", None)
    if len(present) < 2 or read not in present:
        return
    left = ", ".join(f"{n} {kind} file{'s' * (n > 1)}" for kind, n in present.items()
                     if kind != read)
    print(f"note: data folder {folder} holds several kinds of files: read its "
          f"{present[read]} {read} file{'s' * (present[read] > 1)}, left out {left} "
          f"(datasets reads one kind; hf_path=<kind> hf_data_files=... picks the others)")


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, hf_iterable):
        super().__init__()
        self._hf_ds = hf_iterable
        self._it = iter(self._hf_ds)

    def __next__(self):
        return next(self._it)

    def get_state(self):
        return {"hf_state": self._hf_ds.state_dict()}

    def set_state(self, state):
        self._hf_ds.load_state_dict(state["hf_state"])
        self._it = iter(self._hf_ds)


class StreamDataset(grain.IterDataset):
    """A streamed Hugging Face IterableDataset as a grain IterDataset with resumable state."""

    def __init__(self, hf_iterable):
        super().__init__()
        self._hf = hf_iterable

    def __iter__(self):
        return _StreamIterator(self._hf)


# ------------------------------------------------------------------------- rows
def bad_row(policy: str, stats: DataStats, row: Any, reason: str, detail: str = "") -> None:
    """A row that cannot be used: raises DataError (bad_row_policy=raise) or counts it."""
    if policy == "raise":
        raise DataError(f"bad row ({reason}{': ' + detail if detail else ''}): "
                        f"{str(row)[:200]}; fix the data or set bad_row_policy=skip")
    stats.count_bad(reason, row, detail)


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
    where = (f"data set {src.name!r} ({src.files_key}={src.data_files})"
             if src.hf_path in FILE_BUILDERS and src.data_files
             else f"data set {src.name!r} (split {src.split!r})")
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


def source_examples(src: Source, opts: DataOptions, make_encoder: Callable, *, train: bool,
                    part: str) -> tuple[Any, bool]:
    """(grain dataset of one source's encoded examples, whether it is map-style).

    `make_encoder(fmt, fields)` gives the method's encoder (encoders.py) for the source's
    detected format; the encoder says which kinds of rows its method trains on. train=True:
    shuffled and repeated num_epochs times; otherwise data order, one pass.
    """
    data, columns, streamed, where = read_source(src, opts, part)
    fmt = formats.detect_format(columns, src.data_format, src.column_map, where)
    encoder = make_encoder(fmt, formats.fields_of(fmt, columns, src.column_map))
    encoder.check(where)
    if not streamed:
        ds = grain.MapDataset.source(data)
        if train:
            ds = ds.shuffle(seed=opts.seed).repeat(opts.num_epochs)
        if train and opts.num_epochs is None:  # repeated without end
            return ds.map(_SomeRowUsable(encoder, len(data), where)).filter(_is_example), True
        return ds.map(encoder).filter(_is_example), True
    if train:
        data = data.shuffle(seed=opts.seed, buffer_size=10_000)
    return StreamDataset(data).map(encoder).filter(_is_example), False


def _is_example(x) -> bool:
    return x is not None


class _SomeRowUsable:
    """The encoder of a repeated source: a whole pass over its rows without one usable
    example ends the run with the skip reasons, where the repetition would otherwise look
    for the next example for ever."""

    def __init__(self, encoder: Callable, rows: int, where: str):
        self.encoder, self.rows, self.where = encoder, rows, where
        self.skipped: int | None = 0  # None once a row was usable

    def __call__(self, row):
        example = self.encoder(row)
        if example is not None:
            self.skipped = None
        elif self.skipped is not None:
            self.skipped += 1
            if self.skipped >= self.rows:
                stats = getattr(self.encoder, "stats", None)
                why = stats.reasons() if stats is not None else "every row is skipped"
                raise DataError(f"{self.where}: none of its {self.rows} rows is usable: {why}; "
                                f"check data_format, the columns and max_target_length")
        return example


def mixed_examples(sources: Sequence[Source], opts: DataOptions, make_encoder: Callable, *,
                   train: bool, part: str = "all") -> grain.IterDataset:
    """Every source's encoded examples as one grain IterDataset: train=True mixes the sources
    by weight (grain's mixing, exact-resume state included); otherwise they follow one another
    in data order."""
    parts = [source_examples(s, opts, make_encoder, train=train, part=part) for s in sources]
    # Rows are read and encoded in the consumer's thread (the tails prefetch in one background
    # thread): tokenizing and rendering hold the GIL, so reader threads would only contend.
    read = grain.ReadOptions(num_threads=0)
    if len(parts) == 1:
        ds, mapped = parts[0]
        return ds.to_iter_dataset(read) if mapped else ds
    if not train and all(m for _, m in parts):
        return grain.MapDataset.concatenate([d for d, _ in parts]).to_iter_dataset(read)
    members = {s.name: (d.to_iter_dataset(read) if m else d)
               for s, (d, m) in zip(sources, parts, strict=True)}
    # Streamed members have no concatenation in grain: eval interleaves them by weight.
    return grain.IterDataset.mix(members, {s.name: s.weight for s in sources})


def prefetched(ds: grain.IterDataset) -> grain.IterDataset:
    """Builds the next batches in a background thread while the device computes; the
    iterator state still counts only the batches handed out."""
    return grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


def first_batch_or_error(dataset, stats: DataStats | None, what: str) -> None:
    """Reads one batch so an empty or fully-skipped data set fails before compilation."""
    try:
        next(iter(dataset))
    except StopIteration:
        detail = ""
        if stats is not None and stats.dropped:
            detail = f"; all {stats.dropped} rows were skipped: {stats.reasons()}"
        raise DataError(f"the {what} data yields no batch{detail}; check the data set, "
                        f"data_format and max_target_length") from None
    if stats is not None:  # counts restart with the real iteration
        stats.reset()
