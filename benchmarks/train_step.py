"""SFT training step side by side: tpusft against Tunix's own model, TRL and a plain PyTorch
loop, on the same Llama shape, batch, sequence length and data, in one invocation.

    .venv/bin/python benchmarks/train_step.py [--layers 12] [--emb 768] [--batch 4] [--seq 512]
        [--steps 6] [--remat minimal,full] [--rounds 1] [--dtype float32]
        [--only tpusft-packed,tpusft-unpacked,tunix,torch,trl]
    .venv/bin/python benchmarks/train_step.py --preset llama-1b   # GPU/TPU: bf16, seq 2048

Contenders (each in a fresh process, so peak memory is its own):
  tpusft-packed    tpusft's trainer (Tunix PeftTrainer + tpusft's loss, data feeding, scanned
                   decoder) on rows packed full of examples of random length, once per
                   remat_policy in --remat (minimal keeps matmul outputs, as a loop without
                   checkpointing keeps everything; full, configs/base.yml's default, keeps
                   each layer's input only);
  tpusft-unpacked  the same on one example per row, padded (same examples' length law), at the
                   first --remat;
  tunix            Tunix's PeftTrainer with Tunix's own Llama 3 model and default loss, rows
                   full of tokens (causal mask), the same AdamW, and the rematerialisation
                   closest to the first --remat (minimal: per block, full: the decoder layer);
  torch            transformers' LlamaForCausalLM in a plain PyTorch loop, the same AdamW
                   (CUDA when PyTorch sees a GPU);
  trl              TRL's SFTTrainer on the same model and pre-tokenized rows.
With --rounds N every contender runs N times, in turn, and each figure is the median over the
rounds (machines drift; taking turns spreads the drift over all contenders).
Tokens/s counts real (non-padding) tokens. The step time is the median of the steps after the
first; "first step" includes compilation for the JAX contenders (and the compile time XLA
reported is listed beside it). MFU is training FLOPs (6 x matmul parameters + causal
attention) per second over the device's peak: on CPU the best of large matmuls of the
compute dtype (XLA's, and numpy's BLAS for float32) measured before every round and after the
last, in a process like the contenders'; on GPU/TPU the chip's published bf16 peak. Peak
memory is the process's peak RSS (host) and, on accelerators, the device's peak bytes in use.
Writes the table to stdout and JSON to benchmarks/results/train_step-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("tpusft-packed", "tpusft-unpacked", "tunix", "torch", "trl")
# Tunix's Llama 3 rematerialisation closest to tpusft's remat_policy: full keeps each layer's
# input only (Tunix: the whole decoder layer), minimal keeps matmul outputs (Tunix: per block).
TUNIX_REMAT = {"none": "NONE", "minimal": "BLOCK", "full": "DECODER"}


# ------------------------------------------------------------------------- data
def make_rows(n_rows: int, seq: int, vocab: int, packed: bool, seed: int = 0) -> list[dict]:
    """Rows of examples whose lengths follow one law (uniform in [seq/8, seq]): packed fills
    each row with several examples (segment ids, restarting positions); unpacked holds one
    example per row, padded with 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        ids = np.zeros(seq + 1, np.int32)
        seg = np.zeros(seq + 1, np.int32)
        pos = np.zeros(seq + 1, np.int32)
        at, k = 0, 0
        while at < seq + 1:
            length = int(rng.integers(seq // 8, seq + 1))
            length = min(length, seq + 1 - at)
            k += 1
            ids[at:at + length] = rng.integers(1, vocab, length)
            seg[at:at + length] = k
            pos[at:at + length] = np.arange(length)
            at += length
            if not packed:
                break
        same = seg[1:] == seg[:-1]
        rows.append({"inputs": ids[:-1], "targets": ids[1:], "segment_ids": seg[:-1],
                     "positions": pos[:-1],
                     "weights": ((seg[1:] > 0) & same).astype(np.float32)})
    return rows


def batches(rows: list[dict], batch: int) -> list[dict]:
    return [{k: np.stack([r[k] for r in rows[i:i + batch]]) for k in rows[0]}
            for i in range(0, len(rows) - batch + 1, batch)]


# ---------------------------------------------------------------------- workers
def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _device_peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


class _CompileCounter:
    """Counts XLA compilations and their seconds (jax.monitoring)."""

    def __init__(self):
        import jax

        self.events: list[tuple[float, float]] = []  # (wall time, seconds)
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.events.append((time.perf_counter(), duration))


def _jax_hooks(times: list[float]):
    from tunix.sft import hooks

    class Times(hooks.TrainingHooks):
        def on_train_start(self, ctx): pass
        def on_train_end(self, ctx): pass
        def on_train_step_start(self, ctx): times.append(time.perf_counter())
        def on_train_step_end(self, ctx, step, loss): pass
        def on_eval_step_start(self, ctx): pass
        def on_eval_step_end(self, ctx, loss): pass
    return Times()


def _cfg(a, steps: int):
    from tpusft.config import load_config
    from tpusft.config.loader import configs_root

    tmp = tempfile.mkdtemp()
    return load_config([
        str(configs_root() / "demo" / "sft.yml"), f"base_output_directory={tmp}",
        "enable_checkpointing=false", "model_family=llama3", f"vocab_size={a.vocab}",
        f"base_emb_dim={a.emb}", f"base_num_decoder_layers={a.layers}",
        f"base_num_query_heads={a.heads}", f"base_num_kv_heads={a.kv_heads}",
        f"head_dim={a.emb // a.heads}", f"base_mlp_dim={a.mlp}",
        f"logits_via_embedding={str(a.tied).lower()}",
        "rope_max_timescale=10000", f"dtype={a.dtype}", f"weight_dtype={a.dtype}",
        f"remat_policy={a.remat}", f"global_batch_size={a.batch}",
        f"max_target_length={a.seq}", f"steps={steps}", "log_period=1000", "eval_interval=0",
        "warmup_steps_fraction=0", "learning_rate=1e-4", "adam_weight_decay=0.0",
        "ici_fsdp_parallelism=1", "ici_data_parallelism=-1"])


def run_tpusft(a, packed: bool) -> dict:
    import grain
    import jax

    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import make_mesh
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.feeder import BatchFeeder
    from tpusft.training.optimizer import make_optimizer

    cfg = _cfg(a, a.steps)
    data = batches(make_rows(a.batch * a.steps, a.seq, a.vocab, packed), a.batch)
    tokens = [int(np.count_nonzero(b["segment_ids"])) for b in data]
    counter = _CompileCounter()
    mesh = make_mesh(cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism,
                     cfg.ici_tensor_parallelism)
    times: list[float] = []
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, 0)
        jax.block_until_ready(jax.tree.leaves(nnx_state(model)))
        feeder = BatchFeeder(grain.MapDataset.source(data).to_iter_dataset(), 1)
        trainer = trainer_lib.build_trainer(model, make_optimizer(cfg), cfg, feeder)
        trainer.with_training_hooks(_jax_hooks(times))
        start = time.perf_counter()
        trainer.train([])
        jax.block_until_ready(jax.tree.leaves(nnx_state(model)))
        end = time.perf_counter()
    return _jax_result(times, start, end, tokens, counter)


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def _jax_result(times, start, end, tokens, counter) -> dict:
    """Step k's time is from its start to step k+1's start (the loop waits for the previous
    step before dispatching more); the last ends when training returns."""
    bounds = [*times, end]
    steps = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    later = [s for t, s in counter.events if t > bounds[1]]
    step = statistics.median(steps[1:])
    # Steps are dispatched ahead of the device, so the first step's own time is what the whole
    # run took beyond the steady-state steps.
    return {"first_step_s": end - start - step * (len(steps) - 1), "step_s": step,
            "tokens_per_step": statistics.mean(tokens[1:]),
            "compile_s": sum(s for t, s in counter.events if t > start),
            "compiles_after_first_step": len(later), "steps": len(steps)}


def run_tunix(a) -> dict:
    import grain
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from tpusft.training.optimizer import make_optimizer

    cfg = _cfg(a, a.steps)
    rows = make_rows(a.batch * a.steps, a.seq, a.vocab, packed=True)
    data = [{"input_tokens": np.stack([r["inputs"] for r in rows[i:i + a.batch]]),
             "input_mask": np.ones((a.batch, a.seq), bool)}
            for i in range(0, len(rows), a.batch)]
    tokens = [a.batch * a.seq] * len(data)
    counter = _CompileCounter()
    auto = jax.sharding.AxisType.Auto  # Tunix's Llama shards over ("fsdp", "tp")
    mesh = jax.make_mesh((jax.device_count(), 1), ("fsdp", "tp"), axis_types=(auto, auto))
    config = llama.ModelConfig(num_layers=a.layers, vocab_size=a.vocab, embed_dim=a.emb,
                               hidden_dim=a.mlp, num_heads=a.heads, head_dim=a.emb // a.heads,
                               num_kv_heads=a.kv_heads, rope_theta=10000, norm_eps=1e-5,
                               remat_config=llama.RematConfig[TUNIX_REMAT[a.remat]])
    times: list[float] = []
    with mesh:
        model = llama.Llama3(config, rngs=nnx.Rngs(0))
        if a.dtype != "float32":
            state = nnx.state(model)
            nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.dtype(a.dtype)), state))

        def model_input(batch):
            mask = batch["input_mask"]
            return {"input_tokens": batch["input_tokens"], "input_mask": mask,
                    "positions": sft_utils.build_positions_from_mask(mask),
                    "attention_mask": sft_utils.make_causal_attn_mask(mask)}

        trainer = peft_trainer.PeftTrainer(model, make_optimizer(cfg), peft_trainer.TrainingConfig(
            eval_every_n_steps=a.steps + 1, max_steps=a.steps, pbar_description=None))
        trainer.with_gen_model_input_fn(model_input)
        trainer.with_training_hooks(_jax_hooks(times))
        start = time.perf_counter()
        trainer.train(grain.MapDataset.source(data).to_iter_dataset())
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        end = time.perf_counter()
    return _jax_result(times, start, end, tokens, counter)


