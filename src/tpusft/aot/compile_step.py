"""The step a run would execute, compiled for a TPU topology from shapes alone.

The model, optimizer and trainer are built by the run's own functions (training/setup.py's
build_model, the optimizer, trainer.py's sft_trainer) inside `nnx.eval_shape`, so every
parameter and optimizer slot is a sharded shape and nothing is allocated or read; the step is
Tunix's own train step under the same jit and donation as in the trainer
(`tunix_train_step_jit`), lowered over a mesh of the topology's devices.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tpusft.aot.topology import first_line as _first_line
from tpusft.errors import RunFailed
from tpusft.models.sharding import BATCH_AXES

GIB = 2**30


@dataclass
class Compiled:
    """What the TPU compiler said of one step: its per-device memory, or that it ran out."""

    seconds: float
    params: int       # bytes per device of the model's weights (trained and frozen)
    optimizer: int    # bytes per device of the optimizer state
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    peak: int = 0     # the compiler's peak of the program's own memory (0: not reported)
    reference: int = 0  # bytes per device of a reference model's own weights (DPO), live
    #                     through the step without being its argument
    resident: int = 0   # bytes per device of other state live through the program without
    #                     being its argument (GRPO: the optimizer state during the rollout)
    error: str = ""   # the compiler's out-of-memory message when it does not fit
    needed: float = 0.0     # bytes the compiler asked for, from its message
    available: float = 0.0  # bytes of HBM the compiler had, from its message
    executable: Any = dataclasses.field(default=None, repr=False)  # jax's Compiled
    parts: dict = dataclasses.field(default_factory=dict)  # each program of a step that
    #                                                         runs several (GRPO), by name
    kv_cache: int = 0  # bytes per device of a rollout's KV cache (GRPO)

    @property
    def fits(self) -> bool:
        return not self.error

    @property
    def total(self) -> int:
        """Per-device bytes the program holds at its peak, as the compiler schedules it
        (`peak_memory_in_bytes`: arguments, outputs that do not reuse a donated input, and the
        temporaries live at once), plus what stays resident beside it. Where the compiler
        gives no peak, the bound arguments + outputs - aliased + temporaries (which overstates
        a program whose donated inputs are reused: Llama 3.1 8B's step on a v5p-8 holds
        37.4 GiB at its peak, the bound says 46.1)."""
        held = self.peak or (self.arguments + self.outputs - self.aliased + self.temporaries)
        return held + self.reference + self.resident


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded shapes (the largest shard of each)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            continue
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8  # int4 packs
    return total


def abstract_batch(shapes: dict[str, tuple], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a batch placed as the trainer places it: rows over the batch axes (Tunix's
    data_sharding_axis), scalars replicated."""
    rows, scalar = (NamedSharding(mesh, PartitionSpec(BATCH_AXES)),
                    NamedSharding(mesh, PartitionSpec()))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows if shape else scalar)
            for k, (shape, dtype) in shapes.items()}


def tunix_train_step_jit(trainer):
    """The jit of a trainer's step as its run builds it (trainer.DonatedWeights for SFT and
    preference training; Tunix's own, the optimizer donated, for GRPO's actor), over the
    trainer's step function, which runs bind to concrete weights; tests/test_aot.py checks
    that both lower to the same program."""
    from tpusft.training.trainer import DonatedWeights, donated_arguments

    donated = (donated_arguments(trainer.model) if isinstance(trainer, DonatedWeights)
               else ("optimizer",))
    return nnx.jit(trainer.create_train_step_fn(), donate_argnames=donated)


def _shapes_only(cfg: Any) -> Any:
    """The config with nothing to read: no weights, no adapters to load."""
    return dataclasses.replace(cfg, load_parameters_path="",
                               lora=dataclasses.replace(cfg.lora, adapter_path=""))


