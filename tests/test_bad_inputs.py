"""The bad-input catalogue: every command meets each bad input with one `error:` line that
names what is wrong, exit code 2, no traceback, and writes nothing outside its output."""

import json
import os
import re
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_in_process

# Its module-scoped fixtures are built once: every test of this file in one xdist worker.
pytestmark = pytest.mark.xdist_group("bad-inputs-world")

DEMO = "configs/demo/sft.yml"
SMALL = ["global_batch_size=8", "max_target_length=64", "eval_steps=1", "log_period=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_assets):
    """Files the cases point at: a trained run to resume, an HF export, odd paths."""
    root = tmp_path_factory.mktemp("bad")
    run = run_cli("tpusft.train_sft", DEMO, f"base_output_directory={root}", *SMALL, "steps=2",
                  "run_name=done")
    assert run.returncode == 0, run.stderr[-3000:]
    export = root / "hf"
    conv = _convert(["native_to_hf", str(root / "done" / "checkpoints"), str(export)])
    assert conv.returncode == 0, conv.stderr[-3000:]
    import shutil
    import struct

    for name in ("truncated", "bad-header", "absurd-header", "no-config"):
        shutil.copytree(export, root / name)
    weights = "model.safetensors"
    data = (root / "truncated" / weights).read_bytes()
    (root / "truncated" / weights).write_bytes(data[:len(data) // 2])
    (root / "bad-header" / weights).write_bytes(data[:8] + b"garbage!!!!!" + data[20:])
    (root / "absurd-header" / weights).write_bytes(struct.pack("<Q", 2**62) + data[8:])
    (root / "no-config" / "config.json").unlink()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("mine")
    (root / "latin1.yml").write_bytes("steps: 3 # r\xe9sum\xe9\n".encode("latin-1"))
    (root / "list.yml").write_text("- a\n- b\n")
    (root / "bad.yml").write_text("steps: [\n")
    (root / "dup.yml").write_text(f"base_config: {REPO}/{DEMO}\nsteps: 3\nseed: 1\nsteps: 5\n")
    (root / "a_file").write_text("not a directory")
    (root / "empty.jsonl").write_text("")
    (root / "cols.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    (root / "somedir").mkdir()
    return {"root": root, "assets": demo_assets, "export": export}


def _convert(argv):
    script = {"native_to_hf": "native_to_hf.py", "hf_to_native": "hf_to_native.py"}[argv[0]]
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint" / script),
                           *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=env)


def _main(command):
    if command == "sft":
        from tpusft.train_sft import main
    elif command == "dpo":
        from tpusft.train_dpo import main
    elif command == "grpo":
        from tpusft.train_grpo import main
    elif command == "generate":
        from tpusft.generate import main
    elif command == "data":
        from tpusft.data.inspect import main
    elif command == "hf_to_native":
        from tpusft.conversion.cli import hf_to_native_main as main
    else:
        from tpusft.conversion.cli import native_to_hf_main as main
    return main


def _demo_data(w, name="train.jsonl"):
    return str(w["assets"] / name)


# (id, command, args from the world, fragment of the error line)
CASES = [
    # --- config files and keys
    ("config-missing", "sft", lambda w: [str(w["root"] / "none.yml")], "config file not found"),
    ("config-is-dir", "sft", lambda w: [str(w["root"] / "somedir")], "is a directory"),
    ("config-not-utf8", "sft", lambda w: [str(w["root"] / "latin1.yml")], "is not UTF-8"),
    ("config-bad-yaml", "sft", lambda w: [str(w["root"] / "bad.yml")], "invalid YAML"),
    ("config-duplicate-key", "sft", lambda w: [str(w["root"] / "dup.yml")],
     "line 4, column 1: key 'steps' appears twice (lines 2 and 4); keep one"),
    ("config-not-mapping", "sft", lambda w: [str(w["root"] / "list.yml")],
     "must hold a mapping"),
    ("no-config", "sft", lambda w: ["steps=3"], "usage: CONFIG.yml"),
    ("unknown-key", "sft", lambda w: [DEMO, "stepz=3"], "did you mean steps"),
    ("not-key-value", "sft", lambda w: [DEMO, "steps"], "is not key=value"),
    ("wrong-type", "sft", lambda w: [DEMO, "steps=many"], "has the wrong type"),
    ("too-small", "sft", lambda w: [DEMO, "steps=0"], "too small"),
    ("bad-choice", "sft", lambda w: [DEMO, "packing_strategy=zigzag"], "is not allowed"),
    ("lr-nan", "sft", lambda w: [DEMO, "learning_rate=nan"], "not a finite number"),
    ("lr-inf", "sft", lambda w: [DEMO, "learning_rate=inf"], "not a finite number"),
    ("lr-negative", "sft", lambda w: [DEMO, "learning_rate=-1e-4"], "too small"),
    ("beta1-one", "sft", lambda w: [DEMO, "adam_b1=1.0"], "must be in [0, 1)"),
    ("beta2-above", "sft", lambda w: [DEMO, "adam_b2=1.5"], "must be in [0, 1)"),
    ("eps-nan", "sft", lambda w: [DEMO, "adam_eps=nan"], "not a finite number"),
    ("batch-accumulation", "sft", lambda w: [DEMO, "global_batch_size=7",
                                             "gradient_accumulation_steps=2"], "not divisible"),
    ("unknown-model", "sft", lambda w: [DEMO, "model_name=llama9-1t"], "unknown model_name"),
    ("run-name-parent", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                          "run_name=../escaped"], "plain folder name"),
    ("run-name-absolute", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                            f"run_name={w['root']}/abs"], "plain folder name"),
    ("run-name-nested", "sft", lambda w: [DEMO, "run_name=a/b"], "plain folder name"),
    ("run-name-dotdot", "sft", lambda w: [DEMO, "run_name=.."], "plain folder name"),
    ("run-name-home", "sft", lambda w: [DEMO, "run_name=~x"], "plain folder name"),
    # --- data and tokenizer
    ("data-missing", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                       f"hf_data_files={w['root']}/none.jsonl",
                                       f"tokenizer_path={w['assets']}/tokenizer"],
     "no file matches"),
    ("data-empty", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                     f"hf_data_files={w['root']}/empty.jsonl",
                                     f"tokenizer_path={w['assets']}/tokenizer"],
     "cannot load data set"),
    ("eval-empty", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                     f"hf_data_files={_demo_data(w)}",
                                     f"hf_eval_files={w['root']}/empty.jsonl",
                                     f"tokenizer_path={w['assets']}/tokenizer"],
     "hf_eval_files="),
    ("data-is-dir", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                      f"hf_data_files={w['root']}/somedir",
                                      f"tokenizer_path={w['assets']}/tokenizer"], "somedir"),
    ("data-column", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                      f"hf_data_files={w['root']}/cols.jsonl",
                                      "data_format=messages",
                                      f"tokenizer_path={w['assets']}/tokenizer"],
     "has no column 'messages'"),
    ("local-dataset-missing", "sft", lambda w: [DEMO, "demo_task=",
                                                f"hf_path={w['root']}/no-such-set",
                                                f"tokenizer_path={w['assets']}/tokenizer"],
     "does not exist"),
    ("tokenizer-missing", "sft", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                            f"hf_data_files={_demo_data(w)}",
                                            "tokenizer_path=/no/such/tokenizer"],
     "cannot load a tokenizer"),
    ("no-hf-path", "sft", lambda w: [DEMO, "demo_task="], "hf_path is empty"),
    ("huge-sequences", "sft", lambda w: [DEMO, "max_target_length=4000000000"],
     "out of host memory: Unable to allocate"),
    # --- weights and outputs
    ("weights-missing", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                          f"load_parameters_path={w['root']}/no-ckpt"],
     "does not exist"),
    ("weights-a-file", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                         f"load_parameters_path={w['root']}/a_file"],
     "a_file"),
    ("output-is-file", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}/a_file"],
     "cannot write"),
    ("output-read-only", "sft", lambda w: [DEMO, "base_output_directory=/proc/tpusft-runs"],
     "cannot write"),
    ("resume-other-shape", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                             *SMALL, "steps=4", "run_name=done",
                                             "base_mlp_dim=96"], "shape"),
    ("resume-other-batch", "sft", lambda w: [DEMO, f"base_output_directory={w['root']}",
                                             "global_batch_size=16", "max_target_length=64",
                                             "steps=4", "run_name=done"],
     "was written with global_batch_size=8"),
    # --- the other commands
    ("dpo-smoothing", "dpo", lambda w: ["configs/demo/dpo.yml", "dpo.label_smoothing=0.5"],
     "must be below 0.5"),
    ("dpo-sft-rows", "dpo", lambda w: ["configs/demo/dpo.yml", f"base_output_directory="
                                       f"{w['root']}", "hf_path=json",
                                       f"hf_data_files={_demo_data(w)}"], "chosen"),
    ("grpo-unknown-reward", "grpo", lambda w: ["configs/demo/grpo.yml",
                                               f"base_output_directory={w['root']}",
                                               "grpo.reward_functions=[no_such_reward]"],
     "no_such_reward"),
    ("grpo-run-name", "grpo", lambda w: ["configs/demo/grpo.yml", "run_name=../x"],
     "plain folder name"),
    ("generate-no-prompt", "generate", lambda w: [DEMO], "generate.prompt is empty"),
    ("generate-no-weights", "generate", lambda w: [DEMO, "generate.prompt=1+1="],
     "load_parameters_path is empty"),
    ("generate-weights-missing", "generate", lambda w: [DEMO, "generate.prompt=1+1=",
                                                        f"base_output_directory={w['root']}",
                                                        f"load_parameters_path={w['root']}/x"],
     "does not exist"),
    ("generate-prompt-too-long", "generate", lambda w: [
        DEMO, "generate.prompt=" + "12+30=" * 100, f"base_output_directory={w['root']}",
        f"load_parameters_path={w['root']}/done/checkpoints"],
     "more than generate.max_prefill_length=256"),
    ("inspect-unknown-key", "data", lambda w: [DEMO, "truncaton=left"],
     "did you mean truncation"),
    ("inspect-data-missing", "data", lambda w: [DEMO, "demo_task=", "hf_path=json",
                                                f"hf_data_files={w['root']}/none.jsonl",
                                                f"tokenizer_path={w['assets']}/tokenizer"],
     "no file matches"),
    ("to-native-missing", "hf_to_native", lambda w: [f"{w['root']}/no-model",
                                                     f"{w['root']}/out1"], "no-model"),
    ("to-native-truncated", "hf_to_native", lambda w: [str(w["root"] / "truncated"),
                                                       f"{w['root']}/o5"],
     "is not a readable safetensors file (Error while deserializing header: incomplete"),
    ("to-native-bad-header", "hf_to_native", lambda w: [str(w["root"] / "bad-header"),
                                                        f"{w['root']}/o6"],
     "invalid JSON in header"),
    ("to-native-absurd-header", "hf_to_native", lambda w: [str(w["root"] / "absurd-header"),
                                                           f"{w['root']}/o7"],
     "header too large"),
    ("to-native-no-config", "hf_to_native", lambda w: [str(w["root"] / "no-config"),
                                                       f"{w['root']}/o8"], "has no config.json"),
    ("to-native-nonempty", "hf_to_native", lambda w: [str(w["export"]),
                                                      f"{w['root']}/nonempty"], "not empty"),
    ("to-native-bad-flag", "hf_to_native", lambda w: [str(w["export"]), f"{w['root']}/o2",
                                                      "--save_dtype=int3"], "invalid choice"),
    ("to-native-output-file", "hf_to_native", lambda w: [str(w["export"]),
                                                         f"{w['root']}/a_file"], "a_file"),
    ("to-hf-missing", "native_to_hf", lambda w: [f"{w['root']}/no-ckpt", f"{w['root']}/o3"],
     "no-ckpt"),
    ("to-hf-not-a-checkpoint", "native_to_hf", lambda w: [f"{w['root']}/somedir",
                                                          f"{w['root']}/o9"],
     "is not a native checkpoint"),
    ("to-hf-nonempty", "native_to_hf", lambda w: [f"{w['root']}/done/checkpoints",
                                                  f"{w['root']}/nonempty"], "not empty"),
    ("to-hf-bad-shard", "native_to_hf", lambda w: [f"{w['root']}/done/checkpoints",
                                                   f"{w['root']}/o4", "--max_shard_size_mb=x"],
     "invalid int value"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, world, tmp_path):
    name, command, make_args, fragment = case
    before = sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*"))
    siblings = sorted(world["root"].parent.iterdir())
    args = make_args(world)
    if command in ("sft", "dpo", "grpo", "generate", "data") and not any(
            a.startswith("base_output_directory=") for a in args):
        args.append(f"base_output_directory={world['root']}")
    proc = run_in_process(_main(command), *args)
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:], proc.stdout[-500:])
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, (name, last)
    # Nothing outside base_output_directory, nothing in it lost.
    assert sorted(world["root"].parent.iterdir()) == siblings, name
    after = {p.relative_to(world["root"]) for p in world["root"].rglob("*")}
    assert set(before) <= after, (name, set(before) - after)
    assert (world["root"] / "nonempty" / "keep.txt").read_text() == "mine"


