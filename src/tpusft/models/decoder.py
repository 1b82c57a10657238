"""One decoder-only transformer (Flax NNX) whose parameter tree is MaxText's.

    token_embedder/embedding                                (vocab, embed)
    decoder/decoder_norm/scale                              (embed,)
    decoder/logits_dense/kernel          (untied only)      (embed, vocab)
    decoder/layers/...                   (scan_layers)      layer axis at position 1
    decoder/layers_{i}/...               (unscanned)

Each layer: pre_self_attention_layer_norm, self_attention/{query,key,value,out},
post_self_attention_layer_norm, mlp/{wi_0 (gate), wi_1 (up), wo (down)}.

The same call serves training (segment ids: packed examples never attend to each other) and
decoding (a KV cache that Tunix's sampler drives: `model(tokens, positions, cache, mask)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tpusft.models import attention as attn
from tpusft.models.sharding import AxisRules, constrain

BATCH_SEQ_EMBED = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Architecture and execution settings the decoder needs (a view of the config)."""

    family: str
    vocab_size: int
    emb_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    tie_embeddings: bool = False
    dtype: str = "float32"
    weight_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> ModelArgs:
        return cls(
            family=cfg.model_family, vocab_size=cfg.vocab_size, emb_dim=cfg.base_emb_dim,
            num_layers=cfg.base_num_decoder_layers, num_heads=cfg.base_num_query_heads,
            num_kv_heads=cfg.base_num_kv_heads, head_dim=cfg.head_dim,
            mlp_dim=cfg.base_mlp_dim, norm_eps=cfg.normalization_layer_epsilon,
            rope_theta=cfg.rope_max_timescale, rope_type=cfg.rope_type,
            rope_factor=cfg.rope_scaling_factor, rope_low_freq_factor=cfg.rope_low_freq_factor,
            rope_high_freq_factor=cfg.rope_high_freq_factor,
            rope_original_max_position=cfg.rope_original_max_position,
            tie_embeddings=cfg.logits_via_embedding, dtype=cfg.dtype,
            weight_dtype=cfg.weight_dtype, scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy, attention=cfg.attention)

    # Per-family conventions of the native (MaxText) layout.
    @property
    def rope_layout(self) -> str:
        return "interleaved" if self.family == "llama3" else "half"

    @property
    def query_prescaled(self) -> bool:
        """Llama's 1/sqrt(head_dim) is folded into the query kernel; no runtime scaling."""
        return self.family == "llama3"

    def num_params(self) -> int:
        e, h, kv = self.emb_dim, self.num_heads, self.num_kv_heads
        d, m = self.head_dim, self.mlp_dim
        layer = e * d * (2 * h + 2 * kv) + 3 * e * m + 2 * e
        out = 0 if self.tie_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * layer + e + out


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None,
           dtype: Any, rules: AxisRules | None, stacked: int | None) -> nnx.Param:
    """A parameter, stacked at axis 1 for scanned layers, with its mesh sharding recorded."""
    if stacked is not None:
        shape = (shape[0], stacked, *shape[1:])
        axes = (axes[0], "layers", *axes[1:])
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
                 ).astype(dtype)
    if rules is None or rules.mesh is None:
        return nnx.Param(value, logical_axes=axes)
    return nnx.Param(value, out_sharding=tuple(rules.spec(axes, shape)), mesh=rules.mesh,
                     logical_axes=axes)


class Scale(nnx.Module):
    def __init__(self, dim: int, dtype, rules, stacked, rngs):
        self.scale = _param(rngs, (dim,), ("norm",), None, dtype, rules, stacked)


class Kernel(nnx.Module):
    def __init__(self, shape, axes, std, dtype, rules, stacked, rngs):
        self.kernel = _param(rngs, shape, axes, std, dtype, rules, stacked)


class SelfAttention(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, stacked, rngs):
        e, h, kv, d = a.emb_dim, a.num_heads, a.num_kv_heads, a.head_dim
        q_std = e ** -0.5 * (d ** -0.5 if a.query_prescaled else 1.0)
        self.query = Kernel((e, h, d), ("embed", "heads", "head_dim"), q_std, dtype, rules,
                            stacked, rngs)
        self.key = Kernel((e, kv, d), ("embed", "kv_heads", "head_dim"), e ** -0.5, dtype, rules,
                          stacked, rngs)
        self.value = Kernel((e, kv, d), ("embed", "kv_heads", "head_dim"), e ** -0.5, dtype,
                            rules, stacked, rngs)
        self.out = Kernel((h, d, e), ("heads", "head_dim", "embed"), (h * d) ** -0.5, dtype,
                          rules, stacked, rngs)


