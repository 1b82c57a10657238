"""Hugging Face safetensors <-> native (MaxText-layout) Orbax checkpoints, streamed.

Both directions hold one HF tensor (or one layer of a stacked native leaf) at a time, plus
at most one safetensors shard being written, so peak host memory stays near the largest
tensor, not the model.

A converted native checkpoint directory holds, beside `0/items`:
  tpusft_model.yml   the model keys (usable as a preset: model_name=<dir>/tpusft_model.yml)
  hf_assets/         the source config.json, generation_config.json and tokenizer files,
                     which native_to_hf reuses for the way back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from etils import epath

from tpusft.conversion import hf_config, hf_layout, peft_adapter
from tpusft.conversion.native import first_intact, unreadable_files
from tpusft.conversion.streaming import (
    NativeReader,
    SafetensorsReader,
    StreamedArray,
    save_native,
)
from tpusft.config.schema import MODEL_KEYS, Config
from tpusft.errors import CheckpointError, ConfigError
from tpusft.models import lora
from tpusft.models.decoder import ModelArgs

MODEL_FILE = "tpusft_model.yml"
ASSETS_DIR = "hf_assets"
SOURCE_FILE = "hf_source.txt"  # the HF model (directory or hub id) a conversion read
ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
               "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
TOKENIZER_FILES = ASSET_FILES[2:]


PREFETCH_BYTES = 256 << 20

# The only source tensors a conversion leaves out without stopping: those outside the text
# decoder (a multimodal checkpoint's vision side), RoPE tables older checkpoints stored
# (recomputed from config.json), and a tied model's copy of the embedding.
OUTSIDE_DECODER = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                   "model.multi_modal_projector.", "vision_model.", "model.vision_model.")
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)


def _skippable(name: str, head: str, tied: bool) -> bool:
    return (name.startswith(OUTSIDE_DECODER) or name.endswith(RECOMPUTED_SUFFIXES)
            or (tied and name == head))


def check_new_output(output: str) -> None:
    """A converter writes only into a new or empty directory: nothing of the user's is
    overwritten or mixed with the output."""
    from etils import epath

    out = epath.Path(output)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{output} is a file; give a new directory for the output")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{output} exists and is not empty; choose a new directory")


def ordered_prefetch(fn: Callable[[Any], Any], items: list, nbytes: Callable[[Any], int],
                     workers: int = 4) -> Iterator:
    """fn(item) for each item, in order, computed ahead on up to `workers` threads (numpy,
    safetensors and TensorStore release the GIL) while the caller consumes, as long as the
    items in flight hold at most PREFETCH_BYTES (one item is always allowed)."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        inflight = nxt = 0
        for _ in range(len(items)):
            while nxt < len(items) and len(pending) < workers and (
                    not pending or inflight + nbytes(items[nxt]) <= PREFETCH_BYTES):
                size = nbytes(items[nxt])
                pending.append((pool.submit(fn, items[nxt]), size))
                inflight += size
                nxt += 1
            future, size = pending.popleft()
            inflight -= size
            yield future.result()


def _dtype(name: str | None) -> np.dtype | None:
    if not name:
        return None
    import ml_dtypes

    table = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
    if name not in table:
        raise ConfigError(f"save_dtype={name!r} is not one of {', '.join(table)}")
    return table[name]


def model_args(keys: dict[str, Any], scan_layers: bool) -> ModelArgs:
    return ModelArgs.from_config(Config(**{**keys, "scan_layers": scan_layers}))


def check_against_preset(keys: dict[str, Any], preset: dict[str, Any], name: str) -> None:
    for k in MODEL_KEYS:
        if k in preset and k in keys and preset[k] != keys[k]:
            raise CheckpointError(f"the checkpoint does not match preset {name}: {k} is "
                                  f"{keys[k]!r} in config.json but {preset[k]!r} in the preset")


def _hf_names(reader: SafetensorsReader) -> tuple[str, str]:
    """(prefix of decoder tensors, lm_head name); multimodal Gemma 3 nests the text model."""
    names = set(reader.names())
    for prefix, head in (("model.", "lm_head.weight"),
                         ("model.language_model.", "lm_head.weight"),
                         ("language_model.model.", "language_model.lm_head.weight")):
        if f"{prefix}embed_tokens.weight" in names:
            return prefix, head
    raise CheckpointError("no embed_tokens.weight tensor found; is this a decoder-only "
                          "language model checkpoint?")


