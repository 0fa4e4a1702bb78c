"""Compile targets: Cloud TPU slice names mapped to the topology the TPU compiler takes, and the
chips' peak figures the compile report's roofline estimate uses. No jax here: sharding.py
turns a target into devices.

A name is `<generation>-<n>`, with n counted as Cloud TPU counts it: TensorCores for v4, v5p
(two per chip, driven as one "megacore" device) and tpu7x (two per chip, each its own device:
a chip is two chiplets), chips for v5e (also `v5litepod-<n>`) and v6e; `<s>x<name>` is s such
slices joined over the data-centre network (multi-slice).
"""

from __future__ import annotations

import dataclasses
import math
import re

from rexmoe_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's peak figures, as Google's Cloud TPU pages give them (source), and how many
    jax devices it is; `share()` gives one device's part."""

    name: str
    device_kind: str  # what jax calls its devices
    peak_bf16_flops: float  # per second, dense bf16 matmuls
    hbm_bytes: int
    hbm_bytes_per_second: float
    ici_bytes_per_second: float | None  # inter-chip interconnect, bidirectional, all links; None: unpublished
    source: str
    devices: int = 1  # jax devices per chip: a TPU7x chip's two chiplets are two

    def share(self) -> Chip:
        """One device's part of the chip: its FLOP/s, HBM, HBM and ICI bandwidth divided evenly
        among the chip's devices (the chip itself where it is one device)."""
        n = self.devices
        return dataclasses.replace(
            self, peak_bf16_flops=self.peak_bf16_flops / n, hbm_bytes=self.hbm_bytes // n,
            hbm_bytes_per_second=self.hbm_bytes_per_second / n,
            ici_bytes_per_second=None if self.ici_bytes_per_second is None else self.ici_bytes_per_second / n,
            devices=1)

    @property
    def one_device(self) -> str:
        """What one jax device of this chip is, in words: "a v5p chip", "a tpu7x device (one of
        a chip's 2)"."""
        if self.devices == 1:
            return f"a {self.name} chip"
        return f"a {self.name} device (one of a chip's {self.devices})"


# Google's pages give HBM in "GB" that are GiB: libtpu plans a v6e chip's 32 with 31.25 of them
# available, a v5e chip's 16 with 15.75 ("exceeds available HBM (31.25G)").
_GIB = 1024 ** 3

CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * _GIB, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * _GIB, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * _GIB, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * _GIB, 1640e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
    "tpu7x": Chip("tpu7x", "TPU7x", 2307e12, 192 * _GIB, 7380e9, 1200e9, "https://cloud.google.com/tpu/docs/tpu7x",
                  devices=2),
}


@dataclasses.dataclass(frozen=True)
class _Generation:
    topology_prefix: str  # what get_topology_desc calls the generation
    chip_config: str  # "megacore": a chip's two TensorCores are one device
    cores_in_name: int  # what one chip counts for in a slice name (its TensorCores, or 1)
    shapes: tuple[str, ...]  # the chip grids of the single-slice sizes offered


_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8")
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
GENERATIONS = {
    "v4": _Generation("v4", "megacore", 2, _3D),
    "v5p": _Generation("v5p", "megacore", 2, _3D),
    "v5e": _Generation("v5e", "default", 1, _2D),
    "v6e": _Generation("v6e", "default", 1, _2D),
    "tpu7x": _Generation("tpu7x", "default", 2, _3D),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything the TPU compiler needs to describe a slice (or several), and its chip."""

    name: str
    chip: Chip
    topology: str  # e.g. "v5p:2x4x4"
    chip_config: str
    chips_per_host: tuple[int, int, int]
    num_slices: int

    @property
    def chips(self) -> int:
        return self.num_slices * math.prod(int(n) for n in self.topology.split(":")[1].split("x"))


def _sizes() -> dict[str, tuple[str, str]]:
    """slice name -> (generation, chip grid), e.g. "v5p-64" -> ("v5p", "2x4x4")."""
    sizes = {}
    for generation, g in GENERATIONS.items():
        for shape in g.shapes:
            chips = math.prod(int(n) for n in shape.split("x"))
            sizes[f"{generation}-{chips * g.cores_in_name}"] = (generation, shape)
    return sizes


SLICES = _sizes()


def parse(name: str, what: str = "--target") -> Target:
    """A target from its name ("v5p-64", "v6e-8", "v5litepod-16", "2xv5p-64"); an unknown one
    is a ConfigError listing the known names (`what` says where the name came from)."""
    match = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name)
    slices = int(match.group(1) or 1) if match else 0
    key = f"{_ALIASES.get(match.group(2), match.group(2))}-{match.group(3)}" if match else name
    if key not in SLICES or slices < 1:
        raise ConfigError(f"unknown {what} {name!r}; known slices: {', '.join(SLICES)} "
                          "(also v5litepod-N for v5e-N, and Sx<slice> for S slices)")
    generation, shape = SLICES[key]
    g = GENERATIONS[generation]
    dims = [int(n) for n in shape.split("x")] + [1] * (3 - shape.count("x") - 1)
    per_host = tuple(min(2, n) if i < 2 else 1 for i, n in enumerate(dims))
    return Target(name, CHIPS[generation], f"{g.topology_prefix}:{shape}", g.chip_config, per_host, slices)


def same_slice(a: Target, b: Target) -> bool:
    """Whether two names ("v5litepod-8", "v5e-8") describe the same slice or slices."""
    return (a.topology, a.num_slices) == (b.topology, b.num_slices)


def slice_of(devices) -> Target | None:
    """The target that a list of jax devices forms (TPU devices, read by their `device_kind` and
    `slice_index`), or None where they are not a whole slice of the table (another platform, a
    slice size not offered, a part of a slice)."""
    kind = getattr(devices[0], "device_kind", "") if devices else ""
    generation = next((name for name, chip in CHIPS.items() if chip.device_kind == kind), None)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    per_chip = CHIPS[generation].devices if generation else 1
    if generation is None or len(devices) % (slices * per_chip):
        return None
    name = f"{generation}-{len(devices) // slices // per_chip * GENERATIONS[generation].cores_in_name}"
    if name not in SLICES:
        return None
    return parse(name if slices == 1 else f"{slices}x{name}")


def slice_settings(settings: dict, target: Target | None, overrides: list[str]) -> list[str]:
    """The overrides a preset gives for `target` (its `SLICES`: slice name -> overrides, e.g.
    {"v6e-64": ["mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"]}) that the command line's
    `overrides` leave standing: a command-line mesh replaces the preset's mesh as a whole (one
    mesh.* given drops every mesh.* of the slice's), any other field only itself. None where
    `target` is None; either way a name in SLICES that is not a slice is a ConfigError."""
    found = []
    for name, items in settings.items():
        named = parse(name, what="slice in the preset's SLICES")
        if target is not None and same_slice(named, target):
            found = list(items)
    given = {item.partition("=")[0].strip() for item in overrides}
    mesh_given = any(key.startswith("mesh.") for key in given)
    return [item for item in found if item.partition("=")[0].strip() not in given
            and not (mesh_given and item.startswith("mesh."))]
