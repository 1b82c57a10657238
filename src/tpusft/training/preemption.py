"""Preemption: SIGTERM, SIGINT or a GCE maintenance event ends a run with a checkpoint.

Spot and preemptible VMs get SIGTERM and about 30 seconds. On the first signal the run finishes
the step it is in, saves a checkpoint of that step (model, optimizer, step, data position:
GuardedCheckpoints treats every save decision as yes from then on), logs one line and exits 0;
a second signal exits at once. If the checkpoint is not written within `preemption_deadline_s`
the process says so and exits 1, before the VM is taken away in the middle of a write.

`watch_maintenance_events=true` also polls the GCE metadata server's
`instance/maintenance-event` and `instance/preempted` (at $GCE_METADATA_HOST, else
metadata.google.internal) and treats a pending event like SIGTERM; where the server cannot be
reached it says so once and stops watching.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def _say(text: str) -> None:
    """A line to stderr that is safe inside a signal handler (no buffered I/O)."""
    os.write(2, (text + "\n").encode())


class Preemption:
    """Set by a signal or a maintenance event; the trainer checks `requested` at step ends."""

    installed = False  # whether this process has installed one (training has begun)

    def __init__(self, deadline_s: float = 25.0, print_fn: Callable = print):
        self.deadline_s = deadline_s
        self.print = print_fn
        self.reason: str | None = None
        self.saved_step: int | None = None
        self._done = threading.Event()
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def install(self, watch_maintenance: bool = False, poll_interval_s: float = 5.0) -> None:
        Preemption.installed = True
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if watch_maintenance:
            threading.Thread(target=self._watch, args=(poll_interval_s,), daemon=True,
                             name="tpusft-maintenance-watch").start()

    def uninstall(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, _frame) -> None:
        name = _SIGNALS.get(signum, str(signum))
        if self.requested:
            _say(f"second {name}: exiting now, without waiting for the checkpoint")
            os._exit(128 + signum)
        self.request(name)

    def request(self, reason: str) -> None:
        if self.requested:
            return
        self.reason = reason
        _say(f"{reason}: finishing this step, saving a checkpoint and exiting (deadline "
             f"{self.deadline_s:g} s; send it again to exit at once)")
        threading.Thread(target=self._watchdog, daemon=True, name="tpusft-deadline").start()

    def finished(self, step: int | None = None) -> None:
        """The checkpoint is written (or there was nothing to write)."""
        self.saved_step = step
        self._done.set()

    def _watchdog(self) -> None:
        if not self._done.wait(self.deadline_s):
            _say(f"error: no checkpoint was written within preemption_deadline_s="
                 f"{self.deadline_s:g}; exiting without one (the last complete checkpoint "
                 f"stays as it was)")
            os._exit(1)

    # ------------------------------------------------------- GCE metadata
    def _watch(self, interval: float) -> None:
        host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        base = f"http://{host}/computeMetadata/v1/instance/"
        while not self._done.is_set() and not self.requested:
            for path, quiet in (("maintenance-event", "NONE"), ("preempted", "FALSE")):
                request = urllib.request.Request(base + path,
                                                 headers={"Metadata-Flavor": "Google"})
                try:
                    with urllib.request.urlopen(request, timeout=2) as response:
                        value = response.read().decode().strip()
                except (urllib.error.URLError, OSError, ValueError) as e:
                    self.print(f"GCE metadata server at {host} not reachable ({e}); not "
                               f"watching for maintenance events", flush=True)
                    return
                if value and value.upper() != quiet:
                    self.request(f"GCE {path} {value}")
                    return
            self._done.wait(interval)
