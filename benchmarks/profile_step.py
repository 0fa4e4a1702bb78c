"""Profile: where one compiled train step spends its time, per part of the model, r = 1 against
r = 4 at the same dimensions (PSR off: the full pool, as in benchmarks/train_step.py).

    python -m benchmarks.profile_step [--small] [--layers L] [--batch B] [--seq S] [--steps N]
        [key=value ...]

Without --small the model is the tiny preset's (configs/tiny.py, its batch and sequence); with
--small it is train_step.py's: the 0.5B preset's shape with tiny widths.

Method. The model code wraps its parts in `jax.named_scope` (router, psr_mask, top_k, sort,
permute, expert_ffn (or ffn_gate, ffn_up, ffn_down), combine, aux_losses, embed, output_head, cross_entropy,
optimizer, step_metrics; attention and the norms are Flax modules, which name their own scopes).
The step is compiled once, a few steps run under `jax.profiler.trace`, and the trace it writes
(plugins/profile/<run>/<host>.trace.json.gz, Chrome trace events) gives every executed XLA:CPU
thunk with its HLO instruction name ("hlo_op"). The compiled HLO text maps each instruction to
its op_name metadata, the path of scopes it was traced under; the innermost scope named above
is its part, and "transpose(" in the path marks the backward pass. A thunk's time is its own:
thunks nested in it (a while loop's body) are subtracted. A fusion carries the op_name of its
root, so an elementwise op fused into a neighbour's loop is counted with that neighbour; an
instruction without metadata (a copy) takes that of its first operand, or of the loop it is in.
"Not in a thunk" is the wall time of the traced steps minus all thunk time: dispatch, the
profiler's own cost, and waiting for a core on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import tempfile
import time

import jax

from benchmarks.benchmarking import environment, print_table
from benchmarks.train_step import CONFIGS, bench_config, prepare
from rexmoe_jax.config import apply_overrides, load_preset

# Innermost named scope -> the part of the step it belongs to, in the order the table lists them.
PARTS = {
    "embed": "embedding", "attention": "attention", "attn_norm": "norms", "ffn_norm": "norms",
    "final_norm": "norms", "router": "router (logits, softmax)", "psr_mask": "PSR mask",
    "top_k": "top-K", "sort": "sort (argsort, group sizes)", "permute": "permute (gather)",
    "ffn_gate": "grouped matmul gate (+ silu)", "ffn_up": "grouped matmul up (+ product)",
    "ffn_down": "grouped matmul down",
    "expert_ffn": "expert FFN, one blocked loop (gate, up, down)",
    "combine": "combine (gather back, gates)",
    "moe": "MoE layer, rest", "aux_losses": "aux losses (balance, z)",
    "layers": "layer and group scans (slices, stacking, gradient buffers)",
    "groups": "layer and group scans (slices, stacking, gradient buffers)",
    "last_group": "layer and group scans (slices, stacking, gradient buffers)",
    "output_head": "output head", "cross_entropy": "cross-entropy",
    "optimizer": "optimizer update (+ norms)", "step_metrics": "routing and step metrics",
}
OTHER, OUTSIDE = "other (in no part above)", "not in a thunk (dispatch, profiler, waiting)"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+) [(]")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name metadata, for every instruction of the compiled module."""
    names, operands, computation_of, callers = {}, {}, {}, {}
    computation = ""
    for line in hlo_text.splitlines():
        head = _INSTRUCTION.match(line)
        if head is None:
            start = _COMPUTATION.match(line)
            if start and line.rstrip().endswith("{"):
                computation = start.group(1)
            continue
        name, rest = head.group(1), line[head.end():]
        found = re.search(r'op_name="([^"]*)"', rest)
        if found:
            names[name] = found.group(1)
        operands[name] = re.findall(r"%([\w.\-]+)", rest.split(", metadata=")[0])
        computation_of[name] = computation
        for called in _CALLS.findall(rest):
            for callee in re.split(r"[,\s%]+", called):
                callers.setdefault(callee, name)
    for _ in range(4):  # fill instructions without metadata from an operand, or their caller
        for name, computation in computation_of.items():
            if name not in names:
                known = [names[o] for o in operands[name] if o in names]
                caller = callers.get(computation)
                if known:
                    names[name] = known[0]
                elif caller in names:
                    names[name] = names[caller]
    return names


