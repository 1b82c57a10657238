"""The preference tail of the data layer: encoded pairs -> fixed-shape batches of pairs.

Every feature is [batch, 2, max_target_length]: index 0 of the second axis is the chosen
sequence and 1 the rejected one, each the prompt followed by its response alone in its row
(so a pair's two sides are always in the same batch and on the same device):
  inputs, targets (inputs shifted by one), weights (1.0 on response tokens), segment_ids
  (1 on real tokens, 0 on padding), positions.
An eval batch is filled up to its size with empty pairs (all weights 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from tpusft.data import encoders, pipeline
from tpusft.data.packing import pad_batch, pad_example
from tpusft.data.pipeline import DataOptions, DataStats, Source

SIDES = ("chosen", "rejected")


def _pair_row(pair: dict, length: int) -> dict:
    rows = [pad_example(pair[side], length) for side in SIDES]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def build_dataset(sources: Sequence[Source], opts: DataOptions, tokenizer, batch_size: int, *,
                  train: bool, part: str = "all", stats: DataStats | None = None
                  ) -> tuple[grain.IterDataset, DataStats]:
    """Batches of `batch_size` pairs. train=True: shuffled, repeated, sources mixed by weight,
    the incomplete final batch dropped; train=False: data order, one pass, padded."""
    stats = stats or DataStats()
    ds = pipeline.mixed_examples(
        sources, opts, encoders.factory(encoders.PairEncoder, tokenizer, opts, stats),
        train=train, part=part)
    ds = ds.map(lambda pair: _pair_row(pair, opts.max_length))
    ds = ds.batch(batch_size, drop_remainder=train)
    if not train:
        ds = ds.map(lambda b: pad_batch(b, batch_size))
    return pipeline.prefetched(ds), stats


def real_pairs(batch: dict) -> int:
    """Pairs of a batch that are not eval padding."""
    return int(np.count_nonzero(batch["weights"][:, 0].sum(-1) > 0))
