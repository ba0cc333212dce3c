"""Corpus sources and windowing.

Texts are tokenized with the subject model's tokenizer, joined by the end-of-text token into one stream,
and cut into consecutive windows of `seq_len` tokens. A window's `seq_id` is its position in that stream,
so the same corpus and settings give the same ids on every machine.

Sources are read as streams (text files in blocks, JSON lines one line at a time, Parquet in batches, Hugging
Face datasets streamed), and a long text is tokenized in pieces, so reading stops once `max_windows` windows
are cut, however large a file or a single record is. Only a text longer than PIECE_CHARS is cut, and a piece
ends only before a space that sits between two letters or digits: byte-level BPE pre-tokenizers (GPT-2,
Llama 3, SmolLM2) always start a new pre-token there, so the pieces tokenize to the same ids as the whole text.
A stretch of MAX_PIECE_CHARS characters with no such space (long unspaced CJK text, base64) is cut anyway;
there, and for other tokenizers, a cut may change the tokens at that one place.

A record that is not text (a JSON line that is not an object, a JSON text field that is null or not a string,
bytes that are not UTF-8) is a CorpusError naming the file and line; with `corpus.on_bad_record: skip` it is
dropped, and how many were dropped is logged as a warning. (A Parquet column is typed: one that does not hold
strings is an error, and a null cell is a row without text, skipped like an empty one.)
"""
from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas.config import Corpus
from schemas.tables import SEQUENCES

log = logging.getLogger(__name__)

READ_BYTES = 1 << 18        # a text file is read at most this many bytes at a time
PIECE_CHARS = 1 << 16       # a text longer than this is tokenized in pieces of about this many characters
MAX_PIECE_CHARS = 4 * PIECE_CHARS
TEXT_SUFFIXES = (".txt", ".md", ".text")


class CorpusError(ValueError):
    pass


@dataclass
class Window:
    seq_id: int
    token_ids: list[int]


def pydoc_texts() -> list[str]:
    """The standard library's help topics: ~65k words of real English, present in every Python install."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def detect_format(source: str) -> str:
    if source == "pydoc":
        return "pydoc"
    if source.startswith("hf:"):
        return "hf"
    p = Path(source)
    if p.is_dir():
        return "text"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


class BadRecords:
    """`corpus.on_bad_record`: 'error' raises a CorpusError with the message, 'skip' counts the record."""

    def __init__(self, mode: str = "error"):
        self.mode = mode
        self.count = 0
        self.first: str | None = None

    def __call__(self, message: str) -> None:
        if self.mode != "skip":
            raise CorpusError(f"{message} (corpus.on_bad_record: skip drops such records)")
        self.count += 1
        self.first = self.first or message

    def report(self, source: str) -> None:
        if self.count:
            log.warning("corpus.on_bad_record=skip: skipped %d bad record%s in %s (the first: %s)",
                        self.count, "" if self.count == 1 else "s", source, self.first)


def iter_documents(cfg: Corpus, bad: BadRecords | None = None) -> Iterator[Iterator[str]]:
    """Each document of the corpus as an iterator over its text in parts (read lazily; consume a document's
    parts before asking for the next document). Bad records go to `bad` (default: `cfg.on_bad_record`)."""
    bad = bad or BadRecords(cfg.on_bad_record)
    try:
        yield from _documents(cfg, bad)
    finally:
        bad.report(cfg.source)


def iter_texts(cfg: Corpus) -> Iterator[str]:
    """Each document's whole text (`iter_windows` reads documents in parts instead)."""
    for parts in iter_documents(cfg):
        yield "".join(parts)


def _documents(cfg: Corpus, bad: BadRecords) -> Iterator[Iterator[str]]:
    fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.source)
    if fmt == "pydoc":
        yield from (iter([t]) for t in pydoc_texts())
        return
    if fmt == "hf":
        yield from (iter([t]) for t in _hf_texts(cfg, bad))
        return
    path = Path(cfg.source)
    if not path.exists():
        raise CorpusError(f"corpus.source: {cfg.source} does not exist")
    if fmt == "text":
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) \
            if path.is_dir() else [path]
        if not files:
            raise CorpusError(f"corpus.source: folder {cfg.source} holds no .txt/.md files")
        for f in files:
            yield _text_file(f, bad)
    elif fmt == "jsonl":
        yield from (iter([t]) for t in _jsonl_texts(path, cfg.text_field, bad))
    elif fmt == "parquet":
        yield from (iter([t]) for t in _parquet_texts(path, cfg.text_field))
    else:
        raise CorpusError(f"corpus.format: '{fmt}' is not supported")


