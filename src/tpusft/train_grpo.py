"""GRPO (and the variants Tunix offers) with verifiable rewards.

    python -m tpusft.train_grpo configs/grpo.yml key=value ...

Top to bottom: config -> run context (output directory, tokenizer, mesh) -> prompts and
rewards -> model (weights from load_parameters_path, LoRA and QLoRA as for SFT) -> Tunix
RLCluster and learner (restored from run_name's last checkpoint if there is one) -> held-out
accuracy, train, held-out accuracy -> plot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str]) -> int:
    from tpusft.methods import grpo
    from tpusft.training import run

    return run.entry(argv, grpo.method, train)


def train(r) -> int:
    from tpusft.data import prompts
    from tpusft.models.decoder import ModelArgs
    from tpusft.rl import grpo
    from tpusft.rl import rewards as rewards_lib
    from tpusft.training import report
    from tpusft.training import trainer as trainer_lib
    from tpusft.training.setup import build_model, existing_checkpoint

    cfg = r.cfg
    # Every process reads every prompt: Tunix's rollouts take the same prompts on all of them.
    train_ds, first, stats = prompts.training_prompts(cfg, r.tokenizer)
    problems = prompts.held_out_problems(cfg, r.tokenizer)
    rewards = rewards_lib.from_config(cfg, r.tokenizer)
    rewards_lib.check(rewards, first)  # a broken reward fails now, not after compiling

    args = ModelArgs.from_config(cfg)
    with r.mesh:
        # With a reference, a resumed run still loads its starting weights (its reference is
        # their copy); the trainer then restores the trained ones.
        model = build_model(cfg, args, r.mesh, existing_checkpoint(cfg, "actor")
                            and not grpo.needs_reference(cfg))
        timings = grpo.Timings(rewards)
        cluster = grpo.build_cluster(model, r.tokenizer, r.mesh, cfg, timings)
        learner = grpo.build_learner(cluster, cfg, rewards)
        trainer = cluster.actor_trainer
        actor, start = trainer.model, trainer.train_steps

        print(r.title())
        report.describe_model(cfg, args, actor)
        ref = report.reference(grpo.needs_reference(cfg), args.lora_rank,
                               cfg.lora.adapter_path)
        print(f"{report.devices(r.mesh)}; reference model: {ref}; rollouts: "
              f"{cfg.grpo.rollout_engine} sampler")
        print(grpo.describe_step(cfg, rewards))
        r.say_resumed(start)

        evaluate = grpo.held_out_evaluator(actor, r.tokenizer, problems, cfg)
        progress = grpo.Progress(cfg, rewards, timings, evaluate, r.metrics_writer())
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

    r.finish(stats, "tpusft GRPO", f"{cfg.checkpoint_directory}/actor")
    return 0


def cli() -> None:
    """Console script and `python -m tpusft.train_grpo` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc, supervise_multiprocess

    reexec_with_tcmalloc("tpusft.train_grpo")
    supervise_multiprocess("tpusft.train_grpo")
    run_cli(main, usage="tpusft.train_grpo")


if __name__ == "__main__":
    cli()
