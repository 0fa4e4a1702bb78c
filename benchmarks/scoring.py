"""Benchmark: multiple-choice scoring before (one padded row per choice) and after (contexts
scored once, rows packed), on the shipped task and on a synthetic one.

    python -m benchmarks.scoring [--workdir DIR] [--questions 1000] [--small]

For each task and implementation of rexmoe_jax.inference.scoring it prints the token positions computed,
the positions scored (the choices' tokens), their ratio, and the wall-clock of a warm run (the
first run, which compiles, is not timed). Both implementations give the same log-likelihoods
(tests/test_scoring.py). Without --workdir the weights are the tiny preset's random
initialisation: speed does not depend on their values. The synthetic task asks for the next
words of a KJV verse among 4 choices (the true words and 3 from other verses), seeded.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

from benchmarks.benchmarking import environment, print_table
from rexmoe_jax.inference import scoring, tasks

SHIPPED = pathlib.Path(__file__).parent.parent / "examples" / "tasks" / "kjv_cloze.jsonl"


def synthetic_task(count: int, seed: int = 0) -> list[dict]:
    from rexmoe_jax.data import read_embedded_documents

    verses = [v for doc in read_embedded_documents()[:200] for v in doc.splitlines()[1:]
              if len(v.split()) > 12]
    rng = np.random.default_rng(seed)
    questions = []
    for _ in range(count):
        words = verses[rng.integers(len(verses))].split()
        cut, size = int(rng.integers(4, len(words) - 6)), int(rng.integers(1, 6))
        others = [verses[i].split() for i in rng.integers(0, len(verses), 3)]
        choices = [words[cut:cut + size]] + [o[:size] for o in others]
        questions.append({"context": " ".join(words[:cut]), "choices": [" " + " ".join(c) for c in choices],
                          "label": 0})
    return questions


def _model(workdir: str | None, small: bool):
    if workdir:
        from rexmoe_jax.inference.restore import restore

        run = restore(workdir)
        return run.config, run.params, run.tokenizer
    import dataclasses

    from configs.tiny import get_config
    from rexmoe_jax import trainer
    from rexmoe_jax.data import EMBEDDED_TOKENIZER
    from rexmoe_jax.tokenizer import load_tokenizer

    config = get_config()
    if small:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, d_model=32,
                                                                       expert_ffn=32))
    params = trainer.init_params(config, trainer.build_model(config))
    return config, params, load_tokenizer(EMBEDDED_TOKENIZER)


def measure(config, params, requests, implementation: str) -> tuple[scoring.Scores, float]:
    scoring.score(config, params, requests, implementation)  # compiles
    start = time.perf_counter()
    scores = scoring.score(config, params, requests, implementation)
    return scores, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="a trained run (default: random tiny weights)")
    parser.add_argument("--questions", type=int, default=1000, help="questions of the synthetic task")
    parser.add_argument("--small", action="store_true", help="a narrower model, for a quick run")
    args = parser.parse_args(argv)
    config, params, tokenizer = _model(args.workdir, args.small)
    task_sets = {"kjv_cloze (shipped)": tasks.read_task(SHIPPED),
                 f"synthetic ({args.questions} questions)": synthetic_task(args.questions)}
    rows = []
    for name, questions in task_sets.items():
        requests = tasks.task_requests(tokenizer, questions)
        before = None
        for implementation in ("padded", "packed"):
            scores, seconds = measure(config, params, requests, implementation)
            before = before or seconds
            rows.append([name, "before (padded)" if implementation == "padded" else "after (packed)",
                         f"{scores.computed:,}", f"{scores.scored:,}",
                         f"{scores.computed / scores.scored:.1f}",
                         f"{seconds:.2f}", f"{before / seconds:.1f}x"])
    m = config.model
    print_table(f"scoring, d {m.d_model}, {m.num_layers} layers, seq_len {config.data.seq_len} - "
                f"{environment()}",
                ["task", "scorer", "positions computed", "positions scored", "computed / scored",
                 "seconds (warm)", "speed-up"], rows)


if __name__ == "__main__":
    main()
