"""Where each Hugging Face tensor lives in the native (MaxText) tree, and how it is transformed.

A native leaf is either one tensor or a stack of per-layer tensors along axis 1 (scanned
layers). `native_leaves(args)` lists every leaf with the HF tensors that fill it, in order;
the converters stream over that list one tensor at a time in either direction.

Transforms (HF -> native; each has an exact inverse up to floating-point rounding):
  * kernels: HF [out, in] transposed, then split into heads: query (E, H, D), key/value
    (E, KV, D), out (H, D, E); MLP kernels plain transposes; lm_head -> logits_dense (E, V);
  * Llama and Mistral: q/k in interleaved RoPE order (out[2i] = x[i], out[2i+1] = x[D/2+i]),
    query kernel multiplied by 1/sqrt(head_dim); Gemma 2: the same query factor;
  * Gemma: RMSNorm scales stored as 1 + w, embedding stored times sqrt(emb_dim);
  * q/k/v biases (H*D,) -> (H, D), in the kernels' RoPE order, the query's with the query
    kernel's factor; output and MLP biases as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tpusft.models.decoder import ModelArgs
from tpusft.models.families import (
    ATTN_NORM,
    GEMMA2_SUFFIXES,
    MLP_NORM,
    POST_ATTN_NORM,
    POST_MLP_NORM,
    block_counts,
)

# HF per-layer norm names by role; Llama-shaped models call their pre-MLP norm
# post_attention_layernorm, Gemma uses that name for the norm after attention.
_HF_NORMS_LLAMA = {ATTN_NORM: "input_layernorm", MLP_NORM: "post_attention_layernorm"}
_HF_NORMS_GEMMA = {ATTN_NORM: "input_layernorm", POST_ATTN_NORM: "post_attention_layernorm",
                   MLP_NORM: "pre_feedforward_layernorm",
                   POST_MLP_NORM: "post_feedforward_layernorm"}


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor and where it goes in a native leaf (`index` on axis 1, or None)."""

    hf_name: str
    hf_shape: tuple[int, ...]
    index: int | None
    to_native: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]          # under the tree root, e.g. ('decoder', 'layers', 'mlp', ...)
    shape: tuple[int, ...]         # native shape (stacked: layer axis 1)
    pieces: tuple[Piece, ...]
    # A plain transpose (the untied output layer): HF rows j:k are native columns j:k, so
    # the converters move it in bands and never hold a second whole copy.
    banded: bool = False

    @property
    def stacked(self) -> bool:
        return self.pieces[0].index is not None

    @property
    def name(self) -> str:
        return "/".join(self.path)


BAND_BYTES = 32 << 20


