"""Supervised fine-tuning and continued pretraining.

    python -m tpusft.train_sft configs/sft.yml key=value ...

The whole run, top to bottom: config -> run context (output directory, tokenizer, mesh) ->
data -> model -> Tunix trainer (restored from run_name's last checkpoint if there is one) ->
train -> loss curve.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # tpusft prints its own progress line


def main(argv: Sequence[str]) -> int:
    from tpusft.methods import sft
    from tpusft.training import run

    return run.entry(argv, sft.method, train)


def train(r) -> int:
    import jax

    from tpusft.data import packing
    from tpusft.models.decoder import ModelArgs
    from tpusft.training import report, run
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.feeder import BatchFeeder
    from tpusft.training.metrics import peak_tflops_per_device, training_flops_per_token
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.progress import Progress
    from tpusft.training.setup import build_model, existing_checkpoint, train_and_eval_data

    cfg = r.cfg
    train_ds, stats, eval_ds = train_and_eval_data(cfg, r.tokenizer, packing.build_dataset)

    args = ModelArgs.from_config(cfg)
    with r.mesh:
        model = build_model(cfg, args, r.mesh, existing_checkpoint(cfg))
        feeder = BatchFeeder(train_ds, cfg.gradient_accumulation_steps, eval_ds, cfg.eval_steps,
                             stats, replicated=cfg.data_sharding == "global")
        trainer = trainer_lib.build_trainer(model, make_optimizer(cfg), cfg, feeder)
        start = trainer.train_steps

        peak, peak_source = peak_tflops_per_device(cfg.peak_tflops, cfg.dtype)
        print(r.title())
        report.describe_model(cfg, args, model)
        report.attention_note(cfg, args, r.mesh)
        print(f"{report.devices(r.mesh)}; peak {peak:.2f} TFLOP/s per device ({peak_source}); "
              f"{report.allocator()}")
        accumulation = cfg.gradient_accumulation_steps
        micro = f" ({accumulation} micro-batches)" if accumulation > 1 else ""
        print(f"batch {cfg.global_batch_size} x {cfg.max_target_length} tokens{micro}, "
              f"packing {cfg.packing_strategy if cfg.packing else 'off'}, {cfg.steps} steps")
        r.say_resumed(start)

        demo = run.Demo(r, model, start)
        progress = Progress(feeder, cfg.steps, cfg.log_period,
                            training_flops_per_token(args, cfg.max_target_length),
                            peak * 1e12 * jax.device_count(), r.metrics_writer())
        if not trainer_lib.fit(trainer, cfg, progress, eval_ds is not None):
            return 0
        demo.after()

    r.finish(feeder.data_stats(), "tpusft SFT")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_sft` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_sft")
    supervise_multiprocess("tpusft.train_sft")
    run_cli(main, usage="tpusft.train_sft")


if __name__ == "__main__":
    cli()
