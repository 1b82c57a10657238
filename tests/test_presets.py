"""Every model preset against the architecture transformers builds from the same values: the
same tensors with the same shapes, and tpusft's parameter tree matches the native layout."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from tpusft.conversion.convert import model_args
from tpusft.conversion.hf_config import hf_config_for, model_keys
from tpusft.conversion.hf_layout import native_leaves
from tpusft.config.loader import configs_root, load_preset
from tpusft.models.decoder import Transformer

PRESETS = sorted(p.stem for p in (configs_root() / "models").glob("*.yml"))

# Published parameter counts (billions, from the model cards / safetensors totals).
PUBLISHED = {"llama3.1-8b": 8.03, "llama3.2-1b": 1.24, "llama3.2-3b": 3.21,
             "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62,
             "qwen3-0.6b": 0.596, "qwen3-8b": 8.19, "gemma2-2b": 2.61, "gemma2-9b": 9.24,
             "gemma3-1b": 1.0, "mistral-7b": 7.25, "smollm2-135m": 0.135,
             "smollm2-1.7b": 1.71}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_transformers_architecture(name):
    import torch
    import transformers

    keys = load_preset(name)
    config = hf_config_for(keys)
    # HF config -> keys -> HF config is stable, and the keys are the preset's.
    back = model_keys(config)
    for k, v in keys.items():
        assert back[k] == v, (name, k)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf_shapes = {n: tuple(p.shape) for n, p in hf.state_dict().items()
                 if "rotary" not in n}
    if keys["logits_via_embedding"]:
        hf_shapes.pop("lm_head.weight", None)
    args = model_args(keys, True)
    pieces = {p.hf_name: p.hf_shape for leaf in native_leaves(args) for p in leaf.pieces}
    assert pieces == hf_shapes
    hf_count = sum(int(np.prod(s)) for s in hf_shapes.values())
    assert args.num_params() == hf_count
    if name in PUBLISHED:
        assert abs(hf_count / 1e9 - PUBLISHED[name]) / PUBLISHED[name] < 0.02, hf_count


@pytest.mark.parametrize("name", PRESETS)
def test_preset_tree_is_the_native_layout(name):
    keys = load_preset(name)
    for scan in (True, False):
        args = model_args(keys, scan)
        model = nnx.eval_shape(lambda args=args: Transformer(args, rngs=nnx.Rngs(0)))
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(
                    nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}
        assert flat == {leaf.name: leaf.shape for leaf in native_leaves(args)}


def test_configs_root_has_the_presets():
    assert Path(configs_root(), "models", "gemma3-1b.yml").exists()
