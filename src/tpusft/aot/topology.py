"""TPU topologies by their Cloud names (v5p-8, v6e-16, ...) as compile-only devices.

libtpu describes any TPU topology on any x86 host; a program lowered over a mesh of those
devices compiles with the TPU compiler and reports its per-chip memory without a TPU.

Names follow Google Cloud's accelerator types (and MaxText's compile_topology): v4 and v5p
count TensorCores (two per chip, one megacore device), v5e and v6e count chips (one core),
tpu7x counts TensorCores (two per chip, each its own device).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tpusft.errors import ConfigError

GIB = 2**30

# Chips in a slice -> its ICI shape, for the 3D (v4, v5p, tpu7x) and 2D (v5e, v6e) tori.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclass(frozen=True)
class Generation:
    prefix: str           # the Cloud name's prefix: v5p in v5p-8
    libtpu_name: str      # libtpu's topology prefix: v5 in v5:2x2x1
    cores_per_chip: int   # what the Cloud name's number counts per chip
    devices_per_chip: int
    chip_config: str      # libtpu's chip_config_name
    hbm_gib_per_chip: float
    shapes: dict


GENERATIONS = {g.prefix: g for g in (
    Generation("v4", "v4", 2, 1, "megacore", 32, _SHAPES_3D),
    Generation("v5e", "v5e", 1, 1, "default", 16, _SHAPES_2D),
    Generation("v5p", "v5", 2, 1, "megacore", 95, _SHAPES_3D),
    Generation("v6e", "v6e", 1, 1, "default", 32, _SHAPES_2D),
    Generation("tpu7x", "tpu7x", 2, 2, "default", 192, _SHAPES_3D),
)}


@dataclass(frozen=True)
class Topology:
    name: str
    generation: Generation
    chips: int
    num_slices: int

    @property
    def libtpu_topology(self) -> str:
        return f"{self.generation.libtpu_name}:{self.generation.shapes[self.chips]}"

    @property
    def devices_per_slice(self) -> int:
        return self.chips * self.generation.devices_per_chip

    @property
    def hbm_bytes_per_device(self) -> float:
        """The chip's HBM over its devices (the compiler's usable figure is a little lower:
        15.75 GiB of a v5e's 16)."""
        g = self.generation
        return g.hbm_gib_per_chip * GIB / g.devices_per_chip

    def devices(self) -> list:
        """The topology's compile-only devices (every slice's)."""
        import importlib.util
        import os

        if importlib.util.find_spec("libtpu") is None:
            raise ConfigError(f"compile_topology={self.name} needs libtpu, which is not "
                              f"installed: bash tools/setup/setup.sh --test (or --tpu)")
        # Compile-only devices use no chip: loading libtpu beside a process that holds the
        # TPU (a run on this VM, a test process) is safe.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies

        # Hosts of 4 chips, except that a v5e-8 or v6e-8 is one host of 8 (a mesh that spans
        # hosts decodes with whole rows on every device: models/sharding.decoding_rules).
        bounds = ((1, 1, 1) if self.chips == 1
                  else (2, 4, 1) if self.chips == 8 and self.generation.prefix in ("v5e", "v6e")
                  else (2, 2, 1))
        try:
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=self.libtpu_topology,
                chip_config_name=self.generation.chip_config, chips_per_host_bounds=bounds,
                num_slices=self.num_slices)
        except Exception as e:  # noqa: BLE001 - libtpu's own message says what went wrong
            raise ConfigError(f"compile_topology={self.name}: libtpu cannot describe "
                              f"{self.libtpu_topology}: {first_line(e)}") from e
        return list(desc.devices)


def known_names() -> list[str]:
    return [f"{g.prefix}-{chips * g.cores_per_chip}" for g in GENERATIONS.values()
            for chips in g.shapes]


def parse(name: str, num_slices: int = 1) -> Topology:
    """`v5p-8` -> its Topology; an unknown name is a ConfigError that lists the known ones."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    generation = GENERATIONS.get(m.group(1)) if m else None
    if generation is not None:
        count = int(m.group(2))
        chips, rest = divmod(count, generation.cores_per_chip)
        if not rest and chips in generation.shapes:
            return Topology(name.strip().lower(), generation, chips, num_slices)
    raise ConfigError(f"compile_topology={name!r} is not a known TPU topology; known: "
                      f"{', '.join(known_names())}")


def first_line(e: BaseException) -> str:
    """An exception's first line (libtpu's and XLA's messages run on for pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
