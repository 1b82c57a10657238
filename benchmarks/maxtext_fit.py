"""MaxText's own compiled training step, per chip, beside tpusft's (benchmarks/tpu_fit.py).

    .venv/bin/python benchmarks/maxtext_fit.py --maxtext-python /path/to/maxtext-venv/bin/python
        [--models llama3.1-8b qwen3-8b gemma2-9b] [--topologies v5e-8 v6e-8 v5p-8]
        [--json benchmarks/results/maxtext_fit.json]

MaxText 0.2.5 (PyPI) needs jax 0.11.1, so it lives in a venv of its own; this script runs its
`maxtext.trainers.pre_train.train_compile` there, once per case, at the settings tpusft's
table uses: global batch 8 x 2048 (per_device_batch_size = 8 / devices), float32 weights and
bfloat16 compute, remat full, AdamW, FSDP over every chip, scanned layers, and attention as
MaxText picks it (splash on a TPU mesh). Models MaxText 0.2.5 ships no config for are its
Llama/Qwen configs with the dimensions overridden. The figure is the same as tpusft's: the
compiler's peak (`peak_memory_in_bytes` of `compiled.memory_analysis()`; the bound arguments +
outputs - aliased + temporaries is kept as bound_gib), or its out-of-memory figure. Every
figure is the TPU compiler's (libtpu), not a run. Rows are merged into --json case by case.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tpu_fit import memory_cell, write_rows  # noqa: E402 - the same cells and file as tpusft's

# Dimensions for the models MaxText 0.2.5 has no config of: (its config to start from, overrides)
OVERRIDES = {
    "llama3.2-1b": ("llama3.1-8b", ["base_emb_dim=2048", "base_num_decoder_layers=16",
                                    "base_num_query_heads=32", "base_num_kv_heads=8",
                                    "head_dim=64", "base_mlp_dim=8192",
                                    "logits_via_embedding=true"]),
    "qwen2.5-3b": ("qwen2.5-7b", ["base_emb_dim=2048", "base_num_decoder_layers=36",
                                  "base_num_query_heads=16", "base_num_kv_heads=2",
                                  "head_dim=128", "base_mlp_dim=11008",
                                  "logits_via_embedding=true"]),
}
DEVICES = {"v5e-8": 8, "v6e-8": 8, "v5p-8": 4}
GIB = 2**30
# MaxText's train_compile, run as `python -m` would run it, printing also the compiler's peak
# (its own print of memory_analysis() leaves peak_memory_in_bytes out).
WHAT = ("per-chip memory of MaxText 0.2.5's compiled train step (libtpu compile only, not a "
        "run); global batch 8 x length, fsdp over every chip, remat full")
PEAK = """
import runpy, jax.stages
measure = jax.stages.Compiled.memory_analysis
def memory_analysis(self):
    m = measure(self)
    print(f"peak_memory_in_bytes={m.peak_memory_in_bytes}", flush=True)
    return m
jax.stages.Compiled.memory_analysis = memory_analysis
runpy.run_module("maxtext.trainers.pre_train.train_compile", run_name="__main__", alter_sys=True)
"""


def case(python: str, model: str, topology: str, rows: int, length: int) -> dict:
    site = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname("
                           "maxtext.__file__))"], capture_output=True, text=True, check=True)
    base = Path(site.stdout.strip()) / "configs" / "base.yml"
    name, extra = OVERRIDES.get(model, (model, []))
    if extra:
        extra = ["override_model_config=true", *extra]
    with tempfile.TemporaryDirectory() as out:
        argv = [python, "-c", PEAK, str(base),
                "run_name=fit", f"base_output_directory={out}", "dataset_type=synthetic",
                "enable_checkpointing=false", "skip_jax_distributed_system=true",
                f"compile_topology={topology}", "compile_topology_num_slices=1",
                f"model_name={name}", f"per_device_batch_size={rows / DEVICES[topology]:g}",
                f"max_target_length={length}", "remat_policy=full", *extra]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu",
                                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
        seconds = round(time.perf_counter() - start, 1)
    text = done.stdout + done.stderr
    sizes = dict(re.findall(r"(\w+)_size_in_bytes=(\d+)", text))
    peak = re.search(r"peak_memory_in_bytes=(\d+)", text)
    if done.returncode == 0 and sizes and peak:
        bound = (int(sizes["argument"]) + int(sizes["output"]) - int(sizes["alias"])
                 + int(sizes["temp"]))
        return {"fits": True, "total_gib": round(int(peak.group(1)) / GIB, 2),
                "bound_gib": round(bound / GIB, 2), "seconds": seconds}
    m = re.search(r"required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", text)
    if m:
        return {"fits": False, "needs_gib": float(m.group(1)),
                "available_gib": float(m.group(2)), "seconds": seconds}
    lines = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return {"fits": None, "error": (lines[-1] if lines else text[-300:])[:300],
            "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maxtext-python", required=True,
                   help="the python of a venv with maxtext==0.2.5 and jax[tpu]==0.11.1")
    p.add_argument("--models", nargs="+", default=["llama3.2-1b", "qwen2.5-3b", "llama3.1-8b",
                                                   "qwen3-8b", "gemma2-9b"])
    p.add_argument("--topologies", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--json", default="")
    a = p.parse_args()
    print("| model | topology | MaxText, 8 x 2048, per chip |")
    print("|---|---|---|")
    for model in a.models:
        for topology in a.topologies:
            r = case(a.maxtext_python, model, topology, 8, a.length)
            r.update(model=model, topology=topology, length=a.length)
            shown = memory_cell(r) if r["fits"] is not None else f"error: {r['error']}"
            print(f"| {model} | {topology} | {shown} |", flush=True)
            if a.json:  # after every case: a long sweep keeps what it has
                write_rows(Path(a.json), [r], WHAT, ("model", "topology", "length"))


if __name__ == "__main__":
    sys.exit(main())
