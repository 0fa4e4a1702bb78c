"""The command `python -m rexmoe_jax.generate`: text from a trained run.

Its code is rexmoe_jax/inference/generate.py (rexmoe_jax/__init__.py says why).
"""

import sys

from rexmoe_jax.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
