"""The one place tpusft talks to Tunix's SFT trainer.

Tunix's PeftTrainer runs the loop (jit, gradient accumulation, eval, TensorBoard metrics,
profiler, Orbax checkpoints). tpusft adds, through Tunix's own hooks:
  * BatchFeeder (DataHooks): feeds grain batches, splits each optimizer step into micro-
    batches with one loss denominator, and exposes grain's iterator state;
  * the data-iterator state stored in every checkpoint's custom metadata and restored on
    resume, so a resumed run continues at the exact data position;
  * Progress (TrainingHooks): tokens/s, MFU, ETA, metrics.jsonl, the nan_policy check;
  * `make_resilient`: checked checkpoints (training/checkpoints.py), preemption and the
    divergence guard, shared by every recipe.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tunix.sft import hooks as tunix_hooks
from tunix.sft import metrics_logger as tunix_metrics
from tunix.sft import peft_trainer
from tunix.sft import profiler as tunix_profiler

from tpusft import distributed
from tpusft.errors import Diverged
from tpusft.internals import tunix_private
from tpusft.models.sharding import BATCH_AXES
from tpusft.training import loss as loss_lib
from tpusft.training import tensorboard
from tpusft.training.checkpoints import adopt, per_process_values, report_pending_step
from tpusft.training.divergence import DivergenceGuard
from tpusft.training.metrics import JsonlWriter, format_duration
from tpusft.training.optimizer import current_learning_rate
from tpusft.training.preemption import Preemption

DATA_STATE_KEY = "tpusft_data_state"
DATA_PROCESSES_KEY = "tpusft_data_processes"  # processes whose positions the state holds


class BatchFeeder(tunix_hooks.DataHooks):
    """Pulls one optimizer step's batch from grain and hands it out as micro-batches.

    With several processes (distributed.py) each micro-batch goes to Tunix as global arrays,
    assembled from every process's rows of it. `replicated=True`
    (data_sharding=global): every process's pipeline builds the whole batch and this process
    keeps its rows; otherwise each builds only its rows. Either way the processes agree each
    step on the loss's token count, the step's tokens, bad rows and whether any of them has
    run out of data or been asked to stop (one small allgather)."""

    def __init__(self, train_dataset, accumulation: int, eval_dataset=None,
                 eval_steps: int | None = None, stats=None,
                 prepare=loss_lib.add_loss_denominators, replicated: bool = False):
        self._train_iter = iter(train_dataset)
        self._prepare = prepare  # (one step's micro-batches, their weight total) -> the loss's
        self._accumulation = accumulation
        self._pending: list[dict] = []
        self._eval_dataset = eval_dataset
        self._eval_steps = eval_steps
        self._eval_iter = None
        self._eval_count = 0
        self.step_tokens: list[int] = []  # non-padding tokens of each optimizer step, in order
        self.step_slots: list[int] = []   # token slots (batch x length) of each step
        self.step_crc: list[int] = []     # CRC-32 of each step's input ids (exact-resume checks)
        self.stats = stats                # the pipeline's DataStats (bad rows, truncation)
        self.bad_rows = 0                 # bad rows so far, over all processes
        self.dropout = False              # tag training micro-batches with their step number
        self.preemption = None            # a Preemption: end the loop at the next step boundary
        self.mesh = None                  # the run's mesh (for global batches: several processes)
        self.processes, self.process = distributed.count(), distributed.index()
        self.replicated = replicated and self.processes > 1
        # how many processes' positions a data state holds (1: one position for any count)
        self.data_processes = 1 if replicated else self.processes

    # -- train
    def load_next_train_batch(self, train_ctx) -> dict | None:
        if not self._pending:
            stop = self.preemption is not None and self.preemption.requested
            group = None if stop else next(self._train_iter, None)
            figures = self._agree(group, stop)
            if figures is None:
                return None
            tokens, slots, crc, total = figures
            n = len(group["inputs"]) // self._accumulation
            micro = [{k: v[i * n:(i + 1) * n] for k, v in group.items()}
                     for i in range(self._accumulation)]
            self._pending = [self._global(self._own_rows(b))
                             for b in self._prepare(micro, total)]
            self.step_tokens.append(tokens)
            self.step_slots.append(slots)
            self.step_crc.append(crc)
        batch = self._pending.pop(0)
        if self.dropout:  # the micro-batch counter keys the dropout masks (same after resume)
            batch = dict(batch, dropout_step=np.int32(train_ctx.iter_steps))
        return batch

    def _agree(self, group: dict | None, stop: bool) -> tuple[int, int, int, float] | None:
        """(tokens, token slots, CRC-32 of the input ids, loss-weight total) of this batch
        (a training step's or an evaluation's) over all processes, or None when the loop ends
        here: the data ran out or a signal came, on this process or on any other (which then
        all stop together)."""
        if group is None:
            figures = (0, 0, 0, 0.0)
        else:
            figures = (int(np.count_nonzero(group["segment_ids"])),
                       int(group["segment_ids"].size),
                       zlib.crc32(np.ascontiguousarray(group["inputs"]).tobytes()),
                       float(np.sum(group["weights"])) if "weights" in group else 0.0)
        dropped = self.stats.dropped if self.stats is not None else 0
        if self.processes == 1:
            self.bad_rows = dropped
            return None if group is None else figures
        rows = distributed.allgather(
            np.array([stop, group is None, *figures, dropped], np.float64))
        if rows[:, 0].any() and self.preemption is not None and not stop:
            self.preemption.request("a signal to another process of the run")
        if rows[:, :2].any():
            return None
        if self.replicated:  # every process built the whole batch: its figures are global
            self.bad_rows = dropped
            return figures
        self.bad_rows = int(rows[:, 6].sum())
        crc = zlib.crc32(rows[:, 4].astype(np.uint32).tobytes())
        return int(rows[:, 2].sum()), int(rows[:, 3].sum()), crc, float(rows[:, 5].sum())

    def _own_rows(self, batch: dict) -> dict:
        """This process's rows of a micro-batch that every process built whole."""
        if not self.replicated:
            return batch
        rows = len(batch["inputs"]) // self.processes
        part = slice(self.process * rows, (self.process + 1) * rows)
        return {k: v[part] if np.ndim(v) and len(v) == rows * self.processes else v
                for k, v in batch.items()}

    def _global(self, batch: dict) -> dict:
        """With several processes: the micro-batch as global arrays, each process's rows its
        part of the batch axes (Tunix's own assembly checks divisibility against the local
        rows and would replicate them instead)."""
        if self.processes == 1:
            return batch
        rows = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        scalar = NamedSharding(self.mesh, PartitionSpec())
        return {k: jax.make_array_from_process_local_data(rows if np.ndim(v) else scalar, v)
                for k, v in batch.items()}

    def get_state(self) -> dict:
        return self._train_iter.get_state()

    def set_state(self, state: dict) -> None:
        self._train_iter.set_state(state)
        self._pending = []

    def restore_position(self, states: list[dict], written_by: int, step: int,
                         print_fn=print) -> None:
        """Continues at a checkpoint's data position: `states` of the `written_by` processes
        whose positions it holds (1 when one position serves any process count)."""
        if written_by == self.data_processes:
            self.set_state(states[self.process if written_by > 1 else 0])
            return
        how = ("one data position of every row" if written_by == 1
               else f"the data positions of {written_by} processes each reading its own rows")
        now = (f"{self.processes} processes each reading its own rows" if self.data_processes > 1
               else "processes that read every row" if self.processes > 1 else "one process")
        print_fn(f"checkpoint step {step} holds {how}, this run has {now}: model and optimizer "
                 f"are restored, the data starts again at the beginning of its first epoch",
                 flush=True)

    def data_stats(self):
        """The pipeline's DataStats over every process (a collective with several)."""
        if self.stats is None or self.processes == 1 or self.replicated:
            return self.stats
        return type(self.stats).combined(distributed.gather_json(self.stats.snapshot()))

    # -- eval: one pass per evaluation (or eval_steps batches)
    def load_next_eval_batch(self, train_ctx) -> dict | None:
        if self._eval_dataset is None:
            return None
        if self._eval_iter is None:
            self._eval_iter = iter(self._eval_dataset)
            self._eval_count = 0
        if self._eval_steps is not None and self._eval_count >= self._eval_steps:
            batch = None
        else:
            batch = next(self._eval_iter, None)
        figures = self._agree(batch, stop=False)  # the evaluation ends on every process
        if figures is None:
            self._eval_iter = None
            return None
        self._eval_count += 1
        return self._global(self._own_rows(self._prepare([batch], figures[3])[0]))


