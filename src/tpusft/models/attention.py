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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, layout: str) -> jax.Array:
    """Rotates x [B, T, N, D] by positions [B, T].

    layout 'interleaved' rotates pairs (x[2i], x[2i+1]) (MaxText's Llama layout);
    'half' rotates pairs (x[i], x[i + D/2]) (Hugging Face's layout).
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    if layout == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        out = out.reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] boolean: causal, and only within the same non-zero segment (packing)."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids != 0)[:, None, :]
    return causal[None] & same & valid


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          scale: float, implementation: str = "auto",
                          softcap: float = 0.0) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, KV, D], mask [B, T, S] -> [B, T, H, D].

    'xla' is a grouped-query einsum with float32 softmax; 'cudnn' (and 'auto' on GPU) uses
    jax.nn.dot_product_attention's fused cuDNN kernel. `softcap` > 0 caps the scores with
    softcap * tanh(scores / softcap) (Gemma 2), which the XLA path does.
    """
    if implementation == "auto":
        gpu = jax.default_backend() == "gpu"
        implementation = "cudnn" if gpu and not softcap else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation="cudnn")
    return einsum_attention(q, k, v, mask, scale, softcap)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     softcap: float = 0.0, k_layout: str = "bskd",
                     v_layout: str = "bskd") -> jax.Array:
    """Grouped-query attention as two einsums with a float32 softmax. k and v may be laid out
    otherwise than [B, S, KV, D] (the KV cache keeps keys as [B, KV, D, S] and values as
    [B, KV, S, D], the operand layouts the CPU matmul reads without a transposed copy)."""
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
