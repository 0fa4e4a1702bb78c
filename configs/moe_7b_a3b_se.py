"""MoE-7BA3B-SE (2 shared + 6 routed of 64; about 18B parameters as printed) (r = 1):
the paper's layer-local MoE baseline.

    python train.py --config configs/moe_7b_a3b_se.py --dry-run
"""

from configs.recipe import paper_config
from rexmoe_jax.config import ModelConfig

# The mesh and micro-batches for each TPU slice this preset was compiled for (docs/tpu.md, "The
# paper presets on TPU slices"): train.py applies them there, under the command line's
# overrides. Each micro-batch gives every device that holds rows (data x fsdp x expert) at least
# one sequence: at most 32 micro-batches of the 512 on 16 such devices, 8 on 64.
SLICES = {
    "v5p-16": ["mesh.fsdp=8", "optim.grad_accum=32"],
    "v5p-32": ["mesh.fsdp=2", "mesh.expert=8"],
    "v6e-32": ["mesh.fsdp=2", "mesh.expert=4", "mesh.tensor=4", "optim.grad_accum=64"],
    "v6e-64": ["mesh.fsdp=8", "mesh.expert=8", "optim.grad_accum=8"],
    "tpu7x-8": ["mesh.fsdp=8", "optim.grad_accum=32"],
}


def get_config():
    return paper_config(ModelConfig(
        d_model=2048, expert_ffn=1408, num_layers=32, num_heads=16, num_kv_heads=4,
        num_experts=64, top_k=6, num_shared_experts=2))
