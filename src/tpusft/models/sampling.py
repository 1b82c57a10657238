"""Batched sampling with the KV cache: left-padded prefill, then one token per step, all in
one compiled function (greedy, temperature and top-k)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]
        tokens[i, length - len(p):] = p
        valid[i, length - len(p):] = True
    return tokens, valid


@partial(nnx.jit, static_argnames=("max_new_tokens", "top_k"))
def _generate(model, tokens, valid, rng, temperature, *, max_new_tokens: int, top_k: int):
    b, p = tokens.shape
    size = p + max_new_tokens
    cache = model.init_cache(b, size)
    key_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    causal = jnp.arange(p)[:, None] >= jnp.arange(size)[None, :]
    layers = model.layer_params()  # sliced once, not at every token
    logits, cache = model(tokens, positions, cache, causal[None] & key_valid[:, None, :],
                          decode_only_last_token=True, layers=layers)
    lengths = valid.sum(axis=1)

    def pick(logits, key):
        logits = logits[:, -1].astype(jnp.float32)
        greedy = jnp.argmax(logits, axis=-1)
        scaled = logits / jnp.maximum(temperature, 1e-6)
        if top_k > 0:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        sampled = jax.random.categorical(key, scaled, axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    def step(i, state):
        out, last, cache, key_valid, rng = state
        rng, key = jax.random.split(rng)
        out = out.at[:, i].set(last)
        key_valid = key_valid.at[:, p + i].set(True)
        mask = key_valid[:, None, :]
        logits, cache = model(last[:, None], (lengths + i)[:, None], cache, mask, layers=layers)
        return out, pick(logits, key), cache, key_valid, rng

    rng, key = jax.random.split(rng)
    first = pick(logits, key)
    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    out, _, _, _, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                        (out, first, cache, key_valid, rng))
    return out


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
             eos_ids: Sequence[int], prefill_length: int | None = None, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt (token ids), cut after the first end-of-sequence token."""
    longest = max(len(p) for p in prompts)
    length = max(prefill_length or 0, longest)
    tokens, valid = _left_pad(prompts, length, pad_id)
    out = np.asarray(_generate(model, jnp.asarray(tokens), jnp.asarray(valid),
                               jax.random.key(seed), jnp.float32(temperature),
                               max_new_tokens=max_new_tokens, top_k=top_k))
    results = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in set(eos_ids)), None)
        results.append(row if cut is None else row[:cut])
    return results
