"""Token-level cross-entropy for SFT on packed, masked batches."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LOGITS_CHUNK_BYTES = 128 * 2**20  # per device, float32, when num_vocab_tiling is automatic


def vocab_tiles(configured: int, tokens_per_device: int, seq_len: int, vocab: int) -> int:
    """How many chunks of each sequence the output layer and loss run in: `configured` when
    set, else the fewest (a power of two dividing seq_len) whose float32 logits for one
    device's tokens fit LOGITS_CHUNK_BYTES."""
    if configured:
        return configured
    n = 1
    while tokens_per_device * vocab * 4 > n * LOGITS_CHUNK_BYTES and seq_len % (2 * n) == 0:
        n *= 2
    return n


def sequence_chunks(x: jax.Array, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T/n, ...]: chunks along the sequence (the batch axis, which is
    sharded, stays whole in every chunk)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n, t // n, *x.shape[2:]), 1, 0)


def _nll_sum_and_grads(hidden, kernel, targets, weights, logits_fn, tiles, kernel_grad,
                       kernel_like):
    """Sum of weighted NLL and its gradients, one sequence chunk at a time: each chunk's
    logits live only inside its scan step, where d loss / d logits = softmax - one_hot (times
    the token's weight) goes straight back through the output layer. `kernel_like` places an
    array shaped as the kernel as the kernel is sharded: the kernel gradient's float32 sum
    over the chunks is kept as a shard on each chip, not whole on every one."""
    def step(dkernel, chunk):
        h, t, w = chunk
        if kernel_grad:
            logits, pullback = jax.vjp(logits_fn, h, kernel)
        else:
            logits, pullback = jax.vjp(lambda h: logits_fn(h, kernel), h)
        logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)
        nll = jnp.sum((logz - target_logit)[..., 0] * w)
        dlogits = (jnp.exp(logits - logz)
                   - jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype)) * w[..., None]
        grads = pullback(dlogits)
        if kernel_grad:
            dkernel = kernel_like(dkernel + kernel_like(grads[1].astype(jnp.float32)))
        return dkernel, (nll, grads[0])

    dkernel = jnp.zeros(kernel.shape if kernel_grad else (), jnp.float32)
    if kernel_grad:
        dkernel = kernel_like(dkernel)
    dkernel, (sums, dhidden) = jax.lax.scan(
        step, dkernel, (sequence_chunks(hidden, tiles), sequence_chunks(targets, tiles),
                        sequence_chunks(weights, tiles)))
    dhidden = jnp.moveaxis(dhidden, 0, 1).reshape(hidden.shape)
    return jnp.sum(sums), dhidden, dkernel.astype(kernel.dtype) if kernel_grad else None


def _as_is(x: jax.Array) -> jax.Array:
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def output_nll_sum(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                   weights: jax.Array, logits_fn: Callable, tiles: int,
                   kernel_grad: bool, kernel_like: Callable = _as_is) -> jax.Array:
    """sum(weights * -log softmax(logits_fn(hidden, kernel))[targets]) over [B, T] tokens,
    with the gradients for hidden (and kernel, when kernel_grad) computed chunk by chunk in the
    forward pass and scaled by the incoming cotangent in the backward one (a fused output
    layer and cross-entropy: the [B, T, vocab] logits never exist at once)."""
    return _nll_sum_and_grads(hidden, kernel, targets, weights, logits_fn, tiles,
                              kernel_grad, kernel_like)[0]


def _output_nll_fwd(hidden, kernel, targets, weights, logits_fn, tiles, kernel_grad,
                    kernel_like):
    total, dhidden, dkernel = _nll_sum_and_grads(hidden, kernel, targets, weights, logits_fn,
                                                 tiles, kernel_grad, kernel_like)
    return total, (dhidden, dkernel, kernel)


def _output_nll_bwd(logits_fn, tiles, kernel_grad, kernel_like, res, g):
    dhidden, dkernel, kernel = res
    dkernel = (dkernel * g).astype(kernel.dtype) if kernel_grad else jnp.zeros_like(kernel)
    return (dhidden * g.astype(dhidden.dtype), dkernel, None, None)


output_nll_sum.defvjp(_output_nll_fwd, _output_nll_bwd)


def sft_loss(model, inputs, targets, weights, segment_ids, positions, loss_denominator,
             dropout_step=None, *, seed: int = 0, vocab_tiles: int = 1):
    """Sum of trained-token NLL / loss_denominator.

    With gradient accumulation over k micro-batches, loss_denominator is (trained tokens in the
    whole optimizer step) / k, so the mean of the k micro-batch gradients that optax.MultiSteps
    takes equals the gradient of the token-mean loss over the whole step.

    Training micro-batches of a run with dropout carry `dropout_step` (the trainer's micro-batch
    counter, restored on resume), which with `seed` gives the step's dropout key; evaluation
    batches carry none and see no dropout. The output layer and the loss run in `vocab_tiles`
    chunks of the sequence (output_nll_sum); a LoRA model's frozen output layer gets no
    gradient.
    """
    key = None
    if dropout_step is not None:
        key = jax.random.fold_in(jax.random.key(seed), dropout_step)
    hidden, _ = model(inputs, positions, None, None, segment_ids, dropout_key=key,
                      return_hidden=True)
    total = output_nll_sum(hidden, model.output_kernel(), targets,
                           weights.astype(jnp.float32), model.split_vocab_logits, vocab_tiles,
                           not model.args.lora_rank, model.output_kernel_like)
    return total / loss_denominator


def seeded_sft_loss(seed: int, vocab_tiles: int = 1):
    """sft_loss with the run's dropout seed and vocab tiling bound, with a plain positional
    signature (Tunix resolves the batch's keys to positions)."""
    def loss_fn(model, inputs, targets, weights, segment_ids, positions, loss_denominator,
                dropout_step=None):
        return sft_loss(model, inputs, targets, weights, segment_ids, positions,
                        loss_denominator, dropout_step, seed=seed, vocab_tiles=vocab_tiles)
    return loss_fn


def add_loss_denominators(micro_batches: list[dict], total: float | None = None) -> list[dict]:
    """Adds `loss_denominator` (a scalar) to each micro-batch of one optimizer step: the
    step's loss weight `total` (over every process of the run; by default these batches')
    shared out over the micro-batches."""
    if total is None:
        total = float(sum(np.sum(b["weights"]) for b in micro_batches))
    denom = np.float32(max(total, 1.0) / len(micro_batches))
    return [dict(b, loss_denominator=denom) for b in micro_batches]


def sft_batch_shapes(rows: int, length: int, dropout: bool = False) -> dict[str, tuple]:
    """(shape, dtype) of each entry of an SFT micro-batch as the trainer receives it (the
    pipeline's features plus add_loss_denominators' scalar, and the step counter of a run
    with dropout): what a compile-only run compiles the step for."""
    shapes = {name: ((rows, length), np.int32)
              for name in ("inputs", "targets", "segment_ids", "positions")}
    shapes["weights"] = ((rows, length), np.float32)
    shapes["loss_denominator"] = ((), np.float32)
    if dropout:
        shapes["dropout_step"] = ((), np.int32)
    return shapes
