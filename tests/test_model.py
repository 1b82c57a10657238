"""Model: MaxText parameter layout, checkpoint restore, KV-cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tpusft.conversion.native import restore_params
from tpusft.errors import CheckpointError
from tpusft.models import sampling
from tpusft.models.decoder import ModelArgs, create_model

ARGS = ModelArgs(family="llama3", vocab_size=64, emb_dim=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-5, rope_theta=5e5,
                 rope_type="llama3", rope_factor=8.0, rope_original_max_position=16,
                 tie_embeddings=False)


def _shapes(model):
    return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_maxtext_layout_scanned_and_unscanned():
    e, n, h, kv, d, m, v = 32, 2, 4, 2, 8, 48, 64
    scanned = _shapes(create_model(ARGS, None))
    assert scanned["token_embedder"]["embedding"] == (v, e)
    dec = scanned["decoder"]
    assert dec["logits_dense"]["kernel"] == (e, v)
    assert dec["decoder_norm"]["scale"] == (e,)
    layers = dec["layers"]
    assert layers["self_attention"]["query"]["kernel"] == (e, n, h, d)
    assert layers["self_attention"]["key"]["kernel"] == (e, n, kv, d)
    assert layers["self_attention"]["out"]["kernel"] == (h, n, d, e)
    assert layers["mlp"]["wi_0"]["kernel"] == (e, n, m)
    assert layers["mlp"]["wo"]["kernel"] == (m, n, e)
    assert layers["pre_self_attention_layer_norm"]["scale"] == (e, n)
    unscanned = _shapes(create_model(ARGS.__class__(**{**ARGS.__dict__, "scan_layers": False}),
                                     None))
    assert unscanned["decoder"]["layers_1"]["self_attention"]["query"]["kernel"] == (e, h, d)
    tied = _shapes(create_model(ARGS.__class__(**{**ARGS.__dict__, "tie_embeddings": True}),
                                None))
    assert "logits_dense" not in tied["decoder"]


def test_scanned_equals_unscanned_forward():
    a = create_model(ARGS, None, seed=1)
    b = create_model(ARGS.__class__(**{**ARGS.__dict__, "scan_layers": False}), None, seed=2)
    pa = nnx.to_pure_dict(nnx.state(a, nnx.Param))
    pb = nnx.state(b, nnx.Param)
    unstacked = dict(pa["decoder"])
    layers = unstacked.pop("layers")
    for i in range(ARGS.num_layers):
        unstacked[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[:, i], layers)
    nnx.replace_by_pure_dict(pb, {"token_embedder": pa["token_embedder"], "decoder": unstacked})
    nnx.update(b, pb)
    tokens = jnp.arange(20).reshape(2, 10) % 64
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    np.testing.assert_allclose(a(tokens, pos)[0], b(tokens, pos)[0], rtol=1e-5, atol=1e-5)


def test_restore_maxtext_layout_checkpoint(tmp_path):
    src = create_model(ARGS, None, seed=1)
    pure = nnx.to_pure_dict(nnx.state(src, nnx.Param))
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt" / "0" / "items",
                                  {"params": {"params": pure}, "step": 0})
    dst = create_model(ARGS, None, seed=2)
    restore_params(dst, str(tmp_path / "ckpt"))
    got = nnx.to_pure_dict(nnx.state(dst, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, pure)

    unscanned = ARGS.__class__(**{**ARGS.__dict__, "scan_layers": False})
    with pytest.raises(CheckpointError, match="holds scanned layers; set scan_layers=true"):
        restore_params(create_model(unscanned, None), str(tmp_path / "ckpt"))
    wider = ARGS.__class__(**{**ARGS.__dict__, "mlp_dim": 64})
    with pytest.raises(CheckpointError, match="has shape"):
        restore_params(create_model(wider, None), str(tmp_path / "ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a native checkpoint"):
        restore_params(dst, str(tmp_path / "empty"))


def test_kv_cache_greedy_decoding_matches_full_recompute():
    model = create_model(ARGS, None, seed=4)
    prompts = [[1, 5, 9, 2], [7, 3]]
    new = sampling.generate(model, prompts, max_new_tokens=6, pad_id=0, eos_ids=[],
                            prefill_length=8)
    for prompt, got in zip(prompts, new, strict=True):
        seq = list(prompt)
        for _ in range(6):
            ids = jnp.asarray(seq)[None]
            logits, _ = model(ids, jnp.arange(len(seq))[None])
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert got == seq[len(prompt):]
