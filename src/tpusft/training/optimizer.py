"""AdamW with linear warmup, cosine decay and global-norm clipping (optax), stepping in the
Hugging Face parameterisation of the weights (models/hf_parameterisation.py)."""

from __future__ import annotations

import functools
from typing import Any

import optax

from tpusft.models.hf_parameterisation import decay_mask, hf_steps


def learning_rate_schedule(cfg: Any) -> optax.Schedule:
    warmup = int(round(cfg.warmup_steps_fraction * cfg.steps))
    peak, final = cfg.learning_rate, cfg.learning_rate * cfg.learning_rate_final_fraction
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=final)


# apply_if_finite's own limit, after which it would apply a non-finite update anyway; the
# run stops long before (training/divergence.py).
_NEVER_APPLY_NON_FINITE = 2**30


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
    """inject_hyperparams makes the learning rate visible to Tunix's metrics; apply_if_finite
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
        return optax.apply_if_finite(stepped, _NEVER_APPLY_NON_FINITE)

    return optax.inject_hyperparams(chain)(learning_rate=learning_rate_schedule(cfg))
