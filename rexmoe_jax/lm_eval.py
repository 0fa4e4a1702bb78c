"""The command `python -m rexmoe_jax.lm_eval`: lm-evaluation-harness with a trained run as its
model.

Its code is rexmoe_jax/inference/lm_eval.py (rexmoe_jax/__init__.py says why).
"""

import sys

from rexmoe_jax.inference.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
