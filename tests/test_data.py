"""Sources, packing, splitting, prepared token files, and batches as a function of (seed, step)."""

import json
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tokenizers
from files import hashes, one_error_line

from rexmoe_jax import data, sources
from rexmoe_jax.config import ConfigError, DataConfig
from rexmoe_jax.tokenizer import train_bpe

TEXTS = [f"Document number {i}: " + " ".join(["alpha beta gamma delta"] * (1 + i % 5)) for i in range(40)]


def docs(*arrays):
    return data.TokenDocuments.from_documents([np.asarray(a) for a in arrays], eod_id=0)


def test_packing_puts_eod_after_every_document():
    d = docs([1, 2, 3], [4], [5, 6])
    packed = data.pack(d, np.arange(3), seq_len=3, seed=None)
    stream = np.concatenate([packed[i] for i in range(len(packed))])
    # Windows of seq_len + 1 at a stride of seq_len: [1 2 3 0] [0 4 0 5]; 9 tokens give 2.
    assert len(packed) == 2
    np.testing.assert_array_equal(packed[0], [1, 2, 3, 0])
    np.testing.assert_array_equal(packed[1], [0, 4, 0, 5])
    assert stream.dtype == np.int32


def test_tail_holds_what_the_windows_leave_out():
    """Stream 1 2 3 0 4 5 0 (7 tokens): at seq_len 4 one window [1 2 3 0 4], then the tail
    [4 5 0]; at seq_len 2 three windows end on the last token, so there is no tail; a stream
    shorter than one window is all tail."""
    d = docs([1, 2, 3], [4, 5])
    np.testing.assert_array_equal(data.pack(d, np.arange(2), seq_len=4, seed=None).tail(), [4, 5, 0])
    assert data.pack(d, np.arange(2), seq_len=2, seed=None).tail() is None
    short = data.pack(d, np.arange(2), seq_len=16, seed=None)
    assert len(short) == 0
    np.testing.assert_array_equal(short.tail(), [1, 2, 3, 0, 4, 5, 0])


def test_window_spanning_many_documents():
    d = docs(*[[i] for i in range(1, 11)])  # ten one-token documents
    packed = data.pack(d, np.arange(10), seq_len=7, seed=None)
    np.testing.assert_array_equal(packed[0], [1, 0, 2, 0, 3, 0, 4, 0])
    np.testing.assert_array_equal(packed[1], [0, 5, 0, 6, 0, 7, 0, 8])


