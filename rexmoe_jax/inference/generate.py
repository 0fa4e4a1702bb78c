"""Text generation: a KV-cache decoder (prefill, then one jitted token step at a time), and the
full-recompute decoder it is tested against. Both see the full pool (no PSR).

Prompts of different lengths share a batch: each sequence starts at position 0 and writes its
new tokens at its own positions, so no left padding shifts rotary positions.

    python -m rexmoe_jax.generate --workdir DIR --prompt "And God said" [--prompt ...]
        [--max-new-tokens 64] [--temperature 0.8] [--top-k 40] [--top-p 0.95] [--seed 0]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import cli, sharding
from rexmoe_jax.config import ComputeConfig, ConfigError, ModelConfig
from rexmoe_jax.data import resolve_tokenizer
from rexmoe_jax.inference.restore import (
    add_placement_arguments,
    inference_mesh,
    join_if_asked,
    read_config,
    restore,
)
from rexmoe_jax.model.decoder import Decoder
from rexmoe_jax.model.dispatch import compute_for
from rexmoe_jax.runtime import distributed

DEFAULT_COMPUTE = ComputeConfig()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"invalid sampling {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")


GREEDY = Sampling()


def sample_next(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    logits_BxV = logits_BxV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / sampling.temperature
    if sampling.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def kv_cache_bytes(config: ModelConfig, compute: ComputeConfig, batch: int, length: int) -> int:
    """The KV cache of `batch` sequences of `length` positions: keys and values of every layer
    (layers.Attention._cached), in the compute dtype."""
    itemsize = jnp.dtype(compute.dtype).itemsize
    return 2 * config.num_layers * batch * length * config.num_kv_heads * config.resolved_head_dim * itemsize


def free_memory(device: jax.Device) -> int:
    """Bytes free on `device`: what its allocator reports, or on a CPU the host's free memory."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_request(config: ModelConfig, compute: ComputeConfig, prompts: list[list[int]], new_tokens: int,
                  sampling: Sampling = GREEDY, free: int | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> None:
    """Raises ConfigError, before anything is compiled, for a request the model cannot serve:
    an empty prompt, ids outside the vocabulary, top-k past it, or one device's KV cache larger
    than half of the `free` bytes (default: free_memory of this process's first device; the
    other half is for the weights, the prefill and XLA's copies). On a `mesh`, a device holds
    the cache of its ceil(prompts / batch devices) rows (sharding.pad_rows)."""
    if not prompts:
        raise ConfigError("generate needs at least one prompt")
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) == 0:
            raise ConfigError(f"prompt {number} of {len(prompts)} is empty: each prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ConfigError(f"prompt {number} of {len(prompts)} holds token id {max(prompt)}, outside the "
                              f"model's vocabulary (model.vocab_size={config.vocab_size}): wrong tokenizer?")
    if new_tokens < 1:
        raise ConfigError(f"the number of new tokens must be >= 1, got {new_tokens}")
    if sampling.top_k > config.vocab_size:
        raise ConfigError(f"top-k {sampling.top_k} is larger than the vocabulary (model.vocab_size="
                          f"{config.vocab_size})")
    longest = max(map(len, prompts))
    budget = (free_memory(jax.local_devices()[0]) if free is None else free) // 2
    devices = 1 if mesh is None else sharding.batch_devices(mesh)
    rows_per_device = -(-len(prompts) // devices)
    per_position = kv_cache_bytes(config, compute, rows_per_device, 1)
    if per_position * (longest + new_tokens) > budget:
        fits = max(0, budget // per_position - longest)
        raise ConfigError(f"{new_tokens} new tokens do not fit: the KV cache of {rows_per_device} "
                          f"prompt(s) of up to {longest} tokens on a device would take "
                          f"{per_position * (longest + new_tokens) / 2**30:.1f} GiB, over half of the "
                          f"{2 * budget / 2**30:.1f} GiB free; at most {fits} new tokens fit")


def _prompt_batch(prompts: list[list[int]], new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    buffer = np.zeros((len(prompts), int(lengths.max()) + new_tokens), np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, :len(prompt)] = prompt
    return buffer, lengths


def warn_past_training(prompts: list[list[int]], new_tokens: int, seq_len: int) -> None:
    """Rotary positions past training raise no error but give worse text: say so."""
    longest = max(map(len, prompts), default=0)
    if longest + new_tokens > seq_len:
        print(f"warning: a prompt of {longest} tokens plus {new_tokens} new ones runs past the {seq_len} "
              "positions the model was trained on (data.seq_len); expect worse text",
              file=sys.stderr, flush=True)


def _finish(out_BxS: np.ndarray, eod_id: int | None) -> list[list[int]]:
    result = []
    for row in np.asarray(out_BxS).tolist():
        result.append(row[:row.index(eod_id)] if eod_id is not None and eod_id in row else row)
    return result


@distributed.CompiledTogether  # several processes: compiled on each before any runs it
@functools.partial(jax.jit, static_argnames=("config", "compute", "new_tokens", "sampling", "eod_id"))
def _decode(config, compute, params, buffer_BxS, lengths_B, key, *, new_tokens, sampling, eod_id):
    model = Decoder(config, compute_for(compute, "score"), decode=True)  # the prompts, dropless
    step_model = Decoder(config, compute_for(compute, "decode"), decode=True)  # one token per sequence
    b, total = buffer_BxS.shape
    cache = jax.eval_shape(lambda: model.init(jax.random.key(0), buffer_BxS)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    prompt_len = total - new_tokens
    positions_BxS = jnp.broadcast_to(jnp.arange(prompt_len)[None, :], (b, prompt_len))
    (logits, _), state = model.apply({"params": params, "cache": cache}, buffer_BxS[:, :prompt_len],
                                     positions_BxS, mutable=["cache"])
    last_BxV = logits[jnp.arange(b), lengths_B - 1]

    def step(carry, i):
        cache, last_BxV, done_B, key = carry
        key, sample_key = jax.random.split(key)
        token_B = sample_next(last_BxV, sample_key, sampling)
        if eod_id is not None:
            token_B = jnp.where(done_B, eod_id, token_B)
            done_B = done_B | (token_B == eod_id)
        (logits, _), state = step_model.apply({"params": params, "cache": cache}, token_B[:, None],
                                              (lengths_B + i)[:, None], mutable=["cache"])
        return (state["cache"], logits[:, 0], done_B, key), token_B

    done = jnp.zeros((b,), bool)
    _, tokens_SxB = jax.lax.scan(step, (state["cache"], last_BxV, done, key), jnp.arange(new_tokens))
    return tokens_SxB.T


def generate(config: ModelConfig, params, prompts: list[list[int]], new_tokens: int, key: jax.Array, *,
             sampling: Sampling = GREEDY, eod_id: int | None = None, compute: ComputeConfig = DEFAULT_COMPUTE,
             mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
    """Continues each prompt (token ids) by up to `new_tokens` tokens with a KV cache; a
    sequence ends at `eod_id` (not included). On a `mesh` (where `params` live), the prompts
    and the KV cache are split over its batch axes, the last prompt repeated where their number
    does not divide (greedy decoding gives the same tokens; sampling draws for the padded
    batch). Without `mesh`, the one `params` are placed on, if any."""
    mesh = mesh if mesh is not None else sharding.mesh_of(params)
    check_request(config, compute, prompts, new_tokens, sampling, mesh=mesh)
    buffer, lengths = _prompt_batch(prompts, new_tokens)
    with sharding.using(mesh):
        out = _decode(config, compute, params, sharding.put_rows(sharding.pad_rows(buffer, mesh), mesh),
                      sharding.put_rows(sharding.pad_rows(lengths, mesh), mesh), key,
                      new_tokens=new_tokens, sampling=sampling, eod_id=eod_id)
    return _finish(sharding.host_rows(out)[:len(prompts)], eod_id)


@distributed.CompiledTogether  # several processes: compiled on each before any runs it
@functools.partial(jax.jit, static_argnames=("config", "compute", "new_tokens", "sampling", "eod_id"))
def _recompute(config, compute, params, buffer_BxS, lengths_B, key, *, new_tokens, sampling, eod_id):
    model = Decoder(config, compute_for(compute, "score"))
    b = buffer_BxS.shape[0]

    def step(carry, i):
        buffer, done_B, key = carry
        key, sample_key = jax.random.split(key)
        logits, _ = model.apply({"params": params}, buffer)
        token_B = sample_next(logits[jnp.arange(b), lengths_B + i - 1], sample_key, sampling)
        if eod_id is not None:
            token_B = jnp.where(done_B, eod_id, token_B)
            done_B = done_B | (token_B == eod_id)
        return (buffer.at[jnp.arange(b), lengths_B + i].set(token_B), done_B, key), token_B

    _, tokens_SxB = jax.lax.scan(step, (buffer_BxS, jnp.zeros((b,), bool), key), jnp.arange(new_tokens))
    return tokens_SxB.T


def generate_uncached(config: ModelConfig, params, prompts: list[list[int]], new_tokens: int, key: jax.Array, *,
                      compute: ComputeConfig = DEFAULT_COMPUTE,
                      sampling: Sampling = GREEDY, eod_id: int | None = None) -> list[list[int]]:
    """The same as `generate`, recomputing the whole sequence for every token: the oracle."""
    check_request(config, compute, prompts, new_tokens, sampling)
    buffer, lengths = _prompt_batch(prompts, new_tokens)
    out = _recompute(config, compute, params, jnp.asarray(buffer), jnp.asarray(lengths), key,
                     new_tokens=new_tokens, sampling=sampling, eod_id=eod_id)
    return _finish(out, eod_id)


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_placement_arguments(parser)
    args = parser.parse_args(argv)
    distributed.simulate_devices(args.simulate_devices)  # before anything asks JAX for its devices
    # Every argument is checked before the checkpoint is read.
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    empty = [number for number, prompt in enumerate(args.prompt, 1) if not prompt]
    if empty:
        raise ConfigError(f"--prompt number {empty[0]} of {len(args.prompt)} is empty; give it some text")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    config = read_config(pathlib.Path(args.workdir))
    tokenizer = resolve_tokenizer(config.data)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    join_if_asked(args.distributed)
    mesh = inference_mesh(config, args.mesh)
    check_request(config.model, config.compute, prompts, args.max_new_tokens, sampling, mesh=mesh)
    run = restore(args.workdir, mesh=mesh, dtype=args.dtype)
    warn_past_training(prompts, args.max_new_tokens, run.config.data.seq_len)
    out = generate(run.config.model, run.params, prompts, args.max_new_tokens, jax.random.key(args.seed),
                   sampling=sampling, eod_id=run.tokenizer.eod_id, compute=run.config.compute, mesh=run.mesh)
    if jax.process_index() == 0:
        for prompt, tokens in zip(args.prompt, out):
            print(f"{prompt}{run.tokenizer.decode(tokens)}\n")
    distributed.finish()
    return 0

