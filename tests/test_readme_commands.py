"""The README's commands run as written from a clone after the quick start.

Every command in the README's ```bash blocks is checked: it calls the project's environment
(`.venv/bin/python`), the files and modules it names exist, and its config and `key=value`
overrides load against the schema (flags: the script's --help lists them). Then the commands
that name nothing a user must supply run in README order in a scratch copy of the clone's
layout: the quick start's supervised demo as written, in full (and it must learn), the
sampling and conversion commands as written, and each later act with a few overrides
appended that shorten it. A renamed config, key, flag, script or output path fails here.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tpusft.config import load_config
from tpusft.conversion.gguf_export import QUANTS
from tpusft.training.metrics import last_per_step, read_jsonl

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Words that mark a command as the user's own (a model, bucket or file they supply).
PLACEHOLDERS = ("/path/to/", "gs://my-bucket", "meta-llama/", "HuggingFaceH4/", "HF_OUT",
                " OUT", "[--", "data/train.jsonl", "runs/my-sft")
# What each act's command gets appended to run in seconds (the supervised demo that the acts
# start from runs as written, in full).
SHORTER = {
    "configs/demo/sft_lora.yml": ["steps=4", "checkpoint_period=2", "eval_interval=4",
                                  "eval_steps=1", "log_period=2"],
    "configs/demo/grpo.yml": ["steps=2", "eval_interval=0", "grpo.eval_prompts=8",
                              "global_batch_size=8", "log_period=1"],
    "configs/demo/dpo.yml": ["steps=2", "eval_interval=2", "eval_steps=1", "log_period=1"],
}
# Exit codes a command may end with: a compile-only run exits 1 when the step does not fit.
EXITS = {"compile_topology=": (0, 1)}
SKIPPED = ("tools/setup/setup.sh", "-m pytest")  # the install and the suite: what CI runs
REMOTE = ("gcloud", "xpk")  # launchers that run a --command on every host of a TPU pod
# Commands that need an optional extra: run when it is installed (CI installs it).
EXTRA = {"native_to_gguf.py": "llama_cpp", ".gguf configs/": "llama_cpp",
         "tpusft.demo.export_score": "torch", "compile_topology=": "libtpu"}


def readme_commands() -> list[tuple[int, str]]:
    """(line number, command) of every command in the README's bash blocks; continuation
    lines joined, comments dropped, `a && b` split in two."""
    out, block, pending, start = [], False, "", 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        text = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not text.strip() and not pending:
            continue
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        command, pending = (pending + text).strip(), ""
        out.extend((start, part) for part in _split_and(command))
    return out


def _split_and(command: str) -> list[str]:
    """`a && b` -> [a, b]; an `&&` inside quotes (a pod's --command) stays where it is."""
    parts, words = [], []
    for word in shlex.split(command):
        if word == "&&":
            parts.append(shlex.join(words))
            words = []
        else:
            words.append(word)
    return [*parts, shlex.join(words)]


def _argv(command: str) -> list[str]:
    return shlex.split(command)


def _is_placeholder(command: str) -> bool:
    return any(p in f" {command}" for p in PLACEHOLDERS)


def test_readme_has_the_commands_this_test_walks():
    commands = [c for _, c in readme_commands()]
    assert any("tpusft.train_sft configs/demo/sft.yml" in c for c in commands)
    assert any("tpusft.train_grpo configs/demo/grpo.yml" in c for c in commands)
    assert len(commands) >= 10, commands


@pytest.mark.parametrize("line, command", readme_commands(),
                         ids=[f"line{n}" for n, _ in readme_commands()])
def test_each_readme_command_names_what_exists(line, command):
    argv = _argv(command)
    if argv[0] in REMOTE:  # the command each host of a pod runs: checked as the others are
        for part in _split_and(argv[argv.index("--command") + 1]):
            if not part.startswith("cd "):
                test_each_readme_command_names_what_exists(line, part)
        return
    assert argv[0] in (".venv/bin/python", "bash"), (
        f"README line {line}: {command!r} must call .venv/bin/python (the quick start's "
        f"environment), not {argv[0]!r}")
    if argv[0] == "bash":
        assert (REPO / argv[1]).is_file(), f"README line {line}: no {argv[1]}"
        return
    if argv[1] == "-m":
        module = argv[2]
        if module == "pytest":
            return
        assert module.startswith("tpusft."), f"README line {line}: module {module}"
        rel = module.replace(".", "/")
        assert ((REPO / "src" / f"{rel}.py").is_file()
                or (REPO / "src" / rel / "__main__.py").is_file()), f"README line {line}"
        config_args = argv[3:]
        if module in ("tpusft.train_sft", "tpusft.train_grpo", "tpusft.train_dpo",
                      "tpusft.generate"):
            load_config(config_args)  # unknown keys, wrong types, missing configs raise
        return
    script = REPO / argv[1]
    assert script.is_file(), f"README line {line}: no {argv[1]}"
    flags = [a.strip("[]") for a in argv[2:] if a.lstrip("[").startswith("--")]
    if flags:
        helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
        assert helptext.returncode == 0, helptext.stderr[-2000:]
        for flag in flags:
            assert flag in helptext.stdout, f"README line {line}: {script.name} has no {flag}"


def _runnable() -> list[tuple[int, str]]:
    return [(n, c) for n, c in readme_commands()
            if not _is_placeholder(c) and not any(s in c for s in SKIPPED)]


def _every_quantization(runnable: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The README's q4_k_m export and score commands, then the same two for each other
    quantization the export offers (QUANTS), so every kind of file is scored on the demo."""
    shown = [(n, c) for n, c in runnable if ".q4_k_m.gguf" in c]
    if not shown:
        return runnable
    at = runnable.index(shown[-1]) + 1
    more = [(n, c.replace("q4_k_m", q)) for q in QUANTS if q != "q4_k_m" for n, c in shown]
    return runnable[:at] + more + runnable[at:]


def _clone_layout(work: Path) -> None:
    """What a clone after the quick start has where the README's commands look."""
    for name in ("configs", "tools", "benchmarks", "src"):
        (work / name).symlink_to(REPO / name)
    (work / ".venv").symlink_to(Path(sys.prefix))


def _check_the_demo_learned(result, run: Path) -> None:
    found = re.search(r"exact match: ([\d.]+)% before training -> ([\d.]+)% after",
                      result.stdout)
    assert found, result.stdout[-2000:]
    before, after = float(found.group(1)), float(found.group(2))
    assert after >= before + 30, result.stdout[-2000:]
    losses = last_per_step(read_jsonl(str(run / "metrics.jsonl")), "train", "loss")
    assert losses[max(losses)] < losses[1] / 3, losses
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert glob.glob(str(run / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True)
    meta = json.loads((run / "checkpoints" / "600" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"]["tpusft_data_state"]
    assert (run / "checkpoints" / "200" / "model_params").is_dir()  # where the acts start


def _check_export_scores(stdout: str, quantized: bool) -> None:
    """The export (GGUF in llama.cpp, or HF in plain transformers generate) scores what
    tpusft.generate scores on the checkpoint it came from; a 4-bit file still answers,
    within 5 points of it."""
    found = re.search(r"tpusft.generate ([\d.]+)%, (llama.cpp|transformers) \(.*\) ([\d.]+)%; "
                      r"identical answers (\d+)/(\d+)", stdout)
    assert found, stdout[-2000:]
    if quantized:
        assert float(found.group(3)) >= float(found.group(1)) - 5, stdout[-2000:]
    else:
        assert found.group(1) == found.group(3), stdout[-2000:]


def _check_gguf_name(command: str, cwd: Path) -> None:
    """A run's export is named after the run (general.name), not "checkpoints"."""
    import gguf

    argv = _argv(command)
    field = gguf.GGUFReader(str(cwd / argv[3])).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == argv[2].split("/")[1], command


@pytest.mark.slow
def test_the_readme_demo_commands_run_as_written(tmp_path):
    """The quick start's demo runs as written and learns; then every other command that
    needs nothing of the user's runs in README order (the acts shortened; the q4_k_m export
    and its score repeated for every other quantization)."""
    runnable = _every_quantization(_runnable())
    names = [_argv(c)[3] if _argv(c)[1] == "-m" else _argv(c)[1] for _, c in runnable]
    assert names[0] == "configs/demo/sft.yml", runnable  # the quick start's, first
    assert {"configs/demo/grpo.yml", "configs/demo/sft_lora.yml",
            "tools/convert_checkpoint/native_to_hf.py"} <= set(names), runnable
    _clone_layout(tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done: set[str] = set()
    for (line, command), name in zip(runnable, names, strict=True):
        if command in done:  # the acts repeat "the supervised demo first"
            continue
        if any(k in command and importlib.util.find_spec(m) is None for k, m in EXTRA.items()):
            continue
        done.add(command)
        result = subprocess.run(_argv(command) + SHORTER.get(name, []), cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode in next((c for k, c in EXITS.items() if k in command), (0,)), (
            f"README line {line}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        if name == "configs/demo/sft.yml" and "tpusft.train_sft" in command:
            _check_the_demo_learned(result, tmp_path / "runs" / "demo-sft")
        if "tpusft.demo.export_score" in command:
            _check_export_scores(result.stdout, any(f".{q}.gguf" in command for q in QUANTS))
        if "native_to_gguf.py runs/" in command:
            _check_gguf_name(command, tmp_path)
        if "compile_topology=" in command:
            assert "per chip: parameters" in result.stdout, result.stdout[-2000:]
        if "tpusft.generate" in command and 'generate.prompt="12+30="' in command:
            assert "42" in result.stdout, result.stdout[-1000:]
