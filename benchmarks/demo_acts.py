"""The demo's acts over seeds and starting checkpoints: how much each act's gain varies.

    .venv/bin/python benchmarks/demo_acts.py --act grpo \
        --start py311=runs/demo-sft/checkpoints/200 --start py312=/other/clone/runs/...200 \
        [--seeds 0 1 2 3] [--json benchmarks/results/demo_acts-grpo.json] [key=value ...]

Each (start, seed) pair runs the act's config (`configs/demo/<act>.yml`) in a fresh process
with `load_parameters_path=<start> seed=<seed>` (and the other `--vary` keys) and its own
run_name, then reads the
run's before/after line and every held-out evaluation from metrics.jsonl. It prints one
row per run (before, after, gain, best along the way and its step) and the range of the
gains; the starting checkpoints are the supervised demo's step 200 as made by different
builds (e.g. fresh clones with Python 3.11 and 3.12), which differ in their last digits.
Other starting points: `train_sft configs/demo/sft.yml seed=1 run_name=sft-seed1`, stopped
with Ctrl-C (or SIGTERM) once step 200 is saved, or at any step (it saves the step it is at).
Trailing key=value overrides go to every run (to try other settings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACTS = {  # module, config, the line with the before/after figures
    "grpo": ("tpusft.train_grpo", "configs/demo/grpo.yml",
             r"held-out accuracy: ([\d.]+)% before -> ([\d.]+)% after"),
    "lora": ("tpusft.train_sft", "configs/demo/sft_lora.yml",
             r"exact match: ([\d.]+)% before training -> ([\d.]+)% after"),
    "dpo": ("tpusft.train_dpo", "configs/demo/dpo.yml",
            r"exact match: ([\d.]+)% before training -> ([\d.]+)% after"),
}


def run_one(act: str, start: str, seed: int, out: Path, extra: list[str],
            vary: list[str]) -> dict:
    module, config, pattern = ACTS[act]
    run_name = f"{act}-{Path(start).parent.parent.name}-s{seed}-{time.time_ns() % 10**9}"
    argv = [sys.executable, "-m", module, config, f"load_parameters_path={start}",
            *(f"{key}={seed}" for key in vary), f"base_output_directory={out}",
            f"run_name={run_name}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    found = re.search(pattern, proc.stdout)
    if not found:
        raise SystemExit(f"no before/after line in the output of {' '.join(argv)}")
    before, after = float(found.group(1)), float(found.group(2))
    evals = []
    for line in (out / run_name / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval" and "accuracy" in record:
            evals.append((record["step"], 100 * record["accuracy"]))
    best_step, best = max(evals, key=lambda e: e[1]) if evals else (None, after)
    return {"seed": seed, "before": before, "after": after, "gain": after - before,
            "best": best, "best_step": best_step, "seconds": round(seconds, 1),
            "evals": evals}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act", choices=sorted(ACTS), default="grpo")
    p.add_argument("--start", action="append", required=True,
                   help="NAME=PATH of a starting checkpoint (repeat for several builds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--vary", nargs="+", default=["seed"],
                   help="the keys a run's seed is given to (default: seed; shuffle_seed "
                        "changes the data order)")
    p.add_argument("--json", default="", help="write the rows here")
    args, extra = p.parse_known_args()
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    starts = [s.split("=", 1) for s in args.start]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpusft-demo-acts-") as tmp:
        for name, path in starts:
            path = str(Path(path).absolute())
            for seed in args.seeds:
                row = {"start": name, **run_one(args.act, path, seed, Path(tmp), extra,
                                                     args.vary)}
                rows.append(row)
                at = f" (step {row['best_step']})" if row["best_step"] is not None else ""
                print(f"{args.act} | start {name:<8} | seed {seed} | {row['before']:5.1f}% -> "
                      f"{row['after']:5.1f}% | gain {row['gain']:+5.1f} | best "
                      f"{row['best']:5.1f}%{at} | {row['seconds']:.0f} s", flush=True)
    gains = [r["gain"] for r in rows]
    lost = [r["best"] - r["after"] for r in rows]
    print(f"{args.act}: gain {min(gains):+.1f} to {max(gains):+.1f} points over {len(rows)} runs "
          f"({len(starts)} starting checkpoints x {len(args.seeds)} seeds); final below the "
          f"best evaluation by at most {max(lost):.1f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "act": args.act, "overrides": extra, "seed_keys": args.vary, "starts": dict(starts),
            "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
