"""Batched sampling with the KV cache (what GRPO rollouts cost): tpusft's decoder through
`tpusft.models.sampling` and through Tunix's sampler (the GRPO rollout engine), against
Hugging Face `generate` on the same Llama-shaped random model, in one run.

    .venv/bin/python benchmarks/generate.py [--layers 12] [--emb 768] [--batch 8]
        [--prompt 64] [--new 128]

Every contender samples `new` tokens for `batch` prompts of `prompt` tokens (temperature 1,
no early stop: an end-of-sequence id outside the vocabulary), timed after one warm-up call
of the same shape (the JAX contenders compile there). Decode tokens/s = batch x new / time.
Writes benchmarks/results/generate-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    from tpusft.conversion.convert import hf_to_native
    from tpusft.conversion.native import restore_params
    from tpusft.models import sampling
    from tpusft.models.decoder import ModelArgs, Transformer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.emb, intermediate_size=a.mlp,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        max_position_embeddings=a.prompt + a.new, rope_theta=10000.0,
        tie_word_embeddings=False)).eval()
    args = ModelArgs(family="llama3", vocab_size=a.vocab, emb_dim=a.emb, num_layers=a.layers,
                     num_heads=a.heads, num_kv_heads=a.heads, head_dim=a.emb // a.heads,
                     mlp_dim=a.mlp, norm_eps=1e-5, rope_theta=1e4)
    # The same weights as the HF model, through the converter.
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(tmp / "hf")
    hf_to_native(str(tmp / "hf"), str(tmp / "native"))
    model = nnx.eval_shape(lambda: Transformer(args, None, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(model)))
    restore_params(model, str(tmp / "native"))

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, a.vocab, (a.batch, a.prompt)).tolist()
    eos = a.vocab + 1  # never sampled: every contender decodes all `new` tokens
    results = {}

    def ours():
        sampling.generate(model, prompts, max_new_tokens=a.new, pad_id=0, eos_ids=[eos],
                          temperature=1.0, seed=0)
    results["tpusft"] = _best(ours, a.repeats)
    print(f"  tpusft: {a.batch * a.new / results['tpusft']:.0f} tokens/s", flush=True)

    from tunix.generate import sampler as tunix_sampler

    class Tok:  # ids in, ids out: Tunix's sampler only needs these
        def encode(self, text, **_):
            return [int(t) for t in text.split()]

        def decode(self, ids, **_):
            return " ".join(str(int(i)) for i in ids)

        def bos_id(self):
            return 0

        def eos_id(self):
            return eos

        def pad_id(self):
            return 0

    s = tunix_sampler.Sampler(model, Tok(), tunix_sampler.CacheConfig(
        cache_size=a.prompt + 1 + a.new, num_layers=a.layers, num_kv_heads=a.heads,
        head_dim=a.emb // a.heads))
    texts = [" ".join(map(str, p)) for p in prompts]

    def tunix():
        s(input_strings=texts, max_generation_steps=a.new, max_prompt_length=a.prompt + 1,
          temperature=1.0, top_p=1.0, eos_tokens=[eos], echo=False, seed=0)
    results["tunix-sampler"] = _best(tunix, a.repeats)
    print(f"  tunix-sampler: {a.batch * a.new / results['tunix-sampler']:.0f} tokens/s",
          flush=True)

    ids = torch.tensor(prompts)

    def hf_generate():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new,
                        min_new_tokens=a.new, do_sample=True, temperature=1.0, top_k=0,
                        pad_token_id=0, eos_token_id=None)
    results["hf-generate"] = _best(hf_generate, a.repeats)
    print(f"  hf-generate: {a.batch * a.new / results['hf-generate']:.0f} tokens/s", flush=True)

    device = jax.devices()[0].device_kind
    ref = a.batch * a.new / results["tpusft"]
    print(f"\n{a.layers} layers, emb {a.emb}, batch {a.batch}, prompt {a.prompt}, "
          f"{a.new} new tokens, float32, {device} ({os.cpu_count()} CPU cores)\n")
    print("| contender | seconds | decode tokens/s | tpusft x |\n|---|---|---|---|")
    for name, sec in results.items():
        tps = a.batch * a.new / sec
        print(f"| {name} | {sec:.2f} | {tps:,.0f} | {ref / tps:.2f} |")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate-{device.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps({"device": device, "cpu_cores": os.cpu_count(),
                                "settings": vars(a),
                                "seconds": results,
                                "tokens_per_s": {k: a.batch * a.new / v
                                                 for k, v in results.items()}}, indent=2))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
