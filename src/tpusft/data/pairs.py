"""The preference tail of the data layer: encoded pairs -> fixed-shape batches of pairs, each
pair's prompt held (and computed) once.

A pair's row holds its shared prompt, then the chosen response, then the rejected one:
  inputs       [batch, max_target_length] the row's tokens (0 after them)
  positions    each token's position in its own sequence: the rejected response continues from
               the prompt's end, as the chosen one does
  segment_ids  1 the prompt, 2 the chosen response, 3 the rejected one, 0 padding; a response
               attends to the prompt and to itself only (models/attention.py: branch_mask), so
               each side sees exactly what it would alone
and the scored predictions, one slot per response token (the rest weight 0):
  score_index  [batch, max_target_length] the row position whose output predicts the token
               (both responses' first tokens are predicted from the prompt's last position)
  targets      the token
  weights      1.0 on a response token
  sides        0 chosen, 1 rejected
So the two sides of a pair are always in the same batch and on the same device, the prompt's
layers run once, and the output layer runs on response tokens only. An eval batch is filled up
to its size with empty pairs (all weights 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from tpusft.data import encoders, pipeline
from tpusft.data.packing import pad_batch
from tpusft.data.pipeline import DataOptions, DataStats, Source

SIDES = ("chosen", "rejected")
PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids of a row's parts


def _tokens(side: dict) -> tuple[np.ndarray, np.ndarray]:
    """A side's whole token sequence and which of its tokens are trained."""
    return (np.append(side["inputs"], side["targets"][-1]),
            np.append(False, side["weights"] > 0))


def pair_row(pair: dict, length: int) -> dict:
    """One pair (PairEncoder's output) as a row of `length` slots."""
    k = pair["shared"]
    (ids_c, trained_c), (ids_r, trained_r) = (_tokens(pair[s]) for s in SIDES)
    n_c, n_r = len(ids_c), len(ids_r)
    n = n_c + n_r - k
    row = {"inputs": np.zeros(length, np.int32), "positions": np.zeros(length, np.int32),
           "segment_ids": np.zeros(length, np.int32)}
    row["inputs"][:n] = np.concatenate([ids_c, ids_r[k:]])
    row["positions"][:n] = np.concatenate([np.arange(n_c), np.arange(k, n_r)])
    row["segment_ids"][:n] = np.repeat([PROMPT, CHOSEN, REJECTED], [k, n_c - k, n_r - k])
    # Token j of a side is predicted from the row position holding its token j - 1.
    j_c = np.flatnonzero(trained_c)
    j_r = np.flatnonzero(trained_r)
    where_r = np.where(j_r - 1 < k, j_r - 1, n_c + (j_r - 1 - k))
    scored = len(j_c) + len(j_r)
    out = {"score_index": np.zeros(length, np.int32), "targets": np.zeros(length, np.int32),
           "weights": np.zeros(length, np.float32), "sides": np.zeros(length, np.int32)}
    out["score_index"][:scored] = np.concatenate([j_c - 1, where_r])
    out["targets"][:scored] = np.concatenate([ids_c[j_c], ids_r[j_r]])
    out["weights"][:scored] = 1.0
    out["sides"][:scored] = np.repeat([0, 1], [len(j_c), len(j_r)])
    return {**row, **out}


def build_dataset(sources: Sequence[Source], opts: DataOptions, tokenizer, batch_size: int, *,
                  train: bool, part: str = "all", stats: DataStats | None = None
                  ) -> tuple[grain.IterDataset, DataStats]:
    """Batches of `batch_size` pairs. train=True: shuffled, repeated, sources mixed by weight,
    the incomplete final batch dropped; train=False: data order, one pass, padded."""
    stats = stats or DataStats()
    ds = pipeline.mixed_examples(
        sources, opts, encoders.factory(encoders.PairEncoder, tokenizer, opts, stats),
        train=train, part=part)
    ds = ds.map(lambda pair: pair_row(pair, opts.max_length))
    ds = ds.batch(batch_size, drop_remainder=train)
    if not train:
        ds = ds.map(lambda b: pad_batch(b, batch_size))
    return pipeline.prefetched(ds), stats


def side_tokens(batch: dict, side: int) -> np.ndarray:
    """[batch] scored tokens of one side (0 chosen, 1 rejected) in each pair."""
    return np.sum(batch["weights"] * (batch["sides"] == side), axis=-1)


def real_pairs(batch: dict) -> int:
    """Pairs of a batch that are not eval padding."""
    return int(np.count_nonzero(side_tokens(batch, 0) > 0))
