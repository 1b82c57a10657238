"""Hugging Face directory (or native checkpoint, through its HF export) -> one GGUF file that
llama.cpp loads, written with llama.cpp's own `gguf` package.

Tensors stream: the header is laid out from the safetensors metadata alone, then each
tensor is read, put in llama.cpp's layout, converted and written before the next is read,
so peak memory is about one tensor (in float32) over the interpreter.

What llama.cpp's graph for an architecture cannot express is refused in one line rather
than written into a file that loads and computes something else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpusft.errors import ConfigError, RunFailed

DTYPES = ("f32", "f16", "bf16", "q8_0")  # written here, tensor by tensor
# Written by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) from the f32
# file above: its mixes (q4_k_m keeps some tensors at q6_k) and its fallbacks for rows that
# are not a multiple of a k-quant's 256-value block.
QUANTS = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS"}
OUTTYPES = (*DTYPES, *QUANTS)
# HF model_type -> llama.cpp architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
         "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
GEMMA = ("gemma2", "gemma3")


@dataclass
class Planned:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: Any
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def _text_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    cfg = json.loads(path.read_text())
    return {**cfg, **cfg["text_config"]} if "text_config" in cfg else cfg


def _rope(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if layer_type and layer_type in rp:
        rp = rp[layer_type]
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return {"type": rp.get("rope_type", rp.get("type", "default")), "theta": theta, **rp}


def _llama3_rope_factors(rp: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's RoPE scaling (llama.cpp's rope_freqs tensor)."""
    inv = 1.0 / rp["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    out = np.where(wavelen < old / hi, 1.0,
                   np.where(wavelen > old / lo, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


def _layer_types(cfg: dict[str, Any], arch: str) -> list[str] | None:
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    if arch == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if arch == "gemma3":
        p = cfg.get("sliding_window_pattern", 6)
        return ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(n)]
    return None


def _write_hparams(w, cfg: dict[str, Any], arch: str, vocab: int) -> list[str]:
    """Architecture metadata; returns notes for the user."""
    notes: list[str] = []
    n_layer, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    ctx = cfg.get("max_position_embeddings", 8192)
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    want = "gelu_pytorch_tanh" if arch in GEMMA else "silu"
    if act != want:
        raise ConfigError(f"GGUF export: hidden activation {act!r} is not what llama.cpp's "
                          f"{arch} graph computes ({want})")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and arch != "qwen2":
            raise ConfigError(f"GGUF export: {key}=true is not supported by llama.cpp's {arch} "
                              "graph")
    if arch == "llama" and cfg.get("sliding_window"):
        ctx = min(ctx, cfg["sliding_window"])
        notes.append(f"sliding_window={cfg['sliding_window']}: llama.cpp's llama graph attends "
                     f"to all positions, so the context length is written as {ctx}")
    if arch == "qwen2" and cfg.get("use_sliding_window"):
        raise ConfigError("GGUF export: qwen2 with use_sliding_window=true is not supported by "
                          "llama.cpp")
    if arch in GEMMA:
        scalar = cfg.get("query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            raise ConfigError(f"GGUF export: query_pre_attn_scalar={scalar} differs from "
                              f"head_dim={head_dim}; llama.cpp's {arch} graph scales queries "
                              "by 1/sqrt(head_dim)")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(vocab)

    import gguf

    types = _layer_types(cfg, arch)
    rp = _rope(cfg, "full_attention" if arch == "gemma3" else None)
    w.add_rope_freq_base(float(rp["theta"]))
    if rp["type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rp["type"] == "yarn":
        raise ConfigError("GGUF export: yarn RoPE scaling is not written yet; convert without "
                          "rope scaling or open an issue")
    elif rp["type"] not in ("default", "llama3"):
        raise ConfigError(f"GGUF export: RoPE type {rp['type']!r} is not supported")
    if arch in GEMMA:
        w.add_sliding_window(int(cfg["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if arch == "gemma3":
            local = _rope(cfg, "sliding_attention")
            if local["type"] != "default":
                raise ConfigError("GGUF export: scaled RoPE on Gemma 3's sliding layers is not "
                                  "representable in llama.cpp")
            w.add_rope_freq_base_swa(float(local["theta"]))
        if cfg.get("attn_logit_softcapping"):
            if arch == "gemma3":
                raise ConfigError("GGUF export: llama.cpp's gemma3 graph has no attention "
                                  "logit soft-capping")
            w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    elif types and any(t != "full_attention" for t in types) and arch != "llama":
        raise ConfigError(f"GGUF export: layer_types {sorted(set(types))} are not supported "
                          f"for {arch}")
    return notes


# ---------------------------------------------------------------- tokenizer

_LLAMA3_DIGITS = "\\p{N}{1,3}"


def _pre_tokenizer_name(tj: dict[str, Any]) -> str:
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"]:
        pattern = parts[0].get("pattern", {}).get("Regex", "")
        if _LLAMA3_DIGITS in pattern:
            return "llama-bpe"
        if "\\p{N}|" in pattern or "\\p{N}| ?" in pattern:
            return "qwen2"
    raise ConfigError(f"GGUF export: unrecognised pre-tokenizer {kinds}; pass --tokenizer-pre "
                      "with llama.cpp's name for it (gpt-2, llama-bpe, qwen2, smollm, ...)")


def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE stores)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + \
        list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _write_tokenizer(w, hf_dir: Path, vocab_rows: int, pre_override: str | None) -> None:
    import gguf
    from transformers import AutoTokenizer

    tj_path = hf_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise ConfigError(f"{hf_dir}: no tokenizer.json; GGUF export needs a fast tokenizer "
                          "(save it with tokenizer.save_pretrained)")
    tj = json.loads(tj_path.read_text())
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = tj["model"]["type"]
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    n = max(id_to_tok) + 1
    if n > vocab_rows:
        raise ConfigError(f"GGUF export: the tokenizer has {n} tokens but the embedding only "
                          f"{vocab_rows} rows")
    special = {a.content for a in tok.added_tokens_decoder.values() if a.special}
    added = {a.content for a in tok.added_tokens_decoder.values()}
    merges: list[str] = []
    if model == "BPE" and tj["model"].get("byte_fallback"):
        raise ConfigError("GGUF export: SentencePiece-style (byte-fallback) BPE tokenizers are "
                          "not written yet; only byte-level BPE")
    if model == "BPE":
        pre = pre_override or _pre_tokenizer_name(tj)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        text = lambda t: t  # noqa: E731  (stored byte-level already)
    elif model == "WordLevel":
        # A character-level vocabulary: stored as byte-level BPE without merges, each
        # character as its byte-level spelling, so llama.cpp's BPE yields the same ids.
        enc = _byte_encoder()
        for t in id_to_tok.values():
            if t not in added and len(t.encode()) != 1:
                raise ConfigError(f"GGUF export: word-level token {t!r} is not one byte; only "
                                  "character-level word vocabularies are written")
        pre = pre_override or "gpt-2"
        text = lambda t: t if t in added else enc[t.encode()[0]]  # noqa: E731
        # llama.cpp requires a merges array and the writer cannot store an empty one: one
        # merge of the bytes 0x00 and 0x01, which no token of such a vocabulary contains.
        merges = [f"{enc[0]} {enc[1]}"]
        if any(t in (enc[0], enc[1]) for t in map(text, id_to_tok.values())):
            raise ConfigError("GGUF export: a character vocabulary with the bytes 0x00/0x01 "
                              "is not supported")
    else:
        raise ConfigError(f"GGUF export: tokenizer model {model!r} is not supported (byte-level "
                          "BPE or a character-level WordLevel vocabulary)")
    tokens, types = [], []
    for i in range(vocab_rows):
        t = id_to_tok.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text(t))
            types.append(gguf.TokenType.CONTROL if t in special else
                         gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    probe = tok("a").input_ids
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_add_bos_token(bool(probe) and probe[0] == tok.bos_token_id)
    w.add_add_eos_token(bool(probe) and probe[-1] == tok.eos_token_id and len(probe) > 1)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
        from tpusft.data.chat import end_of_turn_id

        eot = end_of_turn_id(tok)
        if eot is not None:
            w.add_eot_token_id(eot)


# ---------------------------------------------------------------- tensors

def _permute_rope(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF Llama's half-split q/k rows -> llama.cpp's interleaved (NORM rope) rows."""
    def f(x: np.ndarray) -> np.ndarray:
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]) \
            .swapaxes(1, 2).reshape(x.shape)
    return f


def _plan(cfg: dict[str, Any], arch: str, dtype: str,
          meta: dict[str, tuple[tuple[int, ...], str]]) -> list[Planned]:
    import gguf

    q = gguf.GGMLQuantizationType
    main = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    plans, unmapped = [], []
    for hf_name, (shape, _) in meta.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(hf_name)
            continue
        transform = None
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            transform = _permute_rope(n_head if "q_proj" in hf_name else n_kv)
        if arch in GEMMA and hf_name.endswith("norm.weight"):
            transform = _plus_one
        if len(shape) == 1:
            qtype = q.F32
        elif main == q.Q8_0 and shape[-1] % 32:
            qtype = q.F16
        else:
            qtype = main
        plans.append(Planned(name, hf_name, tuple(shape), qtype, transform))
    if unmapped:
        raise ConfigError(f"GGUF export: no llama.cpp name for {len(unmapped)} tensor(s) of "
                          f"{arch}, e.g. {', '.join(unmapped[:3])}")
    if cfg.get("tie_word_embeddings") and any(p.gguf_name == "output.weight" for p in plans):
        plans = [p for p in plans if p.gguf_name != "output.weight"]
    return plans


def _plus_one(x: np.ndarray) -> np.ndarray:
    return x + 1.0


def hf_to_gguf(hf_dir: str, output: str, *, dtype: str = "f16",
               tokenizer_pre: str | None = None, name: str | None = None) -> dict[str, Any]:
    import gguf

    from tpusft.conversion.streaming import SafetensorsReader

    if dtype in QUANTS:
        out = Path(output)
        full = out.with_name(out.name + ".f32.partial")
        try:
            info = hf_to_gguf(hf_dir, str(full), dtype="f32", tokenizer_pre=tokenizer_pre,
                              name=name)
            quantize(str(full), output, dtype)
        finally:
            full.unlink(missing_ok=True)
        return {**info, "bytes": out.stat().st_size}
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF export: dtype {dtype!r} is not one of {', '.join(OUTTYPES)}")
    src = Path(hf_dir)
    cfg = _text_config(src)
    model_type = cfg.get("model_type", "")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(f"GGUF export: model_type {model_type!r} has no llama.cpp writer here; "
                          f"supported: {', '.join(sorted(ARCHS))}")
    reader = SafetensorsReader(str(src))  # opens a file per tensor: nothing stays mapped
    meta = {n: reader.header(n) for n in reader.names()}
    plans = _plan(cfg, arch, dtype, meta)
    embed = next(p for p in plans if p.gguf_name == "token_embd.weight")
    vocab_rows = embed.shape[0]

    out = Path(output)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or src.name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes = _write_hparams(w, cfg, arch, vocab_rows)
    _write_tokenizer(w, src, vocab_rows, tokenizer_pre)

    extra: list[tuple[str, np.ndarray]] = []
    rp = _rope(cfg)
    if rp["type"] == "llama3":
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        extra.append(("rope_freqs.weight", _llama3_rope_factors(rp, head_dim)))
    for tname, arr in extra:
        w.add_tensor_info(tname, arr.shape, arr.dtype, arr.nbytes)
    for p in plans:
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(p.gguf_name, p.shape, np.dtype(dt),
                              int(np.prod(p.shape)) * np.dtype(dt).itemsize)
        else:
            bshape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
            w.add_tensor_info(p.gguf_name, bshape, np.dtype(np.uint8), int(np.prod(bshape)),
                              raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for _, arr in extra:
        w.write_tensor_data(arr)
        total += arr.nbytes
    for p in plans:
        x = reader.get(p.hf_name).astype(np.float32, copy=False)
        if p.transform is not None:
            x = p.transform(x)
        data = gguf.quants.quantize(x, p.qtype)
        del x
        w.write_tensor_data(data)
        total += data.nbytes
        del data
    w.close()
    tmp.replace(out)
    return {"tensors": len(plans) + len(extra), "bytes": total, "arch": arch, "notes": notes}


def quantize(source: str, output: str, outtype: str) -> None:
    """`source` (an f32 or f16 GGUF file) quantized to `outtype` (a QUANTS name) by llama.cpp's
    quantizer, written to `output` through a .partial file. Its per-tensor log is kept and
    shown only when it fails."""
    import ctypes
    import os
    import tempfile

    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"{outtype} is written by llama.cpp's quantizer, in the gguf extra: "
                          f"bash tools/setup/setup.sh --gguf") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[outtype])
    params.nthread = os.cpu_count() or 1
    out = Path(output)
    tmp = out.with_name(out.name + ".partial")
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # llama.cpp logs each tensor to the process's stderr
        try:
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                                  ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if code != 0 or not tmp.exists():
            log.seek(0)
            said = [line for line in log.read().decode(errors="replace").splitlines()
                    if line.strip()]
            tmp.unlink(missing_ok=True)
            raise RunFailed(f"llama.cpp's quantizer could not write {outtype} ({code}): "
                            f"{said[-1] if said else 'no message'}")
    tmp.replace(out)
