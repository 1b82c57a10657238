"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with what the user gave us (config, paths, data); shown as one line."""


class ConfigError(UserError):
    """An invalid config file, key or value."""


class DataError(UserError):
    """A missing, empty or malformed data set, column or tokenizer."""


class CheckpointError(UserError):
    """A missing, damaged or incompatible checkpoint."""


class RunFailed(Exception):
    """The run cannot go on (storage refused a write, training diverged); shown as one line,
    exit code 1. What was saved before it stays intact."""


class Diverged(RunFailed):
    """A non-finite loss, gradient norm or parameter (nan_policy)."""


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None,
            usage: str | Callable[[], str] | None = None) -> None:
    """Runs `main(argv)`; a UserError prints `error: ...` and exits 2 unless --debug is given.
    With -h or --help the command's usage (`usage`: a usage.COMMANDS name or the text) is
    printed instead, exit 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if usage is not None and any(a in ("-h", "--help") for a in args):
        from tpusft import usage as usage_lib

        print(usage() if callable(usage) else usage_lib.text(usage), end="")
        sys.exit(0)
    # transformers' advice on import ("PyTorch was not found ...") is about its models, which
    # no tpusft command uses: its tokenizers and configs need no PyTorch.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from tpusft import notices

    notices.install()
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        if argv is None:  # background writes that failed with it must not print at exit
            _exit_now(1)
        sys.exit(1)
    except MemoryError as e:  # a buffer the config sizes (max_target_length, batch) too big
        if debug:
            raise
        detail = " ".join(str(e).split())[:200] or "a host allocation failed"
        print(f"error: out of host memory: {detail}; lower max_target_length or "
              f"global_batch_size", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if argv is None:
        _exit_now(code or 0)
    sys.exit(code or 0)


def _exit_now(code: int) -> None:
    """Ends a finished command without running interpreter teardown. Everything the run owns
    is closed by now (checkpoints committed, metrics and TensorBoard flushed); what is left are
    runtime threads (XLA's, TensorStore's, grain's) whose C++ destructors at interpreter exit
    can abort with "terminate called without an active exception" (exit 134) after a
    complete run."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
