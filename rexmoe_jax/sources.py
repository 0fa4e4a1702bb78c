"""Reading a user's corpus: text, JSON Lines, Parquet, or already-tokenized ArrayRecord / NumPy.

`corpus_files(path)` expands a file, a folder or a glob into the files to read; the `read_*`
functions yield documents (str) or token documents (int32 arrays). Every malformed input
raises `ConfigError` with a one-line message naming the file and what to do.
"""

from __future__ import annotations

import glob
import json
import pathlib
from collections.abc import Iterator

import numpy as np

from rexmoe_jax.config import ConfigError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".npy", ".arrayrecord", ".array_record")
# A folder `python -m rexmoe_jax.data prepare` wrote: its tokens, where each document starts, and
# what made them. Its files are not corpus files (offsets.npy would read as a token stream).
PREPARED_META = "meta.json"
PREPARED_FILES = ("tokens.bin", "offsets.npy", PREPARED_META)


def is_prepared(folder: pathlib.Path) -> bool:
    """Whether `folder` looks like a prepared corpus (its meta.json and tokens.bin)."""
    return (folder / PREPARED_META).is_file() and (folder / "tokens.bin").is_file()


def corpus_files(pattern: str, setting: str = "data.corpus") -> list[pathlib.Path]:
    """The corpus files named by a path, a folder (its supported files, sorted) or a glob;
    `setting` is the option the pattern came from, for the messages."""
    path = pathlib.Path(pattern)
    if path.is_dir():
        if is_prepared(path):
            raise ConfigError(f"{setting}={pattern!r} is a prepared corpus ({', '.join(PREPARED_FILES)}), "
                              "not corpus files; train on it as data.corpus, or give the text it was made "
                              "from")
        inside = sorted(p.parent for p in path.rglob(PREPARED_META) if is_prepared(p.parent))
        if inside:
            raise ConfigError(f"{setting}={pattern!r} holds a prepared corpus, {str(inside[0])!r}, whose "
                              "files would read as corpus files; move it out of that folder")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True) if pathlib.Path(p).is_file())
    if not files:
        raise ConfigError(f"{setting}={pattern!r} matches no file; give a file, a folder or a glob "
                          f"of {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files")
    unknown = [f for f in files if f.suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES]
    if unknown:
        raise ConfigError(f"corpus file {str(unknown[0])!r} has an unsupported type; expected "
                          f"{', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)}")
    kinds = {f.suffix in TOKEN_SUFFIXES for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"{setting}={pattern!r} mixes text and token files; use one kind")
    return files


def is_tokenized(files: list[pathlib.Path]) -> bool:
    return files[0].suffix in TOKEN_SUFFIXES


def read_text_documents(files: list[pathlib.Path], text_field: str, txt_documents: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            yield from _read_txt(path, txt_documents)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)


def _read_txt(path: pathlib.Path, txt_documents: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"corpus file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    if txt_documents == "file":
        pieces = [text]
    elif txt_documents == "paragraph":
        pieces = text.split("\n\n")
    else:
        pieces = text.splitlines()
    yield from (p for p in pieces if p.strip())


def json_lines(path: pathlib.Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line of a JSON Lines file."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; bytes, so bad UTF-8 names its line
    except OSError as err:
        raise ConfigError(f"{str(path)!r} cannot be read ({err.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}:{number}: not UTF-8 text (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _read_jsonl(path: pathlib.Path, text_field: str) -> Iterator[str]:
    for number, record in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"{path}:{number}: no string field {text_field!r}; "
                              "set data.text_field to the field holding the text")
        if record[text_field].strip():
            yield record[text_field]


def _read_parquet(path: pathlib.Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types.
        raise ConfigError(f"corpus file {str(path)!r} is not a readable Parquet file ({err})") from None
    if text_field not in table.schema_arrow.names:
        raise ConfigError(f"Parquet file {str(path)!r} has no column {text_field!r} (columns: "
                          f"{', '.join(table.schema_arrow.names)}); set data.text_field")
    kind = table.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"Parquet file {str(path)!r}: column {text_field!r} holds {kind}, not text; "
                          "set data.text_field to the text column")
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        yield from (text for text in batch.column(0).to_pylist() if text and text.strip())


def read_token_documents(files: list[pathlib.Path], eod_id: int) -> Iterator[np.ndarray]:
    """Token documents from .npy streams (documents separated by `eod_id`) or ArrayRecord files
    (one document per record, little-endian int32 token ids)."""
    for path in files:
        if path.suffix == ".npy":
            yield from _read_npy(path, eod_id)
        else:
            yield from _read_array_record(path)


def _read_npy(path: pathlib.Path, eod_id: int) -> Iterator[np.ndarray]:
    try:
        stream = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # EOFError: an empty file
        raise ConfigError(f"token file {str(path)!r} is not a readable .npy file ({err})") from None
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ConfigError(f"token file {str(path)!r} holds {stream.dtype} of shape {stream.shape}; "
                          "expected a 1-D integer token stream")
    if stream.size and int(stream.min()) < 0:
        raise ConfigError(f"token file {str(path)!r} holds negative token ids (down to {int(stream.min())}); "
                          "token ids run from 0 to the vocabulary size - 1")
    if stream.size and int(stream.max()) > np.iinfo(np.int32).max:  # would wrap in the int32 cast below
        raise ConfigError(f"token file {str(path)!r} holds token id {int(stream.max())}, past any vocabulary "
                          "(int32); token ids run from 0 to the vocabulary size - 1")
    ends = np.flatnonzero(np.asarray(stream) == eod_id)
    start = 0
    for end in ends.tolist() + [len(stream)]:
        if end > start:
            yield np.asarray(stream[start:end], np.int32)
        start = end + 1


def _read_array_record(path: pathlib.Path) -> Iterator[np.ndarray]:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
        count = reader.num_records()
    except Exception as err:  # noqa: BLE001 - the reader raises RuntimeError or ValueError.
        raise ConfigError(f"token file {str(path)!r} is not a readable ArrayRecord file ({err})") from None
    for start in range(0, count, 1024):
        for record in reader.read(list(range(start, min(count, start + 1024)))):
            if len(record) % 4:
                raise ConfigError(f"ArrayRecord file {str(path)!r} has a record of {len(record)} bytes; "
                                  "expected little-endian int32 token ids")
            tokens = np.frombuffer(record, "<i4").astype(np.int32)
            if tokens.size and tokens.min() < 0:
                raise ConfigError(f"ArrayRecord file {str(path)!r} holds negative token ids; token ids run "
                                  "from 0 to the vocabulary size - 1")
            yield tokens
    try:
        reader.close()
    except Exception as err:  # noqa: BLE001 - a damaged file can fail only here (RuntimeError)
        raise ConfigError(f"token file {str(path)!r} is not a readable ArrayRecord file ({err})") from None


def write_array_record(path: pathlib.Path, documents: list[np.ndarray]) -> None:
    """Writes token documents in the format `read_token_documents` reads (for users and tests)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for doc in documents:
        writer.write(np.asarray(doc, "<i4").tobytes())
    writer.close()
