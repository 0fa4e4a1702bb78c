"""Token-level scoring: log p(continuation | context) for many requests, as lm-evaluation-harness
scores them, and rolling windows over texts of any length.

A request is (context ids, continuation ids), both non-empty. As lm-evaluation-harness does,
context + continuation is cut to its last seq_len + 1 tokens (the context loses its start), and
the continuation's tokens are scored by the logits before them. Two implementations of the same
numbers, behind `implementation=`:

- "padded", the reference: one row of seq_len positions per request, the rest padding.
- "packed": the requests sharing a (cut) context form one unit, the context's first tokens
  computed once and each continuation a branch after it (layers.Segments keeps branches from
  seeing each other); units are packed into rows first-fit by decreasing length. Each branch
  repeats the context's last token, whose logits predict the branch's first token, so that
  every position has one target.

Shape letters: the glossary in rexmoe_jax/model/__init__.py; S is a row's width (seq_len).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import sharding
from rexmoe_jax.config import Config
from rexmoe_jax.model.decoder import Decoder
from rexmoe_jax.model.dispatch import compute_for
from rexmoe_jax.model.layers import Segments
from rexmoe_jax.runtime import distributed

Request = tuple[Sequence[int], Sequence[int]]
IMPLEMENTATIONS = ("packed", "padded")
_ROWS = 8  # rows per call; a packed run's last call is rounded up to a power of two


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per request: summed log-probability and whether every token was the argmax (lm_eval's
    is_greedy); and the cost: token positions computed, and those scored."""

    logprob: np.ndarray
    greedy: np.ndarray
    computed: int
    scored: int


@dataclasses.dataclass
class _Rows:
    """A call's worth of rows; `owner` names the request whose token each target is (-1: none)."""

    tokens: np.ndarray
    positions: np.ndarray
    document: np.ndarray
    branch: np.ndarray
    targets: np.ndarray
    owner: np.ndarray

    @classmethod
    def empty(cls, rows: int, width: int) -> _Rows:
        return cls(*(np.zeros((rows, width), np.int32) for _ in range(5)), np.full((rows, width), -1))


def cut(context: Sequence[int], continuation: Sequence[int], seq_len: int) -> tuple[list[int], list[int]]:
    """The request as the model sees it: context + continuation cut to the last seq_len + 1."""
    if not context or not continuation:
        raise ValueError("a scored request needs a non-empty context and continuation")
    if len(continuation) > seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds data.seq_len={seq_len}")
    ids = (list(context) + list(continuation))[-(seq_len + 1):]
    return ids[:len(ids) - len(continuation)], list(continuation)


def _padded(requests: list[tuple[list[int], list[int]]], width: int) -> list[_Rows]:
    calls = []
    for start in range(0, len(requests), _ROWS):
        rows = _Rows.empty(_ROWS, width)
        for row, (context, continuation) in enumerate(requests[start:start + _ROWS]):
            ids = context + continuation
            n = len(ids) - 1
            rows.tokens[row, :n], rows.targets[row, :n] = ids[:-1], ids[1:]
            rows.positions[row] = np.arange(width)
            rows.owner[row, n - len(continuation):n] = start + row
        calls.append(rows)
    return calls


