"""MoE-0.5BA0.07B with cross-layer
reuse r = 2 and linear PSR: the baseline preset with two fields changed.

    python train.py --config configs/moe_0p5b_a0p07b_r2.py --dry-run
"""

from configs.moe_0p5b_a0p07b import SLICES  # noqa: F401 - the same meshes as r = 1
from configs.moe_0p5b_a0p07b import get_config as baseline
from configs.recipe import with_reuse


def get_config():
    return with_reuse(baseline(), 2)
