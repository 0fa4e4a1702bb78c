"""MoE-2.3BA0.3B (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_2p3b_a0p3b.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig

# The mesh for each TPU slice this preset was compiled for: of the meshes compared there, the
# one with the fastest roofline estimate that leaves a tenth of the chip's HBM free (docs/tpu.md,
# "The paper presets on TPU slices"; on v5p-8 the one that fits, v5p-64 is the README's
# example; on v6e-4, with flash attention, fsdp 4 with 32 micro-batches of 16 sequences).
# train.py applies it there, under the command line's overrides.
SLICES = {
    "v5p-8": ["mesh.data=1", "mesh.fsdp=4"],
    "v5p-16": ["mesh.data=1", "mesh.fsdp=8"],
    "v5p-64": ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=8"],
    "v6e-4": ["mesh.data=1", "mesh.fsdp=4", "optim.grad_accum=32"],
    "v6e-8": ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"],
    "tpu7x-8": ["mesh.data=1", "mesh.fsdp=8"],
}


def get_config():
    return paper_config(ModelConfig(
        d_model=512, expert_ffn=744, num_layers=32, num_heads=16, num_kv_heads=2,
        num_experts=64, top_k=8))
