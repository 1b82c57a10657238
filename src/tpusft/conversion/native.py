"""Reading parameters from native (MaxText-layout) Orbax checkpoints.

Accepted forms of `load_parameters_path`:
  * a converted/MaxText checkpoint: `<dir>` holding `0/items` (or `<dir>/items`, or the items
    directory itself), tree `params/params/{token_embedder, decoder}`;
  * a training run's checkpoint step `<run>/checkpoints/<step>` (Tunix's `model_params` item,
    the same tree with each leaf stored as `<leaf>/value`);
  * a training run's `<run>/checkpoints` directory: its latest step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from tpusft.errors import CheckpointError


def _is_step_dir(p: epath.Path) -> bool:
    return p.name.isdigit() and p.is_dir()


def resolve(path: str) -> tuple[epath.Path, str]:
    """(directory of the parameter PyTree, 'maxtext' | 'training')."""
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointError(f"load_parameters_path={path!r} does not exist; point it at a "
                              f"converted checkpoint or a run's checkpoints/ directory")
    if not p.is_dir():
        raise CheckpointError(f"load_parameters_path={path!r} is a file, not a checkpoint "
                              f"directory; point it at a converted checkpoint or a run's "
                              f"checkpoints/ directory")
    if (p / "actor").is_dir():  # a GRPO run's checkpoints/ (Tunix's actor trainer)
        p = p / "actor"
    if (p / "model_params").is_dir():
        return p / "model_params", "training"
    if (p / "items").is_dir():
        return p / "items", "maxtext"
    if (p / "0" / "items").is_dir():
        return p / "0" / "items", "maxtext"
    if (p / "_METADATA").exists() or (p / "_sharding").exists():
        return p, "maxtext"
    steps = sorted((q for q in p.iterdir() if _is_step_dir(q)), key=lambda q: int(q.name))
    for step in reversed(steps):
        if (step / "model_params").is_dir():
            return step / "model_params", "training"
        if (step / "items").is_dir():
            return step / "items", "maxtext"
    raise CheckpointError(f"{path!r} is not a native checkpoint (no items/, 0/items/, "
                          f"model_params/ or numbered step directories inside)")


def first_intact(path: str, check: Callable[[epath.Path, str], str | None],
                 print_fn=print) -> tuple[epath.Path, str]:
    """`resolve(path)` whose arrays `check(items, kind)` finds intact (it returns what is
    wrong, or None). A run's checkpoints/ directory falls back to its newest intact step and
    says so; a checkpoint named directly is refused, naming what is damaged."""
    first = resolve(path)
    root = epath.Path(path)
    root = root / "actor" if (root / "actor").is_dir() else root
    steps = []
    if first[1] == "training" and str(first[0].parent.parent) == str(root):  # checkpoints/
        steps = sorted((q for q in root.iterdir() if _is_step_dir(q)
                        and (q / "model_params").is_dir()), key=lambda q: -int(q.name))
    options = [(q / "model_params", "training") for q in steps] or [first]
    problems = []
    for items, kind in options:
        problem = check(items, kind)
        if problem is None:
            if problems:
                print_fn(f"using checkpoint step {items.parent.name} of {path}: the newer "
                         f"{'; '.join(problems)}")
            return items, kind
        if len(options) == 1:
            where = items.parent if kind == "training" else items
            raise CheckpointError(f"checkpoint {where} is damaged: {problem}; use an intact "
                                  f"checkpoint (a run's checkpoints/ directory falls back to "
                                  f"its newest intact step)")
        problems.append(f"step {items.parent.name} is damaged ({problem})")
    raise CheckpointError(f"no intact checkpoint step in {path}: {'; '.join(problems)}")


def _flatten_shapes(tree: Any) -> dict[str, tuple]:
    flat = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in keypath)
        shape = getattr(leaf, "shape", None)
        flat[name] = tuple(shape) if shape is not None else None
    return flat


def restore_params(model: nnx.Module, path: str, lora_only: bool = False) -> str:
    """Loads parameters into `model` (keeping its shardings); returns the directory read.
    The base weights, or with `lora_only` the LoRA adapters (a native adapter checkpoint).
    A training run's checkpoint is checked against the fingerprints the run saved with it
    (first_intact: a damaged step is refused, or skipped in a checkpoints/ directory)."""

    def check(items, kind):
        return _restore_step(model, path, items, kind, lora_only)

    items, _ = first_intact(path, check)
    return str(items)


def unreadable_files(items: epath.Path, kind: str) -> str | None:
    """What makes a checkpoint's metadata or index of arrays unreadable (an empty, truncated
    or overwritten file), before any array is read; None when both read."""
    from tpusft.conversion import integrity
    from tpusft.conversion.streaming import read_index

    problem = integrity.metadata_problem(items.parent) if kind == "training" else None
    return problem or read_index(items)[1]


def _restore_step(model: nnx.Module, path: str, items: epath.Path, kind: str,
             lora_only: bool) -> str | None:
    """Restores one checkpoint into `model`; what is damaged (None: nothing)."""
    from tpusft.conversion import integrity

    if problem := unreadable_files(items, kind):
        return problem
    saved = integrity.saved_model_fingerprints(items.parent) if kind == "training" else {}
    items = items.absolute() if "://" not in str(items) else items
    # The base weights only: LoRA adapters are not part of a base checkpoint.
    params = nnx.state(model, nnx.LoRAParam if lora_only else
                       nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    pure = nnx.to_pure_dict(params)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pure)
    if kind == "training":
        target = jax.tree.map(lambda x: {"value": x}, abstract)
    else:
        target = {"params": {"params": abstract}}

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = checkpointer.metadata(items)
    except Exception as e:  # orbax raises several types for unreadable metadata
        raise CheckpointError(f"cannot read checkpoint metadata in {items}: {e}") from None
    tree = getattr(getattr(meta, "item_metadata", None), "tree", None) or meta
    have = _flatten_shapes(tree)
    want = _flatten_shapes(target)
    missing = [k for k in want if k not in have]
    if missing:
        scanned_model = any("/layers/" in k for k in want)
        unscanned_ckpt = any("/layers_0/" in k for k in have)
        if scanned_model and unscanned_ckpt:
            raise CheckpointError(f"{path} holds unscanned layers (layers_0, ...); set "
                                  f"scan_layers=false or convert it with scan_layers")
        if not scanned_model and any("/layers/" in k for k in have):
            raise CheckpointError(f"{path} holds scanned layers; set scan_layers=true")
        raise CheckpointError(f"{path} does not match the model: missing {missing[0]} "
                              f"(and {len(missing) - 1} more); check model_name")
    for k, shape in want.items():
        if have[k] is not None and tuple(have[k]) != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(have[k])} but model_name "
                                  f"expects {shape}; check model_name and the preset")

    try:
        restored = checkpointer.restore(items, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    except Exception as e:  # noqa: BLE001 - truncated or missing files: tensorstore's errors
        return integrity.unreadable(e)
    if kind == "maxtext":
        values = restored["params"]["params"]
    else:  # each leaf is {"value": array}; note self_attention also has a "value" child
        values = jax.tree.map(lambda d: d["value"], restored,
                              is_leaf=lambda d: isinstance(d, dict) and set(d) == {"value"}
                              and not isinstance(d["value"], dict))
    nnx.replace_by_pure_dict(params, values)
    nnx.update(model, params)
    if saved:
        return integrity.first_changed(saved, integrity.summarize({"model_params": params})[0])
    return None
