"""MoE-2.3BA0.3B (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_2p3b_a0p3b.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig

# The mesh for each TPU slice this preset was compiled for (docs/tpu.md, "The paper presets on
# TPU slices"): train.py applies it there, under the command line's overrides.
SLICES = {
    "v5p-16": ["mesh.expert=8"],
    "v5p-64": ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=8"],
    "v6e-8": ["mesh.expert=8"],
}


def get_config():
    return paper_config(ModelConfig(
        d_model=512, expert_ffn=744, num_layers=32, num_heads=16, num_kv_heads=2,
        num_experts=64, top_k=8))
