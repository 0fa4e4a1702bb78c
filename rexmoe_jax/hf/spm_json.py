"""A SentencePiece model written as a Hugging Face tokenizer.json, for export, and checked to
encode as the run does.

transformers reads a bare tokenizer.model as a LLaMA-style BPE model whatever it is, so export
writes a tokenizer.json built from the model's own proto instead: its pieces and scores (a
Unigram or a BPE model; BPE merges ranked by the merged piece's score, as SentencePiece merges),
byte fallback, the unknown piece's surface, and the normalizer's settings (the precompiled
character map, extra whitespace removed, the dummy "▁" prefix). `check_same_encoding` then
encodes and decodes a probe text (spacing, digits, accents, other scripts, byte-fallback
characters, markup) both ways and refuses the export at the first difference.

A model with user-defined pieces is refused by that check (the probe holds each of them between
letters and between spaces): a tokenizer.json normalises the text on either side of an added
token on its own, adding a dummy prefix after it.

One difference is known and left: text that spells a piece SentencePiece never produces from
text (a control, unknown or byte piece: "</s>", "<unk>", "<0x41>") is that piece in the
tokenizer.json (as in Hugging Face's own conversions, and transformers matches its eos_token
in text anyway), where the run's SentencePiece encodes it as characters.
"""

from __future__ import annotations

import gzip
import pathlib

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from rexmoe_jax.config import ConfigError
from rexmoe_jax.tokenizer import Tokenizer

_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
_TEXT_PIECES = (_PIECE.NORMAL, _PIECE.USER_DEFINED)  # the pieces SentencePiece segments text into
_UNIGRAM, _BPE = sentencepiece_model_pb2.TrainerSpec.UNIGRAM, sentencepiece_model_pb2.TrainerSpec.BPE
_SPACE = "▁"

PROBE = [
    "And God said, Let there be light: and there was light.",
    " a leading space,  two spaces,   three, and a trailing one ",
    "Numbers 3.14159, 2026-12-06, 1,000,000 and x1 = y2 + 42.",
    "Tabs\tand\nnew lines\n\nand  \t mixed",
    "Café, naïve, Ærøskøbing, Straße, ﬁve (a ligature), ＡＢＣ (full width)",
    "Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji 🙂🚀 and rare signs ⌘ ∮ ⅋",
    "Markup-looking text: <b>bold</b>, <p>, a<c>d, <<>>, [0x41]",
    "",
]


def _proto(path: pathlib.Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _model(proto) -> models.Model:
    spec, pieces = proto.trainer_spec, proto.pieces
    unk_id = next((i for i, p in enumerate(pieces) if p.type == _PIECE.UNKNOWN), None)
    if spec.model_type == _UNIGRAM:
        # Below every text piece; still taken where text spells the piece (the module doc's difference).
        floor = min(p.score for p in pieces) - 100.0
        vocab = [(p.piece, p.score if p.type in _TEXT_PIECES else floor) for p in pieces]
        return models.Unigram(vocab, unk_id, spec.byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    text = {p.piece for p in pieces if p.type in _TEXT_PIECES}
    merges = []
    for piece in sorted((p for p in pieces if p.type in _TEXT_PIECES and len(p.piece) > 1),
                        key=lambda p: -p.score):
        merges += [(piece.piece[:i], piece.piece[i:]) for i in range(1, len(piece.piece))
                   if piece.piece[:i] in text and piece.piece[i:] in text]
    unk = pieces[unk_id].piece if unk_id is not None else None
    return models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)


def convert(path: pathlib.Path) -> tokenizers.Tokenizer:
    """The SentencePiece model at `path` as a tokenizers.Tokenizer."""
    proto = _proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type not in (_UNIGRAM, _BPE):
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise ConfigError(f"cannot export the tokenizer {str(path)!r}: a SentencePiece {kind} model has no "
                          "tokenizer.json equivalent here (Unigram and BPE do)")
    tokenizer = tokenizers.Tokenizer(_model(proto))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    steps += [normalizers.Prepend(_SPACE)] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    # No split at "▁": SentencePiece encodes the whole string (split_by_whitespace shapes training
    # only), and a model trained with allow_whitespace_only_pieces (LLaMA-2's) has pieces like "▁▁".
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(_SPACE, "never", split=False)
    unknown = next((p.piece for p in proto.pieces if p.type == _PIECE.UNKNOWN), None)
    steps = [decoders.Replace(unknown, spec.unk_surface)] if unknown else []
    steps += [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    steps += [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []  # the dummy prefix's space
    tokenizer.decoder = decoders.Sequence(steps)
    user = [p.piece for p in proto.pieces if p.type == _PIECE.USER_DEFINED]  # kept whole wherever they are
    if user:
        tokenizer.add_tokens([tokenizers.AddedToken(piece, normalized=False) for piece in user])
    return tokenizer


def probe_texts(user_pieces: list[str] = ()) -> list[str]:
    """PROBE, the first 200 lines of the embedded KJV text, and each user-defined piece alone,
    between letters and between spaces (the places a tokenizer.json treats it otherwise)."""
    kjv = pathlib.Path(__file__).resolve().parent.parent / "assets" / "kjv.txt.gz"
    with gzip.open(kjv, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(200)]
    return PROBE + lines + [text for piece in user_pieces for text in (piece, f"x{piece}y", f"a {piece} b")]


def check_same_encoding(ours: Tokenizer, exported: tokenizers.Tokenizer, source: pathlib.Path) -> None:
    """Raises ConfigError at the first probe text `exported` encodes or decodes otherwise than
    `ours` (the run's tokenizer)."""
    problem = f"cannot export the tokenizer {str(source)!r}: written as tokenizer.json it"
    fix = "export a run whose data.tokenizer is a tokenizer.json"
    added = [token.content for token in exported.get_added_tokens_decoder().values()]  # the user pieces
    for text in probe_texts(added):
        want, got = ours.encode(text), exported.encode(text, add_special_tokens=False).ids
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise ConfigError(f"{problem} encodes {text[:40]!r} from token {at} on as {got[at:at + 4]}, "
                              f"the run as {want[at:at + 4]}; {fix}")
        if exported.decode(got, skip_special_tokens=False) != ours.decode(want):
            raise ConfigError(f"{problem} decodes {text[:40]!r} otherwise than the run does; {fix}")
