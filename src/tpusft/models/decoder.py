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
Training scans the stacked layers; decoding runs them one after another on per-layer
weights and per-layer cache buffers, so each token reads the weights once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tpusft.errors import ConfigError
from tpusft.models import attention as attn
from tpusft.models import lora, splash
from tpusft.models.families import (
    ATTN_NORM,
    FAMILIES,
    GEMMA2_SUFFIXES,
    MLP_NORM,
    POST_ATTN_NORM,
    POST_MLP_NORM,
    Family,
    block_counts,
)
from tpusft.models.hf_parameterisation import EMBEDDING, hf_gradients
from tpusft.models.sharding import (
    AxisRules,
    Placement,
    constrain,
    decoding_rules,
    replicate_across_processes,
    vocab_split_axes,
)

BATCH_SEQ_EMBED = ("activation_batch", "activation_length", "activation_embed")

_PROJECTION_INDEX = {name: i for i, name in enumerate(lora.PROJECTIONS)}  # dropout key streams

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
    local_rope_theta: float = 0.0       # sliding-window layers' RoPE base (0: rope_theta)
    sliding_window: int = 0             # 0: none
    attn_softcap: float = 0.0           # 0: none
    final_softcap: float = 0.0          # 0: none
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5 (0: head_dim)
    tie_embeddings: bool = False
    attention_bias: bool = False        # q/k/v/o biases (Qwen2: q/k/v by family)
    mlp_bias: bool = False
    dtype: str = "float32"
    weight_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "auto"
    lora_rank: int = 0                  # 0: no adapters
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0           # on each adapter's input, in training steps only
    lora_targets: frozenset = frozenset()  # native projection names (models/lora.py)
    lora_qtype: str = ""                # QLoRA: frozen layer kernels stored as nf4 or int8

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
            local_rope_theta=cfg.local_rope_max_timescale,
            sliding_window=cfg.sliding_window_size, attn_softcap=cfg.attn_logits_soft_cap,
            final_softcap=cfg.final_logits_soft_cap,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            tie_embeddings=cfg.logits_via_embedding, attention_bias=cfg.attention_bias,
            mlp_bias=cfg.mlp_bias, dtype=cfg.dtype,
            weight_dtype=cfg.weight_dtype, scan_layers=cfg.scan_layers,
            remat_policy=cfg.remat_policy, attention=cfg.attention,
            **lora_args(cfg))

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def query_fold(self) -> float:
        """Factor folded into the native query kernel (MaxText: 1/sqrt(head_dim) or 1)."""
        return self.head_dim ** -0.5 if self.fam.query_prescaled else 1.0

    @property
    def attention_scale(self) -> float:
        """Runtime factor on q.k so that the total is query_pre_attn_scalar ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5 / self.query_fold

    @property
    def qkv_bias(self) -> bool:
        return self.fam.qkv_bias or self.attention_bias

    def is_local(self, layer: int) -> bool:
        return self.fam.is_local(layer, self.sliding_window)

    def num_params(self) -> int:
        e, h, kv = self.emb_dim, self.num_heads, self.num_kv_heads
        d, m, fam = self.head_dim, self.mlp_dim, self.fam
        layer = e * d * (2 * h + 2 * kv) + 3 * e * m + len(fam.norms) * e
        layer += (h + 2 * kv) * d if self.qkv_bias else 0
        layer += e if self.attention_bias else 0
        layer += 2 * m + e if self.mlp_bias else 0
        layer += 2 * d if fam.qk_norm else 0
        out = 0 if self.tie_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * layer + e + out


def lora_args(cfg: Any) -> dict[str, Any]:
    """ModelArgs' LoRA fields from the config's lora section."""
    if not cfg.lora.enable_lora:
        return {}
    try:
        targets = lora.target_modules(cfg.lora.target_modules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"lora_rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "lora_targets": targets,
            "lora_qtype": cfg.lora.weight_qtype, "lora_dropout": cfg.lora.dropout}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None,
           dtype: Any, rules: AxisRules | None, stacked: int | None,
           cls: type = nnx.Param) -> nnx.Param:
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
        return cls(value, logical_axes=axes)
    return cls(value, out_sharding=tuple(rules.spec(axes, shape)), mesh=rules.mesh,
               logical_axes=axes)


class Scale(nnx.Module):
    def __init__(self, dim: int, dtype, rules, stacked, rngs):
        self.scale = _param(rngs, (dim,), ("norm",), None, dtype, rules, stacked)


class Kernel(nnx.Module):
    def __init__(self, shape, axes, std, dtype, rules, stacked, rngs, bias_dims: int = 0,
                 lora_in: int = 0, lora_rank: int = 0):
        self.kernel = _param(rngs, shape, axes, std, dtype, rules, stacked)
        if bias_dims:  # the output dims of the kernel
            self.bias = _param(rngs, shape[-bias_dims:], axes[-bias_dims:], 0.0, dtype, rules,
                               stacked)
        if lora_rank:  # an adapter: A random, B zero, so training starts at the base model
            (a_shape, a_axes), (b_shape, b_axes) = lora.adapter_shapes(shape, axes, lora_in,
                                                                       lora_rank)
            fan_in = int(np.prod(shape[:lora_in]))
            self.lora_a = _param(rngs, a_shape, a_axes, fan_in ** -0.5, dtype, rules, stacked,
                                 nnx.LoRAParam)
            self.lora_b = _param(rngs, b_shape, b_axes, 0.0, dtype, rules, stacked,
                                 nnx.LoRAParam)


def _kernel(a: ModelArgs, name: str, shape, axes, std, dtype, rules, stacked, rngs,
            bias_dims: int = 0) -> Kernel:
    """The projection `name`, with an adapter when LoRA targets it."""
    rank = a.lora_rank if name in a.lora_targets else 0
    return Kernel(shape, axes, std, dtype, rules, stacked, rngs, bias_dims,
                  lora.PROJECTIONS[name][1], rank)


class SelfAttention(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, stacked, rngs):
        e, h, kv, d = a.emb_dim, a.num_heads, a.num_kv_heads, a.head_dim
        b = 2 if a.qkv_bias else 0
        self.query = _kernel(a, "query", (e, h, d), ("embed", "heads", "head_dim"),
                             e ** -0.5 * a.query_fold, dtype, rules, stacked, rngs, b)
        self.key = _kernel(a, "key", (e, kv, d), ("embed", "kv_heads", "head_dim"), e ** -0.5,
                           dtype, rules, stacked, rngs, b)
        self.value = _kernel(a, "value", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                             e ** -0.5, dtype, rules, stacked, rngs, b)
        self.out = _kernel(a, "out", (h, d, e), ("heads", "head_dim", "embed"), (h * d) ** -0.5,
                           dtype, rules, stacked, rngs, 1 if a.attention_bias else 0)
        if a.fam.qk_norm:
            self.query_norm = Scale(d, dtype, rules, stacked, rngs)
            self.key_norm = Scale(d, dtype, rules, stacked, rngs)


class Mlp(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, stacked, rngs):
        e, m, b = a.emb_dim, a.mlp_dim, 1 if a.mlp_bias else 0
        self.wi_0 = _kernel(a, "wi_0", (e, m), ("embed", "mlp"), e ** -0.5, dtype, rules,
                            stacked, rngs, b)
        self.wi_1 = _kernel(a, "wi_1", (e, m), ("embed", "mlp"), e ** -0.5, dtype, rules,
                            stacked, rngs, b)
        self.wo = _kernel(a, "wo", (m, e), ("mlp", "embed"), m ** -0.5, dtype, rules, stacked,
                          rngs, b)


class DecoderLayer(nnx.Module):
    """One layer's parameters (all layers stacked at axis 1 when `stacked` is set).

    With `suffixes` (Gemma 2), one module holds several layers whose names end in a suffix.
    """

    def __init__(self, a: ModelArgs, dtype, rules, stacked: int | None, rngs: nnx.Rngs,
                 suffixes: tuple[str, ...] = ("",)):
        for sfx in suffixes:
            for name in a.fam.norms.values():
                setattr(self, name + sfx, Scale(a.emb_dim, dtype, rules, stacked, rngs))
            setattr(self, "self_attention" + sfx, SelfAttention(a, dtype, rules, stacked, rngs))
            setattr(self, "mlp" + sfx, Mlp(a, dtype, rules, stacked, rngs))


class LayerGroup(nnx.Module):
    """Gemma 3's block: layers_0 ... layers_{count-1}."""

    def __init__(self, a: ModelArgs, dtype, rules, stacked: int | None, rngs: nnx.Rngs,
                 count: int):
        for j in range(count):
            setattr(self, f"layers_{j}", DecoderLayer(a, dtype, rules, stacked, rngs))


