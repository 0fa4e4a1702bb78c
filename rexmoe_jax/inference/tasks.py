"""Zero-shot multiple choice, scored request for request as lm-evaluation-harness scores it.

A task file is JSON Lines, one question per line:

    {"context": "In the beginning God created", "choices": [" the heaven and the earth.", ...],
     "label": 0, "delimiter": ""}

`delimiter` (optional, default "") is lm_eval's `target_delimiter`: each choice is scored as the
continuation delimiter + choice. lm_eval's own tasks (ARC, PIQA, HellaSwag, ...) put the space
there, "delimiter": " " with choices written without it; it matters for acc_norm, which divides
by the length of the choice alone.

Each (context, delimiter + choice) becomes tokens as lm_eval's causal models do: whitespace at
the end of the context moves to the start of the continuation, the two are encoded together
and split after the context's own tokens; an empty context is the end-of-text token (or the
continuation's first token, when that is end-of-text). Then, per question:
  acc        the choice with the highest summed log-likelihood;
  acc_norm   the highest log-likelihood per character of the choice;
  acc_bytes  the highest log-likelihood per UTF-8 byte of the choice;
ties going to the first choice, as numpy's argmax (lm_eval's) does.
"""

from __future__ import annotations

import pathlib

import numpy as np

from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.inference import scoring
from rexmoe_jax.sources import json_lines
from rexmoe_jax.tokenizer import Tokenizer

METRICS = ("acc", "acc_norm", "acc_bytes")


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness splits them (module docstring)."""
    if not continuation:
        raise ValueError("the continuation to score is empty")
    if not context:
        ids = tokenizer.encode(continuation)
        return ([tokenizer.eod_id], ids) if ids[0] != tokenizer.eod_id else (ids[:1], ids[1:])
    kept = context.rstrip()
    if not kept:  # lm_eval would condition on nothing at all; say so instead.
        raise ValueError("a context of whitespace only leaves nothing to condition on; use an empty context")
    # Trailing whitespace is tokenized with the word after it, not alone at the end of the context.
    context_ids = tokenizer.encode(kept)
    whole = tokenizer.encode(kept + context[len(kept):] + continuation)
    return context_ids, whole[len(context_ids):]


def _problem(q) -> str | None:
    """What is wrong with a question, naming the field; None when nothing is."""
    if not isinstance(q, dict):
        return f"expected a JSON object, got {type(q).__name__}"
    if not isinstance(q.get("context"), str):
        return "'context' must be a string" + ("" if "context" in q else " and is missing")
    choices = q.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        return "'choices' must be a list of 2 or more strings"
    bad = next((i for i, c in enumerate(choices) if not (isinstance(c, str) and c)), None)
    if bad is not None:
        return f"'choices'[{bad}] must be a non-empty string, got {choices[bad]!r}"
    label = q.get("label")
    if type(label) is not int or not 0 <= label < len(choices):  # type(), so that true is not 1
        return f"'label' must be the index of the right choice, 0 to {len(choices) - 1}, got {label!r}"
    if not isinstance(q.get("delimiter", ""), str):
        return f"'delimiter' must be a string, got {q['delimiter']!r}"
    return None


def read_task(path: pathlib.Path | str) -> list[dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    questions = []
    for number, q in json_lines(path):
        problem = _problem(q)
        if problem is not None:
            raise ConfigError(f"{path}:{number}: {problem}")
        questions.append(q)
    if not questions:
        raise ConfigError(f"task file {str(path)!r} holds no questions")
    return questions


def task_requests(tokenizer: Tokenizer, questions: list[dict]) -> list[tuple[list[int], list[int]]]:
    """One request per (question, choice), in order."""
    return [encode_pair(tokenizer, q["context"], q.get("delimiter", "") + choice)
            for q in questions for choice in q["choices"]]


def choice_loglikelihoods(config: Config, params, tokenizer: Tokenizer, questions: list[dict],
                          implementation: str = "packed", mesh=None) -> tuple[list[np.ndarray], scoring.Scores]:
    """Per question, the summed log-likelihood of each choice; and the scorer's cost (on the
    `mesh` where `params` live, see scoring.score)."""
    scores = scoring.score(config, params, task_requests(tokenizer, questions), implementation, mesh)
    ends = np.cumsum([len(q["choices"]) for q in questions])
    return np.split(scores.logprob, ends[:-1]), scores


def accuracy(questions: list[dict], loglikelihoods: list[np.ndarray]) -> dict:
    """acc, acc_norm (per character) and acc_bytes (per byte), as lm_eval computes them."""
    hits = dict.fromkeys(METRICS, 0)
    for q, ll in zip(questions, loglikelihoods):
        chars = np.asarray([len(c) for c in q["choices"]], float)
        size = np.asarray([len(c.encode("utf-8")) for c in q["choices"]], float)
        for name, value in (("acc", ll), ("acc_norm", ll / chars), ("acc_bytes", ll / size)):
            hits[name] += int(np.argmax(value) == q["label"])
    return {"n": len(questions), **{name: hits[name] / len(questions) for name in METRICS}}


def score_task(config: Config, params, tokenizer: Tokenizer, questions: list[dict],
               implementation: str = "packed", mesh=None) -> dict:
    """acc, acc_norm and acc_bytes of a task, and the token positions computed and scored."""
    loglikelihoods, scores = choice_loglikelihoods(config, params, tokenizer, questions, implementation, mesh)
    return {**accuracy(questions, loglikelihoods), "tokens_computed": scores.computed,
            "tokens_scored": scores.scored}
