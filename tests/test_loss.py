"""The SFT loss: the fused, chunked output layer + cross-entropy against the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpusft.models.decoder import ModelArgs, create_model
from tpusft.training import loss as loss_lib


def _model(family="llama3", tied=False, lora_rank=0):
    args = ModelArgs(family=family, vocab_size=96, emb_dim=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, mlp_dim=64, norm_eps=1e-6, rope_theta=1e4,
                     tie_embeddings=tied, final_softcap=30.0 if family == "gemma2" else 0.0,
                     lora_rank=lora_rank, lora_alpha=2.0 * lora_rank,
                     lora_targets=frozenset({"query", "wo"}) if lora_rank else frozenset())
    return create_model(args, None, seed=1)


def _batch(seed=0, b=3, t=16, vocab=96):
    rng = np.random.default_rng(seed)
    weights = (rng.random((b, t)) > 0.3).astype(np.float32)
    weights[:, -3:] = 0.0  # padding
    inputs, targets = (jnp.asarray(rng.integers(0, vocab, (b, t))) for _ in range(2))
    return inputs, targets, jnp.asarray(weights)


@pytest.mark.parametrize("family,tied", [("llama3", False), ("gemma2", True)])
@pytest.mark.parametrize("tiles", [1, 2, 4])
def test_fused_loss_and_gradients_equal_the_plain_formula(family, tied, tiles):
    """Value and gradients (hidden and output kernel) of output_nll_sum equal optax's
    cross-entropy on the model's full logits, with soft-capping and scaled tied embeddings."""
    model = _model(family, tied)
    inputs, targets, weights = _batch()
    hidden = jax.random.normal(jax.random.key(2), (*inputs.shape, 32))
    kernel = model.output_kernel()

    def plain(h, w):
        logits = model.logits(h, w)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

    def fused(h, w):
        return loss_lib.output_nll_sum(h, w, targets, weights, model.logits, tiles, True)

    want, (want_dh, want_dw) = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
    got, (got_dh, got_dw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_dh, want_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-4, atol=1e-6)
    # The cotangent scales both gradients (the loss is divided by the token count after).
    got2 = jax.grad(lambda h: 0.25 * fused(h, kernel))(hidden)
    np.testing.assert_allclose(got2, 0.25 * want_dh, rtol=1e-4, atol=1e-6)


def test_sft_loss_gradients_match_full_logits_for_full_and_lora_models():
    """sft_loss through the model with 4 tiles equals the loss on the model's full logits, for
    every trained parameter; a LoRA model trains its adapters the same way."""
    from flax import nnx

    inputs, targets, weights = _batch(1)
    segments = jnp.ones(inputs.shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)

    def reference(m):
        logits, _ = m(inputs, positions, None, None, segments)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights) / 7.0

    def fused(m):
        return loss_lib.sft_loss(m, inputs, targets, weights, segments, positions, 7.0,
                                 vocab_tiles=4)

    for lora_rank, wrt in ((0, nnx.Param), (4, nnx.LoRAParam)):
        model = _model(lora_rank=lora_rank)
        if lora_rank:  # non-zero adapters, so their gradients are not trivially related
            nnx.update(model, jax.tree.map(lambda x: x + 0.1, nnx.state(model, nnx.LoRAParam)))
        diff = nnx.DiffState(0, wrt)
        want, want_g = nnx.value_and_grad(reference, argnums=diff)(model)
        got, got_g = nnx.jit(nnx.value_and_grad(fused, argnums=diff))(model)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_automatic_vocab_tiles_bound_one_chunk_of_logits():
    chunk = loss_lib.LOGITS_CHUNK_BYTES
    assert loss_lib.vocab_tiles(0, 2048, 512, 32000) == 2  # 250 MiB of logits -> 2 chunks
    assert loss_lib.vocab_tiles(0, 512, 512, 32000) == 1
    n = loss_lib.vocab_tiles(0, 8192, 8192, 128256)
    assert 8192 * 128256 * 4 / n <= chunk and 8192 % n == 0 and n == 32
    assert loss_lib.vocab_tiles(0, 12, 12, 10**8) == 4  # stops where 2n no longer divides T
    assert loss_lib.vocab_tiles(3, 2048, 513, 32000) == 3  # a configured value is kept
