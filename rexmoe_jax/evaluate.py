"""Evaluation of a trained run: held-out perplexity, routing analysis, zero-shot multiple choice.

    python -m rexmoe_jax.evaluate --workdir DIR [--tasks arc.jsonl piqa.jsonl ...]
        [--input-set bible=kjv.txt --input-set code=manpages.txt ...] [--batches 8]

Routing, per layer: the paper's LBV and share of under-used experts; activation ratios over
the candidate pool (the share of tokens that pick each expert; they sum to K); and how often a
layer picks experts owned by other layers of its group (zero at r = 1; the quantity that says
whether reuse is used at all). With --input-set, ratios are reported per input set, as the
paper's Figure 5 compares tasks.

Multiple choice, as lm-evaluation-harness scores it: each choice's continuation is scored by
its summed log-likelihood given the context; `acc` picks the highest sum, `acc_norm` the
highest sum per byte of the choice. Task files are JSON Lines, one question per line:

    {"context": "In the beginning God created", "choices": [" the heaven and the earth.", ...], "label": 0}

(choices carry their leading space, as in lm-evaluation-harness). Results go to DIR/eval.json.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rexmoe_jax import metrics as metrics_lib
from rexmoe_jax.config import Config, ConfigError
from rexmoe_jax.model import Decoder
from rexmoe_jax.reuse import layer_pool_sizes
from rexmoe_jax.runlog import json_safe

_SCORE_BATCH = 8


@functools.partial(jax.jit, static_argnames=("config", "compute"))
def _token_logprobs(config, compute, params, inputs_BxS, targets_BxS):
    logits, _ = Decoder(config, compute).apply({"params": params}, inputs_BxS)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BxS[..., None], axis=-1)[..., 0]


def continuation_logprobs(config: Config, params, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed log p(continuation | context) for (context ids, continuation ids) pairs.

    Each pair is scored in one window of data.seq_len tokens (the context is cut from the left
    when it does not fit); windows are padded to that length, so one compilation serves all.
    """
    length = config.data.seq_len
    results = []
    for start in range(0, len(requests), _SCORE_BATCH):
        chunk = requests[start:start + _SCORE_BATCH]
        inputs = np.zeros((_SCORE_BATCH, length), np.int32)
        targets = np.zeros((_SCORE_BATCH, length), np.int32)
        mask = np.zeros((_SCORE_BATCH, length), bool)
        for row, (context, continuation) in enumerate(chunk):
            if not continuation or not context:
                raise ValueError("every scored pair needs a non-empty context and continuation")
            if len(continuation) > length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds data.seq_len={length}")
            ids = (list(context) + list(continuation))[-(length + 1):]
            inputs[row, :len(ids) - 1] = ids[:-1]
            targets[row, :len(ids) - 1] = ids[1:]
            mask[row, len(ids) - 1 - len(continuation):len(ids) - 1] = True
        logp = np.asarray(_token_logprobs(config.model, config.compute, params, jnp.asarray(inputs), jnp.asarray(targets)))
        results += [float(np.sum(logp[row][mask[row]])) for row in range(len(chunk))]
    return results


def read_task(path: pathlib.Path) -> list[dict]:
    from rexmoe_jax.sources import json_lines

    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    questions = []
    for number, q in json_lines(path):
        ok = (isinstance(q, dict) and isinstance(q.get("context"), str) and isinstance(q.get("choices"), list)
              and len(q["choices"]) >= 2 and all(isinstance(c, str) and c for c in q["choices"])
              and type(q.get("label")) is int and 0 <= q["label"] < len(q["choices"]))  # not a bool
        if not ok:
            raise ConfigError(f'{path}:{number}: expected {{"context": str, "choices": [2 or more str], '
                              '"label": index of the right choice}')
        questions.append(q)
    if not questions:
        raise ConfigError(f"task file {str(path)!r} holds no questions")
    return questions


