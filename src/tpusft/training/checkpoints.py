"""Training checkpoints that are checked on the way out and on the way back in.

`GuardedCheckpoints` is Tunix's checkpoint manager (Orbax underneath) with three additions:
  * saving: the state is fingerprinted (conversion/integrity.py) and refused when any array
    holds NaN or inf, so a diverged run never rotates good checkpoints out for bad ones;
    the fingerprints, array shapes and the run's batch layout go into the checkpoint's
    metadata, in the same atomic commit as the arrays;
  * restoring: the newest step is restored and its arrays fingerprinted again; a step whose
    files are truncated, missing or altered, or that lacks what resuming needs (the data
    iterator's position), is named, moved aside to `<checkpoints>-damaged/<step>` and the
    step before it is tried; a config whose model or batch differs from the checkpoint's is
    refused with one line before anything is read;
  * preemption: once requested, the next step boundary is saved whatever the schedule says.

`adopt` puts it under a Tunix trainer. Tunix builds its own manager in the trainer's
constructor and restores there; tpusft's recipes pass it no checkpoint directory (so it
restores nothing) and `adopt` sets the restored step on the trainer afterwards (through
internals/tunix_private.py: Tunix has no public setter), and `report_pending_step` has it
report a held-back step before a save.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from tunix.sft import checkpoint_manager as tunix_checkpoints

from tpusft import distributed
from tpusft.conversion import integrity
from tpusft.errors import CheckpointError, Diverged, RunFailed
from tpusft.internals import tunix_private

SHAPES_KEY = "tpusft_shapes"
LAYOUT_KEY = "tpusft_layout"
PER_PROCESS_KEY = "tpusft_per_process"  # {this: [process 0's value, process 1's, ...]}


def per_process_values(value: Any) -> list[Any]:
    """The per-process values of a metadata entry saved by `per_process` (one value when a
    single process saved it)."""
    if isinstance(value, dict) and PER_PROCESS_KEY in value:
        return list(value[PER_PROCESS_KEY])
    return [value]


def _shapes(trees: dict[str, Any]) -> dict[str, list[int]]:
    return {f"{item}{name}": list(leaf.shape) for item, tree in trees.items() if tree is not None
            for name, leaf in integrity.array_leaves(tree)}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    text = text.split(" [tensorstore_spec=")[0]
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_background_failures(collect: bool = False):
    """A failed Orbax restore or save leaves the reads or writes of its other arrays failing
    in background threads and on closed event loops, each logging or printing a traceback:
    while a restore or save runs, and once collected at its end, those go unprinted (the
    failure itself is reported in one line). The collection runs when the block raised, or
    always with `collect` (a block that catches failures itself, as a restore that falls back
    to an older step does)."""
    hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None
    logs = [logging.getLogger(name) for name in ("asyncio", "absl")]
    disabled = [log.disabled for log in logs]
    for log in logs:  # absl's logger ignores `disabled`; a filter silences it
        log.disabled = True
        log.addFilter(_drop_record)
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed or collect:
            gc.collect()
        sys.unraisablehook, threading.excepthook = hooks
        for log, was in zip(logs, disabled, strict=True):
            log.disabled = was
            log.removeFilter(_drop_record)


def _drop_record(_record: logging.LogRecord) -> bool:
    return False


class _BackgroundWriteNoise(logging.Filter):
    """While a run's checkpoints are open, a background write that fails (a full disk) makes
    Orbax's writer threads log the error with its traceback once per array, and TensorStore's
    callbacks print "Event loop is closed" tracebacks as their event loop goes away. The
    failure itself surfaces at the next wait on that save and is reported there in one line
    naming its step (GuardedCheckpoints._storage_errors), so these are dropped meanwhile."""

    def __init__(self):
        super().__init__()
        self.hook = sys.unraisablehook
        self.logs = [logging.getLogger(name) for name in ("absl", "asyncio")]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        tb = record.exc_info[2]
        while tb is not None:
            if "/orbax/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
                return False
            tb = tb.tb_next
        return True

    def unraisable(self, unraisable) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            self.hook(unraisable)

    def __enter__(self) -> _BackgroundWriteNoise:
        for log in self.logs:
            log.addFilter(self)
        sys.unraisablehook = self.unraisable
        return self

    def __exit__(self, *_) -> None:
        for log in self.logs:
            log.removeFilter(self)
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = self.hook


class GuardedCheckpoints(tunix_checkpoints.CheckpointManager):
    """Tunix's CheckpointManager with fingerprints, finiteness checks and damaged-step fallback.

    `layout`: what must match between a checkpoint and the config resuming it (batch size,
    sequence length, ...). `required`: metadata keys a resumable checkpoint must hold.
    `before_save(step, optimizer)` may raise Diverged to stop a save (nan_policy). Once
    `preemption` is requested every step is saved (and waited for) until the run stops.
    `metadata_fn` gives the custom metadata of saves that come without it (Tunix's save at
    the end of a run). `per_process`: metadata keys whose value each process holds its own
    of (the data position); with several processes all of them are gathered into the one
    metadata that process 0 writes.

    With several processes every process calls `save` at every step (Tunix's loop runs in
    lockstep), each writes its shards of the one Orbax checkpoint, and they agree at each call
    whether a signal asks for a save; damaged steps are moved aside by process 0."""

    def __init__(self, root: str | None, options, *, layout: dict[str, Any] | None = None,
                 required: Sequence[str] = (), before_save: Callable | None = None,
                 preemption=None, metadata_fn: Callable | None = None, print_fn=print,
                 per_process: Sequence[str] = ()):
        if options is not None:
            options.cleanup_tmp_directories = True  # saves cut by a kill leave tmp folders
        with _quiet_background_failures():  # Orbax logs each step's unreadable metadata
            super().__init__(root, options)
        self.root, self.options = root, options
        self.layout, self.required = dict(layout or {}), tuple(required)
        self.before_save, self.print = before_save, print_fn
        self.preemption, self.metadata_fn = preemption, metadata_fn
        self.per_process = tuple(per_process)
        self.damaged: list[tuple[int, str]] = []
        self.writing: int | None = None  # the step whose save may still be in flight
        self._noise = _BackgroundWriteNoise().__enter__() if root else None

    @property
    def orbax(self):
        """The Orbax CheckpointManager under Tunix's (None without a directory)."""
        return tunix_private.orbax_manager(self)

    # ---------------------------------------------------------------- save
    def _trees(self, model, optimizer, lora_only: bool) -> dict[str, Any]:
        params = nnx.state(model, nnx.LoRAParam) if lora_only else nnx.state(model)
        opt = nnx.state(optimizer, nnx.optimizer.OptState) if optimizer is not None else None
        return {"model_params": params, "optimizer_state": opt}

    def save(self, step: int, model, optimizer=None, save_only_lora_params: bool = False,
             force: bool = False, custom_metadata: dict[str, Any] | None = None) -> bool:
        self._agree_on_signal()
        manager = self.orbax
        if manager is None:
            return False
        if not force and not self._urgent() and not manager.should_save(step):
            return False
        if step in manager.all_steps():  # a signal after this step's save: it is the one
            if self._urgent():
                self._saved_for_signal(step)
            return False
        if self._urgent() and step == 0:  # nothing trained yet: nothing to save
            self.preemption.finished(None)
            return False
        if self.before_save is not None:
            self.before_save(step, optimizer)
        trees = self._trees(model, optimizer, save_only_lora_params)
        fingerprints, bad = integrity.summarize(trees)
        if bad:
            more = f" and {len(bad) - 1} other arrays" if len(bad) > 1 else ""
            raise Diverged(f"step {step}: {bad[0]}{more} hold NaN or inf; the checkpoint was not "
                           f"written (last good checkpoint: {self.latest_description()})")
        if custom_metadata is None and self.metadata_fn is not None:
            custom_metadata = self.metadata_fn()
        metadata = dict(custom_metadata or {})
        if distributed.count() > 1:
            for name in self.per_process:
                if name in metadata:
                    metadata[name] = {PER_PROCESS_KEY: distributed.gather_json(metadata[name])}
        metadata.update({integrity.FINGERPRINTS_KEY: fingerprints, SHAPES_KEY: _shapes(trees),
                         LAYOUT_KEY: self.layout})
        with self._storage_errors(self.writing):  # a failed earlier save names its own step
            manager.wait_until_finished()
        with self._storage_errors(step):
            saved = super().save(step, model, optimizer, save_only_lora_params, force=True,
                                 custom_metadata=metadata)
        self.writing = step
        if self._urgent():  # asked before this save or while it was being prepared
            self._saved_for_signal(step)
        return saved

    def _agree_on_signal(self) -> None:
        """With several processes: a signal to any of them is a signal to all, decided at
        the same step on every process (each would otherwise save, or stop, on its own)."""
        if self.preemption is None or distributed.count() == 1:
            return
        asked = distributed.allgather(np.array([self.preemption.requested]))[:, 0]
        if asked.any() and not self.preemption.requested:
            self.preemption.request("a signal to another process of the run")

    def _urgent(self) -> bool:
        return self.preemption is not None and self.preemption.requested

    def _saved_for_signal(self, step: int) -> None:
        """Waits for the save of `step` to commit and says so: the step a signal ends on."""
        if self.preemption.saved_step == step:
            return
        with self._storage_errors(step):
            self.orbax.wait_until_finished()
        self.print(f"{self.preemption.reason}: checkpoint of step {step} saved in "
                   f"{self.root}; run the same command again to continue", flush=True)
        self.preemption.finished(step)

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None):
        """A write the storage refuses (a full disk, a quota, a lost bucket) ends the run with
        one line; Orbax commits a step only once all of it is written, so the checkpoints
        before it stay as they were."""
        try:
            with _quiet_background_failures():
                yield
        except (Diverged, CheckpointError):
            raise
        except Exception as e:  # noqa: BLE001 - OSError, TensorStore's and gcsfs' errors
            which = f"checkpoint step {step}" if step is not None else "a checkpoint"
            raise RunFailed(f"cannot write {which} in {self.root} ({_one_line(e)}); the last "
                            f"complete checkpoint ({self.latest_description()}) is intact: "
                            f"free space or fix the storage, then run the same command again"
                            ) from e

    def close(self) -> None:
        """Waits for background writes (an error in one surfaces here) and closes."""
        try:
            with self._storage_errors(self.writing):
                super().close()
        finally:
            if self._noise is not None:
                self._noise.__exit__()
                self._noise = None

    def latest_description(self) -> str:
        step = self.latest_step()
        return f"step {step} in {self.root}" if step is not None else "none"

    # ------------------------------------------------------------- restore
    def _check_compatible(self, step: int, meta: dict[str, Any], trees: dict[str, Any]) -> None:
        for name, want in self.layout.items():
            have = meta.get(LAYOUT_KEY, {}).get(name)
            if have is not None and have != want:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.root} was written with {name}={have}, but "
                    f"the config has {name}={want}; resume with {name}={have} or start a new "
                    f"run_name")
        stored = meta.get(SHAPES_KEY)
        if not stored:
            return
        now = {k: v for k, v in _shapes(trees).items() if k.startswith("model_params")}
        stored = {k: v for k, v in stored.items() if k.startswith("model_params")}
        for name in sorted(set(stored) | set(now)):
            if stored.get(name) != now.get(name):
                have = stored.get(name, "absent")
                want = now.get(name, "absent")
                raise CheckpointError(
                    f"checkpoint step {step} in {self.root} holds {name} of shape {have}, but "
                    f"the config's model has {want}: the model settings differ from the run's "
                    f"(same model keys and lora settings to resume, or a new run_name)")

    def _problem(self, step: int, meta: dict[str, Any], trees: dict[str, Any]) -> str | None:
        missing = [k for k in (integrity.FINGERPRINTS_KEY, *self.required) if k not in meta]
        if missing:
            what = ("the data iterator's position" if missing[0] != integrity.FINGERPRINTS_KEY
                    else "checksums")
            return f"its metadata has no {what} ({missing[0]})"
        restored, _ = integrity.summarize(trees)
        stored = meta[integrity.FINGERPRINTS_KEY]
        if trees.get("optimizer_state") is None:
            stored = {k: v for k, v in stored.items() if k.startswith("model_params")}
        return integrity.compare(stored, restored)

    def _metadata(self, step: int) -> dict[str, Any]:
        meta = self.orbax.metadata(step)
        return dict(getattr(meta, "custom_metadata", None) or {})

    def maybe_restore(self, model, optimizer=None, step: int | None = None,
                      restore_only_lora_params: bool = False) -> tuple[int, dict[str, Any]]:
        if self.orbax is None:
            return 0, {}
        steps = [step] if step is not None else sorted(self.orbax.all_steps(), reverse=True)
        with _quiet_background_failures(collect=True):
            return self._restore_newest_intact(model, optimizer, steps, restore_only_lora_params)

    def _restore_newest_intact(self, model, optimizer, steps, restore_only_lora_params):
        trees = self._trees(model, optimizer, restore_only_lora_params)
        for s in steps:
            try:
                with _quiet_background_failures():  # Orbax logs the parse error too
                    meta = self._metadata(s)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged step
                self._set_aside(s, f"its metadata cannot be read ({_one_line(e)})")
                continue
            self._check_compatible(s, meta, trees)
            try:
                restored, meta = super().maybe_restore(model, optimizer, s,
                                                       restore_only_lora_params)
                problem = self._problem(s, meta, self._trees(model, optimizer,
                                                             restore_only_lora_params))
            except Exception as e:  # noqa: BLE001 - a file Orbax cannot read: a damaged step
                problem = f"it cannot be read ({_one_line(e)})"
            if problem is None:
                if self.damaged:
                    self.print(f"resuming from step {s}, the newest intact checkpoint")
                return restored, meta
            self._set_aside(s, problem)
        if self.damaged:
            listed = ", ".join(str(s) for s, _ in self.damaged)
            raise CheckpointError(f"no intact checkpoint to resume from in {self.root}: steps "
                                  f"{listed} are damaged (see above) and were moved to "
                                  f"{self._aside_root()}; use a new run_name to start again")
        return 0, {}

    def _aside_root(self) -> epath.Path:
        root = epath.Path(self.root)
        return root.parent / f"{root.name}-damaged"

    def _set_aside(self, step: int, why: str) -> None:
        """Moves a damaged step out of Orbax's way (kept for inspection) and says so."""
        src = epath.Path(self.root) / str(step)
        dst = self._aside_root() / str(step)
        n = 1
        while dst.exists():
            dst = self._aside_root() / f"{step}.{n}"
            n += 1
        if distributed.is_primary():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                src.rename(dst)
            except OSError as e:
                raise CheckpointError(f"checkpoint step {step} in {self.root} is damaged ({why}) "
                                      f"and cannot be moved aside ({_one_line(e)}); remove it "
                                      f"to resume from the step before it") from None
        distributed.sync(f"tpusft-set-aside-{step}")
        self.damaged.append((step, why))
        self.print(f"checkpoint step {step} is damaged: {why}; moved to {dst}")
        self.orbax.reload()  # Orbax caches the list of steps


