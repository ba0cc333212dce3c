"""Token strings: a character split over several tokens goes whole to the token that completes it, so no
token shows '\ufffd' for half a character and a window's strings join to exactly its decoded text."""
from __future__ import annotations

import pytest

from schemas.config import Corpus
from workers.extract.corpus import TokenDecoder, iter_windows, sequences_table

TEXT = "naïve — 東京 🙂"


def decoded(tok, ids) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def test_a_character_split_over_byte_tokens_goes_to_the_token_that_completes_it(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ids = tok("東京🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + 3 + 4  # the tiny vocabulary has no merges of these bytes: one token per byte
    assert TokenDecoder(tok)(ids) == ["", "", "東", "", "", "京", "", "", "", "🙂"]


def test_strings_join_to_the_decoded_text_with_no_replacement_character(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    strings = TokenDecoder(tok)(ids)
    assert len(strings) == len(ids)
    assert "".join(strings) == TEXT
    assert not any("\ufffd" in s for s in strings)


def test_every_slice_joins_to_its_decode_even_cut_inside_a_character(tiny_gpt2):
    """A window may start or end inside a character: its strings show '\ufffd' exactly where decode does."""
    tok = tiny_gpt2.tokenizer
    ids = tok(TEXT + " and a real \ufffd", add_special_tokens=False)["input_ids"]
    decoder = TokenDecoder(tok)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert "".join(decoder(ids[i:j])) == decoded(tok, ids[i:j]), (i, j)
    assert decoder(ids)[-1].endswith("\ufffd")  # the input's own '\ufffd' stays


def test_sequences_table_tokens_hold_whole_characters(tmp_path, tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    src = tmp_path / "c.txt"
    src.write_text((TEXT + " ") * 20, encoding="utf-8")
    ws = list(iter_windows(Corpus(source=str(src), seq_len=400, max_windows=1), tok))
    (row,) = sequences_table(ws, TokenDecoder(tok)).to_pylist()
    assert "".join(row["tokens"]).startswith((TEXT + " ") * 5)
    assert {"東", "京", "🙂", "ï", "—"} <= set(row["tokens"])
    assert not any("\ufffd" in s for s in row["tokens"])


def byte_fallback_tokenizer():
    """A SentencePiece-style vocabulary: ASCII characters, and <0xNN> tokens for the bytes of everything else."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    vocab.update({chr(c): len(vocab) + k for k, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_byte_fallback_tokens_are_merged_too():
    tok = byte_fallback_tokenizer()
    ids = tok("a東b", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["a", "<0xE6>", "<0x9D>", "<0xB1>", "b"]
    assert TokenDecoder(tok)(ids) == ["a", "", "", "東", "b"]
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert "".join(TokenDecoder(tok)(ids)) == decoded(tok, ids) == TEXT


@pytest.mark.real_model
def test_the_default_models_byte_level_bpe():
    from workers.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ids = tok(TEXT, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    strings = TokenDecoder(tok)(ids)
    assert "".join(strings) == TEXT + tok.eos_token and not any("\ufffd" in s for s in strings)
    assert strings[-1] == tok.eos_token  # a special token shows as its text, as between texts in a window
