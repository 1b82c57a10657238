"""DPO training step side by side: tpusft against TRL's DPOTrainer, on the same Llama shape,
pairs, sequence length and AdamW, in one invocation.

    .venv/bin/python benchmarks/dpo_step.py [--layers 8] [--emb 512] [--batch 4] [--seq 256]
        [--steps 6] [--remat full,minimal] [--rounds 1] [--only tpusft,trl]

Contenders (each in a fresh process, so peak memory is its own):
  tpusft  train_dpo's trainer (Tunix's DPOTrainer with tpusft's loss, reference log-probs and
          data feeding, scanned decoder) on its pair rows (the prompt once, then both
          responses: max_target_length 3 x seq/2), once per
          remat_policy in --remat (full, the default, keeps each layer's input only, as
          gradient checkpointing does; minimal keeps the matmul outputs);
  trl     TRL's DPOTrainer (sigmoid loss, gradient checkpointing) on transformers'
          LlamaForCausalLM with the same pairs as text of one word per token id (a word-level
          tokenizer), so both see the same token ids.
Both are full fine-tunes whose reference model is a frozen copy of the starting weights, with
beta 0.1. Every sequence is exactly --seq tokens (a prompt of seq/2, responses of seq/2 ending
with EOS), so neither pads. Tokens/s counts both sides' tokens (2 x seq a pair, for both
contenders, although tpusft runs the prompt once); the step time is the median
of the steps after the first. Peak memory is the process's peak RSS. With --rounds N every
contender runs N times, in turn, and each figure is the median over the rounds.
Writes the table to stdout and JSON to benchmarks/results/dpo_step-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the SFT benchmark's model, timing and memory helpers)
    _CompileCounter,
    _hf_model,
    _jax_hooks,
    _jax_result,
    _rss_gib,
    _torch_device,
    nnx_state,
    step_timer,
)

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("tpusft", "trl")
PAD, EOS, UNK = 0, 1, 2


def make_pairs(n: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[list, list, list]]:
    """(prompt, chosen, rejected) token ids: seq/2 prompt tokens, seq/2 response tokens each
    (the last one EOS), ids drawn from [3, vocab)."""
    rng = np.random.default_rng(seed)
    half = seq // 2
    out = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, half).tolist()
        sides = [rng.integers(3, vocab, half - 1).tolist() + [EOS] for _ in range(2)]
        out.append((prompt, *sides))
    return out


def row_length(seq: int) -> int:
    """tpusft's max_target_length for these pairs: the prompt and both responses."""
    return 3 * (seq // 2)


def pair_batches(pairs, batch: int, seq: int) -> list[dict]:
    """tpusft's pair rows (data/pairs.py: the prompt once, then both responses), from the
    encoder's view of each pair (every sequence is prompt + response, responses trained)."""
    from tpusft.data import pairs as pairs_lib
    from tpusft.data.chat import Encoded
    from tpusft.data.encoders import shared_prefix, shifted

    rows = []
    for prompt, *responses in pairs:
        sides = [Encoded(np.asarray(prompt + r, np.int32),
                         np.arange(len(prompt) + len(r)) >= len(prompt)) for r in responses]
        pair = {"chosen": shifted(sides[0]), "rejected": shifted(sides[1]),
                "shared": shared_prefix(*sides)}
        rows.append(pairs_lib.pair_row(pair, row_length(seq)))
    return [{k: np.stack([r[k] for r in rows[i:i + batch]]) for k in rows[0]}
            for i in range(0, len(rows) - batch + 1, batch)]


def _cfg(a):
    from tpusft.config import load_config
    from tpusft.config.loader import configs_root

    return load_config([
        str(configs_root() / "demo" / "dpo.yml"), f"base_output_directory={tempfile.mkdtemp()}",
        "demo_task=", "hf_path=json", "hf_data_files=unused", "tokenizer_path=unused",
        "load_parameters_path=", "enable_checkpointing=false", "model_family=llama3",
        f"vocab_size={a.vocab}", f"base_emb_dim={a.emb}", f"base_num_decoder_layers={a.layers}",
        f"base_num_query_heads={a.heads}", f"base_num_kv_heads={a.heads}",
        f"head_dim={a.emb // a.heads}", f"base_mlp_dim={a.mlp}", "rope_max_timescale=10000",
        "dtype=float32", "weight_dtype=float32", f"remat_policy={a.remat}",
        f"global_batch_size={a.batch}", f"max_target_length={row_length(a.seq)}",
        f"steps={a.steps}", "log_period=1000", "eval_interval=0", "learning_rate=1e-6",
        "dpo.beta=0.1", "ici_fsdp_parallelism=1", "ici_data_parallelism=-1"])


def run_tpusft(a) -> dict:
    import grain
    import jax

    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import make_mesh
    from tpusft.training import preference
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.setup import reference_model

    cfg = _cfg(a)
    data = pair_batches(make_pairs(a.batch * a.steps, a.seq, a.vocab), a.batch, a.seq)
    tokens = [2 * a.batch * a.seq] * len(data)  # both sides' tokens, as for TRL
    counter = _CompileCounter()
    mesh = make_mesh(cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism,
                     cfg.ici_tensor_parallelism)
    times: list[float] = []
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, 0)
        ref = reference_model(model)
        jax.block_until_ready(jax.tree.leaves(nnx_state(ref)))
        feeder = preference.batch_feeder(grain.MapDataset.source(data).to_iter_dataset(), cfg)
        trainer = preference.build_trainer(model, ref, make_optimizer(cfg), cfg, feeder)
        trainer.with_training_hooks(_jax_hooks(times))
        start = time.perf_counter()
        trainer.train([])
        jax.block_until_ready(jax.tree.leaves(nnx_state(model)))
        end = time.perf_counter()
    return _jax_result(times, start, end, tokens, counter)


