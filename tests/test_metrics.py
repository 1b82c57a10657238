"""What a run reports: every sink (console, metrics.jsonl, TensorBoard, the plot) carries each
evaluation's own value, equal to an evaluation of the saved checkpoint; the plot shows what
the method optimises; TensorBoard holds tpusft's scalars under train/ and eval/ only; known
library notices stay out of the output."""

from __future__ import annotations

import glob
import logging
import re

import numpy as np
import pytest
from conftest import run_cli

from tpusft.methods import grpo, sft
from tpusft.training.metrics import last_per_step, plot_panels, read_jsonl
from tpusft.training.tensorboard import project_tag


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file of a run's tensorboard/ directory."""
    from tensorboard.backend.event_processing import event_accumulator

    out: dict[str, dict[int, float]] = {}
    for f in sorted(glob.glob(f"{directory}/**/events.out.tfevents.*", recursive=True)):
        acc = event_accumulator.EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_tensorboard_names():
    assert project_tag("/train/loss") == "train/loss"
    assert project_tag("/eval/loss") == "eval/loss"
    assert project_tag("/eval/learning_rate") is None
    assert project_tag("tpusft/train/reward") == "train/reward"
    assert project_tag("tpusft/eval/heldout_accuracy") == "eval/heldout_accuracy"
    assert project_tag("actor/train/loss") == "train/loss"
    assert project_tag("actor/train/kl") is None  # tpusft logs it as train/kl
    for library in ("jax/core/compile/backend_compile_duration", "rewards/train/mean",
                    "completions/train/mean_length", "jax/orbax/write/gbytes"):
        assert project_tag(library) is None


def test_grpo_plot_shows_reward_accuracy_kl_and_length_with_the_final_point():
    records = [{"kind": "eval", "step": 0, "accuracy": 0.25}]
    for step in (1, 2, 3, 4):
        records.append({"kind": "train", "step": step, "loss": 1e-4 * step, "reward": 0.1 * step,
                        "accuracy": 0.1 * step, "kl": 0.01 * step,
                        "completion_length": 5.0 + step})
    records += [{"kind": "eval", "step": 2, "accuracy": 0.5},
                {"kind": "eval", "step": 4, "accuracy": 0.75}]
    panels = {title: {label: (steps, values) for label, steps, values, _ in lines}
              for title, _, lines in plot_panels(records, grpo.PANELS)}
    assert list(panels) == ["reward", "held-out accuracy", "KL to the reference",
                            "completion length"]
    assert panels["held-out accuracy"]["held-out (greedy)"] == ([0, 2, 4], [0.25, 0.5, 0.75])
    assert panels["reward"]["reward (rollouts)"][1] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert panels["completion length"]["mean length"][0] == [1, 2, 3, 4]
    assert not any("loss" in label for lines in panels.values() for label in lines)
    assert [t for t, _, _ in plot_panels(records, sft.PANELS)] == ["loss"]


def test_known_library_notices_are_filtered():
    from tpusft import notices

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("absl")
    handler = Keep()
    logger.addHandler(handler)
    try:
        notices.install()
        notices.install()
        logger.warning("Metadata file does not exist: %s", "/x/_CHECKPOINT_METADATA")
        logger.warning("Skipping non-TPU device: %s. You might be missing jax[tpu]", "cpu")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


@pytest.mark.slow
def test_every_sink_carries_each_evaluation_as_the_saved_checkpoint_evaluates(tmp_path):
    """Evaluations at steps 0, 6 and 12: the console, metrics.jsonl and TensorBoard agree,
    and a run resumed from the step-12 checkpoint evaluates it (at its first step) to the
    same loss. TensorBoard has no library scalars; a run prints no known library notice."""
    args = ["configs/demo/sft.yml", f"base_output_directory={tmp_path}", "run_name=m",
            "global_batch_size=8", "max_target_length=64", "eval_steps=2", "log_period=3",
            "eval_interval=6", "checkpoint_period=6", "async_checkpointing=false",
            "learning_rate=3e-3"]
    first = run_cli("tpusft.train_sft", *args, "steps=12")
    assert first.returncode == 0, first.stderr[-3000:]
    console = {int(s): float(v) for s, v in re.findall(r"eval at step (\d+): loss ([\d.]+)",
                                                       first.stdout)}
    jsonl = last_per_step(read_jsonl(str(tmp_path / "m" / "metrics.jsonl")), "eval", "loss")
    tb = tensorboard_scalars(tmp_path / "m" / "tensorboard")
    assert sorted(console) == sorted(jsonl) == sorted(tb["eval/loss"]) == [0, 6, 12]
    for step in console:
        assert console[step] == pytest.approx(jsonl[step], abs=5e-5)
        assert tb["eval/loss"][step] == pytest.approx(jsonl[step], rel=1e-6)
    assert jsonl[12] < jsonl[6] < jsonl[0]  # each evaluation's own value, not a running mean
    assert not any(tag.startswith("jax/") or tag == "eval/learning_rate" for tag in tb)
    assert {"train/loss", "train/learning_rate", "train/tokens_per_sec"} <= set(tb)
    assert "Metadata file does not exist" not in first.stderr

    again = run_cli("tpusft.train_sft", *args, "steps=13")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 12" in again.stdout
    resumed = {int(s): float(v) for s, v in re.findall(r"eval at step (\d+): loss ([\d.]+)",
                                                       again.stdout)}
    assert resumed[12] == pytest.approx(jsonl[12], abs=5e-5)
    assert "Metadata file does not exist" not in again.stderr + again.stdout
    rows = read_jsonl(str(tmp_path / "m" / "metrics.jsonl"))
    assert np.isfinite(last_per_step(rows, "eval", "loss")[13])
