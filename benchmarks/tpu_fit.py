"""Will it fit? Per-chip memory of tpusft's compiled steps for TPU topologies, on any machine.

    .venv/bin/python benchmarks/tpu_fit.py [--models llama3.2-1b llama3.1-8b ...]
        [--methods full lora qlora dpo grpo] [--topologies v5e-8 v6e-8 v5p-8]
        [--longest [--skip_batch]] [--json benchmarks/results/tpu_fit.json]
    .venv/bin/python benchmarks/tpu_fit.py --markdown   # the README's tables from the JSON

For each model x method x topology: the step compiled at global batch 8 x 2048 (fsdp over
every chip, remat full, the run's defaults otherwise) and its per-chip total, or the
compiler's out-of-memory figure (GRPO: configs/grpo.yml's own batch and lengths, its
largest program); with --longest (not GRPO), also the longest power-of-two sequence
(2048 ... 131072, by bisection) whose step fits at one row per device, with splash
attention and with XLA's. Rows are merged into --json case by case. Every figure is the TPU
compiler's (libtpu, compile only), not a run on a TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
REPO = Path(__file__).resolve().parents[1]
METHODS = {  # config and overrides of each method
    "full": ("configs/sft.yml", []),
    "lora": ("configs/sft.yml", ["lora.enable_lora=true"]),
    "qlora": ("configs/sft.yml", ["lora.enable_lora=true", "lora.weight_qtype=nf4"]),
    "dpo": ("configs/dpo.yml", []),
    # GRPO at configs/grpo.yml's shape (8 prompts x 8 completions, 256 + 512 tokens): its
    # batch and lengths are its own; the demo's tokenizer gives the pad and stop ids.
    "grpo": ("configs/grpo.yml", []),
}


def compile_case(model: str, method: str, topology: str, rows: int, length: int,
                 attention: str = "auto") -> dict:
    from tpusft.aot import fit
    from tpusft.aot.topology import parse
    from tpusft.config import load_config
    from tpusft.methods import grpo, preference, sft

    config, extra = METHODS[method]
    if method == "grpo":
        from tpusft.demo import arithmetic

        tokenizer = arithmetic.ensure_assets(str(REPO / "runs")) / "tokenizer"
        shape = [f"tokenizer_path={tokenizer}", "remat_policy=full"]
    else:
        shape = [f"global_batch_size={rows}", f"max_target_length={length}",
                 "gradient_accumulation_steps=1", "remat_policy=full"]
    cfg = load_config([str(REPO / config), f"model_name={model}", f"compile_topology={topology}",
                       f"attention={attention}", *shape, *extra])
    recipe = {"dpo": preference.method(), "grpo": grpo.method()}.get(
        method, sft.method())
    result, _ = fit.compile_run(cfg, recipe, parse(topology))
    out = {"fits": result.fits, "seconds": round(result.seconds, 1)}
    if result.fits:
        out["total_gib"] = round(result.total / 2**30, 2)
    else:
        out["needs_gib"] = round(result.needed / 2**30, 2)
        out["available_gib"] = round(result.available / 2**30, 2)
    return out


def memory_cell(case: dict) -> str:
    """A table cell: the per-chip total, or the compiler's out-of-memory figures."""
    if case["fits"]:
        return f"{case['total_gib']:.2f} GiB"
    return f"does not fit (needs {case['needs_gib']:.2f} of {case['available_gib']:.2f})"


LENGTHS = [2048 * 2**i for i in range(7)]  # 2048 ... 131072


def longest(model: str, method: str, topology: str, attention: str) -> int:
    """The longest power-of-two sequence (2048 ... 131072) whose step fits at one row per
    device, by bisection (a longer sequence never needs less memory); 0 when not even 2048
    does."""
    from tpusft.aot.topology import parse

    devices = parse(topology).devices_per_slice
    lengths = LENGTHS
    lo, hi = -1, len(lengths)  # lengths[lo] fits (or lo = -1), lengths[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if compile_case(model, method, topology, devices, lengths[mid], attention)["fits"]:
            lo = mid
        else:
            hi = mid
    return lengths[lo] if lo >= 0 else 0


WHAT = ("per-chip memory of tpusft's compiled steps (libtpu compile only, not a run); global "
        "batch 8 x 2048, fsdp over every chip, remat full; longest: the longest power-of-two "
        "sequence that fits at one row per device")