class Mlp(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, stacked, rngs):
        e, m = a.emb_dim, a.mlp_dim
        self.wi_0 = Kernel((e, m), ("embed", "mlp"), e ** -0.5, dtype, rules, stacked, rngs)
        self.wi_1 = Kernel((e, m), ("embed", "mlp"), e ** -0.5, dtype, rules, stacked, rngs)
        self.wo = Kernel((m, e), ("mlp", "embed"), m ** -0.5, dtype, rules, stacked, rngs)


class DecoderLayer(nnx.Module):
    """Parameters of one layer, or of all layers stacked at axis 1 when `stacked` is set."""

    def __init__(self, a: ModelArgs, dtype, rules, stacked: int | None, rngs: nnx.Rngs):
        self.pre_self_attention_layer_norm = Scale(a.emb_dim, dtype, rules, stacked, rngs)
        self.self_attention = SelfAttention(a, dtype, rules, stacked, rngs)
        self.post_self_attention_layer_norm = Scale(a.emb_dim, dtype, rules, stacked, rngs)
        self.mlp = Mlp(a, dtype, rules, stacked, rngs)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_forward(p: dict, x: jax.Array, positions: jax.Array, mask: jax.Array,
                  kv_cache: tuple[jax.Array, jax.Array] | None, end_index: jax.Array | None,
                  a: ModelArgs, inv_freq: jax.Array, rules: AxisRules | None):
    """One pre-norm transformer layer on plain arrays `p` (one layer's parameter dict)."""
    dt = jnp.dtype(a.dtype)
    w = jax.tree.map(lambda t: t.astype(dt), p)
    sa, mlp = w["self_attention"], w["mlp"]

    h = rms_norm(x, w["pre_self_attention_layer_norm"]["scale"], a.norm_eps)
    q = jnp.einsum("bte,ehd->bthd", h, sa["query"]["kernel"])
    k = jnp.einsum("bte,ehd->bthd", h, sa["key"]["kernel"])
    v = jnp.einsum("bte,ehd->bthd", h, sa["value"]["kernel"])
    q = constrain(q, rules, ("activation_batch", "activation_length", "activation_heads", None))
    q = attn.apply_rope(q, positions, inv_freq, a.rope_layout)
    k = attn.apply_rope(k, positions, inv_freq, a.rope_layout)

    new_cache = None
    if kv_cache is not None:
        ck, cv = kv_cache
        start = (0, end_index[0], 0, 0)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
        new_cache = (ck, cv)
        k, v = ck.astype(dt), cv.astype(dt)

    scale = 1.0 if a.query_prescaled else a.head_dim ** -0.5
    o = attn.dot_product_attention(q, k, v, mask, scale, a.attention)
    x = x + jnp.einsum("bthd,hde->bte", o, sa["out"]["kernel"])
    x = constrain(x, rules, BATCH_SEQ_EMBED)

    h = rms_norm(x, w["post_self_attention_layer_norm"]["scale"], a.norm_eps)
    gate = jnp.einsum("bte,em->btm", h, mlp["wi_0"]["kernel"])
    up = jnp.einsum("bte,em->btm", h, mlp["wi_1"]["kernel"])
    act = constrain(jax.nn.silu(gate) * up, rules,
                    ("activation_batch", "activation_length", "activation_mlp"))
    x = x + jnp.einsum("btm,me->bte", act, mlp["wo"]["kernel"])
    return constrain(x, rules, BATCH_SEQ_EMBED), new_cache


class Embedder(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, rngs):
        self.embedding = _param(rngs, (a.vocab_size, a.emb_dim), ("vocab", "embed"), 0.02, dtype,
                                rules, None)


class DecoderStack(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, rngs):
        if a.scan_layers:
            self.layers = DecoderLayer(a, dtype, rules, a.num_layers, rngs)
        else:
            for i in range(a.num_layers):
                setattr(self, f"layers_{i}", DecoderLayer(a, dtype, rules, None, rngs))
        self.decoder_norm = Scale(a.emb_dim, dtype, rules, None, rngs)
        if not a.tie_embeddings:
            self.logits_dense = Kernel((a.emb_dim, a.vocab_size), ("embed", "vocab"),
                                       a.emb_dim ** -0.5, dtype, rules, None, rngs)


