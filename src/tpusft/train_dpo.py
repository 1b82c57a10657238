"""Preference training: DPO, ORPO and SimPO on chosen/rejected pairs.

    python -m tpusft.train_dpo configs/dpo.yml key=value ...

Top to bottom: config -> run context (output directory, tokenizer, mesh) -> pairs -> model
(weights from load_parameters_path, LoRA and QLoRA as for SFT) and reference (DPO: the base
weights under LoRA, else a frozen copy; none for ORPO and SimPO) -> Tunix's DPO trainer
(restored from run_name's last checkpoint if there is one) -> held-out reward accuracy
before, during and after training -> loss curve.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # tpusft prints its own progress line


def main(argv: Sequence[str]) -> int:
    from tpusft.methods import preference
    from tpusft.training import run

    return run.entry(argv, preference.method, train)


def train(r) -> int:
    import jax

    from tpusft.data import pairs
    from tpusft.models.decoder import ModelArgs
    from tpusft.training import preference, report, run
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.metrics import peak_tflops_per_device, training_flops_per_token
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.preference_loss import PreferenceLoss
    from tpusft.training.progress import Progress
    from tpusft.training.setup import (
        build_model,
        existing_checkpoint,
        reference_model,
        train_and_eval_data,
    )

    cfg = r.cfg
    loss = PreferenceLoss.from_config(cfg)
    train_ds, stats, eval_ds = train_and_eval_data(cfg, r.tokenizer, pairs.build_dataset)

    args = preference.policy_args(ModelArgs.from_config(cfg), loss)
    with r.mesh:
        # A resumed run with a reference still loads its starting weights (and adapters): the
        # reference is their copy; the trainer then restores the trained ones.
        model = build_model(cfg, args, r.mesh,
                            existing_checkpoint(cfg) and not loss.needs_reference)
        ref = reference_model(model) if loss.needs_reference else None
        feeder = preference.batch_feeder(train_ds, cfg, eval_ds, stats)
        trainer = preference.build_trainer(model, ref, make_optimizer(cfg), cfg, feeder)
        start = trainer.train_steps

        peak, peak_source = peak_tflops_per_device(cfg.peak_tflops, cfg.dtype)
        flops_per_token = (training_flops_per_token(args, cfg.max_target_length)
                           * r.method.flops_factor(cfg))  # with a reference's forward pass
        print(r.title())
        report.describe_model(cfg, args, model)
        report.attention_note(cfg, args, r.mesh, report.PAIRS)
        print(f"{report.devices(r.mesh)}; peak {peak:.2f} TFLOP/s per device ({peak_source}); "
              f"{report.allocator()}\n{preference.describe(loss)}; reference model: "
              f"{report.reference(ref is not None, args.lora_rank, cfg.lora.adapter_path)}")
        accumulation = cfg.gradient_accumulation_steps
        micro = f" ({accumulation} micro-batches)" if accumulation > 1 else ""
        print(f"batch {cfg.global_batch_size} pairs x 2 x {cfg.max_target_length} tokens"
              f"{micro}, {cfg.steps} steps")
        r.say_resumed(start)

        demo = run.Demo(r, model, start)
        progress = Progress(feeder, cfg.steps, cfg.log_period, flops_per_token,
                            peak * 1e12 * jax.device_count(), r.metrics_writer(),
                            extras=preference.metrics(loss))
        if not trainer_lib.fit(trainer, cfg, progress, eval_ds is not None):
            return 0
        preference.say_reward_accuracy(progress.eval_records)
        demo.after()

    r.finish(feeder.data_stats(), f"tpusft {loss.loss_type.upper()}")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_dpo` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_dpo")
    supervise_multiprocess("tpusft.train_dpo")
    run_cli(main, usage="tpusft.train_dpo")


if __name__ == "__main__":
    cli()
