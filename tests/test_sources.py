"""Reading corpora: file patterns, documents from text formats, and token documents."""

import json

import numpy as np

from rexmoe_jax import sources


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
