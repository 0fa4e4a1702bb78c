"""The compile report on TPU slices described by libtpu: the real TPU compiler's memory plan
against a count by hand, the collectives the sharding design implies, and the one-line error
of a step too big for the chip. Small models: each compile takes 15 to 30 s on two cores."""

import json
import math
import pathlib
import re

import jax
import pytest

import train
from rexmoe_jax import sharding, targets, trainer
from rexmoe_jax.compile import report as compile_report
from rexmoe_jax.config import Config, apply_overrides, load_preset, load_slices
from rexmoe_jax.optimizer import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Widths of 128 per device, so the TPU's (8, 128) tiles pad nothing but the 1-D norms.
MODEL = ["model.vocab_size=512", "model.d_model=256", "model.num_layers=2", "model.num_heads=2",
         "model.num_kv_heads=1", "model.expert_ffn=128", "model.num_experts=4", "model.top_k=2",
         "model.reuse=2", "data.seq_len=16", "data.batch_size=8"]


def by_hand(config, devices, part=None, rows=None) -> int:
    """Bytes per device of the train state (or its `part`, "params") and a batch of `rows`
    sequences (data.batch_size): every array's elements divided by the sizes of the mesh axes
    its sharding splits each dimension over, times its item size."""
    mesh = sharding.make_mesh(config.mesh, devices)
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    state = trainer.abstract_state(config, model, tx, trainer.state_shardings(config, model, tx, mesh))
    axes = dict(mesh.shape)

    def per_device(shape, spec, itemsize):
        splits = [math.prod(axes[a] for a in ((s,) if isinstance(s, str) else s or ())) for s in spec]
        return math.prod(d // n for d, n in zip(shape, list(splits) + [1] * len(shape))) * itemsize

    leaves = jax.tree.leaves(getattr(state, part) if part else state)
    total = sum(per_device(a.shape, a.sharding.spec, a.dtype.itemsize) for a in leaves)
    batch_devices = math.prod(axes[a] for a in sharding.BATCH_AXES)
    batch = (rows or config.data.batch_size) * (config.data.seq_len + 1) * 4 // batch_devices
    return total + batch


def compiled(overrides, target, tpu_devices, hlo_path=None):
    config = apply_overrides(Config(), MODEL + overrides)
    return config, compile_report.compile_report(config, targets.parse(target), hlo_path), tpu_devices(target)


@pytest.mark.e2e
def test_fsdp_x_expert_on_v5p_state_and_collectives(tpu_devices, tmp_path):
    config, report, devices = compiled(["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"], "v5p-16", tpu_devices,
                                       tmp_path / "step.hlo")
    assert report["platform"] == "tpu" and report["devices"] == 8
    hand = by_hand(config, devices)
    # The norms' 1-D float32 arrays and the scalars are padded to whole TPU tiles: 2 KiB here.
    assert hand <= report["argument_size_in_bytes"] <= hand + 8 * 1024
    assert 0 < report["total_bytes_per_device"] < report["hbm_capacity_per_device"] == 95 * 2 ** 30
    c = report["collectives"]
    layers, d, f, pool = 2, 256, 128, 8
    # The ragged exchange: two ragged_all_to_all per MoE layer forward and two backward. Each
    # device holds 8 x 16 / 8 = 16 tokens, A = 32 assignments; the forward sends receive E A
    # rows and A rows back, and the backward's transposes the same. float32, or bf16 where
    # XLA:TPU moves a convert before the exchange (an f32 matmul at default precision reads
    # bf16 on TPU), so the bytes lie between the two.
    rows, ragged = layers * 2 * (2 * 32 + 32), c["ragged-all-to-all"]
    assert ragged["count"] == 4 * layers and rows * d * 2 <= ragged["bytes"] <= rows * d * 4
    assert ragged["largest"] in (2 * 32 * d * 2, 2 * 32 * d * 4)  # the receive buffer, E A rows
    # Sent: each op's A = 32 rows (the smaller buffer), half of them to the other expert device.
    assert 8 * 16 * d * 2 <= ragged["sent_bytes"] <= 8 * 16 * d * 4
    # fsdp: each layer gathers its D-split weights; the largest gather is the local experts'
    # gate, up or down weights (P / E = 4 experts, whole D; float32 or bf16 as above), and no
    # gather has a whole pool of 8 experts' D x F weights.
    assert c["all-gather"]["count"] >= 2 * layers
    assert c["all-gather"]["largest"] in (pool // 2 * d * f * 2, pool // 2 * d * f * 4)
    hlo = (tmp_path / "step.hlo").read_text()
    gathered = re.findall(r"= \w+\[([\d,]+)\][^=]* all-gather(?:-start)?\(", hlo)
    assert gathered and not [g for g in gathered if {str(pool), str(d), str(f)} <= set(g.split(","))]
    # ... and their gradients are reduce-scattered back to each device's D / 2 share (XLA:TPU
    # writes most as fusions of an all-reduce and a slice: each counts once, as a reduce-scatter).
    fused = len(re.findall(r"calls=%all-reduce-scatter", hlo))
    assert fused and c["reduce-scatter"]["count"] >= fused
    assert report["roofline_estimate"]["chip"] == "v5p" and report["roofline_estimate"]["step_seconds"] > 0


@pytest.mark.e2e
def test_the_eval_step_is_compiled_for_one_micro_batch(tpu_devices):
    """With 4 micro-batches of a batch of 32, the eval step takes the parameters and 32 / 4 = 8
    rows of 1,024 tokens (one per device, all 8 hold rows: 4 KiB each; the whole batch would be
    16 KiB), by hand; a forward of one micro-batch plans fewer temporaries than the train step's
    forward and backward, and the headroom is the train's."""
    config, report, devices = compiled(["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "data.batch_size=32",
                                        "data.seq_len=1023", "optim.grad_accum=4"], "v5p-16", tpu_devices)
    evaluation, hand = report["eval_step"], by_hand(config, devices, "params", rows=8)
    assert hand <= evaluation["argument_size_in_bytes"] <= hand + 8 * 1024
    assert 0 < evaluation["temp_size_in_bytes"] < report["temp_size_in_bytes"]
    # An evaluation during training runs beside the whole train state: the train step's arguments.
    beside = (report["argument_size_in_bytes"] + evaluation["temp_size_in_bytes"]
              + evaluation["output_size_in_bytes"])
    assert evaluation["in_training_bytes_per_device"] == beside
    capacity, train = report["hbm_capacity_per_device"], report["total_bytes_per_device"]
    assert report["hbm_headroom_bytes"] == capacity - max(train, beside)


@pytest.mark.e2e
def test_fixed_exchange_on_v6e_is_all_to_all(tpu_devices):
    config, report, devices = compiled(["mesh.data=2", "mesh.expert=4", "compute.expert_exchange=fixed"],
                                       "v6e-8", tpu_devices)
    hand = by_hand(config, devices)
    assert hand <= report["argument_size_in_bytes"] <= hand + 8 * 1024
    c = report["collectives"]
    assert "ragged-all-to-all" not in c
    # Forward: tokens and their expert ids out, results back; backward: the transposes of the
    # two float ones. At least 5 per MoE layer (the compiler may split or merge others).
    assert c["all-to-all"]["count"] >= 5 * 2
    assert report["roofline_estimate"]["source"] == "https://cloud.google.com/tpu/docs/v6e"


@pytest.mark.e2e
def test_a_v4_slice_compiles_with_the_default_settings(tpu_devices, tmp_path):
    """Mosaic has no sublane gather on v4 ("Sublane gather not supported by this TPU
    generation"), which the Pallas permute kernels use: there "auto" takes XLA's gathers, and
    the step compiles with no Mosaic kernel (at seq_len 16 flash attention does not apply)."""
    _, report, _ = compiled(["mesh.data=2", "mesh.expert=2"], "v4-8", tpu_devices, tmp_path / "step.hlo")
    assert report["hbm_headroom_bytes"] > 0 and "ragged-all-to-all" in report["collectives"]
    assert 'custom_call_target="tpu_custom_call"' not in (tmp_path / "step.hlo").read_text()


@pytest.mark.e2e
def test_a_tpu7x_chip_is_two_devices_each_with_half_its_figures(tpu_devices, tmp_path):
    """A tpu7x-8 is 4 chips of two chiplets, 8 devices: the state divides over all 8, each
    device has half a chip's 192 GiB and 2,307 TFLOP/s, and the Pallas permute kernels compile
    for it through Mosaic on bf16 rows (which TPU7x tiles 16 to a block, where 8 were taken)."""
    config, report, devices = compiled(["mesh.data=2", "mesh.expert=4", "compute.dtype=bfloat16"], "tpu7x-8",
                                       tpu_devices, tmp_path / "step.hlo")
    assert len(devices) == report["devices"] == 8 and {d.device_kind for d in devices} == {"TPU7x"}
    hand = by_hand(config, devices)
    assert hand <= report["argument_size_in_bytes"] <= hand + 8 * 1024
    assert report["hbm_capacity_per_device"] == 96 * 2 ** 30
    roof = report["roofline_estimate"]
    assert (roof["chip"], roof["devices_per_chip"], roof["peak_bf16_flops"]) == ("tpu7x", 2, 2307e12 / 2)
    assert roof["hbm_bytes_per_second"] == 7380e9 / 2 and roof["ici_bytes_per_second"] == 1200e9 / 2
    assert 'custom_call_target="tpu_custom_call"' in (tmp_path / "step.hlo").read_text()


@pytest.mark.e2e
def test_flash_attention_is_the_default_on_tpu_compiles_through_mosaic_and_keeps_scores_out_of_memory(tpu_devices, tmp_path):
    """The default attention on a v5p-8 over 1,024 tokens is flash: the splash kernels of the
    forward and of both gradients are Mosaic custom calls in every layer (not interpret-mode
    callbacks), and the step plans less memory than with XLA's attention by at least one
    layer's float32 scores."""
    settings = ["data.seq_len=1024", "mesh.data=2", "mesh.expert=2", "compute.dtype=bfloat16"]
    _, xla, _ = compiled(settings + ["compute.attention=xla"], "v5p-8", tpu_devices)
    _, report, _ = compiled(settings, "v5p-8", tpu_devices, tmp_path / "step.hlo")
    kernels = [line for line in (tmp_path / "step.hlo").read_text().splitlines()
               if 'custom_call_target="tpu_custom_call"' in line]
    for name in ("splash_mqa_fwd", "splash_mqa_dq", "splash_mqa_dkv"):
        assert sum(name in line for line in kernels) == 1, name  # once, in the layer scan's body
    assert "callback" not in (tmp_path / "step.hlo").read_text()
    rows, heads, seq = 8 // (2 * 2), 2, 1024  # a device's rows, heads per row
    assert xla["temp_size_in_bytes"] - report["temp_size_in_bytes"] >= rows * heads * seq * seq * 4


@pytest.mark.e2e
def test_document_masking_compiles_for_tpu_with_xla_attention(tpu_devices, tmp_path):
    """data.document_masking on a v5p-8 over 256 tokens, where the default attention would be
    the flash kernel: XLA:TPU compiles the train and eval steps, with no splash kernel in them
    (the kernel masks by index, so auto takes XLA's attention)."""
    settings = ["data.seq_len=256", "mesh.data=2", "mesh.expert=2", "data.document_masking=true"]
    _, report, _ = compiled(settings, "v5p-8", tpu_devices, tmp_path / "step.hlo")
    assert report["total_bytes_per_device"] > 0 and report["eval_step"]["total_bytes_per_device"] > 0
    assert "splash_mqa" not in (tmp_path / "step.hlo").read_text()


@pytest.mark.e2e
def test_a_step_too_big_for_the_chip_is_one_line(tpu_devices, capsys):
    # Logits of 256 x 1024 tokens x 16,384 float32 are 16 GiB on one v5e chip of 16 GB.
    tpu_devices("v5e-1")
    argv = ["--compile-only", "--target", "v5e-1", *MODEL[:-2], "model.vocab_size=16384", "data.seq_len=1024",
            "data.batch_size=256"]
    assert train.main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("error: the train step does not fit") and "a v5e chip has" in message
    assert "optim.grad_accum=2" in message
    needed, available = (float(x) for x in re.findall(r"([\d.]+)[KMGT]?B", message)[:2])
    assert needed > available


def test_part_of_a_target_slice_is_one_line(tpu_devices, capsys):
    """mesh.num_devices below the slice's count would take its first devices, not a slice:
    refused before compiling, naming the fix; above it, more devices than the slice has."""
    tpu_devices("v5p-16")
    assert train.main(["--compile-only", "--target", "v5p-16", *MODEL, "mesh.num_devices=4"]) == 2
    message = capsys.readouterr().err.strip()
    assert message == ("error: mesh.num_devices=4 would compile part of v5p-16 (8 devices), outside its "
                       "torus order: drop it and name a slice of that size as --target")
    assert train.main(["--compile-only", "--target", "v5p-16", *MODEL, "mesh.num_devices=32"]) == 2
    assert capsys.readouterr().err.strip() == "error: mesh.num_devices=32 but only 8 devices exist"
    # All of them is the whole slice, in its torus order (over two slices: one per data block).
    from rexmoe_jax.config import MeshConfig

    devices = tpu_devices("2xv5p-16")
    whole = sharding.make_mesh(MeshConfig(), devices).devices
    assert (sharding.make_mesh(MeshConfig(num_devices=16), devices).devices == whole).all()


def test_words_of_the_compiler_not_known_here_are_quoted_in_the_one_line():
    """A RESOURCE_EXHAUSTED message without the two sizes the module reads (a libtpu may word it
    otherwise) still gives one line: the chip's HBM from the targets table and the compiler's
    own reason, not placeholder sizes."""
    from rexmoe_jax import targets
    from rexmoe_jax.compile import report
    from rexmoe_jax.config import Config

    err = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Out of memory while\n"
                       "allocating the scoped buffers of fusion.123.")
    message = str(report._too_big(err, Config(), targets.parse("v5p-8")))
    assert message.startswith("the train step does not fit: the compiler ran out of memory on a v5p chip "
                              "(95.00 GiB): XLA:TPU compile permanent error. Out of memory while allocating")
    assert "\n" not in message and "optim.grad_accum=2" in message
    assert report._too_big(RuntimeError("INVALID_ARGUMENT: something else"), Config(), None) is None
    # A kernel's SMEM, not HBM (libtpu 0.0.42's words for the 2.3B preset with fsdp 4 on a v5p-8
    # before the permute kernels ran in runs): the memory named, and knobs that reach it.
    err = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                       "space smem. Used 1.00M of 1.00M smem. Exceeded smem capacity by 1.1K.\nProgram smem")
    message = str(report._too_big(err, Config(), targets.parse("v5p-8")))
    assert message == ("the train step does not fit: a kernel needs more SMEM (a core's on-chip memory) than a "
                       "v5p chip has: 1.00MB of 1.00MB; try compute.permute=xla (the Pallas kernels' scratch) or "
                       "fewer tokens per device (optim.grad_accum, a wider mesh)")


