"""Tunix's configuration of a run's trainer: its TrainingConfig (evaluation, steps,
accumulation, metrics, profiler, data sharding) and the Orbax options of its checkpoints."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from tunix.sft import peft_trainer
from tunix.sft import profiler as tunix_profiler

from tpusft.models.sharding import BATCH_AXES
from tpusft.training import tensorboard

def checkpoint_options(cfg: Any) -> ocp.CheckpointManagerOptions | None:
    """Orbax's options for a trainer's checkpoints (None when checkpointing is off)."""
    if not cfg.enable_checkpointing:
        return None
    policies = ocp.checkpoint_managers
    return ocp.CheckpointManagerOptions(
        # Every checkpoint_period steps and the last step; no extra save at the first step.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(cfg.checkpoint_period),
            policies.SpecificStepsPolicy([cfg.steps])]),
        max_to_keep=cfg.max_num_checkpoints_to_keep,
        enable_async_checkpointing=cfg.async_checkpointing, create=True)


def training_config(cfg: Any, config_cls=peft_trainer.TrainingConfig, **extra):
    """Tunix's training config of a run (`config_cls` a TrainingConfig subclass such as DPO's,
    `extra` its own fields)."""
    checkpointing = checkpoint_options(cfg)
    profiler = None
    if cfg.profiler == "xplane":
        profiler = tunix_profiler.ProfilerOptions(
            log_dir=cfg.profile_directory, skip_first_n_steps=cfg.skip_first_n_steps_for_profiler
            * cfg.gradient_accumulation_steps,
            profiler_steps=cfg.profiler_steps * cfg.gradient_accumulation_steps)
    return config_cls(
        eval_every_n_steps=cfg.eval_interval or cfg.steps,
        max_steps=cfg.steps,
        gradient_accumulation_steps=(cfg.gradient_accumulation_steps
                                     if cfg.gradient_accumulation_steps > 1 else None),
        checkpoint_root_directory=None,  # tpusft's GuardedCheckpoints (make_resilient)
        checkpointing_options=checkpointing,
        metrics_logging_options=tensorboard.logger_options(cfg),
        profiler_options=profiler,
        data_sharding_axis=(BATCH_AXES,),
        metrics_prefix="",
        pbar_description=None,
        **extra,
    )