def part_of(op_name: str) -> tuple[str, str]:
    """(part, "fwd" | "bwd") of an op_name such as
    'jit(train_step)/transpose(jvp(Decoder))/while/body/.../layers/moe/ffn_gate/dot_general'.
    XLA names an op it combined from several (an all-reduce) 'prefix/(a:b:c)'."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    merged = re.search(r"[(]([^()]*:[^()]*)[)]$", op_name)
    if merged:
        prefix = op_name[:merged.start()]
        scopes = {_scope(prefix + alternative) for alternative in merged.group(1).split(":")}
        if len(scopes) > 1:
            return " + ".join(sorted(map(str, scopes))) + ": one op merged by XLA", direction
        op_name = prefix + merged.group(1).split(":")[0]
    scope = _scope(op_name)
    if scope is None and "/while/" in op_name:  # the scans' own loops: the grouped matmuls' are scoped
        scope = "layers"
    return (PARTS[scope] if scope else OTHER), direction


def _scope(op_name: str) -> str | None:
    """The innermost scope of `op_name` that PARTS names (jvp(...) and transpose(...) unwrapped)."""
    for component in reversed(op_name.split("/")):
        scope = re.sub(r"^(?:\w+[(])+", "", component).rstrip(")")
        if scope in PARTS:
            return scope
    return None


def thunk_times(trace_folder: str, module: str) -> dict[str, float]:
    """Seconds of own time per HLO instruction of `module`, summed over the trace."""
    path = next(pathlib.Path(trace_folder).glob("plugins/profile/*/*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    if len(events) >= 1_000_000:
        print(f"warning: {len(events)} trace events; the JSON trace may be capped, use fewer --steps")
    thunks = collections.defaultdict(list)
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            thunks[(e["pid"], e["tid"])].append((e["ts"], e["dur"], args["hlo_op"]))
    own = collections.Counter()
    for spans in thunks.values():
        stack = []  # enclosing thunks: (end, name)
        for ts, dur, name in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and ts >= stack[-1][0]:
                stack.pop()
            if stack:
                own[stack[-1][1]] -= dur * 1e-6
            own[name] += dur * 1e-6
            stack.append((ts + dur, name))
    return own


def profile(config, steps: int) -> tuple[dict[tuple[str, str], float], float]:
    """Milliseconds per step by (part, direction), and the wall milliseconds of a step."""
    step, state, batch = prepare(config)
    compiled = step.lower(state, batch).compile()
    hlo = compiled.as_text()
    module = re.match(r"HloModule ([\w.\-]+)", hlo).group(1)
    for _ in range(2):
        state, out = compiled(state, batch)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            for _ in range(steps):
                state, out = compiled(state, batch)
            jax.block_until_ready(out)
            wall = (time.perf_counter() - start) * 1e3 / steps
        own = thunk_times(folder, module)
    names = op_names(hlo)
    parts = collections.Counter()
    for instruction, seconds in own.items():
        parts[part_of(names.get(instruction, ""))] += seconds * 1e3 / steps
    parts[(OUTSIDE, "fwd")] = wall - sum(own.values()) * 1e3 / steps
    return parts, wall


def _row_cells(parts, part):
    fwd, bwd = parts.get((part, "fwd"), 0.0), parts.get((part, "bwd"), 0.0)
    return [f"{fwd:.1f}", f"{bwd:.1f}" if bwd else "-", f"{fwd + bwd:.1f}"], fwd + bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="train_step.py's --small 0.5B shape")
    parser.add_argument("--preset", default="moe_0p5b_a0p07b", help="with --small: the paper preset")
    parser.add_argument("--layers", type=int, default=0, help="0: as the preset")
    parser.add_argument("--batch", type=int, default=0, help="0: as the preset (--small: 8)")
    parser.add_argument("--seq", type=int, default=0, help="0: as the preset (--small: 128)")
    parser.add_argument("--steps", type=int, default=3, help="steps traced (after two warm-up steps)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    results = {}
    for reuse in (1, 4):
        if args.small:
            args.batch, args.seq = args.batch or 8, args.seq or 128
            config = bench_config(args.preset if reuse == 1 else f"{args.preset}_r4", args, [])
        else:
            overrides = [f"model.reuse={reuse}", "psr.schedule=none"]
            overrides += [f"{key}={value}" for key, value in (("model.num_layers", args.layers),
                          ("data.batch_size", args.batch), ("data.seq_len", args.seq)) if value]
            config = apply_overrides(load_preset(CONFIGS / "tiny.py"), overrides + args.overrides)
        results[reuse] = profile(config, args.steps)
    order = list(dict.fromkeys(PARTS.values()))
    order += sorted({part for r in (1, 4) for part, _ in results[r][0]} - set(order) - {OTHER, OUTSIDE})
    rows, order = [], order + [OTHER, OUTSIDE]
    for part in order:
        cells_1, total_1 = _row_cells(results[1][0], part)
        cells_4, total_4 = _row_cells(results[4][0], part)
        rows.append([part, *cells_1, *cells_4, f"{total_4 - total_1:+.1f}"])
    walls = [results[r][1] for r in (1, 4)]
    rows.append(["step (wall)", "", "", f"{walls[0]:.1f}", "", "", f"{walls[1]:.1f}",
                 f"{walls[1] - walls[0]:+.1f}"])
    m = config.model
    shape = (f"d {m.d_model}, F {m.expert_ffn}, N {m.num_experts}, K {m.top_k}, {m.num_layers} layers, "
             f"{config.data.batch_size} x {config.data.seq_len} tokens, {config.compute.dtype}")
    cores = len(os.sched_getaffinity(0))
    print_table(f"ms per train step by part, r = 1 and r = 4 ({shape}; mean of {args.steps} traced steps; "
                f"{cores} of {os.cpu_count()} cores) - {environment()}",
                ["part", "r=1 fwd", "r=1 bwd", "r=1", "r=4 fwd", "r=4 bwd", "r=4", "r=4 - r=1"], rows)


if __name__ == "__main__":
    main()