def test_a_plan_larger_than_the_chip_that_the_compiler_accepted_is_one_line():
    """XLA:TPU compiled 7B for a v6e-32 into 34,769,004,064 bytes per chip of its 32 GB without
    refusing it; the check after the report says by how much it does not fit."""
    from rexmoe_jax.compile import report
    from rexmoe_jax.config import Config

    planned = {"total_bytes_per_device": 34_769_004_064, "hbm_capacity_per_device": 32_000_000_000,
               "hbm_headroom_bytes": 32_000_000_000 - 34_769_004_064, "roofline_estimate": {"chip": "v6e"}}
    with pytest.raises(report.DoesNotFit) as err:
        report.check_fits(planned, Config())
    # 34,769,004,064 / 2^30 = 32.38; 32e9 / 2^30 = 29.80; 2,769,004,064 / 2^30 = 2.58
    assert str(err.value).startswith("the train step does not fit: the compiler plans 32.38 GiB per device and "
                                     "a v6e chip has 29.80 GiB (2.58 GiB short); try optim.grad_accum=2")
    # On a TPU7x the HBM is a device's: half a chip's.
    with pytest.raises(report.DoesNotFit, match=r"and a tpu7x device \(one of a chip's 2\) has 29.80"):
        report.check_fits({**planned, "roofline_estimate": {"chip": "tpu7x"}}, Config())
    # An evaluation during training planned larger than the train step is the one named.
    with pytest.raises(report.DoesNotFit, match=r"^the eval step does not fit: the compiler plans 33.00 GiB"):
        report.check_fits({**planned, "eval_step": {"in_training_bytes_per_device": 33 * 2 ** 30}}, Config())
    larger_eval = {"total_bytes_per_device": 5, "eval_step": {"in_training_bytes_per_device": 7}}
    assert report.needed_bytes(larger_eval) == ("eval", 7)
    report.check_fits({**planned, "hbm_headroom_bytes": 1}, Config())  # fits: nothing raised
    report.check_fits({"total_bytes_per_device": 1}, Config())  # no target: nothing to check against


