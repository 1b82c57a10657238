"""Library notices that say nothing about a tpusft run, kept out of every command's output.

Each is a one-time warning a library logs because of how tpusft uses it, not because
anything is wrong:
"""

from __future__ import annotations

import logging

KNOWN = {
    "Metadata file does not exist":
        "Orbax, restoring the model_params item of Tunix's training checkpoints, which are "
        "written without an item metadata file; every parameter is restored",
    "No eval examples found":
        "Tunix, for an evaluation a signal abandoned before its first batch (tpusft says "
        "so itself)",
    "Skipping non-TPU device":
        "Tunix's device-memory report on CPU devices, which have no memory statistics",
}


class _KnownNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(tuple(KNOWN))


_FILTER = _KnownNotices()


def install() -> None:
    """Filters KNOWN from absl's logger (where Orbax and Tunix log); idempotent."""
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
