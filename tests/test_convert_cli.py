"""The converter command lines: one-line errors with exit code 2, nothing overwritten, and a
train_sft checkpoint exported to HF that transformers loads with the trained values."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli, run_in_process
from etils import epath
from hf_oracle import build_hf_model, hf_logits, restored_model

# Its module-scoped fixtures are built once: every test of this file in one xdist worker.
pytestmark = pytest.mark.xdist_group("convert-cli")

DEMO = "configs/demo/sft.yml"


def tool(name: str, *args: str):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, f"tools/convert_checkpoint/{name}.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def inproc(name: str, *args: str):
    """A converter's main in this process, through the command-line error wrapper."""
    from tpusft.conversion import cli

    return run_in_process(getattr(cli, f"{name}_main"), *args)


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    build_hf_model("llama3").save_pretrained(d)
    return d


def test_round_trip_through_the_command_lines(tiny_hf, tmp_path):
    proc = tool("hf_to_native", str(tiny_hf), str(tmp_path / "native"), "--scan_layers", "false",
                "--save_dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GB/s" in proc.stdout and "peak RSS" in proc.stdout
    assert (tmp_path / "native" / "0" / "items").is_dir()
    meta = json.loads((tmp_path / "native" / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"] == {"scan_layers": False}
    proc = tool("native_to_hf", str(tmp_path / "native"), str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"


def test_errors_are_one_line_with_exit_2(tiny_hf, tmp_path):
    # Unknown architecture.
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                 "architectures": ["GPT2LMHeadModel"]}))
    _one_line_error(tool("hf_to_native", str(bad), str(tmp_path / "o1")),
                    "GPT2LMHeadModel (model_type 'gpt2') is not supported")
    # Shape mismatch against the preset the user names.
    _one_line_error(inproc("hf_to_native", str(tiny_hf), str(tmp_path / "o2"),
                           "--model_name", "llama3.2-1b"), "does not match preset llama3.2-1b")
    # Missing shard.
    sharded = tmp_path / "sharded"
    build_hf_model("llama3").save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _one_line_error(inproc("hf_to_native", str(sharded), str(tmp_path / "o3")),
                    f"shard {shards[-1].name} listed in model.safetensors.index.json is missing")
    # Not a native checkpoint.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    _one_line_error(inproc("native_to_hf", str(tmp_path / "junk"), str(tmp_path / "o4"),
                           "--model_name", "demo-tiny"), "is not a native checkpoint")
    # Wrong preset for a native checkpoint; an existing output directory is left alone.
    assert inproc("hf_to_native", str(tiny_hf), str(tmp_path / "n")).returncode == 0
    _one_line_error(inproc("native_to_hf", str(tmp_path / "n"), str(tmp_path / "o5"),
                           "--model_name", "demo-tiny"), "but the model keys imply")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("precious")
    _one_line_error(tool("native_to_hf", str(tmp_path / "n"), str(tmp_path / "keep")),
                    "exists and is not empty")
    assert (tmp_path / "keep" / "mine.txt").read_text() == "precious"
    # Converting onto an existing checkpoint is refused too.
    _one_line_error(inproc("hf_to_native", str(tiny_hf), str(tmp_path / "n")),
                    "exists and is not empty")
    _one_line_error(inproc("hf_to_native", str(tiny_hf), str(tmp_path / "o6"), "--scan_layers",
                           "maybe"), "expected true or false")


