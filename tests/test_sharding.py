"""Sharding on 8 simulated devices: params and optimizer state sharded as configured, the
loss of sharded training steps equal to the 1-device run, and nothing compiled after step 1."""

import time

import jax
import numpy as np
import pytest
from conftest import LOWERED, record_lowering
from flax import nnx
from jax.sharding import PartitionSpec as P

from tpusft.config import load_config
from tpusft.config.loader import configs_root
from tpusft.data import packing, sources
from tpusft.models.decoder import ModelArgs, create_model
from tpusft.models.sharding import make_mesh
from tpusft.training import trainer as trainer_lib
from tpusft.training.feeder import BatchFeeder
from tpusft.training.progress import Progress
from tpusft.training.optimizer import make_optimizer


def _cfg(tmp_path, demo_assets, *extra):
    return load_config([
        str(configs_root() / "demo" / "sft.yml"), f"base_output_directory={tmp_path}",
        "hf_path=json", f"hf_data_files={demo_assets / 'train.jsonl'}",
        f"tokenizer_path={demo_assets / 'tokenizer'}", "demo_task=", "enable_checkpointing=false",
        "global_batch_size=8", "max_target_length=64", "steps=3", "log_period=1",
        "base_emb_dim=64", "base_mlp_dim=128", "base_num_query_heads=4",
        "base_num_kv_heads=2", "head_dim=16", *extra])


def _norm(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _train(cfg, tokenizer, devices, prepare=None):
    """Trains cfg.steps steps; `prepare(model)` runs between model creation and the trainer.
    Returns the model, the trainer, the losses and when programs were lowered after step 2
    began."""
    mesh = make_mesh(cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism,
                     cfg.ici_tensor_parallelism, devices)
    srcs, part = sources.sources(cfg, train=True)
    ds, _ = packing.build_dataset(srcs, sources.options(cfg, train=True), tokenizer,
                                   cfg.global_batch_size, train=True, part=part)
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, seed=0)
        if prepare is not None:
            prepare(model)
        feeder = BatchFeeder(ds, cfg.gradient_accumulation_steps)
        trainer = trainer_lib.build_trainer(model, make_optimizer(cfg), cfg, feeder)
        losses, starts = [], []

        class Record(Progress):
            def on_train_step_start(self, ctx):
                super().on_train_step_start(ctx)
                starts.append(time.perf_counter())

            def on_train_step_end(self, ctx, step, loss):
                losses.append(float(loss))

        trainer.with_training_hooks(Record(feeder, cfg.steps, 1, 1.0, 0.0, None))
        jax.monitoring.register_event_duration_secs_listener(record_lowering)
        began = time.perf_counter()
        trainer.train([])
    assert any(t > began for t in LOWERED), "the first step lowered no program: no listener?"
    lowered_later = [t for t in LOWERED if t > starts[1]] if len(starts) > 1 else []
    return model, trainer, losses, lowered_later


def test_params_and_optimizer_state_are_sharded(tmp_path, demo_assets, demo_tokenizer):
    cfg = _cfg(tmp_path, demo_assets, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2",
               "steps=1")
    model, trainer, _, _ = _train(cfg, demo_tokenizer, jax.devices())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = params["decoder"]["layers"]
    expect = {
        ("token_embedder", "embedding"): P("tensor", "fsdp"),
        ("decoder", "layers", "self_attention", "query", "kernel"): P("fsdp", None, "tensor", None),
        ("decoder", "layers", "self_attention", "out", "kernel"): P("tensor", None, None, "fsdp"),
        ("decoder", "layers", "mlp", "wi_0", "kernel"): P("fsdp", None, "tensor"),
        ("decoder", "layers", "mlp", "wo", "kernel"): P("tensor", None, "fsdp"),
    }
    for path, spec in expect.items():
        leaf = params
        for k in path:
            leaf = leaf[k]
        assert _norm(leaf.sharding.spec, leaf.ndim) == _norm(spec, leaf.ndim), path
        assert len(leaf.addressable_shards) == 8
        shard = leaf.addressable_shards[0].data.shape
        assert np.prod(shard) == np.prod(leaf.shape) // 8, (path, shard)
    assert _norm(layers["pre_self_attention_layer_norm"]["scale"].sharding.spec, 2) == (None, None)

    opt_state = nnx.to_pure_dict(nnx.state(trainer.optimizer, nnx.optimizer.OptState))
    mu_query = [x for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                if "mu" in str(p) and "query" in str(p)]
    assert mu_query, "no Adam first moment for the query kernel"
    assert _norm(mu_query[0].sharding.spec, 4) == ("fsdp", None, "tensor", None)
    assert np.prod(mu_query[0].addressable_shards[0].data.shape) == np.prod(mu_query[0].shape) // 8


@pytest.mark.parametrize("mesh_args", [
    ("ici_fsdp_parallelism=8",),
    ("ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"),
])
def test_sharded_losses_match_one_device(tmp_path, demo_assets, demo_tokenizer, mesh_args):
    one = _cfg(tmp_path / "one", demo_assets, "ici_fsdp_parallelism=1")
    _, _, ref, _ = _train(one, demo_tokenizer, jax.devices()[:1])
    cfg = _cfg(tmp_path / "many", demo_assets, "ici_fsdp_parallelism=1", *mesh_args)
    _, _, got, lowered_later = _train(cfg, demo_tokenizer, jax.devices())
    assert len(ref) == len(got) == 3
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert ref[-1] < ref[0]
    # Static shapes and shardings: steps 2 and 3 reuse step 1's program.
    assert lowered_later == []