def test_packing_shuffles_documents_by_seed():
    d = docs(*[[i] * 3 for i in range(1, 30)])
    first = lambda seed: np.concatenate([p for p in (data.pack(d, np.arange(29), 4, seed)[i] for i in range(10))])
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_held_out_documents_are_disjoint_and_seeded():
    train, held = data.split_documents(100, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    np.testing.assert_array_equal(data.split_documents(100, 0.1, seed=3)[1], held)
    assert not np.array_equal(data.split_documents(100, 0.1, seed=4)[1], held)
    with pytest.raises(ConfigError, match="at least 2"):
        data.split_documents(1, 0.1, seed=0)


def sequences(n_tokens=1000, seq_len=9):
    d = data.TokenDocuments(np.arange(n_tokens, dtype=np.int32), np.asarray([0, n_tokens]))
    return data.pack(d, np.arange(1), seq_len, seed=None)


def test_documents_of_a_window_by_hand():
    """Stream 1 2 3 0 | 4 0 | 5 6 0 at seq_len 3: window 0 (positions 0-3) is document 0's alone;
    window 1 (positions 3-6: 0 4 0 5) touches all three."""
    packed = data.pack(docs([1, 2, 3], [4], [5, 6]), np.asarray([2, 0, 1]), seq_len=3, seed=None)
    # In the order 2, 0, 1 the stream is 5 6 0 | 1 2 3 0 | 4 0.
    np.testing.assert_array_equal(packed.documents_of(0), [2, 0])
    np.testing.assert_array_equal(packed.documents_of(1), [0])
    np.testing.assert_array_equal(packed.documents_of(2), [0, 1])


def test_a_held_out_set_smaller_than_a_batch_fills_whole_batches(monkeypatch):
    """3 held-out sequences and batches of 4: the 3 are repeated whole into 3 full batches, each
    sequence 4 times, so every batch has the compiled shape and the mean is the set's."""
    d = data.TokenDocuments.from_documents([np.full(9, i + 1) for i in range(40)], eod_id=0)
    monkeypatch.setattr(data, "load_documents", lambda config: (d, types.SimpleNamespace(vocab_size=50), 40))
    corpus = data.build_corpus(DataConfig(seq_len=9, eval_fraction=0.075), seed=0, vocab_size=50)
    assert len(corpus.held_out) == 3  # 3 documents of 9 tokens and their end: one sequence each
    batches = corpus.eval_batches(batch_size=4, count=2)
    assert len(batches) == 3 and all(b.shape == (4, 10) for b in batches)
    rows = [r.tobytes() for r in np.concatenate(batches)]
    assert sorted(set(rows)) == sorted(corpus.held_out[i].tobytes() for i in range(3))
    assert all(rows.count(r) == 4 for r in set(rows))


def test_eval_rows_sample_the_whole_held_out_set_by_seed(monkeypatch):
    """Evaluations read sequences from across the held-out documents, not the first rows in
    corpus order; the same for a seed (whatever else a run changes), others for another seed.
    held_out_documents reports the documents of exactly the batches training evaluates: read
    here from the tokens of Corpus.eval_batches, where document i is written as i + 1."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=300)
    d = data.TokenDocuments.from_documents([np.full(n, i + 1) for i, n in enumerate(lengths)], eod_id=0)
    tokenizer = types.SimpleNamespace(vocab_size=302)
    monkeypatch.setattr(data, "load_documents", lambda config: (d, tokenizer, 300))
    config = DataConfig(seq_len=8, eval_fraction=0.2)
    corpus = data.build_corpus(config, seed=5, vocab_size=302)
    batches = corpus.eval_batches(batch_size=4, count=10)
    assert len(batches) == 10 and all(b.shape == (4, 9) for b in batches)
    rows = np.concatenate(batches)
    assert len({r.tobytes() for r in rows}) > 30  # mostly different sequences
    np.testing.assert_array_equal(rows, np.concatenate(data.build_corpus(config, 5, 302).eval_batches(4, 10)))
    assert not np.array_equal(rows, np.concatenate(data.build_corpus(config, 6, 302).eval_batches(4, 10)))
    read = {int(t) - 1 for t in rows.ravel() if t}
    held = set(range(300)) - {int(t) - 1 for i in range(len(corpus.train)) for t in corpus.train[i] if t}
    assert len(held) == 60 and read <= held and len(read) > 20  # spread over the held-out set
    reported = set(data.held_out_documents(d.offsets, 0.2, 5, 8, 40).tolist())
    # A row that starts with an end-of-document token also touches that token's document, which
    # its other tokens do not name: at most one such document per row.
    assert read <= reported <= held and len(reported - read) <= int(np.sum(rows[:, 0] == 0))




def test_batches_are_a_function_of_seed_and_step():
    seqs = sequences()
    a = data.BatchIterator(seqs, batch_size=4, seed=0)
    b = data.BatchIterator(seqs, batch_size=4, seed=0)
    first = [next(a) for _ in range(30)]
    for batch in first:
        np.testing.assert_array_equal(batch, next(b))
    assert not np.array_equal(first[3], first[4])
    # The first len(seqs) rows visit every sequence once (sequence i starts with token 9 i).
    rows = np.concatenate(first)[:len(seqs)]
    assert sorted(rows[:, 0].tolist()) == [9 * i for i in range(len(seqs))]
    # Resuming from a saved position (17 batches of 4 = 68 sequences read) continues exactly.
    resumed = data.BatchIterator(seqs, batch_size=4, seed=0, state=data.BatchIterator.state_at(68))
    np.testing.assert_array_equal(next(resumed), first[17])
    c = data.BatchIterator(seqs, batch_size=4, seed=0)
    for _ in range(5):
        next(c)
    assert c.state() == data.BatchIterator.state_at(20)


def test_a_new_batch_size_resumes_at_the_same_sequence_of_the_stream():
    """3 batches of 4 read (12 sequences), then batches of 6: rows 12-17, 18-23 of the stream of
    batches of 4, across the epoch boundary too; a checkpoint from before the count was kept
    (grain's 3 batches of its run's 4) is the same position."""
    seqs = sequences()
    batches = data.BatchIterator(seqs, batch_size=4, seed=0)
    stream = np.concatenate([next(batches) for _ in range(30)])
    four = data.BatchIterator(seqs, batch_size=4, seed=0)
    for _ in range(3):
        next(four)
    six = data.BatchIterator(seqs, batch_size=6, seed=0, state=four.state())
    for start in range(12, 108, 6):
        np.testing.assert_array_equal(next(six), stream[start:start + 6])
    assert data.position({"next_index": 3}, 4) == 12 == data.position(four.state(), 6)


def test_hosts_read_disjoint_halves_of_each_global_batch():
    seqs = sequences()
    one = data.BatchIterator(seqs, batch_size=6, seed=1)
    hosts = [data.BatchIterator(seqs, batch_size=6, seed=1, blocks=[h], block_count=2) for h in range(2)]
    for _ in range(25):
        parts = [next(h) for h in hosts]
        assert parts[0].shape == (3, 10)
        np.testing.assert_array_equal(np.concatenate(parts), next(one))
    with pytest.raises(ConfigError, match="not divisible"):
        data.BatchIterator(seqs, batch_size=5, seed=1, block_count=2)


def test_a_host_reads_blocks_apart_on_the_batch_in_order():
    """A TPU host's devices can hold blocks of rows apart on the batch (the torus order): blocks
    [0, 2] of 4 are rows 0-1 and 4-5 of each global batch of 8; blocks [2, 3] of 4 are rows 4-7."""
    seqs = sequences()
    one = data.BatchIterator(seqs, batch_size=8, seed=2)
    apart = data.BatchIterator(seqs, batch_size=8, seed=2, blocks=[2, 0], block_count=4)
    adjacent = data.BatchIterator(seqs, batch_size=8, seed=2, blocks=[2, 3], block_count=4)
    for _ in range(12):
        batch = next(one)
        np.testing.assert_array_equal(next(apart), batch[[0, 1, 4, 5]])
        np.testing.assert_array_equal(next(adjacent), batch[4:])
    resumed = data.BatchIterator(seqs, batch_size=8, seed=2, blocks=[0, 2], block_count=4,
                                 state=apart.state())
    np.testing.assert_array_equal(next(resumed), next(one)[[0, 1, 4, 5]])


class Recording:
    """A data source that records which sequences were read."""

    def __init__(self, sequences):
        self.sequences, self.read = sequences, set()

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        self.read.add(int(index))
        return self.sequences[index]


def test_each_host_reads_only_its_own_rows():
    """Row r of global batch t is sequence order[t B + r]; host h of 2 owns rows h B/2 to
    (h + 1) B/2 - 1 of every batch and reads only those sequences (grain's read-ahead included)."""
    seqs, steps, batch = sequences(), 12, 6
    whole = Recording(seqs)
    one = data.BatchIterator(whole, batch_size=batch, seed=1, prefetch=1)
    global_rows = [next(one)[:, 0] // 9 for _ in range(steps + 8)]  # sequence i starts with token 9 i
    hosts = [Recording(seqs), Recording(seqs)]
    iterators = [data.BatchIterator(hosts[h], batch_size=batch, seed=1, blocks=[h], block_count=2, prefetch=1)
                 for h in range(2)]
    for _ in range(steps):
        for iterator in iterators:
            next(iterator)
    for h, host in enumerate(hosts):
        own = {int(i) for rows in global_rows for i in rows[h * 3:(h + 1) * 3]}
        needed = {int(i) for rows in global_rows[:steps] for i in rows[h * 3:(h + 1) * 3]}
        assert needed <= host.read <= own


def test_a_position_saved_by_two_hosts_resumes_on_one_and_back():
    seqs = sequences()
    one = data.BatchIterator(seqs, batch_size=6, seed=1)
    reference = [next(one) for _ in range(10)]
    host = data.BatchIterator(seqs, batch_size=6, seed=1, blocks=[1], block_count=2)
    for _ in range(4):
        next(host)
    resumed = data.BatchIterator(seqs, batch_size=6, seed=1, state=host.state())  # 2 hosts -> 1
    np.testing.assert_array_equal(next(resumed), reference[4])
    halves = [data.BatchIterator(seqs, batch_size=6, seed=1, blocks=[h], block_count=2, state=resumed.state())
              for h in range(2)]  # 1 host -> 2
    np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), reference[5])


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXTS, 300, path)
    return path


