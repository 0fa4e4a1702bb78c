"""Documents -> tokens -> packed sequences -> per-host batches from a grain pipeline.

Packing follows the paper: each document is tokenized on its own and followed by an
end-of-document token, documents are concatenated in an order shuffled by the seed, and the
stream is cut into sequences of seq_len + 1 tokens (inputs and shifted targets) at a stride of
seq_len. A held-out set of whole documents, chosen by the seed, is packed separately and never
seen in training; evaluations read sequences drawn from all of it in an order shuffled by the
seed (eval_rows), so that a few thousand tokens sample the whole held-out set.

Batches come from a grain `MapDataset`: sequences shuffled anew each epoch, repeated, cut into
host-sized batches of which host h takes every H-th. Global batch t is therefore a pure
function of the seed and the sequences read before it, each host reads only its own rows,
and the iterator's position (the sequences of the stream read so far, so that a new batch
size resumes where the old one stopped) is saved in every checkpoint.

Large corpora are tokenized once by `python -m rexmoe_jax.data prepare` into a folder that
training memory-maps (tokens.bin, offsets.npy, meta.json, and a copy of its tokenizer: the
folder can be moved or copied to another machine whole).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from rexmoe_jax import cli, outputs, sources
from rexmoe_jax.config import ConfigError, DataConfig
from rexmoe_jax.tokenizer import Tokenizer, load_tokenizer, train_bpe

ASSETS = pathlib.Path(__file__).parent / "assets"
EMBEDDED_CORPUS = ASSETS / "kjv.txt.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"


def read_embedded_documents() -> list[str]:
    """The King James Bible (public domain), one document per chapter."""
    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as f:
        return [doc for doc in f.read().split("\n\n") if doc.strip()]


@dataclasses.dataclass(frozen=True)
class TokenDocuments:
    """Document i is tokens[offsets[i]:offsets[i + 1]]; each ends with the EOD token."""

    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_documents(cls, docs: Iterable[np.ndarray], eod_id: int) -> TokenDocuments:
        pieces, lengths = [], [0]
        for doc in docs:
            pieces += [np.asarray(doc, np.int32), np.asarray([eod_id], np.int32)]
            lengths.append(len(doc) + 1)
        tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
        return cls(tokens, np.cumsum(lengths, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PackedSequences:
    """Random access to windows of seq_len + 1 tokens, at a stride of seq_len, over the
    documents `order` concatenated (a grain data source: len and getitem)."""

    def __init__(self, documents: TokenDocuments, order: np.ndarray, seq_len: int):
        self.documents, self.order, self.seq_len = documents, np.asarray(order, np.int64), seq_len
        self._lengths = documents.lengths[self.order]
        self._ends = np.cumsum(self._lengths)
        self.num_tokens = int(self._ends[-1]) if len(self._ends) else 0

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        position = int(index) * self.seq_len
        return self._window(position, position + self.seq_len + 1)

    def documents_of(self, index: int) -> np.ndarray:
        """The corpus ids of the documents sequence `index` holds tokens of."""
        position = int(index) * self.seq_len
        first = int(np.searchsorted(self._ends, position, side="right"))
        last = int(np.searchsorted(self._ends, position + self.seq_len, side="right"))
        return self.order[first:min(last, len(self.order) - 1) + 1]

    def tail(self) -> np.ndarray | None:
        """The tokens after the last whole window (from its last token on), which the windows
        leave out: a shorter row for a consumer that must see every token; None when fewer than
        two are left."""
        position = len(self) * self.seq_len
        return self._window(position, self.num_tokens) if self.num_tokens - position >= 2 else None

    def _window(self, position: int, stop: int) -> np.ndarray:
        k = int(np.searchsorted(self._ends, position, side="right"))
        pieces = []
        while position < stop:
            doc_start = int(self._ends[k] - self._lengths[k])
            within = position - doc_start
            take = min(stop - position, int(self._lengths[k]) - within)
            first = int(self.documents.offsets[self.order[k]]) + within
            pieces.append(self.documents.tokens[first:first + take])
            position, k = position + take, k + 1
        return np.concatenate(pieces).astype(np.int32)


def split_documents(num_documents: int, eval_fraction: float, seed: int,
                    corpus: str = "the corpus") -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) document indices: a seeded choice of whole documents, at least one each;
    `corpus` names it in the error."""
    if num_documents < 2:
        raise ConfigError(f"{corpus} has {num_documents} document(s); at least 2 are needed to hold "
                          "one out for evaluation (for .txt files, see data.txt_documents)")
    order = np.random.default_rng([seed, 1]).permutation(num_documents)
    n_eval = min(num_documents - 1, max(1, round(eval_fraction * num_documents)))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def eval_rows(num_sequences: int, rows: int, seed: int) -> np.ndarray:
    """Which held-out sequences evaluations read: the first `rows` of a permutation of all of
    them by the seed, the same for every run of that seed whatever else it changes."""
    return np.random.default_rng([seed, 3]).permutation(num_sequences)[:rows]