# --------------------------------------------------------------------------- HF -> native
def hf_to_native(hf_path: str, output: str, *, scan_layers: bool = True,
                 save_dtype: str | None = None, preset: dict | None = None,
                 preset_name: str = "", source_name: str = "", log=print) -> dict[str, Any]:
    """Converts a local HF checkpoint; returns a summary (tensors, bytes, peak tensor).
    `source_name` (default hf_path) is recorded as the model a LoRA adapter trained on this
    checkpoint names as its base when exported."""
    config = hf_config.load_hf_config(hf_path)
    keys = hf_config.model_keys(config)
    if preset:
        check_against_preset(keys, preset, preset_name)
    args = model_args(keys, scan_layers)
    reader = SafetensorsReader(hf_path)
    prefix, head = _hf_names(reader)
    leaves = hf_layout.native_leaves(args, prefix, head)
    want = _dtype(save_dtype)

    used = {p.hf_name for leaf in leaves for p in leaf.pieces}
    unmapped = [n for n in reader.names()
                if n not in used and not _skippable(n, head, args.tie_embeddings)]
    if unmapped:
        hint = ""
        if any(n.endswith(".bias") for n in unmapped):
            hint = " (biases: is attention_bias or mlp_bias missing from config.json?)"
        raise CheckpointError(
            f"{hf_path}: {len(unmapped)} tensors have no place in the {keys['model_family']} "
            f"decoder config.json describes{hint}: {', '.join(unmapped[:3])}"
            f"{', ...' if len(unmapped) > 3 else ''}; nothing was written")

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name in {p.hf_name for leaf in leaves for p in leaf.pieces}:
        if name not in reader.files:
            raise CheckpointError(f"{hf_path}: tensor {name} is missing (the index or the "
                                  f"shards do not match config.json)")
        shapes[name], dtypes[name] = reader.header(name)
    for leaf in leaves:
        for p in leaf.pieces:
            if shapes[p.hf_name] != p.hf_shape:
                raise CheckpointError(f"{hf_path}: {p.hf_name} has shape {shapes[p.hf_name]} "
                                      f"but config.json implies {p.hf_shape}")

    params: dict[str, Any] = {}
    largest = 0
    for leaf in leaves:
        src = dtypes[leaf.pieces[0].hf_name]
        dtype = want or _dtype({"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
                               .get(src, "float32"))
        largest = max(largest, int(np.prod(leaf.pieces[0].hf_shape)) * dtype.itemsize)

        def load(p, dtype=dtype):
            # Transform in the stored dtype (a bf16 source saved as float32 keeps the
            # full-precision result of MaxText's scalings).
            x = p.to_native(reader.get(p.hf_name).astype(dtype, copy=False))
            if p.index is None:
                return (slice(None),) * x.ndim, x
            return (slice(None), slice(p.index, p.index + 1)), x[:, None]

        def load_band(rows, p=leaf.pieces[0], dtype=dtype):
            x = p.to_native(reader.get(p.hf_name, rows).astype(dtype, copy=False))
            return (slice(None), slice(*rows)), x

        hf_shape = leaf.pieces[0].hf_shape
        if leaf.banded:  # HF rows j:k -> native columns j:k, a band at a time
            items = hf_layout.bands(hf_shape[0], hf_shape[1] * dtype.itemsize)
            fn, nbytes = load_band, (items[0][1] - items[0][0]) * hf_shape[1] * dtype.itemsize
            block = (leaf.shape[0], items[0][1] - items[0][0])
        else:
            items, fn, nbytes = list(leaf.pieces), load, int(np.prod(hf_shape)) * dtype.itemsize
            block = leaf.shape if not leaf.stacked else (leaf.shape[0], 1, *leaf.shape[2:])

        def blocks(items=items, fn=fn, nbytes=nbytes) -> Iterator:
            # Two threads: more would contend with the writer for this machine's cores.
            return ordered_prefetch(fn, items, lambda _: nbytes, workers=2)

        node = params
        for k in leaf.path[:-1]:
            node = node.setdefault(k, {})
        node[leaf.path[-1]] = StreamedArray(leaf.shape, dtype, block, blocks)

    skipped = [n for n in reader.names() if n not in used]
    if skipped:
        log(f"note: {len(skipped)} tensors outside the text decoder are left out "
            f"(e.g. {skipped[0]})")
    items = save_native(output, params, scan_layers)

    out = epath.Path(output)
    meta = {k: keys[k] for k in MODEL_KEYS if k in keys}
    (out / MODEL_FILE).write_text(
        f"# Model keys of the checkpoint converted from {hf_path}\n" + yaml.safe_dump(meta))
    (out / SOURCE_FILE).write_text((source_name or hf_path) + "\n")
    assets = out / ASSETS_DIR
    assets.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        src = Path(hf_path, name)
        if src.exists():
            (assets / name).write_bytes(src.read_bytes())
    return {"items": items, "tensors": len(used), "bytes": reader.clock.bytes,
            "read_seconds": reader.clock.seconds,
            "largest_tensor_bytes": largest, "model_keys": meta}


LORA_FILE = "tpusft_lora.yml"


def peft_to_native(adapter_dir: str, output: str, *, keys: dict[str, Any] | None = None,
                   scan_layers: bool = True) -> dict[str, Any]:
    """A PEFT LoRA adapter -> a native adapter checkpoint (<output>/0/items, the adapters'
    tree) with its model keys and LoRA settings beside it, for `lora.adapter_path`."""
    settings = peft_adapter.lora_settings(adapter_dir)
    if keys is None:
        base = json.loads(Path(adapter_dir, peft_adapter.CONFIG).read_text()).get(
            "base_model_name_or_path") or ""
        if not Path(base, "config.json").exists():
            raise CheckpointError(f"{adapter_dir}: its base model {base!r} is not a local "
                                  f"directory with config.json; give --model_name")
        keys = hf_config.model_keys(hf_config.load_hf_config(base))
    args = dataclasses.replace(model_args(keys, scan_layers), **settings)
    tree = peft_adapter.load(adapter_dir, args)
    items = save_native(output, tree, scan_layers)
    out = epath.Path(output)
    (out / MODEL_FILE).write_text(yaml.safe_dump({k: keys[k] for k in MODEL_KEYS if k in keys}))
    (out / LORA_FILE).write_text(yaml.safe_dump(lora_config(args)))
    return {"items": items, "adapters": len(peft_adapter.adapter_pieces(args)),
            "model_keys": keys}


def lora_config(args: ModelArgs) -> dict[str, Any]:
    """The `lora.` section that recreates args' adapters."""
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
            "target_modules": sorted(lora.PROJECTIONS[p][0] for p in args.lora_targets)}