def write_sources(folder, tokenizer):
    """The same 40 documents in every format the data pipeline reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    pq.write_table(pa.table({"text": TEXTS}), folder / "docs.parquet")
    (folder / "txt").mkdir(exist_ok=True)
    for i, t in enumerate(TEXTS):
        (folder / "txt" / f"{i:03d}.txt").write_text(t)
    (folder / "paragraphs.txt").write_text("\n\n".join(TEXTS))
    ids = [np.asarray(tokenizer.encode(t), np.int32) for t in TEXTS]
    np.save(folder / "tokens.npy", np.concatenate([np.append(d, tokenizer.eod_id) for d in ids]))
    sources.write_array_record(folder / "tokens.arrayrecord", ids)
    return ids


def test_every_source_format_gives_the_same_documents(tmp_path, tokenizer_file):
    from rexmoe_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    expected = write_sources(tmp_path, tok)
    cases = [("docs.jsonl", "file"), ("docs.parquet", "file"), ("txt", "file"), ("paragraphs.txt", "paragraph"),
             ("tokens.npy", "file"), ("tokens.arrayrecord", "file")]
    for name, txt_documents in cases:
        cfg = DataConfig(corpus=str(tmp_path / name), tokenizer=str(tokenizer_file), txt_documents=txt_documents)
        documents, _, max_token = data.load_documents(cfg)
        assert len(documents) == 40, name
        for i, doc in enumerate(expected):
            got = documents.tokens[documents.offsets[i]:documents.offsets[i + 1]]
            np.testing.assert_array_equal(got, np.append(doc, tok.eod_id), err_msg=name)
        assert max_token == max(int(d.max()) for d in expected + [np.asarray([tok.eod_id])])


def test_prepare_writes_memory_mapped_tokens(tmp_path, tokenizer_file):
    from rexmoe_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    expected = write_sources(tmp_path / "src", tok)
    assert data.main(["prepare", "--source", str(tmp_path / "src" / "docs.parquet"), "--tokenizer",
                      str(tokenizer_file), "--output", str(tmp_path / "prepared")]) == 0
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["num_documents"] == 40 and meta["dtype"] == "<u2"
    assert meta["num_tokens"] == sum(len(d) + 1 for d in expected)
    documents, _, _ = data.load_documents(DataConfig(corpus=str(tmp_path / "prepared")))
    assert isinstance(documents.tokens, np.memmap)
    np.testing.assert_array_equal(documents.tokens[:len(expected[0]) + 1], np.append(expected[0], tok.eod_id))
    # Training reads the prepared folder exactly as it reads the source.
    direct = data.build_corpus(DataConfig(corpus=str(tmp_path / "src" / "docs.jsonl"), tokenizer=str(tokenizer_file),
                                          seq_len=8), seed=0, vocab_size=300)
    prepared = data.build_corpus(DataConfig(corpus=str(tmp_path / "prepared"), seq_len=8), seed=0, vocab_size=300)
    assert len(direct.train) == len(prepared.train)
    for i in (0, 5, len(direct.train) - 1):
        np.testing.assert_array_equal(direct.train[i], prepared.train[i])



def test_prepared_corpus_moves_whole(tmp_path, tokenizer_file):
    """The folder holds a copy of its tokenizer (meta.json names it relative to the folder):
    moved elsewhere, with the tokenizer it was made with gone, it trains on the same sequences.
    A folder prepared before the copy names the original file: when that is gone, one line says
    which file and what to do."""
    original = tmp_path / "tok" / "tokenizer.json"
    original.parent.mkdir()
    original.write_bytes(tokenizer_file.read_bytes())
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    assert data.main(["prepare", "--source", str(tmp_path / "c.jsonl"), "--tokenizer", str(original),
                      "--output", str(tmp_path / "prepared")]) == 0
    before = data.build_corpus(DataConfig(corpus=str(tmp_path / "prepared"), seq_len=8), seed=0,
                               vocab_size=300)
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["tokenizer"] == "tokenizer.json"
    assert (tmp_path / "prepared" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    original.unlink()
    (tmp_path / "prepared").rename(tmp_path / "moved")
    moved = data.build_corpus(DataConfig(corpus=str(tmp_path / "moved"), seq_len=8), seed=0, vocab_size=300)
    copy = tmp_path / "moved" / "tokenizer.json"
    assert data.tokenizer_path(DataConfig(corpus=str(tmp_path / "moved"))) == copy
    assert len(moved.train) == len(before.train) > 0
    for i in range(len(before.train)):
        np.testing.assert_array_equal(moved.train[i], before.train[i])
    # Prepared the old way: meta.json names the tokenizer's absolute path, and it is gone.
    meta = json.loads((tmp_path / "moved" / "meta.json").read_text())
    (tmp_path / "moved" / "meta.json").write_text(json.dumps(dict(meta, tokenizer=str(original))))
    copy.unlink()
    with pytest.raises(ConfigError, match="made with the tokenizer .*tok/tokenizer.json', which does not "
                                          "exist.*set data.tokenizer"):
        data.build_corpus(DataConfig(corpus=str(tmp_path / "moved"), seq_len=8), seed=0, vocab_size=300)

def test_train_tokenizer_command(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert data.main(["train-tokenizer", "--source", str(tmp_path / "c.jsonl"), "--vocab-size", "280",
                      "--output", str(tmp_path / "t.json")]) == 0
    assert "280-token tokenizer" in capsys.readouterr().out
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "t.json"))  # read by the library itself
    assert saved.get_vocab_size() == 280 and saved.decode(saved.encode(TEXTS[3]).ids) == TEXTS[3]


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "matches no file"),
    (lambda p: (p / "c.jsonl").write_text(""), "holds no text"),
    (lambda p: (p / "c.jsonl").write_text('{"text": "ok"}\n{broken\n'), r"c.jsonl:2: not valid JSON"),
    (lambda p: (p / "c.jsonl").write_text('{"body": "x"}\n'), "no string field 'text'"),
    (lambda p: (p / "c.csv").write_text("a,b\n"), "unsupported type"),
    (lambda p: (p / "c.txt").write_bytes(b"\xff\xfe bad"), "not UTF-8"),
    (lambda p: (p / "c.npy").write_bytes(b"nonsense"), "not a readable .npy"),
    (lambda p: (p / "c.jsonl").write_bytes(b'{"text": "\xff"}\n'), r"c.jsonl:1: not UTF-8 text"),
    (lambda p: __import__("pyarrow.parquet").parquet.write_table(
        __import__("pyarrow").table({"text": [1, 2]}), p / "c.parquet"), "column 'text' holds int64, not text"),
    (lambda p: np.save(p / "c.npy", np.asarray([4, -1, 0], np.int32)), "negative token ids"),
])
def test_bad_corpus_inputs(tmp_path, setup, message, tokenizer_file):
    setup(tmp_path)
    name = next((p.name for p in tmp_path.iterdir()), "missing.jsonl")
    cfg = DataConfig(corpus=str(tmp_path / name), tokenizer=str(tokenizer_file))
    with pytest.raises(ConfigError, match=message):
        data.build_corpus(cfg, seed=0, vocab_size=300)


@pytest.mark.parametrize("damage,message", [
    (lambda meta: "{not json", "meta.json' is not readable JSON"),
    (lambda meta: json.dumps({k: v for k, v in meta.items() if k != "num_tokens"}), "has no int 'num_tokens'"),
    (lambda meta: json.dumps(dict(meta, tokenizer=3)), "has no str 'tokenizer'"),
    (lambda meta: "[1, 2]", "holds no JSON object"),
])
def test_prepared_corpus_with_a_broken_meta_json(tmp_path, tokenizer_file, damage, message):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    data.prepare(str(tmp_path / "c.jsonl"), str(tokenizer_file), tmp_path / "prepared")
    meta_file = tmp_path / "prepared" / "meta.json"
    meta_file.write_text(damage(json.loads(meta_file.read_text())))
    with pytest.raises(ConfigError, match=message) as err:
        data.build_corpus(DataConfig(corpus=str(tmp_path / "prepared"), seq_len=8), seed=0, vocab_size=300)
    assert str(meta_file) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit", [
    lambda o: o.__setitem__(2, o[2] + 10**9),  # past the tokens
    lambda o: o.__setitem__(2, o[1]),  # an empty document
    lambda o: o.__setitem__(0, 1),  # not starting at 0
], ids=["past-the-end", "empty-document", "first-not-zero"])
def test_prepared_corpus_with_damaged_offsets(tmp_path, tokenizer_file, edit):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    data.prepare(str(tmp_path / "c.jsonl"), str(tokenizer_file), tmp_path / "prepared")
    offsets = np.load(tmp_path / "prepared" / "offsets.npy")
    assert len(offsets) > 3
    edit(offsets)
    np.save(tmp_path / "prepared" / "offsets.npy", offsets)
    with pytest.raises(ConfigError, match="has offsets.npy that do not cut tokens.bin into documents"):
        data.build_corpus(DataConfig(corpus=str(tmp_path / "prepared"), seq_len=8), seed=0, vocab_size=300)


def test_tokens_outside_the_vocabulary_and_short_data(tmp_path, tokenizer_file):
    np.save(tmp_path / "t.npy", np.asarray([5, 6, 0, 7, 999, 0], np.int32))
    cfg = DataConfig(corpus=str(tmp_path / "t.npy"), tokenizer=str(tokenizer_file), seq_len=2)
    with pytest.raises(ConfigError, match=f"^data.corpus='{tmp_path}/t.npy' uses token ids up to 999 but "
                                          "model.vocab_size=300"):
        data.build_corpus(cfg, seed=0, vocab_size=300)
    with pytest.raises(ConfigError, match="data.seq_len=10000000 is longer than the training data of the "
                                          "embedded corpus"):
        data.build_corpus(DataConfig(seq_len=10_000_000), seed=0, vocab_size=4096)
    # 40 documents, one held out by eval_fraction 0.02: too short for a row of 64 tokens.
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with pytest.raises(ConfigError, match="held-out data of data.corpus=.* lower data.seq_len or raise "
                                          "data.eval_fraction, or add text"):
        data.build_corpus(DataConfig(corpus=str(tmp_path / "c.jsonl"), tokenizer=str(tokenizer_file),
                                     seq_len=64), seed=0, vocab_size=300)
    with pytest.raises(ConfigError, match="set data.tokenizer"):
        data.build_corpus(DataConfig(corpus=str(tmp_path / "t.npy")), seed=0, vocab_size=300)


def test_embedded_corpus():
    corpus = data.build_corpus(DataConfig(seq_len=32), seed=0, vocab_size=4096)
    assert corpus.tokenizer.vocab_size == 4096
    assert len(corpus.train) > 10_000 and len(corpus.held_out) > 100
    assert corpus.tokenizer.decode(corpus.held_out[0]).strip()
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        data.build_corpus(DataConfig(seq_len=32), seed=0, vocab_size=100)


# `prepare` never deletes or overwrites what it did not write (issue 26) -------------------------


def _prepare(source, tokenizer, output, *extra) -> int:
    return data.main(["prepare", "--source", str(source), "--tokenizer", str(tokenizer), "--output", str(output),
                      *extra])


@pytest.fixture
def corpus_folder(tmp_path):
    """tmp_path/src: a corpus file and a note of the user's; tmp_path/beside.txt next to it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "src" / "notes.md").write_text("my notes\n")
    (tmp_path / "beside.txt").write_text("a file beside the source\n")
    return tmp_path / "src"


