"""The one place tpusft talks to Tunix's RL stack.

Tunix's RLCluster holds the actor (trained), reference (KL anchor) and rollout roles on one
mesh; its GRPO learners (GRPO, GSPO-token, Dr. GRPO, DAPO) run the loop: rollouts, rewards,
group advantages, clipped policy updates, Orbax checkpoints. tpusft supplies:
  * the model: the same decoder as SFT, whose KV cache Tunix's vanilla sampler drives;
  * the reference: with LoRA, the actor's own base weights without the adapters (shared
    arrays, no copy); otherwise a copy of the starting weights; none when beta=0;
  * per-step rollout seeds, timings (rollout and train tokens/s), per-reward mean/std,
    accuracy, held-out greedy accuracy every eval_interval steps, the progress line and
    metrics.jsonl (Progress below).

The rollout engine is chosen in `rollout_engine()`: Tunix's vanilla sampler everywhere; a
vLLM engine on TPU plugs in there without touching the rest.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import dapo_learner, drgrpo_learner, grpo_learner
from tunix.rl.rollout import base_rollout

from tpusft.data.chat import stop_ids
from tpusft.errors import ConfigError
from tpusft.models import sampling
from tpusft.models.sharding import BATCH_AXES
from tpusft.rl import rewards as rewards_lib
from tpusft.training import tensorboard
from tpusft.training.metrics import JsonlWriter, format_duration
from tpusft.training.optimizer import make_optimizer
from tpusft.training.setup import reference_model
from tpusft.training.progress import ProgressBase
from tpusft.training.trainer import make_resilient
from tpusft.training.tunix_config import checkpoint_options

Role = rl_cluster_lib.Role

# loss_algo -> (Tunix learner, its config class, fixed config fields)
ALGORITHMS = {
    "grpo": (grpo_learner.GRPOLearner, grpo_learner.GRPOConfig, {"loss_algo": "grpo"}),
    "gspo-token": (grpo_learner.GRPOLearner, grpo_learner.GRPOConfig,
                   {"loss_algo": "gspo-token"}),
    "drgrpo": (drgrpo_learner.DrGRPOLearner, drgrpo_learner.DrGRPOConfig, {}),
    "dapo": (dapo_learner.DAPOLearner, dapo_learner.DAPOConfig, {}),
}


def algorithm_config(cfg: Any):
    """(learner class, its algorithm config) for loss_algo."""
    learner, config_cls, fixed = ALGORITHMS[cfg.grpo.loss_algo]
    kw = dict(num_generations=cfg.grpo.num_generations, num_iterations=cfg.grpo.num_iterations,
              epsilon=cfg.grpo.epsilon, **fixed)
    if cfg.grpo.loss_algo == "dapo":  # no KL term; clip-higher; overlong shaping: length_penalty
        kw.update(epsilon_high=cfg.grpo.epsilon_high, overlong_buffer=None)
    else:
        kw["beta"] = cfg.grpo.beta
    return learner, config_cls(**kw)


def needs_reference(cfg: Any) -> bool:
    """Tunix computes reference log-probs whenever beta != 0 (DAPO: always, for its KL log)."""
    return cfg.grpo.loss_algo == "dapo" or cfg.grpo.beta != 0.0


def describe_step(cfg: Any, rewards) -> str:
    """What one step takes: prompts, completions, lengths, temperature, steps and rewards."""
    g = cfg.grpo
    return (f"{cfg.global_batch_size} prompts x {g.num_generations} completions per step, "
            f"prompt <= {g.max_prompt_length}, completion <= {g.max_completion_length} "
            f"tokens, temperature {g.temperature:g}; {cfg.steps} steps; rewards: "
            + ", ".join(f"{r.name} x{r.weight:g}" for r in rewards))


def rollout_engine(cfg: Any) -> str:
    """Tunix's rollout engine name. The vanilla sampler drives tpusft's decoder and KV cache
    on CPU, GPU and TPU; another engine (vLLM on TPU) is selected here."""
    if cfg.grpo.rollout_engine == "vanilla":
        return "vanilla"
    raise ConfigError(f"grpo.rollout_engine={cfg.grpo.rollout_engine} is not available in this "
                      f"install; use grpo.rollout_engine=vanilla")


def rollout_config(cfg: Any, tokenizer) -> base_rollout.RolloutConfig:
    return base_rollout.RolloutConfig(
        max_tokens_to_generate=cfg.grpo.max_completion_length, temperature=cfg.grpo.temperature,
        top_p=cfg.grpo.top_p, top_k=cfg.grpo.top_k or None,
        max_prompt_length=cfg.grpo.max_prompt_length,
        kv_cache_size=cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length,
        eos_tokens=stop_ids(tokenizer), seed=jax.random.key_data(jax.random.key(cfg.seed)))


def training_config(cfg: Any) -> rl_cluster_lib.RLTrainingConfig:
    return rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=make_optimizer(cfg),
        eval_every_n_steps=cfg.steps + 1,  # held-out accuracy is tpusft's (Progress)
        max_steps=cfg.steps,
        # Checkpoints go to checkpoint_directory/actor/<step>, through tpusft's
        # GuardedCheckpoints (guard_actor): Tunix restores nothing itself.
        checkpoint_root_directory=None,
        checkpointing_options=checkpoint_options(cfg),
        metrics_logging_options=tensorboard.logger_options(cfg),
        data_sharding_axis=(BATCH_AXES,),
        pbar_description=None,
    )


class TimedCluster(rl_cluster_lib.RLCluster):
    """Tunix's cluster with a fresh rollout seed per step (folded from the run's seed and the
    global step) and its rollouts and actor updates timed into `timings`."""

    def __init__(self, *, seed: int, timings: Timings | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.timings = seed, timings

    def generate(self, *args, **kwargs) -> base_rollout.RolloutOutput:
        self.cluster_config.rollout_config.seed = jax.random.key_data(
            jax.random.fold_in(jax.random.key(self.seed), self.global_steps))
        start = time.perf_counter()
        out = super().generate(*args, **kwargs)
        if self.timings is not None:
            prompt = int(np.count_nonzero(np.asarray(out.left_padded_prompt_tokens)
                                          != self.rollout.pad_id()))
            self.timings.rollout(time.perf_counter() - start, [len(t) for t in out.tokens],
                                 prompt)
        return out

    def update_actor(self, train_ds, *args, **kwargs):
        timings = self.timings
        start, excluded = time.perf_counter(), timings.excluded_s if timings else 0.0
        super().update_actor(train_ds, *args, **kwargs)
        if timings is not None:
            examples = sum(len(e.completion_ids) for e in train_ds)
            seconds = time.perf_counter() - start - (timings.excluded_s - excluded)
            timings.update(self.actor_trainer.train_steps, seconds, examples)


def build_cluster(actor: nnx.Module, tokenizer, mesh, cfg: Any,
                  timings: Timings | None = None) -> TimedCluster:
    """Tunix's cluster, its actor restored from run_name's newest intact checkpoint."""
    reference = reference_model(actor) if needs_reference(cfg) else None
    cluster = TimedCluster(
        seed=cfg.seed, timings=timings,
        actor=actor, reference=reference, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
            rollout_engine=rollout_engine(cfg), offload_to_cpu=False,
            training_config=training_config(cfg),
            rollout_config=rollout_config(cfg, tokenizer)))
    guard_actor(cluster, cfg)
    return cluster


def guard_actor(cluster: rl_cluster_lib.RLCluster, cfg: Any) -> None:
    """Checked checkpoints, preemption and nan_policy for the actor trainer (as for SFT). The
    restored weights then reach the rollout model and Tunix's start-of-step policy snapshot
    through `sync_weights`. A checkpoint's data position is Tunix's global step (the learner
    skips that many batches on resume); at the end of a run it is the steps completed."""
    trainer = cluster.actor_trainer
    root = f"{cfg.checkpoint_directory}/actor" if cfg.enable_checkpointing else None
    layout = {"global_batch_size": cfg.global_batch_size,
              "num_generations": cfg.grpo.num_generations,
              "num_iterations": cfg.grpo.num_iterations}
    make_resilient(trainer, cfg, root=root, required=("global_step",), layout=layout,
                   metadata_fn=lambda: {"global_step": cluster.global_steps, "role": "actor"})
    if trainer.train_steps:
        cluster.sync_weights()


def until_preempted(batches, preemption):
    """The prompt batches, ending at the first one asked for after a stop was requested."""
    for batch in batches:
        if preemption.requested:
            return
        yield batch


class Timings:
    """What each optimizer step saw: the rollout before it (time, tokens, completion lengths,
    each reward's values) and its own update time and tokens, keyed by the step number."""

    def __init__(self, rewards: list[rewards_lib.Reward]):
        self.rewards = rewards
        self.rollout_s = 0.0
        self.rollout_tokens = self.batch_tokens = 0
        self.completion_lengths: list[int] = []
        self.steps: dict[int, dict] = {}
        self.excluded_s = 0.0  # held-out evaluation run from inside an update (not training)

    def rollout(self, seconds: float, lengths: list[int], prompt_tokens: int) -> None:
        self.rollout_s += seconds
        self.rollout_tokens += sum(lengths)
        self.completion_lengths = lengths
        self.batch_tokens = sum(lengths) + prompt_tokens

    def update(self, step: int, seconds: float, examples: int) -> None:
        """One actor update of `examples` of the last rollout's completions."""
        n = max(len(self.completion_lengths), 1)
        self.steps[step] = {
            "rollout_s": self.rollout_s, "rollout_tokens": self.rollout_tokens,
            "update_s": seconds, "train_tokens": self.batch_tokens * examples / n,
            "lengths": list(self.completion_lengths),
            "rewards": {r.name: (r.weight, r.last.copy()) for r in self.rewards}}
        self.rollout_s, self.rollout_tokens = 0.0, 0  # counted once, by the first update


def build_learner(cluster: TimedCluster, cfg: Any, rewards: list[rewards_lib.Reward]):
    learner_cls, algo = algorithm_config(cfg)
    return learner_cls(cluster, algo, rewards)


def held_out_evaluator(model, tokenizer, problems: list[tuple[str, str]], cfg: Any):
    """Progress's evaluation: () -> (greedy accuracy, prompts) on the held-out problems, or
    None when there are none."""
    def evaluate():
        if not problems:
            return None
        acc, rows = held_out_accuracy(model, tokenizer, problems, cfg.grpo.max_completion_length)
        return acc, len(rows)
    return evaluate


def held_out_accuracy(model, tokenizer, problems: list[tuple[str, str]], max_new_tokens: int,
                      batch: int = 64) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy decoding on (rendered prompt, reference) pairs; (accuracy, rows)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        new = sampling.generate(model, ids, max_new_tokens=max_new_tokens, pad_id=pad,
                                eos_ids=stop_ids(tokenizer),
                                prefill_length=max(len(x) for x in ids))
        for (prompt, want), toks in zip(chunk, new, strict=True):
            got = tokenizer.decode(toks, skip_special_tokens=True).strip()
            rows.append((prompt, want, got))
    correct = sum(rewards_lib.answers_equal(rewards_lib.extract_answer(g), w)
                  for _, w, g in rows)
    return correct / max(len(rows), 1), rows


class Progress(ProgressBase):
    """GRPO's progress reporter (the actor trainer's hooks). After each optimizer step:
    rewards (mean and std of each), accuracy, completion length, KL, clip fraction, rollout
    and train tokens/s, ETA to the progress line (every log_period steps), metrics.jsonl and
    TensorBoard; held-out greedy accuracy every eval_interval."""

    role = "actor"

    def __init__(self, cfg: Any, rewards: list[rewards_lib.Reward], timings: Timings,
                 evaluate_fn, jsonl: JsonlWriter, print_fn=print):
        super().__init__(jsonl, print_fn)
        self.cfg, self.rewards, self.timings = cfg, rewards, timings
        self.evaluate_fn = evaluate_fn
        self.start_time = None
        self.start_step = None
        self.evals: list[tuple[int, float]] = []

    def on_train_start(self, train_ctx):  # Tunix calls this once per global step
        if self.start_time is None:
            self.start_time, self.start_step = time.perf_counter(), train_ctx.train_steps

    def record(self, step: int, loss: float, train_ctx=None) -> dict:
        rec: dict[str, Any] = {"kind": "train", "step": step, "loss": loss}
        seen = self.timings.steps.pop(step, None)
        if seen is None:
            return rec
        total = 0.0
        for name, (weight, values) in seen["rewards"].items():
            if len(values):
                rec[f"reward/{name}/mean"] = float(np.mean(values))
                rec[f"reward/{name}/std"] = float(np.std(values))
                total = total + weight * values
                if name == "answer_correct":
                    rec["accuracy"] = float(np.mean(values))
        if not np.isscalar(total):
            rec["reward"], rec["reward_std"] = float(np.mean(total)), float(np.std(total))
        if seen["lengths"]:
            rec["completion_length"] = float(np.mean(seen["lengths"]))
        if seen["rollout_s"]:
            rec["rollout_tokens_per_s"] = seen["rollout_tokens"] / seen["rollout_s"]
        if seen["update_s"]:
            rec["train_tokens_per_s"] = seen["train_tokens"] / seen["update_s"]
        if train_ctx is not None:
            for name in ("kl", "pg_clipfrac"):
                value = self.metric(train_ctx, name)
                if value is not None:
                    rec["clip_fraction" if name == "pg_clipfrac" else name] = value
        return rec

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        # Tunix reports step `train_step` one step late (after the next update, or at close).
        step = int(train_step)
        if self.history and step <= self.history[-1][0]:
            return
        loss = float(train_loss)
        self.observe(train_ctx, step, loss)
        rec = self.record(step, loss, train_ctx)
        self.jsonl.write(rec)
        logger = train_ctx.metrics_logger
        for key, value in rec.items():
            if key not in ("kind", "step", "loss"):
                logger.log("tpusft", key, value, "train", step)
        if step % self.cfg.log_period == 0 or step == self.cfg.steps:
            elapsed = time.perf_counter() - self.start_time
            done = step - self.start_step
            eta = elapsed / max(done, 1) * (self.cfg.steps - step)
            parts = [f"step {step}/{self.cfg.steps}", f"loss {loss:.4f}"]
            for key, fmt in (("reward", "reward {:.3f}"), ("accuracy", "acc {:.1%}"),
                             ("completion_length", "len {:.1f}"), ("kl", "kl {:.4f}"),
                             ("clip_fraction", "clip {:.3f}"),
                             ("rollout_tokens_per_s", "rollout {:,.0f} tok/s"),
                             ("train_tokens_per_s", "train {:,.0f} tok/s")):
                if key in rec:
                    parts.append(fmt.format(rec[key]))
            parts.append(f"ETA {format_duration(eta)}")
            self.print(" | ".join(parts), flush=True)
            self.jsonl.flush()
        interval = self.cfg.eval_interval
        if interval and step % interval == 0 and step != self.cfg.steps:
            self.evaluate(step, train_ctx)

    def evaluate(self, step: int, train_ctx=None) -> float | None:
        start = time.perf_counter()
        result = self.evaluate_fn()
        self.timings.excluded_s += time.perf_counter() - start
        if result is None:
            return None
        accuracy, n = result
        self.evals.append((step, accuracy))
        self.print(f"held-out accuracy at step {step}: {100 * accuracy:.1f}% of {n} (greedy)",
                   flush=True)
        self.jsonl.write({"kind": "eval", "step": step, "accuracy": accuracy})
        self.jsonl.flush()
        if train_ctx is not None:
            train_ctx.metrics_logger.log("tpusft", "heldout_accuracy", accuracy, "eval", step)
        else:  # after training: the trainer's logger is closed
            tensorboard.write_scalars(self.cfg, step, {"eval/heldout_accuracy": accuracy})
        return accuracy