def unit_layers(a: ModelArgs, p: dict, group: bool) -> list[dict]:
    """The per-layer parameter dicts inside one stored unit (a layer, a suffixed pair or a
    LayerGroup), in layer order, with suffixes removed."""
    if group:
        return [p[f"layers_{j}"] for j in range(len(p))]
    if a.fam.block_style == "suffix":
        return [{k[:-len(s)]: v for k, v in p.items() if k.endswith(s)} for s in GEMMA2_SUFFIXES]
    return [p]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _activation(name: str, x: jax.Array) -> jax.Array:
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


def rope_halves_order(p: dict, fam: Family) -> dict:
    """One layer's parameters with query and key in the halves RoPE order `layer_forward`
    rotates.

    MaxText stores Llama and Mistral query/key kernels in interleaved RoPE order. The same
    permutation of head_dim on queries and keys changes no score, so their head_dim axis
    (kernel, bias, adapter output, quantized values and scales, q/k norm) is reordered on the
    weights, which are small next to the activations, and every family rotates halves. Keys
    in the KV cache are kept in this order too.
    """
    if not fam.rope_interleaved:
        return p

    def reorder(name: str, v: jax.Array, proj: dict) -> jax.Array:
        if name == "lora_a":
            return v
        if name == "kernel_q" and v.shape[-1] != proj["kernel_scale"].shape[-1]:
            # nf4 codes two a byte, pairs (2i, 2i + 1) in a byte's low and high nibbles:
            # the halves order is every low nibble, then every high one (one code a byte)
            return jnp.concatenate([v & 0xF, v >> 4], axis=-1)
        return attn.pairs_to_halves(v)

    def halves(proj: dict) -> dict:
        return {n: reorder(n, v, proj) for n, v in proj.items()}

    sa = dict(p["self_attention"])
    for name in ("query", "key", "query_norm", "key_norm"):
        if name in sa:
            sa[name] = halves(sa[name])
    return dict(p, self_attention=sa)


