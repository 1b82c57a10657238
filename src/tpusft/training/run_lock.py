"""One run at a time in a run directory: the run's first process holds
`run_directory/.tpusft-lock` (its host, pid, boot and a heartbeat) from its start to its end.

A second run with the same run_name is refused in one line naming the holder. A lock whose
holder is gone is taken over with a note: on this host, a pid that is not running (or is now
another process, or the machine rebooted); on another host (a shared file system or gs://),
a heartbeat older than STALE_S. Works the same on local paths and gs://.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from tpusft.errors import ConfigError

NAME = ".tpusft-lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0  # a holder on another host that has not written for this long is gone


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start time of a process (tells a reused pid from the holder)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(holder: dict[str, Any]) -> str:
    """Why the holder is gone ('' when it may still be running)."""
    if holder.get("host") == socket.gethostname():
        if holder.get("boot") and holder["boot"] != _boot_id():
            return "the machine has restarted since"
        pid = int(holder.get("pid", 0))
        if not _running(pid):
            return "that process is not running"
        start = holder.get("process_start")
        if start and start != _process_start(pid):
            return "that pid is now another process"
        return ""
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else ""


class RunLock:
    """The lock of one run directory (acquire, then release when the run ends)."""

    def __init__(self, run_directory: str):
        self.path = epath.Path(run_directory) / NAME
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(),
                       "process_start": _process_start(os.getpid()), "token": uuid.uuid4().hex,
                       "started": time.time(), "heartbeat": time.time()}
        self._local = "://" not in run_directory
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        for _ in range(10):  # a lock being written this moment reads back complete soon
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (ValueError, OSError):
                time.sleep(0.05)
        return {}  # unreadable: treated as a holder that is gone

    def _write_record(self) -> None:
        self.record["heartbeat"] = time.time()
        self.path.write_text(json.dumps(self.record))

    def acquire(self, print_fn=print) -> RunLock:
        holder = self._read()
        if holder is not None:
            why = _gone(holder) if holder else "its lock file cannot be read"
            if not why:
                self._refuse(holder)
            print_fn(f"note: taking over {self.path} from a run that is gone (host "
                     f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}: {why})")
            self.path.unlink(missing_ok=True)
        if self._local:  # created atomically: of two runs starting together one gets it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse(self._read() or {})
            self.record["heartbeat"] = time.time()
            os.write(fd, json.dumps(self.record).encode())
            os.close(fd)
        else:
            self._write_record()
        if not self._local:  # gs://: the later of two writes wins, the other run stops
            time.sleep(0.5)
            now = self._read()
            if now and now.get("token") != self.record["token"]:
                self._refuse(now)
        self._beater = threading.Thread(target=self._beat, name="tpusft-run-lock", daemon=True)
        self._beater.start()
        return self

    def _refuse(self, holder: dict[str, Any]) -> None:
        started = time.strftime("%Y-%m-%d %H:%M:%S",
                                time.localtime(float(holder.get("started", 0))))
        raise ConfigError(
            f"run directory {self.path.parent} is in use by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, started {started}); wait for it "
            f"to end or pick another run_name (if that run is gone, delete {self.path})")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_record()
            except Exception:  # noqa: BLE001 - a heartbeat that cannot be written is retried
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=5)
        try:
            holder = self._read()
            if holder and holder.get("token") == self.record["token"]:
                self.path.unlink()
        except Exception:  # noqa: BLE001 - a lock left behind is taken over by the next run
            pass
