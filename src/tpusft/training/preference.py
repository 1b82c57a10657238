"""The one place tpusft talks to Tunix's preference trainer.

Tunix's DPOTrainer (a PeftTrainer) runs the loop: jit, gradient accumulation, evaluation,
the preference metrics (rewards, margin, accuracy, log-probs) to TensorBoard, profiler and
Orbax checkpoints. tpusft plugs into its hooks:
  * the loss (training/preference_loss.py): DPO, ORPO and SimPO on tpusft's pair rows (the
    prompt once, then both responses), with the output layer run on response positions in
    chunks instead of Tunix's full-vocabulary logits of two sequences per pair;
  * `prepare_inputs`: the batch sharded over the mesh and, for DPO, the reference model's
    log-probs of both sides computed once per batch outside the gradient (as Tunix does);
  * the data hooks, data-iterator state in checkpoints and the progress line shared with SFT
    (training/trainer.py).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import optax
from flax import nnx
from tunix.sft import sharding_utils
from tunix.sft.dpo import dpo_trainer

from tpusft.internals import tunix_private
from tpusft.training import trainer as trainer_lib
from tpusft.training.feeder import BatchFeeder, DataStateCheckpoints
from tpusft.training.tunix_config import training_config as tunix_training_config
from tpusft.training.preference_loss import PreferenceLoss, make_loss_fn, pair_logps

# Tunix's metric name -> (metrics.jsonl key, progress-line format), logged every step/eval.
METRICS = (("rewards/accuracy", "reward_accuracy", "acc {:.1%}"),
           ("rewards/margin", "reward_margin", "margin {:.3f}"),
           ("rewards/chosen", "reward_chosen", "chosen {:.3f}"),
           ("rewards/rejected", "reward_rejected", "rejected {:.3f}"),
           ("log_probs/chosen", "logp_chosen", "logp {:.2f}"),
           ("log_probs/rejected", "logp_rejected", "/ {:.2f}"))
ORPO_METRICS = (("log_odds_ratio", "log_odds_ratio", "log odds {:.3f}"),
                ("nll_loss", "nll_loss", "nll {:.4f}"))


def _pairs(micro_batches: list[dict], total: float | None = None) -> list[dict]:
    return micro_batches  # the loss is a mean over pairs: nothing to add per micro-batch


def policy_args(args, method: PreferenceLoss, print_fn=print):
    """The policy's ModelArgs. With a reference model, the policy's forward pass inside the
    training step must compute what the reference's forward pass alone computes at the same
    weights (step-1 rewards exactly 0, as in TRL): with remat_policy=none, XLA keeps every
    layer intermediate for the backward pass and fuses the policy's forward differently,
    which moved log-probs by ~1e-7 (a step-1 reward accuracy of 25-38% instead of 0);
    'minimal' (keep the matmul outputs, recompute the elementwise work) gave equal log-probs
    on 1, 8 fsdp and 8 tensor-parallel CPU devices, full and LoRA."""
    import dataclasses

    if method.needs_reference and args.remat_policy == "none":
        print_fn("remat_policy=none -> minimal: the policy's log-probs must equal the "
                 "reference's at equal weights")
        return dataclasses.replace(args, remat_policy="minimal")
    return args


def batch_feeder(train_ds, cfg: Any, eval_ds=None, stats=None) -> BatchFeeder:
    return BatchFeeder(train_ds, cfg.gradient_accumulation_steps, eval_ds,
                                   cfg.eval_steps, stats, prepare=_pairs,
                                   replicated=cfg.data_sharding == "global")


def metrics(method: PreferenceLoss) -> tuple[tuple[str, str, str], ...]:
    return METRICS + (ORPO_METRICS if method.loss_type == "orpo" else ())


class PreferenceTrainer(trainer_lib.DonatedWeights, DataStateCheckpoints,
                        tunix_private.PreparesInputs, dpo_trainer.DPOTrainer):
    """Tunix's DPOTrainer on tpusft's pair batches and losses."""

    def __init__(self, model: nnx.Module, ref_model: nnx.Module | None,
                 optimizer: optax.GradientTransformation,
                 config: dpo_trainer.DPOTrainingConfig, method: PreferenceLoss, seed: int,
                 tiles: int):
        super().__init__(model, ref_model, optimizer, config)
        self.with_loss_fn(make_loss_fn(method, seed, tiles), has_aux=True)
        self.with_gen_model_input_fn(lambda batch: batch)
        tunix_private.set_aux_metrics(self, {name: np.mean for name, _, _ in metrics(method)})
        self.reference_logps = nnx.jit(functools.partial(_reference_logps, tiles=tiles))

    def prepare_inputs(self, batch: dict) -> dict:
        batch = sharding_utils.shard_input(batch, self.config.data_sharding_axis)
        if self.ref_model is None:
            return batch
        return dict(batch, ref_logps=self.reference_logps(self.ref_model, batch))


def _reference_logps(model, batch: dict, tiles: int):
    features = ("inputs", "positions", "segment_ids", "score_index", "targets", "weights",
                "sides")
    return pair_logps(model, *(batch[k] for k in features), tiles=tiles)


def training_config(cfg: Any, method: PreferenceLoss) -> dpo_trainer.DPOTrainingConfig:
    # Tunix's own fields, as the run's settings say; tpusft's loss reads them from `method`.
    return tunix_training_config(
        cfg, dpo_trainer.DPOTrainingConfig,
        algorithm="orpo" if method.loss_type == "orpo" else "dpo", beta=method.beta,
        lambda_orpo=method.orpo_lambda, label_smoothing=method.label_smoothing)


def preference_trainer(model: nnx.Module, ref_model: nnx.Module | None,
                       optimizer: optax.GradientTransformation, cfg: Any,
                       adjust=lambda tunix_config: tunix_config) -> PreferenceTrainer:
    """Tunix's DPOTrainer with tpusft's loss (its config through `adjust`): the step a run
    executes and a compile-only run (aot/) compiles."""
    method = PreferenceLoss.from_config(cfg)
    mesh = model.rules.mesh if model.rules is not None else None
    tiles = trainer_lib.vocab_tiles(cfg, mesh)
    return PreferenceTrainer(model, ref_model, optimizer, adjust(training_config(cfg, method)),
                             method, cfg.seed, tiles)


def build_trainer(model: nnx.Module, ref_model: nnx.Module | None,
                  optimizer: optax.GradientTransformation, cfg: Any,
                  feeder: BatchFeeder) -> PreferenceTrainer:
    """The trainer, restored from run_name's last checkpoint (model, optimizer, data) if any."""
    trainer = preference_trainer(model, ref_model, optimizer, cfg)
    mesh = model.rules.mesh if model.rules is not None else None
    feeder.dropout = bool(cfg.lora.enable_lora and cfg.lora.dropout)
    feeder.mesh = mesh
    trainer_lib.make_resilient(trainer, cfg, feeder)
    trainer.attach(feeder)
    return trainer


def describe(loss) -> str:
    """The loss and its constants: 'dpo: beta 0.1, label smoothing 0.1' ..."""
    constants = {"dpo": f"beta {loss.beta:g}",
                 "simpo": f"beta {loss.beta:g}, gamma {loss.simpo_gamma:g}",
                 "orpo": f"lambda {loss.orpo_lambda:g}"}[loss.loss_type]
    smoothing = f", label smoothing {loss.label_smoothing:g}" if loss.label_smoothing else ""
    return f"{loss.loss_type}: {constants}{smoothing}"


def say_reward_accuracy(eval_records: list[dict]) -> None:
    """Held-out reward accuracy and margin at the first and the last evaluation."""
    evals = [r for r in eval_records if "reward_accuracy" in r]
    if len(evals) > 1:
        print(f"held-out reward accuracy: {100 * evals[0]['reward_accuracy']:.1f}% at step "
              f"{evals[0]['step']} -> {100 * evals[-1]['reward_accuracy']:.1f}% at step "
              f"{evals[-1]['step']} (margin {evals[0]['reward_margin']:.3f} -> "
              f"{evals[-1]['reward_margin']:.3f})")
