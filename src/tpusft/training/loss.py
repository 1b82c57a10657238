"""Token-level cross-entropy for SFT on packed, masked batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, in float32, from integer labels (no one-hot)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logz - target_logit


def sft_loss(model, inputs, targets, weights, segment_ids, positions, loss_denominator,
             dropout_step=None, *, seed: int = 0):
    """Sum of trained-token NLL / loss_denominator.

    With gradient accumulation over k micro-batches, loss_denominator is (trained tokens in the
    whole optimizer step) / k, so the mean of the k micro-batch gradients that optax.MultiSteps
    takes equals the gradient of the token-mean loss over the whole step.

    Training micro-batches of a run with dropout carry `dropout_step` (the trainer's micro-batch
    counter, restored on resume), which with `seed` gives the step's dropout key; evaluation
    batches carry none and see no dropout.
    """
    key = None
    if dropout_step is not None:
        key = jax.random.fold_in(jax.random.key(seed), dropout_step)
    logits, _ = model(inputs, positions, None, None, segment_ids, dropout_key=key)
    nll = token_nll(logits, targets) * weights
    return jnp.sum(nll) / loss_denominator


def seeded_sft_loss(seed: int):
    """sft_loss with the run's dropout seed bound, with a plain positional signature (Tunix
    resolves the batch's keys to positions)."""
    def loss_fn(model, inputs, targets, weights, segment_ids, positions, loss_denominator,
                dropout_step=None):
        return sft_loss(model, inputs, targets, weights, segment_ids, positions,
                        loss_denominator, dropout_step, seed=seed)
    return loss_fn


def add_loss_denominators(micro_batches: list[dict]) -> list[dict]:
    """Adds `loss_denominator` (a scalar) to each micro-batch of one optimizer step."""
    total = float(sum(np.sum(b["weights"]) for b in micro_batches))
    denom = np.float32(max(total, 1.0) / len(micro_batches))
    return [dict(b, loss_denominator=denom) for b in micro_batches]
