"""What a run does with a non-finite loss or gradient (`nan_policy`).

Every optimizer is wrapped in optimizer.skip_if_not_finite (optax.apply_if_finite's contract
and state), so an update whose gradients hold NaN or inf is never applied: the parameters
stay as they were and optax counts the step. Then:
  * nan_policy=stop (default): the run stops with one line naming the step and the value,
    and no checkpoint is written after it (GuardedCheckpoints asks `before_save`, which reads
    optax's counters on the device, so a save never holds a skipped step either);
  * nan_policy=skip_step: the step is skipped, counted (`skipped_updates` in metrics.jsonl)
    and logged; `max_skipped_steps` skips in a row stop the run.
The losses the hooks see come one step late (Tunix overlaps logging with the next step); the
device counters read at save time are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tpusft.errors import Diverged
from tpusft.training.checkpoints import finite_counters


class DivergenceGuard:
    def __init__(self, policy: str, max_skipped: int, last_good: Callable[[], str],
                 print_fn: Callable = print):
        self.policy, self.max_skipped = policy, max_skipped
        self.last_good, self.print = last_good, print_fn
        self.in_a_row = 0
        self.skipped = 0
        self._baseline = 0

    def start(self, optimizer) -> None:
        """Counts from here (a resumed run's optimizer state carries earlier skips)."""
        self._baseline = finite_counters(optimizer)[1]

    def _stop(self, what: str) -> Diverged:
        hint = ("lower learning_rate or set nan_policy=skip_step to skip such steps"
                if self.policy == "stop" else "lower learning_rate or raise max_skipped_steps")
        return Diverged(f"training diverged: {what}; the update was not applied and no "
                        f"checkpoint holds it (last good checkpoint: {self.last_good()}); {hint}")

    def observe(self, step: int, loss: float, grad_norm: float | None) -> None:
        """A finished step's host-side values; raises Diverged when the policy says stop."""
        bad = [f"loss {loss}"] if not math.isfinite(loss) else []
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"gradient norm {grad_norm}")
        if not bad:
            self.in_a_row = 0
            return
        values = f"non-finite {' and '.join(bad)}"
        what = f"{values} at step {step}"
        if self.policy == "stop":
            raise self._stop(what)
        self.in_a_row += 1
        self.skipped += 1
        self.print(f"step {step}: {values}; update skipped ({self.in_a_row} in a row, "
                   f"{self.skipped} in all)", flush=True)
        if self.in_a_row >= self.max_skipped:
            raise self._stop(f"{what}, the {self.in_a_row}th skipped step in a row "
                             f"(max_skipped_steps={self.max_skipped})")

    def before_save(self, step: int, optimizer) -> None:
        """Refuses a save that would hold a skipped update (stop) or too many (skip_step)."""
        if optimizer is None:
            return
        in_a_row, total = finite_counters(optimizer)
        if self.policy == "stop" and total > self._baseline:
            raise self._stop(f"non-finite gradients by step {step}")
        if self.policy == "skip_step" and in_a_row >= self.max_skipped:
            raise self._stop(f"{in_a_row} steps in a row with non-finite gradients by step "
                             f"{step} (max_skipped_steps={self.max_skipped})")
