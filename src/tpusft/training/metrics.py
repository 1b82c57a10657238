"""Throughput, MFU, the console progress line, metrics.jsonl and the run's plot (PNG)."""

from __future__ import annotations

import functools
import io
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from tpusft.errors import RunFailed

# Published dense bf16 peak TFLOP/s per chip (device_kind substring -> peak).
PUBLISHED_PEAK_TFLOPS = {
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v5": 459.0, "TPU v4": 275.0, "TPU v3": 123.0,
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
}


def training_flops_per_token(args: Any, seq_len: int) -> float:
    """6 x matmul parameters (forward + backward), plus causal attention scores."""
    matmul_params = args.num_params() - args.vocab_size * args.emb_dim * (
        0 if args.tie_embeddings else 1)
    attention = 6 * args.num_layers * args.num_heads * args.head_dim * seq_len
    return 6.0 * matmul_params + attention


@functools.cache
def measure_matmul_tflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Peak of this device measured by a large matmul in the compute dtype (once a process)."""
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def peak_tflops_per_device(configured: float | None, dtype: str) -> tuple[float, str]:
    if configured:
        return configured, "configured"
    kind = jax.devices()[0].device_kind
    for name, peak in PUBLISHED_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak, f"published peak of {kind}"
    return measure_matmul_tflops(dtype), f"measured {dtype} matmul on {kind}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JsonlWriter:
    """Appends one JSON object per line to run_directory/metrics.jsonl (local or gs://).
    `enabled=False` (the other processes of a multi-process run) writes nothing."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = epath.Path(path)
        self.enabled = enabled
        self._buffer: list[str] = []

    def write(self, record: dict) -> None:
        if self.enabled:
            self._buffer.append(json.dumps(record))

    def rewind(self, step: int) -> int:
        """Drops what a run logged after its checkpoint at `step` (it is trained again):
        train records after it and evaluations from it on (a resumed run evaluates at its
        first step). Returns the number of records dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            at = int(record.get("step", 0))
            if at > step or (record.get("kind") == "eval" and at >= step):
                continue
            keep.append(line)
        if len(keep) != len(lines):
            self.path.write_text("".join(line + "\n" for line in keep))
        return len(lines) - len(keep)

    def flush(self) -> None:
        if not self._buffer:
            return
        text = "\n".join(self._buffer) + "\n"
        try:
            if "://" in str(self.path):  # object stores have no append: rewrite the object
                old = self.path.read_text() if self.path.exists() else ""
                self.path.write_text(old + text)
            else:
                with open(self.path, "a") as f:
                    f.write(text)
        except OSError as e:
            raise RunFailed(_unwritable_run_directory(self.path, e)) from e
        self._buffer = []


def _unwritable_run_directory(path, error: OSError) -> str:
    """What a write into the run's directory that failed says: the directory moved, removed
    or replaced while the run went on (or storage refusing it)."""
    where = epath.Path(path).parent
    if not where.is_dir():
        why = (f"the run directory {where} was moved, removed or replaced while the run went "
               f"on; the checkpoints in it are intact: put it back")
    else:
        why = f"storage refused the write in {where}: free space or fix the storage"
    return (f"cannot write {path} ({error.strerror or error}): {why}, then run the same "
            f"command again")


def read_jsonl(path: str) -> list[dict]:
    p = epath.Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def last_per_step(records: list[dict], kind: str, key: str) -> dict[int, float]:
    """step -> value, keeping the last record of each step (a resumed run repeats steps)."""
    out: dict[int, float] = {}
    for r in records:
        if r.get("kind") == kind and key in r:
            out[int(r["step"])] = float(r[key])
    return dict(sorted(out.items()))


def plot_panels(records: list[dict], panels) -> list[tuple[str, str, list]]:
    """(title, y label, [(label, steps, values, is_eval)]) of each of a method's panels
    (methods.Method.panels) with data, from metrics.jsonl records (the last record of each
    step)."""
    out = []
    for title, ylabel, series in panels:
        lines = []
        for kind, key, label in series:
            points = last_per_step(records, kind, key)
            if points:
                lines.append((label, list(points), list(points.values()), kind == "eval"))
        if lines:
            out.append((title, ylabel, lines))
    return out


def write_run_plot(jsonl_path: str, png_path: str, title: str, panels) -> bool:
    """The run's plot (loss_curve.png): one panel per figure the method optimises or
    watches (its `panels`); False when there is nothing to plot yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(read_jsonl(jsonl_path), panels)
    if not panels:
        return False
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    size = (7, 4) if len(panels) == 1 else (10, 3.5 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=100, squeeze=False)
    for ax, (name, ylabel, lines) in zip(axes.flat, panels, strict=False):
        for label, steps, values, is_eval in lines:
            if is_eval:
                ax.plot(steps, values, "o-", label=label, ms=4)
            else:
                ax.plot(steps, values, label=label, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(name if len(panels) > 1 else title)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if len(panels) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    epath.Path(png_path).write_bytes(buf.getvalue())
    return True
