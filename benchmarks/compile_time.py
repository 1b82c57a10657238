"""Compile time of tpusft's training step against depth: 4, 16 and 32 layers, scanned (the
default) and unrolled, in one run.

    .venv/bin/python benchmarks/compile_time.py [--emb 768] [--layers 4,16,32] [--seq 512]
        [--repeats 2]

The step is the one tpusft's trainer runs (the SFT loss, its gradient, AdamW) on the 124M
benchmark shape's width; it is traced, lowered and compiled from abstract shapes (no weights
are allocated), so what is timed is only what a first step adds. An untimed warm-up compile
takes XLA's one-time start-up costs first, and each depth's figure is the fastest of
--repeats compiles. Target: 32 scanned layers compile in at most 1.5 x the time of 4.
Writes benchmarks/results/compile_time-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tpusft.models.decoder import ModelArgs, Transformer
from tpusft.training.loss import sft_loss

REPO = Path(__file__).resolve().parents[1]


def seconds(args: ModelArgs, batch: int, seq: int) -> tuple[float, float]:
    """(trace + lower, compile) seconds of one training step."""
    def make():
        model = Transformer(args, None, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    graphdef, state = nnx.split(nnx.eval_shape(make))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: sft_loss(m, **batch))(model)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    inputs = {"inputs": ids, "targets": ids, "segment_ids": ids, "positions": ids,
              "weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32),
              "loss_denominator": jax.ShapeDtypeStruct((), jnp.float32)}
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, inputs)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", default="4,16,32")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    depths = [int(x) for x in a.layers.split(",")]
    device = jax.devices()[0].device_kind
    print(f"training-step compile time, emb {a.emb}, batch {a.batch} x {a.seq}, {a.dtype}, "
          f"on {device} ({os.cpu_count()} CPU cores)")
    # XLA's one-time start-up costs go to an untimed warm-up compile, not to the first depth.
    seconds(ModelArgs(family="llama3", vocab_size=256, emb_dim=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=32, mlp_dim=128, norm_eps=1e-5, rope_theta=1e4,
                      dtype=a.dtype, weight_dtype=a.dtype), 1, 16)
    rows = []
    for scan in (True, False):
        for n in depths:
            args = ModelArgs(family="llama3", vocab_size=a.vocab, emb_dim=a.emb, num_layers=n,
                             num_heads=a.heads, num_kv_heads=a.heads,
                             head_dim=a.emb // a.heads, mlp_dim=a.mlp, norm_eps=1e-5,
                             rope_theta=1e4, dtype=a.dtype, weight_dtype=a.dtype,
                             scan_layers=scan)
            # The fastest of --repeats (this machine is noisy; slower tries are interference).
            lower, compile_s = min((seconds(args, a.batch, a.seq) for _ in range(a.repeats)),
                                   key=sum)
            rows.append({"layers": n, "scan_layers": scan, "lower_s": lower,
                         "compile_s": compile_s})
            print(f"  {'scanned' if scan else 'unrolled'} {n} layers: trace+lower {lower:.1f} s,"
                  f" compile {compile_s:.1f} s", flush=True)

    first = f"x {depths[0]} layers"
    print(f"\n| layers | scanned: trace+lower + compile s | {first} | unrolled s | {first} |"
          "\n|---|---|---|---|---|")
    total = {(r["scan_layers"], r["layers"]): r["lower_s"] + r["compile_s"] for r in rows}
    for n in depths:
        s, u = total[(True, n)], total[(False, n)]
        print(f"| {n} | {s:.1f} | {s / total[(True, depths[0])]:.2f} | {u:.1f} | "
              f"{u / total[(False, depths[0])]:.2f} |")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile_time-{device.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps({"device": device, "cpu_cores": os.cpu_count(),
                                "settings": vars(a), "results": rows}, indent=2))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
