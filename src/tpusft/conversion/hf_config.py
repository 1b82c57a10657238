"""Hugging Face config.json <-> tpusft model keys (the values a model preset holds)."""

from __future__ import annotations

import json
import os
from typing import Any

from tpusft.config.schema import MODEL_KEYS, Config
from tpusft.errors import CheckpointError
from tpusft.models.families import FAMILIES

_BY_MODEL_TYPE = {f.hf_model_type: f.name for f in FAMILIES.values()}
_BY_MODEL_TYPE["gemma3"] = "gemma3"  # Gemma3ForConditionalGeneration: its text_config

# Every field the supported config classes add to PretrainedConfig's, and what conversion
# does with it (tests/test_convert_fidelity.py walks the real classes against these two tables).
# Read into model keys (or checked: a value tpusft cannot compute is refused) and written back:
MAPPED = {
    "vocab_size": "vocab_size", "hidden_size": "base_emb_dim",
    "num_hidden_layers": "base_num_decoder_layers", "num_attention_heads": "base_num_query_heads",
    "num_key_value_heads": "base_num_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "base_mlp_dim", "rms_norm_eps": "normalization_layer_epsilon",
    "tie_word_embeddings": "logits_via_embedding",
    "rope_parameters": "rope_type, rope_max_timescale, rope_scaling_factor, rope_*_freq_factor, "
                       "rope_original_max_position, local_rope_max_timescale",
    "sliding_window": "sliding_window_size",
    "layer_types": "checked against the family's layer pattern (or all full attention)",
    "use_sliding_window": "sliding_window_size (0 when false)",
    "max_window_layers": "checked through layer_types",
    "_sliding_window_pattern": "checked through layer_types",
    "attn_logit_softcapping": "attn_logits_soft_cap",
    "final_logit_softcapping": "final_logits_soft_cap",
    "query_pre_attn_scalar": "query_pre_attn_scalar",
    "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
    "hidden_act": "checked: the family's activation", "hidden_activation": "checked: the "
    "family's activation",
    "use_bidirectional_attention": "checked: must be false (causal decoder)",
    "text_config": "the decoder's config, read field by field",
}
# Kept from the source config.json on the way back, as they do not change the forward pass:
IGNORED = {
    "bos_token_id": "a token id for generation", "eos_token_id": "a token id for generation",
    "pad_token_id": "a token id for generation (HF uses it only to initialise a zero row)",
    "initializer_range": "initialisation of new weights", "use_cache": "an inference switch",
    "max_position_embeddings": "a context limit; no RoPE type tpusft reads depends on it",
    "attention_dropout": "dropout, off outside training; tpusft trains without it",
    "pretraining_tp": "not read by transformers' modelling (kept in old Llama configs)",
    "vision_config": "the vision tower (not part of the text decoder)",
    "boi_token_index": "image tokens (vision path)", "eoi_token_index": "image tokens (vision "
    "path)", "image_token_index": "image tokens (vision path)",
    "mm_tokens_per_image": "image tokens (vision path)",
}


def _supported() -> str:
    return ", ".join(f.hf_architecture for f in FAMILIES.values())


def load_hf_config(path: str) -> Any:
    """transformers' config object for a local HF directory (or a hub id when online)."""
    import transformers

    try:
        with open(f"{path}/config.json") as f:
            raw = json.load(f)
    except FileNotFoundError:
        if "/" not in path or path.startswith((".", "/")) or os.path.isdir(path):
            raise CheckpointError(f"{path} has no config.json; give a Hugging Face model "
                                  f"directory (config.json beside its *.safetensors)") from None
        raw = None  # a hub id (online)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
    if raw is not None and raw.get("model_type") not in _BY_MODEL_TYPE:
        arch = (raw.get("architectures") or ["?"])[0]
        raise CheckpointError(f"{path}/config.json: architecture {arch} (model_type "
                              f"{raw.get('model_type')!r}) is not supported; supported: "
                              f"{_supported()}")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read a Hugging Face config from {path!r}: "
                              f"{str(e).splitlines()[0]}") from None
    if config.model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type {config.model_type!r} is not supported; "
                              f"supported: {_supported()}")
    return config


