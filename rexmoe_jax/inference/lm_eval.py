"""lm-evaluation-harness on a trained run: importing this module registers the model `rexmoe`.

    pip install -e ".[eval]"
    python -m rexmoe_jax.lm_eval --model rexmoe --model_args workdir=DIR \\
        --tasks examples/tasks/kjv_cloze.jsonl --output_path results --log_samples

`python -m rexmoe_jax.lm_eval` is lm_eval's own command line (every option of `lm-eval run`)
with `rexmoe` registered, which the plain `lm-eval` command cannot do for a model outside its
package. `--tasks` also takes this project's JSON Lines task files (rexmoe_jax/inference/tasks.py): each
becomes an lm_eval multiple-choice task named after the file, read from the file itself (no
hub), with its delimiter as lm_eval's target_delimiter and acc, acc_norm and acc_bytes.

Model arguments: `workdir` (required), `stride` (rolling windows for loglikelihood_rolling;
default data.seq_len, lm_eval's windows) and `max_gen_toks` (default 256). Requests are scored
by rexmoe_jax.inference.scoring, which packs rows itself: lm_eval's --batch_size is accepted and unused.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
from collections.abc import Sequence

import jax
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from rexmoe_jax import cli
from rexmoe_jax.inference import scoring, tasks
from rexmoe_jax.inference.api import cut_at_stop, load
from rexmoe_jax.inference.generate import Sampling, generate
from rexmoe_jax.inference.restore import check_run

_GENERATE_ROWS = 16  # prompts decoded together


# The model_args the model takes besides mesh_AXIS=SIZE; lm_eval adds the last three itself.
MODEL_ARGS = ("workdir", "stride", "max_gen_toks", "dtype", "batch_size", "max_batch_size", "device")


def check_model_args(model_args: dict) -> None:
    """Raises BadInput for a model_arg the model does not take (a typo would be ignored) or a
    count that is not a positive integer."""
    unknown = sorted(k for k in model_args if k not in MODEL_ARGS and not k.startswith("mesh_"))
    if unknown:
        takes = ", ".join(MODEL_ARGS[:4])
        raise cli.BadInput(f"--model_args {unknown[0]}=...: the rexmoe model takes {takes} and mesh_AXIS=SIZE")
    for key in ("stride", "max_gen_toks"):
        value = model_args.get(key)
        if value is not None and value != "" and not (str(value).isdigit() and int(value) > 0):
            raise cli.BadInput(f"--model_args {key}={value}: expected a positive integer")


class RexMoeLM(TemplateLM):
    """The newest checkpoint of a training run's --workdir, as an lm_eval model."""

    def __init__(self, workdir: str, stride: int | str | None = None, max_gen_toks: int | str = 256,
                 batch_size=None, max_batch_size=None, device=None, dtype: str | None = None, **others):
        """`dtype` as inference.load takes it; the mesh as mesh_AXIS=SIZE model_args
        (mesh_fsdp=4,mesh_expert=2 for train.py's mesh.fsdp=4 mesh.expert=2)."""
        super().__init__()
        check_model_args({"stride": stride, "max_gen_toks": max_gen_toks, **others})
        mesh = [f"mesh.{key[len('mesh_'):]}={value}" for key, value in others.items() if key.startswith("mesh_")]
        self.run = load(workdir, mesh, dtype)
        self.stride = int(stride) if stride else None
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.run.config.data.seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.run.tokenizer.encode(string)  # the project's tokenizers add no special tokens

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.run.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        scores = scoring.score(self.run.config, self.run.params, [(c, x) for _, c, x in requests],
                               mesh=self.run.mesh)
        results = [(float(lp), bool(g)) for lp, g in zip(scores.logprob, scores.greedy)]
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        results = self.run.loglikelihood_rolling(texts, self.stride)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first stop string; the
        context keeps its last data.seq_len - max_gen_toks tokens, as lm_eval's HF model does."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
            for start in range(0, len(members), _GENERATE_ROWS):
                chunk = members[start:start + _GENERATE_ROWS]
                texts = self._generate([requests[i].args[0] for i in chunk], kwargs, until)
                for index, text in zip(chunk, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results

    def _generate(self, contexts: list[str], kwargs: dict, until: list[str]) -> list[str]:
        new_tokens = kwargs["max_gen_toks"]
        keep = max(self.max_length - new_tokens, 1)
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
        sampling = Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                            int(kwargs.get("top_k", 0) or 0), float(kwargs.get("top_p", 1.0) or 1.0))
        out = generate(self.run.config.model, self.run.params, prompts, new_tokens,
                       jax.random.key(int(kwargs.get("seed", 0) or 0)), sampling=sampling,
                       eod_id=self.eot_token_id, compute=self.run.config.compute, mesh=self.run.mesh)
        return [cut_at_stop(self.tok_decode(tokens), until) for tokens in out]


# Registered by name ("module:class"), not with the decorator: lm_eval resolves the name when a
# run asks for the model, whichever way this module was loaded.
model_registry.register("rexmoe", target="rexmoe_jax.inference.lm_eval:RexMoeLM")


def task_config(path: str | pathlib.Path) -> dict:
    """An lm_eval task config for a JSON Lines task file, read locally with `datasets`' json
    loader; the file's (single) delimiter becomes the target_delimiter."""
    path = pathlib.Path(path).resolve()
    delimiters = {q.get("delimiter", "") for q in tasks.read_task(path)}
    if len(delimiters) > 1:
        raise cli.BadInput(f"{path}: lm_eval takes one target_delimiter per task; "
                         f"the file has {sorted(delimiters)}")
    return {"task": path.stem, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": delimiters.pop(),
            "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True}
                            for name in tasks.METRICS]}


def _local_tasks(argv: list[str], folder: pathlib.Path) -> list[str]:
    """argv with each .jsonl of --tasks replaced by a task config file written to `folder`."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--tasks":
            names = []
            for name in argv[i + 1].split(","):
                if name.endswith(".jsonl"):
                    config = task_config(name)
                    name = str(folder / f"{config['task']}.yaml")
                    pathlib.Path(name).write_text(json.dumps(config, indent=1))  # JSON is YAML
                names.append(name)
            argv[i + 1] = ",".join(names)
    return argv


def _check_model(argv: list[str]) -> None:
    """The rexmoe model's workdir, checked before lm_eval starts: a missing or broken run is one
    line, not a traceback from inside lm_eval."""
    value = dict(zip(argv, argv[1:]))
    if value.get("--model") != "rexmoe":
        return
    model_args = dict(arg.partition("=")[::2] for arg in value.get("--model_args", "").split(",") if arg)
    if not model_args.get("workdir"):
        raise cli.BadInput("--model rexmoe needs --model_args workdir=DIR (a training run's --workdir)")
    check_model_args(model_args)
    check_run(pathlib.Path(model_args["workdir"]))


@cli.command
def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    _check_model(argv)
    with tempfile.TemporaryDirectory(prefix="rexmoe-lm-eval-") as folder:
        args = _local_tasks(argv, pathlib.Path(folder))
        saved, sys.argv = sys.argv, ["lm-eval", *args]  # lm_eval's parser reads sys.argv
        try:
            cli_evaluate()
        except ValueError as err:
            if str(err).startswith("Tasks not found"):  # lm_eval's own one-line reason
                raise cli.BadInput(f"{err}; lm_eval --tasks list shows the tasks there are") from None
            raise
        finally:
            sys.argv = saved
    return 0

