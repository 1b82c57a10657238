"""One run over several real processes: jax.distributed on localhost, gloo collectives, two
processes of 4 simulated CPU devices each, fsdp over all 8.

Each test starts the processes as a user would on the hosts of a pod slice (the same command
with coordinator_address, num_processes and process_id) and checks the run against a one-process
run on 8 devices, or against itself resumed."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, free_port, run_cli
from safetensors.numpy import load_file

from tpusft.training.checkpoints import PER_PROCESS_KEY
from tpusft.training.metrics import read_jsonl

pytestmark = pytest.mark.slow

# The demo's tiny model on 8 x 64-token batches; a constant learning rate, so that a run cut
# in two takes the steps of one run of the same length.
SFT = ["configs/demo/sft.yml", "global_batch_size=8", "max_target_length=64", "log_period=1",
       "eval_interval=0", "warmup_steps_fraction=0", "learning_rate_final_fraction=1.0",
       "checkpoint_period=2", "max_num_checkpoints_to_keep=3", "distributed_timeout_s=30"]


class Run:
    """The processes of one multi-process run; each one's output goes to its own file."""

    def __init__(self, module: str, args: list[str], tmp: Path, name: str, n: int = 2):
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
        self.logs = [tmp / f"{name}.process{i}.log" for i in range(n)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", module, *args, f"coordinator_address=127.0.0.1:{port}",
                     f"num_processes={n}", f"process_id={i}"],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                raise AssertionError("a process did not end in time:\n" + self.tails()) from None
        return codes

    def wait_for(self, i: int, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(pattern, self.output(i), re.M)
            if found:
                return found
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in process {i}'s output:\n" + self.tails())

    def tails(self) -> str:
        return "\n".join(f"--- process {i}\n{self.output(i)[-3000:]}"
                         for i in range(len(self.logs)))

    def succeed(self, timeout: float = 600) -> str:
        """Waits for a run that should succeed; process 0's output."""
        assert self.wait(timeout) == [0] * len(self.procs), self.tails()
        return self.output(0)


def _losses(run: Path) -> dict[int, float]:
    records = [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _eval_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(str(run / "metrics.jsonl")) if r["kind"] == "eval"]


def _one_process(*args: str) -> subprocess.CompletedProcess:
    done = run_cli("tpusft.train_sft", *SFT, *args,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _restore(checkpoint: Path) -> dict[str, np.ndarray]:
    """A checkpoint step's model weights, restored onto this process's 8-device mesh."""
    import jax
    from flax import nnx

    from tpusft.conversion.native import restore_params
    from tpusft.config import load_config
    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import mesh_of

    cfg = load_config([*SFT, "demo_task=", "hf_path=json", "hf_data_files=unused.jsonl",
                       "tokenizer_path=unused"])
    mesh = mesh_of(cfg)
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, seed=1)
        restore_params(model, str(checkpoint))
        leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        return {jax.tree_util.keystr(p).replace(".value", ""): np.asarray(x) for p, x in leaves}


def _to_hf(checkpoint: Path, out: Path) -> dict[str, np.ndarray]:
    done = subprocess.run([sys.executable, "tools/convert_checkpoint/native_to_hf.py",
                           str(checkpoint), str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_two_processes_train_as_one_and_their_checkpoint_restores_and_converts(tmp_path):
    """data_sharding=global: each process builds the whole batch and feeds its rows, so the
    2-process run takes the 1-process run's steps, loss for loss; its checkpoint (shards from
    both processes) resumes in one process at the same data position and converts to HF."""
    base = f"base_output_directory={tmp_path}"
    evals = ("eval_interval=2", "eval_steps=2")
    _one_process(base, "run_name=one", "steps=6", *evals)
    ref = _losses(tmp_path / "one")

    two = Run("tpusft.train_sft", [*SFT, base, "run_name=two", "steps=4",
                                   "data_sharding=global", *evals], tmp_path, "two")
    out = two.succeed()
    assert "on 8 cpu device(s) in 2 processes" in out
    assert re.search(r"^step +4/4 \| loss", out, re.M)
    assert not re.search(r"^(\[process 1\] )?step ", two.output(1), re.M), two.output(1)
    got = _losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)],
                               rtol=2e-5)

    # evaluations: the same held-out losses, each process's eval rows its part of the batch
    got_evals, ref_evals = _eval_losses(tmp_path / "two"), _eval_losses(tmp_path / "one")
    assert len(got_evals) == 3  # before training, steps 2 and 4
    np.testing.assert_allclose(got_evals, ref_evals[:3], rtol=2e-5)

    resumed = _one_process(base, "run_name=two", "steps=6", *evals)
    assert "resuming from step 4" in resumed.stdout
    assert "data starts again" not in resumed.stdout  # one position serves any count
    got = _losses(tmp_path / "two")
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                               rtol=2e-5)

    # Restored in this one process (8 devices), the weights the two processes wrote are the
    # one-process run's, up to float32 reduction order (its Adam steps are 1e-3 here).
    written_by_two = _restore(tmp_path / "two" / "checkpoints" / "4")
    written_by_one = _restore(tmp_path / "one" / "checkpoints" / "4")
    assert sorted(written_by_two) == sorted(written_by_one) and written_by_two
    for name, value in written_by_one.items():
        np.testing.assert_allclose(written_by_two[name], value, rtol=2e-5, atol=1e-5,
                                   err_msg=name)
    converted = _to_hf(tmp_path / "two" / "checkpoints" / "4", tmp_path / "hf")
    np.testing.assert_allclose(converted["model.norm.weight"],
                               written_by_two["['decoder']['decoder_norm']['scale']"], rtol=1e-6)
    # every weight converted (the native layers are stacked, HF's one tensor per layer)
    assert sum(x.size for x in converted.values()) == sum(
        x.size for x in written_by_two.values())


