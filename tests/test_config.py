"""Config: YAML chain, presets, typed overrides, and every config error class."""

from pathlib import Path

import pytest
import yaml

from tpusft.config import load_config
from tpusft.config.loader import base_yaml_text, configs_root
from tpusft.errors import ConfigError

SFT = str(configs_root() / "sft.yml")
DEMO = str(configs_root() / "demo" / "sft.yml")
REQUIRED = ["hf_path=json", "hf_data_files=x.jsonl", "tokenizer_path=tok"]


def test_base_yml_is_generated_from_schema():
    assert (configs_root() / "base.yml").read_text() == base_yaml_text(), (
        "configs/base.yml is stale: run python -m tpusft.config --write-base")


def test_chain_preset_and_overrides(tmp_path):
    cfg = load_config([SFT, *REQUIRED, "model_name=llama3.2-1b", "steps=7",
                       "learning_rate=1e-4", "packing=false",
                       "column_map={messages: chat}", "eval_split=null", "run_name=007",
                       f"base_output_directory={tmp_path}"])
    assert cfg.steps == 7 and isinstance(cfg.steps, int)
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.packing is False
    assert cfg.column_map == {"messages": "chat"}
    assert cfg.eval_split is None
    assert cfg.run_name == "007"  # strings stay verbatim
    # sft.yml sets global_batch_size; the preset fills the architecture.
    assert cfg.global_batch_size == 16
    arch = (cfg.base_emb_dim, cfg.base_num_decoder_layers, cfg.rope_scaling_factor)
    assert arch == (2048, 16, 32.0)
    assert cfg.checkpoint_directory == str(tmp_path / "007" / "checkpoints")
    assert cfg.tensorboard_directory == str(tmp_path / "007" / "tensorboard")
    assert cfg.profile_directory == str(tmp_path / "007" / "profile")


def test_explicit_model_key_beats_preset(tmp_path):
    child = tmp_path / "child.yml"
    child.write_text(yaml.safe_dump({"base_config": SFT, "model_name": "llama3.2-1b",
                                     "base_num_decoder_layers": 3}))
    cfg = load_config([str(child), *REQUIRED])
    assert cfg.base_num_decoder_layers == 3 and cfg.base_emb_dim == 2048


def test_run_name_defaults_to_timestamp():
    cfg = load_config([DEMO, "run_name=null"])
    assert cfg.run_name and cfg.run_name[:2] == "20"


def test_gcs_output_paths():
    cfg = load_config([DEMO, "base_output_directory=gs://bucket/x", "run_name=r"])
    assert cfg.checkpoint_directory == "gs://bucket/x/r/checkpoints"


@pytest.mark.parametrize("args, message", [
    (["stpes=3"], "unknown config key 'stpes'; did you mean steps"),
    (["learning_rat=1"], "did you mean learning_rate"),
    (["steps=abc"], "steps='abc' has the wrong type; expected an integer"),
    (["steps=0"], "steps=0 is too small"),
    (["packing=maybe"], "packing='maybe' has the wrong type; expected true or false"),
    (["dtype=float8"], "dtype='float8' is not allowed"),
    (["global_batch_size=10", "gradient_accumulation_steps=4"], "not divisible"),
    (["model_name=llama9"], "unknown model_name 'llama9'"),
    (["ici_fsdp_parallelism=-1", "ici_tensor_parallelism=-1"], "at most one"),
    (["hf_path="], "hf_path is empty"),
    (["steps"], "is not key=value"),
    (["lora.dropout=1"], "lora.dropout=1.0 must be below 1"),
    (["lora.dropout=-0.1"], "lora.dropout=-0.1 is too small"),
    (["max_target_length=96", "num_vocab_tiling=5"],
     "num_vocab_tiling=5 must divide max_target_length=96"),
    (["num_vocab_tiling=-1"], "num_vocab_tiling=-1 is too small"),
    (["num_generations=8"], "config key 'num_generations' is now 'grpo.num_generations'"),
    (["decode_temperature=0.7"], "config key 'decode_temperature' is now 'generate.temperature'"),
    (["grpo.beta=-1"], "grpo.beta=-1.0 is too small"),
])
def test_config_errors(args, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config([SFT, *REQUIRED, *args])
    assert message in str(e.value)


def test_a_moved_key_in_a_yaml_file_names_its_section(tmp_path):
    old = tmp_path / "old.yml"
    old.write_text(f"base_config: {Path(SFT).resolve()}\nbeta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config([str(old), *REQUIRED])
    assert str(e.value) == (f"{old}: config key 'beta' is now 'grpo.beta'; write grpo.beta=... "
                            f"(YAML: under grpo:)")
    new = tmp_path / "new.yml"
    new.write_text(f"base_config: {Path(SFT).resolve()}\ngrpo:\n  beta: 0.1\n"
                   f"generate:\n  top_k: 5\n")
    cfg = load_config([str(new), *REQUIRED])
    assert (cfg.grpo.beta, cfg.generate.top_k, cfg.dpo.beta) == (0.1, 5, 0.1)


def test_missing_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "nope.yml")])
    bad = tmp_path / "bad.yml"
    bad.write_text("steps: [1, 2\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yml line \d+"):
        load_config([str(bad)])
    unknown = tmp_path / "unknown.yml"
    unknown.write_text(f"base_config: {SFT}\nlearnin_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown.yml: unknown config key 'learnin_rate'"):
        load_config([str(unknown), *REQUIRED])


def test_batch_must_split_over_data_axes():
    import jax

    from tpusft.models.sharding import make_mesh
    from tpusft.training.setup import check_batch

    cfg = load_config([SFT, *REQUIRED, "global_batch_size=12", "gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="cannot be split over the 8 devices"):
        check_batch(cfg, make_mesh(1, -1, 1, jax.devices()))
    check_batch(cfg, make_mesh(1, 2, 4, jax.devices()))  # 6 sequences over 2 fsdp devices
