"""Converters account for every tensor and every config field: config variants the decoder
carries (biases, sliding-window patterns) give transformers' logits both ways; the rest are
refused in one line before anything is written; every field of the real config classes is
either mapped or declared irrelevant, and the mapped ones survive HF -> keys -> HF."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_oracle import TINY, build_hf_model, hf_logits, padded_batch_diff, restored_model

from tpusft.conversion import hf_config
from tpusft.conversion.convert import hf_to_native, native_to_hf
from tpusft.errors import CheckpointError

T = 24  # longer than the tiny models' sliding windows (8)

VARIANTS = {
    "llama3-biases": ("llama3", dict(attention_bias=True, mlp_bias=True)),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),
    "gemma2-attention-bias": ("gemma2", dict(attention_bias=True)),
    "gemma2-all-full": ("gemma2", dict(layer_types=["full_attention"] * 4)),
    "gemma3-pattern-given": ("gemma3", dict(layer_types=[
        "sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2)),
    "qwen2-all-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8,
                                        max_window_layers=0)),
}

REFUSED = {
    "gemma2-custom-pattern": ("gemma2", dict(layer_types=[
        "full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        "layer_types"),
    "qwen2-partly-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8,
                                           max_window_layers=1), "layer_types"),
    "gemma3-other-period": ("gemma3", dict(sliding_window_pattern=4), "layer_types"),
    "gemma3-bidirectional": ("gemma3", dict(use_bidirectional_attention=True),
                             "use_bidirectional_attention"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_give_transformers_logits_both_ways(variant, tmp_path):
    import transformers

    family, overrides = VARIANTS[variant]
    hf = build_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    info = hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    keys = info["model_keys"]
    if "bias" in variant:
        assert keys["attention_bias"] and keys.get("mlp_bias") == ("mlp_bias" in overrides)
    diff, span = padded_batch_diff(hf, restored_model(keys, tmp_path / "native"))
    print(f"[variant] {variant}: max|diff| {diff:.2e}, logit range {span:.2f}")
    assert diff <= 1e-4 * span

    native_to_hf(str(tmp_path / "native"), str(tmp_path / "back"), log=lambda *_: None)
    back, loading = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", output_loading_info=True, attn_implementation="eager")
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field in ("layer_types", "attention_bias", "mlp_bias", "sliding_window"):
        if field in source and field != "sliding_window" or "sliding" in variant:
            assert written.get(field) == source.get(field) or (
                field == "sliding_window" and not any(
                    t == "sliding_attention" for t in source.get("layer_types", []))), field
    tokens = np.random.default_rng(2).integers(3, 256, (1, T))
    np.testing.assert_allclose(hf_logits(back.eval(), tokens), hf_logits(hf, tokens),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_unsupported_variants_are_refused_before_writing(variant, tmp_path):
    family, overrides, field = REFUSED[variant]
    hf = build_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError) as e:
        hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    assert field in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "native").exists()


def test_tensors_the_config_does_not_declare_stop_the_conversion(tmp_path):
    """Biases in the weights with attention_bias absent from config.json: no silent drop."""
    hf = build_hf_model("llama3", attention_bias=True)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["attention_bias"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    msg = str(e.value)
    assert "q_proj.bias" in msg and "attention_bias" in msg and "\n" not in msg, msg
    assert not (tmp_path / "native").exists()


CLASSES = {"llama3": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
           "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig",
           "gemma3-multimodal": "Gemma3Config"}


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_every_config_field_is_mapped_or_declared_irrelevant(family):
    import transformers

    base = set(transformers.PretrainedConfig().to_dict())
    fields = set(getattr(transformers, CLASSES[family])().to_dict()) - base
    unknown = sorted(f for f in fields if f not in hf_config.MAPPED and f not in hf_config.IGNORED)
    assert not unknown, f"{CLASSES[family]} fields neither mapped nor declared irrelevant: " \
                        f"{unknown} (add them to tpusft.conversion.hf_config.MAPPED or IGNORED)"
    assert not set(hf_config.MAPPED) & set(hf_config.IGNORED)


# The mapped fields whose values decide the forward pass, compared after HF -> keys -> HF.
FORWARD = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps",
           "tie_word_embeddings", "rope_parameters", "attn_logit_softcapping",
           "final_logit_softcapping", "query_pre_attn_scalar", "attention_bias", "mlp_bias",
           "hidden_act", "hidden_activation", "use_bidirectional_attention")


def _sliding(c) -> list[bool]:
    """Per layer: whether it attends through a window, and how wide (0: full)."""
    window = getattr(c, "sliding_window", None) or 0
    if hasattr(c, "use_sliding_window") and not c.use_sliding_window:
        window = 0
    types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
    return [window if t == "sliding_attention" else 0 for t in types]


@pytest.mark.parametrize("name", sorted(TINY) + sorted(VARIANTS))
def test_mapped_fields_survive_hf_to_keys_to_hf(name):
    import transformers

    family, overrides = VARIANTS.get(name, (name, {}))
    kwargs = {**TINY[family], **overrides}
    source = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    keys = hf_config.model_keys(source)
    again = hf_config.hf_config_for(keys, None)
    for field in FORWARD:
        if hasattr(source, field):
            assert getattr(again, field) == getattr(source, field), field
    assert _sliding(again) == _sliding(source)
    assert hf_config.model_keys(again) == keys


def test_untied_output_layer_moves_in_bands_bit_exact(tmp_path, monkeypatch):
    """The untied lm_head crosses both ways a band of rows at a time (here bands of 3 rows,
    the last one shorter) and comes back bit for bit."""
    from hf_oracle import hf_tensors

    from tpusft.conversion import hf_layout

    monkeypatch.setattr(hf_layout, "BAND_BYTES", 3 * 64 * 4)
    assert hf_layout.bands(256, 64 * 4)[-1] == (255, 256)
    hf = build_hf_model("llama3")
    hf.save_pretrained(tmp_path / "hf")
    info = hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    diff, span = padded_batch_diff(hf, restored_model(info["model_keys"], tmp_path / "native"))
    assert diff <= 1e-4 * span
    native_to_hf(str(tmp_path / "native"), str(tmp_path / "back"), log=lambda *_: None)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert np.array_equal(a["lm_head.weight"], b["lm_head.weight"])
