"""Bad corpus input is a clear error naming file and line (or skipped and counted), and a corpus is read only
as far as `max_windows` needs, however large one file or one record is."""
from __future__ import annotations

import json
import logging
import os
import re
import threading

import pytest

import workers.extract.corpus as corpus
from schemas.config import Corpus
from workers.extract.corpus import CorpusError, iter_windows


class WordTokenizer:
    """Each whitespace-separated number is its own id, 0 ends a text; counts the characters it tokenized."""
    eos_token_id = 0

    def __init__(self):
        self.chars = 0

    def __call__(self, text, add_special_tokens=True):
        self.chars += len(text)
        return {"input_ids": [int(w) for w in text.split()]}


def windows(src, tokenizer=None, **corpus_fields) -> list[list[int]]:
    cfg = Corpus(source=str(src), seq_len=corpus_fields.pop("seq_len", 2), max_windows=None, **corpus_fields)
    return [w.token_ids for w in iter_windows(cfg, tokenizer or WordTokenizer())]


GOOD = b'{"text": "1 2"}\n'


@pytest.mark.parametrize("bad_line, message", [
    (b'{"text": "3 caf\xe9"}', "is not UTF-8 text (byte 0xe9 at byte 16)"),
    (b'["3", "4"]', "is a list, not an object with a 'text' field"),
    (b"null", "is null, not an object with a 'text' field"),
    (b'"3 4"', "is a string, not an object with a 'text' field"),
    (b"7", "is a number, not an object with a 'text' field"),
])
def test_a_jsonl_line_that_is_not_a_text_record_is_an_error_naming_file_and_line(tmp_path, bad_line, message):
    src = tmp_path / "c.jsonl"
    src.write_bytes(GOOD + b"\n" + bad_line + b"\n" + GOOD)  # the blank line 2 still counts
    with pytest.raises(CorpusError, match=re.escape(f"corpus.source: {src}:3 {message}")):
        windows(src)


@pytest.mark.parametrize("value, kind", [("null", "null"), ("5", "a number"), ('["3"]', "a list"),
                                         ("true", "a boolean")])
def test_a_text_field_that_is_not_a_string_is_an_error_not_the_text_of_its_repr(tmp_path, value, kind):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "1 2"}\n{"text": ' + value + ', "id": 4}\n')
    with pytest.raises(CorpusError, match=re.escape(f"corpus.text_field: 'text' in {src}:2 is {kind}, not a string")):
        windows(src)


def test_skip_drops_every_bad_record_and_logs_how_many(tmp_path, caplog):
    src = tmp_path / "c.jsonl"
    lines = [b'{"text": "1 2"}', b'["3"]', b'{"text": "3 \xff"}', b"null", b'{"text": "4 5"}', b'"6"',
             b'{"text": null}', b'{"body": "7"}', b"{oops", b'{"text": "6 7"}']
    src.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="workers.extract.corpus"):
        got = windows(src, seq_len=3, on_bad_record="skip")
    assert got == [[1, 2, 0], [4, 5, 0], [6, 7, 0]]
    (record,) = caplog.records
    assert f"skipped 7 bad records in {src}" in record.getMessage()
    assert f"{src}:2 is a list" in record.getMessage()  # the first one, so the user can look


def test_a_text_file_line_that_is_not_utf8_is_named_or_skipped(tmp_path, caplog):
    src = tmp_path / "c.txt"
    src.write_bytes(b"1 2\r\n3 \xe9 4\r\n5 6")
    with pytest.raises(CorpusError, match=re.escape(f"corpus.source: {src}:2 is not UTF-8 text (byte 0xe9)")):
        windows(src)
    with caplog.at_level(logging.WARNING, logger="workers.extract.corpus"):
        assert windows(src, on_bad_record="skip") == [[1, 2], [5, 6]]  # line 2 dropped, then the text's 0
    assert "skipped 1 bad record in" in caplog.text


def test_a_text_file_is_decoded_like_read_text_across_read_blocks(tmp_path, monkeypatch):
    """Blocks end mid-character and between \\r and \\n; the text comes out as `Path.read_text` gives it."""
    monkeypatch.setattr(corpus, "READ_BYTES", 5)
    text = "1 é 2\r\n東京 3\r4 🙂\n" * 3
    src = tmp_path / "c.txt"
    src.write_bytes(text.encode())
    assert list(corpus.iter_texts(Corpus(source=str(src)))) == [src.read_text(encoding="utf-8")]


def test_a_huge_one_line_text_file_is_read_only_as_far_as_the_windows_need(tmp_path):
    """The file is a pipe fed 8 MiB of one line: reading must stop after a bounded prefix of it."""
    fifo = tmp_path / "huge.txt"
    os.mkfifo(fifo)
    block, offered, written = b"1 2 3 4 5 6 7 8 " * 4096, 8 << 20, [0]

    def feed():
        try:
            with open(fifo, "wb") as fh:
                while written[0] < offered:
                    fh.write(block)
                    written[0] += len(block)
        except BrokenPipeError:  # the reader closed the file: it has what it needed
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    tok = WordTokenizer()
    ws = list(iter_windows(Corpus(source=str(fifo), seq_len=64, max_windows=2), tok))
    writer.join(timeout=60)
    assert [w.token_ids[:3] for w in ws] == [[1, 2, 3], [1, 2, 3]]
    assert not writer.is_alive()
    assert written[0] <= 1 << 20, f"{written[0]:,} of {offered:,} bytes read for 2 windows"
    assert tok.chars <= 1 << 20  # of 8 M


def test_a_huge_jsonl_record_is_tokenized_only_as_far_as_the_windows_need(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "1 2 3 4 " * 1_000_000}) + "\n")  # one 8 MB line
    tok = WordTokenizer()
    ws = list(iter_windows(Corpus(source=str(src), seq_len=64, max_windows=2), tok))
    assert len(ws) == 2 and ws[1].token_ids[:4] == [1, 2, 3, 4]
    assert tok.chars <= 1 << 20  # of 8 M


def test_a_text_tokenized_in_pieces_gives_the_ids_of_the_whole_text(tmp_path, monkeypatch, tiny_gpt2):
    """Pieces end before a space between letters or digits, where byte-level BPE starts a pre-token anyway."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 1200)
    tok = tiny_gpt2.tokenizer
    text = "".join(corpus.pydoc_texts()[:20]) + "naïve — 東京 🙂 it's 12 345  x\n\n y. " * 40
    src = tmp_path / "long.txt"
    src.write_text(text, encoding="utf-8")
    whole = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ws = list(iter_windows(Corpus(source=str(src), seq_len=32, max_windows=None), tok))
    assert sum((w.token_ids for w in ws), []) == whole[:32 * len(ws)]
    assert len(ws) == len(whole) // 32


def test_text_pieces_rejoin_exactly_and_cut_only_between_words(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 10)
    monkeypatch.setattr(corpus, "MAX_PIECE_CHARS", 40)
    parts = ["alpha beta, gamma delta epsilon", " zeta", "\n\n" + "x" * 95 + " end"]
    pieces = list(corpus.text_pieces(parts))
    assert "".join(pieces) == "".join(parts)
    # by hand: the last safe space within 10 characters, else the first after; 40 x's at most without one
    assert pieces == ["alpha", " beta, gamma", " delta", " epsilon", " zeta\n\n" + "x" * 33, "x" * 40, "x" * 22,
                      " end"]
