"""The command `python -m rexmoe_jax.launch`: several local processes as one multi-process run.

Its code is rexmoe_jax/runtime/launch.py (rexmoe_jax/__init__.py says why).
"""

import sys

from rexmoe_jax.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
