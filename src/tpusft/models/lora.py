"""LoRA adapters inside the decoder: which projections get them, their shapes and logical
axes (sharded like the base kernel's input and output dims, stacked over layers like the
rest), the adapted projection, and merging.

A projection's kernel has input dims then output dims (query: embed | heads, head_dim;
out: heads, head_dim | embed). Its adapter is lora_a [input dims..., rank] and lora_b [rank,
output dims...], both nnx.LoRAParam, so Tunix's trainer trains exactly these; the output is
x @ kernel + (alpha / rank) * (dropout(x) @ lora_a) @ lora_b, and lora_b starts at zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from tpusft.internals import qwix_private

# MaxText name -> (HF / PEFT name, number of input dims of the kernel)
PROJECTIONS = {"query": ("q_proj", 1), "key": ("k_proj", 1), "value": ("v_proj", 1),
               "out": ("o_proj", 2), "wi_0": ("gate_proj", 1), "wi_1": ("up_proj", 1),
               "wo": ("down_proj", 1)}
ATTENTION = ("query", "key", "value", "out")
MLP = ("wi_0", "wi_1", "wo")
RANK_AXIS = "lora_rank"  # no mesh axis: the rank dimension is replicated
_BY_HF = {hf: native for native, (hf, _) in PROJECTIONS.items()}
QTYPES = {"nf4": "nf4", "int8": jnp.int8}
BLOCK = 64  # quantization block along a kernel's first input dim (bitsandbytes' NF4 block)


class QuantizedWeight(nnx.Variable):
    """A frozen base kernel in quantized form (QLoRA): no gradient, no optimizer state."""


def pack_nf4(codes: jax.Array) -> jax.Array:
    """nf4 codes (Qwix's uint4) as uint8, two neighbours along the last axis per byte (low
    nibble first), so the model holds 4 bits a weight without uint4 arrays: the TPU compiler
    (libtpu 0.0.42.1) rejects the backward layer scan of a model holding uint4 kernels with
    a cycle error (Llama 3.2 1B at LoRA rank 16 or 32). An odd last axis stays one code a
    byte."""
    c = codes.astype(jnp.uint8)
    if c.shape[-1] % 2:
        return c
    pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nf4(packed: jax.Array, width: int) -> jax.Array:
    """pack_nf4's codes back, as uint8, for a kernel whose last axis is width."""
    if packed.shape[-1] == width:
        return packed
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], width)


def nf4_values(codes: jax.Array, dtype) -> jax.Array:
    """Qwix's NF4 value of every code, looked up elementwise (a select per table entry), which
    the TPU compiler fuses into the matmul's operand; Qwix's own lookup gathers over the
    flattened kernel (internals/qwix_private.py)."""
    table = qwix_private.nf4_table()
    out = jnp.full(codes.shape, table[0], dtype)
    for i, v in enumerate(table[1:], 1):
        out = jnp.where(codes == i, jnp.asarray(v, dtype), out)
    return out


def dequantize(qvalue: jax.Array, scale: jax.Array, qtype: str, dtype) -> jax.Array:
    """A base kernel stored by quantize_base, back in dtype: Qwix's values times the scale of
    each block (tests/test_lora.py holds it to qwix.dequantize)."""
    if qtype != "nf4":
        return qwix.dequantize(qwix.QArray(qvalue, scale, None, QTYPES[qtype])).astype(dtype)
    values = nf4_values(unpack_nf4(qvalue, scale.shape[-1]), jnp.float32)
    tiles = values.reshape(scale.shape[0], -1, *values.shape[1:])
    return (tiles * scale[:, None]).reshape(values.shape).astype(dtype)


# What the forward pass reads: parameters (adapters included) and quantized base kernels.
WEIGHTS = nnx.Any(nnx.Param, QuantizedWeight)


