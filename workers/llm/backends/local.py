"""An in-process Hugging Face causal LM as explainer/simulator: the offline default, no server, no key.

- `chat`: the tokenizer's chat template (ChatML when it has none) + `generate`, with top logprobs per token.
- `prompt_logprobs`: exact next-token distributions at chosen character offsets of a prompt, from one forward
  pass. Offsets map to tokens through the tokenizer's offset mapping; an offset inside a token is an error.
- Concurrent `prompt_logprobs` calls that arrive together are gathered (an asyncio queue) into one padded
  forward, and the key/value cache of the prompt prefix they share with each other or with recent prompts
  (the simulator's fixed instructions and few-shot examples) is computed once and reused: only the suffixes
  run through the model.
Torch runs in a worker thread, one forward at a time, so the event loop stays free.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

import torch

from workers.llm.backends.base import (Capabilities, ChatResponse, PermanentLLMError, PromptLogprobsResponse,
                                   TokenAlternatives, Usage)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class _Pending:
    ids: list[int]
    positions: list[int]  # logit row per requested offset (the row that predicts the token at that offset)
    top_k: int
    future: asyncio.Future


@dataclass
class _Prefix:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1
    last_logits: torch.Tensor  # logits at the prefix's last position


@dataclass
class LocalStats:
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def token_positions(offset_mapping: list[tuple[int, int]], prompt_len: int, offsets: list[int],
                    tokens: list[str]) -> list[int]:
    """For each character offset, the logit row that predicts the token starting there.

    Token i covers [end of token i-1, end of token i): byte-level tokenizers trim the leading space out of
    their offsets, but the space belongs to the token. The offset == len(prompt) asks for the prediction
    after the whole prompt (the last row)."""
    starts: dict[int, int] = {}
    spans = []
    prev_end = 0
    for i, (s, e) in enumerate(offset_mapping):
        if e <= s and e <= prev_end:  # special tokens (BOS) have empty spans
            continue
        start = min(s, prev_end)
        starts.setdefault(start, i)
        spans.append((start, e, i))
        prev_end = e
    rows = []
    for off in offsets:
        if off == prompt_len:
            rows.append(len(offset_mapping) - 1)
            continue
        if off < 0 or off > prompt_len:
            raise PermanentLLMError(f"offset {off} is outside the prompt (0..{prompt_len})")
        i = starts.get(off)
        if i is None:
            inside = next(((s, e, j) for s, e, j in spans if s < off < e), None)
            where = f" falls inside the token {tokens[inside[2]]!r} at characters {inside[0]}-{inside[1]}" \
                if inside else " is not at a token start"
            raise PermanentLLMError(f"offset {off}{where}; prompt-logprob offsets must be token starts in this "
                                    f"model's tokenization")
        if i == 0:
            raise PermanentLLMError(f"offset {off} is the prompt's first token: nothing before it predicts it")
        rows.append(i - 1)
    return rows


class LocalBackend:
    provider = "local"

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, max_batch: int = 16,
                 batch_window_s: float = 0.003, prefix_cache_size: int = 4, min_prefix_tokens: int = 8):
        self.model = name
        self.lm = model.eval()
        self.tokenizer = tokenizer
        self.capabilities = Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True)
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.prefix_cache_size = prefix_cache_size
        self.min_prefix_tokens = min_prefix_tokens
        self.stats = LocalStats()
        self._device = next(model.parameters()).device
        self._torch_lock = threading.Lock()
        self._prefixes: collections.OrderedDict[tuple[int, ...], _Prefix] = collections.OrderedDict()
        self._recent: list[int] = []
        self._token_str: dict[int, str] = {}
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None

    @classmethod
    def from_name(cls, name: str, *, dtype: str = "auto", device: str = "auto", **kwargs) -> "LocalBackend":
        from workers.models.loading import load_subject

        lm = load_subject(name, dtype=dtype, device=device)
        return cls(lm.model, lm.tokenizer, name=name, **kwargs)

    def _str(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            s = self._token_str[token_id] = self.tokenizer.decode([token_id])
        return s

    def _top(self, logprobs: torch.Tensor, k: int) -> dict[str, float]:
        """The k likeliest tokens of one position's log-probabilities, by their text."""
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
        top: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            top.setdefault(self._str(i), v)  # two ids may decode alike (byte fragments): keep the likelier
        return top

    # --- chat -------------------------------------------------------------------------------------------------
    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse:
        template = None if getattr(self.tokenizer, "chat_template", None) else CHATML
        ids = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return await asyncio.to_thread(self._generate, list(ids), max_tokens, temperature, top_logprobs, seed)

    def _generate(self, ids: list[int], max_tokens: int, temperature: float, top_logprobs: int | None,
                  seed: int | None) -> ChatResponse:
        input_ids = torch.tensor([ids], device=self._device)
        sample = temperature > 0
        with self._torch_lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
                self.tokenizer.eos_token_id
            out = self.lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                                   do_sample=sample, temperature=temperature if sample else None, top_p=None,
                                   top_k=None, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
        new = out.sequences[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in new:
            new = new[:new.index(eos) + 1]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        logprobs = None
        if top_logprobs:
            logprobs = []
            for step, tok in enumerate(new):
                row = _log_softmax(out.logits[step][0])
                logprobs.append(TokenAlternatives(self._str(tok), float(row[tok]),
                                                  self._top(row, top_logprobs)))
        return ChatResponse(text=text, usage=Usage(len(ids), len(new)), logprobs=logprobs)

    # --- prompt logprobs --------------------------------------------------------------------------------------
    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int) -> PromptLogprobsResponse:
        enc = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if not ids:
            raise PermanentLLMError("empty prompt")
        rows = token_positions([tuple(o) for o in enc["offset_mapping"]], len(prompt), offsets,
                               [self._str(i) for i in ids])
        loop = asyncio.get_running_loop()
        if self._queue is None or self._batcher is None or self._batcher.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._batcher = loop.create_task(self._batch_loop(self._queue))
        future = loop.create_future()
        await self._queue.put(_Pending(ids, rows, top_k, future))
        positions = await future
        return PromptLogprobsResponse(positions=positions, usage=Usage(len(ids), 0))

    async def _batch_loop(self, queue: asyncio.Queue) -> None:
        """Gather requests arriving within `batch_window_s` of each other into one forward."""
        while True:
            batch = [await queue.get()]
            deadline = asyncio.get_running_loop().time() + self.batch_window_s
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            try:
                results = await asyncio.to_thread(self._forward_batch, [(p.ids, p.positions, p.top_k) for p in batch])
            except Exception as e:  # a failed forward fails its requests, not the batcher
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(PermanentLLMError(f"local forward failed: {type(e).__name__}: {e}"))
                continue
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(r)

    def _prefix_for(self, prefix: tuple[int, ...]) -> _Prefix:
        """The cached KV of `prefix`, computed (extending the longest cached prefix of it) when missing."""
        hit = self._prefixes.get(prefix)
        if hit is not None:
            self._prefixes.move_to_end(prefix)
            self.stats.prefix_hits += 1
            return hit
        base_key = max((k for k in self._prefixes if len(k) < len(prefix) and prefix[:len(k)] == k), key=len,
                       default=())
        past = self._cache_from(self._prefixes[base_key].kv, 1) if base_key else None
        rest = torch.tensor([prefix[len(base_key):]], device=self._device)
        out = self.lm(input_ids=rest, past_key_values=past, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        entry = _Prefix(kv, out.logits[0, -1].clone())
        self._prefixes[prefix] = entry
        while len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)
        return entry

    @staticmethod
    def _cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
        from transformers import DynamicCache

        # expand() shares memory; the cache's update() concatenates into new tensors, so the stored prefix
        # is never modified by the forward that uses it
        return DynamicCache([(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:])) for k, v in kv])

    def _forward_batch(self, items: list[tuple[list[int], list[int], int]]) -> list[list[dict[str, float]]]:
        with self._torch_lock, torch.inference_mode():
            self.stats.batch_sizes.append(len(items))
            seqs = [ids for ids, _, _ in items]
            shared = common_prefix_len(seqs + ([self._recent] if len(items) == 1 and self._recent else []))
            # the prefix may not swallow a requested row or leave a request without a suffix token
            cap = min(min(min(rows) + 1, len(ids) - 1) for ids, rows, _ in items)
            n_prefix = min(shared, cap)
            self._recent = seqs[-1]
            prefix = None
            if n_prefix >= self.min_prefix_tokens:
                prefix = self._prefix_for(tuple(seqs[0][:n_prefix]))
                self.stats.prefix_tokens_reused += n_prefix * len(items)
            else:
                n_prefix = 0
            suffixes = [ids[n_prefix:] for ids in seqs]
            width = max(len(s) for s in suffixes)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self._device)
            mask = torch.tensor([[1] * (n_prefix + len(s)) + [0] * (width - len(s)) for s in suffixes],
                                device=self._device)
            past = self._cache_from(prefix.kv, len(items)) if prefix else None
            logits = self.lm(input_ids=input_ids, attention_mask=mask, past_key_values=past,
                             use_cache=past is not None).logits
            results = []
            for b, (_, rows, top_k) in enumerate(items):
                results.append([self._top(_log_softmax(prefix.last_logits if row == n_prefix - 1
                                                       else logits[b, row - n_prefix]), top_k) for row in rows])
            return results

    async def aclose(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            self._batcher = None
