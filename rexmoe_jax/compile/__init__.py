"""Compiling ahead of time for a target (train.py --compile-only --target): what a step costs
on a TPU slice, read from the compiled program on any machine.

    report.py   the step compiled for the target, its memory and FLOPs, the report
    hlo.py      reading the optimized HLO: collectives, fusions, the bytes they move

The chips themselves (peak FLOP/s, memory, topology) are rexmoe_jax/targets.py, which the
sharding and the metrics read too. The modules are imported by name; this package imports none.
"""
