"""Conversion speed and memory on a ~1B-parameter random checkpoint, both directions.

    .venv/bin/python benchmarks/convert.py [--preset llama3.2-1b] [--dtype bfloat16] [--dir D]
        [--heads tied,untied]

For each output head (the preset's embedding tied to the output layer, and untied: a
separate lm_head as large as the embedding), writes a random HF checkpoint with the
preset's shapes (sharded safetensors, written tensor by tensor), then in the same run:
  1. reads those files plainly and sequentially (the baseline read speed),
  2. HF -> native with tools/convert_checkpoint/hf_to_native.py (a fresh process),
  3. native -> HF with tools/convert_checkpoint/native_to_hf.py (a fresh process),
and prints GB/s and peak RSS of each conversion next to the largest tensor, with the targets:
peak RSS < 2 x largest tensor + 1 GiB, and reading the source (time spent in reads, summed
over the reading threads) at no less than half the plain read speed. The whole conversion's
speed is printed next to the plain read and write speeds: every byte is also transposed or
copied and written once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def write_random_hf(out: Path, preset: str, dtype: str, tied: bool,
                    shard_bytes: int = 2 * GIB) -> int:
    """Random weights of `preset` as HF safetensors; returns the largest tensor's bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from tpusft.conversion.convert import model_args
    from tpusft.conversion.hf_config import hf_config_for
    from tpusft.conversion.hf_layout import native_leaves
    from tpusft.config.loader import load_preset

    keys = {**load_preset(preset), "logits_via_embedding": tied}
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    pieces = [(p.hf_name, p.hf_shape) for leaf in native_leaves(model_args(keys, True))
              for p in leaf.pieces]
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards, current, size, total, largest = [], {}, 0, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(shards)}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, shape in pieces:
        t = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)
        if size and size + t.nbytes > shard_bytes:
            flush()
        current[name] = t
        size += t.nbytes
        total += t.nbytes
        largest = max(largest, t.nbytes)
    flush()
    weight_map = {}
    for i, (name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / name, out / final)
        weight_map.update({n: final for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf_config_for(keys, dtype=dtype).save_pretrained(out)
    return largest


def plain_read(directory: Path) -> tuple[int, float]:
    """Bytes and seconds to read every safetensors file sequentially in 64 MiB pieces."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - t0


def plain_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` sequentially in 64 MiB pieces (then fsync'd nowhere: the
    same page-cache writes the converters do)."""
    buf = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(0, nbytes, len(buf)):
            fh.write(buf)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def run_tool(name: str, *args: str) -> tuple[float, float, float, float]:
    """(conversion seconds as the tool reports them, process seconds, peak RSS GiB, GB/s
    while reading the source) of one converter run in a fresh process."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint" / name),
                           *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss = float(re.search(r"peak RSS ([\d.]+) GiB", proc.stdout).group(1))
    seconds = float(re.search(r" in ([\d.]+) s \(", proc.stdout).group(1))
    reading = float(re.search(r"reading ([\d.]+) GB/s", proc.stdout).group(1))
    return seconds, dt, rss, reading


def bench(work: Path, preset: str, dtype: str, tied: bool) -> None:
    t0 = time.perf_counter()
    largest = write_random_hf(work / "hf", preset, dtype, tied)
    size = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    print(f"random {preset} checkpoint ({dtype}, {'tied' if tied else 'untied'} output "
          f"layer): {size / 1e9:.2f} GB, largest tensor {largest / GIB:.2f} GiB (written in "
          f"{time.perf_counter() - t0:.0f} s)")
    read_bytes, read_s = plain_read(work / "hf")
    plain = read_bytes / read_s / 1e9
    print(f"plain sequential read:   {plain:6.2f} GB/s")
    write = size / plain_write(work / "plain.bin", size) / 1e9
    print(f"plain sequential write:  {write:6.2f} GB/s (a conversion also writes every "
          f"byte, so this bounds it too)")

    runs = [("HF -> native", run_tool("hf_to_native.py", str(work / "hf"),
                                      str(work / "native"))),
            ("native -> HF", run_tool("native_to_hf.py", str(work / "native"),
                                      str(work / "back"), "--hf_assets", str(work / "hf")))]
    target_rss = 2 * largest / GIB + 1
    for what, (seconds, process_s, rss, reading) in runs:
        speed = size / seconds / 1e9
        print(f"{what}: reading the source at {reading:.2f} GB/s = {reading / plain:.2f} x "
              f"plain read (target >= 0.50: {'met' if reading / plain >= 0.5 else 'NOT met'})")
        print(f"  whole conversion {speed:.2f} GB/s ({seconds:.1f} s, {process_s:.1f} s with "
              f"start-up) = {speed / plain:.2f} x plain read, {speed / write:.2f} x plain "
              f"write")
        print(f"  peak RSS {rss:.2f} GiB = {rss / (largest / GIB):.2f} x largest tensor "
              f"(target < 2 x largest + 1 GiB = {target_rss:.2f} GiB: "
              f"{'met' if rss < target_rss else 'NOT met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--heads", default="tied,untied", help="tied, untied or both (tied,untied)")
    p.add_argument("--dir", default="", help="working directory (default: a temporary one)")
    a = p.parse_args()
    heads = a.heads.split(",")
    if not heads or any(h not in ("tied", "untied") for h in heads):
        sys.exit(f"--heads {a.heads!r}: give tied, untied or tied,untied")
    root = Path(a.dir or tempfile.mkdtemp(prefix="tpusft-convert-bench-"))
    try:
        for head in heads:
            work = root / head
            shutil.rmtree(work, ignore_errors=True)
            bench(work, a.preset, a.dtype, head == "tied")
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