def test_the_estimate_is_its_longest_term_and_never_faster_than_the_model_flops():
    """On a v5p (459 TFLOP/s, 2,765 GB/s HBM, 1,200 GB/s ICI of which a chip sends on half):
    2,765 GB of HBM traffic is 1 s and 1.2 TB sent 2 s, so the interconnect binds. With no
    FLOPs counted (kernels that state no cost) and nothing else, the model's FLOPs set the
    compute term, and the MFU of a compute-bound step is then exactly 1."""
    config, chip = apply_overrides(Config(), MODEL), targets.parse("v5p-8").chip
    report = {"devices": 4, "flops_per_device": 0, "hbm_bytes_per_device": 2765e9,
              "collectives": {"all-gather": {"sent_bytes": 1.2e12}}}
    estimate = compile_report.roofline(report, config, chip)
    assert estimate["seconds"]["memory"] == pytest.approx(1.0) and estimate["bound"] == "interconnect"
    assert estimate["step_seconds"] == pytest.approx(2.0)
    # The model's FLOPs by hand. Active parameters per layer: attention D H Z + 2 D J Z + H Z D
    # = 3 x 65,536 + 65,536 (D 256, H 2, J 1, Z 128); two of the 4 experts' SwiGLU, 3 D F K =
    # 196,608; the router over the pool of r N = 8, 2,048; two norms, 512. Two layers and the
    # final norm: 791,808. Per token 6 (active + the output head D V = 131,072) + 12 L H Z S
    # (98,304) = 5,635,584; 8 x 16 tokens a step over 4 devices.
    model_flops_per_device = (6 * (791_808 + 131_072) + 12 * 2 * 2 * 128 * 16) * 8 * 16 / 4
    idle = compile_report.roofline({**report, "hbm_bytes_per_device": 0, "collectives": {}}, config, chip)
    assert idle["bound"] == "compute" and idle["mfu"] == pytest.approx(1.0)
    assert idle["model_flops_per_device"] == pytest.approx(model_flops_per_device)
    assert idle["seconds"]["compute"] == pytest.approx(model_flops_per_device / 459e12)
    counted = compile_report.roofline({**report, "flops_per_device": 3 * model_flops_per_device,
                                       "hbm_bytes_per_device": 0, "collectives": {}}, config, chip)
    assert counted["mfu"] == pytest.approx(1 / 3)
    assert counted["seconds"]["compute"] == pytest.approx(3 * model_flops_per_device / 459e12)


