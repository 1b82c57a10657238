"""Preference training: DPO, ORPO and SimPO on chosen/rejected pairs.

    python -m tpusft.train_dpo configs/dpo.yml key=value ...

Top to bottom: config -> tokenizer and pairs -> mesh, model (weights from
load_parameters_path, LoRA and QLoRA as for SFT) and reference (DPO: the base weights under
LoRA, else a frozen copy; none for ORPO and SimPO) -> Tunix's DPO trainer (restored from
run_name's last checkpoint if there is one) -> held-out reward accuracy before, during and
after training -> loss curve.
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

        return fit.run(argv, cfg, fit.preference_method())
    from tpusft import distributed

    distributed.initialize(cfg)  # several processes, when the config or environment says so

    import jax

    from tpusft.data import pairs
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import evaluate
    from tpusft.models.decoder import ModelArgs
    from tpusft.models.sharding import mesh_of
    from tpusft.training import preference, report
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.progress import Progress
    from tpusft.training.metrics import (
        peak_tflops_per_device,
        training_flops_per_token,
    )
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.preference_loss import PreferenceLoss
    from tpusft.training.setup import (
        build_model,
        check_batch,
        check_vocab,
        existing_checkpoint,
        metrics_writer,
        prepare_run_directory,
        reference_model,
        train_and_eval_data,
        write_resolved_config,
    )

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    out = prepare_run_directory(cfg)
    method = PreferenceLoss.from_config(cfg)

    # ---- data: batches of global_batch_size pairs
    write_resolved_config(cfg, out)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_vocab(cfg, tokenizer)
    mesh = mesh_of(cfg)
    check_batch(cfg, mesh)
    train_ds, stats, eval_ds = train_and_eval_data(cfg, tokenizer, pairs.build_dataset)

    # ---- model and reference
    args = preference.policy_args(ModelArgs.from_config(cfg), method)
    resuming = existing_checkpoint(cfg)
    with mesh:
        # A resumed run with a reference still loads its starting weights (and adapters): the
        # reference is their copy; the trainer then restores the trained ones.
        model = build_model(cfg, args, mesh, resuming and not method.needs_reference)
        ref = reference_model(model) if method.needs_reference else None
        feeder = preference.batch_feeder(train_ds, cfg, eval_ds, stats)
        trainer = preference.build_trainer(model, ref, make_optimizer(cfg), cfg, feeder)
        start = trainer.train_steps

        peak, peak_source = peak_tflops_per_device(cfg.peak_tflops, cfg.dtype)
        # The policy's forward and backward, plus the reference's forward (a third more).
        flops_per_token = training_flops_per_token(args, cfg.max_target_length) * (
            4 / 3 if ref is not None else 1)
        print(f"tpusft preference training ({method.loss_type}) | run {cfg.run_directory}")
        report.describe_model(cfg, args, model)
        report.attention_note(cfg, args, mesh, report.PAIRS)
        reference = report.reference(ref is not None, args.lora_rank, cfg.lora.adapter_path)
        constants = {"dpo": f"beta {method.beta:g}",
                     "simpo": f"beta {method.beta:g}, gamma {method.simpo_gamma:g}",
                     "orpo": f"lambda {method.orpo_lambda:g}"}[method.loss_type]
        smoothing = (f", label smoothing {method.label_smoothing:g}"
                     if method.label_smoothing else "")
        print(f"{report.devices(mesh)}; peak {peak:.2f} TFLOP/s per device ({peak_source}); "
              f"{report.allocator()}\n{method.loss_type}: {constants}{smoothing}; "
              f"reference model: {reference}")
        accumulation = cfg.gradient_accumulation_steps
        micro = f" ({accumulation} micro-batches)" if accumulation > 1 else ""
        print(f"batch {cfg.global_batch_size} pairs x 2 x {cfg.max_target_length} tokens"
              f"{micro}, {cfg.steps} steps")
        if start:
            print(f"resuming from step {start} (checkpoint in {cfg.checkpoint_directory})")

        demo_before = None
        if cfg.demo_task and start == 0:
            demo_before = evaluate.report(model, tokenizer, cfg, "before training")

        progress = Progress(
            feeder, cfg.steps, cfg.log_period, flops_per_token,
            peak * 1e12 * jax.device_count(), metrics_writer(out),
            extras=preference.metrics(method))
        if not trainer_lib.fit(trainer, cfg, progress, eval_ds is not None):
            return 0

        evals = [r for r in progress.eval_records if "reward_accuracy" in r]
        if len(evals) > 1:
            print(f"held-out reward accuracy: {100 * evals[0]['reward_accuracy']:.1f}% at step "
                  f"{evals[0]['step']} -> {100 * evals[-1]['reward_accuracy']:.1f}% at step "
                  f"{evals[-1]['step']} (margin {evals[0]['reward_margin']:.3f} -> "
                  f"{evals[-1]['reward_margin']:.3f})")
        if cfg.demo_task:
            after = evaluate.report(model, tokenizer, cfg, "after training", show=8)
            if demo_before is not None:
                print(f"exact match: {100 * demo_before:.1f}% before training -> "
                      f"{100 * after:.1f}% after")

    report.finish(cfg, feeder.data_stats(), f"tpusft {method.loss_type.upper()}",
                  method="dpo")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_dpo` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_dpo")
    supervise_multiprocess("tpusft.train_dpo")
    run_cli(main)


if __name__ == "__main__":
    cli()
