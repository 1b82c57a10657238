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


def reexec_with_tcmalloc(module: str | None = None) -> None:
    """Restarts `python -m module` (or, without a module, the running script) with tcmalloc
    preloaded, when it is installed.

    XLA's CPU runtime allocates and frees large buffers every step; with glibc malloc that
    costs page faults and kernel time that tcmalloc avoids. TPUSFT_NO_TCMALLOC=1 opts out.
    """
    if os.environ.get("TPUSFT_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    env = tcmalloc_env()
    if env is None:
        return
    target = ["-m", module] if module else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *target, *sys.argv[1:]], env)
