"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, OpenRouter, `transformers serve`)
through the `openai` package's async client.

Chat completions (with logprobs/top_logprobs when asked) for explanations and generated-logprob simulation;
legacy completions with `echo=True, logprobs=k, max_tokens=0` for prompt log-probabilities (vLLM and llama.cpp
serve them). HTTP failures become the error classes of `base.py`; the client's own retries are off because
`LLMClient` retries with the shared rate limiter in the loop. The API key never leaves this object: it is not
in any message, repr or log line; nor do credentials inside `base_url` (only `endpoint`, the redacted URL).

An answer cut at `max_tokens` (`finish_reason: length`) is malformed, like an unparseable one. A 429's wait
(`Retry-After` and friends) is read against the server's own `Date` and capped at `retry_after_cap_s`.
"""
from __future__ import annotations

import asyncio
import contextvars
import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping

import openai

from schemas.config import Backend, ConfigError
from schemas.failures import FailureReason
from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    LLMBackend,
    LLMError,
    PermanentLLMError,
    PromptLogprobsResponse,
    RateLimitedError,
    TokenAlternatives,
    TransientLLMError,
    UnsupportedError,
    Usage,
)
from workers.llm.redact import redact_url, scrub, split_userinfo
from workers.llm.verdict import ACCEPTED, tell

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
REFUSED = (400, 404, 405, 422, 501)  # statuses that mean "this endpoint does not do that", not "try later"
CAP_WARNING_EVERY_S = 60.0

CONFIGURED = {
    "chat": Capabilities(chat=True),
    "chat_logprobs": Capabilities(chat=True, chat_logprobs=True),
    "completions_echo": Capabilities(chat=True, prompt_logprobs=True),
}
_PROBED: dict[tuple[str, str], Capabilities] = {}  # (endpoint, model) -> capabilities, probed once per process
# True while the capability probe runs (in this task and the tasks it starts): an answer without logprobs, or
# one cut at its one-token max_tokens, is then the endpoint's definite answer, not a malformed one
_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("neuronsweep_probing", default=False)
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def parse_duration(text: str) -> float | None:
    """'1s', '6m0s', '20ms', '1h2m3.5s', '0.5' -> seconds (the x-ratelimit-reset-* formats)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        return None
    h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def retry_after_from_headers(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from a 429's headers: retry-after-ms, retry-after (seconds or HTTP date), or the
    largest x-ratelimit-reset-requests/-tokens. None when the response says nothing. An HTTP date is read
    against the response's own `Date` header when it has one (both on the server's clock, so a local clock
    that is off does not stretch or cancel the wait), else against `now` (default: the local clock)."""
    h = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in h:
        value = h["retry-after"].strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            when = _http_date(value)
            if when is not None:
                sent = _http_date(h.get("date", ""))
                reference = sent if sent is not None else (now if now is not None else time.time())
                return max(0.0, when - reference)
    resets = [parse_duration(h[k]) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens") if k in h]
    known = [r for r in resets if r is not None]
    return max(known) if known else None


def _http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text.strip()).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class OpenAICompatBackend:
    provider = "openai"

    def __init__(self, cfg: Backend, *, env: Mapping[str, str], client: openai.AsyncOpenAI | None = None):
        self.model = cfg.model
        # passed to the openai client explicitly, so it never picks a server from the process environment
        self.base_url = cfg.base_url or DEFAULT_BASE_URL
        self.endpoint = redact_url(self.base_url)  # the only form of the URL that leaves this object
        self.timeout_s = cfg.timeout_s
        self.retry_after_cap_s = cfg.retry_after_cap_s
        self._cap_warned_at: float | None = None
        if cfg.api_key_env is None:
            self._api_key = "EMPTY"  # local servers (vLLM, llama.cpp, transformers serve) accept any key
        else:
            key = env.get(cfg.api_key_env)
            if not key:
                raise ConfigError(
                    f"backend '{cfg.model}' needs an API key: the environment variable {cfg.api_key_env} is not "
                    f"set (set it, or name another variable with api_key_env)")
            self._api_key = key
        self._configured = cfg.capabilities not in (None, "probe")
        self.capabilities = (CONFIGURED[cfg.capabilities] if cfg.capabilities not in (None, "probe")
                             else Capabilities(chat=True))
        self._client = client
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(model={self.model!r}, endpoint={self.endpoint!r})"

    def _api(self) -> openai.AsyncOpenAI:
        """One client per event loop (its connection pool belongs to the loop that first used it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or (self._client_loop is not None and self._client_loop is not loop):
            url, auth = split_userinfo(self.base_url)  # as Basic auth, as the URL would give it, but unlogged
            self._client = openai.AsyncOpenAI(api_key=self._api_key, base_url=url, max_retries=0,
                                              timeout=self.timeout_s,
                                              http_client=openai.DefaultAsyncHttpxClient(auth=auth) if auth else None)
            self._client_loop = loop
        return self._client

    # --- capabilities ---------------------------------------------------------------------------------------
    async def probe_capabilities(self, via: LLMBackend | None = None) -> Capabilities:
        """Configured, or found once per process with two tiny calls (chat with top_logprobs; echo).
        `via` sends the probe through a wrapper (the LLMClient), so it is journaled, rate limited and retried:
        a resumed sweep then answers the probe from the journal instead of paying for it again.

        Only a definite answer decides: an answer (one without logprobs, or that cannot serve the asked
        position, says no), or a refusal (HTTP 400, 404, 405, 422, 501). A failure that says nothing about the
        endpoint's abilities (5xx, 429, timeout, dropped connection, malformed answer, 401/403, a bug), once
        the wrapper's retries are spent, fails the probe with an LLMError and nothing is remembered: the next
        probe asks again, so the simulator mode never depends on a passing outage."""
        if self._configured:
            return self.capabilities
        key = (self.endpoint, self.model)
        if key not in _PROBED:
            target = via or self
            probing = _PROBING.set(True)
            try:
                chat_lp = await self._probe_one("chat with top_logprobs", target.chat(
                    [{"role": "user", "content": "Say hi."}], max_tokens=1, top_logprobs=2),
                    lambda r: bool(r.logprobs))
                prompt_lp = await self._probe_one("completions with echo and logprobs", target.prompt_logprobs(
                    "Hello world, hello", [5], top_k=2), lambda r: bool(r.positions and r.positions[0]))
            finally:
                _PROBING.reset(probing)
            _PROBED[key] = Capabilities(chat=True, chat_logprobs=chat_lp, prompt_logprobs=prompt_lp)
        self.capabilities = _PROBED[key]
        return self.capabilities

    async def _probe_one(self, what: str, call, able) -> bool:
        try:
            response = await call
        except PermanentLLMError as e:
            if isinstance(e, UnsupportedError) or e.status in REFUSED:
                return False  # refused: a definite no
            raise _probe_failed(e, self._probe_failure(what, e)) from None
        except LLMError as e:
            raise _probe_failed(e, self._probe_failure(what, e)) from None
        await tell(response, ACCEPTED)  # a definite answer, whatever it holds
        return able(response)

    def _probe_failure(self, what: str, e: LLMError) -> str:
        return (f"capability probe of {self.model} at {self.endpoint} failed ({what}): {e}; nothing was decided "
                f"and the next probe asks again (set the backend's `capabilities` to skip the probe)")

    # --- calls ----------------------------------------------------------------------------------------------
    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse:
        kwargs: dict = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                        "temperature": temperature}
        if top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=top_logprobs)
        if seed is not None:
            kwargs["seed"] = seed
        r = await self._call(self._api().chat.completions.create, kwargs)
        probing = _PROBING.get()
        try:
            choice = r.choices[0]
            text = choice.message.content
            if text is None:
                raise TypeError("no message content")
            logprobs = None
            if top_logprobs:
                content = choice.logprobs.content if choice.logprobs is not None else None
                if not content and not probing:
                    raise TransientLLMError("the response carries no logprobs although they were asked for",
                                            reason=FailureReason.MALFORMED)
                logprobs = [TokenAlternatives(c.token, float(c.logprob),
                                              {t.token: float(t.logprob) for t in (c.top_logprobs or [])})
                            for c in content] if content else None
            finish = getattr(choice, "finish_reason", None)
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            raise _malformed(e) from None
        if finish == "length" and not probing:
            raise _kind(TransientLLMError(f"{self.model}: the answer was cut at max_tokens={max_tokens} "
                                          f"(finish_reason 'length'); a truncated answer is malformed"), "malformed")
        return ChatResponse(text=text, usage=_usage(r, prompt_chars=sum(len(str(m.get("content", ""))) for m in
                                                                      messages), completion_chars=len(text)),
                            logprobs=logprobs)

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int) -> PromptLogprobsResponse:
        # max_tokens=0 gives the prompt alone; one generated token is needed to score the end of the prompt
        max_tokens = 1 if any(o == len(prompt) for o in offsets) else 0
        kwargs = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": top_k, "max_tokens": max_tokens,
                  "temperature": 0.0}
        try:
            r = await self._call(self._api().completions.create, kwargs)
        except PermanentLLMError as e:
            if e.status in REFUSED:
                raise UnsupportedError(f"{self.model} at {self.endpoint}: completions with echo+logprobs refused "
                                       f"(HTTP {e.status}); use a chat simulator mode", status=e.status) from None
            raise
        # while probing, an answer that cannot serve the asked positions is the endpoint's definite "no"
        unservable = PromptLogprobsResponse(positions=[], usage=_usage(r, prompt_chars=len(prompt),
                                                                       completion_chars=0))
        probing = _PROBING.get()
        try:
            lp = r.choices[0].logprobs
            if lp is None or lp.text_offset is None or lp.top_logprobs is None:
                if probing:
                    return unservable
                raise TransientLLMError("the response carries no logprobs although they were asked for",
                                        reason=FailureReason.MALFORMED)
            at = {off: i for i, off in reversed(list(enumerate(lp.text_offset)))}  # first token at each offset
            positions = []
            for off in offsets:
                i = at.get(off)
                if probing and (i is None or lp.top_logprobs[i] is None):
                    return unservable
                if i is None:
                    raise PermanentLLMError(f"offset {off} is not the start of a token in the endpoint's "
                                            f"tokenization of the prompt; choose offsets at token boundaries")
                top = lp.top_logprobs[i]
                if top is None:
                    raise PermanentLLMError(f"offset {off} is the first token of the prompt: nothing predicts it")
                positions.append({str(t): float(v) for t, v in dict(top).items()})
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            raise _malformed(e) from None
        return PromptLogprobsResponse(positions=positions, usage=_usage(r, prompt_chars=len(prompt),
                                                                        completion_chars=0))

    async def tokenize(self, text: str) -> list[str]:
        """The endpoint's tokens of `text`: an echo with no generated token (vLLM, llama.cpp). The simulator
        asks once, to learn whether this model writes "10" as one token (docs/method.md §5); UnsupportedError
        where echo is refused."""
        kwargs = {"model": self.model, "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0,
                  "temperature": 0.0}
        try:
            r = await self._call(self._api().completions.create, kwargs)
        except PermanentLLMError as e:
            if e.status in REFUSED:
                raise UnsupportedError(f"{self.model} at {self.endpoint}: completions with echo refused "
                                       f"(HTTP {e.status}); its tokenization is unknown", status=e.status) from None
            raise
        try:
            tokens = r.choices[0].logprobs.tokens
            if tokens is None:
                raise TypeError("no tokens")
            return [str(t) for t in tokens]
        except (AttributeError, IndexError, TypeError) as e:
            raise UnsupportedError(f"{self.model} at {self.endpoint}: an echo without tokens "
                                   f"({type(e).__name__}); its tokenization is unknown") from None

    async def _call(self, create, kwargs: dict):
        try:
            return await create(**kwargs)
        except openai.RateLimitError as e:
            raise RateLimitedError(f"{self.model}: rate limited (HTTP 429)",
                                   retry_after_s=self._retry_after(e.response.headers)) from None
        except openai.APITimeoutError:
            raise _kind(TransientLLMError(f"{self.model}: request timed out after {self.timeout_s:g}s"),
                        "timeout") from None
        except openai.APIConnectionError as e:
            raise _kind(TransientLLMError(f"{self.model}: connection failed ({type(e.__cause__ or e).__name__})"),
                        "connection") from None
        except openai.APIStatusError as e:
            status = e.status_code
            detail = self._scrub(_error_message(e))
            if (status >= 500 and status != 501) or status in (408, 409):
                err = TransientLLMError(f"{self.model}: HTTP {status} from the endpoint: {detail}", status=status)
                err.retry_after_s = self._retry_after(e.response.headers)
                raise err from None
            raise PermanentLLMError(f"{self.model}: HTTP {status} from the endpoint: {detail}",
                                    status=status) from None
        except openai.APIResponseValidationError as e:
            raise _malformed(e) from None
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            raise _malformed(e) from None

    def _retry_after(self, headers: Mapping[str, str]) -> float | None:
        """The wait a response asks for, at most `retry_after_cap_s`: one 429 asking for a day would otherwise
        pause the shared limiter, and so every caller, for that long."""
        asked = retry_after_from_headers(headers)
        if asked is None or asked <= self.retry_after_cap_s:
            return asked
        now = time.monotonic()
        if self._cap_warned_at is None or now - self._cap_warned_at >= CAP_WARNING_EVERY_S:
            self._cap_warned_at = now
            log.warning("%s at %s asked to wait %g s before retrying; waiting %g s instead "
                        "(retry_after_cap_s)", self.model, self.endpoint, asked, self.retry_after_cap_s)
        return self.retry_after_cap_s

    def _scrub(self, text: str) -> str:
        text = scrub(text, self.base_url)
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "EMPTY" else text

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:  # its event loop is gone already
                pass
            self._client = None


