"""Training in the Hugging Face parameterisation over MaxText's layout
(models/hf_parameterisation.py): what the trainer receives as each stored tensor's gradient is
transformers' gradient of the HF tensor (up to the layout's permutation), the optimizer's
step on a stored tensor is the stored image of the step on the HF tensor, and the factors
agree with the converters'."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_oracle import build_hf_model, restored_model

from tpusft.conversion import hf_layout
from tpusft.conversion.convert import hf_to_native, model_args
from tpusft.models.hf_parameterisation import affine, decay_mask, hf_steps

FAMILIES = ("llama3", "llama3-tied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


@pytest.mark.parametrize("name", FAMILIES)
def test_factors_are_the_converters(name):
    """For every native leaf, the converter's HF -> native transform is s * HF + b (up to a
    permutation), with (s, b) what the optimizer uses."""
    from tpusft.conversion.hf_config import model_keys

    hf = build_hf_model(name)
    args = model_args(model_keys(hf.config), True)
    rng = np.random.default_rng(0)
    scaled = 0
    for leaf in hf_layout.native_leaves(args):
        s, b = affine(args.family, args.head_dim, args.emb_dim, leaf.path)
        piece = leaf.pieces[0]
        theta = rng.standard_normal(piece.hf_shape).astype(np.float32)
        zero = piece.to_native(np.zeros_like(theta))
        np.testing.assert_allclose(zero, b, err_msg=leaf.name)
        moved = np.linalg.norm(piece.to_native(theta) - zero)
        np.testing.assert_allclose(moved, abs(s) * np.linalg.norm(theta), rtol=1e-5,
                                   err_msg=leaf.name)
        scaled += s != 1.0 or b != 0.0
    fam = args.fam
    assert bool(scaled) == (fam.query_prescaled or fam.norm_offset or fam.embed_scaled)


def _torch_grads(hf, tokens, targets):
    import torch

    hf.zero_grad()
    logits = hf(torch.tensor(tokens)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).flatten())
    loss.backward()
    return {n: p.grad.numpy() for n, p in hf.named_parameters()}


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_are_transformers_gradients(name, tmp_path):
    """The gradient of every stored tensor, as the trainer receives it, holds exactly the
    values of transformers' gradient of the HF tensor(s) it stores: sorted values compared,
    so the layout's transposes, head splits and RoPE order need no mapping (a gradient of the
    stored tensor itself would be s times off for Llama's query and Gemma's embedding)."""
    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    info = hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    model = restored_model(info["model_keys"], tmp_path / "native")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, (2, 20))
    targets = rng.integers(3, 256, (2, 20))
    want = _torch_grads(hf.train(), tokens, targets)

    def loss(m):
        logits, _ = m(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(20), (2, 20)))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1))

    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))
    args = model.args
    for leaf in hf_layout.native_leaves(args):
        got = grads
        for k in leaf.path:
            got = got[k]
        got = np.sort(np.asarray(got).ravel())
        ref = np.sort(np.concatenate([want[p.hf_name].ravel() for p in leaf.pieces]))
        span = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, atol=2e-5 * span, rtol=0, err_msg=leaf.name)


def test_a_step_on_the_stored_tensor_is_the_step_on_the_hf_tensor():
    """AdamW with weight decay and clipping on stored = s * theta + b, stepped by hf_steps,
    equals the stored image of the same optimizer on theta, over several steps."""
    rng = np.random.default_rng(0)
    theta = {"decoder": {"layers": {"self_attention": {"query": {"kernel": rng.standard_normal(
        (8, 2, 4)).astype(np.float32)}}, "pre_self_attention_norm": {"scale": rng.standard_normal(
            (8,)).astype(np.float32)}}}, "token_embedder": {"embedding": rng.standard_normal(
                (16, 8)).astype(np.float32)}}
    family, head_dim, emb_dim = "gemma2", 4, 8

    def stored(tree):
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: affine(family, head_dim, emb_dim, [k.key for k in kp])[0] * x
            + affine(family, head_dim, emb_dim, [k.key for k in kp])[1], tree)

    inner = optax.chain(optax.clip_by_global_norm(0.5),
                        optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.3))
    ours = hf_steps(inner, family, head_dim, emb_dim)
    p, t = stored(theta), theta
    sp, st = ours.init(p), inner.init(t)
    for step in range(4):
        g_theta = jax.tree.map(lambda x, i=step: np.cos(x * (i + 1)).astype(np.float32), t)
        # hf_gradients hands the optimizer dL/dtheta at each stored tensor's place.
        u, sp = ours.update(g_theta, sp, p)
        p = optax.apply_updates(p, u)
        ut, st = inner.update(g_theta, st, t)
        t = optax.apply_updates(t, ut)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     p, stored(t))


def test_weight_decay_skips_norms_and_biases_as_transformers_does():
    tree = {"decoder": {"decoder_norm": {"scale": 0}, "layers": {
        "self_attention": {"query": {"kernel": 0, "bias": 0, "lora_a": 0, "lora_b": 0},
                           "query_norm": {"scale": 0}}}},
        "token_embedder": {"embedding": 0}}
    masked = decay_mask(tree, norms_and_biases=False)
    flat = {"/".join(k.key for k in kp): v
            for kp, v in jax.tree_util.tree_flatten_with_path(masked)[0]}
    assert flat == {"decoder/decoder_norm/scale": False,
                    "decoder/layers/self_attention/query/kernel": True,
                    "decoder/layers/self_attention/query/bias": False,
                    "decoder/layers/self_attention/query/lora_a": True,
                    "decoder/layers/self_attention/query/lora_b": True,
                    "decoder/layers/self_attention/query_norm/scale": False,
                    "token_embedder/embedding": True}
    assert all(jax.tree.leaves(decay_mask(tree, norms_and_biases=True)))


def test_the_factors_of_each_family():
    q = ("decoder", "layers", "self_attention", "query", "lora_b")
    assert affine("llama3", 16, 64, q) == (0.25, 0.0)
    assert affine("mistral", 16, 64, q[:-1] + ("bias",)) == (0.25, 0.0)
    assert affine("gemma2", 16, 64, ("decoder", "layers", "self_attention_local", "query",
                                     "kernel")) == (0.25, 0.0)
    assert affine("qwen3", 16, 64, q) == (1.0, 0.0)
    assert affine("gemma2", 16, 64, ("token_embedder", "embedding")) == (8.0, 0.0)
    assert affine("gemma3", 16, 64, ("decoder", "layers", "layers_0", "pre_ffw_norm",
                                     "scale")) == (1.0, 1.0)
    assert affine("llama3", 16, 64, ("decoder", "decoder_norm", "scale")) == (1.0, 0.0)
    assert affine("llama3", 16, 64, ("decoder", "layers", "self_attention", "key",
                                     "kernel")) == (1.0, 0.0)
