"""LoRA adapters <-> PEFT format (adapter_model.safetensors + adapter_config.json), which
`peft.PeftModel.from_pretrained` loads on top of the Hugging Face base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tpusft.conversion import hf_layout
from tpusft.errors import CheckpointError
from tpusft.models import lora
from tpusft.models.decoder import ModelArgs

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def adapter_pieces(args: ModelArgs) -> list[tuple[tuple[str, ...], str, hf_layout.Piece]]:
    """(native path of the projection module, projection name, the kernel's HF piece) for
    every targeted kernel, one entry per layer."""
    out = []
    for leaf in hf_layout.native_leaves(args):
        if leaf.path[-1] != "kernel" or len(leaf.path) < 3:
            continue
        proj = leaf.path[-2]
        if proj in args.lora_targets:
            out += [(leaf.path[:-1], proj, p) for p in leaf.pieces]
    return out


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _peft_name(piece: hf_layout.Piece, side: str) -> str:
    return f"{PEFT_PREFIX}{piece.hf_name.removesuffix('.weight')}.lora_{side}.weight"


def to_peft(args: ModelArgs, params: dict) -> dict[str, np.ndarray]:
    """PEFT tensors from a native parameter tree (pure dict) that holds lora_a/lora_b."""
    out = {}
    for path, proj, piece in adapter_pieces(args):
        module = _get(params, path)
        la, lb = (np.asarray(module[k]) for k in ("lora_a", "lora_b"))
        if piece.index is not None:
            la, lb = np.take(la, piece.index, axis=1), np.take(lb, piece.index, axis=1)
        A, B = hf_layout.adapter_transforms(args, proj)[0](la, lb)
        out[_peft_name(piece, "A")], out[_peft_name(piece, "B")] = A, B
    return out


def from_peft(args: ModelArgs, tensors: dict[str, np.ndarray]) -> dict:
    """A nested {path: {lora_a, lora_b}} tree (stacked like the model) from PEFT tensors."""
    tree: dict = {}
    for path, proj, piece in adapter_pieces(args):
        names = _peft_name(piece, "A"), _peft_name(piece, "B")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(f"the PEFT adapter has no {missing[0]}; its target_modules "
                                  f"or layer count do not match the model")
        la, lb = hf_layout.adapter_transforms(args, proj)[1](*(tensors[n] for n in names))
        node = tree
        for k in path:
            node = node.setdefault(k, {})
        for key, value in (("lora_a", la), ("lora_b", lb)):
            if piece.index is None:
                node[key] = value
            else:
                node.setdefault(key, []).append((piece.index, value))
    def stack(node):
        if isinstance(node, list):
            return np.stack([v for _, v in sorted(node, key=lambda t: t[0])], axis=1)
        if isinstance(node, np.ndarray):  # an unstacked layer's (Gemma 3's leftover layers)
            return node
        return {k: stack(v) for k, v in node.items()}
    return stack(tree)


def peft_config(args: ModelArgs, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
        "target_modules": sorted(lora.PROJECTIONS[p][0] for p in args.lora_targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }


def save(directory: str | Path, args: ModelArgs, params: dict, base_model: str = "") -> Path:
    from safetensors.numpy import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_peft(args, params), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(peft_config(args, base_model), indent=2))
    return out


def lora_settings(directory: str | Path) -> dict[str, Any]:
    """ModelArgs' LoRA fields from a PEFT adapter's config."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter: no {CONFIG}")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: DoRA, rsLoRA and adapter biases are not supported")
    try:
        targets = lora.target_modules(cfg["target_modules"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {"lora_rank": int(cfg["r"]), "lora_alpha": float(cfg["lora_alpha"]),
            "lora_targets": targets, "lora_dropout": float(cfg.get("lora_dropout") or 0.0)}


def load(directory: str | Path, args: ModelArgs) -> dict:
    from safetensors.numpy import load_file

    return from_peft(args, load_file(str(Path(directory) / WEIGHTS)))