def load_adapters(model, args: ModelArgs, path: str) -> str:
    """Sets `model`'s adapters from a PEFT adapter directory or a native adapter checkpoint
    (hf_to_native.py of a PEFT adapter); their rank, alpha and targets must match args
    (dropout is a training setting and may differ)."""
    from flax import nnx

    from tpusft.conversion.native import restore_params

    p = epath.Path(path)
    if (p / peft_adapter.CONFIG).exists():
        have = peft_adapter.lora_settings(path)
    else:
        found = next((d / LORA_FILE for d in [p, *list(p.parents)[:3]]
                      if (d / LORA_FILE).exists()), None)
        if found is None:
            raise CheckpointError(f"lora.adapter_path={path} is neither a PEFT adapter nor a "
                                  f"native adapter checkpoint (no {LORA_FILE})")
        s = yaml.safe_load(found.read_text())
        have = {"lora_rank": s["rank"], "lora_alpha": float(s["alpha"]),
                "lora_targets": lora.target_modules(s["target_modules"])}
    want = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
            "lora_targets": args.lora_targets}
    for k, v in want.items():
        if have[k] != v:
            name = k.replace("lora_", "").replace("targets", "target_modules")
            shown = (lambda x: sorted(x)) if k == "lora_targets" else (lambda x: x)
            raise CheckpointError(f"lora.adapter_path={path} has {name} {shown(have[k])} but "
                                  f"the run sets lora.{name}={shown(v)}; make them match")
    if (p / peft_adapter.CONFIG).exists():
        tree = peft_adapter.load(path, args)
        state = nnx.state(model, nnx.LoRAParam)
        nnx.replace_by_pure_dict(state, jax_tree_like(nnx.to_pure_dict(state), tree))
        nnx.update(model, state)
        return path
    return restore_params(model, path, lora_only=True)


