"""Evaluation of a trained run: held-out perplexity, routing analysis, zero-shot multiple choice.

    python -m rexmoe_jax.evaluate --workdir DIR [--tasks arc.jsonl piqa.jsonl ...]
        [--input-set psalms=examples/input_sets/psalms.txt ...] [--batches N]

Held-out loss and routing come from `evaluation.held_out`, the function training's evaluations call,
on the same held-out batches (the first --batches, by default train.eval_batches, as training
uses), so eval.json and the eval lines of metrics.jsonl cannot disagree.

Routing, per layer: the paper's LBV and share of under-used experts; activation ratios over
the candidate pool (the share of tokens that pick each expert; they sum to K); and how often a
layer picks experts owned by other layers of its group (zero at r = 1; the quantity that says
whether reuse is used at all). With --input-set, ratios are reported per input set, as the
paper's Figure 5 compares tasks.

Multiple choice (task files: rexmoe_jax/inference/tasks.py) is scored as lm-evaluation-harness scores it:
acc, acc_norm (per character) and acc_bytes (per byte). Results go to DIR/eval.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import jax
import numpy as np

from rexmoe_jax import cli, outputs, sharding, sources
from rexmoe_jax import data as data_lib
from rexmoe_jax.config import ConfigError
from rexmoe_jax.inference import restore as restore_lib
from rexmoe_jax.inference import tasks as tasks_lib
from rexmoe_jax.inference.evaluation import (
    eval_set_scalars,
    eval_step_for,
    held_out,
    placed,
    routing_of,
    routing_report,
    sequences_to_batches,
)
from rexmoe_jax.runlog import json_safe
from rexmoe_jax.runtime import distributed as distributed_lib
from rexmoe_jax.runtime.workdir import EVAL_FILE, failure_reason


def _input_set_files(spec: str) -> tuple[str, list[pathlib.Path]]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--input-set {spec!r}: expected NAME=PATH")
    files = sources.corpus_files(path, setting=f"--input-set {name}")
    if sources.is_tokenized(files):
        raise ConfigError(f"--input-set {name}: {path!r} holds token files; give text")
    return name, files


def _input_set(name: str, files: list[pathlib.Path], run, batches: int) -> list[np.ndarray]:
    texts = list(sources.read_text_documents(files, run.config.data.text_field, "paragraph"))
    docs = data_lib.TokenDocuments.from_documents(
        [np.asarray(run.tokenizer.encode(t), np.int32) for t in texts], run.tokenizer.eod_id)
    sequences = data_lib.pack(docs, np.arange(len(docs)), run.config.data.seq_len, None)
    if len(sequences) == 0:
        raise ConfigError(f"--input-set {name}: {', '.join(map(str, files))} is shorter than one sequence")
    size = run.config.data.batch_size
    return sequences_to_batches(sequences, size, batches * size)


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tasks", nargs="*", default=[], help="multiple-choice task files (.jsonl)")
    parser.add_argument("--input-set", action="append", default=[], metavar="NAME=PATH",
                        help="text to route and report activation ratios for, separately")
    parser.add_argument("--batches", type=int, default=None,
                        help="held-out (and input-set) batches (default: train.eval_batches, as training)")
    parser.add_argument("--output", default=None,
                        help="JSON results (default: WORKDIR/eval.json); a new file or an earlier one of these")
    restore_lib.add_placement_arguments(parser)
    args = parser.parse_args(argv)
    distributed_lib.simulate_devices(args.simulate_devices)  # before anything asks JAX for its devices
    output = pathlib.Path(args.output or pathlib.Path(args.workdir) / EVAL_FILE)
    report = evaluate_run(args.workdir, args.tasks, args.input_set, args.batches, output=output,
                          mesh=args.mesh, dtype=args.dtype, distributed=args.distributed)
    if jax.process_index() == 0:
        outputs.write_text(output, json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        print_report(report)
        print(f"wrote {output}")
    distributed_lib.finish()
    return 0


def _is_report(path: pathlib.Path) -> bool:
    """Whether `path` holds results this command wrote (which it may replace)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"step", "eval_loss", "routing", "tasks"} <= report.keys()


