"""What the model will be trained on, before training: `python -m tpusft.data CONFIG k=v`.

Prints a few examples with their trained tokens marked (preference pairs: both sides; GRPO
prompts: the rendered prompt), the token length distribution, packing efficiency (pairs: the
share of token slots used) over the first batches and the bad-row counts.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import numpy as np

LENGTH_SAMPLE = 2000   # examples measured for the length distribution
PACKING_BATCHES = 20   # batches measured for packing efficiency


def mark_trained(tokenizer, ids: np.ndarray, trained: np.ndarray, color: bool) -> str:
    """The decoded tokens, with runs of trained tokens in green (tty) or [[...]]."""
    out = []
    pairs = zip(ids.tolist(), trained.tolist(), strict=True)
    for flag, run in itertools.groupby(pairs, key=lambda t: t[1]):
        text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False)
        if flag:
            text = f"\x1b[30;42m{text}\x1b[0m" if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def _percentiles(lengths: list[int], limit: int) -> str:
    a = np.asarray(lengths)
    p = np.percentile(a, [50, 90, 99]).astype(int)
    over = float(np.mean(a > limit + 1))
    return (f"{len(a)} examples: min {a.min()}, median {p[0]}, p90 {p[1]}, p99 {p[2]}, "
            f"max {a.max()} tokens; {100 * over:.1f}% longer than max_target_length={limit}")


def _shown(tokenizer, ex: dict, color: bool) -> tuple[str, int, int]:
    """(marked text, tokens, trained tokens) of one encoded sequence."""
    ids = np.append(ex["inputs"], ex["targets"][-1])
    trained = np.append(False, ex["weights"] > 0)
    return mark_trained(tokenizer, ids, trained, color), len(ids), int(trained.sum())


def _data_kind(srcs, cfg) -> str:
    """The data-format kind of the first source ("sft", "preference", "prompt"), detected from
    its columns as the trainers do."""
    from tpusft.data import formats, pipeline

    src = srcs[0]
    opts = pipeline.DataOptions(max_length=cfg.max_target_length, shard_index=0, shard_count=1)
    _, columns, _, where = pipeline.read_source(src, opts, "all")
    return formats.FORMATS[formats.detect_format(columns, src.data_format, src.column_map,
                                                 where)].kind


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config

    cfg = load_config(argv)  # before the data libraries are imported: a bad key costs 0.3 s
    from tpusft import methods
    from tpusft.data import sources
    from tpusft.data.chat import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer_path)
    srcs, part = sources.sources(cfg, train=True)
    method = methods.for_data(_data_kind(srcs, cfg))
    return method.inspect(cfg, tokenizer, srcs, sources.options(cfg, train=True), part,
                          sys.stdout.isatty())


def _header(cfg, srcs, packed: str, color: bool) -> None:
    print(f"data: {', '.join(f'{s.name} ({s.hf_path}, weight {s.weight:g})' for s in srcs)}; "
          f"max_target_length {cfg.max_target_length}, truncation {cfg.truncation}, "
          f"packing {packed}")
    if not color:
        print("trained tokens are shown [[like this]]")


def _examples(cfg, tokenizer, srcs, opts, part, encoder, encoder_opts, stats):
    """(source, index, example) of the first examples of each source, in data order; the
    first `inspect_examples` of each are to be shown, the rest only measured."""
    from tpusft.data import encoders, pipeline

    make = encoders.factory(encoder, tokenizer, encoder_opts, stats)
    for src in srcs:
        examples, mapped = pipeline.source_examples(src, opts, make, train=False, part=part)
        examples = examples.to_iter_dataset() if mapped else examples
        for n, ex in enumerate(itertools.islice(examples, LENGTH_SAMPLE // len(srcs))):
            yield src, n, ex


def _first_batches(cfg, tokenizer, srcs, opts, part, build) -> tuple[list, float]:
    """The training pipeline's first batches and the share of their token slots that hold
    tokens; no batches (said in one line) when the data yields none."""
    from tpusft.data import packing

    train_ds, _ = build(srcs, opts, tokenizer, cfg.global_batch_size, train=True, part=part)
    batches = list(itertools.islice(train_ds, PACKING_BATCHES))
    if not batches:
        print("the training data yields no batch")
        return [], 0.0
    return batches, float(np.mean([packing.packing_efficiency(b) for b in batches]))


def _tail(cfg, stats) -> None:
    print()
    if stats.lengths:
        print(f"token lengths of {_percentiles(stats.lengths, cfg.max_target_length)}")
    print(f"rows: {stats.summary()}")


def sft_rows(cfg, tokenizer, srcs, opts, part, color: bool) -> int:
    """SFT / CPT rows: examples with their trained tokens marked, lengths, and packing over the
    training pipeline's first batches."""
    from tpusft.data import encoders, packing, pipeline

    _header(cfg, srcs, cfg.packing_strategy if cfg.packing else "off", color)
    stats = pipeline.DataStats(lengths=[])
    for src, n, ex in _examples(cfg, tokenizer, srcs, opts, part, encoders.SftEncoder, opts,
                                stats):
        if n < cfg.inspect_examples:
            text, total, trained = _shown(tokenizer, ex, color)
            print(f"\n--- {src.name} example {n + 1}: {total} tokens, {trained} trained ---")
            print(text)
    _tail(cfg, stats)
    batches, efficiency = _first_batches(cfg, tokenizer, srcs, opts, part,
                                         packing.build_dataset)
    if not batches:
        return 2
    examples = int(sum(np.sum(b["positions"] == 0, where=b["segment_ids"] > 0)
                       for b in batches))
    print(f"packing: {100 * efficiency:.1f}% of token slots hold tokens over the first "
          f"{len(batches)} batches of {cfg.global_batch_size} x {cfg.max_target_length} "
          f"({examples / (len(batches) * cfg.global_batch_size):.2f} examples per sequence)")
    return 0