def held_out_documents(offsets: np.ndarray, eval_fraction: float, seed: int, seq_len: int,
                       rows: int) -> np.ndarray:
    """The corpus ids of the documents that evaluations of a run with `seed` read, from a
    corpus's document offsets alone (numpy only, for reports)."""
    documents = TokenDocuments(np.zeros((0,), np.int32), np.asarray(offsets, np.int64))
    _, held = split_documents(len(documents), eval_fraction, seed)
    packed = pack(documents, held, seq_len, None)
    chosen = eval_rows(len(packed), rows, seed)
    return np.unique(np.concatenate([packed.documents_of(i) for i in chosen])) if len(chosen) else held[:0]


def pack(documents: TokenDocuments, indices: np.ndarray, seq_len: int, seed: int | None) -> PackedSequences:
    """Packs the documents `indices`, shuffled by `seed` (in order when None)."""
    order = indices if seed is None else np.random.default_rng([seed, 2]).permutation(indices)
    return PackedSequences(documents, order, seq_len)


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: PackedSequences
    held_out: PackedSequences
    seed: int  # Chose the held-out documents, shuffles training, and draws the eval rows.

    def eval_batches(self, batch_size: int, count: int) -> list[np.ndarray]:
        """The held-out split's evaluation batches (`eval_batches`)."""
        return eval_batches(self.held_out, batch_size, count, self.seed)


def eval_batches(sequences: PackedSequences, batch_size: int, count: int, seed: int) -> list[np.ndarray]:
    """count * batch_size of `sequences` drawn by the seed from all of them (eval_rows), in
    whole batches: fewer if the set is small, and a set smaller than one batch repeated whole
    until its copies fill whole batches (each sequence as often, so the mean over the batches
    is the set's)."""
    chosen = eval_rows(len(sequences), batch_size * count, seed)
    if len(chosen) < batch_size:
        chosen = np.tile(chosen, batch_size // math.gcd(len(chosen), batch_size))
    n, rows = len(chosen), [sequences[i] for i in chosen]
    return [np.stack(rows[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)]


def eval_set(name: str, path: str, config: DataConfig, tokenizer: Tokenizer, vocab_size: int,
             count: int, seed: int) -> list[np.ndarray]:
    """The evaluation batches of one of data.eval_sets: its documents (text tokenized with the
    run's `tokenizer`, or token files it made) packed whole, in order, into sequences of
    data.seq_len + 1, of which `count` batches are drawn as the held-out split's are."""
    setting = f"data.eval_sets {name}"
    files = sources.corpus_files(path, setting=setting)
    documents = TokenDocuments.from_documents(_file_documents(files, config, tokenizer), tokenizer.eod_id)
    largest = int(documents.tokens.max()) if documents.tokens.size else 0
    if largest >= vocab_size:
        raise ConfigError(f"{setting}={path!r} uses token ids up to {largest} but model.vocab_size="
                          f"{vocab_size}; give token files made with the run's tokenizer, or text")
    packed = pack(documents, np.arange(len(documents)), config.seq_len, None)
    if len(packed) == 0:
        raise ConfigError(f"{setting}={path!r} holds {packed.num_tokens} tokens, less than one sequence of "
                          f"data.seq_len={config.seq_len}; give more text")
    return eval_batches(packed, config.batch_size, count, seed)


def _file_documents(files: list[pathlib.Path], config: DataConfig,
                    tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """The token documents of corpus files (sources.corpus_files): token files as they are,
    text tokenized with `tokenizer`."""
    if sources.is_tokenized(files):
        return sources.read_token_documents(files, tokenizer.eod_id)
    return _encode_all(tokenizer, sources.read_text_documents(files, config.text_field, config.txt_documents))


def _encode_all(tokenizer: Tokenizer, texts: Iterator[str], chunk: int = 1024) -> Iterator[np.ndarray]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield from (np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(batch))
            batch = []
    yield from (np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(batch))


_META_KEYS = {"tokenizer": str, "dtype": str, "num_tokens": int, "num_documents": int, "max_token_id": int}


def _prepared_meta(path: pathlib.Path) -> dict:
    """A prepared corpus's meta.json, with the keys training reads checked."""
    file = path / sources.PREPARED_META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(file)!r} is not readable JSON ({err}); prepare the corpus again") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{str(file)!r} holds no JSON object; prepare the corpus again")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind):
            raise ConfigError(f"{str(file)!r} has no {kind.__name__} {key!r}; prepare the corpus again")
    return meta


