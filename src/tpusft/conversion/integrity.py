"""Checkpoint contents that can be checked: a fingerprint of every stored array.

Each training checkpoint carries, in its Orbax metadata (written in the same atomic commit as
the arrays), one 32-bit fingerprint per array of the model and optimizer state. At restore the
restored arrays are fingerprinted again and compared, so a truncated, deleted or altered file
is found before training goes on from it. The fingerprint of an array is the sum, modulo 2^32,
of its 32-bit words times odd weights that depend on each word's position: any one changed
word changes it for certain (an odd weight is invertible modulo 2^32), and integer sums are
exact in any reduction order, so sharded and unsharded arrays give the same value. It is one
fused pass over the state on the device, cheap next to the write itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FINGERPRINTS_KEY = "tpusft_fingerprints"
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant (odd)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (one per element; 64-bit elements give two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    kind = jnp.finfo if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.iinfo
    size = kind(x.dtype).bits
    if size == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 16:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if size == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2
    return x.astype(jnp.int32).astype(jnp.uint32)  # sub-byte integers (int4, nf4 codes)


def _fingerprint(x: jax.Array) -> jax.Array:
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = np.uint32(1)
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * stride
        stride = np.uint32((int(stride) * words.shape[axis]) % 2**32)
    weight = (index * np.uint32(2) + np.uint32(1)) * _GOLDEN
    return jnp.sum(words * weight, dtype=jnp.uint32)


@jax.jit
def _summaries(leaves: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    prints = [_fingerprint(x) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.bool_(True) for x in leaves]
    return prints, finite


def array_leaves(tree: Any) -> list[tuple[str, jax.Array]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            name = jax.tree_util.keystr(path).replace(".value", "")
            out.append((name, leaf))
    return out


def summarize(trees: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """({item/path: fingerprint}, [item/path of arrays holding NaN or inf]) of named trees
    (None entries skipped)."""
    named = [(f"{item}{name}", leaf) for item, tree in trees.items() if tree is not None
             for name, leaf in array_leaves(tree)]
    if not named:
        return {}, []
    prints, finite = jax.device_get(_summaries([leaf for _, leaf in named]))
    fingerprints = {name: int(p) for (name, _), p in zip(named, prints, strict=True)}
    bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
    return fingerprints, bad


def compare(stored: dict[str, int], restored: dict[str, int]) -> str | None:
    """None when the restored arrays are the stored ones, else what differs (one line)."""
    missing = sorted(set(stored) - set(restored))
    changed = sorted(k for k in set(stored) & set(restored) if stored[k] != restored[k])
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"the contents of {changed[0]}{more} differ from what was saved (checksum)"
    if missing:
        return f"{missing[0]} was saved but not restored"
    return None


def fingerprint(array) -> int:
    """One array's fingerprint (as `summarize` gives it), for arrays read one at a time."""
    return int(jax.device_get(jax.jit(_fingerprint)(jnp.asarray(array))))


def saved_model_fingerprints(step_dir) -> dict[str, int]:
    """The fingerprints a training run wrote for a checkpoint step's model parameters
    ({} for a checkpoint written by a converter or MaxText, which records none)."""
    import json

    meta = step_dir / "_CHECKPOINT_METADATA"
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    prints = (record.get("custom_metadata") or {}).get(FINGERPRINTS_KEY) or {}
    return {k: v for k, v in prints.items() if k.startswith("model_params")}


def metadata_problem(step_dir) -> str | None:
    """What makes a checkpoint step's metadata file (`_CHECKPOINT_METADATA`: the step's
    fingerprints and data position) unreadable; None when it reads, or is absent (a
    converter's or MaxText's checkpoint)."""
    import json

    meta = step_dir / "_CHECKPOINT_METADATA"
    try:
        if not meta.exists():
            return None
        json.loads(meta.read_text())
        return None
    except (OSError, ValueError) as e:
        return f"its metadata cannot be read ({' '.join(str(e).split())[:160]})"


def leaf_name(rel: tuple[str, ...]) -> str:
    """The fingerprint name of a model parameter at path `rel` (decoder, layers, ...)."""
    return "model_params" + "".join(f"[{k!r}]" for k in rel)


def first_changed(saved: dict[str, int], now: dict[str, int]) -> str | None:
    """What differs between the saved fingerprints and those of the arrays read (only the
    arrays read are compared), in one line; None when nothing does."""
    changed = sorted(k for k in now if k in saved and saved[k] != now[k])
    if not changed:
        return None
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    return f"the contents of {changed[0]}{more} differ from what was saved (checksum)"


def unreadable(error: Exception) -> str:
    """What a checkpoint whose arrays cannot be read (truncated or missing files) says."""
    return f"its arrays cannot be read ({' '.join(str(error).split())[:160]})"
