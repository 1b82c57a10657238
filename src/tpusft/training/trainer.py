"""The one place tpusft talks to Tunix's SFT trainer.

Tunix's PeftTrainer runs the loop (jit, gradient accumulation, eval, TensorBoard metrics,
profiler, Orbax checkpoints). tpusft adds, through Tunix's own hooks:
  * the feeder (training/feeder.py, DataHooks): grain batches as micro-batches with one loss
    denominator, and the data position in every checkpoint;
  * the progress reporter (training/progress.py, TrainingHooks): tokens/s, MFU, ETA,
    metrics.jsonl, the nan_policy check;
  * Tunix's configuration of the run (training/tunix_config.py);
  * here: the step donating the weights, `make_resilient` (checked checkpoints, preemption,
    the divergence guard, shared by every recipe) and `fit`, the loop from the restored step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import optax
from flax import nnx
from tunix.sft import peft_trainer

from tpusft.errors import Diverged
from tpusft.internals import tunix_private
from tpusft.models.sharding import BATCH_AXES
from tpusft.training import loss as loss_lib
from tpusft.training.checkpoints import adopt
from tpusft.training.divergence import DivergenceGuard
from tpusft.training.feeder import DATA_STATE_KEY, BatchFeeder, DataStateCheckpoints
from tpusft.training.preemption import Preemption
from tpusft.training.progress import Progress
from tpusft.training.tunix_config import checkpoint_options, training_config


def donated_arguments(model: nnx.Module) -> tuple[str, ...]:
    """What the train step donates. Tunix donates the optimizer state; a full fine-tune's
    step also donates the model, whose every weight it replaces, so a chip does not hold the
    old weights beside the new ones (for Llama 3.1 8B on a v5p-8, 7.5 GiB a chip). A LoRA
    model's frozen base is shared with its reference and the rollout (setup.reference_model),
    so it is not donated."""
    from tpusft.models import lora

    return ("optimizer",) if lora.adapters(model) else ("model", "optimizer")


class DonatedWeights:
    """Tunix's PeftTrainer.jit_train_and_eval_step with `donated_arguments` (the jitted steps
    built by internals/tunix_private.py before Tunix's method returns the ones it finds
    built; tests/test_aot.py lowers both ways)."""

    def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False):
        if not skip_jit and not cache_nnx_graph:
            from jax.interpreters import pxla

            tunix_private.build_jitted_steps(self, pxla.thread_resources.env.physical_mesh,
                                             donated_arguments(self.model))
        return super().jit_train_and_eval_step(skip_jit, cache_nnx_graph)


class SftTrainer(DonatedWeights, DataStateCheckpoints, peft_trainer.PeftTrainer):
    """PeftTrainer whose checkpoints also carry the data iterator's state."""