def text_config(config: Any) -> Any:
    return config.get_text_config() if config.model_type == "gemma3" else config


def model_keys(config: Any) -> dict[str, Any]:
    """The tpusft model keys (a preset) equivalent to an HF config."""
    top = config
    c = text_config(config)
    family = _BY_MODEL_TYPE[c.model_type]
    heads = c.num_attention_heads
    keys: dict[str, Any] = {
        "model_family": family,
        "vocab_size": c.vocab_size,
        "base_emb_dim": c.hidden_size,
        "base_num_decoder_layers": c.num_hidden_layers,
        "base_num_query_heads": heads,
        "base_num_kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "base_mlp_dim": c.intermediate_size,
        "normalization_layer_epsilon": float(c.rms_norm_eps),
        "logits_via_embedding": bool(getattr(top, "tie_word_embeddings", False)
                                     or getattr(c, "tie_word_embeddings", False)),
        "attention_bias": bool(getattr(c, "attention_bias", False)),
        "mlp_bias": bool(getattr(c, "mlp_bias", False)),
    }
    if getattr(c, "use_bidirectional_attention", False):
        raise CheckpointError("use_bidirectional_attention=true (an encoder-style Gemma) is not "
                              "supported; tpusft's decoder is causal")
    rope = c.rope_parameters or {}
    local = None
    if "full_attention" in rope:  # per layer type (Gemma 3)
        local = rope.get("sliding_attention")
        rope = rope["full_attention"]
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3", "linear"):
        raise CheckpointError(f"RoPE type {rope_type!r} is not supported (default, llama3, "
                              f"linear)")
    keys["rope_max_timescale"] = float(rope.get("rope_theta", 10000.0))
    keys["rope_type"] = rope_type
    if rope_type in ("llama3", "linear"):
        keys["rope_scaling_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        keys["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        keys["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        keys["rope_original_max_position"] = int(rope["original_max_position_embeddings"])
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise CheckpointError("scaled RoPE on sliding-window layers is not supported")
        keys["local_rope_max_timescale"] = float(local.get("rope_theta", 10000.0))

    window = getattr(c, "sliding_window", None) or 0
    if family in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
        window = 0
    keys["sliding_window_size"] = int(window) if _sliding_layers(c, family, window) else 0
    if family.startswith("gemma"):
        keys["attn_logits_soft_cap"] = float(getattr(c, "attn_logit_softcapping", None) or 0)
        keys["final_logits_soft_cap"] = float(getattr(c, "final_logit_softcapping", None) or 0)
        keys["query_pre_attn_scalar"] = float(c.query_pre_attn_scalar)
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "silu")
    expected = FAMILIES[family].activation
    if {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act) != expected:
        raise CheckpointError(f"activation {act!r} is not what {family} uses")
    return keys


def _pattern(sliding: list[bool]) -> str:
    if not any(sliding):
        return "no sliding-window layers"
    if all(sliding):
        return "every layer sliding-window"
    return "sliding-window layers " + ",".join(str(i) for i, s in enumerate(sliding) if s)


def _sliding_layers(c: Any, family: str, window: int) -> bool:
    """Whether any layer attends through the sliding window; refuses a layer pattern that
    tpusft's layout for the family cannot hold (it has the family's own pattern, or none)."""
    n = c.num_hidden_layers
    fam = FAMILIES[family]
    types = list(getattr(c, "layer_types", None) or [])
    if not types:
        return bool(window)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise CheckpointError(f"layer_types {unknown[0]!r} is not supported (sliding_attention, "
                              f"full_attention)")
    sliding = [t == "sliding_attention" for t in types]
    if len(sliding) != n:
        raise CheckpointError(f"layer_types has {len(sliding)} entries for {n} layers")
    if not window or not any(sliding):
        return False
    ours = [fam.is_local(i, window) for i in range(n)]
    if sliding != ours:
        raise CheckpointError(
            f"layer_types ({_pattern(sliding)}) is not supported: tpusft's {family} layout "
            f"holds {_pattern(ours)}, or every layer full_attention")
    return True


def layer_types(keys: dict[str, Any]) -> list[str]:
    """HF layer_types of model keys."""
    fam, window = FAMILIES[keys["model_family"]], keys["sliding_window_size"]
    return ["sliding_attention" if window and fam.is_local(i, window) else "full_attention"
            for i in range(keys["base_num_decoder_layers"])]


def hf_config_for(keys: Any, base: Any = None, dtype: str = "float32") -> Any:
    """A transformers config for tpusft model keys (a Config or a dict of model keys).

    `base` (an HF config the checkpoint came from) keeps fields tpusft does not model
    (token ids, max_position_embeddings, ...); architecture values always come from `keys`.
    """
    import transformers

    source = keys if not isinstance(keys, dict) else Config()
    k = {f: getattr(source, f) for f in MODEL_KEYS}
    if isinstance(keys, dict):
        k.update(keys)
    fam = FAMILIES[k["model_family"]]
    kwargs: dict[str, Any] = {}
    if base is not None and text_config(base).model_type == fam.hf_model_type:
        kwargs = text_config(base).to_dict()
        for drop in ("architectures", "model_type", "transformers_version", "rope_scaling",
                     "rope_theta", "layer_types", "dtype", "torch_dtype", "use_sliding_window",
                     "max_window_layers", "sliding_window_pattern", "_sliding_window_pattern"):
            kwargs.pop(drop, None)
    rope: dict[str, Any] = {"rope_type": k["rope_type"], "rope_theta": k["rope_max_timescale"]}
    if k["rope_type"] in ("llama3", "linear"):
        rope["factor"] = k["rope_scaling_factor"]
    if k["rope_type"] == "llama3":
        rope.update(low_freq_factor=k["rope_low_freq_factor"],
                    high_freq_factor=k["rope_high_freq_factor"],
                    original_max_position_embeddings=k["rope_original_max_position"])
    if fam.name == "gemma3":
        rope = {"full_attention": rope,
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": k["local_rope_max_timescale"] or 10000.0}}
    kwargs.update(
        vocab_size=k["vocab_size"], hidden_size=k["base_emb_dim"],
        num_hidden_layers=k["base_num_decoder_layers"],
        num_attention_heads=k["base_num_query_heads"],
        num_key_value_heads=k["base_num_kv_heads"], head_dim=k["head_dim"],
        intermediate_size=k["base_mlp_dim"], rms_norm_eps=k["normalization_layer_epsilon"],
        tie_word_embeddings=k["logits_via_embedding"], rope_parameters=rope,
        architectures=[fam.hf_architecture], dtype=dtype)
    if k["rope_type"] == "llama3" and "max_position_embeddings" not in kwargs:
        kwargs["max_position_embeddings"] = 16 * k["rope_original_max_position"]
    for field in ("attention_bias", "mlp_bias"):
        if k[field] and field not in fam.hf_bias_fields:
            raise CheckpointError(f"{field}=true has no place in {fam.hf_architecture}'s config")
        if field in fam.hf_bias_fields:
            kwargs[field] = bool(k[field])
    window = k["sliding_window_size"] or None
    # Gemma keeps its class default without a window: layer_types then has no sliding layer.
    if fam.name == "mistral" or (fam.name.startswith("gemma") and window):
        kwargs["sliding_window"] = window
    if fam.name in ("qwen2", "qwen3"):  # every layer, when on (tpusft's Qwen pattern)
        kwargs.update(sliding_window=window, use_sliding_window=bool(window),
                      max_window_layers=0 if window else k["base_num_decoder_layers"])
    if fam.name not in ("llama3", "mistral"):  # the classes with layer_types
        kwargs["layer_types"] = layer_types(k)
    if fam.name.startswith("gemma"):
        scalar = float(k["query_pre_attn_scalar"] or k["head_dim"])
        kwargs["query_pre_attn_scalar"] = int(scalar) if scalar.is_integer() else scalar
        kwargs["attn_logit_softcapping"] = k["attn_logits_soft_cap"] or None
        kwargs["final_logit_softcapping"] = k["final_logits_soft_cap"] or None
    return transformers.AutoConfig.for_model(fam.hf_model_type, **kwargs)

