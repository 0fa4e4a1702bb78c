"""MoE-7BA3B-SE with cross-layer
reuse r = 3 and linear PSR: the baseline preset with two fields changed.

    python train.py --config configs/moe_7b_a3b_se_r3.py --dry-run
"""

from configs.moe_7b_a3b_se import SLICES  # noqa: F401 - the same meshes as r = 1
from configs.moe_7b_a3b_se import get_config as baseline
from configs.recipe import with_reuse


def get_config():
    return with_reuse(baseline(), 3)
