"""Data pipeline throughput and packing efficiency on an alpaca-like synthetic set.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 20000] [--max_length 1024]

In one run: writes 20k alpaca-like rows (lognormal instruction/input/output lengths) and a
byte-level BPE tokenizer trained on them with Llama 3's chat layout, then measures
  1. the full tpusft pipeline (format, template, tokenize, mask, pack, batch) in tokens/s,
  2. the same rows through a plain batched `datasets.map` tokenization (no template, no mask,
     no packing) in tokens/s,
  3. the demo trainer's consumption in tokens/s (`train_sft configs/demo/sft.yml`, a short
     run in a fresh process),
and prints the ratios with the targets: pipeline >= 10 x the trainer's consumption, packing
efficiency >= 95%. Then adversarial rows, each alone in a file with a few ordinary rows, in
seconds per MB of row: conversations of 500 to 8,000 turns and single lines of 1 to 10 MB
(the cost should stay flat or fall per MB: linear in the row's size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
             for _ in range(3000)]

    def text(median: float, sigma: float) -> str:
        n = max(1, int(rng.lognormal(np.log(median), sigma)))
        return " ".join(rng.choice(words, size=min(n, 1500))) + "."

    with open(path, "w") as f:
        for _ in range(n):
            row = {"instruction": text(12, 0.6), "input": text(20, 0.8) if rng.random() < 0.4
                   else "", "output": text(60, 0.9)}
            f.write(json.dumps(row) + "\n")


def train_tokenizer(rows: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tpusft.demo.arithmetic import CHAT_TEMPLATE

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<pad>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    lines = [json.loads(x)["output"] for x in rows.read_text().splitlines()[:5000]]
    tk.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))


def pipeline_speed(rows: Path, tokenizer, max_length: int, batch: int) -> tuple[float, float]:
    """(non-padding tokens/s, packing efficiency) over one pass of the rows."""
    from tpusft.data import packing
    from tpusft.data.pipeline import DataOptions, Source

    ds, stats = packing.build_dataset(
        [Source("alpaca", "json", data_files=str(rows))],
        DataOptions(max_length=max_length, num_epochs=1), tokenizer, batch, train=True)
    it = iter(ds)
    next(it)  # start-up (file load, threads) is not throughput
    t0, tokens, slots = time.perf_counter(), 0, 0
    for b in it:
        tokens += int(np.count_nonzero(b["segment_ids"]))
        slots += b["segment_ids"].size
    dt = time.perf_counter() - t0
    if stats.dropped:
        print(f"  ({stats.summary()})")
    return tokens / dt, tokens / slots


def datasets_map_speed(rows: Path, tokenizer) -> float:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(rows), split="train")
    t0 = time.perf_counter()
    out = ds.map(lambda b: tokenizer([f"{i}\n\n{x}\n\n{o}" for i, x, o in
                                      zip(b["instruction"], b["input"], b["output"], strict=True)]),
                 batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                 keep_in_memory=True)
    tokens = sum(len(x) for x in out["input_ids"])
    return tokens / (time.perf_counter() - t0)


def adversarial_cost(work: Path, tokenizer, max_length: int) -> list[tuple[str, float, float]]:
    """(row, MB, seconds for one pass over it and 8 ordinary rows) for growing rows."""
    from tpusft.data import packing
    from tpusft.data.pipeline import DataOptions, Source

    ordinary = [{"messages": [{"role": "user", "content": "what is 2+2?"},
                              {"role": "assistant", "content": "4"}]}] * 8
    cases = []
    for turns in (500, 2000, 8000):
        messages = []
        for i in range(turns // 2):
            messages += [{"role": "user", "content": f"question {i} about the weather"},
                         {"role": "assistant", "content": f"answer {i}: it is sunny"}]
        cases.append((f"{turns:,} turns", {"messages": messages}))
    for mb in (1, 4, 10):
        cases.append((f"one {mb} MB line", {"messages": [
            {"role": "user", "content": "word " * (mb * 2**20 // 5)},
            {"role": "assistant", "content": "ok"}]}))
    out = []
    for name, row in cases:
        path = work / "adversarial.jsonl"
        text = json.dumps(row) + "\n"
        path.write_text(text + "".join(json.dumps(r) + "\n" for r in ordinary))
        t0 = time.perf_counter()
        ds, stats = packing.build_dataset(
            [Source("adv", "json", data_files=str(path))],
            DataOptions(max_length=max_length, num_epochs=1), tokenizer, 4, train=True)
        for _ in ds:
            pass
        out.append((name, len(text) / 2**20, time.perf_counter() - t0, stats.summary()))
    return out


def trainer_speed(work: Path, steps: int) -> float:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-m", "tpusft.train_sft", "configs/demo/sft.yml",
         f"base_output_directory={work}", f"steps={steps}", f"log_period={steps // 2}",
         "eval_interval=0", "enable_checkpointing=false", "run_name=bench"],
        cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"demo trainer failed:\n{proc.stderr[-3000:]}")
    speeds = re.findall(r"\| ([\d,]+) tokens/s", proc.stdout)
    return float(speeds[-1].replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--trainer_steps", type=int, default=60)
    a = p.parse_args()
    from tpusft.data.chat import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="tpusft-data-bench-") as tmp:
        work = Path(tmp)
        rows = work / "alpaca.jsonl"
        write_rows(rows, a.rows)
        train_tokenizer(rows, work / "tokenizer")
        tok = load_tokenizer(str(work / "tokenizer"))
        print(f"{a.rows} alpaca-like rows; batches of {a.batch} x {a.max_length} tokens, "
              f"best-fit packing")
        speed, efficiency = pipeline_speed(rows, tok, a.max_length, a.batch)
        print(f"tpusft pipeline:        {speed:12,.0f} tokens/s (format, template, tokenize, "
              f"mask, pack, batch)")
        plain = datasets_map_speed(rows, tok)
        print(f"plain datasets.map:     {plain:12,.0f} tokens/s (tokenize only) -> pipeline = "
              f"{speed / plain:.2f} x")
        trainer = trainer_speed(work, a.trainer_steps)
        print(f"demo trainer consumes:  {trainer:12,.0f} tokens/s -> pipeline = "
              f"{speed / trainer:.1f} x (target >= 10: "
              f"{'met' if speed >= 10 * trainer else 'NOT met'})")
        print(f"packing efficiency:     {100 * efficiency:11.1f} % (target >= 95%: "
              f"{'met' if efficiency >= 0.95 else 'NOT met'})")
        print("adversarial rows (one pass over the row and 8 ordinary rows):")
        results = {"pipeline_tokens_per_s": speed, "datasets_map_tokens_per_s": plain,
                   "trainer_tokens_per_s": trainer, "packing_efficiency": efficiency,
                   "adversarial": []}
        for name, mb, seconds, summary in adversarial_cost(work, tok, a.max_length):
            print(f"  {name:>16}: {mb:6.2f} MB in {seconds:6.2f} s = {seconds / mb:6.2f} s/MB "
                  f"({summary})")
            results["adversarial"].append({"row": name, "mb": mb, "seconds": seconds})
        out = REPO / "benchmarks" / "results" / "data_pipeline-cpu.json"
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
