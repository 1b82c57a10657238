"""What every recipe does around its own training, once: the command's entry (config,
--print_config, compile-only runs, processes), the run context (output directory, resolved
config, tokenizer, mesh, checks), the demo's before/after score and the run's end."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tpusft.methods import Method


def entry(argv: Sequence[str], method_record: Callable[[], Method],
          train: Callable[[Run], int]) -> int:
    """A recipe's main: its config, printed (print_config) or compiled for a TPU topology
    (compile_topology: will it fit?, no run), or `train(run)` in every process of the run,
    with the run context `start` builds. The method's record (and the libraries it imports)
    is built after the config is read, so a config error or print_config costs no JAX or
    Tunix import."""
    from tpusft.config import load_config, resolved_yaml

    cfg = load_config(argv)
    if cfg.print_config:
        sys.stdout.write(resolved_yaml(cfg))
        return 0
    method = method_record()
    if cfg.compile_topology:
        from tpusft.aot import fit

        return fit.run(argv, cfg, method)
    from tpusft import distributed

    distributed.initialize(cfg)  # several processes, when the config or environment says so
    run = None
    with _stop_before_training():
        try:
            run = start(cfg, method)
            return train(run)
        except _Stopped as signal_name:
            from tpusft.training.setup import resuming

            again = " and resumes" if resuming(cfg) else ""
            print(f"{signal_name}: stopped before training began; nothing to save (the same "
                  f"command starts again{again})", flush=True)
            return 0
        finally:
            if run is not None:
                run.release()


class _Stopped(Exception):
    """SIGTERM or SIGINT before the trainer's preemption handling was installed."""


class _stop_before_training:  # noqa: N801 - used as a context manager
    """Until the trainer installs its preemption handling (training/preemption.py), SIGTERM
    and SIGINT stop the run where it is (loading data, building or restoring the model, the
    demo's first score): nothing is trained yet, so nothing is saved, and the run exits 0.
    The handlers the command had are restored at the end."""

    def __enter__(self):
        import signal

        self._previous = {}
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            def handler(signum, _frame, name=name):
                from tpusft.training import preemption

                if preemption.Preemption.installed:  # training began and has ended
                    os._exit(128 + signum)
                raise _Stopped(name)

            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave the signals alone
                pass
        return self

    def __exit__(self, *exc):
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False



@dataclasses.dataclass(frozen=True)
class Run:
    """A run's context, built once by `start`."""

    cfg: Any
    method: Method
    out: Any        # the run directory (epath.Path)
    tokenizer: Any
    mesh: Any
    lock: Any = None  # the run directory's RunLock (held by the run's first process)

    def release(self) -> None:
        """Releases the run directory's lock (the run has ended, however it ended)."""
        if self.lock is not None:
            self.lock.release()

    def metrics_writer(self):
        from tpusft.training.setup import metrics_writer

        return metrics_writer(self.out)

    def title(self) -> str:
        """The run's first line: 'tpusft <method> | run <directory>'."""
        return f"tpusft {self.method.title(self.cfg)} | run {self.cfg.run_directory}"

    def say_resumed(self, start: int) -> None:
        """Where a resumed run starts (nothing for a new one)."""
        if start:
            print(f"resuming from step {start} (checkpoint in {self.cfg.checkpoint_directory})")

    def finish(self, stats, title: str, checkpoints: str = "") -> None:
        """The data summary, the run's plot and where its outputs are."""
        from tpusft.training import report

        report.finish(self.cfg, stats, title, self.method, checkpoints)


def start(cfg: Any, method: Method) -> Run:
    """The run directory (prepare_run_directory), the resolved config written into it, the
    tokenizer and the mesh, with the checks that fail before anything is compiled
    (vocabulary, batch over the mesh)."""
    from tpusft import distributed
    from tpusft.data.chat import load_tokenizer
    from tpusft.models.sharding import mesh_of
    from tpusft.training.run_lock import RunLock
    from tpusft.training.setup import (
        check_batch,
        check_vocab,
        prepare_run_directory,
        write_resolved_config,
    )

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    out = prepare_run_directory(cfg)
    lock = RunLock(cfg.run_directory).acquire() if distributed.is_primary() else None
    try:
        write_resolved_config(cfg, out)
        tokenizer = load_tokenizer(cfg.tokenizer_path)
        check_vocab(cfg, tokenizer)
        mesh = mesh_of(cfg)
        check_batch(cfg, mesh)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Run(cfg, method, out, tokenizer, mesh, lock)


class Demo:
    """The embedded demo's score (exact match on held-out problems) before and after
    training; nothing unless the config names a demo task."""

    def __init__(self, run: Run, model, start: int):
        from tpusft.demo import evaluate

        self.run, self.model, self.before = run, model, None
        if run.cfg.demo_task and start == 0:
            self.before = evaluate.report(model, run.tokenizer, run.cfg, "before training")

    def after(self) -> None:
        from tpusft.demo import evaluate

        if not self.run.cfg.demo_task:
            return
        after = evaluate.report(self.model, self.run.tokenizer, self.run.cfg, "after training",
                                show=8)
        if self.before is not None:
            print(f"exact match: {100 * self.before:.1f}% before training -> "
                  f"{100 * after:.1f}% after")
