"""One decoder layer's forward and backward pass, tpusft against transformers' LlamaDecoderLayer
in PyTorch, side by side in one process: where a training step's time per layer goes.

    .venv/bin/python benchmarks/layer_step.py [--emb 768] [--heads 12] [--mlp 2048]
        [--batch 4] [--seq 512] [--iters 12]

Rows, each timed in turn with the others (machines drift), the median of --iters:
  layer           tpusft's `layer_forward` (remat none, minimal, full) and the PyTorch layer
                  (SDPA attention, causal), the sum of the output's squares back-propagated to
                  the input and every weight;
  attention       the attention kernel alone on the layer's q/k/v (tpusft's
                  blocked_causal_attention against PyTorch's scaled_dot_product_attention);
  matmuls only    the layer's seven projections with no attention, norm or activation.
Both sides run on all CPU cores in float32, with tcmalloc preloaded when installed (as tpusft's
launchers do). Writes benchmarks/results/layer_step-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=12)
    a = p.parse_args()
    from tpusft.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from tpusft.models import attention as attn
    from tpusft.models import decoder

    torch.set_num_threads(os.cpu_count() or 1)
    b, t, e, h, m = a.batch, a.seq, a.emb, a.heads, a.mlp
    d = e // h
    args = decoder.ModelArgs(family="llama3", vocab_size=256, emb_dim=e, num_layers=1,
                             num_heads=h, num_kv_heads=h, head_dim=d, mlp_dim=m, norm_eps=1e-5,
                             rope_theta=1e4)
    params = decoder.create_model(args, None).layer_params()[0]
    key = jax.random.key(0)
    x = jax.random.normal(key, (b, t, e))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attn.segment_mask(jnp.ones((b, t), jnp.int32))
    rope = attn.rope_tables(positions, attn.rope_inv_freq(d, 1e4))

    def jax_layer(remat: str):
        def body(x, p):
            return decoder.layer_forward(p, x, mask, None, None, args, rope, None)[0]
        if remat != "none":
            body = jax.checkpoint(body, policy=decoder._REMAT_POLICIES[remat])
        step = jax.jit(jax.grad(lambda x, p: jnp.sum(body(x, p) ** 2), argnums=(0, 1)))
        return lambda: jax.block_until_ready(step(x, params))

    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (b, t, h, d)) for i in range(3))
    attn_step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        attn.blocked_causal_attention(q, k, v, mask, d ** -0.5) ** 2), argnums=(0, 1, 2)))

    kernels = [jax.random.normal(jax.random.fold_in(key, 10 + i), s) * 0.02 for i, s in
               enumerate([(e, e)] * 4 + [(e, m), (e, m), (m, e)])]

    def projections(x, ws):
        wq, wk, wv, wo, wg, wu, wd = ws
        x = x + ((x @ wq) + (x @ wk) + (x @ wv)) @ wo
        return x + ((x @ wg) * (x @ wu)) @ wd

    x2 = x.reshape(b * t, e)
    mm_step = jax.jit(jax.grad(lambda x, ws: jnp.sum(projections(x, ws) ** 2), argnums=(0, 1)))

    config = LlamaConfig(hidden_size=e, intermediate_size=m, num_attention_heads=h,
                         num_key_value_heads=h, rope_theta=1e4, max_position_embeddings=t)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0)
    tx = torch.tensor(np.asarray(x)).requires_grad_()
    tpos = torch.arange(t)[None].expand(b, t)
    position_embeddings = LlamaRotaryEmbedding(config)(tx, tpos)

    def torch_layer():
        out = layer(tx, attention_mask=None, position_ids=tpos,
                    position_embeddings=position_embeddings)
        out = out[0] if isinstance(out, tuple) else out
        (out ** 2).sum().backward()

    tq, tk, tv = (torch.tensor(np.asarray(y)).transpose(1, 2).contiguous().requires_grad_()
                  for y in (q, k, v))

    def torch_attention():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        (out ** 2).sum().backward()

    tx2 = torch.tensor(np.asarray(x2)).requires_grad_()
    tws = [torch.tensor(np.asarray(w)).requires_grad_() for w in kernels]

    def torch_matmuls():
        (projections(tx2, tws) ** 2).sum().backward()

    cases = {
        ("layer", "tpusft, remat none"): jax_layer("none"),
        ("layer", "tpusft, remat minimal"): jax_layer("minimal"),
        ("layer", "tpusft, remat full"): jax_layer("full"),
        ("layer", "PyTorch"): torch_layer,
        ("attention", "tpusft"): lambda: jax.block_until_ready(attn_step(q, k, v)),
        ("attention", "PyTorch"): torch_attention,
        ("matmuls only", "tpusft (XLA)"): lambda: jax.block_until_ready(mm_step(x2, kernels)),
        ("matmuls only", "PyTorch"): torch_matmuls,
    }
    for fn in cases.values():  # compile / warm up
        fn()
    times: dict = {name: [] for name in cases}
    for _ in range(a.iters):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(f"one Llama layer, emb {e}, heads {h}, mlp {m}, batch {b} x {t}, float32, "
          f"forward + backward, {os.cpu_count()} CPU cores, median of {a.iters}\n")
    print("| part | contender | ms | time / PyTorch's |\n|---|---|---|---|")
    rows = []
    for (part, name), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        torch_ms = 1e3 * statistics.median(times[(part, "PyTorch")])
        rows.append({"part": part, "contender": name, "ms": ms, "min_ms": 1e3 * min(ts)})
        print(f"| {part} | {name} | {ms:.0f} | {ms / torch_ms:.2f} |")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0].device_kind
    path = out / f"layer_step-{device.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps({"device": device, "cpu_cores": os.cpu_count(),
                                "settings": vars(a), "results": rows}, indent=2))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
