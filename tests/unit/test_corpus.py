import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.config import Corpus
from workers.extract.corpus import CorpusError, TokenDecoder, iter_texts, iter_windows, pydoc_texts, sequences_table


def test_default_corpus_is_the_stdlib_help_text():
    texts = pydoc_texts()
    words = sum(len(t.split()) for t in texts)
    assert 40_000 < words < 120_000


def test_windows_are_stable_and_exact(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    cfg = Corpus(seq_len=16, max_windows=50)
    a = list(iter_windows(cfg, tok))
    b = list(iter_windows(cfg, tok))
    assert [w.seq_id for w in a] == list(range(50))
    assert [w.token_ids for w in a] == [w.token_ids for w in b]
    assert all(len(w.token_ids) == 16 for w in a)
    resumed = list(iter_windows(cfg, tok, start=20))
    assert [w.seq_id for w in resumed] == list(range(20, 50)) and resumed[0].token_ids == a[20].token_ids
    # the windows tile the token stream in order
    stream = []
    for t in pydoc_texts():
        if t.strip():
            stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sum((w.token_ids for w in a), []) == stream[:16 * 50]


def test_sequences_table_stores_decoded_tokens(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ws = list(iter_windows(Corpus(seq_len=8, max_windows=3), tok))
    t = sequences_table(ws, TokenDecoder(tok))
    assert t.num_rows == 3
    row = t.slice(1, 1).to_pylist()[0]
    assert "".join(row["tokens"]) == tok.decode(row["token_ids"])


class DigitTokenizer:
    """Each whitespace-separated number is its own token id, and 0 ends a text: windows can be worked by hand."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


def write_source(tmp_path, fmt) -> str:
    """The same two documents, "1 2 3 4 5" and "6 7 8", in each source format (with what each must ignore)."""
    if fmt == "text":  # one file is one text, line breaks and all
        src = tmp_path / "c.txt"
        src.write_text("1 2 3 4 5\n6 7 8")
    elif fmt == "folder":  # .txt/.md files in sorted path order, subfolders too; other files ignored
        src = tmp_path / "d"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "b.md").write_text("6 7 8")
        (src / "a.txt").write_text("1 2 3 4 5")
        (src / "notes.csv").write_text("9 9 9")
    elif fmt == "jsonl":  # blank lines skipped, only the text field read
        src = tmp_path / "c.jsonl"
        src.write_text('{"body": "1 2 3 4 5", "id": 9}\n\n{"body": "6 7 8"}\n')
    else:  # empty and null cells skipped
        src = tmp_path / "c.parquet"
        pq.write_table(pa.table({"body": ["1 2 3 4 5", None, "", "6 7 8"], "id": [9, 9, 9, 9]}), src)
    return str(src)


@pytest.mark.parametrize("fmt, texts, windows", [
    ("text", ["1 2 3 4 5\n6 7 8"], [[1, 2, 3], [4, 5, 6], [7, 8, 0]]),
    ("folder", ["1 2 3 4 5", "6 7 8"], [[1, 2, 3], [4, 5, 0], [6, 7, 8]]),  # the last 0 is left over
    ("jsonl", ["1 2 3 4 5", "6 7 8"], [[1, 2, 3], [4, 5, 0], [6, 7, 8]]),
    ("parquet", ["1 2 3 4 5", "6 7 8"], [[1, 2, 3], [4, 5, 0], [6, 7, 8]]),
])
def test_file_sources_yield_exactly_their_texts_and_windows(tmp_path, fmt, texts, windows):
    cfg = Corpus(source=write_source(tmp_path, fmt), seq_len=3, max_windows=None, text_field="body")
    assert list(iter_texts(cfg)) == texts
    ws = list(iter_windows(cfg, DigitTokenizer()))
    assert [w.token_ids for w in ws] == windows and [w.seq_id for w in ws] == [0, 1, 2]
    capped = Corpus(source=cfg.source, seq_len=3, max_windows=2, text_field="body")
    assert [w.token_ids for w in iter_windows(capped, DigitTokenizer(), start=1)] == windows[1:2]


def test_bad_corpora_are_clear_errors(tmp_path, tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="is empty"):
        list(iter_windows(Corpus(source=str(empty)), tok))
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_windows(Corpus(source=str(tmp_path / "nope.txt")), tok))
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "hi"}\n{oops\n')
    with pytest.raises(CorpusError, match="c.jsonl:2 is not valid JSON"):
        list(iter_windows(Corpus(source=str(j), seq_len=2), tok))
    j.write_text('{"body": "hi"}\n')
    with pytest.raises(CorpusError, match="corpus.text_field: 'text' missing"):
        list(iter_windows(Corpus(source=str(j)), tok))
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(CorpusError, match="shorter than one window"):
        list(iter_windows(Corpus(source=str(short), seq_len=64), tok))
    binf = tmp_path / "b.txt"
    binf.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(iter_windows(Corpus(source=str(binf)), tok))
