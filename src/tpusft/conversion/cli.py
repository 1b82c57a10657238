"""Command lines of tools/convert_checkpoint/{hf_to_native,native_to_hf}.py."""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tpusft.config.loader import absolute_path
from tpusft.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every tpusft error
        raise ConfigError(f"{self.prog}: {message}")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the high-water
    mark a parent had when it forked us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reuse_freed_memory() -> None:
    """Makes glibc keep freed buffers for the next tensor instead of returning them to the OS.

    A conversion allocates and frees one layer-sized buffer after another. By default glibc
    maps each large buffer afresh (one page fault and a zeroed page per 4 KiB, per tensor) and
    gives it back on free; on virtual machines that first touch costs more than the read
    itself (TensorStore reads ran at 0.4 GB/s that way, 2 GB/s with the buffers reused). One
    arena, no mmap'd blocks and no trimming keep the pages resident and reused; peak RSS stays
    the high-water mark of live buffers plus fragmentation. A no-op where malloc is not glibc.
    Process-wide, so the converter scripts call it first thing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def _fetch_from_hub(repo_id: str) -> str:
    """A local snapshot of a hub model's weights, config and tokenizer (needs network)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "*.model",
                                                          "*.jinja", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated model: all one line for the user
        raise ConfigError(f"{repo_id!r} is not a local directory and could not be downloaded "
                          f"from the hub: {str(e).splitlines()[0]}") from None


def _add_model_keys(p: argparse.ArgumentParser, model_name_help: str) -> None:
    p.add_argument("--model_name", default="", help=model_name_help)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model keys, as the trainers take them (e.g. model_name=qwen3-0.6b "
                   "vocab_size=151936)")