_KIND_REASONS = {"timeout": FailureReason.TIMEOUT, "connection": FailureReason.CONNECTION,
                 "malformed": FailureReason.MALFORMED}


def _kind(err: LLMError, kind: str) -> LLMError:
    err.kind = kind  # a finer status for metrics ("timeout", "connection", "malformed")
    err.reason = _KIND_REASONS.get(kind, err.reason)
    return err


def _probe_failed(e: LLMError, message: str) -> LLMError:
    """The probe's error: retryable like the failure behind it, with its status, reason and finer kind."""
    err = (TransientLLMError if e.retryable else PermanentLLMError)(message, status=e.status)
    for attr in ("kind", "reason", "retry_after_s"):
        value = getattr(e, attr, None)
        if value is not None:
            setattr(err, attr, value)
    return err


def _malformed(e: Exception) -> LLMError:
    return _kind(TransientLLMError(f"malformed or truncated response ({type(e).__name__})"), "malformed")


def _error_message(e: openai.APIStatusError) -> str:
    body = e.body  # the client hands over the `error` object, or the whole body when there is none
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(e.message)[:300]


def _usage(r, *, prompt_chars: int, completion_chars: int) -> Usage:
    """The endpoint's usage, or an estimate (~4 chars/token) when it reports none."""
    u = getattr(r, "usage", None)
    if u is not None and u.prompt_tokens is not None:
        return Usage(int(u.prompt_tokens), int(u.completion_tokens or 0))
    return Usage(max(1, prompt_chars // 4), completion_chars // 4)