def _prepared_folder(path: pathlib.Path) -> tuple[TokenDocuments, dict]:
    meta = _prepared_meta(path)
    try:
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r")
        offsets = np.load(path / "offsets.npy", mmap_mode="r")
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"prepared corpus {str(path)!r} is incomplete ({err}); prepare it again") from None
    if len(tokens) != meta["num_tokens"] or len(offsets) != meta["num_documents"] + 1:
        raise ConfigError(f"prepared corpus {str(path)!r} does not match its meta.json (truncated?); "
                          "prepare it again")
    steps = np.diff(offsets)  # one pass over offsets (8 bytes a document), not over the tokens
    if offsets.dtype.kind not in "iu" or offsets[0] != 0 or offsets[-1] != len(tokens) or (steps < 1).any():
        raise ConfigError(f"prepared corpus {str(path)!r} has offsets.npy that do not cut tokens.bin into "
                          "documents (damaged?); prepare it again")
    return TokenDocuments(tokens, offsets), meta


def _named(config: DataConfig) -> str:
    """The corpus as an error message names it."""
    return f"data.corpus={config.corpus!r}" if config.corpus else "the embedded corpus"


def _prepared(config: DataConfig) -> pathlib.Path | None:
    folder = pathlib.Path(config.corpus) if config.corpus else None
    return folder if folder is not None and (folder / sources.PREPARED_META).is_file() else None


def tokenizer_path(config: DataConfig) -> pathlib.Path:
    """data.tokenizer, else the one a prepared corpus names, else the embedded one."""
    if config.tokenizer:
        return pathlib.Path(config.tokenizer)
    prepared = _prepared(config)
    if prepared is None:
        return EMBEDDED_TOKENIZER
    # A copy inside the folder (a relative name: the folder can be moved or copied whole); a
    # corpus prepared before that names the file it was made with.
    path = prepared / _prepared_meta(prepared)["tokenizer"]
    if not path.is_file():
        raise ConfigError(f"prepared corpus {str(prepared)!r} was made with the tokenizer {str(path)!r}, "
                          "which does not exist (moved?); set data.tokenizer to that tokenizer, or prepare "
                          "the corpus again")
    return path


def resolve_tokenizer(config: DataConfig) -> Tokenizer:
    return load_tokenizer(tokenizer_path(config))


def load_documents(config: DataConfig) -> tuple[TokenDocuments, Tokenizer, int]:
    """The configured corpus as token documents, its tokenizer, and its largest token id."""
    tokenizer = resolve_tokenizer(config)
    prepared = _prepared(config)
    if prepared is not None:
        documents, meta = _prepared_folder(prepared)
        return documents, tokenizer, int(meta["max_token_id"])
    corpus = pathlib.Path(config.corpus) if config.corpus else None
    if corpus is None:
        texts: Iterator[str] = iter(read_embedded_documents())
        docs = _encode_all(tokenizer, texts)
    else:
        files = sources.corpus_files(config.corpus)
        if sources.is_tokenized(files):
            if not config.tokenizer:
                raise ConfigError("data.corpus holds token files: set data.tokenizer to the tokenizer "
                                  "that made them (it gives the end-of-document id)")
        docs = _file_documents(files, config, tokenizer)
    documents = TokenDocuments.from_documents(docs, tokenizer.eod_id)
    if len(documents) == 0:
        raise ConfigError(f"data.corpus={config.corpus!r} holds no text")
    return documents, tokenizer, int(documents.tokens.max())


