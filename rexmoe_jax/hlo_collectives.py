"""The collectives of a compiled step, by kind, with how often they run and the bytes they
produce per device and step, read from the compiled HLO text (`compiled.as_text()`).

An op inside a while loop runs once per trip: the layer scans, the micro-batch loop and the
kernels' loops. A loop's trip count is read from its condition, `counter < constant`, the form
scans and fori_loops compile to; a loop whose bound is computed at run time counts once, and
`dynamic_loops` says how many such loops hold collectives. Each branch of a conditional counts
as if it ran. Bytes are the op's result: the gathered array of an all-gather, the scattered one
of a reduce-scatter, the received buffer of an all-to-all (for a ragged one, its capacity).
"""

from __future__ import annotations

import functools
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_CALLED = re.compile(r"\b(body|calls|true_computation|false_computation)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONDITION = re.compile(r"\bcondition=%([^\s,)]+)")
_CONSTANT = re.compile(r"= [su]32\[\]\S* constant\((\d+)\)")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """name -> its instruction lines, and the entry computation's name."""
    computations, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return computations, entry


def _array_bytes(shape: str, start: bool) -> int:
    """Bytes of a result shape; an async start's tuple holds operand and result: its largest."""
    sizes = [_BYTES[dtype] * math.prod(int(n) for n in dims.split(",") if n) for dtype, dims in _ARRAY.findall(shape)]
    return (max(sizes) if start else sum(sizes)) if sizes else 0


def _trip_count(condition: list[str]) -> int | None:
    """N for a loop condition `counter < N` with N a constant; None when the bound is not one."""
    constants = {int(m.group(1)) for line in condition for m in [_CONSTANT.search(line)] if m}
    compares = [line for line in condition if " compare(" in line and "direction=LT" in line]
    return constants.pop() if len(constants) == 1 and len(compares) == 1 else None


def per_step(hlo: str) -> dict[str, dict]:
    """{kind: {"count": runs per step, "bytes": bytes per device and step, "largest": the
    largest one op's bytes, "dynamic_loops": n}} for every kind in KINDS the step holds."""
    computations, entry = _computations(hlo)

    @functools.cache
    def totals(name: str) -> tuple[tuple[str, int, int, int, int], ...]:
        found: dict[str, list[int]] = {}

        def add(kind, count, size, largest, dynamic):
            entry_ = found.setdefault(kind, [0, 0, 0, 0])
            entry_[0] += count
            entry_[1] += size
            entry_[2] = max(entry_[2], largest)
            entry_[3] += dynamic

        for line in computations.get(name, ()):
            op = _OP.match(line)
            if op:
                kind = op.group(2).removesuffix("-start")
                if kind in KINDS and not op.group(2).endswith("-done"):
                    size = _array_bytes(op.group(1), op.group(2).endswith("-start"))
                    add(kind, 1, size, size, 0)
            trips = 1
            condition = _CONDITION.search(line)
            if condition:
                counted = _trip_count(computations.get(condition.group(1), []))
                trips = counted or 1
            called = [m.group(2) for m in _CALLED.finditer(line)]
            branches = _BRANCHES.search(line)
            if branches:
                called += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            for callee in called:
                for kind, count, size, largest, dynamic in totals(callee):
                    add(kind, count * trips, size * trips, largest, dynamic + (1 if condition and not counted else 0))
        return tuple((kind, *values) for kind, values in found.items())

    return {kind: {"count": count, "bytes": size, "largest": largest, "dynamic_loops": dynamic}
            for kind, count, size, largest, dynamic in sorted(totals(entry), key=lambda t: KINDS.index(t[0]))}
