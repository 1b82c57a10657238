"""GRPO compiled for a TPU topology: each program one GRPO step runs, from shapes alone.

One step of a GRPO run (Tunix's RLCluster and learner over tpusft's decoder, rl/grpo.py) runs
these programs on one mesh, in this order, over global_batch_size x num_generations rows:
  1. the rollout: Tunix's sampler's prefill and decode programs, with a KV cache of
     max_prompt_length + max_completion_length positions;
  2. the reference's per-token log-probs (beta != 0, and DAPO), and with num_iterations > 1
     the policy's, both Tunix's `compute_per_token_logps`;
  3. the update: the actor trainer's train step (Tunix's, as for SFT) with the learner's
     policy loss, prompts left-padded to max_prompt_length and completions right-padded to
     max_completion_length, as the learner pads them.
The actor's weights and optimizer state and the reference's own weights (a LoRA reference
shares the actor's base) stay in HBM through all of them, so each program's total adds what
is resident but not its argument; the step fits when every program does. The rollout model is
the actor itself (one mesh for every role: Tunix shares it, no copy), and Tunix's start-of-step
policy snapshot lives in host memory.

The sampler's jitted programs and its flattened weights are Tunix private names, reached
through internals/tunix_private.py; tests/test_aot.py lowers each program through them and
checks it against the one a real cluster's learner runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tpusft.aot import compile_step
from tpusft.aot.compile_step import Compiled
from tpusft.errors import ConfigError
from tpusft.internals import tunix_private
from tpusft.models.sharding import BATCH_AXES

def rows(cfg: Any) -> int:
    """Rows of every GRPO program: each prompt's completions side by side."""
    return cfg.global_batch_size * cfg.grpo.num_generations


def actor_trainer(model: nnx.Module, optimizer, cfg: Any, pad_id: int, eos_id: int):
    """The actor trainer as RLCluster builds it (Tunix's rl Trainer over training_config),
    its loss and inputs set as the learner sets them (the registered policy loss of the
    algorithm's config, with the rollout temperature and the tokenizer's pad and EOS ids)."""
    from tunix.rl import function_registry
    from tunix.rl import trainer as rl_trainer

    from tpusft.rl import grpo

    _, algo = grpo.algorithm_config(cfg)
    algo.temperature = cfg.grpo.temperature
    trainer = rl_trainer.Trainer(model, optimizer,
                                 compile_step.quiet(grpo.training_config(cfg)),
                                 custom_checkpoint_metadata_fn=dict)
    policy_loss = function_registry.get_policy_loss_fn(algo.policy_loss_fn)
    trainer.with_loss_fn(lambda m, train_example, algo_config: policy_loss(
        m, train_example, algo_config=algo, pad_id=pad_id, eos_id=eos_id), has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    return trainer


def train_example(cfg: Any, n: int, sharding=None):
    """Shapes of the learner's TrainExample for `n` rows (grpo_learner's dtypes)."""
    from tunix.rl.grpo.grpo_learner import TrainExample

    from tpusft.rl import grpo

    p, c = cfg.grpo.max_prompt_length, cfg.grpo.max_completion_length

    def s(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return TrainExample(
        prompt_ids=s((n, p), jnp.int32), prompt_mask=s((n, p), jnp.bool_),
        completion_ids=s((n, c), jnp.int32), completion_mask=s((n, c), jnp.bool_),
        advantages=s((n,), jnp.float32),
        ref_per_token_logps=s((n, c), jnp.float32) if grpo.needs_reference(cfg) else None,
        old_per_token_logps=s((n, c), jnp.float32) if cfg.grpo.num_iterations > 1 else None)


def tokens(cfg: Any) -> tuple[Any, int, int]:
    """(tokenizer, pad id, EOS id): the rollout's padding and stop ids are constants of its
    programs, so a compile-only GRPO run reads the tokenizer (never weights or data)."""
    from tunix.generate import tokenizer_adapter

    from tpusft.data.chat import load_tokenizer

    path = cfg.tokenizer_path
    if not path and cfg.demo_task:  # the demo's generated tokenizer, as its run uses
        from tpusft.demo import arithmetic

        path = str(arithmetic.ensure_assets(cfg.base_output_directory) / "tokenizer")
    if not path:
        raise ConfigError("a compile-only GRPO run needs tokenizer_path: the rollout's pad and "
                          "end-of-sequence ids are part of its programs")
    tokenizer = load_tokenizer(path)
    adapter = tokenizer_adapter.TokenizerAdapter(tokenizer)
    return tokenizer, adapter.pad_id(), adapter.eos_id()


def sampler(model: nnx.Module, tokenizer, cfg: Any):
    """Tunix's Sampler as its vanilla rollout builds it over the actor, with the stop ids the
    run's rollout config gives it for each call."""
    from tunix.generate import sampler as sampler_lib

    from tpusft.rl import grpo

    a = model.args
    s = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
        cache_size=cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length,
        num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim))
    s.eos_ids = jnp.array(grpo.rollout_config(cfg, tokenizer).eos_tokens)  # Sampler.__call__
    return s


