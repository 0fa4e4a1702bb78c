"""What the compiler plans for one train step on a mesh, from shapes alone (`train.py
--compile-only`): per-device memory, the step's FLOPs and bytes (XLA's cost analysis, and the
same counted through the step's loops from its HLO: hlo.py), a roofline estimate of its
time and MFU on a named TPU, and the collectives of the compiled HLO.

With `--target` the devices are a TPU slice described by libtpu (sharding.target_devices), so
XLA:TPU and Mosaic compile exactly what that slice would run; otherwise they are this machine's.
"""

from __future__ import annotations

import math
import pathlib
import re
import time

import jax
import jax.numpy as jnp

from pallas_kernels import attention as flash
from rexmoe_jax import sharding, trainer
from rexmoe_jax.compile import hlo
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.loop import jitted_steps
from rexmoe_jax.model.layers import flash_applies
from rexmoe_jax.model.metrics import flops_per_token
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.targets import CHIPS, Chip, Target

_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes")
# XLA:TPU's words when a step does not fit, e.g. "RESOURCE_EXHAUSTED: XLA:TPU compile permanent
# error. Ran out of memory in memory space hbm. Used 402.88G of 95.74G hbm. Exceeded hbm
# capacity by 307.14G." or "HLO temporaries (402.88G) exceeds available HBM (95.74G)".
_TOO_BIG = (re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm"),
            re.compile(r"\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)"))


# Out of a core's SMEM or VMEM instead: "Ran out of memory in memory space smem. Used 1.00M of
# 1.00M smem."
_CORE_MEMORY = re.compile(r"memory space (smem|vmem)\. Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?)")


class DoesNotFit(ConfigError):
    """The compiler found the step too big for the device's memory; one line says by how much."""


def _too_big(err: Exception, config: Config, target: Target | None, batch_devices: int = 1,
             platform: str = "cpu", step: str = "train") -> DoesNotFit | None:
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    found = next((m for m in (p.search(text) for p in _TOO_BIG) if m), None)
    where = target.chip.one_device if target else "a device"
    core = _CORE_MEMORY.search(text)
    if core:  # a kernel's on-chip scratch, not HBM: batch and mesh knobs do not reach it
        space, used, capacity = core.group(1).upper(), core.group(2), core.group(3)
        return DoesNotFit(f"the {step} step does not fit: a kernel needs more {space} (a core's on-chip "
                          f"memory) than {where} has: {used}B of {capacity}B; try compute.permute=xla "
                          "(the Pallas kernels' scratch) or fewer tokens per device (optim.grad_accum, "
                          "a wider mesh)")
    if found:
        needed, available = found.groups()
        plan = f"the compiler plans {needed}B of memory per device and {where} has {available}B"
    else:  # Words this module does not know: the compiler's own, cut to a line.
        capacity = f" ({target.chip.share().hbm_bytes / 2 ** 30:.2f} GiB)" if target else ""
        reason = " ".join(text.split("RESOURCE_EXHAUSTED:", 1)[1].split())[:200]
        plan = f"the compiler ran out of memory on {where}{capacity}: {reason}"
    return DoesNotFit(f"the {step} step does not fit: {plan}; {_knobs(config, batch_devices, platform)}")


def _knobs(config: Config, batch_devices: int, platform: str) -> str:
    """The settings that would shrink the step, among those that apply here: more micro-batches
    (the next count that still gives every device that holds rows whole sequences), full remat,
    flash attention; then the mesh."""
    rows = config.data.batch_size // batch_devices  # sequences per device and step
    more = next((n for n in range(config.optim.grad_accum + 1, rows + 1) if rows % n == 0), None)
    knobs = [f"optim.grad_accum={more}"] if more else []
    knobs += ["compute.remat=full"] if config.compute.remat != "full" else []
    if not flash_applies(config.compute, config.data.seq_len, platform) and flash.applies(config.data.seq_len):
        knobs.append("compute.attention=flash")
    return "try " + ", ".join(knobs + ["a mesh that splits more (mesh.fsdp, mesh.expert, mesh.tensor) or a "
                                       "bigger slice"])