def _open_binary(f: Path):
    try:
        return open(f, "rb")
    except OSError as e:
        raise CorpusError(f"corpus.source: cannot read {f}: {e.strerror}") from None


def _text_file(f: Path, bad: BadRecords) -> Iterator[str]:
    """A text file's text in blocks of at most READ_BYTES, decoded as UTF-8 with universal newlines (as
    `Path.read_text` reads it). Here a record is a line: skipping a line that is not UTF-8 drops it, or, for a
    line longer than one block, the rest of it from the block with the bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lineno, skipping = 1, False
    with _open_binary(f) as fh:
        while block := fh.readline(READ_BYTES):
            if block.endswith(b"\r") and fh.peek(1)[:1] == b"\n":
                block += fh.read(1)  # keep a \r\n that the block limit split together
            ends_line = block.endswith(b"\n")
            if not skipping:
                try:
                    text = decoder.decode(block, final=ends_line)
                except UnicodeDecodeError as e:
                    decoder.reset()
                    bad(f"corpus.source: {f}:{lineno} is not UTF-8 text (byte 0x{e.object[e.start]:02x})")
                    skipping = True
                else:
                    if text:
                        yield text.replace("\r\n", "\n").replace("\r", "\n")
            if ends_line:
                lineno, skipping = lineno + 1, False
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            bad(f"corpus.source: {f}:{lineno} is not UTF-8 text (it ends inside a character)")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _jsonl_texts(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
    """The `field` of each line's object. A line is read whole (a JSON record cannot be parsed in parts)."""
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"corpus.source: {where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"corpus.source: {where} is not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                bad(f"corpus.source: {where} is {_kind(obj)}, not an object with a '{field}' field")
                continue
            if field not in obj:
                bad(f"corpus.text_field: '{field}' missing in {where} (fields there: {', '.join(obj) or 'none'})")
                continue
            text = obj[field]
            if not isinstance(text, str):
                bad(f"corpus.text_field: '{field}' in {where} is {_kind(text)}, not a string")
                continue
            yield text


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise CorpusError(f"corpus.source: cannot read {path} as Parquet ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise CorpusError(f"corpus.text_field: column '{field}' not in {path} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"corpus.text_field: column '{field}' of {path} holds {kind}, not strings")
    for batch in pf.iter_batches(columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if t)  # a null cell is a row without text


