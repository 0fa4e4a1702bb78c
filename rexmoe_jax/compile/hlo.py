"""What one run of a compiled program does per device, read from its HLO text
(`compiled.as_text()`): matmul FLOPs, HBM bytes and collectives, with every op inside a while
loop counted once per trip.

XLA's own cost analysis (`compiled.cost_analysis()`) counts a loop body once, however many
times it runs (a scan of 10 matmuls reports the FLOPs of one), so a step that scans its layers
and loops over micro-batches looks tens of times cheaper than it is. Here a loop's trip count
is the compiler's `known_trip_count` where it gives one (XLA:CPU), else read from its
condition, `counter < constant`, the form scans and fori_loops compile to (XLA:TPU); a loop
whose bound is computed at run time counts once, and `dynamic_loops` says how many such
loops hold collectives. Each branch of a conditional counts as if it ran.

- FLOPs: 2 x multiply-adds of every dot and convolution (TPU HLO writes matmuls as
  convolutions), counting only the kernel positions that meet the input, not padding, as
  XLA's cost analysis does; and a Mosaic kernel's (a TPU custom call) FLOPs where it states
  them (its `cost_estimate`, as the kernels libtpu 0.0.50 lowers `ragged_dot` to do).
  Elementwise work and kernels that state no cost are not counted.
- HBM bytes: operands plus results of every op outside fusions (a fusion reads its operands
  and writes its result once), bookkeeping ops (tuples, bitcasts, parameters) excluded; an
  operand read only through dynamic slices counts as the slices (a scan's layer of stacked
  weights), and an update in place (dynamic-update-slice, scatter, also as a fusion's root)
  as the update read and written, not the whole buffer.
- Collectives by kind: how often they run and the bytes of their results (the gathered array of
  an all-gather, the scattered one of a reduce-scatter, the whole receive buffer of a ragged
  all-to-all); `largest` is the biggest single op. `sent_bytes` is what each device sends over
  the interconnect by the usual algorithms, with n the devices of the op's replica group: an
  all-gather's result and a reduce-scatter's or all-to-all's operand, times (n - 1) / n; an
  all-reduce's operand twice that (a reduce-scatter then an all-gather); for a ragged
  all-to-all, the smaller of its send and receive buffers times (n - 1) / n: every row travels
  once, so a device sends on average its own rows, which the smaller buffer holds (the dispatch
  sends A rows into E x A-row buffers, and the return sends them back from those); a
  collective-permute's operands.
- XLA:TPU writes a reduce-scatter as a fusion of an all-reduce whose result (or results, for
  several arrays at once) is dynamic-sliced to the device's share: it counts as one
  reduce-scatter (its sliced results; (n - 1) / n of its operands sent), not as the all-reduce
  inside.
- XLA:TPU for TPU7x runs most all-reduces on the SparseCores, as an asynchronous call
  (`call-start`, `call-update` with the operands in libtpu 0.0.50, `call-done`;
  `async_execution_thread="sparsecore"`) of a computation whose root is the all-reduce: a
  call's computation (`to_apply`) is counted where it is called, and the call's own ops touch
  no HBM.
- Traffic between the slices of a multi-slice target leaves the ICI: XLA:TPU writes it as
  sends to the data-centre network's runtime (megascale). Each send's array counts under
  CROSS_SLICE, apart from the ICI kinds.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute")  # over the chips' interconnect (ICI)
CROSS_SLICE = "cross-slice"  # between slices, over the data-centre network

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .*\{$")
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\(([^)]*)\)")
_PARAM = re.compile(r"([\w.-]+): ((?:\([^()]*\))|[^,]+)")
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "f8e4m3fn": 8, "f8e5m2": 8}
_CALLED = re.compile(r"\b(body|calls|true_computation|false_computation)=%([^\s,)]+)")
_CALL_TARGET = re.compile(r"\bto_apply=%([^\s,)]+)")  # of a call (elsewhere to_apply is a reducer)
_CALLS = {"call", "call-start"}
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONDITION = re.compile(r"\bcondition=%([^\s,)]+)")
_CONSTANT = re.compile(r"= [su]32\[\]\S* constant\((\d+)\)")
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# A replica group's size: `replica_groups={{0,1,2,3},{4,5,6,7}}`, the iota form
# `replica_groups=[2,4]<=[8]` (2 groups of 4), or the mesh form of jax 0.12's XLA,
# `replica_groups=mesh['x'=2,'y'=4] {'y'}` (over y: 4); collective-permute has pairs instead.
_GROUPS = re.compile(r"replica_groups=(?:\{\{([\d,]*)\}|\[([\d,]+)\]<=|mesh\[([^\]]*)\] \{([^}]*)\})")
_NO_MEMORY = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
              "call-start", "call-update", "conditional",
              "after-all", "partition-id", "replica-id", "iota", "opt-barrier"}


def _arrays(shape: str) -> list[tuple[int, list[int]]]:
    """(bits per element, dims) of every array in a shape string (a tuple has several)."""
    return [(_BITS.get(dtype) or int(dtype[1:]), [int(n) for n in dims.split(",") if n])
            for dtype, dims in _ARRAY.findall(shape)]


def _bytes(shape: str) -> int:
    return sum(bits * math.prod(dims) // 8 for bits, dims in _arrays(shape))


def _dims(shape: str) -> list[int]:
    arrays = _arrays(shape)
    return arrays[0][1] if arrays else []


def _valid_positions(out: int, window: int, in_size: int, pad_lo: int, stride: int, lhs_dil: int,
                     rhs_dil: int) -> int:
    """(output, kernel) position pairs of one spatial dimension whose input position exists."""
    p = np.arange(out)[:, None] * stride + np.arange(window)[None, :] * rhs_dil - pad_lo
    return int(np.count_nonzero((p >= 0) & (p <= (in_size - 1) * lhs_dil) & (p % lhs_dil == 0)))


def _window(attrs: str, key: str, rank: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\dx_-]+)", attrs)
    if not m:
        return [default] * rank
    return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _conv_flops(out_shape: str, lhs: list[int], attrs: str) -> int:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels or not lhs:
        return 0
    lhs_labels, _, out_labels = labels.groups()
    out = _dims(out_shape)
    spatial = sorted(c for c in out_labels if c.isdigit())
    sizes = _window(attrs, "size", len(spatial), 1)
    pads = [int(v.split("_")[0]) for v in re.search(r"pad=([\dx_-]+)", attrs).group(1).split("x")] \
        if "pad=" in attrs else [0] * len(spatial)
    strides = _window(attrs, "stride", len(spatial), 1)
    lhs_dil = _window(attrs, "lhs_dilate", len(spatial), 1)
    rhs_dil = _window(attrs, "rhs_dilate", len(spatial), 1)
    groups = int(m.group(1)) if (m := re.search(r"feature_group_count=(\d+)", attrs)) else 1
    positions = math.prod(_valid_positions(out[out_labels.index(c)], sizes[k], lhs[lhs_labels.index(c)],
                                           pads[k], strides[k], lhs_dil[k], rhs_dil[k])
                          for k, c in enumerate(spatial))
    batch, features = out[out_labels.index("b")], out[out_labels.index("f")]
    return 2 * batch * features * lhs[lhs_labels.index("f")] // groups * positions


def _dot_flops(out_shape: str, lhs: list[int], attrs: str) -> int:
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m else 1
    return 2 * math.prod(_dims(out_shape)) * contracted


def _computations(hlo: str):
    """name -> (its instruction lines, its symbol table name -> shape), and the entry's name."""
    computations, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), ([], {}))
            current[1].update((name, shape) for name, shape in _PARAM.findall(header.group(2)))
            entry = header.group(1) if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":
            current = None
        elif current is not None and current[0] and not line.startswith("  "):
            # A line break inside an instruction's attributes: the splash attention kernels'
            # metadata holds one, and its next line starts "}}, metadata=...".
            current[0][-1] += "\n" + line
        elif current is not None:
            current[0].append(line)
            op = _OP.match(line)
            if op:
                current[1][op.group(1)] = op.group(2)
    return computations, entry


