"""What the model will be trained on, before training: `python -m tpusft.data CONFIG k=v`.

Prints a few examples rendered with their trained tokens marked, the token length
distribution, packing efficiency over the first batches and the bad-row counts.
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


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config
    from tpusft.data import pipeline, sources
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import arithmetic

    cfg = load_config(argv)
    if cfg.demo_task:
        arithmetic.apply_to_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    srcs, part = sources.sources(cfg, train=True)
    opts = sources.options(cfg, train=True)
    color = sys.stdout.isatty()
    print(f"data: {', '.join(f'{s.name} ({s.hf_path}, weight {s.weight:g})' for s in srcs)}; "
          f"max_target_length {cfg.max_target_length}, truncation {cfg.truncation}, "
          f"packing {cfg.packing_strategy if cfg.packing else 'off'}")
    if not color:
        print("trained tokens are shown [[like this]]")

    # Examples one by one, in data order, from each source.
    stats = pipeline.DataStats(lengths=[])
    shown = 0
    for src in srcs:
        examples, mapped = pipeline.source_examples(src, opts, tokenizer, stats, train=False,
                                                    part=part)
        examples = examples.to_iter_dataset() if mapped else examples
        for n, ex in enumerate(itertools.islice(examples, LENGTH_SAMPLE // len(srcs))):
            if n < cfg.inspect_examples:
                ids = np.append(ex["inputs"], ex["targets"][-1])
                trained = np.append(False, ex["weights"] > 0)
                print(f"\n--- {src.name} example {n + 1}: {len(ids)} tokens, "
                      f"{int(trained.sum())} trained ---")
                print(mark_trained(tokenizer, ids, trained, color))
                shown += 1
    print()
    if stats.lengths:
        print(f"token lengths of {_percentiles(stats.lengths, cfg.max_target_length)}")
    print(f"rows: {stats.summary()}")

    # Packing over the first batches of the training pipeline itself.
    train_ds, _ = pipeline.build_dataset(srcs, opts, tokenizer, cfg.global_batch_size,
                                         train=True, part=part)
    batches = list(itertools.islice(train_ds, PACKING_BATCHES))
    if not batches:
        print("the training data yields no batch")
        return 2
    efficiency = float(np.mean([pipeline.packing_efficiency(b) for b in batches]))
    examples = int(sum(np.sum(b["positions"] == 0, where=b["segment_ids"] > 0)
                       for b in batches))
    print(f"packing: {100 * efficiency:.1f}% of token slots hold tokens over the first "
          f"{len(batches)} batches of {cfg.global_batch_size} x {cfg.max_target_length} "
          f"({examples / (len(batches) * cfg.global_batch_size):.2f} examples per sequence)")
    return 0