def test_processes_reading_their_own_rows_resume_exactly(tmp_path):
    """data_sharding=process: each process reads its own half of the rows. Resumed on 2
    processes from its step-2 checkpoint (and on a dcn x ici mesh), a run takes its own
    steps 3 and 4 again, batch for batch (each process's data position is in the checkpoint);
    on 1 process it restores the model and optimizer and says that the data starts its epoch
    again."""
    run = Run("tpusft.train_sft", [*SFT, f"base_output_directory={tmp_path}", "run_name=whole",
                                   "steps=4"], tmp_path, "whole")
    run.succeed()
    from orbax.checkpoint import CheckpointManager

    meta = CheckpointManager(tmp_path / "whole" / "checkpoints").metadata(2).custom_metadata
    positions = meta["tpusft_data_state"][PER_PROCESS_KEY]
    assert len(positions) == 2
    assert meta["tpusft_data_processes"] == 2

    cut = tmp_path / "cut"  # the same run as if it had been stopped after step 2's checkpoint
    shutil.copytree(tmp_path / "whole", cut / "whole")
    shutil.rmtree(cut / "whole" / "checkpoints" / "4")
    base = f"base_output_directory={cut}"
    # resumed on another mesh layout: fsdp as 2 (processes) x 4 (devices), dcn x ici
    again = Run("tpusft.train_sft", [*SFT, base, "run_name=whole", "steps=4",
                                     "dcn_fsdp_parallelism=2", "ici_fsdp_parallelism=4"],
                tmp_path, "again")
    assert "resuming from step 2" in again.succeed()
    ref = [r for r in read_jsonl(str(tmp_path / "whole" / "metrics.jsonl"))
           if r["kind"] == "train"]
    got = [r for r in read_jsonl(str(cut / "whole" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["batch_crc32"] for r in got] == [r["batch_crc32"] for r in ref]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=2e-5)

    alone = _one_process(base, "run_name=whole", "steps=5")
    assert ("checkpoint step 4 holds the data positions of 2 processes each reading its own "
            "rows, this run has one process: model and optimizer are restored, the data starts "
            "again at the beginning of its first epoch") in alone.stdout, alone.stdout
    assert sorted(_losses(cut / "whole")) == [1, 2, 3, 4, 5]


def test_a_signal_to_one_process_stops_both_and_a_killed_process_stops_the_other(tmp_path):
    """SIGTERM to one process: both finish the same step, save one checkpoint and exit 0.
    SIGKILL to one: the other ends within the heartbeat timeout with one line that says so
    (JAX's runtime would only abort with a stack trace)."""
    args = [*SFT, f"base_output_directory={tmp_path}", "run_name=r", "steps=100000",
            "checkpoint_period=100000"]
    run = Run("tpusft.train_sft", args, tmp_path, "signalled")
    run.wait_for(0, r"^step +3/")
    run.procs[1].send_signal(signal.SIGTERM)
    assert run.wait(timeout=180) == [0, 0], run.tails()
    saved = re.findall(r"checkpoint of step (\d+) saved", run.output(0))
    assert len(saved) == 1 and "a signal to another process of the run" in run.output(0), \
        run.tails()
    step = int(saved[0])
    assert (tmp_path / "r" / "checkpoints" / str(step) / "model_params").is_dir()

    run = Run("tpusft.train_sft", args, tmp_path, "killed")
    run.wait_for(0, rf"resuming from step {step}\b")
    run.wait_for(0, rf"^step +{step + 2}/")
    started = time.time()
    run.procs[1].kill()  # the supervising parent: its worker dies with it
    codes = run.wait(timeout=150)
    assert codes[0] == 1, run.tails()
    assert time.time() - started < 120
    last = run.output(0).strip().splitlines()[-1]
    assert last.startswith("error: process 0 of the run ended by SIG"), run.tails()
    assert "another process of the run stopped or lost contact" in last
    assert (tmp_path / "r" / "checkpoints" / str(step)).is_dir()  # what was saved stays


def test_grpo_runs_on_two_processes(tmp_path):
    args = ["configs/demo/grpo.yml", f"base_output_directory={tmp_path}",
            "load_parameters_path=", "global_batch_size=8", "grpo.num_generations=2",
            "grpo.max_completion_length=4", "grpo.eval_prompts=4", "eval_interval=2",
            "log_period=1",
            "checkpoint_period=2", "async_checkpointing=false", "run_name=g", "steps=2"]
    out = Run("tpusft.train_grpo", args, tmp_path, "grpo").succeed()
    assert "in 2 processes" in out
    assert re.search(r"^step 2/2 \| loss", out, re.M), out
    assert re.search(r"held-out accuracy: [\d.]+% before -> [\d.]+% after", out)
    rows = read_jsonl(str(tmp_path / "g" / "metrics.jsonl"))
    assert sorted(r["step"] for r in rows if r["kind"] == "train") == [1, 2]
    assert (tmp_path / "g" / "checkpoints" / "actor" / "2" / "model_params").is_dir()