@pytest.mark.slow
def test_training_checkpoint_exports_to_hf(tmp_path):
    """A train_sft run's checkpoint -> HF; transformers' logits equal tpusft's on it."""
    import transformers

    from tpusft.conversion.convert import find_model_keys

    run = run_cli("tpusft.train_sft", DEMO, f"base_output_directory={tmp_path}",
                  "run_name=r", "steps=6", "checkpoint_period=6", "global_batch_size=8",
                  "max_target_length=64", "eval_steps=1", "async_checkpointing=false")
    assert run.returncode == 0, run.stderr[-3000:]
    ckpts = tmp_path / "r" / "checkpoints"
    proc = inproc("native_to_hf", str(ckpts), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert hf.generation_config.pad_token_id == tok.pad_token_id
    assert eot in np.atleast_1d(hf.generation_config.eos_token_id).tolist()
    ids = tok("12+30=")["input_ids"]
    assert len(ids) >= 6

    keys, _ = find_model_keys(str(ckpts))
    model = restored_model(keys, ckpts)
    tokens = np.array([ids * 3])
    pos = jnp.arange(tokens.shape[1])[None]
    ours = np.asarray(model(jnp.asarray(tokens), pos)[0])
    ref = hf_logits(hf.eval(), tokens)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * float(ref.max() - ref.min()))

    # LoRA on top of that checkpoint: the run saves adapters only; the export merges them
    # into the base and writes the PEFT adapter, which peft loads on the exported base.
    from peft import PeftModel

    from tpusft.conversion.streaming import NativeReader

    lora_run = run_cli("tpusft.train_sft", "configs/demo/sft_lora.yml",
                       f"base_output_directory={tmp_path}", "run_name=l", "steps=6",
                       "checkpoint_period=6", "global_batch_size=8", "max_target_length=64",
                       "eval_steps=1", "async_checkpointing=false", "learning_rate=1e-2",
                       f"load_parameters_path={ckpts}")
    assert lora_run.returncode == 0, lora_run.stderr[-3000:]
    assert "trainable" in lora_run.stdout and "LoRA rank 8" in lora_run.stdout
    resumed = run_cli("tpusft.train_sft", "configs/demo/sft_lora.yml",
                      f"base_output_directory={tmp_path}", "run_name=l", "steps=8",
                      "checkpoint_period=6", "global_batch_size=8", "max_target_length=64",
                      "eval_steps=1", "async_checkpointing=false", "learning_rate=1e-2",
                      f"load_parameters_path={ckpts}")
    assert resumed.returncode == 0 and "resuming from step 6" in resumed.stdout, \
        resumed.stderr[-3000:]
    saved = NativeReader(epath.Path(tmp_path / "l" / "checkpoints" / "6" / "model_params"), ())
    assert saved.entries and all(k[-1] in ("lora_a", "lora_b") for k in saved.entries)
    proc = inproc("native_to_hf", str(tmp_path / "l" / "checkpoints"), str(tmp_path / "hf-l"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The adapter names its base (the SFT run's checkpoints: no HF source, so said so).
    adapter_cfg = json.loads((tmp_path / "hf-l" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(ckpts), adapter_cfg
    assert "was not converted from a Hugging Face model" in proc.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-l").eval()
    with_adapter = PeftModel.from_pretrained(hf, str(tmp_path / "hf-l" / "adapter")).eval()
    got, want = hf_logits(merged, tokens), hf_logits(with_adapter, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(want.max() - want.min()))
    assert np.abs(got - ref).max() > 1e-3  # the adapters changed the model


@pytest.mark.slow
def test_gcs_native_checkpoint_both_ways(tiny_hf, tmp_path, gcs_emulator, monkeypatch):
    """hf_to_native writes to gs:// and native_to_hf reads from there (local GCS emulator)."""
    from safetensors.numpy import load_file

    env = {**gcs_emulator, "HOME": str(tmp_path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    proc = tool("hf_to_native", str(tiny_hf), "gs://tpusft-test/ckpt/llama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = tool("native_to_hf", "gs://tpusft-test/ckpt/llama", str(tmp_path / "back"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tiny_hf / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def chat_native(tmp_path_factory):
    """A tiny Llama with a chat tokenizer, converted: (hf dir, native dir, tokenizer)."""
    from chat_tokenizers import chat_tokenizer

    from tpusft.conversion.convert import hf_to_native

    d = tmp_path_factory.mktemp("chat")
    tok = chat_tokenizer("llama3")
    build_hf_model("llama3", vocab_size=len(tok) + 3).save_pretrained(d / "hf")
    tok.save_pretrained(d / "hf")
    hf_to_native(str(d / "hf"), str(d / "native"), log=lambda *_: None)
    return d / "hf", d / "native", tok


def test_converters_take_model_keys_as_key_value(chat_native, tmp_path):
    hf, native, _ = chat_native
    # hf_to_native: the overrides refine the preset the checkpoint must match.
    _one_line_error(inproc("hf_to_native", str(hf), str(tmp_path / "a"),
                           f"model_name={native}/tpusft_model.yml", "base_mlp_dim=64"),
                    "base_mlp_dim is 128 in config.json but 64")
    # native_to_hf: overrides apply to the recorded keys (here: a wrong layer count).
    _one_line_error(inproc("native_to_hf", str(native), str(tmp_path / "b"),
                           "base_num_decoder_layers=3"), "check --model_name")
    _one_line_error(inproc("native_to_hf", str(native), str(tmp_path / "c"), "steps=3"),
                    "takes model keys only")
    _one_line_error(inproc("native_to_hf", str(native), str(tmp_path / "d"), "vocab_sise=3"),
                    "did you mean vocab_size")
    proc = inproc("native_to_hf", str(native), str(tmp_path / "e"), "--model_name",
                  f"{native}/tpusft_model.yml", "rope_type=llama3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_generate_needs_only_a_checkpoint_and_a_tokenizer(chat_native, tmp_path):
    """No data-set keys, no model_name: the model keys and tokenizer recorded beside a
    converted checkpoint are used (configs/sft.yml's preset would not fit it); the checkpoint
    path may be relative. model_name= on the command line still wins."""
    from tpusft import generate

    _, native, _ = chat_native
    rel = os.path.relpath(native, REPO)
    proc = run_in_process(generate.main, "configs/sft.yml", f"load_parameters_path={rel}",
                          'generate.prompt=Hello', "generate.max_decode_length=4",
                          "generate.max_prefill_length=32",
                          "dtype=float32")
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-3000:]
    proc = run_in_process(generate.main, "configs/sft.yml", f"load_parameters_path={native}",
                          "generate.prompt=Hello", "model_name=qwen3-0.6b")
    assert proc.returncode == 2 and "check model_name" in proc.stderr, proc.stderr[-2000:]


def test_export_generation_config_comes_from_the_tokenizer(tmp_path):
    """A model without a source config.json (trained from scratch, as the demo's is) is
    exported with its tokenizer's bos/eos/pad and stops at the chat template's end of turn."""
    import transformers

    from tpusft.conversion.convert import hf_to_native, native_to_hf
    from tpusft.demo import arithmetic

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    arithmetic.build_tokenizer(tok_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    build_hf_model("llama3", vocab_size=len(tok) + 3).save_pretrained(tmp_path / "hf")
    hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    native_to_hf(str(tmp_path / "native"), str(tmp_path / "out"), assets=str(tok_dir),
                 log=lambda *_: None)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_token_id == eot
    assert cfg["pad_token_id"] == tok.pad_token_id and cfg["bos_token_id"] == tok.bos_token_id
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [
        gen["eos_token_id"]]
    assert eot in stops and gen["pad_token_id"] == tok.pad_token_id
