"""Feeding a Tunix trainer (DataHooks): grain batches split into each optimizer step's
micro-batches with one loss denominator, global arrays with several processes, and the data
iterator's position carried in every checkpoint so a resumed run continues exactly where the
data stopped.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tunix.sft import hooks as tunix_hooks

from tpusft import distributed
from tpusft.internals import tunix_private
from tpusft.models.sharding import BATCH_AXES
from tpusft.training import loss as loss_lib
from tpusft.training.checkpoints import per_process_values

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
        # A signal abandons an evaluation in progress: the step's checkpoint comes first.
        stop = self.preemption is not None and self.preemption.requested
        if stop or (self._eval_steps is not None and self._eval_count >= self._eval_steps):
            batch = None
        else:
            batch = next(self._eval_iter, None)
        figures = self._agree(batch, stop=stop)  # the evaluation ends on every process
        if figures is None:
            self._eval_iter = None
            return None
        self._eval_count += 1
        return self._global(self._own_rows(self._prepare([batch], figures[3])[0]))


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