def test_the_catalogue_is_large():
    assert len(CASES) >= 40
    assert {c[1] for c in CASES} == {"sft", "dpo", "grpo", "generate", "data", "hf_to_native",
                                     "native_to_hf"}


def test_a_real_process_prints_the_same_line(world):
    proc = run_cli("tpusft.train_sft", DEMO, "run_name=../../outside")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run_name=")
    assert not (Path(REPO).parent / "outside").exists()


HELPED = ["tpusft.train_sft", "tpusft.train_dpo", "tpusft.train_grpo", "tpusft.generate",
          "tpusft.data", "tpusft.config", "tpusft.demo.export_score"]


@pytest.mark.parametrize("command", HELPED)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0(command, flag):
    """-h/--help, alone or after a config: usage, where every key is documented, the main
    keys with their meaning and the exit codes; nothing is read or run."""
    from tpusft import usage

    for args in ([flag], ["configs/demo/sft.yml", "steps=3", flag]):
        proc = run_cli(command, *args)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
        assert proc.stdout.startswith(f"usage: python -m {command} "), proc.stdout[:300]
        if command in usage.COMMANDS:
            assert "configs/base.yml" in proc.stdout and "exit codes: 0" in proc.stdout
            for key in usage.COMMANDS[command][2]:
                assert f"\n  {key} " in proc.stdout, key