def bands(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [j, k) of about BAND_BYTES each, covering `rows` rows."""
    step = max(1, BAND_BYTES // max(row_bytes, 1))
    return [(j, min(j + step, rows)) for j in range(0, rows, step)]


def transpose(w: np.ndarray, band: int = 16) -> np.ndarray:
    """A contiguous transpose of a 2-D array, copied in bands of rows as plain integers:
    about 4x faster than numpy's strided copy of a large transposed matrix."""
    if w.size < (1 << 16) or w.dtype.itemsize not in (2, 4):
        return np.ascontiguousarray(w.T)
    v = w.view(np.uint16 if w.dtype.itemsize == 2 else np.uint32)
    rows, cols = v.shape
    out = np.empty((cols, rows), v.dtype)
    for i in range(0, rows, band):
        out[:, i:i + band] = v[i:i + band].T
    return out.view(w.dtype)


def _interleave(d: int) -> np.ndarray:
    """Index map HF (half-split) -> interleaved RoPE order on head_dim."""
    return np.stack([np.arange(d // 2), np.arange(d // 2) + d // 2], axis=1).reshape(-1)


def _mul(x: np.ndarray, c: float) -> np.ndarray:
    return (x.astype(np.float32) * np.float32(c)).astype(x.dtype)


def _div(x: np.ndarray, c: float) -> np.ndarray:
    return (x.astype(np.float32) / np.float32(c)).astype(x.dtype)


def _add(x: np.ndarray, c: float) -> np.ndarray:
    return (x.astype(np.float32) + np.float32(c)).astype(x.dtype)


def _kernel(heads: int, d: int, e: int, perm: np.ndarray | None, scale: float):
    """q/k/v: HF [heads*d, e] <-> native [e, heads, d]."""
    inv = None if perm is None else np.argsort(perm)

    def to_native(w):
        w = transpose(w).reshape(e, heads, d)
        if perm is not None:
            w = w[..., perm]
        return w if scale == 1.0 else _mul(w, scale)

    def to_hf(w):
        if scale != 1.0:
            w = _div(w, scale)
        if inv is not None:
            w = w[..., inv]
        return transpose(w.reshape(e, heads * d))

    return to_native, to_hf


def _bias(heads: int, d: int, perm: np.ndarray | None, scale: float = 1.0):
    inv = None if perm is None else np.argsort(perm)

    def to_native(b):
        b = b.reshape(heads, d)
        b = b if perm is None else b[..., perm]
        return b if scale == 1.0 else _mul(b, scale)

    def to_hf(b):
        b = b if scale == 1.0 else _div(b, scale)
        return (b if inv is None else b[..., inv]).reshape(heads * d)

    return to_native, to_hf


def _transpose():
    return transpose, transpose


def _out(h: int, d: int, e: int):
    return ((lambda w: transpose(w).reshape(h, d, e)),
            (lambda w: transpose(w.reshape(h * d, e))))


def _norm(offset: bool):
    if not offset:
        return (lambda w: w), (lambda w: w)
    return (lambda w: _add(w, 1.0)), (lambda w: _add(w, -1.0))


def _layer_params(a: ModelArgs) -> list[tuple[tuple[str, ...], str, tuple, tuple, tuple]]:
    """(native path inside a layer, HF name inside a layer, HF shape, native shape,
    (to_native, to_hf))."""
    fam = a.fam
    e, h, kv, d, m = a.emb_dim, a.num_heads, a.num_kv_heads, a.head_dim, a.mlp_dim
    perm = _interleave(d) if fam.rope_interleaved else None
    hf_norms = _HF_NORMS_GEMMA if fam.sandwich_norms else _HF_NORMS_LLAMA
    out = [((native, "scale"), f"{hf_norms[role]}.weight", (e,), (e,), _norm(fam.norm_offset))
           for role, native in fam.norms.items()]
    sa = "self_attention"
    out += [
        ((sa, "query", "kernel"), "self_attn.q_proj.weight", (h * d, e), (e, h, d),
         _kernel(h, d, e, perm, a.query_fold)),
        ((sa, "key", "kernel"), "self_attn.k_proj.weight", (kv * d, e), (e, kv, d),
         _kernel(kv, d, e, perm, 1.0)),
        ((sa, "value", "kernel"), "self_attn.v_proj.weight", (kv * d, e), (e, kv, d),
         _kernel(kv, d, e, None, 1.0)),
        ((sa, "out", "kernel"), "self_attn.o_proj.weight", (e, h * d), (h, d, e), _out(h, d, e)),
    ]
    same = ((lambda b: b), (lambda b: b))
    if a.qkv_bias:
        out += [((sa, "query", "bias"), "self_attn.q_proj.bias", (h * d,), (h, d),
                 _bias(h, d, perm, a.query_fold)),
                ((sa, "key", "bias"), "self_attn.k_proj.bias", (kv * d,), (kv, d),
                 _bias(kv, d, perm)),
                ((sa, "value", "bias"), "self_attn.v_proj.bias", (kv * d,), (kv, d),
                 _bias(kv, d, None))]
    if a.attention_bias:
        out.append(((sa, "out", "bias"), "self_attn.o_proj.bias", (e,), (e,), same))
    if fam.qk_norm:
        out += [((sa, "query_norm", "scale"), "self_attn.q_norm.weight", (d,), (d,),
                 _norm(fam.norm_offset)),
                ((sa, "key_norm", "scale"), "self_attn.k_norm.weight", (d,), (d,),
                 _norm(fam.norm_offset))]
    out += [(("mlp", "wi_0", "kernel"), "mlp.gate_proj.weight", (m, e), (e, m), _transpose()),
            (("mlp", "wi_1", "kernel"), "mlp.up_proj.weight", (m, e), (e, m), _transpose()),
            (("mlp", "wo", "kernel"), "mlp.down_proj.weight", (e, m), (m, e), _transpose())]
    if a.mlp_bias:
        out += [(("mlp", "wi_0", "bias"), "mlp.gate_proj.bias", (m,), (m,), same),
                (("mlp", "wi_1", "bias"), "mlp.up_proj.bias", (m,), (m,), same),
                (("mlp", "wo", "bias"), "mlp.down_proj.bias", (e,), (e,), same)]
    return out


def _placement(a: ModelArgs, layer: int) -> tuple[tuple[str, ...], int | None, str, int | None]:
    """(unit path, index on the stacked axis or None, name suffix, stack size) of a layer."""
    fam = a.fam
    if fam.block_style == "suffix":
        sfx = GEMMA2_SUFFIXES[layer % 2]
        if a.scan_layers:
            return ("decoder", "layers"), layer // 2, sfx, a.num_layers // 2
        return ("decoder", f"layers_{layer // 2}"), None, sfx, None
    if not a.scan_layers:
        return ("decoder", f"layers_{layer}"), None, "", None
    if fam.block_style == "nested":
        blocks, _ = block_counts(fam, a.num_layers)
        if layer < blocks * fam.period:
            return ("decoder", "layers", f"layers_{layer % fam.period}"), layer // fam.period, "", \
                blocks
        return ("decoder", "layers_remainder", f"layers_{layer - blocks * fam.period}"), None, \
            "", None
    return ("decoder", "layers"), layer, "", a.num_layers


def native_leaves(a: ModelArgs, hf_prefix: str = "model.",
                  lm_head: str = "lm_head.weight") -> list[Leaf]:
    """Every native parameter leaf, in a fixed order, with the HF tensors that make it."""
    fam = a.fam
    e, v = a.emb_dim, a.vocab_size
    leaves: list[Leaf] = []
    scale = float(np.sqrt(e)) if fam.embed_scaled else 1.0
    emb = ((lambda w: _mul(w, scale)), (lambda w: _div(w, scale))) if fam.embed_scaled \
        else ((lambda w: w), (lambda w: w))
    leaves.append(Leaf(("token_embedder", "embedding"), (v, e),
                       (Piece(f"{hf_prefix}embed_tokens.weight", (v, e), None, *emb),)))

    grouped: dict[tuple[str, ...], list[Piece]] = {}
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for layer in range(a.num_layers):
        unit, index, sfx, stack = _placement(a, layer)
        for inner, hf_name, hf_shape, shape, (to_native, to_hf) in _layer_params(a):
            path = (*unit, inner[0] + sfx, *inner[1:])
            piece = Piece(f"{hf_prefix}layers.{layer}.{hf_name}", hf_shape, index, to_native,
                          to_hf)
            grouped.setdefault(path, []).append(piece)
            shapes[path] = shape if stack is None else (shape[0], stack, *shape[1:])
    leaves += [Leaf(path, shapes[path], tuple(pieces)) for path, pieces in grouped.items()]

    leaves.append(Leaf(("decoder", "decoder_norm", "scale"), (e,),
                       (Piece(f"{hf_prefix}norm.weight", (e,), None,
                              *_norm(fam.norm_offset)),)))
    if not a.tie_embeddings:
        leaves.append(Leaf(("decoder", "logits_dense", "kernel"), (e, v),
                           (Piece(lm_head, (v, e), None, *_transpose()),), banded=True))
    return leaves


def adapter_transforms(a: ModelArgs, proj: str):
    """(to_hf, to_native) of a LoRA adapter on projection `proj` (a native name).

    Native: lora_a [input dims..., r], lora_b [r, output dims...] (one layer). PEFT: lora_A
    [r, in], lora_B [out, r], with B @ A the HF kernel's update: the same head split, RoPE
    order and query factor as the kernel itself, applied to B's output side.
    """
    h, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    if proj in ("query", "key", "value"):
        heads = h if proj == "query" else kv
        perm = _interleave(d) if a.fam.rope_interleaved and proj != "value" else None
        inv = None if perm is None else np.argsort(perm)
        scale = a.query_fold if proj == "query" else 1.0

        def to_hf(la, lb):
            r = lb.shape[0]
            lb = lb if scale == 1.0 else _div(lb, scale)
            lb = lb if inv is None else lb[..., inv]
            return np.ascontiguousarray(la.T), np.ascontiguousarray(lb.reshape(r, -1).T)

        def to_native(A, B):
            r = A.shape[0]
            lb = B.T.reshape(r, heads, d)
            lb = lb if perm is None else lb[..., perm]
            return np.ascontiguousarray(A.T), np.ascontiguousarray(
                lb if scale == 1.0 else _mul(lb, scale))

        return to_hf, to_native
    if proj == "out":
        return ((lambda la, lb: (np.ascontiguousarray(la.reshape(h * d, -1).T),
                                 np.ascontiguousarray(lb.T))),
                (lambda A, B: (np.ascontiguousarray(A.T.reshape(h, d, -1)),
                               np.ascontiguousarray(B.T))))
    return ((lambda la, lb: (np.ascontiguousarray(la.T), np.ascontiguousarray(lb.T))),
            (lambda A, B: (np.ascontiguousarray(A.T), np.ascontiguousarray(B.T))))
