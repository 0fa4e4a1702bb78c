"""Using a trained run: restoring it, scoring, generating, evaluating.

    restore.py     a run's newest parameters (never its optimizer state) and tokenizer, read
                   back onto a mesh (inference_mesh) in the dtype asked for
    api.py         the Python API: `load(workdir)` -> LoadedModel (generate, score, route)
    generate.py    sampling with a KV cache (and the generate command's code)
    scoring.py     log p(continuation | context) of many requests, packed into rows
    tasks.py       multiple-choice task files and their accuracy
    evaluation.py  held-out loss and per-layer routing: what training's evaluations and the
                   evaluate command both report
    evaluate.py    the evaluate command's code
    lm_eval.py     the model lm-evaluation-harness runs, and the lm_eval command's code

The commands are run as `python -m rexmoe_jax.evaluate`, `... .generate` and `... .lm_eval`
(rexmoe_jax/__init__.py says why). The modules are imported by name; this package imports none.
"""
