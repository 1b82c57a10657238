"""LoRA adapters in PEFT format: the adapter peft loads on the HF base gives tpusft's LoRA
logits, and so does the merged model exported to HF (float32, tiny Llama and Qwen3)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_oracle import build_hf_model, hf_logits

from tpusft.conversion import peft_adapter
from tpusft.conversion.convert import (
    find_model_keys,
    hf_to_native,
    load_adapters,
    model_args,
    native_to_hf,
    peft_to_native,
)
from tpusft.conversion.native import restore_params
from tpusft.conversion.streaming import save_native
from tpusft.errors import CheckpointError
from tpusft.models import lora
from tpusft.models.decoder import create_model

T = 24


@pytest.mark.parametrize("name, targets", [("llama3", "all-linear"),
                                           ("qwen3", ["q_proj", "v_proj", "o_proj", "down_proj"])])
def test_peft_adapter_and_merged_export_match_tpusft(tmp_path, name, targets):
    import transformers
    from peft import PeftModel

    hf = build_hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_native(str(tmp_path / "hf"), str(tmp_path / "native"), log=lambda *_: None)
    keys, _ = find_model_keys(str(tmp_path / "native"))
    args = dataclasses.replace(model_args(keys, True), dtype="float32", remat_policy="none",
                               lora_rank=4, lora_alpha=8.0,
                               lora_targets=lora.target_modules(targets))
    model = create_model(args, None)
    restore_params(model, str(tmp_path / "native"))
    for i, (_, m) in enumerate(lora.adapters(model)):  # trained-looking adapters
        m.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), m.lora_b.shape)

    tokens = np.random.default_rng(1).integers(3, 256, (2, T))
    positions = np.broadcast_to(np.arange(T), (2, T))
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions))[0])
    span = float(ours.max() - ours.min())

    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    peft_adapter.save(tmp_path / "adapter", args, adapters, base_model=str(tmp_path / "hf"))
    # The adapter reads back to the same native adapters.
    back = peft_adapter.load(tmp_path / "adapter", args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 back, jax.tree.map(np.asarray, adapters))
    assert peft_adapter.lora_settings(tmp_path / "adapter")["lora_targets"] == args.lora_targets

    # Imported back for further training: from the PEFT directory itself, and from the native
    # adapter checkpoint hf_to_native writes of it.
    peft_to_native(str(tmp_path / "adapter"), str(tmp_path / "adapter-native"), keys=keys)
    for source in ("adapter", "adapter-native"):
        again = create_model(args, None, seed=5)
        restore_params(again, str(tmp_path / "native"))
        load_adapters(again, args, str(tmp_path / source))
        got = np.asarray(again(jnp.asarray(tokens), jnp.asarray(positions))[0])
        np.testing.assert_allclose(got, ours, rtol=0, atol=1e-5 * span, err_msg=source)
    with pytest.raises(CheckpointError, match="has rank 4 but the run sets lora.rank=8"):
        load_adapters(create_model(dataclasses.replace(args, lora_rank=8), None),
                      dataclasses.replace(args, lora_rank=8), str(tmp_path / "adapter"))

    with_adapter = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    theirs = hf_logits(with_adapter, tokens)
    peft_diff = float(np.abs(theirs - ours).max())
    assert peft_diff < 1e-4 * span, peft_diff

    # Merged into the kernels, saved natively and exported to HF.
    lora.merge(model, args.lora_scale, args.scan_layers)
    merged = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_native(str(tmp_path / "merged"), jax.tree.map(np.asarray, merged), scan_layers=True)
    (tmp_path / "merged" / "tpusft_model.yml").write_text(
        (tmp_path / "native" / "tpusft_model.yml").read_text())
    native_to_hf(str(tmp_path / "merged"), str(tmp_path / "merged-hf"),
                 assets=str(tmp_path / "hf"), log=lambda *_: None)
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged-hf", attn_implementation="eager").eval()
    merged_diff = float(np.abs(hf_logits(exported, tokens) - ours).max())
    assert merged_diff < 1e-4 * span, merged_diff
    print(f"[peft] {name}: max |diff| / logit range: PEFT adapter {peft_diff / span:.1e}, "
          f"merged export {merged_diff / span:.1e}")