def vocab_tiles(cfg: Any, mesh: jax.sharding.Mesh | None) -> int:
    """num_vocab_tiling, or its automatic value for one device's share of a micro-batch."""
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape) if mesh else 1
    rows = max(cfg.global_batch_size // cfg.gradient_accumulation_steps // shards, 1)
    return loss_lib.vocab_tiles(cfg.num_vocab_tiling, rows * cfg.max_target_length,
                                cfg.max_target_length, cfg.vocab_size)


def sft_trainer(model: nnx.Module, optimizer: optax.GradientTransformation, cfg: Any,
                adjust=lambda tunix_config: tunix_config) -> SftTrainer:
    """Tunix's trainer with tpusft's SFT loss (its config through `adjust`): the step a run
    executes and a compile-only run (aot/) compiles."""
    trainer = SftTrainer(model, optimizer, adjust(training_config(cfg)))
    mesh = model.rules.mesh if model.rules is not None else None
    trainer.with_loss_fn(loss_lib.seeded_sft_loss(cfg.seed, vocab_tiles(cfg, mesh)))
    trainer.with_gen_model_input_fn(lambda batch: batch)
    return trainer


def build_trainer(model: nnx.Module, optimizer: optax.GradientTransformation, cfg: Any,
                  feeder: BatchFeeder) -> SftTrainer:
    """The trainer, restored from run_name's last checkpoint (model, optimizer, data) if any."""
    trainer = sft_trainer(model, optimizer, cfg)
    mesh = trainer.model.rules.mesh if trainer.model.rules is not None else None
    feeder.dropout = bool(cfg.lora.enable_lora and cfg.lora.dropout)
    feeder.mesh = mesh
    make_resilient(trainer, cfg, feeder)
    trainer.attach(feeder)
    return trainer


def run_layout(cfg: Any) -> dict[str, Any]:
    """What a checkpoint's data position means, so a resume with another batch is refused."""
    return {"global_batch_size": cfg.global_batch_size,
            "max_target_length": cfg.max_target_length,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps}


def make_resilient(trainer, cfg: Any, feeder: BatchFeeder | None = None, root: str | None = None,
                   required: Sequence[str] = (DATA_STATE_KEY,),
                   layout: dict[str, Any] | None = None, metadata_fn=None) -> None:
    """Checked checkpoints restored into `trainer` (the newest intact step), preemption and
    the nan_policy guard, as `trainer.preemption` and `trainer.divergence`."""
    if root is None and cfg.enable_checkpointing:
        root = cfg.checkpoint_directory
    preemption = Preemption(cfg.preemption_deadline_s)
    manager = None
    divergence = DivergenceGuard(cfg.nan_policy, cfg.max_skipped_steps,
                                 last_good=lambda: manager.latest_description())
    extra = {"metadata_fn": metadata_fn} if metadata_fn is not None else {}

    def before_save(step: int, optimizer) -> None:
        hooks = trainer.training_hooks
        if isinstance(hooks, Progress):
            hooks.report_before_save(trainer)
        divergence.before_save(step, optimizer)

    manager = adopt(trainer, root, checkpoint_options(cfg), layout=layout or run_layout(cfg),
                    required=required, before_save=before_save, preemption=preemption,
                    per_process=(DATA_STATE_KEY,), **extra)
    divergence.start(trainer.optimizer)
    trainer.preemption, trainer.divergence = preemption, divergence
    if feeder is not None:
        feeder.preemption = preemption


def run_training(trainer, cfg: Any, train: Any) -> None:
    """Runs `train()` with SIGTERM/SIGINT (and maintenance events) ending it at a step
    boundary with a checkpoint; on divergence waits for the checkpoints already being
    written before the error goes up."""
    preemption: Preemption = trainer.preemption
    preemption.install(cfg.watch_maintenance_events)
    try:
        train()
    except Diverged:
        trainer.checkpoint_manager.close()
        trainer.metrics_logger.close()
        raise
    finally:
        preemption.finished(preemption.saved_step)
        preemption.uninstall()


def fit(trainer, cfg: Any, progress: Progress, has_eval: bool) -> bool:
    """Trains a PeftTrainer-based recipe from its restored step to cfg.steps: metrics after
    the checkpoint are rewound, signals end it at a step boundary with a checkpoint. False
    when a signal ended it early (the caller exits 0 and the next start resumes)."""
    progress.divergence = trainer.divergence
    trainer.with_training_hooks(progress)
    start = trainer.train_steps
    if start >= cfg.steps:
        trainer.close()
        print(f"run already complete at step {start}; nothing to train")
        return True
    if progress.jsonl is not None:
        progress.jsonl.rewind(start)
    run_training(trainer, cfg, lambda: trainer.train([], [None] if has_eval else None))
    return not stopped_early(trainer, cfg)


def stopped_early(trainer, cfg: Any) -> bool:
    """After run_training: True (and one line) when a signal ended the run before its last
    step; the checkpoint line came from the save itself."""
    preemption: Preemption = trainer.preemption
    if not preemption.requested or trainer.train_steps >= cfg.steps:
        return False
    if preemption.saved_step is None:
        saved = ("nothing saved: enable_checkpointing=false" if not cfg.enable_checkpointing
                 else "before its first step: nothing to save" if trainer.train_steps == 0
                 else f"last checkpoint: {trainer.checkpoint_manager.latest_description()}")
        print(f"{preemption.reason}: stopped at step {trainer.train_steps} ({saved})",
              flush=True)
    return True
