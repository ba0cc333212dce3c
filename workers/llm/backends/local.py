"""An in-process Hugging Face causal LM as explainer/simulator: the offline default, no server, no key.

The backend is a scheduler in front of one model. An in-process model has a queue and a service rate, not a
network timeout: requests wait their turn, and no more requests are in service at once than the model batches
(`max_batch`). A request's timeout applies to each piece of the model's work on it (a forward or a generation
step), stretched by four times what the model's measured speed predicts for that piece, never to its wait: a
slow machine is slow, never failing, and a hung forward is still caught (workers/llm/service.py says how the
client and the neuron deadline take part).

- `chat`: the tokenizer's chat template (ChatML when it has none), then generation with top logprobs per token.
  Chat requests are generated together (continuous batching, workers/llm/backends/decode.py): a request's
  prompt runs through the model on its own, from the cached key/values of the prompt prefix it shares with the
  others (the explainer's instructions and worked examples), and then joins the rows that decode one token per
  step together; a finished row leaves and a waiting request joins between steps. Greedy results equal
  unbatched greedy generation token for token; sampling draws from each request's own seeded generator.
- `prompt_logprobs`: exact next-token distributions at chosen character offsets of a prompt, from one forward
  pass. Offsets map to tokens through the tokenizer's offset mapping; an offset inside a token is an error.
  Requests that wait together are gathered into one padded forward (at most `max_batch` requests and
  `max_batch_tokens` prompt tokens), and the key/value cache of the prompt prefix they share with each other
  or with recent prompts (the simulator's fixed instructions and few-shot examples) is computed once and
  reused: only the suffixes run through the model.
- `prompt_logprobs(..., branch=t)` also gives, at every offset, the distribution after the prompt's tokens up
  to it followed by the one token `t` (the simulator's P("0" | ..."1"), docs/method.md §5), in the same
  forward: one extra copy of `t` per offset is appended to the batch row, and a 4-D attention mask lets each
  copy see only the prompt up to its offset, at the position right after it (`_branched_forward`).

One engine task per event loop runs the model, one unit of work at a time, in a worker thread (the event
loop stays free): a generation step (or the prompts of requests joining the generation), or a forward of
prompt-logprob requests. When both kinds wait, each gets about half of the model's time.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from schemas.failures import FailureReason
from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    PermanentLLMError,
    PromptLogprobsResponse,
    TokenAlternatives,
    TransientLLMError,
    Usage,
)
from workers.llm.backends.decode import DecodeBatch
from workers.llm.service import CURRENT_CLOCK, REQUEST_TIMEOUT_S, NeuronClock

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(eq=False, kw_only=True)
class _Request:
    """A call waiting for the model or being served by it."""
    future: asyncio.Future
    timeout_s: float | None  # for the model's work on it (REQUEST_TIMEOUT_S), not its wait
    clock: NeuronClock | None  # its neuron's clock (CURRENT_CLOCK), told when it is queued / in service / done
    state: str = "queued"  # queued -> serving -> done
    served_s: float = 0.0  # seconds of model work that included it (for the record: no timeout sums these)
    model_s: float = 0.0  # its share of that work (a unit's time split evenly among its requests)


@dataclass(eq=False, kw_only=True)
class _Pending(_Request):
    """A prompt-logprobs request."""
    ids: list[int]
    positions: list[int]  # logit row per requested offset (the row that predicts the token at that offset)
    top_k: int
    branch_id: int | None = None  # the token whose continuation is asked at every position (`branch`)


@dataclass(eq=False, kw_only=True)
class _Chat(_Request):
    """A chat request; while it generates it is a row of the generation batch."""
    ids: list[int]
    max_tokens: int
    temperature: float
    top_logprobs: int | None
    generator: torch.Generator | None
    new: list[int] = field(default_factory=list)  # generated token ids
    logprobs: list[TokenAlternatives] = field(default_factory=list)
    finished: bool = False


@dataclass
class _Prefix:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1
    last_logits: torch.Tensor  # logits at the prefix's last position


@dataclass
class _Unit:
    """The piece of work the model is doing now."""
    requests: list[_Request]
    started: float
    slack_s: float  # what it may take beyond its requests' timeouts, from its size and the measured speed
    handle: asyncio.TimerHandle | None = None


@dataclass
class LocalStats:
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # requests per prompt-logprobs forward
    model_tokens: int = 0  # token positions run through the model (after prefix reuse), all work
    busy_s: float = 0.0  # seconds the model was working
    forward_tokens: int = 0  # of model_tokens: prompt tokens (prompt-logprobs forwards, chat prompts)
    forward_s: float = 0.0  # of busy_s: the time of those
    steps: int = 0  # generation steps
    step_s: float = 0.0  # and their time
    step_rows: int = 0  # rows summed over steps (rows / steps = mean generation batch)
    requests: int = 0  # requests answered
    chats: int = 0  # of those: chat requests, and their share of the model's time
    chat_s: float = 0.0
    logprob_calls: int = 0  # prompt-logprobs requests, and their share
    logprob_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Prompt tokens per second of model time (the measured service rate of prompt work)."""
        return self.forward_tokens / self.forward_s if self.forward_s > 0 else 0.0

    def snapshot(self) -> dict:
        return {"model_tokens": self.model_tokens, "busy_s": self.busy_s, "forward_tokens": self.forward_tokens,
                "forward_s": self.forward_s, "steps": self.steps, "step_rows": self.step_rows,
                "requests": self.requests, "prefix_tokens_reused": self.prefix_tokens_reused,
                "chats": self.chats, "chat_s": self.chat_s, "logprob_calls": self.logprob_calls,
                "logprob_s": self.logprob_s}


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
        token = starts.get(off)
        if token is None:
            inside = next(((s, e, j) for s, e, j in spans if s < off < e), None)
            where = f" falls inside the token {tokens[inside[2]]!r} at characters {inside[0]}-{inside[1]}" \
                if inside else " is not at a token start"
            raise PermanentLLMError(f"offset {off}{where}; prompt-logprob offsets must be token starts in this "
                                    f"model's tokenization")
        if token == 0:
            raise PermanentLLMError(f"offset {off} is the prompt's first token: nothing before it predicts it")
        rows.append(token - 1)
    return rows



