"""Documents -> tokens -> packed sequences -> batches that are a pure function of (seed, step).

Packing follows the paper: each document is tokenized on its own, an end-of-document token
follows every document, documents are concatenated in an order shuffled by the seed, and the
stream is cut into sequences of seq_len + 1 tokens (inputs and shifted targets) at a stride of
seq_len. A held-out set of whole documents, chosen by the seed, is packed separately and never
seen in training.

Batches come from a grain `MapDataset` (shuffled anew each epoch, repeated), indexed by
sequence: global row j of step t is sequence t * batch + j. Nothing but (seed, step) decides a
batch, so a resumed run reads exactly what the uninterrupted run would have read, and each host
reads only its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
from collections.abc import Sequence

import numpy as np

from rexmoe_jax.config import ConfigError, DataConfig
from rexmoe_jax.tokenizer import Tokenizer, encode_documents, load_tokenizer

ASSETS = pathlib.Path(__file__).parent / "assets"
EMBEDDED_CORPUS = ASSETS / "kjv.txt.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"


def read_embedded_documents() -> list[str]:
    """The King James Bible (public domain), one document per chapter."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [doc for doc in f.read().split("\n\n") if doc.strip()]


def split_documents(documents: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded choice of whole documents, at least one in each."""
    if len(documents) < 2:
        raise ConfigError(f"the corpus has {len(documents)} document(s); at least 2 are needed "
                          "to hold one out for evaluation")
    order = np.random.default_rng([seed, 1]).permutation(len(documents))
    n_eval = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    held_out = set(order[:n_eval].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in held_out]
    return train, [documents[i] for i in sorted(held_out)]


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Random access to the windows of a token stream: item i is stream[i*L : i*L + L + 1]."""

    stream: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        return self.stream[start:start + self.seq_len + 1]


def pack(token_docs: Sequence[np.ndarray], eod_id: int, seq_len: int, seed: int | None) -> PackedSequences:
    """Concatenates documents (shuffled by `seed`; in order when None), each followed by EOD."""
    order = np.arange(len(token_docs)) if seed is None else np.random.default_rng([seed, 2]).permutation(
        len(token_docs))
    eod = np.asarray([eod_id], np.int32)
    pieces = [piece for i in order for piece in (token_docs[i], eod)]
    stream = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros((0,), np.int32)
    return PackedSequences(stream, seq_len)


class BatchSource:
    """Global batches of packed sequences, a pure function of (seed, step)."""

    def __init__(self, sequences: PackedSequences, batch_size: int, seed: int):
        import grain

        self.sequences = sequences
        self.batch_size = batch_size
        self._dataset = grain.MapDataset.source(sequences).shuffle(seed=seed).repeat(None)

    def batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of the global batch of `step`, (rows, seq_len + 1) int32."""
        first = step * self.batch_size
        indices = range(first, first + self.batch_size)[rows]
        return np.stack([self._dataset[i] for i in indices]).astype(np.int32)


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: PackedSequences
    held_out: PackedSequences

    def eval_batches(self, batch_size: int, count: int) -> list[np.ndarray]:
        """The first count * batch_size held-out sequences, in order; fewer if the set is small."""
        n = min(len(self.held_out), batch_size * count)
        rows = [self.held_out[i] for i in range(n)]
        return [np.stack(rows[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)] or [
            np.stack(rows)]


def build_corpus(config: DataConfig, seed: int) -> Corpus:
    """Tokenizes and packs the configured corpus (the embedded KJV when `config.corpus` is empty)."""
    tokenizer = load_tokenizer(config.tokenizer or EMBEDDED_TOKENIZER)
    if config.corpus:
        raise ConfigError("data.corpus: only the embedded corpus is supported so far; leave it empty")
    documents = read_embedded_documents()
    train_docs, eval_docs = split_documents(documents, config.eval_fraction, seed)
    train = pack(encode_documents(tokenizer, train_docs), tokenizer.eod_id, config.seq_len, seed)
    held_out = pack(encode_documents(tokenizer, eval_docs), tokenizer.eod_id, config.seq_len, None)
    for name, packed in (("training", train), ("held-out", held_out)):
        if len(packed) == 0:
            raise ConfigError(f"data.seq_len={config.seq_len} is longer than the {name} data "
                              f"({len(packed.stream)} tokens); lower data.seq_len or add text")
    return Corpus(tokenizer, train, held_out)