def check_fits(report: dict, config: Config) -> None:
    """Raises DoesNotFit with one line when the compiled plan of the train or the eval step is
    larger than the target device's HBM: the TPU compiler does not always refuse such a step
    itself (7B on a v6e-32 compiled to 32.4 GiB per chip of 29.8)."""
    short = -report.get("hbm_headroom_bytes", 0)
    batch_devices = math.prod(report.get("mesh", {}).get(axis, 1) for axis in sharding.BATCH_AXES)
    if short > 0:
        gib = 1024 ** 3
        step, total = needed_bytes(report)
        raise DoesNotFit(
            f"the {step} step does not fit: the compiler plans {total / gib:.2f} GiB per "
            f"device and {CHIPS[report['roofline_estimate']['chip']].one_device} has "
            f"{report['hbm_capacity_per_device'] / gib:.2f} GiB ({short / gib:.2f} GiB short); "
            f"{_knobs(config, batch_devices, report.get('platform', 'cpu'))}")


def needed_bytes(report: dict) -> tuple[str, int]:
    """(which, bytes per device) of the larger plan: the train step's, or an evaluation's during
    training (the eval step beside the whole train state, which stays on the device)."""
    evaluation = report.get("eval_step", {}).get("in_training_bytes_per_device", 0)
    return max([("train", report["total_bytes_per_device"]), ("eval", evaluation)], key=lambda pair: pair[1])


def _cost(compiled) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per device as XLA's cost analysis counts them: a loop's body
    once, so a step that scans layers and micro-batches looks far cheaper (hlo.py)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def roofline(report: dict, config: Config, chip: Chip) -> dict:
    """An estimate, not a measurement (and a lower bound where loops of unknown length, such as
    the blocked grouped matmul's, were counted once): the step's time if its matmul FLOPs ran at
    a device's peak FLOP/s, its HBM bytes at the peak bandwidth, or the bytes its collectives send
    at the device's whole interconnect bandwidth, whichever binds. A device's figures are its
    chip's, or an even share where a chip is several devices (Chip.share(): TPU7x). All three
    are counted through the step's loops; overlap, elementwise work and kernels that state no
    cost are not modelled, nor is the traffic between slices (hlo.CROSS_SLICE: no per-chip
    figure for the data-centre network is published). With it, the MFU that time would give for
    the model's FLOPs (metrics.flops_per_token: no remat recompute, no padded rows). The compute
    term takes the model's FLOPs where the count is smaller: the flash attention kernels state
    no cost, so their work is missing from the count. It reads only the report and the config,
    so a saved report can be estimated again."""
    model_flops = flops_per_token(config.model, config.data.seq_len,
                                  trainer.summary(config)["params_active"]) * config.tokens_per_step
    device = chip.share()
    flops = max(report["flops_per_device"], model_flops / report["devices"])
    times = {"compute": flops / device.peak_bf16_flops,
             "memory": report["hbm_bytes_per_device"] / device.hbm_bytes_per_second}
    ici = {kind: c for kind, c in report["collectives"].items() if kind != hlo.CROSS_SLICE}
    sent = sum(c.get("sent_bytes", 0) for c in ici.values())
    if device.ici_bytes_per_second:  # a device sends on half its bidirectional bandwidth
        times["interconnect"] = sent / (device.ici_bytes_per_second / 2)
    bound = max(times, key=times.get)
    return {"chip": chip.name, "devices_per_chip": chip.devices, "peak_bf16_flops": device.peak_bf16_flops,
            "hbm_bytes_per_second": device.hbm_bytes_per_second,
            "ici_bytes_per_second": device.ici_bytes_per_second, "source": chip.source,
            "seconds": times, "step_seconds": times[bound], "bound": bound,
            "mfu": model_flops / (report["devices"] * device.peak_bf16_flops * times[bound]),
            "model_flops_per_device": model_flops / report["devices"]}