def _hf_texts(cfg: Corpus, bad: BadRecords) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("corpus.source: hf: datasets need the `datasets` package (pip install datasets)") from None
    name = cfg.source.removeprefix("hf:")
    try:
        data = datasets.load_dataset(name, split=cfg.hf_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline / unknown dataset
        raise CorpusError(f"corpus.source: cannot load Hugging Face dataset '{name}': {e}") from None
    field = cfg.text_field
    for i, row in enumerate(data, 1):
        text = row.get(field)
        if field not in row:
            bad(f"corpus.text_field: '{field}' missing in {cfg.source} row {i} (fields there: {', '.join(row)})")
        elif not isinstance(text, str):
            bad(f"corpus.text_field: '{field}' in {cfg.source} row {i} is {_kind(text)}, not a string")
        else:
            yield text


# --- tokenizing in pieces -----------------------------------------------------------------------------------
def _safe_space(text: str, lo: int, hi: int, *, last: bool) -> int | None:
    """The last (or first) index in [lo, hi) of a space between two letters or digits, or None."""
    while lo < hi:
        i = text.rfind(" ", lo, hi) if last else text.find(" ", lo, hi)
        if i < 0:
            return None
        if i > 0 and i + 1 < len(text) and text[i - 1].isalnum() and text[i + 1].isalnum():
            return i
        if last:
            hi = i
        else:
            lo = i + 1
    return None


def _cut(text: str, pos: int) -> int | None:
    """Where the piece of `text` that starts at `pos` ends: before the last safe space within PIECE_CHARS,
    else before the first one after, else at MAX_PIECE_CHARS. None: wait for more text."""
    i = _safe_space(text, pos + 1, pos + PIECE_CHARS, last=True)
    if i is None:
        i = _safe_space(text, pos + PIECE_CHARS, min(len(text), pos + MAX_PIECE_CHARS), last=False)
    if i is None and len(text) - pos > MAX_PIECE_CHARS:
        i = pos + MAX_PIECE_CHARS
    return i


def text_pieces(parts: Iterable[str]) -> Iterator[str]:
    """The text of `parts` again, cut into pieces of about PIECE_CHARS that tokenize like the whole (see the
    module docstring). A piece that is only whitespace is the whole text."""
    text, pos = "", 0
    for part in parts:
        text, pos = text[pos:] + part, 0
        while len(text) - pos > PIECE_CHARS and (cut := _cut(text, pos)) is not None:
            yield text[pos:cut]
            pos = cut
    if pos < len(text):
        yield text[pos:]


def iter_windows(cfg: Corpus, tokenizer, *, start: int = 0) -> Iterator[Window]:
    """Windows of `cfg.seq_len` tokens, from seq_id `start` on, at most `cfg.max_windows` in all. Reading
    and tokenizing stop as soon as the last window is cut."""
    sep = tokenizer.eos_token_id
    seq_len, limit = cfg.seq_len, cfg.max_windows
    buf: list[int] = []
    seq_id = 0
    seen_text = False

    def full_windows() -> list[list[int]]:
        n = len(buf) // seq_len
        out = [buf[k * seq_len:(k + 1) * seq_len] for k in range(n)]
        del buf[:n * seq_len]
        return out

    for parts in iter_documents(cfg):
        in_text = False
        for piece in text_pieces(parts):
            if not in_text and not piece.strip():
                continue  # a text of whitespace only (no other piece can be whitespace only)
            in_text = seen_text = True
            buf.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            for ids in full_windows():
                if seq_id >= start:
                    yield Window(seq_id, ids)
                seq_id += 1
                if limit is not None and seq_id >= limit:
                    return
        if in_text and sep is not None:
            buf.append(sep)
            for ids in full_windows():
                if seq_id >= start:
                    yield Window(seq_id, ids)
                seq_id += 1
                if limit is not None and seq_id >= limit:
                    return
    if not seen_text:
        raise CorpusError(f"corpus.source: {cfg.source} is empty (no text found)")
    if seq_id == 0:
        raise CorpusError(
            f"corpus.source: {cfg.source} is shorter than one window of corpus.seq_len={cfg.seq_len} tokens")


# --- token strings ------------------------------------------------------------------------------------------
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's tokens for single raw bytes


def _byte_level_alphabet(tokenizer) -> dict[str, int] | None:
    """Byte-level BPE's map from vocabulary characters back to bytes, or None for other tokenizers."""
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):  # a slow (Python) GPT-2 tokenizer
        return tokenizer.byte_decoder
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError):
        return None
    if "ByteLevel" not in {state.get("type")} | {d.get("type") for d in state.get("decoders") or []}:
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


class TokenDecoder:
    """The string of each token of a window: the text its bytes add. A character whose bytes are split over
    several tokens (byte-level BPE splits most non-ASCII characters) goes whole to the token that completes
    it, and the tokens before it get "", so joining a window's strings gives exactly the decoded window and
    no string holds a '\ufffd' for half a character. Each id's bytes are looked up once (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, bytes] = {}
        self._alphabet = _byte_level_alphabet(tokenizer)
        self._added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}

    def token_bytes(self, i: int) -> bytes:
        b = self.cache.get(i)
        if b is None:
            b = self.cache[i] = self._bytes_of(i)
        return b

    def _bytes_of(self, i: int) -> bytes:
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(i)
        if self._alphabet is not None and piece and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if piece and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m[1], 16)])
        return self.tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8")

    def __call__(self, ids: list[int]) -> list[str]:
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        out = [decode(self.token_bytes(i)) for i in ids]
        rest = decode(b"", True)
        if rest:  # the window ends inside a character: '\ufffd' in its last token, as a whole decode shows it
            out[-1] += rest
        return out


def sequences_table(windows: list[Window], decoder: TokenDecoder) -> pa.Table:
    return pa.Table.from_pydict({
        "seq_id": [w.seq_id for w in windows],
        "token_ids": [w.token_ids for w in windows],
        "tokens": [decoder(w.token_ids) for w in windows],
    }, schema=SEQUENCES)
