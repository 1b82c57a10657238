"""Every Tunix private name tpusft uses, and why, in one place (google-tunix 0.1.7).

Tunix has no public way to do these: restore a trainer's position after its constructor,
report the step its metrics loop holds back, reach the Orbax manager under its checkpoint
manager, prepare a batch (the hook its own trainers override), name a trainer's auxiliary
metrics, or reach its sampler's compiled programs. `NAMES` lists each name with the
parameters tpusft passes; tests/test_internals.py checks that every one still exists as
used, so an upgrade that renames one fails in that test instead of in a run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx

from tunix.generate import sampler as sampler_lib
from tunix.sft import checkpoint_manager as tunix_checkpoints
from tunix.sft import peft_trainer
from tunix.sft import profiler as tunix_profiler
from tunix.sft.dpo import dpo_trainer

from tpusft.internals import missing_names

VERSION = "0.1.7"

# (class, name, what it is): "attribute" is set in the class's __init__; a tuple names a
# method's parameters, in order.
NAMES: tuple[tuple[type, str, Any], ...] = (
    (peft_trainer.PeftTrainer, "_lora_enabled", "attribute"),
    (peft_trainer.PeftTrainer, "_train_steps", "attribute"),
    (peft_trainer.PeftTrainer, "_iter_steps", "attribute"),
    (peft_trainer.PeftTrainer, "_restored_custom_metadata", "attribute"),
    (peft_trainer.PeftTrainer, "_prof", "attribute"),
    (peft_trainer.PeftTrainer, "_prev_buffered_train_metrics", "attribute"),
    (peft_trainer.PeftTrainer, "_write_train_metrics", ("self",)),
    (peft_trainer.PeftTrainer, "_prepare_inputs", ("self", "input_data")),
    (peft_trainer.PeftTrainer, "_jitted_train_step_fn", "attribute"),
    (peft_trainer.PeftTrainer, "_jitted_eval_step_fn", "attribute"),
    (peft_trainer.PeftTrainer, "_shard_optimizer", ("self", "mesh")),
    (dpo_trainer.DPOTrainer, "_aux_metrics_to_log", "attribute"),
    (tunix_checkpoints.CheckpointManager, "_checkpoint_manager", "attribute"),
    (sampler_lib.Sampler, "_compiled_prefill_fn", "attribute"),
    (sampler_lib.Sampler, "_compiled_decode_fn", "attribute"),
    (sampler_lib.Sampler, "_flattened_transformer_state", "attribute"),
)


def missing() -> list[str]:
    """The entries of NAMES this library lacks or has with other parameters, one line each."""
    return missing_names(NAMES)


# ------------------------------------------------------------------ trainers
def lora_enabled(trainer: peft_trainer.PeftTrainer) -> bool:
    return trainer._lora_enabled  # noqa: SLF001


def set_position(trainer: peft_trainer.PeftTrainer, step: int, metadata: dict) -> None:
    """Has a trainer carry on from `step` (restored after its constructor, which is the only
    place Tunix restores): its step counters, restored metadata, and a profiler whose first
    step is the restored one."""
    accumulation = trainer.config.get_with_default("gradient_accumulation_steps", 1)
    trainer._train_steps = step  # noqa: SLF001
    trainer._iter_steps = step * accumulation  # noqa: SLF001
    trainer._restored_custom_metadata = metadata  # noqa: SLF001
    max_steps = trainer.config.max_steps
    trainer._prof = tunix_profiler.Profiler(  # noqa: SLF001
        initial_step=trainer._iter_steps,  # noqa: SLF001
        max_step=max_steps * accumulation if max_steps is not None else None,
        profiler_options=trainer.config.profiler_options)


def restored_metadata(trainer: peft_trainer.PeftTrainer) -> dict:
    """The custom metadata of the checkpoint a trainer was restored from ({} when none)."""
    return trainer._restored_custom_metadata or {}  # noqa: SLF001


def report_held_back_step(trainer: peft_trainer.PeftTrainer) -> None:
    """Reports the step whose metrics Tunix holds back (it writes step N's after step N+1
    has started); Tunix's next step then starts a new hold-back as on a run's first step."""
    if trainer._prev_buffered_train_metrics is not None:  # noqa: SLF001
        trainer._write_train_metrics()  # noqa: SLF001


def build_jitted_steps(trainer: peft_trainer.PeftTrainer, mesh,
                       donate_argnames: tuple[str, ...]) -> None:
    """Builds a trainer's jitted train step (donating `donate_argnames`) and eval step, bound
    to its model and optimizer as Tunix binds them, and places its optimizer state on `mesh`
    as Tunix does first; Tunix's jit_train_and_eval_step then returns the ones it finds built.
    Tunix's own donates the optimizer state only."""
    if trainer._jitted_train_step_fn is not None:  # noqa: SLF001
        return
    trainer._shard_optimizer(mesh)  # noqa: SLF001
    trainer._jitted_train_step_fn = functools.partial(  # noqa: SLF001
        nnx.jit(trainer.create_train_step_fn(), donate_argnames=donate_argnames),
        trainer.model, trainer.optimizer)
    trainer._jitted_eval_step_fn = functools.partial(  # noqa: SLF001
        nnx.jit(trainer.create_eval_step_fn()), trainer.model)


def set_aux_metrics(trainer: dpo_trainer.DPOTrainer, reducers: dict[str, Callable]) -> None:
    """The auxiliary outputs of a DPOTrainer's loss it logs, each with its reducer."""
    trainer._aux_metrics_to_log = dict(reducers)  # noqa: SLF001


class PreparesInputs:
    """Mixin before a PeftTrainer subclass: its `prepare_inputs(batch)` is called on every
    batch before the step (Tunix's `_prepare_inputs`, which its own DPOTrainer overrides)."""

    def prepare_inputs(self, batch: Any) -> Any:
        return batch

    def _prepare_inputs(self, input_data: Any) -> Any:
        return self.prepare_inputs(input_data)


def evaluate_after(train_ctx: peft_trainer.PeftTrainer, step: int) -> None:
    """Has Tunix evaluate after `step` too: it evaluates after the steps that are multiples of
    its config's eval_every_n_steps, read after every step."""
    train_ctx.config.eval_every_n_steps = step


# ---------------------------------------------------------------- checkpoints
def orbax_manager(manager: tunix_checkpoints.CheckpointManager):
    """The Orbax CheckpointManager under Tunix's (None without a checkpoint directory)."""
    return manager._checkpoint_manager  # noqa: SLF001


# -------------------------------------------------------------------- sampler
def sampler_programs(sampler: sampler_lib.Sampler):
    """(prefill, decode, weights): a Tunix Sampler's jitted prefill and decode programs and
    the flattened weights they take."""
    return (sampler._compiled_prefill_fn, sampler._compiled_decode_fn,  # noqa: SLF001
            sampler._flattened_transformer_state)  # noqa: SLF001
