"""Splash attention (models/splash.py) against blocked_causal_attention, forward and
gradients, in Pallas' interpret mode on CPU; and compiled for a TPU topology with libtpu."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpusft.models import attention as attn
from tpusft.models import splash

B, T, D = 2, 256, 128


def _inputs(h, kv, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, h, D), jnp.float32)
    k = jax.random.normal(keys[1], (B, T, kv, D), jnp.float32)
    v = jax.random.normal(keys[2], (B, T, kv, D), jnp.float32)
    ct = jax.random.normal(keys[3], (B, T, h, D), jnp.float32)  # the output's cotangent
    # row 0: one sequence and padding; row 1: three packed sequences
    ids = np.zeros((B, T), np.int32)
    ids[0, :200] = 1
    ids[1, :90], ids[1, 90:170], ids[1, 170:] = 1, 2, 3
    return q, k, v, ct, jnp.asarray(ids)


def _reference_mask(ids, window):
    mask = attn.segment_mask(ids)
    if window:
        distance = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
        mask = mask & (distance < window)[None]
    return mask


CASES = {  # name: (query heads, kv heads, window, softcap)
    "causal": (4, 4, 0, 0.0),
    "gqa": (8, 2, 0, 0.0),
    "sliding-window": (4, 2, 64, 0.0),
    "softcap": (4, 2, 0, 50.0),
    "window-and-softcap": (4, 1, 96, 30.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_blocked_attention_forward_and_gradients(case):
    h, kv, window, softcap = CASES[case]
    q, k, v, ct, ids = _inputs(h, kv)
    scale = D ** -0.5
    real = (ids != 0)[..., None, None]  # padding positions' outputs feed nothing

    def ours(q, k, v):
        out = splash.splash_attention(q, k, v, ids, scale, window, softcap, interpret=True)
        return jnp.sum(jnp.where(real, out, 0) * ct), out

    def theirs(q, k, v):
        out = attn.blocked_causal_attention(q, k, v, _reference_mask(ids, window), scale,
                                            softcap)
        return jnp.sum(jnp.where(real, out, 0) * ct), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(theirs, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0),
                               atol=2e-5, rtol=2e-5)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5, err_msg=name)


def test_sharded_over_batch_and_heads_equals_one_device():
    from tpusft.models.sharding import make_mesh

    q, k, v, _, ids = _inputs(8, 4)
    one = splash.splash_attention(q, k, v, ids, 0.1, interpret=True)
    mesh = make_mesh(1, 2, 4)  # fsdp 2 (rows), tensor 4 (kv heads)
    sharded = jax.jit(lambda *a: splash.sharded_splash_attention(
        mesh, ("data", "fsdp"), "tensor", *a, scale=0.1, interpret=True))(q, k, v, ids)
    real = (ids != 0)[..., None, None]
    np.testing.assert_allclose(np.where(real, sharded, 0), np.where(real, one, 0), atol=1e-6)


def test_what_the_kernel_cannot_serve_is_named():
    assert splash.unavailable(2048, 128) == ""
    assert splash.unavailable(200, 128) == "sequence length 200 is not a multiple of 128"
    assert splash.unavailable(1024, 64) == ""
    assert splash.unavailable(1024, 96) == "head_dim 96 is neither 64 nor a multiple of 128"
    assert splash.block_size(2048) == 512 and splash.block_size(384) == 128


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_compiles_for_a_tpu_topology_with_no_quadratic_mask():
    """The kernel's forward and backward compile for v5e-8 over a mesh (TPU compiler), and the
    program holds nothing of T x T size."""
    from tpusft.aot.topology import parse
    from tpusft.models.sharding import make_mesh

    t, h = 4096, 8
    mesh = make_mesh(1, 8, 1, devices=parse("v5e-8").devices())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    shape = jax.ShapeDtypeStruct((8, t, h, 128), jnp.bfloat16, sharding=rows)
    ids = jax.ShapeDtypeStruct((8, t), jnp.int32, sharding=rows)

    def loss(q, k, v, ids):
        out = splash.sharded_splash_attention(mesh, ("data", "fsdp"), "tensor", q, k, v, ids,
                                              scale=0.1, window=1024)
        return jnp.sum(out.astype(jnp.float32))

    with mesh:
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, ids)
        compiled = lowered.compile()
    text = lowered.as_text()
    assert f"{t}x{t}" not in text
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes < t * t  # far below one [T, T] byte mask per device


def _model_args(family, **kw):
    from tpusft.models.decoder import ModelArgs

    base = dict(family=family, vocab_size=64, emb_dim=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=128, mlp_dim=96, norm_eps=1e-6, rope_theta=1e4,
                tie_embeddings=False, dtype="float32")
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("family,extra", [
    ("llama3", {}),
    ("gemma2", {"sliding_window": 48, "attn_softcap": 50.0, "final_softcap": 30.0,
                "query_pre_attn_scalar": 128.0, "tie_embeddings": True}),
    ("mistral", {"sliding_window": 40}),
])
def test_models_attending_with_splash_equal_xla_on_packed_rows(family, extra):
    """attention=splash (interpreted here) gives the XLA path's logits and gradients on packed
    rows, for causal, sliding-window and soft-capped families, on a mesh of 8 devices."""
    from flax import nnx

    from tpusft.config.schema import DEFAULT_LOGICAL_AXIS_RULES
    from tpusft.models.decoder import create_model
    from tpusft.models.sharding import make_mesh

    mesh = make_mesh(1, 4, 2)
    t = 128
    ids = np.zeros((4, t), np.int32)
    ids[:, :60], ids[:, 60:110] = 1, 2  # two packed sequences, then padding
    positions = np.where(ids == 2, np.arange(t) - 60, np.arange(t)) * (ids != 0)
    tokens = (np.arange(4 * t).reshape(4, t) * 7 + 3) % 64
    real = (ids != 0)[..., None]
    assert splash.why_not("splash", None, t, 128) == ""  # the kernel serves these shapes
    assert splash.why_not("auto", None, t, 128) == "not on TPU"
    out = {}
    for attention in ("xla", "splash"):
        args = _model_args(family, attention=attention, **extra)
        with mesh:
            model = create_model(args, mesh, DEFAULT_LOGICAL_AXIS_RULES, seed=0)

            def loss(model):
                logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions), None, None,
                                  jnp.asarray(ids))
                return jnp.sum(jnp.where(real, logits, 0) ** 2) / 1e3, logits

            (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        out[attention] = (np.where(real, logits, 0), jax.tree.leaves(nnx.to_pure_dict(grads)))
    np.testing.assert_allclose(out["splash"][0], out["xla"][0], atol=2e-5, rtol=2e-5)
    for g, r in zip(out["splash"][1], out["xla"][1], strict=True):
        np.testing.assert_allclose(g, r, atol=2e-4, rtol=2e-4)
