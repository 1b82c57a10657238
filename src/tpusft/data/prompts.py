"""The GRPO tail of the data layer: encoded prompts -> the numpy batches Tunix's learners take,
{"prompts": [B] str, "answer": [B] str}, and the held-out (prompt, answer) pairs."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

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


# Every process reads every prompt: Tunix's rollouts take the same prompts on all of them.
_EVERY_ROW = {"shard_index": 0, "shard_count": 1}


def training_prompts(cfg: Any, tokenizer) -> tuple[grain.IterDataset, dict, DataStats]:
    """(the training batches of global_batch_size prompts, the first batch, their row
    counts); a data set with no usable prompt is a DataError."""
    from tpusft.data import sources
    from tpusft.errors import DataError

    srcs, part = sources.sources(cfg, train=True)
    stats = DataStats()
    ds = train_batches(srcs, PromptOptions.from_config(cfg),
                       dataclasses.replace(sources.options(cfg, train=True), **_EVERY_ROW),
                       tokenizer, cfg.global_batch_size, part, stats)
    try:
        first = next(iter(ds))
    except StopIteration:
        raise DataError(f"no usable prompts in the training data ({stats.summary()})") from None
    return ds, first, stats


def held_out_problems(cfg: Any, tokenizer) -> list[tuple[str, str]]:
    """The first grpo.eval_prompts (prompt, answer) pairs of the eval data (none without)."""
    from tpusft.data import sources

    srcs, part = sources.sources(cfg, train=False)
    if not srcs or not cfg.grpo.eval_prompts:
        return []
    return held_out(srcs, PromptOptions.from_config(cfg),
                    dataclasses.replace(sources.options(cfg, train=False), **_EVERY_ROW),
                    tokenizer, cfg.grpo.eval_prompts, part)
