"""Every family against Hugging Face transformers (PyTorch, CPU): converted weights give the
same logits (padded and packed batches) and the same greedy generations; HF -> native -> HF
and native -> HF -> native round trips; scanned and unscanned layouts hold the same values."""

import dataclasses
import glob

import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import (
    TINY,
    build_hf_model,
    hf_logits,
    hf_tensors,
    native_tensors,
    padded_batch_diff,
    restored_model,
)

from tpusft.conversion.convert import hf_to_native, model_args, native_to_hf
from tpusft.conversion.native import restore_params
from tpusft.models import sampling
from tpusft.models.decoder import create_model

# Its module-scoped fixtures are built once: every test of this file in one xdist worker.
pytestmark = pytest.mark.xdist_group("converted")

FAMILIES = list(TINY)
T = 24  # longer than the sliding windows (8) of the tiny Mistral and Gemma models


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf model, hf dir, native dir (scanned), model keys), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            model = build_hf_model(name)
            model.save_pretrained(d / "hf")
            info = hf_to_native(str(d / "hf"), str(d / "native"), log=lambda *_: None)
            cache[name] = (model, d, info["model_keys"])
        return cache[name]

    return get


def _report(name, what, diff, span):
    print(f"[parity] {name:12s} {what:8s} max|diff| {diff:.2e}  logit range {span:.2f}  "
          f"ratio {diff / span:.1e}")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_padded_and_packed(name, converted):
    hf, d, keys = converted(name)
    model = restored_model(keys, d / "native")
    rng = np.random.default_rng(0)

    # Left-padded batch: row 0 full, row 1 with 7 pad tokens.
    diff, span = padded_batch_diff(hf, model, T)
    _report(name, "padded", diff, span)
    assert diff <= 1e-4 * span

    # Packed row: two sequences (10 and 14 tokens) that must not see each other.
    a, b = rng.integers(3, 256, 10), rng.integers(3, 256, 14)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 10 + [2] * 14])
    pos = np.array([list(range(10)) + list(range(14))])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(pos),
                           segment_ids=jnp.asarray(seg))[0])[0]
    ref_a, ref_b = hf_logits(hf, a[None])[0], hf_logits(hf, b[None])[0]
    ref = np.concatenate([ref_a, ref_b])
    span = float(ref.max() - ref.min())
    diff = float(np.abs(out - ref).max())
    _report(name, "packed", diff, span)
    assert diff <= 1e-4 * span


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_transformers(name, converted):
    import torch

    hf, d, keys = converted(name)
    model = restored_model(keys, d / "native")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, 9).tolist(), rng.integers(3, 256, 5).tolist()]
    new = 12  # prompt + new tokens run past the sliding window
    ours = sampling.generate(model, prompts, max_new_tokens=new, pad_id=0, eos_ids=[])
    for prompt, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                              min_new_tokens=new, pad_token_id=0)
        assert mine == out[0, len(prompt):].tolist(), name


def _inexact(name: str, keys: dict) -> bool:
    """Tensors MaxText's layout stores scaled by a constant that is not a power of two, or
    shifted by 1: their float32 round trip is exact to 1 ulp, not bit for bit."""
    family = keys["model_family"]
    d = keys["head_dim"]
    if family in ("llama3", "mistral", "gemma2") and ("q_proj" in name or "query" in name):
        return np.log2(d) % 2 != 0  # 1/sqrt(head_dim) is a power of two for 4**k
    if family.startswith("gemma"):
        e = keys["base_emb_dim"]
        scaled_embed = ("embed" in name) and np.log2(e) % 2 != 0
        return "norm" in name or scaled_embed
    return False