def _units(requests: list[tuple[list[int], list[int]]], width: int) -> list[tuple[list[int], list[int]]]:
    """(trunk, branch requests): requests sharing a context, split where they exceed a row."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append(index)
    units = []
    for context, members in by_context.items():
        trunk = list(context[:-1])
        unit, used = [], len(trunk)
        for index in members:
            need = len(requests[index][1])  # the context's last token + continuation[:-1]
            if unit and used + need > width:
                units.append((trunk, unit))
                unit, used = [], len(trunk)
            unit.append(index)
            used += need
        units.append((trunk, unit))
    return units


def _place(rows: _Rows, row: int, column: int, document: int, trunk: list[int], members: list[int],
           requests: list[tuple[list[int], list[int]]]) -> None:
    """Writes a unit at rows[row, column:]: its trunk (branch 0), then one branch per request."""
    n = len(trunk)
    span = slice(column, column + n)
    rows.tokens[row, span], rows.positions[row, span] = trunk, np.arange(n)
    rows.targets[row, span] = trunk[1:] + requests[members[0]][0][-1:]  # the last one is not scored
    rows.document[row, span], column = document, column + n
    for branch, index in enumerate(members, start=1):
        context, continuation = requests[index]
        span = slice(column, column + len(continuation))
        rows.tokens[row, span] = [context[-1]] + continuation[:-1]
        rows.targets[row, span], rows.owner[row, span] = continuation, index
        rows.positions[row, span] = np.arange(n, n + len(continuation))
        rows.document[row, span], rows.branch[row, span] = document, branch
        column += len(continuation)


def _packed(requests: list[tuple[list[int], list[int]]], width: int) -> list[_Rows]:
    units = _units(requests, width)
    length = [len(trunk) + sum(len(requests[i][1]) for i in members) for trunk, members in units]
    free: list[int] = []  # space left in each row, first fit by decreasing unit length
    placed = []
    for u in sorted(range(len(units)), key=lambda u: -length[u]):
        row = next((r for r, space in enumerate(free) if space >= length[u]), len(free))
        if row == len(free):
            free.append(width)
        placed.append((u, row, width - free[row]))
        free[row] -= length[u]
    calls = []
    for start in range(0, len(free), _ROWS):
        count = min(_ROWS, len(free) - start)
        calls.append(_Rows.empty(min(_ROWS, 1 << (count - 1).bit_length()), width))
    for document, (u, row, column) in enumerate(placed, start=1):  # document 0 is padding
        _place(calls[row // _ROWS], row % _ROWS, column, document, *units[u], requests)
    return calls


@distributed.CompiledTogether  # several processes: compiled on each before any runs it
@functools.partial(jax.jit, static_argnames=("config", "compute", "packed"))
def _score_rows(config, compute, params, rows: dict, packed: bool):
    segments = Segments(rows["document"], rows["branch"]) if packed else None
    logits, _ = Decoder(config, compute).apply({"params": params}, rows["tokens"], rows["positions"],
                                               segments=segments)
    logp_BxSxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets_BxS = rows["targets"]
    logp_BxS = jnp.take_along_axis(logp_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
    return logp_BxS, jnp.argmax(logits, axis=-1) == targets_BxS


def score(config: Config, params, requests: Sequence[Request], implementation: str = "packed",
          mesh: jax.sharding.Mesh | None = None) -> Scores:
    """Summed log p(continuation | context) and is_greedy for each request (module docstring),
    on the `mesh` where `params` live (rows split over its batch axes; by default the one they
    are placed on, if any) or the default device."""
    mesh = mesh if mesh is not None else sharding.mesh_of(params)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    width = config.data.seq_len
    cut_requests = [cut(c, x, width) for c, x in requests]
    build = _packed if implementation == "packed" else _padded
    logprob, wrong = np.zeros(len(requests)), np.zeros(len(requests))
    computed = 0
    for rows in build(cut_requests, width):
        arrays = {f.name: sharding.put_rows(sharding.tile_rows(getattr(rows, f.name), mesh), mesh)
                  for f in dataclasses.fields(rows) if f.name != "owner"}
        with sharding.using(mesh):
            logp, greedy = _score_rows(config.model, compute_for(config.compute, "score"), params, arrays,
                                       implementation == "packed")
        logp, greedy = sharding.host_rows(logp)[:len(rows.owner)], sharding.host_rows(greedy)[:len(rows.owner)]
        owned = rows.owner >= 0
        logprob += np.bincount(rows.owner[owned], np.asarray(logp, np.float64)[owned], len(requests))
        wrong += np.bincount(rows.owner[owned], ~np.asarray(greedy)[owned], len(requests))
        computed += rows.tokens.size
    scored = sum(len(x) for _, x in cut_requests)
    return Scores(logprob, wrong == 0, computed, scored)


def rolling_windows(tokens: Sequence[int], prefix_id: int, seq_len: int,
                    stride: int | None = None) -> list[Request]:
    """Requests that score every token of `tokens` once, after `prefix_id` (end-of-text).

    Each window scores the next `stride` tokens given as many tokens before them as fit in
    seq_len positions. stride = seq_len (the default) gives lm-evaluation-harness's disjoint
    rolling windows; a smaller stride gives every scored token more context, for
    seq_len / stride times the compute.
    """
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride {stride} must be between 1 and data.seq_len={seq_len}")
    full = [prefix_id] + list(tokens)
    windows = []
    for start in range(0, len(tokens), stride):
        end = min(start + stride, len(tokens))  # scores tokens[start:end] = full[start+1:end+1]
        windows.append((full[max(0, end - seq_len):start + 1], full[start + 1:end + 1]))
    return windows


def rolling_loglikelihood(config: Config, params, texts: Sequence[Sequence[int]], prefix_id: int,
                          stride: int | None = None, implementation: str = "packed",
                          mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Summed log-probability of each token list, over rolling windows (see rolling_windows)."""
    windows, owner = [], []
    for index, tokens in enumerate(texts):
        pieces = rolling_windows(tokens, prefix_id, config.data.seq_len, stride)
        windows += pieces
        owner += [index] * len(pieces)
    if not windows:
        return np.zeros(len(texts))
    scores = score(config, params, windows, implementation, mesh)
    return np.bincount(np.asarray(owner), scores.logprob, len(texts))
