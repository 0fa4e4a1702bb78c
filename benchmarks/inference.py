"""Benchmark: prefill and decode speed of r = 1 against r = 2, 4, 8 at the same dimensions.

    python -m benchmarks.inference [--small] [--lengths 128 512 2048] [--batch 8] [--new-tokens 32]

Weights are random (speed does not depend on their values; a random router routes near
uniformly, as a balanced trained one does). For each r and prompt length it reports prefill
tokens/s, decode tokens/s (one token per sequence per step, with the KV cache), and the mean
number of distinct experts a layer's prefill touches, with the expert weight bytes that reads.
Prefill runs the configured dispatch (sort, with grouped matmuls); decode steps the "gather"
dispatch that rexmoe_jax.generate uses for them.

Why prefill can slow down with r and decode cannot: per-token compute is the same for every r
(K experts per token), but a layer's grouped matmul reads the weights of every expert that
receives a token. At r = 1 a layer can touch at most N experts; at r = 8, up to 8 N. Short
prompts are bound by those weight reads, so they slow the most; long prompts amortise them
over many tokens. A decode step routes one token per sequence to K experts whatever r is, and
the gather dispatch reads only those K experts' weights; grouped matmuls with static shapes
would do work for every expert of the pool (r times more at r).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.benchmarking import environment, median_seconds, print_table
from rexmoe_jax.config import ComputeConfig, ModelConfig
from rexmoe_jax.model.decoder import Decoder
from rexmoe_jax.model.dispatch import compute_for


@functools.partial(jax.jit, static_argnames=("config", "compute"))
def chosen_experts(config, compute, params, inputs_BxS):
    """Each layer's chosen pool experts (L, T, K), read from the router's sown intermediates."""
    _, state = Decoder(config, compute).apply({"params": params}, inputs_BxS, mutable=("intermediates",))
    blocks = [state["intermediates"][name]["layers"]["moe"]["experts"][0]
              for name in ("groups", "last_group") if name in state["intermediates"]]
    # (groups, layers, T, K) per block -> (L, T, K); pool ids are block-local.
    return [b.reshape((-1,) + b.shape[2:]) for b in blocks]


def model_config(reuse: int, small: bool) -> ModelConfig:
    if small:
        return ModelConfig(vocab_size=512, d_model=64, num_layers=8, num_heads=4, num_kv_heads=2,
                           expert_ffn=64, num_experts=8, top_k=2, reuse=reuse)
    # The MoE-0.5BA0.07B dimensions, 8 layers so that r = 8 is one group.
    return ModelConfig(vocab_size=32_000, d_model=768, num_layers=8, num_heads=16, num_kv_heads=2,
                       expert_ffn=384, num_experts=32, top_k=4, reuse=reuse)


def compute_config(small: bool) -> ComputeConfig:
    return ComputeConfig(dtype="float32" if small else "bfloat16")


def measure(config: ModelConfig, compute: ComputeConfig, batch: int, length: int, new_tokens: int, iters: int):
    tokens = jax.random.randint(jax.random.key(1), (batch, length + new_tokens), 0, config.vocab_size)
    model = Decoder(config, compute, decode=True)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    params = variables["params"]
    cache = jax.tree.map(jnp.zeros_like, variables["cache"])
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))

    @jax.jit
    def prefill(params, cache, prompt):
        (logits, _), state = model.apply({"params": params, "cache": cache}, prompt, positions, mutable=["cache"])
        return logits[:, -1], state["cache"]

    step_model = Decoder(config, compute_for(compute, "decode"), decode=True)  # as generate.py

    @jax.jit
    def decode_step(params, cache, token, position):
        (logits, _), state = step_model.apply({"params": params, "cache": cache}, token[:, None],
                                         jnp.full((batch, 1), position), mutable=["cache"])
        return logits[:, 0], state["cache"]

    prompt = tokens[:, :length]
    t_prefill = median_seconds(prefill, params, cache, prompt, iters=iters)
    _, filled = prefill(params, cache, prompt)
    t_decode = median_seconds(decode_step, params, filled, tokens[:, length], jnp.asarray(length), iters=iters)
    chosen = np.concatenate([np.asarray(b) for b in chosen_experts(config, compute, params, prompt)])
    touched = np.mean([len(np.unique(layer)) for layer in chosen])
    weight_bytes = touched * 3 * config.d_model * config.expert_ffn * jnp.dtype(compute.dtype).itemsize
    return batch * length / t_prefill, batch / t_decode, touched, weight_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny dimensions, for a CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    lengths = args.lengths or ([16, 64, 256] if args.small else [128, 512, 2048])
    batch = args.batch or (2 if args.small else 8)
    rows = []
    for length in lengths:
        base = None
        for reuse in args.reuse:
            prefill, decode, touched, weight_bytes = measure(model_config(reuse, args.small), compute_config(args.small), batch, length,
                                                             args.new_tokens, args.iters)
            base = base or (prefill, decode)
            rows.append([str(length), f"r={reuse}", f"{prefill:,.0f}", f"{prefill / base[0]:.2f}",
                         f"{decode:,.0f}", f"{decode / base[1]:.2f}", f"{touched:.1f}", f"{weight_bytes / 1e6:.1f}"])
    cfg = model_config(1, args.small)
    print_table(f"inference, batch {batch}, d {cfg.d_model}, N {cfg.num_experts}, K {cfg.top_k}, "
                f"{cfg.num_layers} layers, {compute_config(args.small).dtype} - {environment()}",
                ["prompt", "reuse", "prefill tokens/s", "vs r=1", "decode tokens/s", "vs r=1",
                 "experts touched per layer", "expert MB read per layer"], rows)


if __name__ == "__main__":
    main()
