"""What the recipes print at the start and the end of a run."""

from __future__ import annotations

import os
from typing import Any

from etils import epath


def describe_model(cfg: Any, args, model, print_fn=print) -> None:
    """The model line, and the adapters' share of it on a LoRA run."""
    from tpusft.models import lora

    print_fn(f"model {cfg.model_name}: {args.num_params() / 1e6:,.2f}M parameters, "
             f"{args.num_layers} layers{' (scanned)' if args.scan_layers else ''}, "
             f"dtype {cfg.dtype}, weights {cfg.weight_dtype}, remat {args.remat_policy}")
    if args.lora_rank:
        adapter, total = lora.count(model)
        print_fn(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on "
                 f"{', '.join(sorted(args.lora_targets))}: {adapter / 1e6:,.2f}M / "
                 f"{(total - adapter) / 1e6:,.2f}M trainable, "
                 f"{100 * adapter / (total - adapter):.2f}%")


# Rows that come with a [B, T, T] mask, which splash does not take (XLA attends them):
PAIRS = "preference pairs, whose responses each also see the shared prompt"
GRPO_ROWS = "GRPO's rows, which Tunix passes with a mask (left-padded prompts)"


def attention(cfg: Any, args, mesh, dense: str = "") -> str:
    """The attention kernel training uses, and why not splash where splash was in reach;
    `dense` names rows that come with a mask (PAIRS, GRPO_ROWS)."""
    from tpusft.models import splash
    from tpusft.models.sharding import AxisRules

    rules = AxisRules.create(cfg.logical_axis_rules, mesh) if mesh is not None else None
    reason = dense or splash.why_not(args.attention, rules, cfg.max_target_length,
                                                 args.head_dim)
    if not reason:
        return "splash"
    if args.attention in ("xla", "cudnn") or reason == "not on TPU":
        return args.attention
    return f"xla (splash cannot serve {reason})"


def attention_note(cfg: Any, args, mesh, dense: str = "", print_fn=print) -> None:
    """Says which kernel attends when splash is in play (on TPU, or asked for)."""
    kernel = attention(cfg, args, mesh, dense)
    if kernel not in ("auto", "xla", "cudnn"):
        print_fn(f"attention: {kernel}")


def reference(used: bool, lora_rank: int, adapter_path: str) -> str:
    """What the reference model is (training/setup.py: reference_model)."""
    if not used:
        return "none"
    if not lora_rank:
        return "a frozen copy of the starting weights"
    return "the base weights (shared with the model)" + (
        " with a frozen copy of the starting adapters" if adapter_path else "")


def devices(mesh) -> str:
    """'mesh {...} on N <platform> device(s)', and the processes they are spread over."""
    import jax

    from tpusft import distributed

    where = f" in {distributed.count()} processes" if distributed.count() > 1 else ""
    return (f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
            f"device(s){where}")


def allocator() -> str:
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"


def finish(cfg: Any, stats, title: str, method, checkpoints: str = "",
           print_fn=print) -> None:
    """The data summary, the run's plot (the `method` record's panels) and where the outputs
    are."""
    from tpusft import distributed
    from tpusft.training.metrics import write_run_plot

    if not distributed.is_primary():  # process 0 writes the plot and says where things are
        return
    out = epath.Path(cfg.run_directory)
    print_fn(f"data: {stats.summary()}")
    png = str(out / "loss_curve.png")
    if write_run_plot(str(out / "metrics.jsonl"), png, f"{title}: {cfg.run_name}",
                      method.panels):
        print_fn(f"{method.plot_name}: {png}")
    print_fn(f"checkpoints: {checkpoints or cfg.checkpoint_directory}\n"
             f"tensorboard: {cfg.tensorboard_directory}")
