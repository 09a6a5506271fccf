"""Trains the three tokenizers with the `tokenizers` library."""
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOT = "<|endoftext|>"
PAD = "<pad>"
UNK = "[UNK]"


def _plain(tok: Tokenizer) -> Tokenizer:
    # The server pads and truncates itself and expects encode() to return only the text's tokens.
    tok.no_padding()
    tok.no_truncation()
    tok.post_processor = None
    return tok


def byte_bpe(texts, vocab_size: int, special: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(special) == 0
    return _plain(tok)


def word_level(texts, vocab_size: int = 8000) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD) == 0
    return _plain(tok)


def check_roundtrip(tok: Tokenizer, samples) -> None:
    for s in samples:
        ids = tok.encode(s).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != s:
            raise SystemExit(f"tokenizer round trip failed: {s!r} -> {back!r}")