def _tokenizer(vocab: int):
    """One word per token id, split on spaces ("t17 t5 ..."): TRL tokenizes the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK}  # no word contains them
    words = {f"t{i}": i for i in range(len(special), vocab)}
    tk = Tokenizer(models.WordLevel({**special, **words}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def run_trl(a) -> dict:
    import datasets
    from trl import DPOConfig, DPOTrainer

    device = _torch_device()

    def text(ids):
        return " ".join("<eos>" if i == EOS else f"t{i}" for i in ids)

    pairs = make_pairs(a.batch * a.steps, a.seq, a.vocab)
    # TRL appends EOS itself to responses that lack it; ours already end with it.
    ds = datasets.Dataset.from_dict({"prompt": [text(p) + " " for p, _, _ in pairs],
                                     "chosen": [text(c) for _, c, _ in pairs],
                                     "rejected": [text(r) for _, _, r in pairs]})
    times: list[float] = []
    config = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=a.steps,
                       per_device_train_batch_size=a.batch, max_length=a.seq, beta=0.1,
                       learning_rate=1e-6, weight_decay=0.0, lr_scheduler_type="constant",
                       logging_steps=1000, save_strategy="no", report_to=[],
                       use_cpu=device.type == "cpu", dataloader_num_workers=0,
                       disable_tqdm=True, gradient_checkpointing=True)
    model = _hf_model(a)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen starting copy
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=ds,
                         processing_class=_tokenizer(a.vocab), callbacks=[step_timer(times)])
    first = trainer.train_dataset[0]
    got = len(first["prompt_ids"]) + len(first["chosen_ids"])
    assert got == a.seq, f"TRL tokenized {got} tokens, not {a.seq}: {first}"
    trainer.train()
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]),
            "tokens_per_step": 2 * a.batch * a.seq, "steps": len(times)}


def worker(a) -> None:
    result = {"tpusft": run_tpusft, "trl": run_trl}[a.worker](a)
    result["peak_rss_gib"] = _rss_gib()
    Path(a.out).write_text(json.dumps(result))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--emb", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--remat", default="full,minimal", help="tpusft's remat policies")
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.tied = False
    a.kv_heads = a.heads
    a.dtype = "float32"
    return a


def main() -> None:
    a = parse_args()
    if a.worker:
        worker(a)
        return
    import jax

    from tpusft.launch import tcmalloc_env

    env = tcmalloc_env() or dict(os.environ)
    allocator = "tcmalloc" if "LD_PRELOAD" in env else "glibc malloc"
    jobs = []  # (label, worker, remat)
    for name in (n for n in a.only.split(",") if n):
        remats = [r for r in a.remat.split(",") if r] if name == "tpusft" else ["full"]
        jobs += [(f"{name}, remat {r}" if name == "tpusft" else name, name, r) for r in remats]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in jobs}
    for _ in range(a.rounds):
        for label, name, remat in jobs:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, *sys.argv[1:], f"--remat={remat}",
                       f"--worker={name}", f"--out={f.name}"]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(f"{label} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                runs[label].append(json.loads(Path(f.name).read_text()))
    results = {}
    for name, rs in runs.items():
        if rs:
            results[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            results[name]["tokens_per_s"] = (results[name]["tokens_per_step"]
                                             / results[name]["step_s"])
    device = jax.devices()[0].platform
    params = (a.vocab * a.emb * 2 + a.layers * (4 * a.emb * a.emb + 3 * a.emb * a.mlp))
    print(f"DPO step: Llama shape {a.layers} layers, emb {a.emb}, mlp {a.mlp}, vocab {a.vocab} "
          f"(~{params / 1e6:.0f}M parameters), float32, {a.batch} pairs x 2 x {a.seq} tokens, "
          f"{a.steps} steps, {a.rounds} round(s), {allocator}, {device}")
    print("| contender | pairs/s | tokens/s | step s | first step s | peak RSS GiB | tpusft x |")
    print("|---|---|---|---|---|---|---|")
    base = next((r for label, r in results.items() if label.startswith("tpusft")), None)
    for name, r in results.items():
        ratio = base["tokens_per_s"] / r["tokens_per_s"] if base else float("nan")
        print(f"| {name} | {a.batch / r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_s']:.2f} | {r['first_step_s']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{ratio:.2f} |")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dpo_step-{device}.json"
    path.write_text(json.dumps({"device": device, "allocator": allocator, "args": {
        k: v for k, v in vars(a).items() if k not in ("worker", "out")}, "params": params,
        "results": results, "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
