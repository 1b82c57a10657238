"""Every method's progress reporter: the line a run prints every log_period steps, its
records in metrics.jsonl and its scalars in TensorBoard (Tunix TrainingHooks).

ProgressBase holds what every method shares: the loss history, the nan_policy guard fed with
each step's loss and gradient norm, the Tunix metrics read back, metrics.jsonl. Progress is
SFT's and preference training's (tokens/s, MFU, packing, ETA); rl/grpo.py's adds rollouts,
rewards and held-out accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from tunix.sft import hooks as tunix_hooks
from tunix.sft import metrics_logger as tunix_metrics

from tpusft.internals import tunix_private
from tpusft.training.checkpoints import report_pending_step
from tpusft.training.divergence import DivergenceGuard
from tpusft.training.feeder import BatchFeeder
from tpusft.training.metrics import JsonlWriter, format_duration
from tpusft.training.optimizer import current_learning_rate


class ProgressBase(tunix_hooks.TrainingHooks):
    """Tunix's training hooks with what every method's reporter shares. `role` is the
    prefix under which Tunix logs the trainer's metrics ("" for SFT and DPO, "actor" for
    GRPO's actor)."""

    role = ""

    def __init__(self, jsonl: JsonlWriter | None, print_fn=print):
        self.jsonl, self.print = jsonl, print_fn
        self.history: list[tuple[int, float]] = []
        self.divergence: DivergenceGuard | None = None  # the trainer's (nan_policy)

    def metric(self, train_ctx, name: str, mode: str = "train") -> float | None:
        """The latest value of a metric Tunix logged (None when it has none)."""
        logger = train_ctx.metrics_logger
        if not logger.metric_exists(self.role, name, mode):
            return None
        return float(logger.get_metric_history(self.role, name, mode)[-1])

    def observe(self, train_ctx, step: int, loss: float) -> None:
        """A step's loss: checked by the nan_policy guard and kept in the history."""
        if self.divergence is not None:
            self.divergence.observe(step, loss, self.metric(train_ctx, "grad_norm"))
        self.history.append((step, loss))

    def on_train_start(self, train_ctx):
        pass

    def on_train_end(self, train_ctx):
        if self.jsonl is not None:
            self.jsonl.flush()

    def on_train_step_start(self, train_ctx):
        pass

    def on_eval_step_start(self, train_ctx):
        pass

    def on_eval_step_end(self, train_ctx, eval_loss):
        pass


class Progress(ProgressBase):
    """SFT's and preference training's: a progress line every `log_period` steps; tokens/s,
    MFU and step time to TensorBoard and metrics.jsonl."""

    def __init__(self, feeder: BatchFeeder, total_steps: int, log_period: int,
                 flops_per_token: float, peak_flops_total: float, jsonl: JsonlWriter | None,
                 print_fn=print, extras: Sequence[tuple[str, str, str]] = ()):
        # extras: (Tunix metric name, metrics.jsonl key, progress-line format) of the loss's
        # aux metrics (preference training's rewards), read back after each step and eval.
        self.extras = tuple(extras)
        self.feeder, self.total_steps, self.log_period = feeder, total_steps, log_period
        self.flops_per_token, self.peak = flops_per_token, peak_flops_total
        super().__init__(jsonl, print_fn)
        self._first_step: int | None = None
        self._window_start = None
        self._window_tokens = 0
        self._window_steps = 0
        self._window_slots = 0
        self._steady_time = 0.0  # every step after the first: the run's average rates
        self._steady_steps = 0
        self._steady_tokens = 0
        self._steady_slots = 0
        self._last_time = None
        self._early = False  # a report Tunix was asked for ahead of its usual lag
        self._untimed = (0, 0, 0)  # steps, tokens, slots reported early, timed with the next
        self.eval_records: list[dict] = []

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
        self.observe(train_ctx, step, loss)
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
                self._steady_tokens += tokens + t
                self._steady_slots += slots + s
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
            window = (self._window_tokens, window_time, self._window_steps, self._window_slots)
            average = step == self.total_steps and not first_of_run
            if average:
                # Tunix reports the last step right after the one before it (each report
                # lags its step by one), so the time since that report is not a step's time:
                # the last line gives the run's average since its first step instead.
                window = (self._steady_tokens, self._steady_time, self._steady_steps,
                          self._steady_slots)
            window_tokens, window_time, window_steps, window_slots = window
            if window_steps and window_time:
                tps = window_tokens / window_time
                mfu = tps * self.flops_per_token / self.peak if self.peak else 0.0
                step_time = window_time / window_steps
                packing = window_tokens / max(window_slots, 1)
                bad = self.feeder.bad_rows
                record.update(tokens_per_s=tps, mfu=mfu, step_time_s=step_time,
                              packing_efficiency=packing, bad_rows=bad)
                for name, value in (("tokens_per_sec", tps), ("mfu", mfu),
                                    ("step_time_sec", step_time),
                                    ("packing_efficiency", packing), ("bad_rows", bad)):
                    train_ctx.metrics_logger.log(self.role, name, value,
                                                 tunix_metrics.Mode.TRAIN, step)
                eta = format_duration(step_time * (self.total_steps - step))
                self.print(head + self._extras_line(record) +
                           f"lr {record.get('learning_rate', 0):.2e} | "
                           f"{'run average ' if average else ''}{tps:,.0f} tokens/s | "
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

    def on_train_step_start(self, train_ctx):
        # The last step is evaluated too, so a run always ends with held-out figures.
        every = train_ctx.config.eval_every_n_steps
        if train_ctx.train_steps + 1 == self.total_steps and every and self.total_steps % every:
            tunix_private.evaluate_after(train_ctx, self.total_steps)

    def _extras(self, train_ctx, mode: str) -> dict[str, float]:
        values = {key: self.metric(train_ctx, name, mode) for name, key, _ in self.extras}
        return {key: value for key, value in values.items() if value is not None}

    def _extras_line(self, record: dict) -> str:
        return "".join(fmt.format(record[key]) + " | " for _, key, fmt in self.extras
                       if key in record)

    def on_eval_step_end(self, train_ctx, eval_loss):
        step = train_ctx.train_steps
        preemption = getattr(self.feeder, "preemption", None)
        if preemption is not None and preemption.requested:  # cut short: its figures are not
            self.print(f"{preemption.reason}: evaluation at step {step} abandoned", flush=True)
            return
        # This evaluation's loss (Tunix's get_metric would average every evaluation so far).
        loss = self.metric(train_ctx, "loss", "eval")
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
