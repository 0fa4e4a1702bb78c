"""Reading corpora: file patterns, documents from text formats, and token documents."""

import json
import re

import numpy as np
import pytest

from rexmoe_jax import sources
from rexmoe_jax.config import ConfigError


def test_text_documents_per_format(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from json", "n": 1}) + "\n\n" +
                                      json.dumps({"text": "again"}) + "\n")
    files = sources.corpus_files(str(tmp_path / "*"))
    assert [f.name for f in files] == ["a.txt", "b.jsonl"] and not sources.is_tokenized(files)
    assert list(sources.read_text_documents(files, "text", "paragraph")) == [
        "first paragraph\nstill first", "second", "from json", "again"]
    assert list(sources.read_text_documents(files[:1], "text", "line")) == [
        "first paragraph", "still first", "second"]


def test_token_documents_split_at_end_of_text_and_array_records_round_trip(tmp_path):
    np.save(tmp_path / "t.npy", np.asarray([5, 6, 0, 7, 0, 8, 9], np.int32))
    got = [d.tolist() for d in sources.read_token_documents([tmp_path / "t.npy"], eod_id=0)]
    assert got == [[5, 6], [7], [8, 9]]
    documents = [np.asarray([1, 2, 3], np.int32), np.asarray([70_000], np.int32)]
    sources.write_array_record(tmp_path / "t.arrayrecord", documents)
    back = list(sources.read_token_documents([tmp_path / "t.arrayrecord"], eod_id=0))
    assert [d.tolist() for d in back] == [[1, 2, 3], [70_000]]


def test_jsonl_with_bytes_that_are_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}:2: not UTF-8 text") as err:
        list(sources.read_text_documents([path], "text", "paragraph"))
    assert "\n" not in str(err.value)


def test_a_missing_json_lines_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.jsonl' cannot be read"):
        list(sources.json_lines(tmp_path / "missing.jsonl"))


def test_parquet_text_column_holding_integers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "c.parquet")
    with pytest.raises(ConfigError, match=r"c.parquet'.*column 'text' holds int64, not text"):
        list(sources.read_text_documents([tmp_path / "c.parquet"], "text", "paragraph"))


def test_negative_token_ids_are_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.asarray([5, -3, 0, 7], np.int32))
    with pytest.raises(ConfigError, match=r"t.npy' holds negative token ids \(down to -3\)"):
        list(sources.read_token_documents([tmp_path / "t.npy"], eod_id=0))
    sources.write_array_record(tmp_path / "t.arrayrecord", [np.asarray([1, -2], np.int32)])
    with pytest.raises(ConfigError, match="t.arrayrecord' holds negative token ids"):
        list(sources.read_token_documents([tmp_path / "t.arrayrecord"], eod_id=0))


def test_token_files_that_cannot_be_read_as_ids_are_refused(tmp_path):
    """Ids past int32 (which the int32 cast would wrap: 2**40 -> 0), an empty .npy and a
    garbage ArrayRecord file are each one ConfigError naming the file."""
    np.save(tmp_path / "big.npy", np.asarray([5, 0, 7, 2**40], np.uint64))
    with pytest.raises(ConfigError, match=r"big.npy' holds token id 1099511627776, past any vocabulary"):
        list(sources.read_token_documents([tmp_path / "big.npy"], eod_id=0))
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.npy' is not a readable .npy file"):
        list(sources.read_token_documents([tmp_path / "empty.npy"], eod_id=0))
    (tmp_path / "g.arrayrecord").write_bytes(b"garbage" * 100)
    with pytest.raises(ConfigError, match=r"g.arrayrecord' is not a readable ArrayRecord file"):
        list(sources.read_token_documents([tmp_path / "g.arrayrecord"], eod_id=0))


def test_missing_files_blame_the_setting_they_came_from(tmp_path):
    with pytest.raises(ConfigError, match="^--input-set psalms="):
        sources.corpus_files(str(tmp_path / "missing.txt"), setting="--input-set psalms")
    with pytest.raises(ConfigError, match="^data.corpus="):
        sources.corpus_files(str(tmp_path / "missing.txt"))
