"""Packing, splitting and batches as a pure function of (seed, step)."""

import numpy as np
import pytest

from rexmoe_jax import data
from rexmoe_jax.config import ConfigError, DataConfig


def test_packing_puts_eod_after_every_document():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
    packed = data.pack(docs, eod_id=0, seq_len=3, seed=None)
    np.testing.assert_array_equal(packed.stream, [1, 2, 3, 0, 4, 0, 5, 6, 0])
    # Windows of seq_len + 1 at a stride of seq_len: inputs and shifted targets.
    assert len(packed) == 2
    np.testing.assert_array_equal(packed[0], [1, 2, 3, 0])
    np.testing.assert_array_equal(packed[1], [0, 4, 0, 5])


def test_packing_shuffles_documents_by_seed():
    docs = [np.array([i] * 3) for i in range(1, 30)]
    a = data.pack(docs, 0, 4, seed=1).stream
    b = data.pack(docs, 0, 4, seed=1).stream
    c = data.pack(docs, 0, 4, seed=2).stream
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a.tolist()) == sorted(data.pack(docs, 0, 4, seed=None).stream.tolist())


def test_held_out_documents_are_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(100)]
    train, held = data.split_documents(docs, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert data.split_documents(docs, 0.1, seed=3)[1] == held
    assert data.split_documents(docs, 0.1, seed=4)[1] != held


def test_batches_are_a_function_of_seed_and_step():
    packed = data.PackedSequences(np.arange(1000, dtype=np.int32), seq_len=9)
    src = data.BatchSource(packed, batch_size=4, seed=0)
    again = data.BatchSource(packed, batch_size=4, seed=0)
    np.testing.assert_array_equal(src.batch(17), again.batch(17))
    assert not np.array_equal(src.batch(17), src.batch(18))
    # Two hosts read disjoint halves whose union is the one-host batch.
    np.testing.assert_array_equal(np.concatenate([src.batch(5, slice(0, 2)), src.batch(5, slice(2, 4))]),
                                  src.batch(5))
    # The first len(packed) rows visit every sequence once (sequence i starts with token 9 i).
    rows = np.concatenate([src.batch(s) for s in range(len(packed) // 4 + 1)])[:len(packed)]
    assert sorted(rows[:, 0].tolist()) == [9 * i for i in range(len(packed))]


def test_embedded_corpus_and_sequence_length_errors():
    corpus = data.build_corpus(DataConfig(seq_len=32), seed=0)
    assert corpus.tokenizer.vocab_size == 4096
    assert len(corpus.train) > 10_000 and len(corpus.held_out) > 100
    held_text = corpus.tokenizer.decode(corpus.held_out.stream[:200])
    assert held_text.strip()
    with pytest.raises(ConfigError, match="data.seq_len"):
        data.build_corpus(DataConfig(seq_len=10_000_000), seed=0)
