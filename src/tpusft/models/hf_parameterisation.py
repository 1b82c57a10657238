"""Training follows the Hugging Face parameterisation while the weights keep MaxText's layout.

MaxText's layout stores some tensors through arithmetic on the Hugging Face tensor theta:
p = s * theta + b, elementwise (up to a permutation, which changes nothing here):
  * the query kernel, bias and LoRA B of Llama, Mistral and Gemma 2: s = 1/sqrt(head_dim);
  * Gemma's token embedding: s = sqrt(emb_dim);
  * Gemma's RMSNorm scales: b = 1 (HF stores w, the layout 1 + w).
The forward pass is the same either way, but an optimizer step is not: Adam normalises each
parameter's gradient, so a step on p moves theta s times as far as the same step on theta (the
query 11.3x too fast at head_dim 128, Gemma's embedding 48x too slow at 2304); the query's
gradient counts s^-1 times in the global norm that clipping uses; weight decay pulls 1 + w
instead of w toward zero.

So tpusft takes every step in theta, and the layout stays as it is (MaxText checkpoints load,
tpusft's convert, resumes stay bit-exact):
  * the model reads each such tensor through `hf_gradients`, an identity whose gradient is
    multiplied by s: what the trainer receives is dL/dtheta = s * dL/dp, so the gradient
    norm, clipping and Adam's moments are transformers' own;
  * the optimizer (`hf_steps`) decays theta = (p - b) / s and applies s * (its step on theta).
Per-tensor scaling of the gradient and the update, rather than training theta itself and
converting at every checkpoint, keeps the stored values bit for bit across save and restore.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import optax

from tpusft.models.families import FAMILIES

EMBEDDING = ("token_embedder", "embedding")


def affine(family: str, head_dim: int, emb_dim: int, path: Sequence[str]) -> tuple[float, float]:
    """(s, b) of the stored tensor at `path` (parameter names, a layer's or the whole tree's):
    stored = s * HF + b."""
    fam = FAMILIES[family]
    path = tuple(path)
    name = path[-1]
    if path[-2:] == EMBEDDING and fam.embed_scaled:
        return float(emb_dim) ** 0.5, 0.0
    if name == "scale":  # an RMSNorm's (decoder, layer and q/k norms)
        return 1.0, 1.0 if fam.norm_offset else 0.0
    if (len(path) > 1 and path[-2] == "query" and name in ("kernel", "bias", "lora_b")
            and fam.query_prescaled):
        return head_dim ** -0.5, 0.0
    return 1.0, 0.0


def _names(keypath) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gradient_times(x: jax.Array, s: float) -> jax.Array:
    return x


def _gradient_times_fwd(x, s):
    return x, None


def _gradient_times_bwd(s, _, g):
    return (g * jax.numpy.asarray(s, g.dtype),)


_gradient_times.defvjp(_gradient_times_fwd, _gradient_times_bwd)


def hf_gradients(family: str, head_dim: int, emb_dim: int, tree: Any,
                 prefix: Sequence[str] = ()) -> Any:
    """`tree` (plain arrays under parameter names; `prefix` its place in the model) unchanged,
    with the gradient of each tensor stored as s * HF + b multiplied by s."""
    def leaf(keypath, x):
        s, _ = affine(family, head_dim, emb_dim, (*prefix, *_names(keypath)))
        return x if s == 1.0 else _gradient_times(x, s)
    return jax.tree_util.tree_map_with_path(leaf, tree)


def hf_steps(inner: optax.GradientTransformation, family: str, head_dim: int,
             emb_dim: int) -> optax.GradientTransformation:
    """`inner` (clipping, AdamW) stepping in the HF parameterisation: it gets the gradients as
    `hf_gradients` made them and the parameters as theta = (p - b) / s, and its update of
    theta is applied as s times that to p. Its state is `inner`'s, unchanged in structure."""
    def rule(keypath):
        return affine(family, head_dim, emb_dim, _names(keypath))

    def to_hf(params):
        def leaf(keypath, p):
            s, b = rule(keypath)
            if s == 1.0 and b == 0.0:
                return p
            return (p - jax.numpy.asarray(b, p.dtype)) / jax.numpy.asarray(s, p.dtype)
        return jax.tree_util.tree_map_with_path(leaf, params)

    def init(params):
        return inner.init(to_hf(params))

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, None if params is None else to_hf(params))

        def leaf(keypath, u):
            s, _ = rule(keypath)
            return u if s == 1.0 else u * jax.numpy.asarray(s, u.dtype)
        return jax.tree_util.tree_map_with_path(leaf, updates), state

    return optax.GradientTransformation(init, update)


def decay_mask(params: Any, norms_and_biases: bool) -> Any:
    """Which parameters weight decay applies to: all of them with `norms_and_biases`
    (torch.optim.AdamW over model.parameters()), else all but RMSNorm scales and biases, as
    transformers' Trainer groups them."""
    def leaf(keypath, _):
        return norms_and_biases or _names(keypath)[-1] not in ("scale", "bias")
    return jax.tree_util.tree_map_with_path(leaf, params)
