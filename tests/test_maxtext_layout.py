"""Checkpoints written by MaxText's own converter (tests/fixtures/maxtext, made by
`bash tools/maxtext_fixtures/make_fixtures.sh`) restore here and give HF's logits; tpusft's
converter writes the same tensors MaxText does; MaxText checkpoints export back to HF."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import hf_logits, hf_tensors, native_tensors, restored_model

from tpusft.conversion.convert import hf_to_native, native_to_hf
from tpusft.conversion.hf_config import load_hf_config, model_keys

FIXTURES = Path(__file__).parent / "fixtures" / "maxtext"
CASES = [(m, s) for m in ("llama", "qwen3") for s in ("scanned", "unscanned")]


@pytest.mark.parametrize("model,layout", CASES)
def test_maxtext_checkpoint_gives_hf_logits(model, layout):
    import transformers

    hf_dir = FIXTURES / model / "hf"
    keys = model_keys(load_hf_config(str(hf_dir)))
    ours = restored_model(keys, FIXTURES / model / layout, scan=layout == "scanned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(3, 256, (2, 20))
    ref = hf_logits(hf.eval(), tokens)
    out = np.asarray(ours(jnp.asarray(tokens),
                          jnp.broadcast_to(jnp.arange(20), (2, 20)))[0])
    span = float(ref.max() - ref.min())
    diff = float(np.abs(out - ref).max())
    print(f"[maxtext] {model} {layout}: max|diff| {diff:.2e}, logit range {span:.2f}")
    assert diff <= 1e-4 * span


@pytest.mark.parametrize("model,layout", CASES)
def test_our_converter_writes_what_maxtext_writes(model, layout, tmp_path):
    hf_to_native(str(FIXTURES / model / "hf"), str(tmp_path / "ours"),
                 scan_layers=layout == "scanned", log=lambda *_: None)
    theirs, ours = native_tensors(FIXTURES / model / layout), native_tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for k in theirs:
        assert theirs[k].shape == ours[k].shape, k
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2.0 ** -23, atol=0, err_msg=k)


@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_maxtext_checkpoint_exports_to_hf(model, tmp_path):
    hf_dir = FIXTURES / model / "hf"
    keys = model_keys(load_hf_config(str(hf_dir)))
    native_to_hf(str(FIXTURES / model / "scanned"), str(tmp_path / "hf"), keys=keys,
                 assets=str(hf_dir), log=lambda *_: None)
    a, b = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=2.0 ** -23, atol=0, err_msg=k)
