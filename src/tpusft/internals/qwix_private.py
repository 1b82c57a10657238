"""Every Qwix private name tpusft uses, and why, in one place (qwix 0.1.8).

QLoRA's nf4 base kernels are quantized by `qwix.quantize` and dequantized with Qwix's own NF4
table (the QLoRA paper's, Appendix E), read here from `qwix._src.core.numerics`, the only
place Qwix offers it. tpusft looks codes up in it elementwise instead of through
`qwix.dequantize`, whose gather over the flattened kernel made the TPU compiler hold
gigabytes of temporaries (Llama 3.2 1B, v5e-8: 4.74 GiB against 0.47). `NAMES` lists each
name with the parameters tpusft passes; tests/test_internals.py checks that every one still
exists as used.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from qwix._src.core import numerics

from tpusft.internals import missing_names

VERSION = "0.1.8"

# (owner, name, parameters it is called with, in order)
NAMES: tuple[tuple[Any, str, tuple[str, ...]], ...] = (
    (numerics, "get_nf4_buckets", ()),
)


def missing() -> list[str]:
    """The entries of NAMES this library lacks or has with other parameters, one line each."""
    return missing_names(NAMES)


@functools.cache
def nf4_table() -> tuple[float, ...]:
    """The 16 NF4 values, code 0 to 15, as Qwix quantizes to them."""
    with jax.ensure_compile_time_eval():
        return tuple(float(v) for v in numerics.get_nf4_buckets())