def abstract_trainer(cfg: Any, mesh, make_trainer, args=None):
    """(trainer, model, optimizer, reference or None): the run's model (setup.build_model,
    with `args` or the config's) and `make_trainer(model, optimizer, cfg)`'s trainer, built
    as shapes. The reference is the trainer's `ref_model`, or the second item where
    `make_trainer` returns (trainer, reference) (GRPO's lives in Tunix's cluster)."""
    from tpusft.models.decoder import ModelArgs
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.setup import build_model

    shapes_cfg = _shapes_only(cfg)
    args = args or ModelArgs.from_config(shapes_cfg)
    built = {}

    def build():
        model = build_model(shapes_cfg, args, mesh, resuming=False, print_fn=lambda *_: None)
        made = make_trainer(model, make_optimizer(shapes_cfg), shapes_cfg)
        trainer, reference = made if isinstance(made, tuple) else (
            made, getattr(made, "ref_model", None))
        built["trainer"] = trainer
        return model, trainer.optimizer, reference

    with mesh:
        model, optimizer, reference = nnx.eval_shape(build)
    _place_optimizer_state(optimizer, mesh)
    if reference is not None:
        _place_like(reference, model)
    return built["trainer"], model, optimizer, reference


def _place_like(reference, model) -> None:
    """The reference's weights placed as the model's: setup.reference_model copies them
    (jnp.copy keeps an array's sharding), which shape evaluation does not carry."""
    leaf = {"is_leaf": lambda x: isinstance(x, jax.ShapeDtypeStruct)}
    shardings = dict(jax.tree_util.tree_flatten_with_path(nnx.state(model), **leaf)[0])
    flat, tree = jax.tree_util.tree_flatten_with_path(nnx.state(reference), **leaf)
    nnx.update(reference, jax.tree_util.tree_unflatten(tree, [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[path].sharding)
        for path, x in flat]))


def quiet(tunix_config):
    """Tunix's training config without outputs: no metrics backends, checkpoints or
    profiler (a compile-only run writes nothing)."""
    return dataclasses.replace(tunix_config, metrics_logging_options=None,
                               checkpointing_options=None, profiler_options=None)


def _place_optimizer_state(optimizer, mesh) -> None:
    """Every optimizer slot on the mesh by its partition spec, as Tunix places the state
    before its first step; counters are replicated."""
    state = nnx.state(optimizer, nnx.optimizer.OptState)
    specs = nnx.get_partition_spec(state)
    placed = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                             sharding=NamedSharding(mesh, spec)),
        state, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    nnx.update(optimizer, placed)


def compile_train_step(trainer, model, optimizer, batch: dict, mesh) -> Compiled:
    """Lowers and compiles the trainer's step for these shapes; an out-of-memory compile is a
    result (with the compiler's figures), any other compiler error is raised."""
    with mesh:
        return compile_lowered(tunix_train_step_jit(trainer).lower(model, optimizer, batch),
                               per_device_bytes(nnx.state(model)),
                               per_device_bytes(nnx.state(optimizer, nnx.optimizer.OptState)))


def compile_lowered(lowered, params: int, opt: int) -> Compiled:
    """Compiles a lowered program; out of memory is a result with the compiler's figures,
    any other compiler error a RunFailed naming it (one line; --debug shows the trace)."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError (no stable name)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise RunFailed(f"the TPU compiler rejected the step, which says nothing of its "
                            f"memory: {_first_line(e)[:300]}") from e
        needed, available = _oom_figures(str(e))
        return Compiled(time.perf_counter() - start, params, opt, error=_first_line(e),
                        needed=needed, available=available)
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return Compiled(seconds, params, opt, m.argument_size_in_bytes, m.output_size_in_bytes,
                    m.alias_size_in_bytes, m.temp_size_in_bytes,
                    getattr(m, "peak_memory_in_bytes", 0), executable=compiled)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_figures(message: str) -> tuple[float, float]:
    """(needed, available) bytes from XLA's out-of-memory message, 0 where it gives none.
    XLA prints sizes in 1024-based units ("21.02G")."""
    def size(text):
        m = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0

    m = re.search(r"required for [^(]*\(([\d.]+[KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+[KMGT]?)\)", message)
    if m:
        return size(m.group(1)), size(m.group(2))
    m = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", message)
    if m:
        return size(m.group(1)), size(m.group(2))
    return 0.0, 0.0