def target_modules(value: str | list) -> frozenset[str]:
    """lora.target_modules -> native projection names; raises ValueError naming bad ones."""
    items = [value] if isinstance(value, str) else list(value)
    out: set[str] = set()
    for item in items:
        name = str(item).strip()
        if name in ("all-linear", "all_linear"):
            out.update(PROJECTIONS)
        elif name == "attention":
            out.update(ATTENTION)
        elif name == "mlp":
            out.update(MLP)
        elif name in PROJECTIONS:
            out.add(name)
        elif name in _BY_HF:
            out.add(_BY_HF[name])
        else:
            raise ValueError(f"lora.target_modules: unknown module {name!r}; use all-linear, "
                             f"attention, mlp or {', '.join(p for p, _ in PROJECTIONS.values())}")
    if not out:
        raise ValueError("lora.target_modules names no module")
    return frozenset(out)


def adapter_shapes(kernel_shape: tuple[int, ...], axes: tuple[str, ...], n_in: int, rank: int):
    """((a_shape, a_axes), (b_shape, b_axes)) of one (unstacked) kernel's adapter."""
    return ((tuple(kernel_shape[:n_in]) + (rank,), tuple(axes[:n_in]) + (RANK_AXIS,)),
            ((rank,) + tuple(kernel_shape[n_in:]), (RANK_AXIS,) + tuple(axes[n_in:])))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout (PEFT's lora_dropout, torch.nn.Dropout): each element is zeroed with
    probability `rate` and the rest are divided by 1 - rate, so the expectation is x."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def matmul(x: jax.Array, kernel: jax.Array, n_in: int, **kw) -> jax.Array:
    """x's last n_in dims contracted with kernel's first n_in, as one 2-D matmul with the
    leading dims flattened into rows. The backward pass's weight gradient then contracts a
    single dimension, which XLA's CPU backend runs without the transposed copies the
    equivalent einsum makes (a Llama MLP's forward and backward at batch 4 x 512, emb 768,
    mlp 2048, on 2 CPU cores: 300 ms instead of 455)."""
    lead, k_in, k_out = x.shape[:-n_in], kernel.shape[:n_in], kernel.shape[n_in:]
    y = jnp.matmul(x.reshape(-1, math.prod(k_in)), kernel.reshape(math.prod(k_in), -1), **kw)
    return y.reshape(*lead, *k_out)


def project(x: jax.Array, p: dict, spec: str, n_in: int, lora: tuple[float, str],
            drop: tuple[float, jax.Array] | None = None) -> jax.Array:
    """einsum(spec) of x with p's kernel (dequantized with Qwix when stored quantized), plus
    the adapter's low-rank update if p has one. `lora` is (alpha / rank, qtype); `drop`, when
    given, is (rate, key) of the dropout on the adapter's input (training only; the base
    projection always sees x itself).

    spec is "<x dims>,<kernel dims>-><out dims>", the kernel's first n_in dims contracted.
    """
    scale, qtype = lora
    if "kernel" in p:
        kernel = p["kernel"]
    else:
        kernel = dequantize(p["kernel_q"], p["kernel_scale"], qtype, x.dtype)
    y = matmul(x, kernel, n_in)
    if "lora_a" not in p:
        return y
    lhs, out = spec.split("->")
    xs, ks = lhs.split(",")
    k_in, k_out = ks[:n_in], ks[n_in:]
    mid = "".join(c for c in xs if c not in k_in) + "r"
    if drop is not None:
        x = dropout(x, *drop)
    t = jnp.einsum(f"{xs},{k_in}r->{mid}", x, p["lora_a"])
    return y + scale * jnp.einsum(f"{mid},r{k_out}->{out}", t, p["lora_b"])


def delta(a: jax.Array, b: jax.Array, n_in: int, scale: float, stacked: bool) -> jax.Array:
    """The kernel update scale * a @ b (stacked adapters keep the layer axis at 1)."""
    if stacked:
        a, b = jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)
        return jnp.moveaxis(jax.vmap(lambda x, y: delta(x, y, n_in, scale, False))(a, b), 0, 1)
    in_shape, out_shape = a.shape[:-1], b.shape[1:]
    d = a.reshape(-1, a.shape[-1]).astype(jnp.float32) @ b.reshape(b.shape[0], -1).astype(
        jnp.float32)
    return scale * d.reshape(*in_shape, *out_shape)


