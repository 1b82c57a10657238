"""Preference training: tpusft's DPO, ORPO and SimPO losses on its model equal the formulas
computed directly from a plain forward pass, Tunix's own DPO loss on the same batch and TRL's
ORPO/SimPO losses on the same log-probs; pair batches; the LoRA reference shares the base
arrays; a sharded run on 8 simulated devices equals the 1-device run."""

import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import LOWERED, record_lowering, write_jsonl
from flax import nnx

from tpusft.config import load_config
from tpusft.config.loader import configs_root
from tpusft.data import pairs, sources
from tpusft.data.pipeline import DataOptions, DataStats, Source
from tpusft.models import lora
from tpusft.models.decoder import ModelArgs, Transformer, create_model
from tpusft.models.sharding import make_mesh
from tpusft.training import preference
from tpusft.training.optimizer import make_optimizer
from tpusft.training.preference_loss import PreferenceLoss, log1mexp, make_loss_fn
from tpusft.training.progress import Progress
from tpusft.training.setup import reference_model

# Its module-scoped fixture is built once: every test of this file in one xdist worker.
pytestmark = pytest.mark.xdist_group("dpo-setup")

ARGS = ModelArgs(family="llama3", vocab_size=64, emb_dim=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-5, rope_theta=1e4)
RTOL = 1e-5


def _numpy_model(args, seed=0, scale=0.3):
    model = nnx.eval_shape(lambda: Transformer(args, None, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                         nnx.state(model))
    nnx.update(model, state)
    return model


def _pairs(seed=0, b=3):
    """Pairs of token sequences: a shared prompt, then responses of different lengths (the
    second pair's responses also share their first token); the trained mask marks responses."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(b):
        prompt = rng.integers(6, 64, 3 + i).tolist()
        sides = []
        for side in range(2):
            response = rng.integers(6, 64, 2 + 2 * side + i).tolist()
            if i == 1:
                response[0] = 7
            ids = np.array(prompt + response, np.int32)
            sides.append((ids, np.arange(len(ids)) >= len(prompt)))
        out.append(sides)
    return out


def _batch(pair_seqs, t=24):
    """Those pairs as tpusft's rows (data/pairs.py) plus one empty eval padding pair."""
    from tpusft.data.chat import Encoded
    from tpusft.data.encoders import shared_prefix, shifted

    rows = []
    for (c, tc), (r, tr) in pair_seqs:
        enc = [Encoded(c, tc), Encoded(r, tr)]
        pair = {"chosen": shifted(enc[0]), "rejected": shifted(enc[1]),
                "shared": shared_prefix(*enc)}
        rows.append(pairs.pair_row(pair, t))
    rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _direct_logps(model, pair_seqs):
    """[B, 2] response log-probs of each side run alone, one plain forward with full logits."""
    out = []
    for sides in pair_seqs:
        row = []
        for ids, trained in sides:
            x = jnp.asarray(ids[None])
            logits, _ = model(x[:, :-1], jnp.arange(len(ids) - 1)[None], None, None,
                              jnp.ones((1, len(ids) - 1), jnp.int32))
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[0]
            tok = logp[np.arange(len(ids) - 1), ids[1:]]
            row.append(float(jnp.sum(tok * trained[1:])))
        out.append(row)
    return np.asarray(out, np.float32)


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _trl(cls_path, **attrs):
    """A TRL trainer object carrying only the fields its loss method reads."""
    import importlib

    module, name = cls_path.rsplit(".", 1)
    obj = object.__new__(getattr(importlib.import_module(module), name))
    obj.__dict__.update(accelerator=SimpleNamespace(device="cpu"), **attrs)
    return obj


@pytest.fixture(scope="module")
def setup():
    model = _numpy_model(ARGS)
    seqs = _pairs()
    batch = _batch(seqs)
    logps = _direct_logps(model, seqs)
    lengths = np.asarray([[t[1:].sum() for _, t in sides] for sides in seqs], np.float32)
    ref = logps + np.random.default_rng(3).uniform(-1.0, 1.0, logps.shape).astype(np.float32)
    return model, batch, seqs, logps, lengths, ref


def _ours(model, batch, method, ref=None, tiles=2):
    """tpusft's loss and metrics on the batch (its padding pair gets a reference of 0)."""
    fn = make_loss_fn(method, tiles=tiles)
    feats = {k: jnp.asarray(v) for k, v in batch.items()}
    if ref is not None:
        ref = jnp.asarray(np.concatenate([ref, np.zeros((1, 2), np.float32)]))
    loss, aux = fn(model, **feats, ref_logps=ref)
    return float(loss), {k: float(v) for k, v in aux.items()}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_loss_equals_the_formula_and_tunix(setup, smoothing):
    from tunix.sft.dpo import dpo_trainer

    model, batch, seqs, logps, _, ref = setup
    beta = 0.2
    loss, aux = _ours(model, batch, PreferenceLoss("dpo", beta, smoothing), ref)
    c, r = (logps - ref).T
    z = beta * (c - r)
    want = np.mean(-(1 - smoothing) * _logsig(z) - smoothing * _logsig(-z))
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/margin"], np.mean(beta * (c - r)), rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/accuracy"], np.mean(c > r), rtol=RTOL)
    np.testing.assert_allclose(aux["log_probs/chosen"], np.mean(logps[:, 0]), rtol=RTOL)

    # Tunix's own DPO loss on the same model and pairs, laid out as it takes them: rows of
    # [chosen..., rejected...] right-padded, the response tokens marked by completion_mask.
    n = len(seqs)
    sides = [s[0] for s in seqs] + [s[1] for s in seqs]
    t = max(len(ids) for ids, _ in sides)
    ids = np.zeros((2 * n, t), np.int32)
    valid = np.zeros((2 * n, t), bool)
    completion = np.zeros((2 * n, t - 1), np.float32)
    for i, (seq, trained) in enumerate(sides):
        ids[i, :len(seq)], valid[i, :len(seq)] = seq, True
        completion[i, :len(seq) - 1] = trained[1:]
    causal = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    example = dpo_trainer.TrainExample(
        input_ids=jnp.asarray(ids), positions=jnp.asarray(np.tile(np.arange(t), (2 * n, 1))),
        attention_mask=jnp.asarray(causal), ref_chosen_logps=jnp.asarray(ref[:, 0]),
        ref_rejected_logps=jnp.asarray(ref[:, 1]), completion_mask=jnp.asarray(completion),
        logits_to_keep=t - 1)
    tunix_loss, tunix_aux = dpo_trainer.dpo_loss_fn(model, example, "dpo", beta,
                                                    label_smoothing=smoothing)
    np.testing.assert_allclose(loss, float(tunix_loss), rtol=RTOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "log_probs/chosen", "log_probs/rejected"):
        np.testing.assert_allclose(aux[key], float(tunix_aux[key]), rtol=RTOL, atol=1e-6)


