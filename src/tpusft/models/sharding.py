"""The device mesh and the logical-axis rules that map named tensor axes onto it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpusft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int,
               what: str = "ici") -> tuple[int, int, int]:
    """Resolves one -1 to the remaining devices (or slices: what="dcn") and checks the
    product."""
    dims = [data, fsdp, tensor]
    unit = "devices" if what == "ici" else "slices"
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise ConfigError(f"{num_devices} {unit} cannot be split by the fixed "
                              f"{what}_*_parallelism product {known}")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ConfigError(
            f"{what}_data_parallelism * {what}_fsdp_parallelism * {what}_tensor_parallelism = "
            f"{math.prod(dims)} but there are {num_devices} {unit}; make the product equal "
            f"or set one of them to -1")
    return tuple(dims)  # type: ignore[return-value]


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence | None = None,
              dcn: tuple[int, int, int] = (1, 1, 1)) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (every process's, by default). With a dcn
    product above 1, each axis is dcn * ici long: ici devices within a slice (devices that
    share `slice_index`, or of one process where all share one), dcn across slices, so the
    collectives that cross slices are the ones on the dcn part of an axis."""
    devices = list(devices if devices is not None else jax.devices())
    # Auto axis types: Tunix's sharding calls fail under jax 0.10's default Explicit axes.
    auto = (jax.sharding.AxisType.Auto,) * 3
    if math.prod(d for d in dcn if d != -1) == 1 and -1 not in dcn:
        shape = mesh_shape(data, fsdp, tensor, len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", 0) for d in devices}
    by_slice = len(slices) > 1  # a multi-slice TPU run; else each process is one granule
    granules = len(slices) if by_slice else len({d.process_index for d in devices})
    dcn_shape = mesh_shape(*dcn, granules, what="dcn")
    ici_shape = mesh_shape(data, fsdp, tensor, len(devices) // granules)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=not by_slice)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_of(cfg, devices: Sequence | None = None) -> Mesh:
    """The run's mesh from its ici_* and dcn_* keys, over every process's devices (or
    `devices`: a TPU topology's, for a compile-only run)."""
    return make_mesh(cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism,
                     cfg.ici_tensor_parallelism, devices=devices,
                     dcn=(cfg.dcn_data_parallelism, cfg.dcn_fsdp_parallelism,
                          cfg.dcn_tensor_parallelism))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axes split a batch's rows."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


@dataclass(frozen=True)
class AxisRules:
    """Logical axis name -> mesh axes, with the mesh sizes needed to check divisibility."""

    rules: tuple[tuple[str, tuple[str, ...]], ...]
    axis_sizes: tuple[tuple[str, int], ...]
    mesh: Mesh | None = None

    @classmethod
    def create(cls, rules: Sequence, mesh: Mesh) -> AxisRules:
        parsed = []
        for entry in rules:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ConfigError(f"logical_axis_rules entry {entry!r} must be [name, mesh_axes]")
            name, axes = entry
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            for a in axes:
                if a not in MESH_AXES:
                    raise ConfigError(f"logical_axis_rules: {name!r} maps to unknown mesh axis "
                                      f"{a!r}; mesh axes are {', '.join(MESH_AXES)}")
            parsed.append((name, axes))
        return cls(tuple(parsed), tuple(mesh.shape.items()), mesh)

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None
             ) -> PartitionSpec:
        """PartitionSpec for a tensor with these logical axes. A dimension that its mesh axes
        do not divide, or whose mesh axes another dimension already uses, is replicated."""
        table = dict(self.rules)
        sizes = dict(self.axis_sizes)
        used: set[str] = set()
        out = []
        for i, name in enumerate(logical):
            axes = tuple(a for a in table.get(name, ()) if sizes.get(a, 1) > 1) if name else ()
            n = math.prod(sizes[a] for a in axes)
            if (not axes or used & set(axes)
                    or (shape is not None and shape[i] % n)):
                out.append(None)
                continue
            used |= set(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)


def vocab_split_axes(rules: AxisRules | None, vocab: int) -> tuple[str, ...]:
    """The mesh axes that split the vocabulary when the output layer runs split over it
    rather than over the batch: the batch's axes and the vocabulary's own, those longer than
    1; () when there is none or they do not divide `vocab`."""
    if rules is None or rules.mesh is None:
        return ()
    table, sizes = dict(rules.rules), dict(rules.axis_sizes)
    axes = tuple(dict.fromkeys(a for name in ("activation_batch", "activation_vocab")
                               for a in table.get(name, ()) if sizes.get(a, 1) > 1))
    if not axes or vocab % math.prod(sizes[a] for a in axes):
        return ()
    return axes


@dataclass(frozen=True)
class Placement:
    """with_sharding_constraint to a PartitionSpec over the rules' mesh, as a hashable callable
    (a custom_vjp's static argument)."""

    rules: AxisRules
    spec: PartitionSpec

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.rules.mesh, self.spec))


def constrain(x: jax.Array, rules: AxisRules | None, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes; a no-op without rules or on one device."""
    if rules is None or rules.mesh is None or all(s == 1 for _, s in rules.axis_sizes):
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(rules.mesh, rules.spec(logical, x.shape)))


def spans_processes(mesh: Mesh | None) -> bool:
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def decoding_rules(rules: AxisRules | None) -> AxisRules | None:
    """The rules for decoding with a KV cache: the model's own, except that on a mesh that
    spans several processes the batch is not split (Tunix's sampler reads its token buffers
    with device_get, which needs them whole on every process; the weights stay sharded)."""
    if rules is None or not spans_processes(rules.mesh):
        return rules
    return dataclasses.replace(rules, rules=tuple(
        (name, () if name == "activation_batch" else axes) for name, axes in rules.rules))


def replicate_across_processes(x: jax.Array, rules: AxisRules | None) -> jax.Array:
    """`x` replicated on every device when the mesh spans several processes, else as it is.
    Decoding's logits: the tokens picked from them, and the buffers a sampler fills with
    them, are then whole on every process, where the host reads them (a sampler's
    device_get of a batch-sharded buffer fails with several processes)."""
    if rules is None or not spans_processes(rules.mesh):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(rules.mesh, PartitionSpec()))