class LocalBackend:
    provider = "local"
    queues_requests = True  # it times the model's work on a request itself (workers/llm/service.py)

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, max_batch: int = 16,
                 max_batch_tokens: int = 4096, kv_budget_mb: float = 1024.0, batch_window_s: float = 0.003,
                 prefix_cache_size: int = 4, min_prefix_tokens: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.model = name
        self.lm = model.eval()
        self.tokenizer = tokenizer
        self.capabilities = Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True, prompt_branches=True)
        self.max_batch = max_batch  # requests in service at once: generation rows plus one forward's requests
        self.max_batch_tokens = max_batch_tokens  # prompt tokens per prompt-logprobs forward (one request may exceed)
        self.batch_window_s = batch_window_s
        self.prefix_cache_size = prefix_cache_size
        self.min_prefix_tokens = min_prefix_tokens
        self.stats = LocalStats()
        self._device = next(model.parameters()).device
        config: Any = model.config
        self._n_layers = int(config.num_hidden_layers)
        # generation rows hold their keys/values in one buffer: admit rows while it stays within the budget
        self._kv_budget_tokens = int(kv_budget_mb * 2**20 / _kv_bytes_per_token(model))
        self._stop_ids = _stop_ids(model, tokenizer)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._torch_lock = threading.Lock()
        self._prefixes: collections.OrderedDict[tuple[int, ...], _Prefix] = collections.OrderedDict()
        self._recent: list[int] = []
        self._recent_chat: list[int] = []
        self._token_str: dict[int, str] = {}
        self._engine: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._waiting: list[_Request] = []
        self._batch = DecodeBatch(self._n_layers)
        self._unit: _Unit | None = None
        self._share = {"generate": 0.0, "forward": 0.0}

    @classmethod
    def from_name(cls, name: str, *, dtype: str = "auto", device: str = "auto", threads: int = 0,
                  **kwargs) -> LocalBackend:
        """The model `name`, loaded in this process, using `threads` CPU threads (0: every core this process
        may run on: a Ray actor starts with OMP_NUM_THREADS=1, its CPU reservation, which would leave the other
        cores of a laptop idle while the sweep's one model works)."""
        from workers.models.loading import load_subject

        use_threads(threads)
        lm = load_subject(name, dtype=dtype, device=device)
        return cls(lm.model, lm.tokenizer, name=name, **kwargs)

    def load(self) -> dict:
        """What the scheduler holds now: requests waiting, and generation rows in service."""
        return {"waiting": len(self._waiting), "rows": len(self._batch.rows),
                "in_forward": len(self._unit.requests) if self._unit else 0}

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
        generator = None
        if temperature > 0:  # each request samples from its own generator: its draw does not depend on its batch
            generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        request = self._request(_Chat, ids=list(ids), max_tokens=max_tokens, temperature=temperature,
                                top_logprobs=top_logprobs, generator=generator)
        await self._submit(request)
        text = self.tokenizer.decode(request.new, skip_special_tokens=True)
        return ChatResponse(text=text, usage=Usage(len(request.ids), len(request.new)),
                            logprobs=request.logprobs if top_logprobs else None)

    # --- prompt logprobs --------------------------------------------------------------------------------------
    async def tokenize(self, text: str) -> list[str]:
        """The strings of the tokens this model reads `text` as (no special tokens)."""
        return [self._str(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int,
                              branch: str | None = None) -> PromptLogprobsResponse:
        branch_id = None
        if branch is not None:
            branch_ids = self.tokenizer(branch, add_special_tokens=False)["input_ids"]
            if len(branch_ids) != 1:
                raise PermanentLLMError(f"branch {branch!r} is {len(branch_ids)} tokens of {self.model}; a branch "
                                        "must be one token")
            branch_id = branch_ids[0]
        enc = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if not ids:
            raise PermanentLLMError("empty prompt")
        rows = token_positions([tuple(o) for o in enc["offset_mapping"]], len(prompt), offsets,
                               [self._str(i) for i in ids])
        request = self._request(_Pending, ids=ids, positions=rows, top_k=top_k, branch_id=branch_id)
        positions, branches = await self._submit(request)
        return PromptLogprobsResponse(positions=positions, usage=Usage(len(ids) + len(branches or ()), 0),
                                      branches=branches)

    # --- the scheduler ----------------------------------------------------------------------------------------
    def _request(self, cls, **fields):
        return cls(future=asyncio.get_running_loop().create_future(), timeout_s=REQUEST_TIMEOUT_S.get(),
                   clock=CURRENT_CLOCK.get(), **fields)

    async def _submit(self, request: _Request):
        loop = asyncio.get_running_loop()
        if self._engine is None or self._engine.done() or self._engine.get_loop() is not loop:
            self._waiting, self._batch, self._unit = [], DecodeBatch(self._n_layers), None
            self._wake = asyncio.Event()
            self._engine = loop.create_task(self._run_engine())
        stuck = self._stuck_error()
        if stuck is not None:
            raise stuck
        if request.clock is not None:
            request.clock.move(queued=1)
        request.future.add_done_callback(lambda _f: self._settle(request))
        self._waiting.append(request)
        self._wake.set()
        return await request.future

    def _settle(self, request: _Request) -> None:
        """A request's future is done (answered, failed, timed out or cancelled): its neuron's clock hears it."""
        if request.clock is not None and request.state != "done":
            request.clock.move(queued=-1 if request.state == "queued" else 0,
                               serving=-1 if request.state == "serving" else 0)
        request.state = "done"

    def _start_service(self, request: _Request) -> None:
        if request.state == "queued" and not request.future.done():
            request.state = "serving"
            if request.clock is not None:
                request.clock.move(queued=-1, serving=1)

    def _pause_service(self, request: _Request) -> None:
        if request.state == "serving" and not request.future.done():
            request.state = "queued"
            if request.clock is not None:
                request.clock.move(queued=1, serving=-1)

    async def _run_engine(self) -> None:
        try:
            while True:
                self._waiting = [r for r in self._waiting if not r.future.done()]
                if not self._waiting and not self._batch.rows:
                    self._wake.clear()
                    await self._wake.wait()
                    if self.batch_window_s > 0:  # requests that arrive together are served together
                        await asyncio.sleep(self.batch_window_s)
                    continue
                if self._next_kind() == "generate":
                    await self._serve_generation()
                else:
                    await self._serve_forward()
        except asyncio.CancelledError:
            self._fail_all(PermanentLLMError(f"{self.model}: the local backend was closed"))
            raise
        except Exception as e:  # noqa: BLE001 - a scheduler bug fails the requests it holds, never hangs them
            self._fail_all(PermanentLLMError(f"{self.model}: local scheduler failed: {type(e).__name__}: {e}"))

    def _next_kind(self) -> str:
        """'generate' (a step, or prompts joining the generation) or 'forward' (prompt-logprobs requests)."""
        generate = bool(self._batch.rows) or bool(self._admissions())
        forward = len(self._batch.rows) < self.max_batch and any(isinstance(r, _Pending) for r in self._waiting)
        if generate and forward:  # both wait: the kind that has had less of the model's time goes
            return min(self._share, key=self._share.__getitem__)
        self._share = dict.fromkeys(self._share, 0.0)  # time alone earns no credit
        return "generate" if generate else "forward"

    def _admissions(self) -> list[_Chat]:
        """Waiting chat requests that may join the generation now, in arrival order: at most `max_batch` rows,
        and rows x columns (prompt + max_tokens) within the key/value budget (one row always fits)."""
        rows = self._batch.rows
        columns = max((len(r.ids) + r.max_tokens for r in rows), default=0)
        out: list[_Chat] = []
        for r in self._waiting:
            if not isinstance(r, _Chat) or r.future.done():
                continue
            n, need = len(rows) + len(out) + 1, max(columns, len(r.ids) + r.max_tokens)
            if n > self.max_batch or (n > 1 and n * need > self._kv_budget_tokens):
                break
            out.append(r)
            columns = need
        return out

    async def _serve_generation(self) -> None:
        gone = {id(r) for r in self._batch.rows if r.future.done()}  # timed out or cancelled: leave the batch
        admissible = self._admissions()
        if admissible:  # one joining prompt per unit: the rows already generating wait one prompt at a time
            joining = admissible[0]
            self._waiting.remove(joining)
            others = [r.ids for r in admissible[1:]]
            served, work, tokens = [joining], (lambda: self._join(joining, others, gone)), len(joining.ids)
        else:
            served = [r for r in self._batch.rows if id(r) not in gone]
            if not served:
                self._batch.remove(gone)  # nothing left to compute: no copies
                return
            served, work, tokens = served, (lambda: self._step(gone)), len(served)
        try:
            finished = await self._serve(served, work, "generate", tokens=tokens, prompt_work=bool(admissible))
        except Exception as e:  # noqa: BLE001 - a failed step fails its rows, not the scheduler
            err = PermanentLLMError(f"{self.model}: local generation failed: {type(e).__name__}: {e}")
            for r in set(served) | set(self._batch.rows):
                if not r.future.done():
                    r.future.set_exception(err)
            self._batch = DecodeBatch(self._n_layers)  # its buffer may be half written
            return
        for r in finished:
            if not r.future.done():
                self.stats.requests += 1
                self.stats.chats += 1
                self.stats.chat_s += r.model_s
                r.future.set_result(None)

    async def _serve_forward(self) -> None:
        room = self.max_batch - len(self._batch.rows)
        batch: list[_Pending] = []
        tokens = 0
        for r in self._waiting:
            if not isinstance(r, _Pending) or r.future.done():
                continue
            # what it adds to the forward: the tokens after the prefix it shares with the first request
            cost = len(r.ids) - (common_prefix_len([batch[0].ids, r.ids]) if batch else 0)
            if batch and (len(batch) >= room or tokens + cost > self.max_batch_tokens):
                break
            batch.append(r)
            tokens += cost
        for r in batch:
            self._waiting.remove(r)
        items = [(r.ids, r.positions, r.top_k, r.branch_id) for r in batch]
        try:
            results = await self._serve(batch, lambda: self._forward_batch(items), "forward",
                                        tokens=sum(len(r.ids) for r in batch), prompt_work=True)
        except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the scheduler
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(PermanentLLMError(f"local forward failed: {type(e).__name__}: {e}"))
            return
        for r, result in zip(batch, results):
            if not r.future.done():
                self.stats.requests += 1
                self.stats.logprob_calls += 1
                self.stats.logprob_s += r.model_s
                r.future.set_result(result)

    async def _serve(self, requests: list, work, kind: str, *, tokens: int, prompt_work: bool):
        """Run one unit of model work (`tokens` positions at most) in the worker thread, under a watchdog."""
        loop = asyncio.get_running_loop()
        for r in requests:
            self._start_service(r)
        unit = self._unit = _Unit(requests, loop.time(), self._slack_s(tokens, prompt_work))
        self._arm(unit)
        try:
            return await asyncio.to_thread(work)
        finally:
            if unit.handle is not None:
                unit.handle.cancel()
            self._unit = None
            elapsed = loop.time() - unit.started
            for r in requests:
                r.served_s += elapsed
                r.model_s += elapsed / len(requests)
                self._pause_service(r)  # a generating row waits for its next step like a queued request
            self._share[kind] += elapsed
            self.stats.busy_s += elapsed
            if prompt_work:
                self.stats.forward_s += elapsed
            else:
                self.stats.step_s += elapsed

    def _slack_s(self, tokens: int, prompt_work: bool) -> float:
        """What a unit may take beyond a request's `timeout_s`: four times what the model's measured speed
        predicts for it (a slow machine is slow, not hung). Prompt work: `tokens` at the measured prompt rate
        (10 tokens/s before any measurement); a generation step: the mean step so far (before any, a step
        counts as 64 prompt tokens)."""
        rate = self.stats.tokens_per_s or 10.0
        if prompt_work:
            return 4.0 * tokens / rate
        return 4.0 * (self.stats.step_s / self.stats.steps if self.stats.steps else 64 / rate)

    def _limit_s(self, r: _Request, unit: _Unit) -> float | None:
        return None if r.timeout_s is None else r.timeout_s + unit.slack_s

    def _arm(self, unit: _Unit) -> None:
        """Wake the watchdog when the next request of the unit runs out of time."""
        loop = asyncio.get_running_loop()
        ran = loop.time() - unit.started
        waits = [limit - ran for r in unit.requests
                 if not r.future.done() and (limit := self._limit_s(r, unit)) is not None]
        if waits:
            unit.handle = loop.call_later(max(0.001, min(waits)), self._watch, unit)

    def _watch(self, unit: _Unit) -> None:
        if self._unit is not unit:
            return
        ran = asyncio.get_running_loop().time() - unit.started
        for r in unit.requests:
            limit = self._limit_s(r, unit)
            if limit is not None and not r.future.done() and ran >= limit:
                r.future.set_exception(self._timeout(r, ran, limit))
        stuck = self._stuck_error()
        if stuck is not None:  # a hung forward: what waits behind it fails now, and new requests fail fast
            self._fail_all(stuck)
            return
        self._arm(unit)

    def _stuck_error(self) -> TransientLLMError | None:
        """The model counts as stuck once its current unit has run past the limits of all its requests."""
        unit = self._unit
        if unit is None:
            return None
        limits = [limit for r in unit.requests if (limit := self._limit_s(r, unit)) is not None]
        if not limits:
            return None
        ran = asyncio.get_running_loop().time() - unit.started
        if ran < max(limits):
            return None
        err = TransientLLMError(f"{self.model}: the local model has been on one forward for {ran:.1f}s, past its "
                                f"{max(limits):.1f}s limit; requests fail until it returns",
                                reason=FailureReason.TIMEOUT)
        err.kind = "timeout"
        return err

    def _timeout(self, r: _Request, ran: float, limit: float) -> TransientLLMError:
        err = TransientLLMError(f"{self.model}: one forward on this request ran {ran:.1f}s, past its {limit:.1f}s "
                                f"limit (timeout_s={r.timeout_s:g} plus four times what the model's measured speed "
                                f"predicts; time waiting for the model is not counted)", reason=FailureReason.TIMEOUT)
        err.kind = "timeout"
        return err

    def _fail_all(self, err: Exception) -> None:
        for r in [*self._waiting, *self._batch.rows]:
            if not r.future.done():
                r.future.set_exception(err)
        self._waiting = []

    # --- generation (runs in the worker thread) ---------------------------------------------------------------
    def _join(self, r: _Chat, others: list[list[int]], gone: set[int]) -> list[_Chat]:
        """Run a joining request's prompt and add it to the generation batch (`others`: the prompts about to
        join after it, which may share its prefix); returns it if it finished with its first token."""
        with self._torch_lock, torch.inference_mode():
            if gone:
                self._batch.remove(gone)
            kv, logits = self._prefill(r.ids, others)
            self._take(r, logits)
            if r.finished:
                return [r]
            self._batch.add(r, kv, room=r.max_tokens - len(r.new), joining=1 + len(others))
            return []

    def _step(self, gone: set[int]) -> list[_Chat]:
        """One token for every row; returns the rows that finished (they leave the batch)."""
        with self._torch_lock, torch.inference_mode():
            if gone:
                self._batch.remove(gone)
            rows = list(self._batch.rows)
            logits = self._batch.step(self.lm, [r.new[-1] for r in rows])
            self.stats.steps += 1
            self.stats.step_rows += len(rows)
            self.stats.model_tokens += len(rows)
            finished = []
            for r, row_logits in zip(rows, logits):
                self._take(r, row_logits)
                if r.finished:
                    finished.append(r)
            if finished:
                self._batch.remove({id(r) for r in finished})
            return finished

    def _prefill(self, ids: list[int], others: list[list[int]]) -> tuple[list, torch.Tensor]:
        """Keys/values (per layer, batch 1) and last logits of a prompt, from the longest prefix it shares with a
        cached prefix, a prompt joining after it, or the previous chat prompt."""
        candidates = [*self._prefixes, *others, self._recent_chat]
        shared = max((common_prefix_len([ids, list(c)]) for c in candidates if c), default=0)
        n = min(shared, len(ids) - 1)  # at least one token runs, for the last logits
        past = None
        if n >= self.min_prefix_tokens:
            past = self._cache_from(self._prefix_for(tuple(ids[:n])).kv, 1)
            self.stats.prefix_tokens_reused += n
        else:
            n = 0
        self._recent_chat = ids
        out = self.lm(input_ids=torch.tensor([ids[n:]], device=self._device), past_key_values=past, use_cache=True,
                      **({"logits_to_keep": 1} if self._keeps_logits else {}))
        self.stats.model_tokens += len(ids) - n
        self.stats.forward_tokens += len(ids) - n
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], out.logits[0, -1]

    def _take(self, r: _Chat, logits: torch.Tensor) -> None:
        """Choose a row's next token (greedy, or sampled from its generator) and record its logprobs."""
        row = logits.float()
        if r.temperature > 0:
            probs = torch.softmax(row / r.temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=r.generator))
        else:
            token = int(torch.argmax(row))
        r.new.append(token)
        if r.top_logprobs:
            logprobs = _log_softmax(row)
            r.logprobs.append(TokenAlternatives(self._str(token), float(logprobs[token]),
                                                self._top(logprobs, r.top_logprobs)))
        r.finished = token in self._stop_ids or len(r.new) >= r.max_tokens


    # --- prompt-logprobs forwards (run in the worker thread) -------------------------------------------------
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
        out = self.lm(input_ids=rest, past_key_values=past, use_cache=True,
                      **({"logits_to_keep": 1} if self._keeps_logits else {}))
        self.stats.model_tokens += rest.shape[1]
        self.stats.forward_tokens += rest.shape[1]
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

    def _forward_batch(self, items: list[tuple[list[int], list[int], int, int | None]]
                       ) -> list[tuple[list[dict[str, float]], list[dict[str, float] | None] | None]]:
        """(positions, branches) per item; branches is None for an item that asked for none."""
        with self._torch_lock, torch.inference_mode():
            self.stats.batch_sizes.append(len(items))
            seqs = [ids for ids, *_ in items]
            shared = common_prefix_len(seqs + ([self._recent] if len(items) == 1 and self._recent else []))
            # the prefix may not swallow a requested row or leave a request without a suffix token
            cap = min(min(min(rows) + 1, len(ids) - 1) for ids, rows, *_ in items)
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
            self.stats.model_tokens += sum(len(s) for s in suffixes)
            self.stats.forward_tokens += sum(len(s) for s in suffixes)
            branch_logits, column = None, None
            # logits only at the rows asked for (the union over the batch), not at every position: the LM head
            # over a large vocabulary is a fifth of a small model's work, and its output the biggest tensor of
            # the forward
            keep = sorted({row - n_prefix for _, rows, *_ in items for row in rows if row >= n_prefix})
            if any(branch is not None for *_, branch in items):
                logits, branch_logits, column = self._branched_forward(suffixes, n_prefix, past, items, pad, keep)
            else:
                kw = {}
                if keep and self._keeps_logits:
                    kw["logits_to_keep"] = torch.tensor(keep, device=self._device)
                    column = {c: i for i, c in enumerate(keep)}
                logits = self.lm(input_ids=input_ids, attention_mask=mask, past_key_values=past,
                                 use_cache=past is not None, **kw).logits
            results = []
            for b, (_, rows, top_k, branch) in enumerate(items):
                positions = [self._top(_log_softmax(
                    prefix.last_logits if prefix is not None and row == n_prefix - 1
                    else logits[b, column[row - n_prefix] if column else row - n_prefix]), top_k) for row in rows]
                branches = None
                if branch is not None and branch_logits is not None:  # where the branch token is in the top-k
                    shown = self._str(branch)
                    branches = [self._top(_log_softmax(branch_logits[b, j]), top_k) if shown in top else None
                                for j, top in enumerate(positions)]
                results.append((positions, branches))
            return results

    def _branched_forward(self, suffixes: list[list[int]], n_prefix: int, past, items: list, pad: int,
                          keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, int] | None]:
        """One forward of the suffixes plus, per item that asks, one copy of its branch token per requested row.

        A row of the batch is [suffix, padding to W][branch copies, padding to NB]. The 4-D mask lets suffix
        token i see the prefix and the suffix up to i (plain causal attention), and branch copy j see the prompt
        up to its row r_j and itself, at position r_j + 1: its logits are those of the prompt cut after row r_j
        with the branch token appended. Padding rows see the first key only (a softmax over nothing is NaN).
        Returns the suffix logits, the branch logits (B, NB, V), and where each suffix column `keep` asks for
        sits among the suffix logits (None: all W columns are there, for a model without `logits_to_keep`)."""
        width = max(len(s) for s in suffixes)
        rows_of = [rows if branch is not None else [] for _, rows, _, branch in items]
        n_branch = max(1, max(len(r) for r in rows_of))
        q = width + n_branch
        ids = torch.full((len(items), q), pad, dtype=torch.long)
        pos = torch.zeros((len(items), q), dtype=torch.long)
        allowed = torch.zeros((len(items), q, n_prefix + q), dtype=torch.bool)
        allowed[:, :, 0] = True
        for b, (suffix, rows, (*_, branch)) in enumerate(zip(suffixes, rows_of, items)):
            n = len(suffix)
            ids[b, :n] = torch.tensor(suffix)
            pos[b, :n] = torch.arange(n_prefix, n_prefix + n)
            allowed[b, :n, :n_prefix + n] = torch.ones(n, n_prefix + n, dtype=torch.bool).tril(n_prefix)
            for j, row in enumerate(rows):
                ids[b, width + j] = branch
                pos[b, width + j] = row + 1
                allowed[b, width + j, :row + 1] = True
                allowed[b, width + j, n_prefix + width + j] = True
        dtype = next(self.lm.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        kw = {}
        if self._keeps_logits:  # the LM head only where logits are read: the asked rows and the branch copies
            kw["logits_to_keep"] = torch.tensor(keep + list(range(width, q)), device=self._device)
        logits = self.lm(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                         position_ids=pos.to(self._device), past_key_values=past, use_cache=past is not None,
                         **kw).logits
        if self._keeps_logits:
            return logits[:, :len(keep)], logits[:, len(keep):], {c: i for i, c in enumerate(keep)}
        return logits[:, :width], logits[:, width:], None


    async def aclose(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
            self._engine = None


def use_threads(threads: int = 0) -> int:
    """Set torch's CPU threads for this process: `threads`, or every core it may run on; returns the number."""
    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token position takes over all layers."""
    c: Any = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * int(c.num_hidden_layers) * int(heads) * int(head_dim) * next(model.parameters()).element_size()


def _stop_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Tokens that end a generation: the model's generation config's end tokens and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