@pytest.mark.parametrize("target,naming", [
    (lambda src: src, "holds the input"),  # the source folder itself
    (lambda src: src.parent, "holds the input"),  # the source's parent
    (lambda src: src / "c.jsonl", "is the input"),  # the source file
    (lambda src: src.parent / "beside.txt", "is a file"),  # an existing file
    (lambda src: src.parent / "mine", "holds files this command did not write"),  # a folder of other files
])
def test_prepare_refuses_an_output_it_would_damage(corpus_folder, tokenizer_file, capsys, target, naming):
    root = corpus_folder.parent
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work\n")
    before = hashes(root)
    for force in ([], ["--force"]):
        assert _prepare(corpus_folder, tokenizer_file, target(corpus_folder), *force) == 2
        assert naming in one_error_line(capsys.readouterr().err)
        assert hashes(root) == before  # nothing deleted, nothing left behind (no NAME.partial)


def test_prepare_refuses_the_current_folder_when_it_holds_the_source(corpus_folder, tokenizer_file, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(corpus_folder.parent)
    before = hashes(corpus_folder.parent)
    assert _prepare("src", tokenizer_file, ".") == 2
    assert f"--output {str(corpus_folder.parent)!r} holds the input" in one_error_line(capsys.readouterr().err)
    assert hashes(corpus_folder.parent) == before


def test_prepare_replaces_only_a_prepared_corpus(corpus_folder, tokenizer_file, capsys):
    output = corpus_folder.parent / "prepared"
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 0
    first = hashes(output)
    assert sorted(first) == ["meta.json", "offsets.npy", "tokenizer.json", "tokens.bin"]
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 0  # a prepared corpus: replaced
    assert hashes(output) == first
    (output / "keep.txt").write_text("mine\n")
    with_note = hashes(corpus_folder.parent)
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 2
    assert "(--force replaces it)" in one_error_line(capsys.readouterr().err)
    assert hashes(corpus_folder.parent) == with_note
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output, "--force") == 0
    assert hashes(output) == first
    assert sorted(p.name for p in corpus_folder.parent.iterdir()) == ["beside.txt", "prepared", "src"]


