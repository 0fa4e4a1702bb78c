"""Tokenizers: a Hugging Face `tokenizer.json` or a SentencePiece `.model`, behind one interface,
and byte-level BPE training for a user's own text. Nothing is fetched from a hub."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

from rexmoe_jax.config import ConfigError

END_OF_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int  # Written between documents when packing, and the end-of-text for generation.

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers` tokenizer.json; its end-of-text token must be one of its special tokens."""

    def __init__(self, path: pathlib.Path):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        eod = next((self._tok.token_to_id(t) for t in (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>")
                    if self._tok.token_to_id(t) is not None), None)
        if eod is None:
            raise ConfigError(f"tokenizer {str(path)!r} has no end-of-text token "
                              f"({END_OF_TEXT!r} or '</s>'); add one as a special token")
        self.eod_id = eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece model (the LLaMA-2 tokenizer ships as one); end-of-text is its EOS id."""

    def __init__(self, path: pathlib.Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ConfigError(f"SentencePiece model {str(path)!r} has no EOS id; retrain it with eos_id set")
        self.eod_id = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """Loads a tokenizer.json (Hugging Face) or a .model (SentencePiece) file."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(f"tokenizer file {str(path)!r} is a folder; give its tokenizer.json or .model file")
    if not path.is_file():
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            return HFTokenizer(path)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the libraries raise bare Exceptions on bad files.
        raise ConfigError(f"tokenizer file {str(path)!r} could not be read: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    raise ConfigError(f"tokenizer file {str(path)!r}: expected a .json (Hugging Face) or "
                      ".model (SentencePiece) file")


_BYTES = 256  # the byte-level alphabet every such tokenizer starts from


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | pathlib.Path) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style, no unknown tokens) and saves it as JSON."""
    if vocab_size <= _BYTES + 1:
        raise ConfigError(f"--vocab-size {vocab_size}: a byte-level BPE tokenizer holds the {_BYTES} bytes "
                          f"and end-of-text before any merge; give more than {_BYTES + 1}")
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return HFTokenizer(path)
