"""Preference losses (DPO, ORPO, SimPO) on batches of chosen/rejected pairs.

A batch holds one row per pair (data/pairs.py: the prompt once, then the chosen and the
rejected response, each attending to the prompt and itself). Each side's log-probability is
the sum of log p(token) over its response tokens, computed with the output layer on the
response positions only, in chunks (`num_vocab_tiling`) so the [B, T, vocab] logits never
exist at once: each chunk's logits are recomputed in the backward pass instead of kept.

With c, r the chosen and rejected sums, |c|, |r| their response lengths, c_ref, r_ref the
reference model's sums, s the label smoothing and logsig the log-sigmoid:
  dpo    z = beta * ((c - c_ref) - (r - r_ref));   loss = -(1-s) logsig(z) - s logsig(-z)
         rewards beta * (c - c_ref), beta * (r - r_ref)
  simpo  z = beta * (c/|c| - r/|r|) - gamma;       loss as for dpo (no reference)
         rewards beta * c/|c|, beta * r/|r|
  orpo   o = (c/|c| - r/|r|) - (log(1 - exp(c/|c|)) - log(1 - exp(r/|r|)))   (log odds ratio)
         loss = -c/|c| + lambda * (-(1-s) logsig(o) - s logsig(-o))   (no reference)
         rewards lambda * c/|c|, lambda * r/|r|
averaged over the batch's pairs (eval padding pairs, with no response token, excluded).
DPO's is Tunix's `dpo_loss_fn` (conservative DPO's smoothing); ORPO's odds ratio and SimPO's
margin are TRL's ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss(loss_type=simpo), on
per-token averages as in the papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpusft.models import attention as attn
from tpusft.training.loss import sequence_chunks

LOSS_TYPES = ("dpo", "orpo", "simpo")
# log(1 - exp(x)) is -inf at x = 0, which a confident model's average log-prob reaches in
# float32; the odds ratio reads it at this distance from 0 instead.
_MAX_AVG_LOGP = -1e-6


@dataclass(frozen=True)
class PreferenceLoss:
    """The method and its constants (the config's dpo section)."""

    loss_type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    @classmethod
    def from_config(cls, cfg: Any) -> PreferenceLoss:
        d = cfg.dpo
        return cls(d.loss_type, d.beta, d.label_smoothing, d.simpo_gamma, d.orpo_lambda)

    @property
    def needs_reference(self) -> bool:
        return self.loss_type == "dpo"


def pair_logps(model, inputs, positions, segment_ids, score_index, targets, weights, sides, *,
               tiles: int = 1, dropout_key: jax.Array | None = None) -> jax.Array:
    """Rows of pairs (data/pairs.py: the prompt once, then both responses) -> [B, 2] sums of
    log p(response token) of the chosen and the rejected side (float32).

    Each response attends to the prompt and to itself only (branch_mask), so a side's
    log-probs are those of its own sequence alone; the output layer runs on the scored
    positions only, in `tiles` chunks whose logits are recomputed for the gradient."""
    mask = attn.branch_mask(segment_ids)
    hidden, _ = model(inputs, positions, None, mask, dropout_key=dropout_key,
                      return_hidden=True)
    hidden = jnp.take_along_axis(hidden, score_index[..., None], axis=1)
    kernel = model.output_kernel()
    weights = weights.astype(jnp.float32)
    per_side = jnp.stack([weights * (sides == 0), weights * (sides == 1)], axis=-1)

    @jax.checkpoint  # keep only the chunk's inputs; recompute its logits for the gradient
    def chunk(total, xs):
        h, t, w = xs
        logits = model.split_vocab_logits(h, kernel)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return total + jnp.einsum("bt,bts->bs", target - logz, w), None

    total = jnp.zeros((inputs.shape[0], 2), jnp.float32)
    chunks = tuple(sequence_chunks(x, tiles) for x in (hidden, targets, per_side))
    total, _ = jax.lax.scan(chunk, total, chunks)
    return total


def side_lengths(weights: jax.Array, sides: jax.Array) -> jax.Array:
    """[B, 2] response tokens of each side."""
    weights = weights.astype(jnp.float32)
    return jnp.stack([jnp.sum(weights * (sides == s), axis=-1) for s in (0, 1)], axis=-1)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _smoothed(z: jax.Array, smoothing: float) -> jax.Array:
    return -(1 - smoothing) * jax.nn.log_sigmoid(z) - smoothing * jax.nn.log_sigmoid(-z)


def pair_losses(method: PreferenceLoss, logps: jax.Array, lengths: jax.Array,
                ref_logps: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [B] and per-pair metrics from [B, 2] log-probs and response lengths."""
    c, r = logps[:, 0], logps[:, 1]
    avg = logps / jnp.maximum(lengths, 1.0)
    ac, ar = avg[:, 0], avg[:, 1]
    extra = {}
    if method.loss_type == "dpo":
        if ref_logps is not None:
            c, r = c - ref_logps[:, 0], r - ref_logps[:, 1]
        chosen, rejected = method.beta * c, method.beta * r
        losses = _smoothed(chosen - rejected, method.label_smoothing)
    elif method.loss_type == "simpo":
        chosen, rejected = method.beta * ac, method.beta * ar
        losses = _smoothed(chosen - rejected - method.simpo_gamma, method.label_smoothing)
    elif method.loss_type == "orpo":
        ac_, ar_ = jnp.minimum(ac, _MAX_AVG_LOGP), jnp.minimum(ar, _MAX_AVG_LOGP)
        log_odds = (ac_ - ar_) - (log1mexp(ac_) - log1mexp(ar_))
        odds_loss = _smoothed(log_odds, method.label_smoothing)
        nll = -ac
        losses = nll + method.orpo_lambda * odds_loss
        chosen, rejected = method.orpo_lambda * ac, method.orpo_lambda * ar
        extra = {"log_odds_ratio": log_odds, "nll_loss": nll, "odds_ratio_loss": odds_loss}
    else:
        raise ValueError(f"loss_type {method.loss_type!r} is not one of {LOSS_TYPES}")
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
               "rewards/margin": chosen - rejected,
               "rewards/accuracy": (chosen > rejected).astype(jnp.float32),
               "log_probs/chosen": logps[:, 0], "log_probs/rejected": logps[:, 1], **extra}
    return losses, metrics


def batch_loss(method: PreferenceLoss, logps: jax.Array, lengths: jax.Array,
               ref_logps: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean loss and metrics over the real pairs of a batch ([B, 2] response lengths;
    eval padding pairs have none)."""
    real = (lengths[:, 0] > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(real), 1.0)
    losses, metrics = pair_losses(method, logps, lengths, ref_logps)
    aux = {k: jnp.sum(v * real) / count for k, v in metrics.items()}
    return jnp.sum(losses * real) / count, aux


def make_loss_fn(method: PreferenceLoss, seed: int = 0, tiles: int = 1):
    """The trainer's loss: (model, batch features...) -> (loss, aux). Training micro-batches
    of a LoRA run with dropout carry `dropout_step`, keying that step's masks (as for SFT);
    `ref_logps` is the reference model's [B, 2] log-probs (DPO)."""
    def loss_fn(model, inputs, positions, segment_ids, score_index, targets, weights, sides,
                ref_logps=None, dropout_step=None):
        key = None
        if dropout_step is not None:
            key = jax.random.fold_in(jax.random.key(seed), dropout_step)
        logps = pair_logps(model, inputs, positions, segment_ids, score_index, targets, weights,
                           sides, tiles=tiles, dropout_key=key)
        return batch_loss(method, logps, side_lengths(weights, sides), ref_logps)
    return loss_fn


def pair_batch_shapes(rows: int, length: int, dropout: bool = False,
                      reference: bool = False) -> dict[str, tuple]:
    """(shape, dtype) of each entry of a micro-batch of pair rows as the preference step
    receives it (data/pairs.py's features; `ref_logps` of a DPO run's reference, added by
    the trainer before the step; the step counter of a run with dropout): what a
    compile-only run compiles the step for."""
    shapes = {name: ((rows, length), np.int32) for name in (
        "inputs", "positions", "segment_ids", "score_index", "targets", "sides")}
    shapes["weights"] = ((rows, length), np.float32)
    if reference:
        shapes["ref_logps"] = ((rows, 2), np.float32)
    if dropout:
        shapes["dropout_step"] = ((), np.int32)
    return shapes
