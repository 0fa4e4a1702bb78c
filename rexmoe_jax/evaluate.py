"""The command `python -m rexmoe_jax.evaluate`: held-out loss, routing and multiple-choice tasks of a trained
run.

Its code is rexmoe_jax/inference/evaluate.py (rexmoe_jax/__init__.py says why).
"""

import sys

from rexmoe_jax.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
