"""End-to-end runs of the CLI: errors, resume equivalence, profiling, the demo."""

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, run_in_process, write_jsonl

from tpusft.training.metrics import last_per_step, read_jsonl

DEMO = "configs/demo/sft.yml"
SMALL = ["global_batch_size=8", "max_target_length=64", "eval_steps=1", "log_period=1"]


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr


def _kill_once_saved(module: str, args: list[str], checkpoint: Path, env=None) -> None:
    """Runs `python -m module args` and kills it (SIGKILL) once `checkpoint` exists."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_config_errors_exit_2(tmp_path):
    missing = run_cli("tpusft.train_sft", str(tmp_path / "nope.yml"))
    _one_line_error(missing, "config file not found")
    bad = tmp_path / "bad.yml"
    bad.write_text("a: [\n")
    _one_line_error(run_cli("tpusft.train_sft", str(bad)), "invalid YAML")
    _one_line_error(run_cli("tpusft.train_sft", DEMO, "stepz=3"), "did you mean steps")
    debug = run_cli("tpusft.train_sft", DEMO, "stepz=3", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_print_config():
    proc = run_cli("tpusft.train_sft", DEMO, "print_config=true", "steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "steps: 5" in proc.stdout and "checkpoint_directory:" in proc.stdout


def test_data_and_checkpoint_errors_exit_2(tmp_path, demo_assets):
    from tpusft.train_sft import main

    tok = f"tokenizer_path={demo_assets / 'tokenizer'}"
    common = [DEMO, "demo_task=", f"base_output_directory={tmp_path}", tok, "hf_path=json"]
    # One through a real process (exit code and stderr of the interpreter itself) ...
    _one_line_error(run_cli("tpusft.train_sft", *common, f"hf_data_files={tmp_path}/none.jsonl"),
                    "no file matches")
    # ... the rest through the same wrapper in this process.
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "answer": "b"}])
    _one_line_error(run_in_process(main, *common, f"hf_data_files={cols}",
                                   "data_format=messages"), "has no column 'messages'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(run_in_process(main, *common, f"hf_data_files={empty}"),
                    "cannot load data set")
    good = demo_assets / "train.jsonl"
    _one_line_error(run_in_process(main, *common[:-2], "hf_path=json", f"hf_data_files={good}",
                                   "tokenizer_path=/no/such/tokenizer"), "cannot load a tokenizer")
    _one_line_error(run_in_process(main, *common, f"hf_data_files={good}",
                                   f"load_parameters_path={tmp_path}/no-ckpt"), "does not exist")


def test_data_inspection(tmp_path):
    from tpusft.data.inspect import main

    out = run_in_process(main, DEMO, f"base_output_directory={tmp_path}", "inspect_examples=2",
                         "global_batch_size=8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("--- json example") == 2
    assert "[[" in out.stdout and "token lengths of" in out.stdout
    assert "rows: " in out.stdout and "packing: " in out.stdout
    bad = run_in_process(main, DEMO, f"base_output_directory={tmp_path}", "truncaton=left")
    _one_line_error(bad, "did you mean truncation")
    # Preference pairs: both sides, their responses marked.
    pairs = run_in_process(main, "configs/demo/dpo.yml", f"base_output_directory={tmp_path}",
                           "inspect_examples=1", "global_batch_size=8")
    assert pairs.returncode == 0, pairs.stderr[-3000:]
    assert "--- json pair 1, chosen" in pairs.stdout and "--- json pair 1, rejected" in pairs.stdout
    assert "[[" in pairs.stdout and "padding: " in pairs.stdout
    # SFT refuses preference rows with a line that says what they are for.
    from tpusft.train_sft import main as sft_main

    wrong = run_in_process(sft_main, DEMO, f"base_output_directory={tmp_path}", "hf_path=json",
                           f"hf_data_files={tmp_path}/demo_assets/arithmetic/"
                           "preference_train.jsonl")
    _one_line_error(wrong, "which supervised fine-tuning cannot train on")


@pytest.mark.slow
def test_resume_continues_at_the_exact_data_position(tmp_path):
    args = [DEMO, f"base_output_directory={tmp_path}", *SMALL, "steps=30",
            "checkpoint_period=10", "async_checkpointing=false"]
    # The uninterrupted run also captures an xplane trace of steps 3-4 (profiler=xplane).
    full = run_cli("tpusft.train_sft", *args, "run_name=full", "profiler=xplane",
                   "skip_first_n_steps_for_profiler=2", "profiler_steps=2")
    assert full.returncode == 0, full.stderr[-3000:]
    traces = glob.glob(str(tmp_path / "full" / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert traces and Path(traces[0]).stat().st_size > 0

    ckpt = tmp_path / "cut" / "checkpoints" / "10"
    _kill_once_saved("tpusft.train_sft", [*args, "run_name=cut"], ckpt)
    assert ckpt.exists()
    saved = sorted(int(p.name) for p in ckpt.parent.iterdir() if p.name.isdigit())
    assert max(saved) < 30, "the run finished before it was killed"

    resumed = run_cli("tpusft.train_sft", *args, "run_name=cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {max(saved)}" in resumed.stdout

    ref_rows = read_jsonl(str(tmp_path / "full" / "metrics.jsonl"))
    got_rows = read_jsonl(str(tmp_path / "cut" / "metrics.jsonl"))
    ref = last_per_step(ref_rows, "train", "loss")
    got = last_per_step(got_rows, "train", "loss")
    # The resumed run is fed exactly the token ids of the uninterrupted run, step for step.
    ref_ids = last_per_step(ref_rows, "train", "batch_crc32")
    got_ids = last_per_step(got_rows, "train", "batch_crc32")
    assert len(ref_ids) == 30 and all(got_ids[s] == ref_ids[s] for s in got_ids)
    assert list(ref) == list(range(1, 31))
    # Every step after the restart is logged by the resumed run; a step the killed run had
    # finished but not yet logged may be missing, which is why only logged steps compare.
    start = max(saved)
    assert all(s in got for s in range(start + 1, 31)) and len(got) >= 28
    steps = sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_gcs_output_directory(tmp_path, gcs_emulator, monkeypatch):
    base = "gs://tpusft-test/runs"
    args = [DEMO, f"base_output_directory={base}", *SMALL, "steps=6", "checkpoint_period=3",
            "run_name=gcs"]
    first = run_cli("tpusft.train_sft", *args, env={**gcs_emulator, "HOME": str(tmp_path)})
    assert first.returncode == 0, first.stderr[-3000:]

    for key, value in gcs_emulator.items():
        monkeypatch.setenv(key, value)
    from etils import epath

    run = epath.Path(f"{base}/gcs")
    names = {p.name for p in run.iterdir()}
    assert {"checkpoints", "tensorboard", "metrics.jsonl", "loss_curve.png", "config.yml"} <= names
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert len(last_per_step(read_jsonl(f"{base}/gcs/metrics.jsonl"), "train", "loss")) == 6

    # Same run_name, more steps: resumes from the gs:// checkpoint.
    again = run_cli("tpusft.train_sft", *args[:-2], "steps=8", "checkpoint_period=3",
                    "run_name=gcs", env={**gcs_emulator, "HOME": str(tmp_path)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 6" in again.stdout
    assert "optimizer settings than the run's last start (steps 6 -> 8)" in again.stdout
    gen = run_cli("tpusft.generate", DEMO, f"base_output_directory={base}",
                  f"load_parameters_path={base}/gcs/checkpoints", "generate.prompt=1+2=",
                  "generate.max_decode_length=3", env={**gcs_emulator, "HOME": str(tmp_path)})
    assert gen.returncode == 0, gen.stderr[-3000:]


@pytest.mark.slow
def test_grpo_runs_resumes_and_exports(tmp_path):
    """GRPO on the demo task (a random model: wiring, not learning): per-step metrics,
    held-out accuracy, native checkpoints that resume and convert to HF."""
    args = ["configs/demo/grpo.yml", f"base_output_directory={tmp_path}",
            "load_parameters_path=", "global_batch_size=4", "grpo.num_generations=2",
            "grpo.max_completion_length=4", "grpo.eval_prompts=4", "eval_interval=2",
            "log_period=1",
            "checkpoint_period=2", "async_checkpointing=false", "grpo.beta=0.04", "run_name=g"]
    first = run_cli("tpusft.train_grpo", *args, "steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reference model: a frozen copy of the starting weights" in first.stdout
    assert re.search(r"held-out accuracy: [\d.]+% before -> [\d.]+% after", first.stdout)
    run = tmp_path / "g"
    assert (run / "checkpoints" / "actor" / "2" / "model_params").is_dir()

    second = run_cli("tpusft.train_grpo", *args, "steps=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 2" in second.stdout
    assert ("note: resuming with other optimizer settings than the run's last start (steps 2 "
            "-> 3): the schedule continues") in second.stdout, second.stdout[:3000]
    rows = read_jsonl(str(run / "metrics.jsonl"))
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert sorted(train) == [1, 2, 3]
    for r in train.values():
        for key in ("loss", "reward", "reward_std", "reward/answer_correct/mean",
                    "reward/answer_correct/std", "accuracy", "completion_length", "kl",
                    "clip_fraction", "rollout_tokens_per_s", "train_tokens_per_s"):
            assert key in r and np.isfinite(r[key]), (key, r)
    # The resumed run evaluates at its first step again; what the first run logged after
    # its checkpoint (its evaluation at step 2) is replaced, not repeated.
    assert sorted(r["step"] for r in rows if r["kind"] == "eval") == [0, 2, 3]
    assert (run / "loss_curve.png").stat().st_size > 1000
    # TensorBoard: every held-out evaluation, the final one included, and tpusft's names.
    from test_metrics import tensorboard_scalars

    tb = tensorboard_scalars(run / "tensorboard")
    evals = {r["step"]: r["accuracy"] for r in rows if r["kind"] == "eval"}
    assert tb["eval/heldout_accuracy"] == pytest.approx(evals)
    assert {"train/reward", "train/kl", "train/completion_length", "train/loss"} <= set(tb)
    assert not any(t.startswith(("jax/", "rewards/", "completions/", "actor/")) for t in tb)
    assert "Skipping non-TPU device" not in first.stderr + second.stderr

    from tpusft.conversion.cli import native_to_hf_main

    out = tmp_path / "hf"
    export = run_in_process(native_to_hf_main, str(run / "checkpoints"), str(out))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))



@pytest.mark.parametrize("body, message", [
    ("return [1 / 0 for _ in completions]", "reward function fn raised ZeroDivisionError"),
    ("return [1.0]", "reward function fn returned shape (1,) for 8 completions"),
])
def test_grpo_broken_reward_is_a_one_line_error(tmp_path, monkeypatch, body, message):
    from tpusft.train_grpo import main

    (tmp_path / "bad_reward.py").write_text(f"def fn(prompts, completions, **kw):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_reward", raising=False)
    proc = run_in_process(main, "configs/demo/grpo.yml", f"base_output_directory={tmp_path}",
                          "global_batch_size=8", "grpo.reward_functions=[bad_reward:fn]")
    _one_line_error(proc, message)


@pytest.mark.slow
def test_dpo_resumes_exactly_and_exports(tmp_path):
    """Preference training end to end: a full DPO run (reference: a frozen copy of its
    starting weights) killed after a checkpoint and resumed gives the uninterrupted run's
    per-step losses on the same batches; a LoRA DPO run (reference: the base) exports merged
    weights and a PEFT adapter."""
    common = ["configs/demo/dpo.yml", f"base_output_directory={tmp_path}", "global_batch_size=4",
              "eval_steps=1", "log_period=1", "async_checkpointing=false",
              "learning_rate=1e-3"]
    base = run_cli("tpusft.train_dpo", *common, "load_parameters_path=", "run_name=base",
                   "steps=2", "eval_interval=0")
    assert base.returncode == 0, base.stderr[-3000:]
    assert "reference model: a frozen copy of the starting weights" in base.stdout
    assert re.search(r"held-out reward accuracy: [\d.]+% at step 0 -> [\d.]+% at step 2",
                     base.stdout)
    args = [*common, f"load_parameters_path={tmp_path}/base/checkpoints/2", "steps=12",
            "checkpoint_period=4", "eval_interval=6"]
    full = run_cli("tpusft.train_dpo", *args, "run_name=full")
    assert full.returncode == 0, full.stderr[-3000:]

    ckpt = tmp_path / "cut" / "checkpoints" / "4"
    _kill_once_saved("tpusft.train_dpo", [*args, "run_name=cut"], ckpt,
                     dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    saved = sorted(int(p.name) for p in ckpt.parent.iterdir() if p.name.isdigit())
    assert saved and max(saved) < 12, "the run finished before it was killed"
    resumed = run_cli("tpusft.train_dpo", *args, "run_name=cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {max(saved)}" in resumed.stdout

    ref_rows = read_jsonl(str(tmp_path / "full" / "metrics.jsonl"))
    got_rows = read_jsonl(str(tmp_path / "cut" / "metrics.jsonl"))
    for key in ("loss", "batch_crc32", "reward_margin", "reward_accuracy"):
        ref, got = last_per_step(ref_rows, "train", key), last_per_step(got_rows, "train", key)
        assert list(ref) == list(range(1, 13)) and all(s in got for s in range(max(saved) + 1, 13))
        steps = sorted(got)
        np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    evals = [r for r in ref_rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all(0 <= r["reward_accuracy"] <= 1 and "reward_margin" in r for r in evals)
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(tmp_path / "full" / "tensorboard" / "events.out.tfevents.*"))
    board = EventAccumulator(events)
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracy", "train/rewards/margin",
            "train/log_probs/chosen", "train/tokens_per_sec", "eval/rewards/accuracy"} <= tags

    lora = run_cli("tpusft.train_dpo", *common, "run_name=lora", "steps=3", "eval_interval=2",
                   f"load_parameters_path={tmp_path}/base/checkpoints/2",
                   "lora.enable_lora=true", "lora.rank=4")
    assert lora.returncode == 0, lora.stderr[-3000:]
    assert "reference model: the base weights (shared with the model)" in lora.stdout
    # Held-out figures before training, every eval_interval steps and after the last step.
    lora_rows = read_jsonl(str(tmp_path / "lora" / "metrics.jsonl"))
    assert [r["step"] for r in lora_rows if r["kind"] == "eval"] == [0, 2, 3]
    from tpusft.conversion.cli import native_to_hf_main

    out = tmp_path / "hf"
    export = run_in_process(native_to_hf_main, str(tmp_path / "lora" / "checkpoints"), str(out))
    assert export.returncode == 0, export.stderr[-3000:]
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