def _operands(text: str) -> list[str]:
    return [o.strip().split("%")[-1] for o in text.split(",") if "%" in o]


_PARSED: dict[int, tuple] = {}  # id of a computation's lines -> _parse_fused's answer, within analyse()


def _parse_fused(lines: list[str]):
    if id(lines) not in _PARSED:
        _PARSED[id(lines)] = _parse(lines)
    return _PARSED[id(lines)]


def _parse(lines: list[str]):
    """A fused computation's parameters (name -> index), each value's uses (kind, operand
    position, result shape, called computation), its ops (name -> kind, operands, shape) and root."""
    params, uses, ops, root = {}, {}, {}, None
    for line in lines:
        op = _OP.match(line)
        if not op:
            continue
        name, out, kind, args = op.groups()
        ops[name] = (kind, _operands(args), out)
        if kind == "parameter":
            params[name] = int(re.search(r"parameter\((\d+)\)", line).group(1))
        called = _CALLED.search(line[op.end():])
        for position, arg in enumerate(_operands(args)):
            uses.setdefault(arg, []).append((kind, position, out, called.group(2) if called else None))
        if line.lstrip().startswith("ROOT"):
            root = name
    return params, uses, ops, root


def _read(computations: dict, name: str, param: str, full: int) -> int:
    """Bytes a fused computation reads of its parameter `param`: the dynamic slices taken of it
    when that is all it is used for (also through nested fusions), else all of it."""
    _, uses, _, _ = _parse_fused(computations.get(name, ([], {}))[0])
    total = 0
    for kind, position, out, called in uses.get(param, []):
        if kind == "dynamic-slice" and position == 0:
            total += _bytes(out)
        elif kind == "fusion" and called:
            inner_params, _, _, _ = _parse_fused(computations.get(called, ([], {}))[0])
            inner = next((p for p, i in inner_params.items() if i == position), None)
            total += _read(computations, called, inner, full) if inner else full
        else:
            return full
    return min(total, full) if uses.get(param) else full