def test_a_prepared_corpus_is_never_read_as_corpus_files(corpus_folder, tokenizer_file, capsys):
    """Its offsets.npy would read as a token stream: prepare refuses an --output inside its
    --source folder, and a prepared folder, or a folder holding one, given as corpus files (a
    --source, data.corpus) is one line naming it."""
    before = hashes(corpus_folder.parent)
    assert _prepare(corpus_folder, tokenizer_file, corpus_folder / "tokens") == 2
    assert "/src/tokens' is inside --source" in one_error_line(capsys.readouterr().err)
    assert hashes(corpus_folder.parent) == before
    prepared = corpus_folder.parent / "prepared"
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, prepared) == 0
    assert _prepare(prepared, tokenizer_file, corpus_folder.parent / "again") == 2
    assert "prepared' is a prepared corpus (tokens.bin, offsets.npy, meta.json)" in one_error_line(
        capsys.readouterr().err)
    holding = DataConfig(corpus=str(corpus_folder.parent), tokenizer=str(tokenizer_file), seq_len=8)
    with pytest.raises(ConfigError, match="holds a prepared corpus, '.*prepared', whose files would read as"):
        data.build_corpus(holding, seed=0, vocab_size=300)
    assert not (corpus_folder.parent / "again").exists()


def test_prepare_interrupted_leaves_no_partial_folder(corpus_folder, tokenizer_file, capsys, monkeypatch):
    output = corpus_folder.parent / "prepared"
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 0
    before = hashes(corpus_folder.parent)
    encode = data._encode_all

    def interrupted(*args, **kwargs):
        yield next(encode(*args, **kwargs))
        raise KeyboardInterrupt  # Ctrl-C after the first document was written

    monkeypatch.setattr(data, "_encode_all", interrupted)
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 130
    assert capsys.readouterr().err == ""  # quietly
    assert hashes(corpus_folder.parent) == before  # the earlier corpus intact, no temporary folder


