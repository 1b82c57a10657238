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


def reexec_with_tcmalloc(module: str) -> None:
    """Restarts `python -m module` with tcmalloc preloaded, when it is installed.

    XLA's CPU runtime allocates and frees large buffers every step; with glibc malloc that
    costs page faults and kernel time that tcmalloc avoids. TPUSFT_NO_TCMALLOC=1 opts out.
    """
    if os.environ.get("TPUSFT_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = tcmalloc_library()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)
