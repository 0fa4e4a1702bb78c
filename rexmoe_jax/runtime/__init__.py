"""The processes a run lives in, below everything that computes:

    workdir.py      the run folder: its files, its lock, one line for a failed write
    preemption.py   a stop request (SIGTERM, SIGINT) noted, for the loop to act on
    distributed.py  several processes as one run: joining, agreeing, the one barrier, leaving
    launch.py       several local processes started as one run (`python -m rexmoe_jax.launch`)

None of them imports jax at its top: train.py installs its signal handler and reads its
arguments before jax is loaded. The modules are imported by name; this package imports none.
"""
