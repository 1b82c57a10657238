"""One run over several processes: `jax.distributed` start-up and what the processes agree on.

A TPU pod slice (or several GPU hosts) runs the same command on every host; each is one JAX
process that owns its local devices, and `jax.distributed` joins them into one global device
list, so the mesh, the sharded parameters and every collective span all hosts. The run starts
multi-process when any of these says so (checked in this order):

  * the config keys `coordinator_address=`, `num_processes=`, `process_id=`;
  * the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  * `distributed=true`, or a TPU pod's environment (TPU_WORKER_HOSTNAMES naming more than one
    host, or MEGASCALE_NUM_SLICES above 1, as GKE and xpk set them): JAX finds the
    coordinator itself;

and runs as one process otherwise. What the processes must agree on each step (the loss's
token count, whether to stop for a signal, whether every process still has data) goes
through `allgather`, a collective over the devices of all processes; the figures that are
per-process (tokens, bad rows) are summed with it. Process 0 alone writes what has one writer:
the resolved config, metrics.jsonl, TensorBoard, the loss plot and the progress lines; every
process writes its own shards of each checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def _pod_environment(env) -> bool:
    """A TPU slice of several hosts, or several slices (as GKE and xpk describe them)."""
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1 or _int_env(env, "MEGASCALE_NUM_SLICES") not in (None, 0, 1)


def initialize_arguments(cfg: Any, environ: dict | None = None) -> dict | None:
    """jax.distributed.initialize's arguments for this run, or None for one process."""
    from tpusft.errors import ConfigError

    env = os.environ if environ is None else environ
    timeouts = {"initialization_timeout": int(cfg.distributed_timeout_s),
                "heartbeat_timeout_seconds": int(cfg.distributed_timeout_s)}
    explicit = {"coordinator_address": cfg.coordinator_address or None,
                "num_processes": cfg.num_processes, "process_id": cfg.process_id}
    if not any(v is not None for v in explicit.values()):
        explicit = {"coordinator_address": env.get("JAX_COORDINATOR_ADDRESS") or None,
                    "num_processes": _int_env(env, "JAX_NUM_PROCESSES"),
                    "process_id": _int_env(env, "JAX_PROCESS_ID")}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ConfigError(
                f"a multi-process run needs coordinator_address, num_processes and process_id "
                f"(keys or JAX_* variables); {', '.join(missing)} not given")
        if not 0 <= explicit["process_id"] < explicit["num_processes"]:
            raise ConfigError(f"process_id={explicit['process_id']} is outside 0.."
                              f"{explicit['num_processes'] - 1} (num_processes="
                              f"{explicit['num_processes']})")
        if explicit["num_processes"] == 1:
            return None
        return {**explicit, **timeouts}
    if cfg.distributed or _pod_environment(env):
        return dict(timeouts)  # JAX detects the cluster (TPU metadata, SLURM, ...)
    return None


def _int_env(env, name: str) -> int | None:
    from tpusft.errors import ConfigError

    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def initialize(cfg: Any) -> None:
    """Joins the run's processes (when the config or environment says there are several),
    before anything touches a device; on other processes than 0 the progress lines go
    quiet (errors still reach stderr, prefixed with the process)."""
    import jax

    arguments = initialize_arguments(cfg)
    if arguments is None or jax.distributed.is_initialized():
        return
    # CPU devices of several processes talk over gloo (TPU and GPU have their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**arguments)
    except Exception as e:  # noqa: BLE001 - the coordination service's errors are RuntimeErrors
        from tpusft.errors import RunFailed

        where = arguments.get("coordinator_address") or "the detected coordinator"
        raise RunFailed(f"cannot join the run's processes through {where} "
                        f"({' '.join(str(e).split())[:200]}); start every process with the same "
                        f"coordinator_address and num_processes") from None
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
        sys.stderr = _Prefixed(sys.stderr, f"[process {jax.process_index()}] ")


class _Prefixed:
    """A text stream whose lines start with a prefix (which process wrote them)."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for part in text.splitlines(keepends=True):
            out.append((self._prefix if self._start else "") + part)
            self._start = part.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def count() -> int:
    import jax

    return jax.process_count()


def index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    return index() == 0


def allgather(values) -> np.ndarray:
    """Every process's `values` (a small array of the same shape on each), stacked on a new
    first axis in process order; on one process, just `values[None]`."""
    values = np.asarray(values)
    if count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=False))


def gather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = allgather(np.array([data.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes, strict=True)]


def sync(name: str) -> None:
    """Waits until every process has reached the same point (a no-op on one process)."""
    if count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
