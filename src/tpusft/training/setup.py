"""Checks made before anything is compiled: vocabulary, batch layout, existing checkpoints."""

from __future__ import annotations

from typing import Any

from etils import epath

from tpusft.errors import ConfigError
from tpusft.models.sharding import BATCH_AXES


def check_vocab(cfg: Any, tokenizer) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but vocab_size="
                          f"{cfg.vocab_size}; use the model's own tokenizer or a larger "
                          f"vocab_size")


def check_batch(cfg: Any, mesh) -> None:
    micro = cfg.global_batch_size // cfg.gradient_accumulation_steps
    ways = 1
    for axis in BATCH_AXES:
        ways *= mesh.shape[axis]
    if micro % ways:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} / gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps} = {micro} sequences per micro-batch cannot be "
            f"split over the {ways} devices of the data and fsdp axes; use a multiple of {ways}")


def existing_checkpoint(cfg: Any) -> bool:
    """True when run_name already has a checkpoint step (the run will resume)."""
    if not cfg.enable_checkpointing:
        return False
    root = epath.Path(cfg.checkpoint_directory)
    return root.exists() and any(p.name.isdigit() for p in root.iterdir())
