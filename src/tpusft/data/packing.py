"""The SFT tail of the data layer: encoded examples -> packed (or padded) fixed-shape batches.

Every batch has fixed shapes [batch, max_target_length]:
  inputs, targets (inputs shifted by one within each example), weights (1.0 where the target
  is trained), segment_ids (0 = padding, 1.. = packed example), positions (per example).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import grain.experimental as grain_exp
import numpy as np

from tpusft.data import encoders, pipeline
from tpusft.data.pipeline import DataOptions, DataStats, Source

FEATURES = ("inputs", "targets", "weights")


def pad_example(ex: dict, length: int) -> dict:
    """One example alone in a row of `length` slots."""
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


def pad_batch(batch: dict, size: int) -> dict:
    """A final eval batch filled up to `size` rows with empty (all-padding) rows."""
    n = len(batch["inputs"])
    if n == size:
        return batch
    return {k: np.pad(v, [(0, size - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def packing_efficiency(batch: dict) -> float:
    """Fraction of the batch's token slots that hold a real token (not padding)."""
    segs = batch["segment_ids"]
    return float(np.count_nonzero(segs)) / segs.size


def build_dataset(sources: Sequence[Source], opts: DataOptions, tokenizer, batch_size: int, *,
                  train: bool, part: str = "all", stats: DataStats | None = None
                  ) -> tuple[grain.IterDataset, DataStats]:
    """A grain IterDataset of fixed-shape batches of `batch_size` sequences.

    train=True: shuffled, repeated num_epochs times (forever when None), sources mixed by
    weight, incomplete final batch dropped. train=False: data order, one pass, sources one
    after another, the final batch padded with empty rows.
    """
    stats = stats or DataStats()
    ds = pipeline.mixed_examples(
        sources, opts, encoders.factory(encoders.SftEncoder, tokenizer, opts, stats),
        train=train, part=part)
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
        ds = ds.map(lambda ex: pad_example(ex, length))
    ds = ds.batch(batch_size, drop_remainder=train)
    if not train:
        ds = ds.map(lambda b: pad_batch(b, batch_size))
    return pipeline.prefetched(ds), stats