@pytest.mark.parametrize("tool", ["hf_to_native", "native_to_hf", "native_to_gguf"])
def test_converters_print_usage(tool):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, f"tools/convert_checkpoint/{tool}.py", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def _unusable(tmp_path: Path, assets: Path, kind: str) -> list[str]:
    """Data (and a tokenizer) of which no row can be trained on, in one way each."""
    import shutil

    def chat(messages):
        return {"messages": messages}

    tokenizer = assets / "tokenizer"
    files = {"train": tmp_path / "train.jsonl"}
    extra = []
    if kind == "parquet-types":  # conversations that are lists of numbers
        import pyarrow as pa
        import pyarrow.parquet as pq

        files["train"] = tmp_path / "train.parquet"
        pq.write_table(pa.table({"messages": [[i, i + 1] for i in range(30)]}), files["train"])
        return [f"hf_data_files={files['train']}", "hf_path=parquet", "data_format=messages",
                f"tokenizer_path={tokenizer}"]
    if kind == "system-only":
        rows = [chat([{"role": "system", "content": f"be brief {i}"}]) for i in range(30)]
    elif kind == "empty-assistant":
        rows = [chat([{"role": "user", "content": f"{i}+1="},
                      {"role": "assistant", "content": ""}]) for i in range(30)]
    elif kind == "too-long":
        rows = [chat([{"role": "user", "content": "1+1= " * 200},
                      {"role": "assistant", "content": "2"}]) for _ in range(30)]
        extra = ["max_target_length=16", "truncation=drop"]
    elif kind == "template-raises":
        rows = [chat([{"role": "user", "content": f"{i}+1="},
                      {"role": "assistant", "content": str(i + 1)}]) for i in range(30)]
        tokenizer = tmp_path / "tokenizer"
        shutil.copytree(assets / "tokenizer", tokenizer)
        (tokenizer / "chat_template.jinja").write_text("{{ raise_exception('no roles') }}")
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"hf_data_files={files['train']}", "hf_path=json", f"tokenizer_path={tokenizer}",
            *extra]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["parquet-types", "system-only", "empty-assistant",
                                  "too-long", "template-raises"])