def layer_forward(p: dict, x: jax.Array, mask: jax.Array,
                  kv_cache: tuple[jax.Array, jax.Array] | None, end_index: jax.Array | None,
                  a: ModelArgs, rope: tuple[jax.Array, jax.Array], rules: AxisRules | None,
                  dropout_key: jax.Array | None = None):
    """One pre-norm transformer layer on plain arrays `p` (one layer's parameter dict, query
    and key in halves RoPE order: `rope_halves_order`).

    `mask` is this layer's [B, T, S] mask (sliding-window layers get the narrowed one) and
    `rope` its RoPE tables for the tokens' positions (attention.rope_tables). With
    `dropout_key` (training) and lora_dropout > 0, each adapter drops its input with a mask of
    its own.
    """
    dt = jnp.dtype(a.dtype)
    fam, norms = a.fam, a.fam.norms
    # Quantized base weights (QLoRA) keep their integer values; dequantized per projection.
    w = jax.tree.map(lambda t: t.astype(dt) if jnp.issubdtype(t.dtype, jnp.floating) else t, p)
    sa, mlp = w["self_attention"], w["mlp"]

    scale = (a.lora_scale, a.lora_qtype)

    def drop(name):
        if dropout_key is None or not a.lora_dropout:
            return None
        return a.lora_dropout, jax.random.fold_in(dropout_key, _PROJECTION_INDEX[name])

    def project(p, name, h, spec, n_in):
        y = lora.project(h, p[name], spec, n_in, scale, drop(name))
        return y + p[name]["bias"] if "bias" in p[name] else y

    h = rms_norm(x, w[norms[ATTN_NORM]]["scale"], a.norm_eps)
    q, k, v = (project(sa, n, h, "bte,ehd->bthd", 1) for n in ("query", "key", "value"))
    q = constrain(q, rules, ("activation_batch", "activation_length", "activation_heads", None))
    if fam.qk_norm:
        q = rms_norm(q, sa["query_norm"]["scale"], a.norm_eps)
        k = rms_norm(k, sa["key_norm"]["scale"], a.norm_eps)
    q = attn.apply_rope(q, rope)
    k = attn.apply_rope(k, rope)

    new_cache = None
    if kv_cache is not None:
        # The cache holds keys as [B, KV, D, S] and values as [B, KV, S, D].
        ck, cv = kv_cache
        end = end_index[0]
        ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 3, 1).astype(ck.dtype),
                                          (0, 0, 0, end))
        cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype),
                                          (0, 0, end, 0))
        new_cache = (ck, cv)
        o = attn.einsum_attention(q, ck.astype(dt), cv.astype(dt), mask, a.attention_scale,
                                  a.attn_softcap, k_layout="bkds", v_layout="bksd")
    elif isinstance(mask, splash.SegmentMask):
        o = splash.layer_attention(q, k, v, mask, a.attention_scale, a.attn_softcap, rules)
    else:
        o = attn.dot_product_attention(q, k, v, mask, a.attention_scale, a.attention,
                                       softcap=a.attn_softcap)
    o = project(sa, "out", o, "bthd,hde->bte", 2)
    if fam.sandwich_norms:
        o = rms_norm(o, w[norms[POST_ATTN_NORM]]["scale"], a.norm_eps)
    x = constrain(x + o, rules, BATCH_SEQ_EMBED)

    h = rms_norm(x, w[norms[MLP_NORM]]["scale"], a.norm_eps)
    gate = project(mlp, "wi_0", h, "bte,em->btm", 1)
    up = project(mlp, "wi_1", h, "bte,em->btm", 1)
    act = constrain(_activation(fam.activation, gate) * up, rules,
                    ("activation_batch", "activation_length", "activation_mlp"))
    y = project(mlp, "wo", act, "btm,me->bte", 1)
    if fam.sandwich_norms:
        y = rms_norm(y, w[norms[POST_MLP_NORM]]["scale"], a.norm_eps)
    return constrain(x + y, rules, BATCH_SEQ_EMBED), new_cache


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def output_matmul(hidden: jax.Array, kernel: jax.Array, kernel_like) -> jax.Array:
    """hidden [..., embed] @ kernel [embed, vocab] in float32: the output layer.

    Its gradients are JAX's own, except that the kernel's is emitted by the matmul in the
    kernel's dtype and placed by `kernel_like` as the kernel is sharded here. JAX's transpose
    emits it in float32 and converts after: XLA then holds a whole [embed, vocab] float32
    partial sum on every chip and all-reduces it (1.0 GiB a chip for Llama 3.2 1B with its
    128,256 tokens, at the step's peak); emitted in bfloat16 and placed, it is half that and
    only its shard is kept."""
    return lora.matmul(hidden, kernel, 1, preferred_element_type=jnp.float32)