def compile_report(config: Config, target: Target | None = None,
                   hlo_path: pathlib.Path | None = None) -> dict:
    """Lowers and compiles the train step for the configured mesh (on `target`'s devices when
    given) and returns what the compiler plans, per device (and writes the compiled HLO to
    `hlo_path` when given); raises DoesNotFit with one line when the step is too big. The eval
    step (one micro-batch of held-out rows at a time) is compiled too, for its memory alone:
    `eval_step`, and the headroom left by the larger of the two."""
    devices = sharding.target_devices(target) if target else None
    if devices and 0 < config.mesh.num_devices < len(devices):
        raise ConfigError(f"mesh.num_devices={config.mesh.num_devices} would compile part of {target.name} "
                          f"({len(devices)} devices), outside its torus order: drop it and name a slice "
                          "of that size as --target")
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.validate(config, mesh)
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    shardings = trainer.state_shardings(config, model, tx, mesh)
    state = trainer.abstract_state(config, model, tx, shardings)
    batch = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    # Any end-of-document id compiles the same program (data.document_masking): no token is read.
    train_step, eval_step = jitted_steps(config, model, tx, mesh, shardings, eod_id=0)
    start = time.perf_counter()
    try:
        with sharding.activate(mesh):
            compiled = train_step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as err:
        raise _too_big(err, config, target, sharding.batch_devices(mesh), mesh.devices.flat[0].platform) \
            or err from None
    train_seconds = round(time.perf_counter() - start, 1)
    eval_report = _eval_memory(eval_step, state.params, config, mesh, target)
    report = {"target": target.name if target else None, "platform": mesh.devices.flat[0].platform,
              "devices": int(mesh.devices.size), "mesh": dict(mesh.shape),
              "micro_batches": config.optim.grad_accum,
              "compile_seconds": train_seconds, "eval_step": eval_report}
    report.update(_memory(compiled))
    # During training an evaluation runs beside the whole train state (the train step's arguments).
    eval_report["in_training_bytes_per_device"] = (report["argument_size_in_bytes"]
                                                   + eval_report["temp_size_in_bytes"]
                                                   + eval_report["output_size_in_bytes"])
    report["xla_cost_analysis"] = dict(zip(("flops", "bytes_accessed"), _cost(compiled)))
    text = compiled.as_text()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(text)
    step = hlo.analyse(text)
    report["flops_per_device"], report["hbm_bytes_per_device"] = step["flops"], step["hbm_bytes"]
    report["loops_of_unknown_length"] = step["loops_of_unknown_length"]
    report["collectives"] = step["collectives"]
    if target:
        report["hbm_capacity_per_device"] = target.chip.share().hbm_bytes
        report["hbm_headroom_bytes"] = report["hbm_capacity_per_device"] - needed_bytes(report)[1]
        report["roofline_estimate"] = roofline(report, config, target.chip)
    return report


def _eval_memory(eval_step, params, config: Config, mesh, target: Target | None) -> dict:
    """What the compiler plans for the eval step on one micro-batch of held-out rows (the most
    the loop and the evaluate command give it at once): its memory per device and compile time."""
    rows = jax.ShapeDtypeStruct((config.micro_batch_rows, config.data.seq_len + 1), jnp.int32,
                                sharding=sharding.batch_sharding(mesh))
    start = time.perf_counter()
    try:
        with sharding.activate(mesh):
            compiled = eval_step.lower(params, rows).compile()
    except jax.errors.JaxRuntimeError as err:
        raise _too_big(err, config, target, sharding.batch_devices(mesh), mesh.devices.flat[0].platform,
                       "eval") or err from None
    return {**_memory(compiled), "compile_seconds": round(time.perf_counter() - start, 1)}


def _memory(compiled) -> dict:
    """A compiled step's memory plan per device (_MEMORY_FIELDS) and its total: donated state is
    both argument and output, so it counts once."""
    memory = compiled.memory_analysis()
    plan = {name: int(getattr(memory, name, 0) or 0) for name in _MEMORY_FIELDS}
    plan["total_bytes_per_device"] = (plan["argument_size_in_bytes"] + plan["output_size_in_bytes"]
                                      - plan["alias_size_in_bytes"] + plan["temp_size_in_bytes"])
    return plan