def adopt(trainer, root: str | None, options, **guard) -> GuardedCheckpoints:
    """Gives a Tunix trainer built without a checkpoint directory a GuardedCheckpoints at
    `root` and restores its newest intact step (model, optimizer, step counters, metadata)."""
    guard.setdefault("metadata_fn", trainer.custom_checkpoint_metadata)
    manager = GuardedCheckpoints(root, options, **guard)
    trainer.checkpoint_manager = manager
    step, metadata = manager.maybe_restore(
        trainer.model, trainer.optimizer,
        restore_only_lora_params=tunix_private.lora_enabled(trainer))
    tunix_private.set_position(trainer, step, metadata)  # Tunix restores only in its __init__
    return manager


def report_pending_step(trainer) -> None:
    """Has a Tunix trainer report the step it holds back. Tunix reports step N's metrics
    after step N+1 has started (to overlap the transfer), so a checkpoint of step N would
    otherwise commit before step N's record exists, and a kill between the two loses that
    record for good (the resumed run starts at N+1). Called before a save, this reports
    step N now; Tunix's next step then starts a new hold-back as on a run's first step."""
    tunix_private.report_held_back_step(trainer)


def finite_counters(optimizer) -> tuple[int, int]:
    """(updates skipped in a row, updates skipped in all) from the optimizer's
    optax.ApplyIfFiniteState (training/optimizer.py; 0, 0 when it has none)."""
    state = nnx.state(optimizer, nnx.optimizer.OptState)
    row = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        if "notfinite_count" in name:
            row = int(jax.device_get(leaf))
        elif "total_notfinite" in name:
            total = int(jax.device_get(leaf))
    return row, total