def _assert_same(a: dict, b: dict, keys: dict):
    assert set(a) == set(b)
    exact = inexact = 0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        if _inexact(k, keys):
            np.testing.assert_allclose(b[k], a[k], rtol=2.0 ** -23, atol=2.0 ** -24, err_msg=k)
            inexact += 1
        else:
            assert np.array_equal(a[k], b[k]), f"{k} is not bit-exact"
            exact += 1
    return exact, inexact


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trips_and_hf_loading(name, converted, tmp_path):
    import transformers

    hf, d, keys = converted(name)
    # HF -> native -> HF: transformers loads it with nothing missing or unexpected.
    back = tmp_path / "back"
    native_to_hf(str(d / "native"), str(back), max_shard_bytes=64 << 10, log=lambda *_: None)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        back, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert len(glob.glob(f"{back}/model-*-of-*.safetensors")) > 1
    assert (back / "model.safetensors.index.json").exists()
    assert (back / "generation_config.json").exists()
    exact, inexact = _assert_same(hf_tensors(d / "hf"), hf_tensors(back), keys)
    print(f"[round trip] {name}: HF->native->HF {exact} tensors bit-exact, {inexact} within "
          f"1 ulp (MaxText-scaled)")
    tokens = np.random.default_rng(2).integers(3, 256, (1, T))
    np.testing.assert_allclose(hf_logits(model.eval(), tokens), hf_logits(hf, tokens),
                               rtol=0, atol=1e-5)

    # native -> HF -> native.
    again = tmp_path / "again"
    hf_to_native(str(back), str(again), log=lambda *_: None)
    _assert_same(native_tensors(d / "native"), native_tensors(again), keys)

    # scanned <-> unscanned: the same values, layer by layer.
    flat = tmp_path / "unscanned"
    hf_to_native(str(d / "hf"), str(flat), scan_layers=False, log=lambda *_: None)
    scanned, unscanned = native_tensors(d / "native"), native_tensors(flat)
    from tpusft.conversion.hf_layout import native_leaves

    by_hf = {}
    for leaf in native_leaves(model_args(keys, True)):
        for p in leaf.pieces:
            block = scanned[leaf.name]
            by_hf[p.hf_name] = block if p.index is None else block[:, p.index]
    for leaf in native_leaves(model_args(keys, False)):
        for p in leaf.pieces:
            assert np.array_equal(unscanned[leaf.name], by_hf[p.hf_name]), leaf.name
    flat_back = tmp_path / "flat_back"
    native_to_hf(str(flat), str(flat_back), log=lambda *_: None)
    _assert_same(hf_tensors(back), hf_tensors(flat_back), keys)


def test_bfloat16_checkpoints_round_trip_bit_exact(tmp_path):
    """bf16 HF weights through a float32 native checkpoint come back bit for bit, including
    the query kernels MaxText scales by 1/sqrt(head_dim) (Mistral: head_dim 8)."""
    import torch

    hf = build_hf_model("mistral").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    hf_to_native(str(tmp_path / "hf"), str(tmp_path / "n"), save_dtype="float32",
                 log=lambda *_: None)
    native_to_hf(str(tmp_path / "n"), str(tmp_path / "back"), save_dtype="bfloat16",
                 log=lambda *_: None)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_sharded_restore_of_converted_checkpoint(converted):
    """A converted checkpoint restores into a model sharded over 8 devices."""
    from tpusft.config.schema import DEFAULT_LOGICAL_AXIS_RULES
    from tpusft.models.sharding import make_mesh

    hf, d, keys = converted("gemma3")
    mesh = make_mesh(1, 4, 2)
    args = dataclasses.replace(model_args(keys, True), dtype="float32")
    with mesh:
        model = create_model(args, mesh, DEFAULT_LOGICAL_AXIS_RULES)
        restore_params(model, str(d / "native"))
        tokens = np.random.default_rng(3).integers(3, 256, (8, 16))
        pos = np.broadcast_to(np.arange(16), (8, 16))
        out = np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos))[0])
    np.testing.assert_allclose(out, hf_logits(hf, tokens), rtol=0, atol=1e-4)
