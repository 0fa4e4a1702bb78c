"""ReXMoE in JAX/Flax: cross-layer expert reuse with progressive scaling routing.

The package in layers; a module imports only from its own layer or the ones above it in this
list (tests/test_structure.py checks that, and that no two modules import each other):

    cli.py reuse.py           command-line plumbing; groups and pools (Eq. 4, 6)
    config/                   the typed config: sections, presets, overrides
    runtime/  targets.py sharding.py tokenizer.py sources.py outputs.py data.py trackers.py
                              processes and the run folder; chips, the mesh and its one rules
                              table; text, tokens and batches; files a command writes
    model/                    the decoder and its MoE layers (and the shape-letter glossary)
    optimizer.py trainer.py checkpoint.py runlog.py
                              the pure train step, its state on disk, the metrics log
    inference/                restore, generate, score, evaluate a trained run
    loop.py                   the host loop (it evaluates and samples with inference/)
    compile/ study/ hf/ plot.py
                              ahead-of-time compile reports; studies; Hugging Face; figures

Commands. `python -m rexmoe_jax.X` runs the module rexmoe_jax/X.py, or the package X/'s
__main__.py: data and plot are modules of their own, study and hf packages; evaluate, generate,
lm_eval and launch are three-line modules that run the `main` of the module of the same name in
inference/ or runtime/, where their code lives, so the command line stays what users type.

Imports are at the top of every module, except where a function imports on purpose: to keep jax
out of a command's or train.py's start-up (runtime/), or a package an extra installs.

Public names are imported on first use, so that `import rexmoe_jax.config` (and train.py's
start-up) does not pay for importing jax.
"""

import importlib

# The public names and the module each lives in ("module:attribute" where the names differ).
_PUBLIC = {
    "ComputeConfig": "config", "Config": "config", "ConfigError": "config", "DataConfig": "config",
    "LossConfig": "config", "MeshConfig": "config", "ModelConfig": "config", "OptimConfig": "config",
    "PSRConfig": "config", "TrainConfig": "config", "apply_overrides": "config", "load_preset": "config",
    "Decoder": "model.decoder", "PSRInputs": "model.decoder", "param_counts": "model.decoder",
    "train": "loop:run", "load": "inference.api", "LoadedModel": "inference.api",
    "Sampling": "inference.generate",
}

__all__ = sorted(_PUBLIC)  # noqa: PLE0605 - one list of names: _PUBLIC's keys


def __getattr__(name):
    if name in _PUBLIC:
        module, _, attribute = _PUBLIC[name].partition(":")
        return getattr(importlib.import_module(f"rexmoe_jax.{module}"), attribute or name)
    raise AttributeError(f"module 'rexmoe_jax' has no attribute {name!r}")