def _model_keys(a: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(model_name, overrides) from --model_name and key=value arguments; model_name= given
    as a key=value counts as --model_name."""
    from tpusft.config.loader import parse_override
    from tpusft.config.schema import MODEL_KEYS

    name, overrides = a.model_name, {}
    for arg in a.overrides:
        key, value = parse_override(arg)
        if key == "model_name":
            name = value
        elif key in MODEL_KEYS:
            overrides[key] = value
        else:
            raise ConfigError(f"{arg}: a converter takes model keys only ({key} is not one; "
                              f"see configs/base.yml's Model section)")
    return name, overrides


def hf_to_native_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="hf_to_native.py", description=(
        "Convert a Hugging Face checkpoint (safetensors) to a native Orbax checkpoint at "
        "<output>/0/items, streaming one tensor at a time."))
    p.add_argument("hf_path", help="local HF model directory (or a PEFT LoRA adapter "
                   "directory), or a hub id when online")
    p.add_argument("output", help="output directory (local or gs://)")
    p.add_argument("--scan_layers", type=_bool, default=True,
                   help="stack layers for scanning (default true)")
    p.add_argument("--save_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype to store (default: the source dtype)")
    _add_model_keys(p, "a preset the checkpoint must match (name or YAML path), with any "
                    "key=value overrides")
    a = p.parse_intermixed_args(argv)
    a.output = absolute_path(a.output)
    model_name, overrides = _model_keys(a)

    from tpusft.conversion.convert import check_new_output, hf_to_native
    from tpusft.config.loader import load_preset

    check_new_output(a.output)
    src = a.hf_path
    if not Path(src).exists():
        if src.count("/") != 1 or src.startswith((".", "/")):
            raise ConfigError(f"{src} does not exist")
        src = _fetch_from_hub(src)
    preset = {**(load_preset(model_name) if model_name else {}), **overrides} or None
    if Path(src, "adapter_config.json").exists():  # a PEFT LoRA adapter
        from tpusft.conversion.convert import peft_to_native

        info = peft_to_native(src, a.output, keys=preset, scan_layers=a.scan_layers)
        print(f"wrote {info['items']}: LoRA adapters of {info['adapters']} projections; train "
              f"on with lora.adapter_path={a.output} (and the same lora.rank, alpha, "
              f"target_modules)")
        return 0
    import transformers  # noqa: F401  (imported before the clock starts)

    t0 = time.perf_counter()
    info = hf_to_native(src, a.output, scan_layers=a.scan_layers, save_dtype=a.save_dtype,
                        preset=preset, preset_name=model_name or "the key=value overrides",
                        source_name=a.hf_path if src != a.hf_path else absolute_path(src))
    dt = time.perf_counter() - t0
    gb = info["bytes"] / 1e9
    print(f"wrote {info['items']}: {info['tensors']} tensors, {gb:.2f} GB in {dt:.1f} s "
          f"({gb / dt:.2f} GB/s; reading {gb / max(info['read_seconds'], 1e-9):.2f} GB/s), "
          f"peak RSS {_peak_rss_gib():.2f} GiB")
    print(f"model keys: {a.output.rstrip('/')}/tpusft_model.yml (use model_name=<that file>)")
    return 0


def native_to_hf_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="native_to_hf.py", description=(
        "Convert a native checkpoint (converted, MaxText, or a train_sft run's checkpoints) "
        "to Hugging Face safetensors + config.json + tokenizer, streaming."))
    p.add_argument("native_path", help="native checkpoint: <dir>, <dir>/0/items, a run's "
                   "checkpoints/ (latest step) or one step")
    p.add_argument("output", help="new local directory for the HF model")
    _add_model_keys(p, "model preset (name or YAML path); default: found beside the "
                    "checkpoint or in its run's config.yml; key=value overrides apply to either")
    p.add_argument("--hf_assets", default="", help="directory with the original config.json "
                   "and tokenizer files (default: recorded at conversion time)")
    p.add_argument("--save_dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the safetensors (default: the checkpoint's)")
    p.add_argument("--max_shard_size_mb", type=int, default=512,
                   help="safetensors shard size (MiB)")
    p.add_argument("--base", default="", help="a LoRA checkpoint's base model (native); "
                   "default: the run's load_parameters_path")
    a = p.parse_intermixed_args(argv)
    a.native_path, a.output = absolute_path(a.native_path), absolute_path(a.output)
    a.hf_assets, a.base = absolute_path(a.hf_assets), absolute_path(a.base)
    model_name, overrides = _model_keys(a)

    from tpusft.conversion.convert import native_to_hf
    from tpusft.config.loader import load_preset

    keys = load_preset(model_name) if model_name else None
    import transformers  # noqa: F401  (imported before the clock starts)

    t0 = time.perf_counter()
    info = native_to_hf(a.native_path, a.output, keys=keys, assets=a.hf_assets or None,
                        save_dtype=a.save_dtype, max_shard_bytes=a.max_shard_size_mb << 20,
                        base=a.base or None, overrides=overrides)
    dt = time.perf_counter() - t0
    gb = info["bytes"] / 1e9
    read_gb = info["bytes_read"] / 1e9
    print(f"wrote {a.output}: {info['tensors']} tensors in {info['shards']} shard(s), "
          f"{gb:.2f} GB in {dt:.1f} s ({gb / dt:.2f} GB/s; reading "
          f"{read_gb / max(info['read_seconds'], 1e-9):.2f} GB/s), "
          f"peak RSS {_peak_rss_gib():.2f} GiB")
    if Path(a.output, "adapter").exists():
        print(f"LoRA: merged into the base above; the adapter alone (PEFT format) is in "
              f"{a.output}/adapter")
    return 0


def run_name(path: str) -> str:
    """A checkpoint's model name for general.name: the first directory up from it that is
    not a step, checkpoints/ or a layout's item folder (a run's name, for a run)."""
    p = Path(path.rstrip("/"))
    while p.parent != p and (p.name.isdigit() or p.name in (
            "checkpoints", "items", "model_params", "actor")):
        p = p.parent
    return p.name


def native_to_gguf_main(argv: Sequence[str]) -> int:
    p = _Parser(prog="native_to_gguf.py", description=(
        "Write one GGUF file (llama.cpp, Ollama, LM Studio) from a native checkpoint or a run's "
        "checkpoints (LoRA merged), or from a Hugging Face directory with --from-hf."))
    p.add_argument("source", help="native checkpoint / run checkpoints, or an HF directory "
                   "with --from-hf")
    p.add_argument("output", help="new .gguf file")
    p.add_argument("--from-hf", action="store_true", help="source is a Hugging Face directory")
    p.add_argument("--dtype", "--outtype", dest="dtype", default="f16",
                   help="f32, f16, bf16 or q8_0 (default f16; norms and other 1-D tensors stay "
                   "f32), or one of llama.cpp's quantizations q4_0, q4_k_s, q4_k_m, q5_k_m, "
                   "q6_k, iq4_xs (made by llama.cpp's quantizer from the f32 export)")
    p.add_argument("--tokenizer-pre", default="", help="llama.cpp pre-tokenizer name, when "
                   "it is not recognised from tokenizer.json")
    _add_model_keys(p, "model preset for a native checkpoint (default: found beside it); "
                    "key=value overrides apply to either")
    p.add_argument("--base", default="", help="a LoRA checkpoint's base model (native)")
    a = p.parse_intermixed_args(argv)
    model_name, overrides = _model_keys(a)
    if a.from_hf and (model_name or overrides):
        raise ConfigError("--from-hf reads the model from config.json; --model_name and "
                          "key=value apply to native checkpoints")
    src, out = absolute_path(a.source), absolute_path(a.output)
    from tpusft.conversion.gguf_export import OUTTYPES, QUANTS, hf_to_gguf

    if a.dtype not in OUTTYPES:
        raise ConfigError(f"--dtype {a.dtype!r}: GGUF export writes {', '.join(OUTTYPES)}")
    if a.dtype in QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(f"--dtype {a.dtype} is written by llama.cpp's quantizer, in the gguf "
                          f"extra: bash tools/setup/setup.sh --gguf")
    if Path(out).exists():
        raise ConfigError(f"{out} exists; pick a new output file (nothing was written)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("GGUF export needs the gguf extra: "
                          "bash tools/setup/setup.sh --gguf") from None
    t0 = time.perf_counter()
    if a.from_hf:
        info = hf_to_gguf(src, out, dtype=a.dtype, tokenizer_pre=a.tokenizer_pre or None)
    else:
        import tempfile

        from tpusft.conversion.convert import native_to_hf
        from tpusft.config.loader import load_preset

        keys = load_preset(model_name) if model_name else None
        with tempfile.TemporaryDirectory(dir=str(Path(out).parent)) as tmp:
            hf = str(Path(tmp) / "hf")
            native_to_hf(src, hf, keys=keys, base=absolute_path(a.base) or None,
                         overrides=overrides)
            info = hf_to_gguf(hf, out, dtype=a.dtype, tokenizer_pre=a.tokenizer_pre or None,
                              name=run_name(src))
    dt = time.perf_counter() - t0
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"wrote {out}: {info['arch']}, {info['tensors']} tensors, {a.dtype}, "
          f"{info['bytes'] / 1e9:.2f} GB in {dt:.1f} s, peak RSS {_peak_rss_gib():.2f} GiB")
    return 0