def score_task(config: Config, params, tokenizer, questions: list[dict]) -> dict:
    """Accuracy with summed log-likelihood (acc) and with log-likelihood per byte (acc_norm)."""
    requests = []
    for q in questions:
        context = tokenizer.encode(q["context"]) or [tokenizer.eod_id]
        requests += [(context, tokenizer.encode(choice)) for choice in q["choices"]]
    scores = continuation_logprobs(config, params, requests)
    acc = acc_norm = 0
    position = 0
    for q in questions:
        n = len(q["choices"])
        s = np.asarray(scores[position:position + n])
        norm = s / np.asarray([len(c.encode("utf-8")) for c in q["choices"]])
        acc += int(np.argmax(s) == q["label"])
        acc_norm += int(np.argmax(norm) == q["label"])
        position += n
    return {"n": len(questions), "acc": acc / len(questions), "acc_norm": acc_norm / len(questions)}


def sequences_to_batches(sequences, batch_size: int, limit: int | None = None) -> list[np.ndarray]:
    rows = [sequences[i] for i in range(min(len(sequences), limit or len(sequences)))]
    return [np.stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


@functools.partial(jax.jit, static_argnames=("config", "compute"))
def chosen_experts(config, compute, params, inputs_BxS):
    _, state = Decoder(config, compute).apply({"params": params}, inputs_BxS, mutable=("intermediates",))
    blocks = [state["intermediates"][name]["layers"]["moe"]["experts"][0]
              for name in ("groups", "last_group") if name in state["intermediates"]]
    # (groups, layers, T, K) per block -> (L, T, K); pool ids are block-local.
    return [b.reshape((-1,) + b.shape[2:]) for b in blocks]


def routing_analysis(config: Config, params, batches: list[np.ndarray]) -> dict:
    """Per-layer activation ratios over the pool (sum to K), LBV, under-used share, and the
    share of picks of experts owned by other layers of the group."""
    m = config.model
    pools = layer_pool_sizes(m)
    counts = np.zeros((m.num_layers, m.pool_size))
    tokens = 0
    for batch in batches:
        chosen = np.concatenate([np.asarray(b) for b in chosen_experts(m, config.compute, params, jnp.asarray(batch[:, :-1]))])
        for layer in range(m.num_layers):
            counts[layer] += np.bincount(chosen[layer].reshape(-1), minlength=m.pool_size)[:m.pool_size]
        tokens += chosen.shape[1]
    ratios = counts / tokens
    routing = metrics_lib.routing_metrics(jnp.asarray(ratios / m.top_k), pools)
    lbv = np.asarray(metrics_lib.load_balance_violation(jnp.asarray(ratios / m.top_k), pools))
    valid = np.arange(m.pool_size)[None, :] < pools[:, None]
    return {
        "tokens": tokens,
        "activation_ratio": ratios.round(6).tolist(),
        "foreign_share": metrics_lib.foreign_share(ratios, m.num_experts, m.reuse).round(6).tolist(),
        "layer_lbv_max": np.asarray(routing["layer_lbv_max"]).round(4).tolist(),
        "layer_underused_share": (((lbv < metrics_lib.UNDERUSED_LBV) & valid).sum(1) / valid.sum(1)).tolist(),
        "lbv_max": float(routing["lbv_max"]),
        "underused_share": float(routing["underused_share"]),
    }


def held_out_loss(config: Config, params, batches: list[np.ndarray]) -> dict:
    """Mean cross-entropy over every predicted token of the batches, and its perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        logp = _token_logprobs(config.model, config.compute, params, jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:]))
        total -= float(jnp.sum(logp))
        count += logp.size
    loss = total / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "tokens": count}


def _input_set_files(spec: str) -> tuple[str, list[pathlib.Path]]:
    from rexmoe_jax import sources

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--input-set {spec!r}: expected NAME=PATH")
    files = sources.corpus_files(path, setting=f"--input-set {name}")
    if sources.is_tokenized(files):
        raise ConfigError(f"--input-set {name}: {path!r} holds token files; give text")
    return name, files


def _input_set(name: str, files: list[pathlib.Path], model, batches: int) -> list[np.ndarray]:
    from rexmoe_jax import data as data_lib
    from rexmoe_jax import sources

    texts = list(sources.read_text_documents(files, model.config.data.text_field, "paragraph"))
    docs = data_lib.TokenDocuments.from_documents(
        [np.asarray(model.tokenizer.encode(t), np.int32) for t in texts], model.tokenizer.eod_id)
    sequences = data_lib.pack(docs, np.arange(len(docs)), model.config.data.seq_len, None)
    if len(sequences) == 0:
        raise ConfigError(f"--input-set {name}: {', '.join(map(str, files))} is shorter than one sequence")
    return sequences_to_batches(sequences, model.config.data.batch_size, batches * model.config.data.batch_size)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m rexmoe_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tasks", nargs="*", default=[], help="multiple-choice task files (.jsonl)")
    parser.add_argument("--input-set", action="append", default=[], metavar="NAME=PATH",
                        help="text to route and report activation ratios for, separately")
    parser.add_argument("--batches", type=int, default=8, help="held-out (and input-set) batches")
    parser.add_argument("--output", default=None, help="JSON results (default: WORKDIR/eval.json)")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output or pathlib.Path(args.workdir) / "eval.json")
    try:
        report = evaluate_run(args.workdir, args.tasks, args.input_set, args.batches, output=output)
        text = json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n"
        try:
            output.write_text(text)
        except OSError as err:
            raise ConfigError(f"--output {str(output)!r} cannot be written ({err.strerror})") from None
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_report(report)
    print(f"wrote {output}")
    return 0


def _check_output(path: pathlib.Path) -> None:
    """Fails now, not after the evaluation, when the results could not be written."""
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise ConfigError(f"--output {str(path)!r} cannot be written ({err.strerror})") from None
    if not existed:
        path.unlink()


def evaluate_run(workdir, tasks: list[str], input_sets: list[str], batches: int,
                 output: pathlib.Path | None = None) -> dict:
    """Every input (task files, input sets, `output`) is checked before the evaluation starts."""
    from rexmoe_jax import data as data_lib
    from rexmoe_jax.inference import load

    if batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    questions = {pathlib.Path(path).stem: read_task(pathlib.Path(path)) for path in tasks}
    set_files = [_input_set_files(spec) for spec in input_sets]
    model = load(workdir)
    if output is not None:
        _check_output(output)
    set_batches = {name: _input_set(name, files, model, batches) for name, files in set_files}
    corpus = data_lib.build_corpus(model.config.data, model.config.train.seed, model.config.model.vocab_size)
    held_out = corpus.eval_batches(model.config.data.batch_size, batches)
    report = {"step": model.step, **held_out_loss(model.config, model.params, held_out),
              "routing": {"held-out": routing_analysis(model.config, model.params, held_out)}, "tasks": {}}
    for name, batches_of_set in set_batches.items():
        report["routing"][name] = routing_analysis(model.config, model.params, batches_of_set)
    for name, questions_of_task in questions.items():
        report["tasks"][name] = score_task(model.config, model.params, model.tokenizer, questions_of_task)
    return report


def print_report(report: dict) -> None:
    print(f"step {report['step']}: held-out loss {report['eval_loss']:.4f}, perplexity {report['eval_ppl']:.2f} "
          f"({report['tokens']:,} tokens)")
    for name, routing in report["routing"].items():
        print(f"\nrouting on {name} ({routing['tokens']:,} tokens): LBV max {routing['lbv_max']:.2f}, "
              f"under-used experts {100 * routing['underused_share']:.0f}%")
        print("  layer  LBV max  under-used  picks of other layers' experts")
        for layer, (lbv, under, foreign) in enumerate(zip(routing["layer_lbv_max"], routing["layer_underused_share"],
                                                          routing["foreign_share"])):
            print(f"  {layer:5d}  {lbv:7.2f}  {100 * under:9.0f}%  {100 * foreign:8.1f}%")
    for name, result in report["tasks"].items():
        print(f"\ntask {name}: {result['n']} questions, acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