def preference_rows(cfg, tokenizer, srcs, opts, part, color: bool) -> int:
    """Preference pairs: both sides with their trained tokens marked, lengths, and the share of
    token slots used over the first batches."""
    from tpusft.data import encoders, pairs, pipeline

    _header(cfg, srcs, "off", color)
    stats = pipeline.DataStats(lengths=[])
    for src, n, ex in _examples(cfg, tokenizer, srcs, opts, part, encoders.PairEncoder, opts,
                                stats):
        if n < cfg.inspect_examples:
            for side in pairs.SIDES:
                text, total, trained = _shown(tokenizer, ex[side], color)
                print(f"\n--- {src.name} pair {n + 1}, {side}: {total} tokens, "
                      f"{trained} trained ---")
                print(text)
    _tail(cfg, stats)
    batches, efficiency = _first_batches(cfg, tokenizer, srcs, opts, part, pairs.build_dataset)
    if not batches:
        return 2
    print(f"padding: {100 * efficiency:.1f}% of token slots hold tokens over the first "
          f"{len(batches)} batches of {cfg.global_batch_size} pairs x 2 x "
          f"{cfg.max_target_length}")
    return 0


def prompt_rows(cfg, tokenizer, srcs, opts, part, color: bool) -> int:
    """GRPO prompts: each rendered prompt with its reference answer, and the row counts."""
    from tpusft.data import encoders, pipeline

    _header(cfg, srcs, "off", color)
    stats = pipeline.DataStats(lengths=[])
    for src, n, ex in _examples(cfg, tokenizer, srcs, opts, part, encoders.PromptEncoder,
                                encoders.PromptOptions.from_config(cfg), stats):
        if n < cfg.inspect_examples:
            print(f"\n--- {src.name} prompt {n + 1} (reference answer {ex['answer']!r}) ---")
            print(ex["prompts"])
    print()
    print(f"rows: {stats.summary()}")
    return 0