def test_prepare_write_failure_exits_4_and_leaves_nothing(corpus_folder, tokenizer_file):
    """A file-size limit (EFBIG, as a full disk) in a small subprocess: nothing imports jax."""
    output = corpus_folder.parent / "prepared"
    assert _prepare(corpus_folder / "c.jsonl", tokenizer_file, output) == 0
    (corpus_folder / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 200))
    before = hashes(corpus_folder.parent)

    # The limit is set in the child itself: a preexec_fn would fork this multithreaded (jax) process.
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)); "
               "sys.argv[0] = 'rexmoe_jax.data'; runpy.run_module('rexmoe_jax.data', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", limited, "prepare", "--source", str(corpus_folder / "big.jsonl"),
                           "--tokenizer", str(tokenizer_file), "--output", str(output)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert "file too large while writing" in line and str(output) in line
    assert hashes(corpus_folder.parent) == before


def test_train_tokenizer_overwrites_nothing_unasked(corpus_folder, capsys):
    source, output = corpus_folder / "c.jsonl", corpus_folder.parent / "beside.txt"
    before = hashes(corpus_folder.parent)
    for target, naming in ((source, "is one of the --source files"),
                           (output, "beside.txt' exists; give a new file name, or --force to replace it")):
        assert data.main(["train-tokenizer", "--source", str(source), "--vocab-size", "280",
                          "--output", str(target)]) == 2
        assert naming in one_error_line(capsys.readouterr().err)
    assert hashes(corpus_folder.parent) == before
    assert data.main(["train-tokenizer", "--source", str(source), "--vocab-size", "280", "--output", str(output),
                      "--force"]) == 0
    assert json.loads(output.read_text())["model"]["type"] == "BPE"