class Transformer(nnx.Module):
    """The decoder. `__call__(tokens, positions, cache, attention_mask, segment_ids)`."""

    def __init__(self, args: ModelArgs, rules: AxisRules | None = None, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(args.weight_dtype)
        self.args = args
        self.rules = rules
        self.token_embedder = Embedder(args, dtype, rules, rngs)
        self.decoder = DecoderStack(args, dtype, rules, rngs)

    # -------------------------------------------------------------- decoding cache
    def init_cache(self, batch_size: int, cache_size: int, dtype: Any = None) -> dict:
        a = self.args
        dtype = jnp.dtype(dtype or a.dtype)
        shape = (a.num_layers, batch_size, cache_size, a.num_kv_heads, a.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "end_index": jnp.zeros((batch_size,), jnp.int32)}

    # ----------------------------------------------------------------- forward
    def __call__(self, input_tokens: jax.Array, positions: jax.Array, cache: dict | None = None,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 *, return_hidden: bool = False, decode_only_last_token: bool = False):
        a = self.args
        if attention_mask is None:
            if segment_ids is None:
                segment_ids = jnp.ones(input_tokens.shape, jnp.int32)
            attention_mask = attn.segment_mask(segment_ids)
        attention_mask = attention_mask.astype(jnp.bool_)
        inv_freq = attn.rope_inv_freq(a.head_dim, a.rope_theta, a.rope_type, a.rope_factor,
                                      a.rope_low_freq_factor, a.rope_high_freq_factor,
                                      a.rope_original_max_position)
        embedding = self.token_embedder.embedding[...]
        x = jnp.take(embedding, input_tokens, axis=0).astype(jnp.dtype(a.dtype))
        x = constrain(x, self.rules, BATCH_SEQ_EMBED)

        end_index = cache["end_index"] if cache is not None else None

        def body(x, p, kv):
            return layer_forward(p, x, positions, attention_mask, kv, end_index, a, inv_freq,
                                 self.rules)

        if a.remat_policy != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[a.remat_policy],
                                  prevent_cse=not a.scan_layers)

        new_k, new_v = [], []
        if a.scan_layers:
            stacked = nnx.to_pure_dict(nnx.state(self.decoder.layers, nnx.Param))
            stacked = jax.tree.map(lambda t: jnp.moveaxis(t, 1, 0), stacked)
            xs = (stacked, (cache["k"], cache["v"]) if cache is not None else None)

            def scan_fn(x, inp):
                p, kv = inp
                x, kv = body(x, p, kv)
                return x, kv

            x, kvs = jax.lax.scan(scan_fn, x, xs)
            if cache is not None:
                new_k, new_v = kvs
        else:
            for i in range(a.num_layers):
                p = nnx.to_pure_dict(nnx.state(getattr(self.decoder, f"layers_{i}"), nnx.Param))
                kv = (cache["k"][i], cache["v"][i]) if cache is not None else None
                x, kv = body(x, p, kv)
                if cache is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            if cache is not None:
                new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)

        new_cache = None
        if cache is not None:
            new_cache = {"k": new_k, "v": new_v,
                         "end_index": cache["end_index"] + input_tokens.shape[1]}

        x = rms_norm(x, self.decoder.decoder_norm.scale[...], a.norm_eps)
        if decode_only_last_token:
            x = x[:, -1:]
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def output_kernel(self) -> jax.Array:
        """[embed, vocab] output projection (the embedding's transpose when tied)."""
        if self.args.tie_embeddings:
            return self.token_embedder.embedding[...].T
        return self.decoder.logits_dense.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        w = self.output_kernel().astype(hidden.dtype)
        logits = jnp.einsum("bte,ev->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(logits, self.rules,
                         ("activation_batch", "activation_length", "activation_vocab"))


def create_model(args: ModelArgs, mesh: jax.sharding.Mesh | None, rules_table: Any = None,
                 seed: int = 0) -> Transformer:
    """A randomly initialised model whose parameters are created already sharded."""
    if mesh is None:
        return Transformer(args, None, rngs=nnx.Rngs(seed))
    rules = AxisRules.create(rules_table, mesh)

    # Inside jit each parameter is created with its sharding constraint, so no device ever
    # holds a whole unsharded copy.
    return nnx.jit(lambda: Transformer(args, rules, rngs=nnx.Rngs(seed)))()


def abstract_model(args: ModelArgs, mesh: jax.sharding.Mesh, rules_table: Any) -> Transformer:
    """The model's structure with shapes and shardings, and no parameter memory."""
    rules = AxisRules.create(rules_table, mesh)
    return nnx.eval_shape(lambda: Transformer(args, rules, rngs=nnx.Rngs(0)))