def _fusion_bytes(computations: dict, name: str, operands: list[str], symbols: dict, shape: str) -> int:
    """HBM bytes of one fusion: each operand read (only the dynamic slices taken of it, when
    that is all it is used for) and each result written, or, for a result updated in place
    (a dynamic-update-slice or scatter of an operand), that update read and written."""
    params, _, ops, root = _parse_fused(computations.get(name, ([], {}))[0])
    read = {i: _bytes(symbols.get(operands[i], "")) for i in range(len(operands))}
    for param, i in params.items():
        if i < len(operands):
            read[i] = _read(computations, name, param, read[i])
    results = ops[root][1] if root and ops[root][0] == "tuple" else [root] if root else []
    written = 0 if results else _bytes(shape)
    for result in results:
        kind, args, out = ops.get(result, ("", [], ""))
        if kind in ("dynamic-update-slice", "scatter") and args and args[0] in params:
            read[params[args[0]]] = 0
            written += 2 * _bytes(ops.get(args[-1] if kind == "scatter" else args[1], ("", [], ""))[2])
        else:
            written += _bytes(out)
    return sum(read.values()) + written


def _op_bytes(kind: str, shape: str, operands: list[str], symbols: dict) -> int:
    if kind == "dynamic-slice":
        return 2 * _bytes(shape)
    if kind == "dynamic-update-slice":
        return 2 * _bytes(symbols.get(operands[1], ""))
    return _bytes(shape) + sum(_bytes(symbols.get(o, "")) for o in operands)


def _group_size(attrs: str) -> int:
    found = _GROUPS.search(attrs)
    if not found:
        return 0  # no groups written: every device of the program
    listed, iota, axes, over = found.groups()
    if listed is not None:
        return len(listed.split(","))
    if iota is not None:
        return int(iota.split(",")[-1])
    sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", axes)}
    return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", over))


def _sent(kind: str, result: int, operands: list[str], symbols: dict, attrs: str) -> int:
    """Bytes one device sends over the interconnect for one collective (analyse's docstring)."""
    # A ragged all-to-all's operands are its send buffer, its receive buffer and four size
    # vectors; other collectives may take several arrays at once (combined all-reduces).
    if kind == "ragged-all-to-all":
        operand = min(_bytes(symbols.get(o, "")) for o in operands[:2])
    else:
        operand = sum(_bytes(symbols.get(o, "")) for o in operands)
    if kind == "collective-permute":
        return operand
    n = _group_size(attrs)
    share = (n - 1) / n if n else 1.0
    if kind == "all-gather":
        return int(result * share)
    return int((2 if kind == "all-reduce" else 1) * operand * share)


def _reduce_scatter(computations: dict, name: str) -> str | None:
    """The attributes of the all-reduce in a fused computation that is a reduce-scatter (each
    result a dynamic slice of that all-reduce's result, or of one of its results when several
    arrays are reduced at once), or None for any other fusion."""
    _, _, ops, root = _parse_fused(computations.get(name, ([], {}))[0])
    kind, args, _ = ops.get(root, ("", [], ""))
    sources = set()
    for result in args if kind == "tuple" else [root]:
        kind, args, _ = ops.get(result, ("", [], ""))
        source = args[0] if kind == "dynamic-slice" and args else ""
        if ops.get(source, ("",))[0] == "get-tuple-element":
            source = ops[source][1][0]
        sources.add(source if ops.get(source, ("",))[0] == "all-reduce" else None)
    if len(sources) != 1 or None in sources:
        return None
    reduce = sources.pop()
    line = next(line for line in computations[name][0] if f"%{reduce} = " in line)
    return line[_OP.match(line).end():]


def _trip_count(condition: list[str]) -> int | None:
    """N for a loop condition `counter < N` with N a constant; None when the bound is not one."""
    constants = {int(m.group(1)) for line in condition for m in [_CONSTANT.search(line)] if m}
    compares = [line for line in condition if " compare(" in line and "direction=LT" in line]
    return constants.pop() if len(constants) == 1 and len(compares) == 1 else None