def test_prepare_stopped_by_ctrl_c_exits_130_quietly(tmp_path, tokenizer_file):
    """A real SIGINT while tokens are being written (the whole KJV four times over, seconds of
    work even on a fast machine). The child gets SIGINT's default disposition, as a command run
    from a terminal has: a CI job run in the background inherits SIGINT ignored, and a Python
    started that way never raises KeyboardInterrupt (the signal went unseen in two CI runs)."""
    source = tmp_path / "kjv.txt"
    source.write_text("\n\n".join(data.read_embedded_documents() * 4))
    output = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "rexmoe_jax.data", "prepare", "--source", str(source),
                             "--tokenizer", str(tokenizer_file), "--output", str(output), "--txt-documents",
                             "paragraph"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".prepared.*.partial/tokens.bin")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "" and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kjv.txt"]  # no output, no temporary folder


def test_an_eval_set_is_its_documents_packed_in_order(tmp_path):
    """Token documents 1 2 3 | 4 5 | 6 7 8 9 (end-of-document 0): the stream 1 2 3 0 4 5 0 6 7 8
    9 0 cut at a stride of seq_len 3 into (12 - 1) // 3 = 3 rows of 4 tokens, by hand; all three
    in one batch of 3. A token id beyond the vocabulary and a set shorter than one row are one
    line each, naming the set."""
    np.save(tmp_path / "set.npy", np.asarray([1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0], np.int32))
    eod = types.SimpleNamespace(eod_id=0)
    config = DataConfig(seq_len=3, batch_size=3)
    [batch] = data.eval_set("code", str(tmp_path / "set.npy"), config, eod, 10, count=4, seed=0)
    assert sorted(map(tuple, batch.tolist())) == [(0, 4, 5, 0), (0, 6, 7, 8), (1, 2, 3, 0)]
    with pytest.raises(ConfigError, match=r"^data.eval_sets code=.*set.npy' uses token ids up to 9 but "
                                          r"model.vocab_size=9; give token files made with the run's"):
        data.eval_set("code", str(tmp_path / "set.npy"), config, eod, 9, count=4, seed=0)
    np.save(tmp_path / "short.npy", np.asarray([1, 2, 0], np.int32))
    with pytest.raises(ConfigError, match=r"short.npy' holds 3 tokens, less than one sequence of"):
        data.eval_set("tiny", str(tmp_path / "short.npy"), config, eod, 10, count=4, seed=0)
