"""MoE-0.5BA0.07B (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_0p5b_a0p07b.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig

# The mesh for each TPU slice this preset was compiled for: of the meshes compared there, the
# one with the fastest roofline estimate that leaves a tenth of the chip's HBM free (docs/tpu.md,
# "The paper presets on TPU slices"; on v6e-4 the one that fits with XLA's attention, with 32
# micro-batches of 16 sequences; on one v6e chip 64 micro-batches of 8, with flash attention).
# train.py applies it there, under the command line's overrides.
SLICES = {
    "v5p-8": ["mesh.data=1", "mesh.fsdp=4"],
    "v6e-1": ["optim.grad_accum=64"],
    "v6e-4": ["mesh.data=1", "mesh.fsdp=4", "optim.grad_accum=32"],
    "v6e-8": ["mesh.data=1", "mesh.fsdp=8"],
    "tpu7x-8": ["mesh.data=-1"],
}


def get_config():
    return paper_config(ModelConfig(
        d_model=768, expert_ffn=384, num_layers=16, num_heads=16, num_kv_heads=2,
        num_experts=32, top_k=4))
