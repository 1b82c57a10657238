"""Splash attention: JAX's Pallas TPU kernel for causal attention over packed rows.

The kernel takes the mask as structure (causal or a causal sliding window, and segment ids
for packing), so no [B, T, T] mask exists: it skips the blocks the mask rules out and
builds the rest inside the kernel. Grouped-query attention runs the kernel's multi-query
form once per key/value head, over that head's group of query heads. Scores are capped
(Gemma 2) inside the kernel. On a mesh the kernel runs per shard (shard_map): rows over the
batch axes, key/value heads over the tensor axis. On CPU it runs in Pallas' interpret mode
(tests); `unavailable` says when the kernel cannot serve a call.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

BLOCK = 512    # query/key block of the kernel, at most (a divisor of T, a multiple of 128)
MIN_BLOCK = 128


def block_size(t: int) -> int:
    """The largest block of BLOCK, 256, 128 that divides t (0: none)."""
    return next((b for b in (BLOCK, 256, MIN_BLOCK) if t % b == 0), 0)


def unavailable(t: int, head_dim: int) -> str:
    """Why the kernel cannot run attention over t positions of head_dim channels ('' if it
    can): its blocks are multiples of 128 positions, and heads of 64 channels or a multiple
    of 128 fill its lanes (both compile for v5e with libtpu)."""
    if not block_size(t):
        return f"sequence length {t} is not a multiple of {MIN_BLOCK}"
    if head_dim != 64 and head_dim % 128:
        return f"head_dim {head_dim} is neither 64 nor a multiple of 128"
    return ""


@functools.lru_cache(maxsize=64)
def _kernel(t: int, group: int, window: int, softcap: float, interpret: bool):
    """The multi-query kernel for `group` query heads sharing one key/value head."""
    if window:
        head = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    else:
        head = sm.CausalMask((t, t))
    block = block_size(t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mqa(sm.MultiHeadMask([head] * group), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap or None, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     scale: float, window: int = 0, softcap: float = 0.0,
                     interpret: bool = False) -> jax.Array:
    """Causal self-attention, q [B, T, H, D], k/v [B, T, KV, D], segment_ids [B, T]
    (packing: a position attends to earlier positions of its own segment) -> [B, T, H, D].
    `window` > 0 limits each position to the `window` latest keys (itself included); positions
    of segment 0 (padding) attend among themselves and feed nothing else."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _kernel(t, h // kv, window, float(softcap), interpret)
    # [B, KV, G, T, D] queries (scaled here: the kernel multiplies q by k as they are)
    qg = (q * scale).astype(q.dtype).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]

    def one_row(qr, kr, vr, ids):
        seg = sk.SegmentIds(q=ids, kv=ids)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=seg))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kt, vt, segment_ids.astype(jnp.int32))  # [B, KV, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def sharded_splash_attention(mesh, batch_axes: tuple[str, ...], head_axis: str | None, *args,
                             **kwargs) -> jax.Array:
    """splash_attention per shard of `mesh`: rows split over `batch_axes`, key/value heads
    (and their query groups) over `head_axis`; each device runs the kernel on its part."""
    q, k, v, segment_ids = args
    batch = tuple(a for a in batch_axes if mesh.shape[a] > 1) or None
    heads = head_axis if head_axis and mesh.shape[head_axis] > 1 else None
    if batch and q.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = None
    if heads and k.shape[2] % mesh.shape[heads]:
        heads = None
    qkv = PartitionSpec(batch, None, heads, None)
    fn = functools.partial(splash_attention, **kwargs)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)),
                         out_specs=qkv, check_vma=False)(q, k, v, segment_ids)


class SegmentMask(NamedTuple):
    """The mask of a training or scoring pass as the kernel takes it: causal within each
    packed segment of `segment_ids` [B, T], and within `window` positions when it is > 0."""

    segment_ids: jax.Array
    window: int


def _platform(rules) -> str:
    if rules is not None and rules.mesh is not None:
        return rules.mesh.devices.flat[0].platform
    return jax.default_backend()


def why_not(attention: str, rules, t: int, head_dim: int) -> str:
    """Why a pass over t positions does not use the kernel ('' when it does): `attention`
    names another kernel, or is auto off TPU, or the shapes do not suit it."""
    if attention in ("xla", "cudnn"):
        return f"attention={attention}"
    if attention == "auto" and _platform(rules) != "tpu":
        return "not on TPU"
    return unavailable(t, head_dim)


def layer_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask, scale: float,
                    softcap: float, rules) -> jax.Array:
    """One layer's attention through the kernel, per shard on the rules' mesh (rows over the
    batch axes, kv heads over the axis the rules give them); interpreted off TPU."""
    interpret = _platform(rules) != "tpu"
    options = {"scale": scale, "window": mask.window, "softcap": softcap,
               "interpret": interpret}
    mesh = rules.mesh if rules is not None else None
    if mesh is None or mesh.devices.size == 1:
        return splash_attention(q, k, v, mask.segment_ids, **options)
    table = dict(rules.rules)
    batch = tuple(table.get("activation_batch", ()))
    heads = next(iter(table.get("activation_kv_heads", ())), None)
    return sharded_splash_attention(mesh, batch, heads, q, k, v, mask.segment_ids, **options)
