"""AdamW with linear warmup, cosine decay and global-norm clipping (optax), stepping in the
Hugging Face parameterisation of the weights (models/hf_parameterisation.py)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tpusft.models.hf_parameterisation import decay_mask, hf_steps


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
    warmup = int(round(cfg.warmup_steps_fraction * cfg.steps))
    peak, final = cfg.learning_rate, cfg.learning_rate * cfg.learning_rate_final_fraction
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=final)


def skip_if_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """optax.apply_if_finite's contract and state (ApplyIfFiniteState, so its counters are read
    and checkpointed alike), with no limit on the updates skipped in a row (the run stops long
    before: training/divergence.py), and chosen by select instead of lax.cond: the inner step
    is always computed and kept or dropped element-wise. apply_if_finite's cond has the
    compiler hold a zero update for every parameter and the whole update tree apart from the
    weights it is added to; a select fuses into the update (Llama 3.1 8B's full step on a v5e-8
    needs 1.33 GiB a chip less)."""

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(updates, state, params=None, **extra_args):
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u))
                                    for u in jax.tree.leaves(updates)]))
        stepped, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        keep = functools.partial(jnp.where, finite)
        return jax.tree.map(lambda u: keep(u, jnp.zeros_like(u)), stepped), \
            optax.ApplyIfFiniteState(
                notfinite_count=keep(0, state.notfinite_count + 1).astype(jnp.int32),
                last_finite=finite,
                total_notfinite=keep(state.total_notfinite,
                                     state.total_notfinite + 1).astype(jnp.int32),
                inner_state=jax.tree.map(keep, inner_state, state.inner_state))

    return optax.GradientTransformationExtraArgs(init, update)


def current_learning_rate(optimizer: Any) -> float | None:
    """The learning rate an nnx Optimizer over make_optimizer's chain applies next (read from
    inject_hyperparams' state); None for an optimizer without it."""
    hyperparams = getattr(optimizer.opt_state, "hyperparams", None)
    if hyperparams is None or "learning_rate" not in hyperparams:
        return None
    lr = hyperparams["learning_rate"]
    return float(jax.device_get(getattr(lr, "value", lr)))


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """inject_hyperparams makes the learning rate visible to Tunix's metrics; skip_if_not_finite
    drops any update whose gradients hold NaN or inf (and counts it). Weight decay skips
    RMSNorm scales and biases unless adam_weight_decay_norms_and_biases is set."""
    mask = None
    if cfg.adam_weight_decay and not cfg.adam_weight_decay_norms_and_biases:
        mask = functools.partial(decay_mask, norms_and_biases=False)

    def chain(learning_rate):
        parts = []
        if cfg.gradient_clipping_threshold > 0:
            parts.append(optax.clip_by_global_norm(cfg.gradient_clipping_threshold))
        parts.append(optax.adamw(learning_rate, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                 weight_decay=cfg.adam_weight_decay, mask=mask))
        stepped = hf_steps(optax.chain(*parts), cfg.model_family, cfg.head_dim,
                           cfg.base_emb_dim)
        return skip_if_not_finite(stepped)

    return optax.inject_hyperparams(chain)(learning_rate=learning_rate_schedule(cfg))