def prefill_program(s, cfg: Any, n: int):
    """(the prefill lowered for `n` left-padded prompts, the sampling state it takes)."""
    p, c = cfg.grpo.max_prompt_length, cfg.grpo.max_completion_length
    seed = jax.random.key_data(jax.random.key(cfg.seed))
    state = jax.eval_shape(lambda ids: s.init_sample_state(
        ids, total_sampling_steps=p + c, include_logits=False, forbidden_token_ids=None,
        temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k or None,
        seed=seed,
        beam_size=None, include_logprobs=False), jax.ShapeDtypeStruct((n, p), jnp.int32))
    # A static field the sampler fills with a concrete array (shape evaluation traced it),
    # and the cache as the model's init_cache places it (shape evaluation drops placement).
    state = state.replace(num_input_tokens=jnp.array(p, dtype=jnp.int32),
                          cache=s.transformer.cache_layout(n, p + c, s.dtype))
    prefill, _, weights = tunix_private.sampler_programs(s)
    return prefill.lower(weights, state, None, echo=False), state


def decode_program(s, prefill_lowered, prefill_compiled, state):
    """The decode loop lowered over the prefill's output (the sampling `state` it was given,
    as the compiler placed it; weak types as in the input, which the output keeps)."""
    out = jax.tree.map(lambda x, sh, given: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sh, weak_type=given.weak_type),
        prefill_lowered.out_info, prefill_compiled.output_shardings, state)
    _, decode, weights = tunix_private.sampler_programs(s)
    return decode.lower(weights, out), out


def logps_program(model: nnx.Module, cfg: Any, n: int, pad_id: int, eos_id: int,
                  temperature: float, sharded: bool):
    """Tunix's compute_per_token_logps over `model` for `n` prompt + completion rows: the
    reference's (inputs placed over the batch axes, the rollout temperature) or the old
    policy's (inputs as the learner leaves them, temperature 1)."""
    from tunix.rl import common

    mesh = model.rules.mesh
    place = NamedSharding(mesh, PartitionSpec(BATCH_AXES)) if sharded else None
    graphdef, state = nnx.split(model)
    return common.compute_per_token_logps.lower(
        graphdef, state,
        prompt_tokens=jax.ShapeDtypeStruct((n, cfg.grpo.max_prompt_length), jnp.int32,
                                           sharding=place),
        completion_tokens=jax.ShapeDtypeStruct((n, cfg.grpo.max_completion_length), jnp.int32,
                                               sharding=place),
        pad_id=pad_id, eos_id=eos_id, stop_gradient=True, return_logits=False,
        temperature=temperature)


@dataclasses.dataclass
class Programs:
    """Each program's compiler result, by name, in the order a step runs them."""

    results: dict[str, Compiled]
    kv_cache: int  # bytes per device of the rollout's KV cache (0: the prefill did not fit)

    @property
    def worst(self) -> Compiled:
        """The first program that does not fit, else the one that holds the most."""
        failed = [r for r in self.results.values() if not r.fits]
        return failed[0] if failed else max(self.results.values(), key=lambda r: r.total)


def compile_programs(cfg: Any, mesh) -> Programs:
    """Every program of one GRPO step for `mesh`'s devices, from shapes."""
    from tpusft.rl import grpo
    from tpusft.training.setup import reference_model

    tokenizer, pad_id, eos_id = tokens(cfg)
    n = rows(cfg)
    def make(model, optimizer, cfg):  # as grpo.build_cluster: the actor and its reference
        reference = reference_model(model) if grpo.needs_reference(cfg) else None
        return actor_trainer(model, optimizer, cfg, pad_id, eos_id), reference

    trainer, model, optimizer, reference = compile_step.abstract_trainer(cfg, mesh, make)
    params = compile_step.per_device_bytes(nnx.state(model))
    opt = compile_step.per_device_bytes(nnx.state(optimizer, nnx.optimizer.OptState))
    ref_all = compile_step.per_device_bytes(nnx.state(reference)) if reference else 0
    ref_own = (compile_step.per_device_bytes(nnx.state(reference, nnx.LoRAParam))
               if reference is not None and cfg.lora.enable_lora else ref_all)
    resident = params + opt + ref_own

    def result(lowered, takes: int, reference_is_argument: bool = False) -> Compiled:
        """Compiled, with the resident state that is not among its arguments (`takes`
        bytes of it are) added to its total."""
        r = compile_step.compile_lowered(lowered, params, opt)
        r.reference = 0 if reference_is_argument else ref_own
        r.resident = resident - takes - r.reference
        return r

    results, cache = {}, 0
    with mesh:
        s = sampler(model, tokenizer, cfg)
        prefill, state = prefill_program(s, cfg, n)
        results["rollout prefill"] = result(prefill, params)
        if results["rollout prefill"].fits:
            decode, state = decode_program(s, prefill, results["rollout prefill"].executable,
                                           state)
            cache = compile_step.per_device_bytes(state.cache)
            results["rollout decode"] = result(decode, params)
        if reference is not None:
            results["reference log-probs"] = result(
                logps_program(reference, cfg, n, pad_id, eos_id, cfg.grpo.temperature, True),
                ref_all, reference_is_argument=True)
        if cfg.grpo.num_iterations > 1:
            results["policy log-probs"] = result(
                logps_program(model, cfg, n, pad_id, eos_id, 1.0, False), params)
        batch = train_example(cfg, n, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        results["update"] = result(
            compile_step.tunix_train_step_jit(trainer).lower(model, optimizer, batch),
            params + opt)
    return Programs(results, cache)
