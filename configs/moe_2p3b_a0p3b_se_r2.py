"""MoE-2.3BA0.3B-SE (2 shared + 6 routed of 64) with cross-layer
reuse r = 2 and linear PSR: the baseline preset with two fields changed.

    python train.py --config configs/moe_2p3b_a0p3b_se_r2.py --dry-run
"""

from configs.moe_2p3b_a0p3b_se import get_config as baseline
from configs.recipe import with_reuse


def get_config():
    return with_reuse(baseline(), 2)
