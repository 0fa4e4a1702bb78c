"""Tokenizer round trips and training."""

import pytest
import tokenizers

from rexmoe_jax import data, tokenizer
from rexmoe_jax.config import ConfigError


def test_embedded_tokenizer_round_trip():
    tok = tokenizer.load_tokenizer(data.EMBEDDED_TOKENIZER)
    text = "In the beginning God created the heaven and the earth.\nÆsop's naïve café: 3 + 4 = 7."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # it compresses
    assert tok.decode([tok.eod_id]) == tokenizer.END_OF_TEXT


def test_train_bpe_and_sentencepiece(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["pack my box with five dozen jugs"] * 50
    tok = tokenizer.train_bpe(texts, 300, tmp_path / "tok.json")
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    # The size asked for, in the file as the tokenizers library itself reads it.
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "tok.json"))
    assert tok.vocab_size == 300 and saved.get_vocab_size() == 300

    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=30, minloglevel=2)
    sp = tokenizer.load_tokenizer(tmp_path / "sp.model")
    assert sp.decode(sp.encode(texts[-1])) == texts[-1] and sp.eod_id >= 0


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tokenizer.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be read"):
        tokenizer.load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ConfigError, match="expected a .json"):
        tokenizer.load_tokenizer(tmp_path / "x.txt")


@pytest.mark.parametrize("size", [5, 257])
def test_a_vocabulary_no_larger_than_the_bytes_is_refused(tmp_path, size):
    """256 bytes and end-of-text come before any merge: 257 or fewer tokens cannot be asked for."""
    with pytest.raises(ConfigError, match=f"--vocab-size {size}: a byte-level BPE tokenizer holds the 256"):
        tokenizer.train_bpe(["some text"], size, tmp_path / "tok.json")
    assert not (tmp_path / "tok.json").exists()
