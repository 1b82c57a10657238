"""The training attention kernel (query blocks over a causal, packed mask) against JAX's own
dot_product_attention: outputs and gradients, for full and grouped-query heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpusft.models import attention as attn


def _inputs(t: int, heads: int, kv_heads: int, d: int = 16, batch: int = 2):
    key = jax.random.key(0)
    q = jax.random.normal(key, (batch, t, heads, d))
    k, v = (jax.random.normal(jax.random.fold_in(key, i), (batch, t, kv_heads, d))
            for i in (1, 2))
    # Row 0: two packed segments and trailing padding; row 1: one segment filling the row.
    first = np.zeros(t, np.int32)
    first[: t // 3], first[t // 3: t - 5] = 1, 2
    segments = jnp.asarray(np.stack([first, np.ones(t, np.int32)]))
    return q, k, v, attn.segment_mask(segments), segments


def _oracle(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                        implementation="xla")


@pytest.mark.parametrize("t", [256, 512, 96])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_blocked_attention_matches_jax(t, heads, kv_heads):
    q, k, v, mask, segments = _inputs(t, heads, kv_heads)
    scale = 0.25
    real = (segments != 0)[:, :, None, None]  # padding rows' outputs are never read

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, mask, scale), 0.0) ** 2)

    got, got_grads = jax.value_and_grad(loss(attn.blocked_causal_attention), (0, 1, 2))(q, k, v)
    want, want_grads = jax.value_and_grad(loss(_oracle), (0, 1, 2))(q, k, v)
    assert attn.query_blocks(t) == {256: 2, 512: 4, 96: 1}[t]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))
    out = attn.blocked_causal_attention(q, k, v, mask, scale)
    ref = _oracle(q, k, v, mask, scale)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref, 0), atol=1e-5)


def test_blocked_attention_softcap_matches_full_square():
    q, k, v, mask, _ = _inputs(256, 8, 2)
    got = attn.blocked_causal_attention(q * 4, k, v, mask, 0.25, softcap=5.0)
    want = attn.einsum_attention(q * 4, k, v, mask, 0.25, softcap=5.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, attn.blocked_causal_attention(q * 4, k, v, mask, 0.25))
