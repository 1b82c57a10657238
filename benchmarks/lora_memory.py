"""Memory and step time of full fine-tuning against LoRA and QLoRA on the same random model.

    .venv/bin/python benchmarks/lora_memory.py [--preset qwen2.5-0.5b] [--seq 256] [--batch 2]

Builds the preset's model (random weights) three times in one process: full, LoRA (rank 16,
all linear projections) and QLoRA (the same adapters on nf4 layer kernels, quantized with
Qwix), and runs the training step tpusft's trainer runs (the SFT loss, AdamW over the trained
parameters, as Tunix's PeftTrainer sets it up). Prints trained-parameter and optimizer-state
bytes (from the arrays themselves), the step's memory as XLA compiled it (arguments, outputs
and temporaries), the mean step time after compilation, and the stored base weights at
their bit width, as ratios to full fine-tuning and to bfloat16. Targets: LoRA optimizer
state under 5% of full; QLoRA base weights under 35% of bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tpusft.conversion.convert import model_args
from tpusft.config.loader import load_preset
from tpusft.models import lora
from tpusft.models.decoder import create_model
from tpusft.training.loss import sft_loss


def nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(args, wrt, batch: dict, steps: int) -> dict:
    model = create_model(args, None, seed=0)
    kernels_bf16 = sum(int(x.size) * 2 for p, x in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
        if "layers" in str(p) and "'kernel'" in str(p))
    if args.lora_qtype:
        lora.quantize_base(model, args.lora_qtype, args.scan_layers)
    stored_kernels = sum(
        int(x.size) * (jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer)
                       else 8 * x.dtype.itemsize) // 8
        for p, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(
            nnx.state(model, lora.WEIGHTS)))[0]
        if "layers" in str(p) and "kernel" in str(p))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(
            lambda m: sft_loss(m, **batch), argnums=nnx.DiffState(0, wrt))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss

    trained = nnx.state(model, wrt)
    compiled = step.lower(model, optimizer, batch).compile() if hasattr(step, "lower") else None
    mem = compiled.memory_analysis() if compiled is not None else None
    step(model, optimizer, batch).block_until_ready()  # compile and warm up
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(model, optimizer, batch)
    loss.block_until_ready()
    out = {"kernels_bf16": kernels_bf16, "kernels": stored_kernels,
           "base": lora.weight_bytes(model), "trained": nbytes(trained),
           "opt_state": nbytes(nnx.state(optimizer, nnx.optimizer.OptState)),
           "step_s": (time.perf_counter() - t0) / steps}
    if mem is not None:
        out["xla_bytes"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        out["xla_temp"] = mem.temp_size_in_bytes
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()

    base = dataclasses.replace(model_args(load_preset(a.preset), True), dtype="bfloat16",
                               weight_dtype="float32", remat_policy="full")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, base.vocab_size, (a.batch, a.seq + 1))
    batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "weights": jnp.ones((a.batch, a.seq), jnp.float32),
             "segment_ids": jnp.ones((a.batch, a.seq), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(a.seq), (a.batch, a.seq)),
             "loss_denominator": jnp.float32(a.batch * a.seq)}
    lora_args = dataclasses.replace(base, lora_rank=a.rank, lora_alpha=2.0 * a.rank,
                                    lora_targets=lora.target_modules("all-linear"))
    print(f"{a.preset}: {base.num_params() / 1e6:,.0f}M parameters (float32 weights, bfloat16 "
          f"compute, remat full), batch {a.batch} x {a.seq} tokens, on "
          f"{jax.devices()[0].platform}")
    runs = {"full": measure(base, nnx.Param, batch, a.steps),
            f"LoRA r{a.rank}": measure(lora_args, nnx.LoRAParam, batch, a.steps),
            "QLoRA nf4": measure(dataclasses.replace(lora_args, lora_qtype="nf4"),
                                 nnx.LoRAParam, batch, a.steps)}
    gib = 2 ** 30
    full = runs["full"]
    print(f"{'':24}" + "".join(f"{name:>22}" for name in runs))
    rows = [("trained parameters", "trained"), ("optimizer state", "opt_state"),
            ("stored layer kernels", "kernels"), ("all base weights", "base"),
            ("XLA step memory", "xla_bytes"), ("  of it temporaries", "xla_temp")]
    for label, key in rows:
        if key in full:
            cells = "".join(f"{r[key] / gib:9.3f} GiB ({r[key] / full[key]:5.3f})"
                            for r in runs.values())
            print(f"{label:24}{cells}")
    print(f"{'step time':24}" + "".join(
        f"{r['step_s']:10.2f} s   ({r['step_s'] / full['step_s']:5.3f})" for r in runs.values()))
    print("(ratios to full fine-tuning in parentheses; full trains float32 weights)")
    ratio = runs[f"LoRA r{a.rank}"]["opt_state"] / full["opt_state"]
    print(f"LoRA optimizer state = {100 * ratio:.2f}% of full (target < 5%: "
          f"{'met' if ratio < 0.05 else 'NOT met'})")
    q = runs["QLoRA nf4"]
    kr = q["kernels"] / q["kernels_bf16"]
    print(f"QLoRA layer kernels = {100 * kr:.1f}% of bfloat16 (target < 35%: "
          f"{'met' if kr < 0.35 else 'NOT met'}); with the embedding and norms, which stay "
          f"unquantized, the base is {q['base'] / gib:.3f} GiB")


if __name__ == "__main__":
    main()