def adapters(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, module) of every projection module that carries an adapter."""
    return [(path, m) for path, m in nnx.iter_modules(model) if hasattr(m, "lora_a")]


def count(model: nnx.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters)."""
    def size(state) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(state))

    return size(nnx.state(model, nnx.LoRAParam)), size(nnx.state(model, nnx.Param))


def merge(model: nnx.Module, scale: float, scanned: bool) -> None:
    """Folds every adapter into its kernel and deletes it (in place)."""
    for path, m in adapters(model):
        name = next(k for k in reversed(path) if k in PROJECTIONS)
        n_in = PROJECTIONS[name][1]
        k = m.kernel[...]
        m.kernel[...] = (k.astype(jnp.float32) + delta(m.lora_a[...], m.lora_b[...], n_in, scale,
                                                       scanned)).astype(k.dtype)
        del m.lora_a, m.lora_b


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of the base weights as stored (quantized values at their bit width)."""
    total = 0
    for x in jax.tree.leaves(nnx.state(model, nnx.All(WEIGHTS, nnx.Not(nnx.LoRAParam)))):
        total += x.size * jnp.iinfo(x.dtype).bits // 8 if jnp.issubdtype(x.dtype, jnp.integer) \
            else x.size * x.dtype.itemsize
    return int(total)


def _placed_like(value: jax.Array, kernel: nnx.Variable) -> QuantizedWeight:
    """`value` (a kernel's codes or scales) as a QuantizedWeight sharded as `kernel` is, on
    every axis whose size the kernel's mesh axes divide (replicated on the others), with the
    sharding recorded as the kernel's is, so a shapes-only build places it too."""
    meta = kernel.get_metadata()
    spec, mesh = meta.get("out_sharding"), meta.get("mesh")
    if spec is None or mesh is None:  # a model built without a mesh
        return QuantizedWeight(value)
    return QuantizedWeight(value, out_sharding=_fitted(spec, value.shape, mesh), mesh=mesh)


def _fitted(spec, shape: tuple[int, ...], mesh) -> tuple:
    """spec with the mesh axes dropped wherever they do not divide the dimension."""
    def ways(axes) -> int:
        names = axes if isinstance(axes, tuple) else (axes,)
        return math.prod(mesh.shape[a] for a in names)

    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    return tuple(a if a is None or shape[i] % ways(a) == 0 else None
                 for i, a in enumerate(spec))


def quantize_base(model: nnx.Module, qtype: str, scanned: bool) -> int:
    """Replaces every decoder-layer kernel by its Qwix quantization (blocks of BLOCK along the
    first input dim, a scale per block and output channel), in place; returns the number of
    kernels quantized. The embedding, output projection and norms stay as they are."""
    count = 0
    for path, m in nnx.iter_modules(model):
        if not hasattr(m, "kernel") or "decoder" not in path or "logits_dense" in path:
            continue
        k = m.kernel[...]
        layer_axis = {1} if scanned and "layers" in path else set()
        channels = tuple(i for i in range(1, k.ndim) if i not in layer_axis) + tuple(layer_axis)
        tiled = {0: BLOCK} if k.shape[0] % BLOCK == 0 and k.shape[0] > BLOCK else {}
        if not tiled:
            channels = tuple(i for i in range(1, k.ndim))
        q = qwix.quantize(k, QTYPES[qtype], channelwise_axes=channels, tiled_axes=tiled,
                          scale_dtype=jnp.float32)
        qvalue = pack_nf4(q.qvalue) if qtype == "nf4" else q.qvalue
        m.kernel_q = _placed_like(qvalue, m.kernel)
        m.kernel_scale = _placed_like(q.scale, m.kernel)
        del m.kernel
        count += 1
    return count
