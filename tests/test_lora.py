"""LoRA on 8 simulated devices (fsdp x tensor): adapters sharded like their base kernels,
only adapters trained (and given optimizer state), the loss decreases, and merging the
adapters into the kernels gives the unmerged model's logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_sharding import _cfg, _norm, _train

from tpusft.models import lora
from tpusft.models.decoder import ModelArgs, Transformer, create_model


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_sharded_lora_training(tmp_path, demo_assets, demo_tokenizer):
    cfg = _cfg(tmp_path, demo_assets, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2",
               "lora.enable_lora=true", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1",
               "steps=8", "learning_rate=1e-2", "warmup_steps_fraction=0")
    args = ModelArgs.from_config(cfg)
    assert args.lora_targets == frozenset(lora.PROJECTIONS) and args.lora_dropout == 0.1

    def snapshot(model):
        base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        return jax.tree.map(lambda x: np.asarray(x), nnx.to_pure_dict(base))

    # The same seed creates the same base weights, so a fresh model is the "before".
    from tpusft.models.sharding import make_mesh

    mesh = make_mesh(1, 4, 2, jax.devices())
    with mesh:
        base_before = snapshot(create_model(args, mesh, cfg.logical_axis_rules, seed=0))
    model, trainer, losses, _ = _train(cfg, demo_tokenizer, jax.devices())
    assert trainer.feeder.dropout  # training micro-batches carried their dropout step

    layers = nnx.to_pure_dict(nnx.state(model, nnx.Param))["decoder"]["layers"]
    expect = {  # adapter dims follow the kernel's input (A) and output (B) dims; rank replicated
        ("self_attention", "query", "lora_a"): P("fsdp", None, None),
        ("self_attention", "query", "lora_b"): P(None, None, "tensor", None),
        ("self_attention", "out", "lora_a"): P("tensor", None, None, None),
        ("self_attention", "out", "lora_b"): P(None, None, "fsdp"),
        ("mlp", "wi_0", "lora_a"): P("fsdp", None, None),
        ("mlp", "wi_0", "lora_b"): P(None, None, "tensor"),
        ("mlp", "wo", "lora_a"): P("tensor", None, None),
        ("mlp", "wo", "lora_b"): P(None, None, "fsdp"),
    }
    for path, spec in expect.items():
        leaf = _leaf(layers, path)
        assert _norm(leaf.sharding.spec, leaf.ndim) == _norm(spec, leaf.ndim), path

    # Only adapters have optimizer state and change; the base is untouched.
    opt_paths = [str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(trainer.optimizer, nnx.optimizer.OptState)))[0]]
    assert any("lora_a" in p for p in opt_paths)
    assert not any("'kernel'" in p or "embedding" in p or "scale" in p for p in opt_paths)
    after = snapshot(model)
    jax.tree.map(np.testing.assert_array_equal, base_before, after)
    assert float(jnp.abs(_leaf(layers, ("mlp", "wo", "lora_b"))).max()) > 0
    assert losses[-1] < losses[0] - 0.05, losses

    # Merged kernels give the adapted model's logits.
    ids = jnp.asarray(np.arange(32).reshape(2, 16) % cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    with mesh:
        adapted, _ = model(ids, pos)
        lora.merge(model, args.lora_scale, args.scan_layers)
        assert lora.count(model)[0] == 0
        merged, _ = model(ids, pos)
    scale = float(jnp.abs(adapted).max())
    assert float(jnp.abs(adapted - merged).max()) < 1e-5 * max(scale, 1.0)


def test_sharded_qlora_training(tmp_path, demo_assets, demo_tokenizer):
    """nf4 base kernels (Qwix) stay frozen and quantized; the adapters learn."""
    cfg = _cfg(tmp_path, demo_assets, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2",
               "lora.enable_lora=true", "lora.rank=4", "lora.weight_qtype=nf4", "steps=8",
               "learning_rate=1e-2", "warmup_steps_fraction=0", "base_emb_dim=128",
               "base_mlp_dim=256")
    args = ModelArgs.from_config(cfg)
    sizes = {}

    def quantize(model):
        sizes["before"] = lora.weight_bytes(model)
        assert lora.quantize_base(model, "nf4", args.scan_layers) == 7
        sizes["after"] = lora.weight_bytes(model)
        sizes["q"] = jax.tree.map(np.asarray, nnx.to_pure_dict(
            nnx.state(model, lora.QuantizedWeight)))

    model, trainer, losses, _ = _train(cfg, demo_tokenizer, jax.devices(), quantize)
    query = nnx.to_pure_dict(nnx.state(model, lora.QuantizedWeight))["decoder"]["layers"][
        "self_attention"]["query"]
    # two nf4 codes a byte along the last axis (head_dim 16 -> 8)
    assert str(query["kernel_q"].dtype) == "uint8"
    assert query["kernel_q"].shape[-1] * 2 == query["kernel_scale"].shape[-1]
    assert _norm(query["kernel_q"].sharding.spec, 4) == ("fsdp", None, "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, sizes["q"], jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(model, lora.QuantizedWeight))))
    opt_paths = [str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(trainer.optimizer, nnx.optimizer.OptState)))[0]]
    assert any("lora_b" in p for p in opt_paths) and not any("kernel" in p for p in opt_paths)
    assert losses[-1] < losses[0] - 0.05, losses
    # Layer kernels at 4 bits plus one f32 scale per 64 values; embedding and norms unchanged.
    assert sizes["after"] < 0.5 * sizes["before"], sizes


def test_nf4_kernels_two_codes_a_byte_dequantize_as_qwix():
    """Packed nf4 kernels (uint8, two codes a byte) give Qwix's own dequantization of its
    uint4 codes, for an even and an odd last axis and a stacked-layer kernel."""
    import qwix

    for shape in ((128, 6), (128, 7), (128, 3, 4, 10)):
        k = jax.random.normal(jax.random.key(len(shape)), shape)
        q = qwix.quantize(k, "nf4", channelwise_axes=tuple(range(1, len(shape))),
                          tiled_axes={0: lora.BLOCK}, scale_dtype=jnp.float32)
        packed = lora.pack_nf4(q.qvalue)
        assert packed.dtype == jnp.uint8
        assert packed.shape[-1] == (shape[-1] if shape[-1] % 2 else shape[-1] // 2)
        np.testing.assert_array_equal(
            lora.dequantize(packed, q.scale, "nf4", jnp.float32),
            qwix.dequantize(q).astype(jnp.float32))


def test_target_modules():
    assert lora.target_modules("attention") == {"query", "key", "value", "out"}
    assert lora.target_modules(["q_proj", "down_proj"]) == {"query", "wo"}
    with pytest.raises(ValueError, match="unknown module 'qproj'"):
        lora.target_modules(["qproj"])


ARGS = ModelArgs(family="llama3", vocab_size=64, emb_dim=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-5, rope_theta=1e4,
                 lora_rank=4, lora_alpha=8.0, lora_targets=frozenset({"query", "out", "wi_1"}),
                 lora_dropout=0.3)
TOKENS = jnp.arange(40).reshape(2, 20) % 64
POS = jnp.broadcast_to(jnp.arange(20), (2, 20))


def _numpy_model(args):
    """A model with random weights and nonzero adapters drawn by numpy (no threefry programs to
    compile), so that the adapters and their dropout change the output."""
    model = nnx.eval_shape(lambda: Transformer(args, None, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    rng = np.random.default_rng(7)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                         state)
    nnx.update(model, state)
    return model


def test_dropout_is_pefts_inverted_dropout():
    x = jnp.full((200, 500), 2.0)
    y = np.asarray(lora.dropout(x, 0.25, jax.random.key(0)))
    assert abs(np.mean(y == 0) - 0.25) < 0.01
    np.testing.assert_allclose(y[y != 0], 2.0 / 0.75, rtol=1e-6)
    # Only the adapter's input is dropped: a zero adapter leaves the projection exact.
    p = {"kernel": jax.random.normal(jax.random.key(1), (32, 16)),
         "lora_a": jax.random.normal(jax.random.key(2), (32, 4)), "lora_b": jnp.zeros((4, 16))}
    h = jax.random.normal(jax.random.key(3), (2, 5, 32))
    drop = (0.5, jax.random.key(4))
    np.testing.assert_array_equal(lora.project(h, p, "bte,em->btm", 1, (2.0, ""), drop),
                                  jnp.einsum("bte,em->btm", h, p["kernel"]))
    # The expectation over masks is the undropped projection (dropout before a linear map).
    p["lora_b"] = jax.random.normal(jax.random.key(5), (4, 16))
    clean = lora.project(h, p, "bte,em->btm", 1, (2.0, ""))
    mean = jnp.mean(jax.vmap(lambda k: lora.project(h, p, "bte,em->btm", 1, (2.0, ""),
                                                    (0.5, k)))(jax.random.split(drop[1], 4000)),
                    axis=0)
    assert float(jnp.abs(mean - clean).max()) < 0.05 * float(jnp.abs(clean).max())


@nnx.jit
def _logits(model, key):
    return model(TOKENS, POS, dropout_key=key)[0]


def test_dropout_keyed_per_step_and_layer_off_without_key():
    model = _numpy_model(ARGS)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    plain = _logits(model, None)
    a1 = _logits(model, k1)
    assert float(jnp.abs(a1 - plain).max()) > 1e-3           # dropout acts in training calls
    np.testing.assert_array_equal(a1, _logits(model, k1))    # same key, same masks
    assert float(jnp.abs(a1 - _logits(model, k2)).max()) > 1e-3
    # lora.dropout=0 ignores the key.
    m0 = _numpy_model(dataclasses.replace(ARGS, lora_dropout=0.0))
    np.testing.assert_array_equal(_logits(m0, k1), plain)

    # Scanned and unrolled layers draw the same mask for the same layer.
    unrolled = _numpy_model(dataclasses.replace(ARGS, scan_layers=False))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dec = dict(p["decoder"])
    layers = dec.pop("layers")
    for i in range(ARGS.num_layers):
        dec[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[:, i], layers)
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, {"token_embedder": p["token_embedder"], "decoder": dec})
    nnx.update(unrolled, state)
    np.testing.assert_allclose(_logits(unrolled, k1), a1, rtol=1e-4, atol=1e-4)


def test_sft_loss_and_feeder_key_dropout_by_training_step():
    from tpusft.training import loss as loss_lib
    from tpusft.training.feeder import BatchFeeder

    model = _numpy_model(ARGS)
    batch = {"inputs": np.asarray(TOKENS), "targets": np.asarray(TOKENS),
             "weights": np.ones((2, 20), np.float32), "segment_ids": np.ones((2, 20), np.int32),
             "positions": np.asarray(POS)}
    feeder = BatchFeeder(iter([batch, batch]), 2)
    feeder.dropout = True

    class Ctx:
        iter_steps = 5

    micro = feeder.load_next_train_batch(Ctx)
    assert int(micro["dropout_step"]) == 5 and micro["inputs"].shape == (1, 20)
    micro.update(loss_denominator=np.float32(20.0))
    loss = nnx.jit(loss_lib.sft_loss, static_argnames="seed")

    def at(step, seed=0):
        return float(loss(model, **{**micro, "dropout_step": step}, seed=seed))

    assert at(np.int32(5)) == at(np.int32(5))
    assert at(np.int32(5)) != at(np.int32(6)) and at(np.int32(5)) != at(np.int32(5), seed=1)
    assert at(np.int32(5)) != at(None)  # evaluation batches have no step: no dropout


def test_qlora_steps_are_lora_steps_on_the_dequantized_base(tmp_path, demo_assets,
                                                            demo_tokenizer):
    """A QLoRA run's adapters take the steps a LoRA run takes on a base whose kernels are the
    dequantized nf4 ones (the trajectory tests hold LoRA's steps to PEFT's), query adapters of
    this Llama-shaped model (stored scaled by 1/sqrt(head_dim)) included."""
    extra = ("ici_fsdp_parallelism=4", "ici_tensor_parallelism=2", "lora.enable_lora=true",
             "lora.rank=4", "steps=4", "learning_rate=1e-3", "warmup_steps_fraction=0",
             "adam_weight_decay=0.1", "gradient_clipping_threshold=0.5",
             "base_emb_dim=128", "base_mlp_dim=256")

    def start(model, dequantize):
        assert lora.quantize_base(model, "nf4", True) == 7
        for i, (_, m) in enumerate(lora.adapters(model)):
            m.lora_b[...] = 0.01 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
            if dequantize:
                m.kernel = nnx.Param(lora.dequantize(m.kernel_q[...], m.kernel_scale[...], "nf4",
                                                     jnp.float32))
                del m.kernel_q, m.kernel_scale

    runs = {}
    for name, qtype in (("qlora", "lora.weight_qtype=nf4"), ("lora", "lora.weight_qtype=")):
        cfg = _cfg(tmp_path / name, demo_assets, *extra, qtype)
        model, _, losses, _ = _train(cfg, demo_tokenizer, jax.devices(),
                                     lambda m, d=name == "lora": start(m, d))
        runs[name] = losses, jax.tree.map(np.asarray, nnx.to_pure_dict(
            nnx.state(model, nnx.LoRAParam)))
    np.testing.assert_allclose(runs["qlora"][0], runs["lora"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 runs["qlora"][1], runs["lora"][1])
    assert runs["qlora"][0][-1] < runs["qlora"][0][0]