def build_corpus(config: DataConfig, seed: int, vocab_size: int) -> Corpus:
    """Loads, splits and packs the configured corpus, checking it against the model's vocabulary."""
    documents, tokenizer, max_token = load_documents(config)
    if max_token >= vocab_size or tokenizer.vocab_size > vocab_size:
        largest = max(max_token, tokenizer.vocab_size - 1)
        raise ConfigError(f"{_named(config)} uses token ids up to {largest} but "
                          f"model.vocab_size={vocab_size}; raise model.vocab_size or use another tokenizer")
    train_idx, eval_idx = split_documents(len(documents), config.eval_fraction, seed, _named(config))
    corpus = Corpus(tokenizer, pack(documents, train_idx, config.seq_len, seed),
                    pack(documents, eval_idx, config.seq_len, None), seed)
    for name, packed in (("training", corpus.train), ("held-out", corpus.held_out)):
        if len(packed) == 0:
            more = " or raise data.eval_fraction" if name == "held-out" else ""
            raise ConfigError(f"data.seq_len={config.seq_len} is longer than the {name} data of "
                              f"{_named(config)} ({packed.num_tokens} tokens); lower data.seq_len{more}, "
                              "or add text")
    return corpus


class BatchIterator:
    """This host's rows of consecutive global batches, prefetched by grain in background threads.

    A global batch is cut into `block_count` equal blocks of rows; the host reads the blocks
    numbered `blocks` (its devices' rows, sharding.process_rows) and returns them concatenated
    in ascending order, which is how jax places them (make_array_from_process_local_data).
    `state()` is the position to save with a checkpoint, the sequences of the shuffled stream
    read so far: `BatchIterator(..., state=...)` resumes there whatever the batch size, and
    `position` turns an older checkpoint's batch count into it.
    """

    def __init__(self, sequences: PackedSequences, batch_size: int, seed: int, *,
                 blocks: Sequence[int] = (0,), block_count: int = 1, state: dict | None = None,
                 prefetch: int = 2):
        import grain

        if batch_size % block_count:
            raise ConfigError(f"data.batch_size={batch_size} is not divisible into {block_count} blocks "
                              "of rows, one per device holding its own rows")
        blocks, run = sorted(blocks), len(blocks)
        if blocks == list(range(blocks[0], blocks[0] + run)) and blocks[0] % run == block_count % run == 0:
            blocks, block_count = [blocks[0] // run], block_count // run  # adjacent: one block
        self._read, self._batch_size = position(state or {}, batch_size), batch_size
        shuffled = grain.MapDataset.source(sequences).shuffle(seed=seed).repeat(None)
        if self._read:
            shuffled = shuffled[self._read:]  # grain slices lazily: no sequence before it is read
        rows = shuffled.batch(batch_size // block_count)
        if len(blocks) == 1:
            dataset = rows[blocks[0]::block_count]
        else:  # blocks apart on the batch (a TPU host's devices along the torus): read each, in order
            dataset = grain.MapDataset.range(len(rows) // block_count).map(
                lambda step: np.concatenate([rows[step * block_count + b] for b in blocks]))
        options = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def __next__(self) -> np.ndarray:
        batch = np.asarray(next(self._iterator), np.int32)
        self._read += self._batch_size
        return batch

    def state(self) -> dict:
        return self.state_at(self._read)

    @staticmethod
    def state_at(sequences: int) -> dict:
        """The position of an iterator whose global batches have held `sequences` rows."""
        return {"sequences": sequences}


def position(state: dict, batch_size: int) -> int:
    """The sequences read at a saved `state` (BatchIterator.state); a checkpoint written before
    the count was kept holds grain's count of batches (of `batch_size`, its run's) instead."""
    if "sequences" in state:
        return int(state["sequences"])
    return int(state.get("next_index", 0)) * batch_size


# --------------------------------------------------------------------------------------------
# python -m rexmoe_jax.data prepare | train-tokenizer


def _is_prepared(folder: pathlib.Path) -> bool:
    """A complete prepared corpus and nothing else: what `prepare` may replace."""
    try:
        meta = _prepared_meta(folder)
    except ConfigError:
        return False
    files = {p.name for p in folder.iterdir()}
    tokenizer = [] if pathlib.Path(meta["tokenizer"]).is_absolute() else [meta["tokenizer"]]  # its copy
    return files == {*sources.PREPARED_FILES, *tokenizer} and (folder / "tokens.bin").stat().st_size == (
        meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize)


def prepare(source: str, tokenizer_path: str, output: pathlib.Path, *, text_field: str = "text",
            txt_documents: str = "file", force: bool = False) -> dict:
    """Tokenizes `source` once into the folder `output` (tokens.bin, offsets.npy, meta.json, and
    a copy of the tokenizer, which meta.json names relative to the folder).

    It is written beside `output` under a temporary name and renamed into place when complete.
    An existing `output` is replaced only when it is empty or a complete prepared corpus and
    nothing else (`force`: any prepared corpus); never when it is or holds the source or the
    tokenizer (outputs.check_folder).
    """
    tokenizer = load_tokenizer(tokenizer_path)
    files = sources.corpus_files(source, setting="--source")
    source_dir = pathlib.Path(source) if pathlib.Path(source).is_dir() else None
    inputs = [*files, pathlib.Path(tokenizer_path), *([source_dir] if source_dir else [])]
    outputs.check_folder(output, "--output", protected=inputs, ours=_is_prepared,
                         looks_ours=lambda folder: (folder / sources.PREPARED_META).is_file(), force=force)
    if source_dir and output.resolve().is_relative_to(source_dir.resolve()):
        raise ConfigError(f"--output {str(output)!r} is inside --source {source!r}, where every later read "
                          "of that folder would find it; put it beside the source")
    if sources.is_tokenized(files):
        docs = sources.read_token_documents(files, tokenizer.eod_id)
    else:
        docs = _encode_all(tokenizer, sources.read_text_documents(files, text_field, txt_documents))
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    with outputs.staged_folder(output) as staging:
        offsets, max_token = [0], 0
        with open(staging / "tokens.bin", "wb") as f:
            for doc in docs:
                doc = np.append(doc, tokenizer.eod_id)
                max_token = max(max_token, int(doc.max()))
                f.write(doc.astype(dtype).tobytes())
                offsets.append(offsets[-1] + len(doc))
        if len(offsets) == 1:
            raise ConfigError(f"--source {source!r} holds no text")
        np.save(staging / "offsets.npy", np.asarray(offsets, np.int64))
        copy = "tokenizer" + pathlib.Path(tokenizer_path).suffix  # tokenizer.json or tokenizer.model
        shutil.copyfile(tokenizer_path, staging / copy)
        meta = {"source": source, "tokenizer": copy,
                "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id, "dtype": dtype.str,
                "num_documents": len(offsets) - 1, "num_tokens": offsets[-1], "max_token_id": max_token}
        (staging / sources.PREPARED_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m rexmoe_jax.data")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="tokenize a corpus once into token files")
    prep.add_argument("--source", required=True, help="file, folder or glob of .txt/.jsonl/.parquet/.npy/...")
    prep.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    prep.add_argument("--output", required=True,
                      help="a new folder, or an earlier prepared corpus (nothing else in it) to replace")
    prep.add_argument("--force", action="store_true",
                      help="also replace a prepared corpus that is incomplete or holds other files")
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--txt-documents", default="file", choices=["file", "paragraph", "line"])
    tok = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    tok.add_argument("--source", required=True)
    tok.add_argument("--vocab-size", type=int, default=32_000)
    tok.add_argument("--output", required=True, help="tokenizer.json to write (a new file)")
    tok.add_argument("--force", action="store_true", help="replace an existing --output file")
    tok.add_argument("--text-field", default="text")
    tok.add_argument("--txt-documents", default="file", choices=["file", "paragraph", "line"])
    args = parser.parse_args(argv)
    if args.command == "prepare":
        meta = prepare(args.source, args.tokenizer, pathlib.Path(args.output), text_field=args.text_field,
                       txt_documents=args.txt_documents, force=args.force)
        print(f"wrote {meta['num_tokens']:,} tokens in {meta['num_documents']:,} documents to {args.output}")
    else:
        trained = _train_tokenizer(args)
        print(f"wrote a {trained.vocab_size:,}-token tokenizer to {args.output}")
    return 0


def _train_tokenizer(args) -> Tokenizer:
    files = sources.corpus_files(args.source, setting="--source")
    if sources.is_tokenized(files):
        raise ConfigError("train-tokenizer needs text files, not token files")
    output = pathlib.Path(args.output)
    if any(output.resolve() == f.resolve() for f in files):
        raise ConfigError(f"--output {args.output!r} is one of the --source files; give a new file")
    outputs.check_file(output, "--output", ours=lambda _: args.force, replace_flag="--force")
    output.parent.mkdir(parents=True, exist_ok=True)
    texts = sources.read_text_documents(files, args.text_field, args.txt_documents)
    with outputs.staged_file(output) as staging:
        return train_bpe(texts, args.vocab_size, staging)


if __name__ == "__main__":
    raise SystemExit(main())
