"""MoE-0.5BA0.13B (top-2 of 8) (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_0p5b_a0p13b.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig


def get_config():
    return paper_config(ModelConfig(
        d_model=768, expert_ffn=1536, num_layers=16, num_heads=16, num_kv_heads=2,
        num_experts=8, top_k=2))