def _check_output(path: pathlib.Path) -> None:
    """Fails now, not after the evaluation, when the results may not or could not be written:
    a run's own file (its eval.json excepted), a file this command did not write, a folder
    that cannot take a new file."""
    outputs.check_file(path, "--output", ours=_is_report)
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise ConfigError(f"--output {str(path)!r} cannot be written ({failure_reason(err)})") from None


def evaluate_run(workdir, tasks: list[str], input_sets: list[str], batches: int | None = None,
                 output: pathlib.Path | None = None, mesh: list[str] | tuple[str, ...] = (),
                 dtype: str | None = None, distributed: bool = False) -> dict:
    """Every input (task files, input sets, `output`, the mesh.*= settings `mesh`) is checked
    before the evaluation starts; the model runs on restore.inference_mesh."""
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    saved = restore_lib.read_config(pathlib.Path(workdir))  # first: a wrong --workdir is named as such
    stems = [pathlib.Path(path).stem for path in tasks]
    twice = next((stem for stem in stems if stems.count(stem) > 1), None)
    if twice is not None:  # one result per name: the second would replace the first
        raise ConfigError(f"two task files are named {twice!r}; a report names each task by its file name: "
                          "rename one")
    questions = {stem: tasks_lib.read_task(path) for stem, path in zip(stems, tasks)}
    set_files = [_input_set_files(spec) for spec in input_sets]
    names = [name for name, _ in set_files]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ConfigError(f"--input-set {twice} is given twice; give each set its own name")
    if output is not None:
        _check_output(output)
    restore_lib.join_if_asked(distributed)
    devices = restore_lib.inference_mesh(saved, mesh)
    run = restore_lib.restore(workdir, mesh=devices, dtype=dtype)
    config = run.config
    batches_asked, batches = batches is not None, batches or config.train.eval_batches
    set_batches = {name: _input_set(name, files, run, batches) for name, files in set_files}
    corpus = data_lib.build_corpus(config.data, config.train.seed, config.model.vocab_size)
    eval_batches = corpus.eval_batches(config.data.batch_size, batches)
    eval_sets = {name: data_lib.eval_set(name, path, config.data, run.tokenizer, config.model.vocab_size,
                                         batches, config.train.seed)
                 for name, path in config.data.eval_set_paths.items()}
    if len(eval_batches) < batches:
        asked = "--batches" if batches_asked else "train.eval_batches"
        print(f"note: the held-out split holds {len(corpus.held_out)} sequence(s), {len(eval_batches)} "
              f"batch(es) of {config.data.batch_size}; all are evaluated ({asked} {batches} asked for more)",
              file=sys.stderr, flush=True)
    eval_step = eval_step_for(config, run.tokenizer.eod_id)
    with sharding.using(run.mesh):
        scalars, load = held_out(eval_step, run.params, eval_batches, config.model, placed(run.mesh),
                                 config.micro_batch_rows)
        scalars.update(eval_set_scalars(eval_step, run.params, eval_sets, config.model, placed(run.mesh),
                                        config.micro_batch_rows))
    tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in eval_batches)
    report = {"step": run.step, **scalars, "tokens": tokens,
              "routing": {"held-out": routing_report(load, tokens, config.model)}, "tasks": {}}
    for name, batches_of_set in set_batches.items():
        report["routing"][name] = routing_of(config, run.params, batches_of_set, run.mesh,
                                             run.tokenizer.eod_id)
    for name, questions_of_task in questions.items():
        report["tasks"][name] = tasks_lib.score_task(config, run.params, run.tokenizer, questions_of_task,
                                                     mesh=run.mesh)
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
        print(f"\ntask {name}: {result['n']} questions, acc {result['acc']:.3f}, "
              f"acc_norm {result['acc_norm']:.3f}, acc_bytes {result['acc_bytes']:.3f} "
              f"({result['tokens_computed']:,} token positions computed for "
              f"{result['tokens_scored']:,} scored)")

