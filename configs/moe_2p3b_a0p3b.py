"""MoE-2.3BA0.3B (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_2p3b_a0p3b.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig


def get_config():
    return paper_config(ModelConfig(
        d_model=512, expert_ffn=744, num_layers=32, num_heads=16, num_kv_heads=2,
        num_experts=64, top_k=8))