class Progress(tunix_hooks.TrainingHooks):
    """A progress line every `log_period` steps; tokens/s, MFU and step time to TensorBoard
    and metrics.jsonl."""

    def __init__(self, feeder: BatchFeeder, total_steps: int, log_period: int,
                 flops_per_token: float, peak_flops_total: float, jsonl: JsonlWriter | None,
                 print_fn=print, extras: Sequence[tuple[str, str, str]] = ()):
        # extras: (Tunix metric name, metrics.jsonl key, progress-line format) of the loss's
        # aux metrics (preference training's rewards), read back after each step and eval.
        self.extras = tuple(extras)
        self.feeder, self.total_steps, self.log_period = feeder, total_steps, log_period
        self.flops_per_token, self.peak = flops_per_token, peak_flops_total
        self.jsonl, self.print = jsonl, print_fn
        self._first_step: int | None = None
        self._window_start = None
        self._window_tokens = 0
        self._window_steps = 0
        self._window_slots = 0
        self._steady_time = 0.0
        self._steady_steps = 0
        self._last_time = None
        self._early = False  # a report Tunix was asked for ahead of its usual lag
        self._untimed = (0, 0, 0)  # steps, tokens, slots reported early, timed with the next
        self.history: list[tuple[int, float]] = []
        self.eval_records: list[dict] = []
        self.divergence: DivergenceGuard | None = None

    def on_train_start(self, train_ctx):
        self._first_step = train_ctx.train_steps
        self._last_time = time.perf_counter()

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        # Tunix reports step `train_step` one step late (it overlaps logging with the next
        # step), so timing is measured between consecutive reports. A step reported early
        # (before its checkpoint, `report_before_save`) is counted with the next report; the
        # last step has none after it and the first includes compilation.
        now = time.perf_counter()
        step = int(train_step)
        index = step - 1 - (self._first_step or 0)
        known = 0 <= index < len(self.feeder.step_tokens)
        tokens = self.feeder.step_tokens[index] if known else 0
        slots = self.feeder.step_slots[index] if known else 0
        loss = float(train_loss)
        if self.divergence is not None:
            self.divergence.observe(step, loss, _last(train_ctx, "grad_norm"))
        self.history.append((step, loss))
        first_of_run = step == (self._first_step or 0) + 1
        early = self._early and not first_of_run and step != self.total_steps
        dt = now - self._last_time
        if early:
            n, t, s = self._untimed
            self._untimed = (n + 1, t + tokens, s + slots)
        else:
            self._last_time = now
            if not first_of_run:
                n, t, s = self._untimed
                self._untimed = (0, 0, 0)
                self._steady_time += dt
                self._steady_steps += 1 + n
                self._window_steps += 1 + n
                self._window_tokens += tokens + t
                self._window_slots += slots + s
        record = {"kind": "train", "step": step, "loss": loss}
        if known:
            record["batch_crc32"] = self.feeder.step_crc[index]
        lr = current_learning_rate(train_ctx.optimizer)
        if lr is not None:
            record["learning_rate"] = lr
        record.update(self._extras(train_ctx, "train"))
        if self.divergence is not None and self.divergence.skipped:
            record["skipped_updates"] = self.divergence.skipped
        if step % self.log_period == 0 or step == self.total_steps or first_of_run:
            head = f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | "
            window_time = self._last_time - self._window_start if self._window_start else None
            if self._window_steps and window_time:
                tps = self._window_tokens / window_time
                mfu = tps * self.flops_per_token / self.peak if self.peak else 0.0
                step_time = window_time / self._window_steps
                packing = self._window_tokens / max(self._window_slots, 1)
                bad = self.feeder.bad_rows
                record.update(tokens_per_s=tps, mfu=mfu, step_time_s=step_time,
                              packing_efficiency=packing, bad_rows=bad)
                for name, value in (("tokens_per_sec", tps), ("mfu", mfu),
                                    ("step_time_sec", step_time),
                                    ("packing_efficiency", packing), ("bad_rows", bad)):
                    train_ctx.metrics_logger.log("", name, value, tunix_metrics.Mode.TRAIN, step)
                eta = format_duration(step_time * (self.total_steps - step))
                self.print(head + self._extras_line(record) +
                           f"lr {record.get('learning_rate', 0):.2e} | {tps:,.0f} tokens/s | "
                           f"MFU {100 * mfu:.1f}% | {1000 * step_time:.0f} ms/step | "
                           f"packed {100 * packing:.0f}% | ETA {eta}",
                           flush=True)
            elif first_of_run:
                self.print(head + f"first step (compilation) {dt:.1f} s", flush=True)
            else:
                self.print(head + self._extras_line(record) +
                           f"lr {record.get('learning_rate', 0):.2e} | timed with the next step",
                           flush=True)
            self._window_start, self._window_tokens, self._window_steps = self._last_time, 0, 0
            self._window_slots = 0
        if self.jsonl is not None:
            self.jsonl.write(record)
            if step % self.log_period == 0 or step == self.total_steps:
                self.jsonl.flush()

    def report_before_save(self, trainer) -> None:
        """Step N's record reaches metrics.jsonl before step N's checkpoint is written: a
        kill between the two would otherwise lose it (the resumed run starts at N+1)."""
        self._early = True
        try:
            report_pending_step(trainer)
        finally:
            self._early = False
        if self.jsonl is not None:
            self.jsonl.flush()

    def on_train_end(self, train_ctx):
        if self.jsonl is not None:
            self.jsonl.flush()

    def on_train_step_start(self, train_ctx):
        # The last step is evaluated too, so a run always ends with held-out figures.
        every = train_ctx.config.eval_every_n_steps
        if train_ctx.train_steps + 1 == self.total_steps and every and self.total_steps % every:
            tunix_private.evaluate_after(train_ctx, self.total_steps)

    def on_eval_step_start(self, train_ctx):
        pass

    def _extras(self, train_ctx, mode: str) -> dict[str, float]:
        logger, out = train_ctx.metrics_logger, {}
        for name, key, _ in self.extras:
            if logger.metric_exists("", name, mode):
                out[key] = float(logger.get_metric_history("", name, mode)[-1])
        return out

    def _extras_line(self, record: dict) -> str:
        return "".join(fmt.format(record[key]) + " | " for _, key, fmt in self.extras
                       if key in record)

    def on_eval_step_end(self, train_ctx, eval_loss):
        # This evaluation's loss (Tunix's get_metric would average every evaluation so far).
        loss = float(train_ctx.metrics_logger.get_metric_history("", "loss", "eval")[-1])
        step = train_ctx.train_steps
        record = {"kind": "eval", "step": step, "loss": loss,
                  **self._extras(train_ctx, "eval")}
        self.eval_records.append(record)
        if self.jsonl is not None:
            self.jsonl.write(record)
            self.jsonl.flush()
        if self.extras:
            self.print(f"eval at step {step}: loss {loss:.4f} | "
                       + self._extras_line(record).rstrip(" |"), flush=True)
        else:
            self.print(f"eval at step {step}: loss {loss:.4f} | perplexity {np.exp(loss):.3f}",
                       flush=True)


