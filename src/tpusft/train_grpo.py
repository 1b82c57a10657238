"""GRPO (and the variants Tunix offers) with verifiable rewards.

    python -m tpusft.train_grpo configs/grpo.yml key=value ...

Top to bottom: config -> tokenizer, prompts and rewards -> mesh and model (weights from
load_parameters_path, LoRA and QLoRA as for SFT) -> Tunix RLCluster and learner (restored
from run_name's last checkpoint if there is one) -> held-out accuracy, train, held-out accuracy
-> loss curve.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config, resolved_yaml

    cfg = load_config(argv)
    if cfg.print_config:
        sys.stdout.write(resolved_yaml(cfg))
        return 0
    if cfg.compile_topology:  # will it fit? A step's programs compiled for a TPU topology
        from tpusft.aot import fit

        return fit.run(argv, cfg, fit.grpo_method())
    from tpusft import distributed

    distributed.initialize(cfg)  # several processes, when the config or environment says so

    from tpusft.data import prompts, sources
    from tpusft.data.chat import load_tokenizer
    from tpusft.data.encoders import PromptOptions
    from tpusft.data.pipeline import DataStats
    from tpusft.errors import DataError
    from tpusft.models.decoder import ModelArgs
    from tpusft.models.sharding import mesh_of
    from tpusft.rl import grpo
    from tpusft.rl import rewards as rewards_lib
    from tpusft.training import report
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.setup import (
        build_model,
        check_batch,
        check_vocab,
        existing_checkpoint,
        metrics_writer,
        prepare_run_directory,
        write_resolved_config,
    )

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    out = prepare_run_directory(cfg)

    # ---- prompts and rewards
    write_resolved_config(cfg, out)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    check_vocab(cfg, tokenizer)
    mesh = mesh_of(cfg)
    check_batch(cfg, mesh)
    popts = PromptOptions.from_config(cfg)
    train_sources, part = sources.sources(cfg, train=True)
    stats = DataStats()
    # Every process reads every prompt: Tunix's rollouts take the same prompts on all of them.
    every_row = {"shard_index": 0, "shard_count": 1}
    train_ds = prompts.train_batches(
        train_sources, popts, dataclasses.replace(sources.options(cfg, train=True), **every_row),
        tokenizer, cfg.global_batch_size, part, stats)
    try:
        first = next(iter(train_ds))
    except StopIteration:
        raise DataError(f"no usable prompts in the training data ({stats.summary()})") from None
    problems = []
    eval_sources, eval_part = sources.sources(cfg, train=False)
    if eval_sources and cfg.grpo.eval_prompts:
        problems = prompts.held_out(
            eval_sources, popts, dataclasses.replace(sources.options(cfg, train=False),
                                                     **every_row),
            tokenizer, cfg.grpo.eval_prompts, eval_part)
    rewards = rewards_lib.build(
        cfg.grpo.reward_functions, cfg.grpo.reward_weights, tokenizer=tokenizer,
        format_pattern=cfg.grpo.format_pattern,
        length_penalty_start=cfg.grpo.length_penalty_start or cfg.grpo.max_completion_length // 2,
        max_completion_length=cfg.grpo.max_completion_length)
    rewards_lib.check(rewards, first)  # a broken reward fails now, not after compiling

    # ---- model and Tunix's RL cluster
    args = ModelArgs.from_config(cfg)
    with mesh:
        # With a reference, a resumed run still loads its starting weights (its reference is
        # their copy); the trainer then restores the trained ones.
        model = build_model(cfg, args, mesh, existing_checkpoint(cfg, "actor")
                            and not grpo.needs_reference(cfg))
        timings = grpo.Timings(rewards)
        cluster = grpo.build_cluster(model, tokenizer, mesh, cfg, timings)
        learner = grpo.build_learner(cluster, cfg, rewards)
        actor = cluster.actor_trainer.model
        start = cluster.actor_trainer.train_steps

        print(f"tpusft GRPO ({cfg.grpo.loss_algo}) | run {cfg.run_directory}")
        report.describe_model(cfg, args, actor)
        ref = report.reference(grpo.needs_reference(cfg), args.lora_rank,
                               cfg.lora.adapter_path)
        print(f"{report.devices(mesh)}; reference model: {ref}; rollouts: "
              f"{cfg.grpo.rollout_engine} sampler")
        print(f"{cfg.global_batch_size} prompts x {cfg.grpo.num_generations} completions per step, "
              f"prompt <= {cfg.grpo.max_prompt_length}, "
              f"completion <= {cfg.grpo.max_completion_length} "
              f"tokens, temperature {cfg.grpo.temperature:g}; {cfg.steps} steps; rewards: "
              + ", ".join(f"{r.name} x{r.weight:g}" for r in rewards))
        if start:
            print(f"resuming from step {start} (checkpoint in {cfg.checkpoint_directory})")

        def evaluate():
            if not problems:
                return None
            acc, rows = grpo.held_out_accuracy(actor, tokenizer, problems,
                                               cfg.grpo.max_completion_length)
            return acc, len(rows)

        trainer = cluster.actor_trainer
        progress = grpo.Progress(cfg, rewards, timings, evaluate,
                                 metrics_writer(out))
        progress.divergence = trainer.divergence
        trainer.with_training_hooks(progress)
        if start < cfg.steps:
            progress.jsonl.rewind(start)
        before = progress.evaluate(start, trainer)
        if start < cfg.steps:
            batches = grpo.until_preempted(train_ds, trainer.preemption)
            trainer_lib.run_training(trainer, cfg, lambda: learner.train(batches))
            if trainer_lib.stopped_early(trainer, cfg):
                return 0
        else:
            cluster.close()
            print(f"run already complete at step {start}; nothing to train")
        after = progress.evaluate(cluster.actor_trainer.train_steps)
        if before is not None and after is not None:
            print(f"held-out accuracy: {100 * before:.1f}% before -> {100 * after:.1f}% after "
                  f"({len(problems)} prompts, greedy)")

    report.finish(cfg, stats, "tpusft GRPO", f"{cfg.checkpoint_directory}/actor",
                  method="grpo")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_grpo` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_grpo")
    supervise_multiprocess("tpusft.train_grpo")
    run_cli(main)


if __name__ == "__main__":
    cli()
