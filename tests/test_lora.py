"""LoRA on 8 simulated devices (fsdp x tensor): adapters sharded like their base kernels,
only adapters trained (and given optimizer state), the loss decreases, and merging the
adapters into the kernels gives the unmerged model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_sharding import _cfg, _norm, _train

from tpusft.models import lora
from tpusft.models.decoder import ModelArgs, create_model


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_sharded_lora_training(tmp_path, demo_assets, demo_tokenizer):
    cfg = _cfg(tmp_path, demo_assets, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2",
               "lora.enable_lora=true", "lora.rank=4", "lora.alpha=8", "steps=8",
               "learning_rate=1e-2", "warmup_steps_fraction=0")
    args = ModelArgs.from_config(cfg)
    assert args.lora_targets == frozenset(lora.PROJECTIONS)

    def snapshot(model):
        base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
        return jax.tree.map(lambda x: np.asarray(x), nnx.to_pure_dict(base))

    # The same seed creates the same base weights, so a fresh model is the "before".
    from tpusft.models.sharding import make_mesh

    mesh = make_mesh(1, 4, 2, jax.devices())
    with mesh:
        base_before = snapshot(create_model(args, mesh, cfg.logical_axis_rules, seed=0))
    model, trainer, losses = _train(cfg, demo_tokenizer, jax.devices())

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

    model, trainer, losses = _train(cfg, demo_tokenizer, jax.devices(), quantize)
    query = nnx.to_pure_dict(nnx.state(model, lora.QuantizedWeight))["decoder"]["layers"][
        "self_attention"]["query"]
    assert str(query["kernel_q"].dtype) == "uint4"
    assert _norm(query["kernel_q"].sharding.spec, 4) == ("fsdp", None, "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, sizes["q"], jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(model, lora.QuantizedWeight))))
    opt_paths = [str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(trainer.optimizer, nnx.optimizer.OptState)))[0]]
    assert any("lora_b" in p for p in opt_paths) and not any("kernel" in p for p in opt_paths)
    assert losses[-1] < losses[0] - 0.05, losses
    # Layer kernels at 4 bits plus one f32 scale per 64 values; embedding and norms unchanged.
    assert sizes["after"] < 0.5 * sizes["before"], sizes


def test_target_modules():
    assert lora.target_modules("attention") == {"query", "key", "value", "out"}
    assert lora.target_modules(["q_proj", "down_proj"]) == {"query", "wo"}
    with pytest.raises(ValueError, match="unknown module 'qproj'"):
        lora.target_modules(["qproj"])
