"""MoE-2.3BA0.3B with cross-layer
reuse r = 4 and linear PSR: the baseline preset with two fields changed.

    python train.py --config configs/moe_2p3b_a0p3b_r4.py --dry-run
    python train.py --config configs/moe_2p3b_a0p3b_r4.py --compile-only --target v5p-64 \
        mesh.data=1 mesh.fsdp=4 mesh.expert=8    # XLA:TPU's plan: 5.2 GiB per chip of 95
"""

from configs.moe_2p3b_a0p3b import SLICES  # noqa: F401 - the same meshes as r = 1
from configs.moe_2p3b_a0p3b import get_config as baseline
from configs.recipe import with_reuse


def get_config():
    return with_reuse(baseline(), 4)