@pytest.mark.parametrize("command", ["data", "sft"])
def test_data_with_no_usable_row_ends_with_the_skip_reasons(tmp_path, demo_assets, kind,
                                                            command):
    """Every row rejected: one line naming the reasons and counts, exit 2, in seconds (the
    repeated training data looked for a usable row for ever)."""
    args = _unusable(tmp_path, demo_assets, kind)
    started = time.time()
    proc = run_in_process(_main(command), DEMO, "demo_task=", f"base_output_directory={tmp_path}",
                          *args)
    assert proc.returncode == 2, (proc.stderr[-2000:], proc.stdout[-1000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"(none of its 30 rows is usable|all 30 rows were skipped): 30 x ", last), \
        last
    assert time.time() - started < 120


def test_an_eval_file_with_no_usable_row_names_its_reasons(tmp_path, demo_assets):
    args = _unusable(tmp_path, demo_assets, "system-only")
    (tmp_path / "train.jsonl").rename(tmp_path / "eval.jsonl")
    proc = run_in_process(_main("sft"), DEMO, "demo_task=", f"base_output_directory={tmp_path}",
                          "hf_path=json", f"hf_data_files={_demo_data({'assets': demo_assets})}",
                          f"hf_eval_files={tmp_path / 'eval.jsonl'}", args[2])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "eval data yields no batch; all 30 rows were skipped: 30 x " in last, last


def test_a_key_given_twice_on_the_command_line_is_said():
    """The last one is used, as in most CLIs, and one line says so."""
    from tpusft.config.__main__ import main

    proc = run_in_process(main, DEMO, "steps=3", "seed=2", "steps=4")
    assert proc.returncode == 0 and "\nsteps: 4\n" in proc.stdout, proc.stderr
    assert proc.stderr == ("note: steps is given 2 times on the command line (steps=3, "
                           "steps=4); the last one is used\n"), proc.stderr


@pytest.mark.parametrize("source, message", [
    ("def fn(prompts, completions:\n    return []\n",
     r"bad_import_reward\.py, line 1: syntax error \("),
    ("raise RuntimeError('needs a GPU')\n",
     r"importing 'bad_import_reward' raised RuntimeError: needs a GPU \(.*bad_import_reward"
     r"\.py, line 1\)"),
])
def test_a_reward_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch, source,
                                                          message):
    import sys

    from tpusft.train_grpo import main

    (tmp_path / "bad_import_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_import_reward", raising=False)
    proc = run_in_process(main, "configs/demo/grpo.yml", f"base_output_directory={tmp_path}",
                          "grpo.reward_functions=[bad_import_reward:fn]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: grpo.reward_functions: ") and re.search(message, last), last


def test_a_data_folder_of_several_kinds_says_which_it_read(tmp_path, demo_assets):
    """datasets reads one kind of file from a folder and left the others out silently."""
    chat = {"messages": [{"role": "user", "content": "1+1="},
                         {"role": "assistant", "content": "2"}]}
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text(json.dumps(chat) + "\n")
    (tmp_path / "data" / "c.csv").write_text("instruction,output\n1+3=,4\n")
    proc = run_in_process(_main("data"), DEMO, "demo_task=", f"hf_path={tmp_path / 'data'}",
                          f"tokenizer_path={demo_assets / 'tokenizer'}",
                          f"base_output_directory={tmp_path}", "inspect_examples=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"note: data folder {tmp_path / 'data'} holds several kinds of files: read its 2 "
            f"json files, left out 1 csv file") in proc.stdout, proc.stdout[:2000]