def describe(report: dict) -> str:
    """The report for a person, a few lines; the JSON line after it has everything."""
    r, gib = report, 1024 ** 3
    where = f"{r['target']} ({r['devices']} devices)" if r["target"] else f"{r['devices']} devices"
    outputs = (r["output_size_in_bytes"] - r["alias_size_in_bytes"]) / gib
    lines = [f"compiled the train step in {r['compile_seconds']}s for {where}, mesh {r['mesh']}",
             f"per device: parameters and optimizer state {r['argument_size_in_bytes'] / gib:.2f} GiB, "
             f"temporaries {r['temp_size_in_bytes'] / gib:.2f} GiB, outputs not aliased {outputs:.2f} GiB, "
             f"code {r['generated_code_size_in_bytes'] / 2 ** 20:.1f} MiB, "
             f"total {r['total_bytes_per_device'] / gib:.2f} GiB"]
    evaluation = r.get("eval_step")  # absent from reports saved before it was compiled
    if evaluation:
        lines.append(f"the eval step, one micro-batch at a time, compiled in "
                     f"{evaluation['compile_seconds']}s: temporaries "
                     f"{evaluation['temp_size_in_bytes'] / gib:.2f} GiB per device, "
                     f"{evaluation['in_training_bytes_per_device'] / gib:.2f} GiB beside the train state "
                     "during training")
    if "hbm_capacity_per_device" in r:
        fits = r["hbm_headroom_bytes"] >= 0
        lines.append(f"{'fits' if fits else 'does not fit'}: {needed_bytes(r)[1] / gib:.2f} of "
                     f"{r['hbm_capacity_per_device'] / gib:.2f} GiB of HBM "
                     f"({abs(r['hbm_headroom_bytes']) / gib:.2f} GiB {'to spare' if fits else 'short'})")
    xla, unknown = r["xla_cost_analysis"], r["loops_of_unknown_length"]
    bound = f" (at least: {unknown} loops of unknown length counted once)" if unknown else ""
    lines.append(f"per device and step, counted through the step's loops{bound}: {r['flops_per_device']:.3e} "
                 f"matmul FLOPs, {r['hbm_bytes_per_device'] / gib:.1f} GiB of HBM traffic "
                 f"(XLA's cost analysis, which counts each loop body once: {xla['flops']:.3e} FLOPs, "
                 f"{xla['bytes_accessed'] / gib:.1f} GiB)")
    roof = r.get("roofline_estimate")
    if roof:
        ici = roof.get("ici_bytes_per_second")
        links = f", {ici / 1e9:.0f} GB/s ICI" if ici else ", no published ICI figure: collectives not counted"
        terms = ", ".join(f"{name} {t * 1e3:.1f}" for name, t in roof["seconds"].items())
        low, high = ("at least ", "at most ") if unknown else ("", "")  # loops counted once
        shared = roof.get("devices_per_chip", 1)
        per = f" per device ({shared} to a chip)" if shared > 1 else ""
        lines.append(f"estimate (roofline, not measured; {roof['chip']} peaks{per} "
                     f"{roof['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
                     f"{roof['hbm_bytes_per_second'] / 1e9:.0f} GB/s HBM{links} from {roof['source']}): "
                     f"{low}{roof['step_seconds'] * 1e3:.1f} ms per step ({terms} ms), "
                     f"{roof['bound']}-bound, MFU {high}{100 * roof['mfu']:.1f}%")
    for kind, c in r["collectives"].items():
        dynamic = c["dynamic_loops"] and f" (+{c['dynamic_loops']} loops of unknown length counted once)"
        where = " over the data-centre network, not in the estimate" if kind == hlo.CROSS_SLICE else ""
        lines.append(f"  {kind}: {c['count']} per step, {c['bytes'] / gib:.2f} GiB, "
                     f"{c['sent_bytes'] / gib:.2f} GiB sent{where}{dynamic or ''}")
    return "\n".join(lines)
