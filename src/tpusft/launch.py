"""Process start-up for the command-line entry points."""

from __future__ import annotations

import os
import sys

_TCMALLOC_PATHS = (
    "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def tcmalloc_library() -> str | None:
    """The path of an installed libtcmalloc_minimal, or None."""
    return next((p for p in _TCMALLOC_PATHS if os.path.exists(p)), None)


def tcmalloc_env(environ: dict | None = None) -> dict | None:
    """A copy of `environ` (os.environ by default) with tcmalloc preloaded ahead of whatever
    LD_PRELOAD holds, or None when tcmalloc is not installed."""
    env = dict(os.environ if environ is None else environ)
    lib = tcmalloc_library()
    if lib is None:
        return None
    if "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    return env


def skip_tpu_search_without_tpu(environ=None) -> None:
    """JAX_PLATFORMS=cpu where libtpu is installed (the test extra's, for compile-only TPU
    runs) on a machine with no TPU and no CUDA plugin: JAX would otherwise try the TPU first
    and print libtpu's start-up errors before falling back to the CPU. TPU VMs (with
    /dev/accel* or /dev/vfio devices) and an explicit JAX_PLATFORMS are left alone."""
    import glob
    import importlib.util

    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in env or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(p) is not None
           for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    env["JAX_PLATFORMS"] = "cpu"


def reexec_with_tcmalloc(module: str | None = None) -> None:
    """Restarts `python -m module` (or, without a module, the running script) with tcmalloc
    preloaded, when it is installed.

    XLA's CPU runtime allocates and frees large buffers every step; with glibc malloc that
    costs page faults and kernel time that tcmalloc avoids. TPUSFT_NO_TCMALLOC=1 opts out.
    Every entry point starts here, so the TPU search is settled here first.
    """
    skip_tpu_search_without_tpu()
    if os.environ.get("TPUSFT_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = tcmalloc_env()
    if env is None:
        return
    target = ["-m", module] if module else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *target, *sys.argv[1:]], env)


SUPERVISED = "TPUSFT_SUPERVISED"


def _die_with_parent() -> None:
    """In a child before exec: Linux sends it SIGKILL when its parent dies."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise_multiprocess(module: str, argv: list[str] | None = None) -> None:
    """In a multi-process run, runs `python -m module` as a child and waits for it.

    When another process of the run dies, JAX's runtime ends this one from a C++ thread
    (gloo's failed collective, or the coordination service's missed heartbeats), with an
    abort and a stack trace but no word from the run. The parent outlives that and says
    what happened in one line (exit 1); signals are passed on to the child, whose exit code
    is this process's. One-process runs, and a config that does not load (the child says
    why), run as they are. TPUSFT_SUPERVISED=0 opts out.
    """
    if os.environ.get(SUPERVISED):
        return
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from tpusft import distributed
        from tpusft.config import load_config

        cfg = load_config([a for a in args if a != "--debug"])
        if cfg.print_config or distributed.initialize_arguments(cfg) is None:
            return
        process = cfg.process_id if cfg.process_id is not None else os.environ.get(
            "JAX_PROCESS_ID", "?")
    except Exception:  # noqa: BLE001 - the child reports a bad config in one line
        return
    import signal
    import subprocess

    # Its own process group: a Ctrl-C or a group's SIGTERM reaches it once, through here
    # (twice would be the "exit at once" signal); it dies with this process.
    child = subprocess.Popen([sys.executable, "-m", module, *args],
                             env=dict(os.environ, **{SUPERVISED: "1"}), process_group=0,
                             preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    if code < 0 and -code not in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(-code).name
        sys.stderr.write(
            f"error: process {process} of the run ended by {name}: another process of the "
            f"run stopped or lost contact (its log says why). Completed checkpoints in "
            f"{cfg.checkpoint_directory} are intact: start every process again with the "
            f"same command to resume\n")
        sys.stderr.flush()
        os._exit(1)
    os._exit(code if code >= 0 else 128 - code)