class _Totals:
    """Sums of one computation (per run of it), scaled and added into its caller's."""

    def __init__(self):
        self.flops, self.hbm_bytes, self.collectives, self.unknown_loops = 0, 0, {}, 0

    def add_collective(self, kind, count, size, largest, dynamic, sent):
        c = self.collectives.setdefault(kind, [0, 0, 0, 0, 0])
        c[0], c[1], c[2] = c[0] + count, c[1] + size, max(c[2], largest)
        c[3], c[4] = c[3] + dynamic, c[4] + sent

    def add(self, other: _Totals, trips: int, dynamic: bool, with_bytes: bool):
        self.unknown_loops += other.unknown_loops + dynamic
        self.flops += other.flops * trips
        self.hbm_bytes += other.hbm_bytes * trips if with_bytes else 0
        for kind, (count, size, largest, dyn, sent) in other.collectives.items():
            self.add_collective(kind, count * trips, size * trips, largest, dyn + dynamic, sent * trips)


def analyse(hlo: str) -> dict:
    """{"flops", "hbm_bytes", "loops_of_unknown_length", "collectives": {kind: {"count", "bytes",
    "largest", "dynamic_loops", "sent_bytes"}}} of one run of the program, per device; with
    loops of unknown length (counted once) the FLOPs and bytes are lower bounds."""
    computations, entry = _computations(hlo)
    _PARSED.clear()

    @functools.cache
    def totals(name: str) -> _Totals:
        lines, symbols = computations.get(name, ([], {}))
        t = _Totals()
        for line in lines:
            op = _OP.match(line)
            if not op:
                continue
            _, shape, kind, operands = op.groups()
            attrs = line[op.end():]
            lhs = _dims(symbols.get(operands.split(",")[0].strip().split("%")[-1], ""))
            if kind == "convolution":
                t.flops += _conv_flops(shape, lhs, attrs)
            elif kind == "dot":
                t.flops += _dot_flops(shape, lhs, attrs)
            elif kind == "custom-call" and (stated := _KERNEL_FLOPS.search(attrs)):
                t.flops += int(stated.group(1))
            if kind == "fusion" and (fused := _CALLED.search(attrs)):
                t.hbm_bytes += _fusion_bytes(computations, fused.group(2), _operands(operands), symbols,
                                             shape)
                if (scatter := _reduce_scatter(computations, fused.group(2))) is not None:
                    size = _bytes(shape)
                    t.add_collective("reduce-scatter", 1, size, size, 0,
                                     _sent("reduce-scatter", size, _operands(operands), symbols, scatter))
                    continue  # its insides are the collective just counted, and touch no HBM
            elif kind not in _NO_MEMORY and not kind.endswith("-done"):
                t.hbm_bytes += _op_bytes(kind, shape, _operands(operands), symbols)
            if kind == "send" and "_xla_megascale_transfer_type" in attrs:
                # Its shape is (the array sent, a u32, a token).
                size = next((bits * math.prod(d) // 8 for bits, d in _arrays(shape)), 0)
                t.add_collective(CROSS_SLICE, 1, size, size, 0, size)
            collective = kind.removesuffix("-start")
            if collective in KINDS and not kind.endswith("-done"):
                size = max((bits * math.prod(d) // 8 for bits, d in _arrays(shape)), default=0) \
                    if kind.endswith("-start") else _bytes(shape)  # a start's tuple holds operand and result
                t.add_collective(collective, 1, size, size, 0,
                                 _sent(collective, size, _operands(operands), symbols, attrs))
            condition = _CONDITION.search(attrs)
            known = _KNOWN_TRIPS.search(attrs)
            counted = int(known.group(1)) if known else (
                _trip_count(computations.get(condition.group(1), ([], {}))[0]) if condition else None)
            called = [m.group(2) for m in _CALLED.finditer(attrs)]
            if kind in _CALLS and (target := _CALL_TARGET.search(attrs)):
                called.append(target.group(1))
            if branches := _BRANCHES.search(attrs):
                called += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            for callee in called:  # a fusion's insides touch no HBM: the fusion op's own operands do
                t.add(totals(callee), counted or 1, bool(condition and not counted), kind != "fusion")
        return t

    t = totals(entry)
    _PARSED.clear()
    return {"flops": t.flops, "hbm_bytes": t.hbm_bytes, "loops_of_unknown_length": t.unknown_loops,
            "collectives": {kind: dict(zip(("count", "bytes", "largest", "dynamic_loops", "sent_bytes"),
                                           t.collectives[kind]))
                            for kind in (*KINDS, CROSS_SLICE) if kind in t.collectives}}