def write_rows(path: Path, rows: list[dict], what: str = WHAT,
               keys: tuple[str, ...] = ("model", "method", "topology")) -> None:
    """Writes rows into the JSON file, replacing earlier rows of the same case (keys)."""
    def case(row: dict) -> tuple:
        return tuple(row[k] for k in keys)

    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    new = {case(r) for r in rows}
    path.write_text(json.dumps({
        "what": what, "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        "rows": [r for r in kept if case(r) not in new] + rows}, indent=1) + "\n")


LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA nf4", "dpo": "DPO (full)",
          "grpo": "GRPO (full)"}


def markdown(path: Path, maxtext: Path) -> str:
    """The README's tables from the JSON files: per-chip GiB at 8 x 2048 (MaxText's full step
    beside tpusft's), then the longest sequence at one row per device, splash | XLA."""
    rows = json.loads(path.read_text())["rows"]
    ours = {(r["model"], r["method"], r["topology"]): r for r in rows}
    theirs = {}
    if maxtext.exists():
        theirs = {(r["model"], "full, MaxText", r["topology"]): r
                  for r in json.loads(maxtext.read_text())["rows"]
                  if r["length"] == 2048 and r["fits"] is not None}
    cells = {**ours, **theirs}
    topologies = ["v5e-8", "v6e-8", "v5p-8"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = ["| model | method | " + " | ".join(topologies) + " |",
           "|---|---|" + "---|" * len(topologies)]
    for model in models:
        for method in ("full", "full, MaxText", *list(METHODS)[1:]):
            if any((model, method, t) in cells for t in topologies):
                out.append(f"| {model} | {LABELS.get(method, method)} | " + " | ".join(
                    memory_cell(cells[model, method, t]) if (model, method, t) in cells
                    else "" for t in topologies) + " |")
    longest_rows = [r for r in rows if "longest_splash" in r]
    if longest_rows:
        def tokens(n: int) -> str:
            return f"{n // 1024}k" if n else "none"

        searched = [t for t in topologies if any(r["topology"] == t for r in longest_rows)]
        out += ["", "| model | method | " + " | ".join(f"{t}, splash / XLA" for t in searched)
                + " |", "|---|---|" + "---|" * len(searched)]
        for model in models:
            for method in METHODS:
                found = {t: ours.get((model, method, t), {}) for t in searched}
                if any("longest_splash" in r for r in found.values()):
                    out.append(f"| {model} | {LABELS[method]} | " + " | ".join(
                        f"{tokens(r['longest_splash'])} / {tokens(r['longest_xla'])}"
                        if "longest_splash" in r else "" for r in found.values()) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama3.2-1b", "qwen2.5-3b", "llama3.1-8b",
                                                   "qwen3-8b", "gemma2-9b"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--topologies", nargs="+", default=["v5e-8", "v6e-8", "v5p-8"])
    p.add_argument("--longest", action="store_true",
                   help="also search the longest sequence, with splash and with XLA attention")
    p.add_argument("--skip_batch", action="store_true",
                   help="with --longest: keep the 8 x 2048 figures already in --json")
    p.add_argument("--json", default="")
    p.add_argument("--markdown", action="store_true",
                   help="print the README's tables from --json and maxtext_fit.json beside it, "
                        "compiling nothing")
    a = p.parse_args()
    if a.markdown:
        path = Path(a.json or REPO / "benchmarks/results/tpu_fit.json")
        print(markdown(path, path.parent / "maxtext_fit.json"))
        return
    known = {}
    if a.json and Path(a.json).exists():
        known = {(r["model"], r["method"], r["topology"]): r
                 for r in json.loads(Path(a.json).read_text())["rows"]}
    print("| model | method | topology | 8 x 2048, per chip | longest, splash | longest, XLA |")
    print("|---|---|---|---|---|---|")
    for model in a.models:
        for method in a.methods:
            for topology in a.topologies:
                t0 = time.perf_counter()
                key = (model, method, topology)
                if a.skip_batch and key in known:
                    case = dict(known[key])
                else:
                    case = compile_case(model, method, topology, 8, 2048)
                    case.update(model=model, method=method, topology=topology)
                if a.longest and method != "grpo":
                    case["longest_splash"] = longest(model, method, topology, "splash")
                    case["longest_xla"] = longest(model, method, topology, "xla")
                case["wall_seconds"] = round(time.perf_counter() - t0, 1)
                print(f"| {model} | {method} | {topology} | {memory_cell(case)} | "
                      f"{case.get('longest_splash', '-')} | {case.get('longest_xla', '-')} |",
                      flush=True)
                if a.json:  # after every case: a long sweep keeps what it has
                    write_rows(Path(a.json), [case])


if __name__ == "__main__":
    main()
