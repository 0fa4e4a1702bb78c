"""Compile targets: slice names to the topology the TPU compiler takes, and its chip."""

import pytest

from rexmoe_jax import targets
from rexmoe_jax.config import ConfigError


def test_names_count_what_cloud_tpu_counts():
    v5p = targets.parse("v5p-64")  # 64 TensorCores = 32 chips, two cores per megacore chip
    assert (v5p.topology, v5p.chip_config, v5p.chips, v5p.num_slices) == ("v5p:2x4x4", "megacore", 32, 1)
    v6e = targets.parse("v6e-8")  # chips
    assert (v6e.topology, v6e.chip_config, v6e.chips, v6e.chip.name) == ("v6e:2x4", "default", 8, "v6e")
    assert targets.parse("v5litepod-16").topology == "v5e:4x4"
    assert targets.parse("v4-32").topology == "v4:2x2x4"
    assert targets.parse("v5e-1").chips_per_host == (1, 1, 1)
    two = targets.parse("2xv5p-128")
    assert (two.topology, two.num_slices, two.chips) == ("v5p:4x4x4", 2, 128)
    # TensorCores, two per chip, each chiplet its own device: tpu7x-8 is one host's 4 chips.
    tpu7x = targets.parse("tpu7x-8")
    assert (tpu7x.topology, tpu7x.chip_config, tpu7x.chips) == ("tpu7x:2x2x1", "default", 4)
    assert tpu7x.chips_per_host == (2, 2, 1)
    assert targets.parse("tpu7x-128").topology == "tpu7x:4x4x4"


def test_chip_peaks_cite_their_source():
    assert targets.CHIPS["v5p"].peak_bf16_flops == 459e12 and targets.CHIPS["v5p"].hbm_bytes == 95 * 2 ** 30
    # In GiB, as libtpu counts them: a v6e plan of 31.0 GiB compiles, one of 31.4 is "more than
    # the available HBM (31.25G)"; a v5e chip has 15.75G available. 32e9 bytes would be 29.8 GiB.
    assert (targets.CHIPS["v6e"].hbm_bytes, targets.CHIPS["v5e"].hbm_bytes) == (32 * 2 ** 30, 16 * 2 ** 30)
    assert all(chip.source.startswith("https://cloud.google.com/tpu/docs/") for chip in targets.CHIPS.values())


def test_a_device_has_its_share_of_the_chip():
    """A TPU7x chip (2,307 TFLOP/s, 192 GiB at 7,380 GB/s, 1,200 GB/s ICI) is two devices: each
    has half of every figure; a one-device chip's share is the chip."""
    half = targets.CHIPS["tpu7x"].share()
    assert (half.peak_bf16_flops, half.hbm_bytes, half.hbm_bytes_per_second, half.ici_bytes_per_second) == \
        (1153.5e12, 96 * 2 ** 30, 3690e9, 600e9)
    assert half.devices == 1 and half.source == "https://cloud.google.com/tpu/docs/tpu7x"
    assert targets.CHIPS["v5p"].share() == targets.CHIPS["v5p"]
    assert targets.CHIPS["v4"].share().ici_bytes_per_second is None
    assert targets.CHIPS["tpu7x"].one_device == "a tpu7x device (one of a chip's 2)"
    assert targets.CHIPS["v6e"].one_device == "a v6e chip"


@pytest.mark.parametrize("name", ["v5p-63", "v7-8", "v5p64", "0xv5p-64"])
def test_unknown_names_list_the_known_ones(name):
    with pytest.raises(ConfigError, match="known slices: v4-8, "):
        targets.parse(name)


def chips(kind, n, slices=1):
    """Stand-ins for jax devices: what jax says of n TPU chips' kind and slice."""
    return [type("Device", (), {"device_kind": kind, "slice_index": i * slices // n})() for i in range(n)]


def test_the_slice_real_devices_form():
    # jax calls a v5p chip (two TensorCores as one megacore device) "TPU v5": 16 devices are a
    # v5p-32; v6e counts chips; two slices of 32 v5p chips are 2xv5p-64.
    assert targets.slice_of(chips("TPU v5", 16)).name == "v5p-32"
    assert targets.slice_of(chips("TPU v6 lite", 64)).name == "v6e-64"
    assert targets.slice_of(chips("TPU v5", 64, slices=2)).name == "2xv5p-64"
    # A TPU7x device is one TensorCore of a chip: 8 devices are 4 chips, a tpu7x-8.
    assert targets.slice_of(chips("TPU7x", 8)).name == "tpu7x-8"
    assert targets.slice_of(chips("TPU7x", 32, slices=2)).name == "2xtpu7x-16"
    # Not a slice of the table: GPUs, 6 chips, 3 devices over 2 slices.
    assert targets.slice_of(chips("NVIDIA H100 80GB HBM3", 8)) is None
    assert targets.slice_of(chips("TPU v6 lite", 6)) is None
    assert targets.slice_of(chips("TPU v5", 3, slices=2)) is None
    assert targets.slice_of(chips("TPU7x", 7)) is None  # half a chip


SLICES = {"v5litepod-8": ["mesh.fsdp=2", "mesh.expert=4", "optim.grad_accum=2"], "v5p-16": ["mesh.expert=8"]}


def test_a_presets_settings_for_its_slice_under_the_command_line():
    v5e = targets.parse("v5e-8")  # the same slice as v5litepod-8
    assert targets.slice_settings(SLICES, v5e, []) == SLICES["v5litepod-8"]
    assert targets.slice_settings(SLICES, targets.parse("v6e-8"), []) == []
    # A mesh on the command line replaces the slice's whole mesh; other fields only themselves.
    assert targets.slice_settings(SLICES, v5e, ["mesh.data=8"]) == ["optim.grad_accum=2"]
    assert targets.slice_settings(SLICES, v5e, ["optim.grad_accum=4", "train.steps=9"]) == \
        ["mesh.fsdp=2", "mesh.expert=4"]
    # Off any slice nothing applies, but a name that is no slice is an error wherever it runs.
    assert targets.slice_settings(SLICES, None, []) == []
    for target in (v5e, None):
        with pytest.raises(ConfigError, match="unknown slice in the preset's SLICES 'v5p-15'"):
            targets.slice_settings({"v5p-15": []}, target, [])