def jax_tree_like(target: dict, values: dict) -> dict:
    """`values` placed with `target`'s shardings and dtypes."""
    import jax

    return jax.tree.map(lambda t, v: jax.device_put(np.asarray(v, t.dtype), t.sharding),
                        target, values)


# --------------------------------------------------------------------------- native -> HF
def find_lora_run(native_path: str) -> dict[str, Any] | None:
    """The config.yml of the LoRA training run that wrote `native_path`, if it is one."""
    p = epath.Path(native_path)
    for d in [p, *list(p.parents)[:4]]:
        if (d / "config.yml").exists() and (d / "checkpoints").exists():
            run = yaml.safe_load((d / "config.yml").read_text()) or {}
            return run if (run.get("lora") or {}).get("enable_lora") else None
    return None


def _lora_export(native_path: str, lora_reader: NativeReader, base: str | None,
                 keys: dict[str, Any]) -> tuple[NativeReader, dict[str, Any], str]:
    """(base reader, ModelArgs' LoRA fields, base path) of a LoRA training checkpoint."""
    run = find_lora_run(native_path) or {}
    base = base or run.get("load_parameters_path")
    if not base:
        raise CheckpointError(f"{native_path} holds LoRA adapters only; give the base model's "
                              f"native checkpoint with --base")
    settings = run.get("lora") or {}
    if not settings:
        raise CheckpointError(f"{native_path}: no LoRA settings found (the run's config.yml "
                              f"is missing)")
    targets = lora.target_modules(settings.get("target_modules", "all-linear"))
    fields = {"lora_rank": int(settings["rank"]), "lora_alpha": float(settings["alpha"]),
              "lora_targets": targets, "lora_dropout": float(settings.get("dropout") or 0.0)}
    items, kind = first_intact(base, _intact_on_disk)
    reader = NativeReader(items, ("params", "params") if kind == "maxtext" else ())
    if any(e[-1] == "lora_a" for e in reader.entries):
        raise CheckpointError(f"--base {base} is itself a LoRA checkpoint; give the base model")
    return reader, fields, base


def _intact_on_disk(items, kind: str) -> str | None:
    """What is damaged in a training run's checkpoint step, read array by array against the
    fingerprints the run saved (None: intact, or a checkpoint that records none)."""
    from tpusft.conversion import integrity

    if problem := unreadable_files(items, kind):
        return problem
    saved = integrity.saved_model_fingerprints(items.parent) if kind == "training" else {}
    if not saved:
        return None
    try:
        reader = NativeReader(items, ())
        for rel in reader.entries:
            name = integrity.leaf_name(rel)
            if name in saved:
                problem = integrity.first_changed(saved, {name: integrity.fingerprint(
                    reader.read(rel))})
                if problem:
                    return problem
        reader.close()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or missing files: tensorstore's errors
        return integrity.unreadable(e)
    return None


def _read_adapters(reader: NativeReader) -> dict:
    tree: dict = {}
    for rel in reader.entries:
        if rel[-1] in ("lora_a", "lora_b"):
            node = tree
            for k in rel[:-1]:
                node = node.setdefault(k, {})
            node[rel[-1]] = reader.read(rel)
    return tree


def hf_source(native_path: str) -> str | None:
    """The HF model a native checkpoint was converted from, if recorded beside it."""
    p = epath.Path(native_path)
    for d in [p, *list(p.parents)[:4]]:
        if (d / SOURCE_FILE).exists():
            return (d / SOURCE_FILE).read_text().strip() or None
        if (d / MODEL_FILE).exists():
            return None
    return None