def _last(train_ctx, name: str, mode: str = "train") -> float | None:
    logger = train_ctx.metrics_logger
    if not logger.metric_exists("", name, mode):
        return None
    return float(logger.get_metric_history("", name, mode)[-1])


class DataStateCheckpoints:
    """A Tunix trainer mixin: its checkpoints also carry the data iterator's state."""

    feeder: BatchFeeder | None = None

    def custom_checkpoint_metadata(self) -> dict[str, Any]:
        if self.feeder is None:
            return {}
        # With several processes, GuardedCheckpoints gathers every process's state at a save.
        return {DATA_STATE_KEY: self.feeder.get_state(),
                DATA_PROCESSES_KEY: self.feeder.data_processes}

    @property
    def restored_metadata(self) -> dict[str, Any]:
        return tunix_private.restored_metadata(self)

    def attach(self, feeder: BatchFeeder) -> None:
        """Feeds the trainer from `feeder`, resumed at the checkpoint's data position."""
        self.with_data_hooks(feeder)
        self.feeder = feeder
        metadata = self.restored_metadata
        if metadata.get(DATA_STATE_KEY) is not None:
            feeder.restore_position(per_process_values(metadata[DATA_STATE_KEY]),
                                    metadata.get(DATA_PROCESSES_KEY, 1), self.train_steps)


