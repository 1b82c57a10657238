"""GRPO: Tunix's loss and advantages on tpusft's model equal the formula computed directly;
Tunix's sampler drives tpusft's model and KV cache to the same greedy tokens as
tpusft.generate; a LoRA actor's reference is its base without a second copy; prompts over
max_prompt_length are cut or dropped and counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpusft.data import encoders
from tpusft.data.pipeline import DataStats
from tpusft.models import lora, sampling
from tpusft.models.decoder import ModelArgs, Transformer
from tpusft.training.setup import reference_model

ARGS = ModelArgs(family="llama3", vocab_size=64, emb_dim=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-5, rope_theta=1e4)
PAD, EOS = 0, 5


def _numpy_model(args, seed=0):
    """Random weights drawn by numpy (no random-number programs to compile)."""
    model = nnx.eval_shape(lambda: Transformer(args, None, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype),
                         nnx.state(model))
    nnx.update(model, state)
    return model


def _direct_logps(model, prompt, completion):
    """log p(completion token) from one plain forward over [prompt | completion], pads
    neither attended to nor counted in positions."""
    tokens = jnp.concatenate([prompt, completion], axis=1)
    valid = tokens != PAD
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    t = tokens.shape[1]
    mask = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None] & valid[:, None, :]
    logits, _ = model(tokens, positions, None, mask)
    p = prompt.shape[1]
    logp = jax.nn.log_softmax(logits[:, p - 1:-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, completion[..., None], axis=-1)[..., 0]


def test_grpo_loss_and_advantages_equal_the_formula():
    from tunix.rl import function_registry
    from tunix.rl.grpo.grpo_learner import GRPOConfig, TrainExample

    model = _numpy_model(ARGS)
    g = 3
    prompt = jnp.asarray([[PAD, PAD, 7, 8, 9], [PAD, 7, 8, 9, 10], [11, 12, 13, 14, 15]] * 2,
                         jnp.int32)
    completion = jnp.asarray([[20, 21, EOS, PAD], [22, EOS, PAD, PAD], [23, 24, 25, 26],
                              [30, EOS, PAD, PAD], [31, 32, 33, EOS], [34, 35, EOS, PAD]],
                             jnp.int32)
    mask = completion != PAD
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])

    # Group-normalised advantages: (r - mean of its group) / (sample std of its group + 1e-6).
    groups = rewards.reshape(-1, g)
    want_adv = ((groups - groups.mean(1, keepdims=True))
                / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    adv = function_registry.get_advantage_estimator("grpo")(rewards=rewards, num_generations=g)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-6)

    logp = _direct_logps(model, prompt, completion)
    rng = np.random.default_rng(1)
    old = logp + jnp.asarray(rng.uniform(-0.4, 0.4, logp.shape), jnp.float32)  # clips some
    ref = logp + jnp.asarray(rng.uniform(-0.3, 0.3, logp.shape), jnp.float32)
    beta, eps = 0.1, 0.2
    algo = GRPOConfig(num_generations=g, beta=beta, epsilon=eps)
    algo.temperature = 1.0
    example = TrainExample(prompt_ids=prompt, prompt_mask=prompt != PAD,
                           completion_ids=completion, completion_mask=mask,
                           ref_per_token_logps=ref, old_per_token_logps=old,
                           advantages=jnp.asarray(adv, jnp.float32))
    loss_fn = function_registry.get_policy_loss_fn("grpo")
    loss, aux = loss_fn(model, example, algo_config=algo, pad_id=PAD, eos_id=EOS)

    # The formula: clipped surrogate per token, mean over each completion's tokens, mean over
    # completions; plus beta times the KL estimate (log pi - log pi_ref) aggregated alike.
    m = np.asarray(mask, np.float64)
    ratio = np.exp(np.asarray(logp, np.float64) - np.asarray(old, np.float64))
    a = want_adv[:, None]
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps))
    kl = np.asarray(logp, np.float64) - np.asarray(ref, np.float64)

    def seq_mean_token_mean(x):
        return np.mean((x * m).sum(1) / m.sum(1))

    want = seq_mean_token_mean(pg) + beta * seq_mean_token_mean(kl)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(aux["kl"]) == pytest.approx((kl * m).sum() / m.sum(), rel=1e-5, abs=1e-6)
    clipped = (-a * np.clip(ratio, 1 - eps, 1 + eps)) > (-a * ratio)
    assert 0 < float(aux["pg_clipfrac"]) == pytest.approx((clipped * m).sum() / m.sum())

    # And its gradient is finite despite the left-padded prompts.
    grads = nnx.grad(lambda mdl: loss_fn(mdl, example, algo_config=algo, pad_id=PAD,
                                         eos_id=EOS)[0])(model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_tunix_sampler_greedy_equals_tpusft_generate(demo_tokenizer):
    from tunix.generate import sampler as tunix_sampler

    args = ModelArgs(**{**ARGS.__dict__, "vocab_size": len(demo_tokenizer)})
    model = _numpy_model(args, seed=3)
    texts = ["12+3=", "1+1=", "45+45="]  # different lengths: left padding in both
    ids = [demo_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = demo_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    pad = demo_tokenizer.pad_token_id
    new = 8
    ours = sampling.generate(model, ids, max_new_tokens=new, pad_id=pad, eos_ids=[eos],
                             prefill_length=8)
    s = tunix_sampler.Sampler(model, demo_tokenizer, tunix_sampler.CacheConfig(
        cache_size=8 + new, num_layers=args.num_layers, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim))
    out = s(input_strings=texts, max_generation_steps=new, max_prompt_length=8,
            temperature=0.0, eos_tokens=[eos], echo=False)
    theirs = [[t for t in row if t != eos] for row in out.tokens]
    bos = demo_tokenizer.bos_token_id
    assert out.padded_prompt_tokens.shape == (3, 8)
    # Tunix's sampler adds the BOS token; tpusft.generate gets it in the prompt.
    ours_bos = sampling.generate(model, [[bos, *x] for x in ids], max_new_tokens=new,
                                 pad_id=pad, eos_ids=[eos], prefill_length=8)
    assert theirs == ours_bos, (theirs, ours_bos, ours)
    assert any(len(t) > 2 for t in theirs)


def test_lora_reference_shares_the_backbone_and_keeps_the_starting_adapters():
    from tunix.rl import utils as rl_utils

    args = ModelArgs(**{**ARGS.__dict__, "lora_rank": 4, "lora_alpha": 8.0,
                        "lora_targets": frozenset(lora.PROJECTIONS)})
    actor = _numpy_model(args)  # nonzero adapters: the actor differs from its base
    ref = reference_model(actor)
    assert lora.count(ref)[0] == lora.count(actor)[0] > 0
    assert rl_utils.is_sharing_backbone(ref, actor)  # Tunix's check: no second base copy
    tokens = jnp.arange(12).reshape(2, 6) % 64
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    start = actor(tokens, pos)[0]
    np.testing.assert_array_equal(ref(tokens, pos)[0], start)  # the reference is the start
    for _, module in lora.adapters(actor):  # training moves the actor's adapters only
        module.lora_b[...] = module.lora_b[...] + 0.1
    assert float(jnp.abs(actor(tokens, pos)[0] - start).max()) > 1e-3
    np.testing.assert_array_equal(ref(tokens, pos)[0], start)


def test_prompts_over_max_prompt_length_are_cut_or_dropped(demo_tokenizer):
    rows = [{"prompt": "1+2=", "answer": "#### 3"}, {"prompt": "12345678901234567890+1=",
                                                     "answer": "1,234"}]
    fields = {"prompt": "prompt", "answer": "answer"}
    first = demo_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Add."}, {"role": "user", "content": "Q: 1+2="}],
        tokenize=False, add_generation_prompt=True)
    limit = len(demo_tokenizer(first, add_special_tokens=False)["input_ids"]) + 4
    for policy, kept in (("drop", 1), ("left", 2)):
        stats = DataStats()
        enc = encoders.PromptEncoder(demo_tokenizer, "prompt_only", fields,
                                    encoders.PromptOptions(limit, system_prompt="Add.",
                                                          prompt_template="Q: {prompt}",
                                                          truncation=policy), stats)
        out = [enc(r) for r in rows]
        assert sum(o is not None for o in out) == kept
        assert out[0] == {"prompts": first, "answer": "3"}
        if policy == "drop":
            assert stats.bad["over max_prompt_length"] == 1
        else:
            assert stats.truncated == 1
            ids = demo_tokenizer(out[1]["prompts"], add_special_tokens=False)["input_ids"]
            assert len(ids) == limit
            assert out[1]["prompts"].endswith("assistant<|end_header_id|>\n\n")
            assert out[1]["answer"] == "1234"
