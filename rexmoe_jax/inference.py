"""Using a trained run from Python: load it, then generate, score and look at its routing.

    from rexmoe_jax import load
    model = load("runs/tiny")                       # the newest checkpoint of a --workdir
    model.generate(["And God said"], max_new_tokens=32)
    model.log_likelihood("In the beginning God created", " the heaven and the earth.")
    model.perplexity(["Blessed are the meek: for they shall inherit the earth."])
    model.routing(["Some text to route."])          # per-layer expert activation over the pool
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import jax
import numpy as np

from rexmoe_jax import data as data_lib
from rexmoe_jax import evaluate, trainer
from rexmoe_jax.checkpoint import Checkpointer
from rexmoe_jax.config import Config, ConfigError, from_dict
from rexmoe_jax.generate import GREEDY, Sampling, generate
from rexmoe_jax.optimizer import make_optimizer
from rexmoe_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    config: Config
    params: object
    tokenizer: Tokenizer
    step: int

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, *, sampling: Sampling = GREEDY,
                 seed: int = 0) -> list[str]:
        """The continuation of each prompt (without the prompt), stopping at end-of-text."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.tokenizer.encode(p) for p in prompts]
        longest, trained = max(map(len, ids), default=0), self.config.data.seq_len
        if longest + max_new_tokens > trained:  # Rotary positions past training: no error, worse text.
            print(f"warning: a prompt of {longest} tokens plus {max_new_tokens} new ones runs past the {trained} "
                  "positions the model was trained on (data.seq_len); expect worse text", file=sys.stderr, flush=True)
        out = generate(self.config.model, self.params, ids, max_new_tokens, jax.random.key(seed),
                       sampling=sampling, eod_id=self.tokenizer.eod_id, compute=self.config.compute)
        return [self.tokenizer.decode(tokens) for tokens in out]

    def log_likelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context), summed over the continuation's tokens."""
        return self.log_likelihoods([(context, continuation)])[0]

    def log_likelihoods(self, pairs: list[tuple[str, str]]) -> list[float]:
        requests = [(self.tokenizer.encode(c), self.tokenizer.encode(x)) for c, x in pairs]
        return evaluate.continuation_logprobs(self.config, self.params, requests)

    def perplexity(self, texts: list[str]) -> float:
        """exp(mean negative log-likelihood per token) of each text after an end-of-text token."""
        requests = [([self.tokenizer.eod_id], self.tokenizer.encode(t)) for t in texts]
        total = sum(evaluate.continuation_logprobs(self.config, self.params, requests))
        return math.exp(-total / sum(len(x) for _, x in requests))

    def routing(self, texts: list[str]) -> dict:
        """Per-layer expert activation ratios over the pool and the share of picks of experts
        owned by other layers of the group (see evaluate.routing_analysis)."""
        sequences = data_lib.pack(data_lib.TokenDocuments.from_documents(
            [np.asarray(self.tokenizer.encode(t), np.int32) for t in texts], self.tokenizer.eod_id),
            np.arange(len(texts)), self.config.data.seq_len, None)
        return evaluate.routing_analysis(self.config, self.params, evaluate.sequences_to_batches(sequences, 8))


def load(workdir: str | pathlib.Path) -> LoadedModel:
    """The newest readable checkpoint of a training run, on the default device."""
    workdir = pathlib.Path(workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{str(workdir)!r} has no config.json; is it a training run's --workdir?")
    import json

    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(config_file)!r} is not readable JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{str(config_file)!r} holds no config")
    config = from_dict(saved)
    model = trainer.build_model(config)
    tx = make_optimizer(config.optim, config.train.steps)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh saved it
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: trainer.init_state(config, model, tx)))
    # Read-only: loading a model never creates, renames or deletes anything in the run.
    checkpointer = Checkpointer(workdir, config.train.keep_checkpoints, read_only=True)
    restored = checkpointer.restore(abstract, config)
    checkpointer.close()
    if restored is None:
        raise ConfigError(f"{str(workdir)!r} has no checkpoint yet; train first")
    state, _ = restored
    return LoadedModel(config, state.params, data_lib.resolve_tokenizer(config.data), int(state.step))
