"""Tiny random Hugging Face models of every supported family, built from their real config
classes, and helpers that run them next to tpusft on the same inputs."""

from __future__ import annotations

import numpy as np

# Small sizes that still cover: GQA, odd head counts, head_dim != hidden/heads, llama3 and
# linear RoPE scaling, tied and untied embeddings, biases, q/k norms, sliding windows
# shorter than the test sequences, soft-capping, Gemma 3's 5:1 pattern plus leftover layers.
TINY = {
    "llama3": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   max_position_embeddings=131072,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
    "llama3-tied": dict(model_type="llama", vocab_size=256, hidden_size=48,
                        intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                        num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                        tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mistral": dict(model_type="mistral", vocab_size=256, hidden_size=48, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=80, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                  rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma2": dict(model_type="gemma2", vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, rms_norm_eps=1e-6, sliding_window=8,
                   query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gemma3": dict(model_type="gemma3_text", vocab_size=256, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6, sliding_window=8,
                   query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
                   rope_parameters={
                       "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                          "factor": 8.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A float32 HF causal LM with every weight random (norms around their identity)."""
    import torch
    import transformers

    kwargs = {**TINY[name], **overrides}
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None,
              positions: np.ndarray | None = None) -> np.ndarray:
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions, dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def padded_batch_diff(hf, model, length: int = 24) -> tuple[float, float]:
    """(max |tpusft - transformers| logits, transformers' logit range) on a left-padded batch
    of two random rows (row 1 with 7 pad tokens), over the real tokens."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, :7] = 0
    tokens[1, :7] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = hf_logits(hf, tokens, mask, positions)
    out = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions),
                           segment_ids=jnp.asarray(mask))[0])
    valid = mask.astype(bool)
    return (float(np.abs(out[valid] - ref[valid]).max()),
            float(ref[valid].max() - ref[valid].min()))


def hf_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint directory (all shards)."""
    import glob

    from safetensors.numpy import load_file

    out = {}
    for f in sorted(glob.glob(f"{directory}/*.safetensors")):
        out.update(load_file(f))
    return out


def native_tensors(path) -> dict[str, np.ndarray]:
    """Every parameter of a native (MaxText-layout) checkpoint, by 'a/b/c' name."""
    from tpusft.conversion.native import resolve
    from tpusft.conversion.streaming import NativeReader

    items, _ = resolve(str(path))
    reader = NativeReader(items, ("params", "params"))
    out = {"/".join(k): reader.read(k) for k in reader.entries}
    reader.close()
    return out


def restored_model(keys: dict, path, scan: bool = True):
    """A float32 tpusft model for model keys, with parameters restored from `path`."""
    import dataclasses

    from tpusft.conversion.convert import model_args
    from tpusft.conversion.native import restore_params
    from tpusft.models.decoder import create_model

    args = dataclasses.replace(model_args(keys, scan), dtype="float32", remat_policy="none")
    model = create_model(args, None)
    restore_params(model, str(path))
    return model