def test_the_one_line_suggests_only_settings_that_apply():
    """7B on a v6e-32 (fsdp 2 x expert 8 x tensor 2: 16 devices hold rows) with 32 micro-batches
    of its 512 sequences was 0.30 GiB short: each device already runs one sequence per
    micro-batch, so no larger grad_accum divides the batch, and remat is already full; flash
    attention and the mesh remain. With 8 micro-batches, 16 is next."""
    from rexmoe_jax.compile import report

    planned = {"total_bytes_per_device": 2 ** 30, "hbm_capacity_per_device": 2 ** 29, "hbm_headroom_bytes": -2 ** 29,
               "roofline_estimate": {"chip": "v6e"}, "mesh": {"data": 1, "fsdp": 2, "expert": 8, "tensor": 2}}
    settings = ["data.batch_size=512", "data.seq_len=4096", "compute.remat=full"]
    with pytest.raises(report.DoesNotFit) as err:
        report.check_fits(planned, apply_overrides(Config(), settings + ["optim.grad_accum=32"]))
    assert str(err.value).endswith("GiB short); try compute.attention=flash, a mesh that splits more (mesh.fsdp, "
                                   "mesh.expert, mesh.tensor) or a bigger slice")
    with pytest.raises(report.DoesNotFit) as err:
        report.check_fits(planned, apply_overrides(Config(), settings + ["optim.grad_accum=8",
                                                                          "compute.attention=flash"]))
    assert "short); try optim.grad_accum=16, a mesh" in str(err.value)
    with pytest.raises(report.DoesNotFit) as err:  # on a TPU the default attention is flash already
        report.check_fits({**planned, "platform": "tpu"}, apply_overrides(Config(), settings + ["optim.grad_accum=8"]))
    assert "short); try optim.grad_accum=16, a mesh" in str(err.value)


