"""GGUF export: llama.cpp (through llama-cpp-python) runs the exported file and computes
transformers' logits on the same weights; tokenization and the embedded chat template agree
with the Hugging Face tokenizer. Needs the `gguf` extra (`bash tools/setup/setup.sh --gguf`)."""

from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from chat_tokenizers import chat_tokenizer  # noqa: E402
from hf_oracle import build_hf_model  # noqa: E402
from llama_cpp_oracle import CONVERTER, perplexity, their_gguf  # noqa: E402

from tpusft.conversion.gguf_export import hf_to_gguf  # noqa: E402
from tpusft.errors import ConfigError  # noqa: E402

FAMILY = {"llama3": "llama3", "llama3-tied": "llama3", "mistral": "mistral",
          "qwen2": "qwen2.5", "qwen3": "qwen2.5", "gemma2": "gemma", "gemma3": "gemma"}
# llama.cpp's graphs scale queries by 1/sqrt(head_dim) and run Mistral without a window.
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 16}, "mistral": {"sliding_window": None}}
TEXT = "Hello, how are you? what is 2+2"
F32_TOL = 1e-4   # of the logit range
Q8_TOL = 5e-2    # of the logit range (8-bit weights; the greedy check below is the contract)


def _ggml_gelu(model):
    """ggml's CPU GELU reads a table indexed by the float16 input and returns float16; the
    oracle applies the same rounding so that what is compared is the export, not the table."""
    import torch

    class Rounded(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.act(x.to(torch.float16).float()).to(torch.float16).float()

    for mod in list(model.modules()):
        if hasattr(mod, "act_fn"):
            mod.act_fn = Rounded(mod.act_fn)


def _export(tmp_path, name, dtype):
    tok = chat_tokenizer(FAMILY[name])
    model = build_hf_model(name, vocab_size=len(tok) + 3, **OVERRIDES.get(name, {}))
    d = tmp_path / name
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / f"{name}.{dtype}.gguf"
    hf_to_gguf(str(d), str(out), dtype=dtype)
    return model, tok, out


def _llama(path):
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False,
                           type_k=0, type_v=0)  # float32 KV cache


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_f32_logits_match_transformers(tmp_path, name):
    import torch

    model, tok, path = _export(tmp_path, name, "f32")
    llm = _llama(path)
    ids = tok(TEXT).input_ids
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    if name.startswith("gemma"):
        _ggml_gelu(model)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - ref).max() / (ref.max() - ref.min())
    assert err < F32_TOL, f"{name}: {err:.2e} of the logit range"
    rendered = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=tok.eos_token or "",
        bos_token=tok.bos_token or "", add_generation_prompt=True)
    msgs = [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 10+5?"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered(messages=msgs).prompt == want
    llm.close()


@pytest.mark.parametrize("name,dtype", [("llama3", "q8_0"), ("qwen3", "q8_0"),
                                        ("gemma3", "q8_0"), ("llama3-tied", "bf16"),
                                        ("qwen2", "f16")])
def test_quantized_greedy_tokens_match_transformers(tmp_path, name, dtype):
    import torch

    model, tok, path = _export(tmp_path, name, dtype)
    llm = _llama(path)
    ids = tok(TEXT).input_ids
    if name.startswith("gemma"):
        _ggml_gelu(model)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    got = []
    llm.eval(ids)
    for _ in range(16):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        llm.eval([nxt])
    assert got == ref
    llm.close()


def test_unrepresentable_config_is_one_line_error(tmp_path):
    tok = chat_tokenizer("gemma")
    model = build_hf_model("gemma2", vocab_size=len(tok))  # query_pre_attn_scalar 24 != 16
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="query_pre_attn_scalar=24"):
        hf_to_gguf(str(tmp_path / "m"), str(tmp_path / "m.gguf"))
    with pytest.raises(ConfigError, match="dtype 'q4_k'"):
        hf_to_gguf(str(tmp_path / "m"), str(tmp_path / "m.gguf"), dtype="q4_k")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(not (CONVERTER / "convert_hf_to_gguf.py").exists(),
                    reason="llama.cpp's converter is put in .venv by setup.sh --gguf")
def test_quantized_exports_lose_nothing_beyond_llama_cpp_s_own_quantization(tmp_path):
    """Each of llama.cpp's quantizations (q4_0 ... iq4_xs, written by llama.cpp's quantizer
    from the f32 export) loads in llama.cpp, and its perplexity on a fixed text equals that of
    llama.cpp's own converter's f32 file quantized the same way: the export adds nothing to
    what the quantization loses. A tiny Llama whose rows are 256 wide (k-quants' block), so
    the k-quant types themselves are written, not their fallbacks."""
    import gguf

    from tpusft.conversion.gguf_export import QUANTS, quantize

    tok = chat_tokenizer("llama3")
    model = build_hf_model("llama3", vocab_size=len(tok) + 3, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    tokens = [tok.bos_token_id or 1] + tok(TEXT * 4)["input_ids"]
    theirs_f32 = their_gguf(hf, tmp_path / "theirs.f32.gguf")
    ours_f32 = tmp_path / "ours.f32.gguf"
    hf_to_gguf(str(hf), str(ours_f32), dtype="f32")
    assert perplexity(ours_f32, tokens) == pytest.approx(perplexity(theirs_f32, tokens),
                                                         rel=1e-6)
    main_type = {"q4_0": "Q4_0", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K",
                 "q6_k": "Q6_K", "iq4_xs": "IQ4_XS"}
    for outtype in QUANTS:
        ours = tmp_path / f"ours.{outtype}.gguf"
        hf_to_gguf(str(hf), str(ours), dtype=outtype, name="tiny-llama")
        theirs = tmp_path / f"theirs.{outtype}.gguf"
        quantize(str(theirs_f32), str(theirs), outtype)
        types = {t.tensor_type.name for t in gguf.GGUFReader(str(ours)).tensors}
        assert main_type[outtype] in types, (outtype, types)
        assert ours.stat().st_size < ours_f32.stat().st_size / 4, outtype
        assert perplexity(ours, tokens) == pytest.approx(perplexity(theirs, tokens), rel=1e-6), \
            outtype