def _torch_device():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hf_model(a, device=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.emb, intermediate_size=a.mlp,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
                         rope_theta=10000.0, tie_word_embeddings=a.tied)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    return LlamaForCausalLM(config).to(dtype=dtype, device=device)


def run_torch(a) -> dict:
    import torch

    device = _torch_device()
    model = _hf_model(a, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, eps=1e-8)
    rows = make_rows(a.batch * a.steps, a.seq, a.vocab, packed=True)
    times = []
    for i in range(a.steps):
        ids = torch.tensor(np.stack([r["inputs"] for r in rows[i * a.batch:(i + 1) * a.batch]]),
                           dtype=torch.long, device=device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"first_step_s": times[0], "step_s": statistics.median(times[1:]),
           "tokens_per_step": a.batch * a.seq, "steps": len(times)}
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _word_tokenizer(vocab: int):
    """A tokenizer with `vocab` tokens (TRL wants one for padding and end of sequence)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1",
                                   unk_token="t2")


def step_timer(times: list[float]):
    """A transformers TrainerCallback that appends each training step's seconds to `times`."""
    from transformers import TrainerCallback

    class Times(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times[-1] = time.perf_counter() - times[-1]

    return Times()


def run_trl(a) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    device = _torch_device()
    rows = make_rows(a.batch * a.steps, a.seq, a.vocab, packed=True)
    ds = datasets.Dataset.from_dict({"input_ids": [r["inputs"].tolist() for r in rows]})
    times: list[float] = []
    out = tempfile.mkdtemp()
    tokenizer = _word_tokenizer(a.vocab)
    config = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                       max_length=a.seq, packing=False, learning_rate=1e-4, weight_decay=0.0,
                       lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                       report_to=[], use_cpu=device.type == "cpu", bf16=a.dtype == "bfloat16",
                       dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=_hf_model(a), args=config, train_dataset=ds,
                         processing_class=tokenizer, callbacks=[step_timer(times)])
    trainer.train()
    out = {"first_step_s": times[0], "step_s": statistics.median(times[1:]),
           "tokens_per_step": a.batch * a.seq, "steps": len(times)}
    if device.type == "cuda":
        out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def measure_peak(a) -> dict:
    """The CPU's matmul peak in the compute dtype, measured as the contenders run (same
    allocator, same moment): the faster of XLA's matmul and numpy's BLAS (float32 only)."""
    from tpusft.training.metrics import measure_matmul_tflops

    out = {"xla_tflops": measure_matmul_tflops(a.dtype, n=2048, repeats=10)}
    if a.dtype == "float32":
        x = np.ones((2048, 2048), np.float32)
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - t)
        out["blas_tflops"] = 2 * 2048 ** 3 / best / 1e12
    out["tflops"] = max(out.values())
    return out


