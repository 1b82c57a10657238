"""Supervised fine-tuning and continued pretraining.

    python -m tpusft.train_sft configs/sft.yml key=value ...

The whole run, top to bottom: config -> tokenizer and data -> mesh and model -> Tunix trainer
(restored from run_name's last checkpoint if there is one) -> train -> loss curve.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # tpusft prints its own progress line


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config, resolved_yaml

    cfg = load_config(argv)
    if cfg.print_config:
        sys.stdout.write(resolved_yaml(cfg))
        return 0
    if cfg.compile_topology:  # will it fit? The step compiled for a TPU topology, no run
        from tpusft.aot import fit

        return fit.run(argv, cfg, fit.sft_method())
    from tpusft import distributed

    distributed.initialize(cfg)  # several processes, when the config or environment says so

    import jax

    from tpusft.data import packing
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import evaluate
    from tpusft.models.decoder import ModelArgs
    from tpusft.models.sharding import mesh_of
    from tpusft.training import report
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.feeder import BatchFeeder
    from tpusft.training.progress import Progress
    from tpusft.training.metrics import (
        peak_tflops_per_device,
        training_flops_per_token,
    )
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.setup import (
        build_model,
        check_batch,
        check_vocab,
        existing_checkpoint,
        metrics_writer,
        prepare_run_directory,
        train_and_eval_data,
        write_resolved_config,
    )

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    out = prepare_run_directory(cfg)

    # ---- data
    write_resolved_config(cfg, out)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_vocab(cfg, tokenizer)
    mesh = mesh_of(cfg)
    check_batch(cfg, mesh)
    train_ds, stats, eval_ds = train_and_eval_data(cfg, tokenizer, packing.build_dataset)

    # ---- model
    args = ModelArgs.from_config(cfg)
    with mesh:
        model = build_model(cfg, args, mesh, existing_checkpoint(cfg))

        feeder = BatchFeeder(train_ds, cfg.gradient_accumulation_steps, eval_ds,
                                         cfg.eval_steps, stats,
                                         replicated=cfg.data_sharding == "global")
        trainer = trainer_lib.build_trainer(model, make_optimizer(cfg), cfg, feeder)
        start = trainer.train_steps

        peak, peak_source = peak_tflops_per_device(cfg.peak_tflops, cfg.dtype)
        flops_per_token = training_flops_per_token(args, cfg.max_target_length)
        print(f"tpusft SFT | run {cfg.run_directory}")
        report.describe_model(cfg, args, model)
        report.attention_note(cfg, args, mesh)
        print(f"{report.devices(mesh)}; peak {peak:.2f} TFLOP/s per device ({peak_source}); "
              f"{report.allocator()}")
        accumulation = cfg.gradient_accumulation_steps
        micro = f" ({accumulation} micro-batches)" if accumulation > 1 else ""
        print(f"batch {cfg.global_batch_size} x {cfg.max_target_length} tokens{micro}, "
              f"packing {cfg.packing_strategy if cfg.packing else 'off'}, {cfg.steps} steps")
        if start:
            print(f"resuming from step {start} (checkpoint in {cfg.checkpoint_directory})")

        demo_before = None
        if cfg.demo_task and start == 0:
            demo_before = evaluate.report(model, tokenizer, cfg, "before training")

        progress = Progress(
            feeder, cfg.steps, cfg.log_period, flops_per_token,
            peak * 1e12 * jax.device_count(), metrics_writer(out))
        if not trainer_lib.fit(trainer, cfg, progress, eval_ds is not None):
            return 0

        if cfg.demo_task:
            after = evaluate.report(model, tokenizer, cfg, "after training", show=8)
            if demo_before is not None:
                print(f"exact match: {100 * demo_before:.1f}% before training -> "
                      f"{100 * after:.1f}% after")

    report.finish(cfg, feeder.data_stats(), "tpusft SFT")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_sft` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_sft")
    supervise_multiprocess("tpusft.train_sft")
    run_cli(main)


if __name__ == "__main__":
    cli()
