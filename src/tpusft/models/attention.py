"""Rotary embeddings, attention masks and the attention kernel, chosen per backend."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_inv_freq(head_dim: int, base: float, rope_type: str = "default", factor: float = 8.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int = 8192) -> jax.Array:
    """Inverse frequencies per rotated pair, with Llama 3's frequency-dependent scaling."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, signed sin), each [B, T, 1, D], for rotating the halves of a head by `positions`
    [B, T]: computed once per forward pass and shared by every layer."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return (jnp.concatenate([cos, cos], axis=-1)[:, :, None],
            jnp.concatenate([-sin, sin], axis=-1)[:, :, None])


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates x [B, T, N, D] by the positions `tables` were made for: each pair (x[i],
    x[i + D/2]) (Hugging Face's layout) turns by its own angle, written as
    x * cos + (x[D/2:], x[:D/2]) * signed sin, two elementwise products that XLA fuses with
    the half swap (no strided shuffles)."""
    cos, sin = tables
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    swapped = jnp.concatenate([xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + swapped * sin).astype(x.dtype)


def pairs_to_halves(w: jax.Array) -> jax.Array:
    """Reorders the last (head_dim) axis from interleaved RoPE pairs (2i, 2i + 1) to halves
    (i, i + D/2): evens first, then odds. Applied to both the query and key weights it leaves
    every q.k unchanged, and lets MaxText's interleaved layout use the halves rotation."""
    d = w.shape[-1]
    return w.reshape(*w.shape[:-1], d // 2, 2).swapaxes(-1, -2).reshape(w.shape)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] boolean: causal, and only within the same non-zero segment (packing)."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids != 0)[:, None, :]
    return causal[None] & same & valid


def branch_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] boolean for rows that hold a shared prefix (segment 1) and branches after it
    (segments 2, 3, ...): causal, each branch sees the prefix and itself only, padding (0)
    nothing. A preference pair's row: the prompt, then the chosen and the rejected response."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    key = segment_ids[:, None, :]
    visible = (key == 1) | (key == segment_ids[:, :, None])
    return causal[None] & visible & (key != 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, implementation: str = "auto",
                          softcap: float = 0.0) -> jax.Array:
    """Causal self-attention over a whole sequence (training, evaluation, scoring):
    q [B, T, H, D], k/v [B, T, KV, D], mask [B, T, T] (causal, and whatever else the caller
    excludes: other packed segments, padding) -> [B, T, H, D].

    'xla' is `blocked_causal_attention`; 'cudnn' (and 'auto' on GPU) uses
    jax.nn.dot_product_attention's fused cuDNN kernel. `softcap` > 0 caps the scores with
    softcap * tanh(scores / softcap) (Gemma 2), which the XLA path does.
    """
    if implementation == "auto":
        gpu = jax.default_backend() == "gpu"
        implementation = "cudnn" if gpu and not softcap else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation="cudnn")
    return blocked_causal_attention(q, k, v, mask, scale, softcap)


def query_blocks(t: int) -> int:
    """How many query blocks `blocked_causal_attention` splits a length-t sequence into: the
    most of 8, 4 or 2 that divide t into blocks of at least 128 rows, else 1."""
    return next((n for n in (8, 4, 2) if t % n == 0 and t // n >= 128), 1)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             scale: float, softcap: float = 0.0) -> jax.Array:
    """Grouped-query causal attention with a float32 softmax, one block of queries at a time.

    A block of queries attends only to the keys up to its own last position (the mask is
    causal), so with n blocks the scores, softmax and their gradients cover (n + 1) / 2n of
    the full square (5/8 for 4 blocks). Heads are moved ahead of the sequence once, with the
    query heads that share a key/value head laid out after each position, so a block is one
    contiguous [B, KV, rows x group, D] slice and every product is a plain batched matmul
    over (batch, kv head): XLA makes no transposed copy of the scores or probabilities.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qt = q.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4)  # [B, KV, T, G, D]
    kt = k.transpose(0, 2, 1, 3)                             # [B, KV, S, D]
    vt = v.transpose(0, 2, 1, 3)
    n = query_blocks(t)
    size = t // n
    outs = []
    for i in range(n):
        lo, hi = i * size, (i + 1) * size
        rows = qt[:, :, lo:hi].reshape(b, kv, size * g, d)
        scores = jnp.einsum("bkqd,bksd->bkqs", rows, kt[:, :, :hi],
                            preferred_element_type=jnp.float32) * scale
        if softcap:
            scores = jnp.tanh(scores / softcap) * softcap
        block_mask = mask[:, lo:hi, :hi]
        if g > 1:
            block_mask = jnp.repeat(block_mask, g, axis=1)
        scores = jnp.where(block_mask[:, None], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, vt[:, :, :hi]))
    out = outs[0] if n == 1 else jnp.concatenate(outs, axis=2)
    return out.reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     softcap: float = 0.0, k_layout: str = "bskd",
                     v_layout: str = "bskd") -> jax.Array:
    """Grouped-query attention of q [B, T, H, D] over a KV cache, as two einsums with a float32
    softmax (decoding). The cache keeps keys as [B, KV, D, S] and values as [B, KV, S, D]
    (k_layout "bkds", v_layout "bksd"), the operand layouts the CPU matmul reads without a
    transposed copy."""
    b, t, h, d = q.shape
    kv = k.shape[k_layout.index("k")]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum(f"btkgd,{k_layout}->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{v_layout}->btkgd", probs, v)
    return out.reshape(b, t, h, d)