def donated_arguments(model: nnx.Module) -> tuple[str, ...]:
    """What the train step donates. Tunix donates the optimizer state; a full fine-tune's
    step also donates the model, whose every weight it replaces, so a chip does not hold the
    old weights beside the new ones (for Llama 3.1 8B on a v5p-8, 7.5 GiB a chip). A LoRA
    model's frozen base is shared with its reference and the rollout (setup.reference_model),
    so it is not donated."""
    from tpusft.models import lora

    return ("optimizer",) if lora.adapters(model) else ("model", "optimizer")


class DonatedWeights:
    """Tunix's PeftTrainer.jit_train_and_eval_step with `donated_arguments`: the jitted steps
    are built here, bound to the model and optimizer as Tunix binds them, before Tunix's
    method returns the ones it finds built (its private `_jitted_*` and `_shard_optimizer`;
    tests/test_aot.py lowers both ways)."""

    def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False):
        if not skip_jit and not cache_nnx_graph and self._jitted_train_step_fn is None:
            import functools

            from jax.interpreters import pxla

            self._shard_optimizer(pxla.thread_resources.env.physical_mesh)
            self._jitted_train_step_fn = functools.partial(
                nnx.jit(self.create_train_step_fn(),
                        donate_argnames=donated_arguments(self.model)),
                self.model, self.optimizer)
            self._jitted_eval_step_fn = functools.partial(
                nnx.jit(self.create_eval_step_fn()), self.model)
        return super().jit_train_and_eval_step(skip_jit, cache_nnx_graph)


class SftTrainer(DonatedWeights, DataStateCheckpoints, peft_trainer.PeftTrainer):
    """PeftTrainer whose checkpoints also carry the data iterator's state."""


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
                 else f"last checkpoint: {trainer.checkpoint_manager.latest_description()}")
        print(f"{preemption.reason}: stopped at step {trainer.train_steps} ({saved})",
              flush=True)
    return True