def _output_matmul_fwd(hidden, kernel, kernel_like):
    return output_matmul(hidden, kernel, kernel_like), (hidden, kernel)


def _output_matmul_bwd(kernel_like, res, g):
    hidden, kernel = res
    dhidden, = jax.linear_transpose(  # the forward matmul's transpose, without its primal
        lambda h: lora.matmul(h, kernel, 1, preferred_element_type=jnp.float32), hidden)(g)
    rows = hidden.reshape(-1, hidden.shape[-1])
    dkernel = jnp.matmul(rows.T, g.reshape(rows.shape[0], -1),
                         preferred_element_type=kernel.dtype)
    return dhidden, kernel_like(dkernel)


output_matmul.defvjp(_output_matmul_fwd, _output_matmul_bwd)


class Embedder(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, rngs):
        std = 0.02 * (a.emb_dim ** 0.5 if a.fam.embed_scaled else 1.0)
        self.embedding = _param(rngs, (a.vocab_size, a.emb_dim), ("vocab", "embed"), std, dtype,
                                rules, None)


class DecoderStack(nnx.Module):
    def __init__(self, a: ModelArgs, dtype, rules, rngs):
        fam = a.fam
        suffixes = GEMMA2_SUFFIXES if fam.block_style == "suffix" else ("",)
        if a.scan_layers:
            blocks, rest = block_counts(fam, a.num_layers)
            if fam.block_style == "nested":
                if blocks:
                    self.layers = LayerGroup(a, dtype, rules, blocks, rngs, fam.period)
                if rest:
                    self.layers_remainder = LayerGroup(a, dtype, rules, None, rngs, rest)
            else:
                self.layers = DecoderLayer(a, dtype, rules, blocks, rngs, suffixes)
        else:
            units = a.num_layers // len(suffixes)
            for i in range(units):
                setattr(self, f"layers_{i}", DecoderLayer(a, dtype, rules, None, rngs, suffixes))
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

    @property
    def config(self) -> ModelArgs:
        """The architecture (Tunix's sampler and RL cluster read num_layers, num_kv_heads,
        head_dim and dtype from here)."""
        return self.args

    # -------------------------------------------------------------- decoding cache
    def cache_layout(self, batch_size: int, cache_size: int, dtype: Any = None) -> dict:
        """Shapes and placement of the decoding cache: per-layer key and value buffers with
        rows over the batch axes and KV heads over tensor (decoding_rules); unplaced, every
        device would hold the whole cache of every row."""
        a = self.args
        dtype = jnp.dtype(dtype or a.dtype)
        b, s, kv, d = batch_size, cache_size, a.num_kv_heads, a.head_dim
        rules = decoding_rules(self.rules)

        def buffer(shape):
            sharding = None
            if rules is not None and rules.mesh is not None:
                sharding = NamedSharding(rules.mesh, rules.spec(
                    ("activation_batch", "activation_kv_heads", None, None), shape))
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        return {"k": [buffer((b, kv, d, s)) for _ in range(a.num_layers)],
                "v": [buffer((b, kv, s, d)) for _ in range(a.num_layers)],
                "end_index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def init_cache(self, batch_size: int, cache_size: int, dtype: Any = None) -> dict:
        """The decoding cache (Tunix's sampler calls this), zeros made in place on each device
        as cache_layout places them, never whole on one."""
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding),
                            self.cache_layout(batch_size, cache_size, dtype))

    def _rope(self, local: bool) -> jax.Array:
        a = self.args
        if local and a.local_rope_theta:  # Gemma 3: plain RoPE on a base of its own
            return attn.rope_inv_freq(a.head_dim, a.local_rope_theta)
        return attn.rope_inv_freq(a.head_dim, a.rope_theta, a.rope_type, a.rope_factor,
                                  a.rope_low_freq_factor, a.rope_high_freq_factor,
                                  a.rope_original_max_position)

    # ----------------------------------------------------------------- forward
    def __call__(self, input_tokens: jax.Array, positions: jax.Array, cache: dict | None = None,
                 attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 *, return_hidden: bool = False, decode_only_last_token: bool = False,
                 dropout_key: jax.Array | None = None, layers: list[dict] | None = None):
        """`dropout_key` (a typed PRNG key) turns on lora_dropout for this call: training
        passes one per step; evaluation and decoding pass none and are deterministic.
        `layers` (with a cache) is `layer_params()` taken once outside a decoding loop, so the
        loop does not slice the stacked weights again at every token."""
        a = self.args
        # Decoding with several processes keeps the batch whole on every device (the host
        # reads what a sampler fills); otherwise the model's own rules.
        rules = self.rules if cache is None else decoding_rules(self.rules)
        end_index = cache["end_index"] if cache is not None else None
        masks = self._masks(input_tokens, positions, attention_mask, segment_ids, end_index,
                            rules, cache is not None)
        rope = self._rope_tables(positions)
        x = jnp.take(self._embedding(), input_tokens, axis=0).astype(jnp.dtype(a.dtype))
        x = constrain(x, rules, BATCH_SEQ_EMBED)
        new_cache = None
        if cache is not None:
            x, new_cache = self._decode_layers(x, masks, rope, cache, layers, rules)
        else:
            layer_keys = None  # one dropout key per layer, or none
            if dropout_key is not None and a.lora_rank and a.lora_dropout:
                layer_keys = jax.random.split(dropout_key, a.num_layers)
            x = self._train_layers(x, masks, rope, rules, layer_keys)
        x = rms_norm(x, self.decoder.decoder_norm.scale[...], a.norm_eps)
        if decode_only_last_token:
            x = x[:, -1:]
        if return_hidden:
            return x, new_cache
        logits = self.logits(x)
        if cache is not None:
            logits = replicate_across_processes(logits, rules)
        return logits, new_cache

    def _masks(self, input_tokens, positions, attention_mask, segment_ids, end_index, rules,
               decoding: bool) -> dict[bool, Any]:
        """{is a sliding-window layer: its mask}: splash's SegmentMask structure where the
        kernel serves (no [B, T, T] array), boolean masks otherwise. Sliding-window layers see
        keys fewer than `sliding_window` positions back: cache slots when decoding; token
        positions otherwise (in a preference pair's row the rejected response sits after the
        chosen one, but its positions follow the prompt)."""
        a = self.args
        use_splash = (not decoding and attention_mask is None and not splash.why_not(
            a.attention, rules, input_tokens.shape[1], a.head_dim))
        if attention_mask is None and segment_ids is None:
            segment_ids = jnp.ones(input_tokens.shape, jnp.int32)
        if use_splash:
            return {False: splash.SegmentMask(segment_ids, 0),
                    True: splash.SegmentMask(segment_ids, a.sliding_window)}
        if attention_mask is None:
            attention_mask = attn.segment_mask(segment_ids)
        attention_mask = attention_mask.astype(jnp.bool_)
        local_mask = attention_mask
        if a.sliding_window:
            if decoding:
                q_idx = jnp.arange(input_tokens.shape[1]) + end_index[0]
                distance = q_idx[:, None] - jnp.arange(attention_mask.shape[-1])[None, :]
            else:
                distance = positions[:, :, None] - positions[:, None, :]
            local_mask = attention_mask & (distance < a.sliding_window)
        return {False: attention_mask, True: local_mask}

    def _rope_tables(self, positions: jax.Array) -> dict[bool, Any]:
        """{is a sliding-window layer: its RoPE tables}, once per forward pass; sliding-window
        layers share the global ones unless they rotate on a base of their own (Gemma 3)."""
        rope_global = attn.rope_tables(positions, self._rope(False))
        return {False: rope_global,
                True: attn.rope_tables(positions, self._rope(True)) if self.args.local_rope_theta
                else rope_global}

    def _decode_layers(self, x, masks, rope, cache: dict, layers, rules):
        """Decoding: one layer after another on each layer's own weights and cache buffers,
        so a step reads the weights once and writes only the new tokens' keys and values."""
        a, end_index = self.args, cache["end_index"]
        ks, vs = [], []
        for i, lp in enumerate(layers if layers is not None else self.layer_params()):
            local = a.is_local(i)
            x, (k, v) = layer_forward(lp, x, masks[local], (cache["k"][i], cache["v"][i]),
                                      end_index, a, rope[local], rules)
            ks.append(k)
            vs.append(v)
        return x, {"k": ks, "v": vs, "end_index": end_index + x.shape[1]}

    def _train_layers(self, x, masks, rope, rules, layer_keys):
        """Every layer over the whole sequence, rematerialised by remat_policy: scanned over
        the stacked blocks (and the remainder after them) with scan_layers, one stored unit
        after another otherwise."""
        a, fam = self.args, self.args.fam

        def make_body(local: bool):
            def body(x, p, kv, key):
                return layer_forward(rope_halves_order(p, fam), x, masks[local], kv, None, a,
                                     rope[local], rules, key)
            if a.remat_policy != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[a.remat_policy],
                                      prevent_cse=not a.scan_layers)
            return body

        bodies = {False: make_body(False), True: make_body(True)}

        def run_unit(x, p, group, first_layer, keys):
            """Runs the layers of one stored unit; keys are its layers' dropout keys or None."""
            for j, lp in enumerate(unit_layers(a, p, group)):
                key = keys[j] if keys is not None else None
                x, _ = bodies[a.is_local(first_layer + j)](x, lp, None, key)
            return x

        if not a.scan_layers:
            per_unit = len(GEMMA2_SUFFIXES) if fam.block_style == "suffix" else 1
            for u in range(a.num_layers // per_unit):
                p = self._weights(getattr(self.decoder, f"layers_{u}"))
                first = u * per_unit
                keys = layer_keys[first:first + per_unit] if layer_keys is not None else None
                x = run_unit(x, p, False, first, keys)
            return x
        group = fam.block_style == "nested"
        blocks, rest = block_counts(fam, a.num_layers)
        if blocks:
            stacked = jax.tree.map(lambda t: jnp.moveaxis(t, 1, 0),
                                   self._weights(self.decoder.layers))
            keys_in = None
            if layer_keys is not None:
                keys_in = layer_keys[:blocks * fam.period].reshape(blocks, fam.period)

            def scan_fn(x, inp):
                p, keys = inp
                return run_unit(x, p, group, 0, keys), None

            x, _ = jax.lax.scan(scan_fn, x, (stacked, keys_in))
        if rest:
            p = self._weights(self.decoder.layers_remainder)
            first = blocks * fam.period
            keys = layer_keys[first:] if layer_keys is not None else None
            x = run_unit(x, p, True, first, keys)
        return x

    def layer_params(self) -> list[dict]:
        """Each layer's parameter dict, in layer order (slices of the stacked arrays for
        scanned layers), ready for `layer_forward` (query and key in halves RoPE order)."""
        a = self.args
        fam = a.fam
        group = fam.block_style == "nested"
        out = []
        if a.scan_layers:
            blocks, rest = block_counts(fam, a.num_layers)
            if blocks:
                stacked = self._weights(self.decoder.layers)
                for b in range(blocks):
                    out += unit_layers(a, jax.tree.map(lambda t, b=b: t[:, b], stacked), group)
            if rest:
                out += unit_layers(a, self._weights(self.decoder.layers_remainder), True)
        else:
            per_unit = len(GEMMA2_SUFFIXES) if fam.block_style == "suffix" else 1
            for u in range(a.num_layers // per_unit):
                out += unit_layers(a, self._weights(getattr(self.decoder, f"layers_{u}")),
                                   False)
        return [rope_halves_order(p, fam) for p in out]

    def _weights(self, module: nnx.Module) -> dict:
        """A module's weights as plain arrays, for the forward pass: tensors the layout
        stores through arithmetic carry the gradient of their HF counterpart
        (models/hf_parameterisation.py)."""
        a = self.args
        return hf_gradients(a.family, a.head_dim, a.emb_dim,
                            nnx.to_pure_dict(nnx.state(module, lora.WEIGHTS)))

    def _embedding(self) -> jax.Array:
        a = self.args
        return hf_gradients(a.family, a.head_dim, a.emb_dim,
                            self.token_embedder.embedding[...], EMBEDDING)

    def output_kernel(self) -> jax.Array:
        """[embed, vocab] output projection (the embedding's transpose when tied)."""
        if self.args.tie_embeddings:
            return self._embedding().T
        return self.decoder.logits_dense.kernel[...]

    def output_kernel_like(self, x: jax.Array) -> jax.Array:
        """`x`, shaped as output_kernel(), sharded as it is ((embed, vocab) either way)."""
        return constrain(x, self.rules, ("embed", "vocab"))

    def logits(self, hidden: jax.Array, kernel: jax.Array | None = None, *,
               split_vocab: bool = False) -> jax.Array:
        """Float32 logits of `hidden` through the output layer (`kernel`, [embed, vocab], is
        output_kernel() unless given). split_vocab: see split_vocab_logits."""
        a = self.args
        if a.tie_embeddings and a.fam.embed_scaled:  # the stored embedding is sqrt(E) times HF's
            hidden = hidden * jnp.asarray(a.emb_dim ** -0.5, hidden.dtype)
        w = (self.output_kernel() if kernel is None else kernel).astype(hidden.dtype)
        # Split over the vocabulary while the rows every chip then takes are fewer than what
        # it spares: the kernel gathered whole and its gradient's partial sum (2 x vocab rows
        # of embed).
        tokens = hidden.size // hidden.shape[-1]
        axes = (vocab_split_axes(self.rules, a.vocab_size)
                if split_vocab and tokens < 2 * a.vocab_size else ())
        kernel_like = self.output_kernel_like
        if axes:
            hidden = Placement(self.rules, PartitionSpec())(hidden)
            kernel_like = Placement(self.rules, PartitionSpec(None, axes))
            w = kernel_like(w)
        logits = output_matmul(hidden, w, kernel_like)
        if a.final_softcap:
            logits = jnp.tanh(logits / a.final_softcap) * a.final_softcap
        if axes:
            spec = PartitionSpec(*[None] * (logits.ndim - 1), axes)
            return Placement(self.rules, spec)(logits)
        return constrain(logits, self.rules,
                         ("activation_batch", "activation_length", "activation_vocab"))

    def split_vocab_logits(self, hidden: jax.Array, kernel: jax.Array | None = None
                           ) -> jax.Array:
        """logits() computed split over the vocabulary instead of over the batch, for a
        training loss that takes them a chunk of the sequence at a time: every chip takes the
        chunk's rows of every batch shard (a few MiB) and its own slice of the vocabulary, so
        no chip holds the whole output kernel, and the kernel's gradient needs no sum across
        chips. Split over the batch, each chip holds the kernel gathered whole and a whole
        [embed, vocab] partial sum of its gradient (Llama 3.2 1B's full step on a v5e-8 peaks
        0.45 GiB a chip higher that way). logits() where the vocabulary does not divide, or
        where the rows outnumber twice the vocabulary."""
        return self.logits(hidden, kernel, split_vocab=True)


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