@pytest.mark.e2e
def test_a_presets_mesh_for_the_target_slice_unless_the_command_line_gives_one(tpu_devices, tmp_path, capsys):
    tpu_devices("v5p-8")
    preset = tmp_path / "sliced.py"
    preset.write_text("from rexmoe_jax.config import Config, apply_overrides\n"
                      f"SLICES = {{'v5p-8': ['mesh.expert=4', 'optim.grad_accum=2']}}\n"
                      f"def get_config():\n    return apply_overrides(Config(), {MODEL!r})\n")
    assert train.main(["--config", str(preset), "--compile-only", "--target", "v5p-8"]) == 0
    out = capsys.readouterr().out
    assert "settings for v5p-8 from" in out and "mesh.expert=4 optim.grad_accum=2" in out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1} and report["micro_batches"] == 2
    assert train.main(["--config", str(preset), "--compile-only", "--target", "v5p-8", "mesh.data=4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1} and report["micro_batches"] == 2


@pytest.mark.parametrize("name", ["v5p-16", "v6e-8", "v5e-4", "v4-8", "2xv5p-16", "tpu7x-16"])
def test_the_devices_of_a_slice_name_it(tpu_devices, name):
    """What train.py reads on a real slice (jax's device kind and count, and the slice index of
    each device) names the slice the TPU compiler describes."""
    found = targets.slice_of(tpu_devices(name))
    assert found is not None and targets.same_slice(found, targets.parse(name))


def test_running_on_a_slice_its_presets_mesh_applies(tmp_path, monkeypatch, capsys):
    """On the devices of a slice (test_targets reads slices from devices; here a v5p-8 is
    what they form), train.py applies the preset's settings for it."""
    preset = tmp_path / "sliced.py"
    preset.write_text("from rexmoe_jax.config import Config\n"
                      "SLICES = {'v5p-8': ['mesh.expert=4'], 'v5p-16': ['mesh.expert=8']}\n"
                      "def get_config():\n    return Config()\n")
    monkeypatch.setattr(targets, "slice_of", lambda devices: targets.parse("v5p-8"))
    assert train.main(["--config", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"settings for v5p-8 from {preset}: mesh.expert=4" in out
    assert "mesh: data=-1 fsdp=1 expert=4 tensor=1" in out


def test_every_presets_mesh_for_each_of_its_slices_is_valid_there(tpu_devices):
    """Each paper preset's SLICES entry, applied, builds a mesh on that slice's devices (libtpu's
    description: 8 devices for a tpu7x-8, 4 for a v5p-8) that the batch and the model divide
    over; a wrong count in an entry would only show when compiling or running there."""
    checked = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        for name, items in load_slices(path).items():
            config = apply_overrides(load_preset(path), list(items))
            mesh = sharding.make_mesh(config.mesh, tpu_devices(name))
            sharding.validate(config, mesh)
            checked.append((path.stem, name))
    assert ("moe_2p3b_a0p3b_r4", "tpu7x-8") in checked and len(checked) >= 20, checked


def test_a_preset_naming_no_slice_is_one_line_anywhere(tmp_path, capsys):
    preset = tmp_path / "typo.py"
    preset.write_text("from rexmoe_jax.config import Config\nSLICES = {'v5p-6': ['mesh.expert=4']}\n"
                      "def get_config():\n    return Config()\n")
    assert train.main(["--config", str(preset), "--dry-run"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("error: unknown slice in the preset's SLICES 'v5p-6'")


def test_a_pod_table_row_from_a_report():
    from benchmarks import tpu_presets

    gib = 2 ** 30
    report = {"mesh": {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}, "micro_batches": 16,
              "argument_size_in_bytes": 2 * gib, "temp_size_in_bytes": 18 * gib, "total_bytes_per_device": 20 * gib,
              "hbm_capacity_per_device": 95 * gib, "compile_seconds": 390.4, "loops_of_unknown_length": 2,
              "roofline_estimate": {"step_seconds": 9.96, "bound": "memory", "mfu": 0.14},
              "collectives": {"all-gather": {"sent_bytes": 31.9 * gib}, "all-reduce": {"sent_bytes": 26.4 * gib}}}
    # Loops of unknown length: the step time is a floor and the MFU a ceiling; one column per
    # collective kind, in hlo.KINDS' order (all-gather, reduce-scatter, all-reduce, ...).
    assert tpu_presets.table_row("p", "v5p-8", [], report) == (
        "| `p` | v5p-8, fsdp 4, 16 micro-batches | 20.0 (2.0 + 18.0) of 95.0 | 390 s | at least 10.0 s, "
        "memory-bound | at most 14.0% | 31.9 | 0 | 26.4 | 0 | 0 | 0 |")
    header, rule = tpu_presets.HEADER.splitlines()
    assert header.count("|") == rule.count("|") == tpu_presets.table_row("p", "v5p-8", [], report).count("|")


def test_the_attention_table_pairs_each_slices_two_compiles():
    """A row per (preset, slice) compiled both ways; a compile with only one way has no row."""
    from benchmarks import tpu_presets

    def report(preset, target, attention, gib, tib, seconds, unknown=0):
        return {"preset": preset, "target": target, "overrides": [f"compute.attention={attention}"],
                "total_bytes_per_device": gib * 2 ** 30, "hbm_bytes_per_device": tib * 2 ** 40,
                "loops_of_unknown_length": unknown,
                "roofline_estimate": {"step_seconds": seconds, "bound": "memory"}}
    table = tpu_presets.attention_rows([report("p", "v5p-8", "xla", 20, 25, 10.0, 3),
                                        report("p", "v5p-8", "flash", 9, 3.2, 1.5),
                                        report("q", "v6e-4", "xla", 21, 44, 29.4)])
    header, rule, *rows = table.splitlines()
    assert rows == ["| `p`, v5p-8 | 20.0 | 25.0 | at least 10.0 s, memory-bound | 9.0 | 3.2 | 1.5 s, memory-bound |"]
    assert header.count("|") == rule.count("|") == rows[0].count("|")
