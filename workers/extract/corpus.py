"""Corpus sources and windowing.

Texts are tokenized with the subject model's tokenizer, joined by the end-of-text token into one stream,
and cut into consecutive windows of `seq_len` tokens. A window's `seq_id` is its position in that stream,
so the same corpus and settings give the same ids on every machine.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from schemas.config import Corpus
from schemas.tables import SEQUENCES


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


def iter_texts(cfg: Corpus) -> Iterator[str]:
    fmt = cfg.format if cfg.format != "auto" else detect_format(cfg.source)
    if fmt == "pydoc":
        yield from pydoc_texts()
        return
    if fmt == "hf":
        yield from _hf_texts(cfg)
        return
    path = Path(cfg.source)
    if not path.exists():
        raise CorpusError(f"corpus.source: {cfg.source} does not exist")
    if fmt == "text":
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".text")) \
            if path.is_dir() else [path]
        if not files:
            raise CorpusError(f"corpus.source: folder {cfg.source} holds no .txt/.md files")
        for f in files:
            yield _read_text(f)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"corpus.source: {path}:{lineno} is not valid JSON ({e.msg})") from None
                if cfg.text_field not in obj:
                    raise CorpusError(
                        f"corpus.text_field: '{cfg.text_field}' missing in {path}:{lineno} "
                        f"(fields there: {', '.join(obj)})")
                yield str(obj[cfg.text_field])
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise CorpusError(f"corpus.source: cannot read {path} as Parquet ({e})") from None
        if cfg.text_field not in pf.schema_arrow.names:
            raise CorpusError(f"corpus.text_field: column '{cfg.text_field}' not in {path} "
                              f"(columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[cfg.text_field]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise CorpusError(f"corpus.format: '{fmt}' is not supported")


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"corpus.source: {f} is not UTF-8 text") from None
    except OSError as e:
        raise CorpusError(f"corpus.source: cannot read {f}: {e.strerror}") from None


def _hf_texts(cfg: Corpus) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("corpus.source: hf: datasets need the `datasets` package (pip install datasets)") from None
    name = cfg.source.removeprefix("hf:")
    try:
        data = datasets.load_dataset(name, split=cfg.hf_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline / unknown dataset
        raise CorpusError(f"corpus.source: cannot load Hugging Face dataset '{name}': {e}") from None
    for row in data:
        yield str(row[cfg.text_field])


def iter_windows(cfg: Corpus, tokenizer, *, start: int = 0) -> Iterator[Window]:
    """Windows of `cfg.seq_len` tokens, from seq_id `start` on, at most `cfg.max_windows` in all."""
    sep = tokenizer.eos_token_id
    buf: list[int] = []
    seq_id = 0
    limit = cfg.max_windows
    seen_text = False
    for text in iter_texts(cfg):
        if not text.strip():
            continue
        seen_text = True
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buf.append(sep)
        while len(buf) >= cfg.seq_len:
            if limit is not None and seq_id >= limit:
                return
            if seq_id >= start:
                yield Window(seq_id, buf[:cfg.seq_len])
            del buf[:cfg.seq_len]
            seq_id += 1
    if not seen_text:
        raise CorpusError(f"corpus.source: {cfg.source} is empty (no text found)")
    if seq_id == 0:
        raise CorpusError(
            f"corpus.source: {cfg.source} is shorter than one window of corpus.seq_len={cfg.seq_len} tokens")


class TokenDecoder:
    """Decoded string of each token id, cached: one `decode` per distinct id, not per occurrence."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            s = self.cache.get(i)
            if s is None:
                s = self.cache[i] = self.tokenizer.decode([i])
            out.append(s)
        return out


def sequences_table(windows: list[Window], decoder: TokenDecoder) -> pa.Table:
    return pa.Table.from_pydict({
        "seq_id": [w.seq_id for w in windows],
        "token_ids": [w.token_ids for w in windows],
        "tokens": [decoder(w.token_ids) for w in windows],
    }, schema=SEQUENCES)
