"""The GRPO tail of the data layer: encoded prompts -> the numpy batches Tunix's learners take,
{"prompts": [B] str, "answer": [B] str}, and the held-out (prompt, answer) pairs."""

from __future__ import annotations

import itertools

import grain
import numpy as np

from tpusft.data import encoders, pipeline
from tpusft.data.encoders import PromptOptions
from tpusft.data.pipeline import DataOptions, DataStats, Source


def train_batches(sources: list[Source], opts: PromptOptions, data_opts: DataOptions,
                  tokenizer, batch_size: int, part: str, stats: DataStats) -> grain.IterDataset:
    """Shuffled, repeated batches of `batch_size` prompts (sources mixed by weight)."""
    ds = pipeline.mixed_examples(
        sources, data_opts, encoders.factory(encoders.PromptEncoder, tokenizer, opts, stats),
        train=True, part=part)
    return ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)


def _stack(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def held_out(sources: list[Source], opts: PromptOptions, data_opts: DataOptions,
             tokenizer, limit: int, part: str) -> list[tuple[str, str]]:
    """Up to `limit` (prompt text, reference answer) pairs, in data order."""
    ds = pipeline.mixed_examples(
        sources, data_opts,
        encoders.factory(encoders.PromptEncoder, tokenizer, opts, DataStats()),
        train=False, part=part)
    return [(ex["prompts"], ex["answer"]) for ex in itertools.islice(ds, limit)]
