"""Using a trained run from Python: load it, then generate, score and look at its routing.

    from rexmoe_jax import load
    model = load("runs/tiny")                       # the newest checkpoint of a --workdir
    model = load("runs/big", mesh=["mesh.fsdp=8"], dtype="bfloat16")  # parameters only, sharded
    model.generate(["And God said"], max_new_tokens=32, stop=["\n"])
    model.log_likelihood("In the beginning God created", " the heaven and the earth.")
    model.log_likelihood("", "In the beginning")    # an empty context: after end-of-text
    model.perplexity([open("psalms.txt").read()])   # any length: rolling windows
    model.loglikelihood_rolling(["..."], stride=64) # each token sees >= 64 tokens of context
    model.routing(["Some text to route."])          # per-layer expert activation over the pool

Scores are lm-evaluation-harness's (inference/tasks.py for how text becomes tokens,
inference/scoring.py for the windows).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from rexmoe_jax import data as data_lib
from rexmoe_jax.inference import evaluation, scoring, tasks
from rexmoe_jax.inference.generate import GREEDY, Sampling, generate, warn_past_training
from rexmoe_jax.inference.restore import Run, inference_mesh, read_config, restore


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[:min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))]


@dataclasses.dataclass
class LoadedModel(Run):
    """A restored run (config, params, tokenizer, step) with the methods to use it."""

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, *, sampling: Sampling = GREEDY,
                 seed: int = 0, stop: Sequence[str] = ()) -> list[str]:
        """The continuation of each prompt (without the prompt), ending before end-of-text or
        before the first of the `stop` strings. Decoding runs all max_new_tokens steps; stop
        strings are cut on the text afterwards."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.tokenizer.encode(p) or [self.tokenizer.eod_id] for p in prompts]
        warn_past_training(ids, max_new_tokens, self.config.data.seq_len)
        out = generate(self.config.model, self.params, ids, max_new_tokens, jax.random.key(seed),
                       sampling=sampling, eod_id=self.tokenizer.eod_id, compute=self.config.compute, mesh=self.mesh)
        return [cut_at_stop(self.tokenizer.decode(tokens), stop) for tokens in out]

    def log_likelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context), summed over the continuation's tokens."""
        return self.log_likelihoods([(context, continuation)])[0]

    def log_likelihoods(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Summed log-likelihoods, split into tokens as lm-evaluation-harness splits them (an
        empty context conditions on the end-of-text token)."""
        requests = [tasks.encode_pair(self.tokenizer, c, x) for c, x in pairs]
        return scoring.score(self.config, self.params, requests, mesh=self.mesh).logprob.tolist()

    def loglikelihood_rolling(self, texts: list[str], stride: int | None = None) -> list[float]:
        """Summed log-likelihood of each whole text after end-of-text, over windows of
        data.seq_len tokens that advance by `stride` (default data.seq_len: lm_eval's windows)."""
        ids = [self.tokenizer.encode(t) for t in texts]
        scores = scoring.rolling_loglikelihood(self.config, self.params, ids, self.tokenizer.eod_id, stride,
                                               mesh=self.mesh)
        return scores.tolist()

    def perplexity(self, texts: list[str], stride: int | None = None) -> float:
        """exp(mean negative log-likelihood per token) over the texts, of any length (see
        loglikelihood_rolling for `stride`)."""
        total = sum(self.loglikelihood_rolling(texts, stride))
        count = sum(len(self.tokenizer.encode(t)) for t in texts)
        if count == 0:
            raise ValueError("perplexity of texts without a single token")
        return math.exp(-total / count)

    def routing(self, texts: list[str]) -> dict:
        """Per-layer expert activation ratios over the pool and the share of picks of experts
        owned by other layers of the group (see evaluation.routing_report)."""
        encoded = [np.asarray(self.tokenizer.encode(t), np.int32) for t in texts]
        sequences = data_lib.pack(data_lib.TokenDocuments.from_documents(encoded, self.tokenizer.eod_id),
                                  np.arange(len(texts)), self.config.data.seq_len, None)
        # Rows of data.seq_len tokens, then one shorter row with the rest: every token counts.
        batches, tail = evaluation.sequences_to_batches(sequences, 8), sequences.tail()
        if tail is not None:
            batches.append(tail[None])
        if not batches:
            raise ValueError("routing needs at least one token of text")
        return evaluation.routing_of(self.config, self.params, batches, self.mesh, self.tokenizer.eod_id)


def load(workdir: str | pathlib.Path, mesh: jax.sharding.Mesh | Sequence[str] = (),
         dtype: str | None = None) -> LoadedModel:
    """The parameters of the newest readable checkpoint of a training run (never its optimizer
    state), in `dtype` (default: as trained, float32), on `mesh`: a Mesh, or train.py's
    mesh.*= settings (default: the run's own mesh when it fits the devices here, else every
    device on the data axis; ["mesh.num_devices=1"] for the first device alone)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = inference_mesh(read_config(pathlib.Path(workdir)), list(mesh))
    return LoadedModel(**vars(restore(workdir, mesh=mesh, dtype=dtype)))