def worker(a) -> None:
    name = a.worker
    if name == "peak":
        Path(a.out).write_text(json.dumps(measure_peak(a)))
        return
    if name.startswith("tpusft"):
        result = run_tpusft(a, packed=name == "tpusft-packed")
    else:
        result = {"tunix": run_tunix, "torch": run_torch, "trl": run_trl}[name](a)
    result["peak_rss_gib"] = _rss_gib()
    if name.startswith("tpusft") or name == "tunix":
        result["device_peak_gib"] = _device_peak_gib()
    Path(a.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------- main
PRESETS = {  # shape flags a preset sets (explicit flags still win)
    # Llama 3.2 1B's shape (GQA 32/8, tied embeddings), bf16, sequence 2048: the GPU/TPU run.
    "llama-1b": {"layers": 16, "emb": 2048, "heads": 32, "kv_heads": 8, "mlp": 8192,
                 "vocab": 128256, "tied": True, "batch": 4, "seq": 2048, "dtype": "bfloat16",
                 "steps": 8, "only": "tpusft-packed,tunix,torch"},
}


def flops_per_token(a) -> float:
    hd = a.emb // a.heads
    per_layer = 2 * a.emb * a.heads * hd + 2 * a.emb * a.kv_heads * hd + 3 * a.emb * a.mlp
    matmul = a.layers * per_layer + a.emb * a.vocab  # the output projection
    attention = 6 * a.layers * a.heads * hd * a.seq  # causal scores and values, fwd + bwd
    return 6.0 * matmul + attention


def num_params(a) -> int:
    hd = a.emb // a.heads
    per_layer = 2 * a.emb * a.heads * hd + 2 * a.emb * a.kv_heads * hd + 3 * a.emb * a.mlp
    return a.layers * (per_layer + 2 * a.emb) + (1 if a.tied else 2) * a.vocab * a.emb + a.emb


def jobs(a) -> list[tuple[str, str, str]]:
    """(row label, contender, remat policy) in the order they run."""
    remats = a.remat.split(",")
    wanted = a.only.split(",")
    out = []
    for name in CONTENDERS:
        if name not in wanted:
            continue
        for remat in remats if name == "tpusft-packed" else remats[:1]:
            label = f"{name} (remat {remat})" if name == "tpusft-packed" and len(remats) > 1 \
                else name
            out.append((label, name, remat))
    return out


def combine(runs: list[dict]) -> dict:
    """One row from a contender's rounds: medians of the times, the largest memory."""
    out = {k: statistics.median(r[k] for r in runs) for k in ("first_step_s", "step_s")}
    out["tokens_per_step"] = statistics.mean(r["tokens_per_step"] for r in runs)
    for key in ("compile_s",):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    for key in ("compiles_after_first_step", "peak_rss_gib", "device_peak_gib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = max(values)
    out["rounds"] = runs
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv_heads", type=int, default=None, help="default: --heads")
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", default="minimal,full",
                   help="tpusft's remat_policy values, comma-separated (none, minimal, full)")
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--worker", default="")
    p.add_argument("--out", default="")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.preset:  # the preset's values, unless given on the command line
        given = {x.split("=")[0].lstrip("-") for x in argv if x.startswith("--")}
        for key, value in PRESETS[a.preset].items():
            if key not in given and f"no-{key}" not in given:
                setattr(a, key, value)
    if a.kv_heads is None:
        a.kv_heads = a.heads
    for remat in a.remat.split(","):
        if remat not in TUNIX_REMAT:
            p.error(f"--remat: unknown policy {remat!r}; use none, minimal or full")
    return a


def main() -> None:
    a = parse_args()
    if a.worker:
        worker(a)
        return

    import jax

    from tpusft.launch import tcmalloc_env
    from tpusft.training.metrics import peak_tflops_per_device

    peak, source = peak_tflops_per_device(None, a.dtype)
    measured = source.startswith("measured")
    device = jax.devices()[0].device_kind
    # Every contender gets the allocator tpusft's launchers use (tcmalloc where installed).
    tcmalloc = tcmalloc_env()
    env = tcmalloc or dict(os.environ)
    allocator = "tcmalloc" if tcmalloc else "glibc malloc"
    print(f"shape: Llama, {num_params(a) / 1e6:.1f}M parameters ({a.layers} layers, emb "
          f"{a.emb}, heads {a.heads}/{a.kv_heads}, mlp {a.mlp}, vocab {a.vocab}"
          f"{', tied' if a.tied else ''}), batch {a.batch} x {a.seq}, {a.dtype}, {a.steps} "
          f"steps x {a.rounds} round(s); device {device} ({jax.device_count()}), peak "
          f"{peak:.3f} TFLOP/s ({source}); {os.cpu_count()} CPU cores; allocator {allocator} "
          f"(every contender)")
    runs: dict[str, list[dict]] = {}
    keep = ("worker", "out", "only", "remat", "preset", "rounds", "tied")
    base = [sys.executable, __file__] + [f"--{k}={v}" for k, v in vars(a).items()
                                          if k not in keep]
    base.append("--tied" if a.tied else "--no-tied")

    def run_worker(name: str, remat: str) -> dict | None:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            proc = subprocess.run([*base, f"--remat={remat}", f"--worker={name}",
                                   f"--out={f.name}"], cwd=REPO, capture_output=True,
                                  text=True, env=env)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                return None
            return json.loads(Path(f.name).read_text())

    peaks: list[dict] = []

    def measure() -> None:
        # On CPU the peak is re-measured before every round and after the last: the best of
        # these is the denominator (machines drift; a slow moment must not inflate MFU).
        if measured:
            r = run_worker("peak", "full")
            if r:
                peaks.append(r)
                print(f"  matmul peak: {r['tflops']:.3f} TFLOP/s ("
                      + ", ".join(f"{k[:-7]} {v:.3f}" for k, v in r.items() if k != "tflops")
                      + ")", flush=True)

    for rnd in range(a.rounds):
        measure()
        for label, name, remat in jobs(a):
            r = run_worker(name, remat)
            if r is None:
                continue
            runs.setdefault(label, []).append(r)
            print(f"  round {rnd + 1}: {label}: {r['tokens_per_step'] / r['step_s']:,.0f} "
                  f"tokens/s", flush=True)

    measure()
    if peaks:
        peak = max([peak] + [r["tflops"] for r in peaks])
        source = (f"best of {len(peaks) + 1} {a.dtype} matmul measurements on {device} during "
                  "the run (XLA" + (" and numpy BLAS" if a.dtype == "float32" else "") + ")")
        print(f"peak: {peak:.3f} TFLOP/s ({source})")
    results = {}
    for label, rs in runs.items():
        r = combine(rs)
        r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token(a) / (peak * 1e12)
        results[label] = r
    ref = next((r for label, r in results.items() if label.startswith("tpusft-packed")), None)
    ref_label = next((label for label in results if label.startswith("tpusft-packed")), "")
    header = ("contender", "tokens/s", "step s", "first step s", "compile s", "recompiles",
              "peak RSS GiB", "device peak GiB", "MFU", f"{ref_label} x")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, r in results.items():
        ratio = ref["tokens_per_s"] / r["tokens_per_s"] if ref else float("nan")
        dev = r.get("device_peak_gib")
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | "
              f"{r['first_step_s']:.1f} | {r.get('compile_s', float('nan')):.1f} | "
              f"{r.get('compiles_after_first_step', '-')} | {r['peak_rss_gib']:.2f} | "
              f"{'-' if dev is None else f'{dev:.2f}'} | {100 * r['mfu']:.1f}% | "
              f"{ratio:.2f} |")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    path = out / f"train_step-{slug}{'-' + a.preset if a.preset else ''}.json"
    path.write_text(json.dumps({"device": device, "device_count": jax.device_count(),
                                "cpu_cores": os.cpu_count(), "allocator": allocator,
                                "peak_tflops": peak, "peak_source": source,
                                "peak_measurements": peaks,
                                "command": " ".join(["benchmarks/train_step.py",
                                                     *sys.argv[1:]]),
                                "settings": {k: v for k, v in vars(a).items()
                                             if k not in ("worker", "out")},
                                "params": num_params(a), "results": results}, indent=2))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