def test_orpo_loss_equals_the_formula_and_trl(setup):
    model, batch, _, logps, lengths, _ = setup
    lam = 0.25
    loss, aux = _ours(model, batch, PreferenceLoss("orpo", orpo_lambda=lam))
    ac, ar = (logps / lengths).T
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    want = np.mean(-ac - lam * _logsig(log_odds))
    np.testing.assert_allclose(loss, want, rtol=RTOL)
    np.testing.assert_allclose(aux["log_odds_ratio"], np.mean(log_odds), rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/chosen"], np.mean(lam * ac), rtol=RTOL)

    trl = _trl("trl.experimental.orpo.orpo_trainer.ORPOTrainer", beta=lam)
    losses, chosen, rejected, _, trl_log_odds = trl.odds_ratio_loss(
        torch.tensor(ac, dtype=torch.float64), torch.tensor(ar, dtype=torch.float64))
    # TRL's ORPO loss is its chosen NLL minus mean(beta * log sigmoid(log odds)).
    np.testing.assert_allclose(loss, np.mean(-ac) - losses.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(aux["log_odds_ratio"], trl_log_odds.item(), rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/margin"], (chosen - rejected).mean().item(),
                               rtol=RTOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_loss_equals_the_formula_and_trl(setup, smoothing):
    model, batch, _, logps, lengths, _ = setup
    beta, gamma = 2.0, 0.5
    loss, aux = _ours(model, batch, PreferenceLoss("simpo", beta, smoothing, simpo_gamma=gamma))
    ac, ar = (logps / lengths).T
    z = beta * (ac - ar) - gamma
    want = np.mean(-(1 - smoothing) * _logsig(z) - smoothing * _logsig(-z))
    np.testing.assert_allclose(loss, want, rtol=RTOL)

    trl = _trl("trl.experimental.cpo.cpo_trainer.CPOTrainer", alpha=0.0, loss_type="simpo",
               beta=beta, simpo_gamma=gamma, label_smoothing=smoothing)
    losses, chosen, rejected = trl.cpo_loss(torch.tensor(ac, dtype=torch.float64),
                                            torch.tensor(ar, dtype=torch.float64))
    np.testing.assert_allclose(loss, losses.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/chosen"], chosen.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(aux["rewards/accuracy"], (chosen > rejected).float().mean().item(),
                               rtol=RTOL)


def test_chunked_log_probs_and_gradients_match_one_chunk(setup):
    """The output layer in 4 sequence chunks gives the loss and gradients of one chunk."""
    model, batch, _, _, _, ref = setup
    method = PreferenceLoss("dpo", 0.3)
    feats = {k: jnp.asarray(v) for k, v in batch.items()}
    ref = np.concatenate([ref, np.zeros((1, 2), np.float32)])

    def grads(tiles):
        fn = make_loss_fn(method, tiles=tiles)
        (loss, _), g = nnx.value_and_grad(lambda m: fn(m, **feats, ref_logps=jnp.asarray(ref)),
                                          has_aux=True)(model)
        return float(loss), jax.tree.leaves(g)

    (l1, g1), (l4, g4) = grads(1), grads(4)
    np.testing.assert_allclose(l4, l1, rtol=RTOL)
    for a, b in zip(g1, g4, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in g1)


@pytest.mark.parametrize("family, window", [("llama3", 0), ("mistral", 3), ("gemma2", 3)])
def test_pair_rows_give_each_side_its_own_log_probs(family, window):
    """The prompt once, then both responses, each attending to the prompt and itself: each
    side's log-probs are those of its sequence alone, sliding windows (counted in positions,
    not row slots) included."""
    from tpusft.training.preference_loss import pair_logps

    args = ModelArgs(**{**ARGS.__dict__, "family": family, "sliding_window": window})
    model = _numpy_model(args, seed=1)
    seqs = _pairs(seed=2)
    batch = {k: jnp.asarray(v) for k, v in _batch(seqs).items()}
    got = pair_logps(model, *(batch[k] for k in ("inputs", "positions", "segment_ids",
                                                 "score_index", "targets", "weights",
                                                 "sides")), tiles=2)
    np.testing.assert_allclose(np.asarray(got)[:-1], _direct_logps(model, seqs), rtol=RTOL)
    np.testing.assert_array_equal(np.asarray(got)[-1], 0.0)  # the padding pair


def test_log1mexp_is_stable_near_zero():
    x = jnp.asarray([-50.0, -1.0, -0.6931, -1e-3, -1e-6], jnp.float32)
    want = np.log1p(-np.exp(np.asarray(x, np.float64)))
    np.testing.assert_allclose(np.asarray(log1mexp(x)), want, rtol=1e-5)


def test_pair_batches_and_bad_pairs(tmp_path, demo_tokenizer):
    strings = write_jsonl(tmp_path / "strings.jsonl", [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "5+5=", "chosen": "10", "rejected": "10"},           # prefers nothing
        {"prompt": "9+9=" * 20, "chosen": "18", "rejected": "17"}])     # over length
    turns = [{"role": "user", "content": "2+2="}]
    conversations = write_jsonl(tmp_path / "conversations.jsonl", [  # a shared prompt prefix
        {"chosen": [*turns, {"role": "assistant", "content": "4"}],
         "rejected": [*turns, {"role": "assistant", "content": "22"}]}])
    stats = DataStats()
    opts = DataOptions(max_length=40, truncation="drop", shard_index=0, shard_count=1)
    srcs = [Source("s", "json", data_files=str(strings)),
            Source("c", "json", data_files=str(conversations))]
    ds, _ = pairs.build_dataset(srcs, opts, demo_tokenizer, 4, train=False, stats=stats)
    (batch,) = list(ds)
    assert batch["inputs"].shape == (4, 40) and pairs.real_pairs(batch) == 2
    assert stats.bad["chosen equals rejected"] == 1 and stats.bad["over max_target_length"] == 1
    trained = [demo_tokenizer.decode(batch["targets"][i][(batch["weights"][i] > 0)
                                                         & (batch["sides"][i] == s)])
               for i in range(2) for s in range(2)]
    assert trained == ["3<|eot_id|>", "4<|eot_id|>", "4<|eot_id|>", "22<|eot_id|>"]
    # The row holds the prompt once: prompt, chosen response, rejected response.
    prompt = demo_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    seg = batch["segment_ids"][1]
    assert demo_tokenizer.decode(batch["inputs"][1][seg == pairs.PROMPT]) == prompt
    assert demo_tokenizer.decode(batch["inputs"][1][seg == pairs.CHOSEN]) == "4<|eot_id|>"
    assert demo_tokenizer.decode(batch["inputs"][1][seg == pairs.REJECTED]) == "22<|eot_id|>"
    # truncation=right keeps the start: the long prompt leaves no response token to train.
    stats = DataStats()
    ds, _ = pairs.build_dataset(srcs[:1], DataOptions(max_length=100, truncation="right",
                                                      shard_index=0, shard_count=1),
                                demo_tokenizer, 4, train=False, stats=stats)
    assert pairs.real_pairs(next(iter(ds))) == 1
    assert stats.bad["no trained token within max_target_length"] == 1
    # truncation=left keeps the end: the pair trains, cut from the prompt's start, counted.
    stats = DataStats()
    ds, _ = pairs.build_dataset(srcs[:1], DataOptions(max_length=100, truncation="left",
                                                      shard_index=0, shard_count=1),
                                demo_tokenizer, 4, train=False, stats=stats)
    assert pairs.real_pairs(next(iter(ds))) == 2 and stats.truncated == 1


def test_lora_reference_shares_the_base_and_keeps_the_starting_adapters():
    args = ModelArgs(**{**ARGS.__dict__, "lora_rank": 4, "lora_alpha": 8.0,
                        "lora_targets": frozenset(lora.PROJECTIONS)})
    model = create_model(args, None, None, seed=0)
    for _, module in lora.adapters(model):  # adapters that change the model (lora.adapter_path)
        module.lora_b[...] = jnp.full(module.lora_b.shape, 0.01)
    ref = reference_model(model)
    base = nnx.to_flat_state(nnx.state(model, nnx.Param))
    ref_params = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    shared = [path for path, _ in base if path[-1] not in ("lora_a", "lora_b")]
    assert len(shared) > 10 and len(ref_params) == len(base)
    for path, var in base:
        if path in shared:
            assert ref_params[path][...] is var[...], path  # the very same arrays: no copy
        else:  # a copy of the starting adapters, which training does not move
            assert ref_params[path][...] is not var[...], path
            np.testing.assert_array_equal(ref_params[path][...], var[...])
    x = jnp.asarray(np.arange(12).reshape(2, 6) % 64)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    before = ref(x, pos)[0]
    np.testing.assert_array_equal(before, model(x, pos)[0])  # the reference is the start
    for _, module in lora.adapters(model):
        module.lora_b[...] = module.lora_b[...] * 2.0
    np.testing.assert_array_equal(ref(x, pos)[0], before)


def _cfg(tmp_path, demo_assets, *extra):
    return load_config([
        str(configs_root() / "demo" / "dpo.yml"), f"base_output_directory={tmp_path}",
        "hf_path=json", f"hf_data_files={demo_assets / 'preference_train.jsonl'}",
        f"tokenizer_path={demo_assets / 'tokenizer'}", "demo_task=", "load_parameters_path=",
        "enable_checkpointing=false", "global_batch_size=8", "steps=3", "log_period=1",
        "learning_rate=1e-3", *extra])


def _train(cfg, tokenizer, devices):
    mesh = make_mesh(cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism,
                     cfg.ici_tensor_parallelism, devices)
    srcs, part = sources.sources(cfg, train=True)
    ds, _ = pairs.build_dataset(srcs, sources.options(cfg, train=True), tokenizer,
                                cfg.global_batch_size, train=True, part=part)
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, seed=0)
        feeder = preference.batch_feeder(ds, cfg)
        trainer = preference.build_trainer(model, reference_model(model), make_optimizer(cfg),
                                           cfg, feeder)
        losses, starts = [], []

        class Record(Progress):
            def on_train_step_start(self, ctx):
                starts.append(time.perf_counter())

            def on_train_step_end(self, ctx, step, loss):
                losses.append((float(loss), self._extras(ctx, "train")))

        trainer.with_training_hooks(Record(feeder, cfg.steps, 1, 1.0, 0.0, None,
                                           extras=preference.METRICS))
        jax.monitoring.register_event_duration_secs_listener(record_lowering)
        trainer.train([])
    lowered_later = [t for t in LOWERED if t > starts[1]]
    return losses, lowered_later


def test_sharded_dpo_matches_one_device(tmp_path, demo_assets, demo_tokenizer):
    ref, _ = _train(_cfg(tmp_path / "one", demo_assets, "ici_fsdp_parallelism=1"),
                    demo_tokenizer, jax.devices()[:1])
    got, lowered_later = _train(_cfg(tmp_path / "many", demo_assets, "ici_data_parallelism=2",
                                     "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"),
                                demo_tokenizer, jax.devices())
    assert len(ref) == len(got) == 3
    np.testing.assert_allclose([x for x, _ in got], [x for x, _ in ref], rtol=2e-5)
    for step, ((_, a), (_, b)) in enumerate(zip(got, ref, strict=True)):
        assert a.keys() == b.keys() and "reward_margin" in a
        # At step 1 the policy is its reference: every reward is rounding noise around 0, and
        # which side's noise is larger (the accuracy) means nothing.
        # The margin is a difference of two rewards of ~0.1 each, themselves beta times
        # differences of log-probs of ~13: float32 reduction order moves it by a few 1e-6.
        keys = [k for k in a if step or k != "reward_accuracy"]
        np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-4,
                                   atol=1e-5)
    # The policy starts as its reference (loss log 2), then learns to prefer the chosen side.
    np.testing.assert_allclose(ref[0][0], np.log(2), rtol=1e-5)
    assert ref[-1][0] < ref[0][0] and ref[-1][1]["reward_margin"] > 0
    assert lowered_later == []  # static shapes: steps 2 and 3 reuse step 1's program