def find_model_keys(native_path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(model keys, hf_assets directory) recorded beside a native checkpoint or its run."""
    p = epath.Path(native_path)
    for d in [p, *list(p.parents)[:4]]:
        if (d / MODEL_FILE).exists():
            keys = yaml.safe_load((d / MODEL_FILE).read_text())
            assets = d / ASSETS_DIR
            return keys, str(assets) if assets.exists() else None
        if (d / "config.yml").exists() and (d / "checkpoints").exists():
            run = yaml.safe_load((d / "config.yml").read_text()) or {}
            keys = {k: run[k] for k in MODEL_KEYS if k in run}
            assets = None
            if run.get("load_parameters_path"):
                _, assets = find_model_keys(run["load_parameters_path"])
            if assets is None and run.get("tokenizer_path"):
                assets = run["tokenizer_path"]
            return keys, assets
    return None, None


def _plan_shards(reader: NativeReader, leaves: list[hf_layout.Leaf], dtype: np.dtype | None,
                 max_shard_bytes: int) -> list[list[tuple[hf_layout.Leaf, hf_layout.Piece]]]:
    """Groups the HF tensors, in order, into shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list] = []
    size = 0
    for leaf in leaves:
        itemsize = (dtype or reader.dtype(leaf.path)).itemsize
        for p in leaf.pieces:
            nbytes = int(np.prod(p.hf_shape)) * itemsize
            if not shards or (size and size + nbytes > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append((leaf, p))
            size += nbytes
    return shards


def _hf_tensors(reader: NativeReader, pieces: list, dtype: np.dtype | None,
                adapter: tuple[NativeReader, ModelArgs] | None = None):
    """Yields (HF name, HF tensor) for `pieces`, read layer by layer and transformed a few
    pieces ahead on worker threads; with `adapter` (a LoRA checkpoint's reader and the model
    args), targeted kernels come merged with their adapters."""
    def load(item):
        leaf, p = item
        if leaf.banded:  # native columns j:k -> HF rows j:k, into one output array
            t = np.empty(p.hf_shape, reader.dtype(leaf.path))
            for j, k in hf_layout.bands(p.hf_shape[0], p.hf_shape[1] * t.itemsize):
                t[j:k] = p.to_hf(reader.read(leaf.path, columns=(j, k)))
        else:
            t = np.ascontiguousarray(p.to_hf(reader.read(leaf.path, p.index)))
        if adapter is not None and leaf.path[-1] == "kernel" and \
                leaf.path[-2] in adapter[1].lora_targets:
            lora_reader, args = adapter
            module = leaf.path[:-1]
            la, lb = (lora_reader.read((*module, k), p.index) for k in ("lora_a", "lora_b"))
            A, B = hf_layout.adapter_transforms(args, leaf.path[-2])[0](la, lb)
            update = np.float32(args.lora_scale) * (B.astype(np.float32) @ A.astype(np.float32))
            t = (t.astype(np.float32) + update).astype(t.dtype)
        return p.hf_name, t.astype(dtype or t.dtype, copy=False)

    yield from ordered_prefetch(load, pieces, lambda it: int(np.prod(it[1].hf_shape)) * 4)


def native_to_hf(native_path: str, output: str, *, keys: dict[str, Any] | None = None,
                 assets: str | None = None, save_dtype: str | None = None,
                 max_shard_bytes: int = 1 << 29, base: str | None = None,
                 overrides: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Writes HF safetensors shards, index, config.json, generation_config.json, tokenizer.

    A LoRA run's checkpoint (adapters only) is merged into its base (`base`, or the run's
    load_parameters_path), and the adapter alone is written in PEFT format to
    <output>/adapter. Model keys: `keys`, else those recorded beside the checkpoint, with
    `overrides` applied.
    """
    from safetensors.numpy import save_file

    from tpusft.conversion.native import resolve

    resolve(native_path)  # not a checkpoint at all: said before anything about model keys
    found_keys, found_assets = find_model_keys(native_path)
    keys = {**(keys or found_keys or {}), **(overrides or {})}
    assets = assets or found_assets
    if not keys or "model_family" not in keys:
        raise CheckpointError(f"no model keys found for {native_path}; pass --model_name (a "
                              f"preset name or a YAML of model keys)")
    if "://" in output:
        raise CheckpointError("the Hugging Face output must be a local directory")
    check_new_output(output)
    out = Path(output)

    items, kind = first_intact(native_path, _intact_on_disk)
    prefix = ("params", "params") if kind == "maxtext" else ()
    reader = NativeReader(items, prefix)
    adapter_reader, lora_fields = None, {}
    if any(e[-1] == "lora_a" for e in reader.entries):
        adapter_reader = reader
        reader, lora_fields, base = _lora_export(native_path, reader, base, keys)
        assets = assets or find_model_keys(base)[1]
    scanned = not any(e[:2] == ("decoder", "layers_0") for e in reader.entries)
    args = dataclasses.replace(model_args(keys, scanned), **lora_fields)
    adapter = (adapter_reader, args) if adapter_reader is not None else None
    leaves = hf_layout.native_leaves(args)
    for leaf in leaves:
        have = reader.shape(leaf.path)
        if have != leaf.shape:
            raise CheckpointError(f"{native_path}: {leaf.name} has shape {have} but the model "
                                  f"keys imply {leaf.shape}; check --model_name")
    want = _dtype(save_dtype)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists()
                                else None))
    try:
        # Each shard is read whole, then written with no reads in flight: safetensors holds
        # the GIL while it serializes, which would stall the reading threads.
        shards: list[list[str]] = []
        total, count, first_dtype = 0, 0, None
        for pieces in _plan_shards(reader, leaves, want, max_shard_bytes):
            current = dict(_hf_tensors(reader, pieces, want, adapter))
            save_file(current, str(tmp / f"shard-{len(shards):05d}.safetensors"),
                      metadata={"format": "pt"})
            shards.append(list(current))
            first_dtype = first_dtype or next(iter(current.values())).dtype
            total += sum(t.nbytes for t in current.values())
            count += len(current)
            del current
        reader.close()

        n = len(shards)
        weight_map = {}
        for i, names in enumerate(shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        _write_hf_metadata(tmp, keys, assets, str(first_dtype))
        if adapter_reader is not None:
            source = hf_source(base)
            if source is None:
                log(f"note: the adapter's base {base} was not converted from a Hugging Face "
                    f"model; adapter/adapter_config.json names it as base_model_name_or_path "
                    f"(export it with native_to_hf.py for PEFT to load the adapter on it)")
            peft_adapter.save(tmp / "adapter", args, _read_adapters(adapter_reader),
                              base_model=source or str(base))
            adapter_reader.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"tensors": count, "bytes": total, "shards": n, "bytes_read": reader.clock.bytes,
            "read_seconds": reader.clock.seconds}


def _write_hf_metadata(out: Path, keys: dict[str, Any], assets: str | None,
                       dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer files. The source model's
    config.json and generation_config.json keep their token ids; without them (a model
    trained from scratch), bos/eos/pad come from the tokenizer, and generation stops at its
    EOS and at the chat template's end-of-turn token."""
    import transformers

    base = None
    if assets and Path(assets, "config.json").exists():
        try:
            base = transformers.AutoConfig.from_pretrained(assets)
        except (OSError, ValueError):
            base = None
    from tpusft.data.chat import has_tokenizer, stop_ids

    tokenizer = None
    if assets and has_tokenizer(assets):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(assets)
        except (OSError, ValueError):
            tokenizer = None
    dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "float32")
    config = hf_config.hf_config_for(keys, base, dtype)
    if base is None and tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    if assets and Path(assets, "generation_config.json").exists():
        shutil.copy(Path(assets, "generation_config.json"), out / "generation_config.json")
    else:
        generation = transformers.GenerationConfig.from_model_config(config)
        if tokenizer is not None:
            eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [
                config.eos_token_id]
            stops = sorted({*stop_ids(tokenizer), *(i for i in eos if i is not None)})
            generation.eos_token_id = stops[0] if len(stops) == 1 else stops
            generation.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id
                                       is not None else stops[0])
        generation.save_pretrained(out)
    if assets:
        for name in TOKENIZER_FILES:
            if Path(assets, name).exists():
                shutil.copy(Path(assets, name), out / name)
