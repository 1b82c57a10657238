"""GRPO and its variants (train_grpo.py): rollouts from prompts, rewards, the clipped policy
update; the plot follows the reward, held-out accuracy, KL and completion length."""

from __future__ import annotations

import dataclasses

from tpusft.methods import Method

# The policy loss is noise around zero by construction; what GRPO optimises is the reward.
PANELS = (("reward", "mean reward", [("train", "reward", "reward (rollouts)")]),
          ("held-out accuracy", "exact match", [("eval", "accuracy", "held-out (greedy)"),
                                                ("train", "accuracy", "rollouts")]),
          ("KL to the reference", "KL", [("train", "kl", "kl")]),
          ("completion length", "tokens", [("train", "completion_length", "mean length")]))


def method() -> Method:
    """The rollout's prefill and decode, the reference's (and with num_iterations > 1 the old
    policy's) log-probs, and the update (aot/grpo_programs.py)."""
    from tpusft.aot import grpo_programs
    from tpusft.data import inspect
    from tpusft.models.decoder import ModelArgs
    from tpusft.rl import grpo
    from tpusft.training import report

    def flops_factor(cfg):  # the update, plus forward passes: rollout, reference, old policy
        return 1 + (1 + grpo.needs_reference(cfg) + (cfg.grpo.num_iterations > 1)) / 3

    def programs(cfg, mesh):
        done = grpo_programs.compile_programs(cfg, mesh)
        return dataclasses.replace(done.worst, parts=done.results, kv_cache=done.kv_cache)

    def batch_line(cfg, rows, per_device, micro):
        g = cfg.grpo
        return (f"{cfg.global_batch_size} prompts x {g.num_generations} completions = "
                f"{rows} rows of {g.max_prompt_length} + {g.max_completion_length} tokens "
                f"({per_device} per device)")

    return Method(
        "GRPO", lambda cfg: f"GRPO ({cfg.grpo.loss_algo})", ("prompt",), PANELS,
        inspect.prompt_rows, ModelArgs.from_config, None, None, batch_line, plot_name="plot",
        flops_factor=flops_factor, dense=report.GRPO_ROWS, programs=programs,
        rows_per_example=lambda cfg: cfg.grpo.num_generations,
        length=lambda cfg: cfg.grpo.max_prompt_length + cfg.grpo.max_completion_length)
