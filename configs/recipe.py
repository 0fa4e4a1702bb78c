"""The paper's training recipe (method digest, Sec. 5), shared by the paper presets.

Not a preset itself: presets call `paper_config(model)` and `with_reuse(config, r)`.
"""

import dataclasses

from rexmoe_jax.config import (
    ComputeConfig,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PSRConfig,
    TrainConfig,
)

# 100B tokens at 512 sequences of 4,096 tokens (2M tokens) per step.
PAPER_STEPS = 47_684


def paper_config(model: ModelConfig) -> Config:
    """4,096-token sequences, 512 per batch, AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0,
    3e-4 cosine to 3e-5 after 100 warm-up steps, bf16 compute with float32 parameters. PSR's
    t_s = 10k and t_e = 30k are set here so an r > 1 variant only switches the schedule on.
    The batch is taken in 16 micro-batches of 32 sequences, one per device on 32 devices (the
    pod table in docs/tpu.md, benchmarks/tpu_presets.py); all 512 at once would put 16 sequences of
    4,096 tokens on each device at a time. With 64 devices or more, lower it (a preset's SLICES
    do so for the slices it names)."""
    return Config(
        model=dataclasses.replace(model, vocab_size=32_000),
        # Expert-parallel buffers at twice the even share: drops are rare and logged.
        compute=ComputeConfig(dtype="bfloat16", remat="full", capacity_factor=2.0),
        psr=PSRConfig(schedule="none", start_step=10_000, end_step=30_000),
        loss=LossConfig(load_balance=0.01, z_loss=0.001),
        optim=OptimConfig(learning_rate=3e-4, min_lr_ratio=0.1, warmup_steps=100, b1=0.9, b2=0.95,
                          weight_decay=0.1, clip_norm=1.0, grad_accum=16),
        data=DataConfig(seq_len=4096, batch_size=512),
        train=TrainConfig(steps=PAPER_STEPS, log_every=10, eval_every=1000, eval_batches=16,
                          checkpoint_every=1000, sample_tokens=0),
    )


def with_reuse(config: Config, reuse: int) -> Config:
    """The ReXMoE variant of a baseline preset: reuse frequency r and linear PSR."""
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, reuse=reuse),
        psr=dataclasses.replace(config.psr, schedule="linear"))
