"""Any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, OpenRouter, `transformers serve`)
through the `openai` package's async client.

Chat completions (with logprobs/top_logprobs when asked) for explanations and generated-logprob simulation;
legacy completions with `echo=True, logprobs=k, max_tokens=0` for prompt log-probabilities (vLLM and llama.cpp
serve them). HTTP failures become the error classes of `base.py`; the client's own retries are off because
`LLMClient` retries with the shared rate limiter in the loop. The API key never leaves this object: it is not
in any message, repr or log line.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from typing import Mapping

import openai

from schemas.config import Backend, ConfigError
from workers.llm.backends.base import (Capabilities, ChatResponse, LLMBackend, LLMError, PermanentLLMError,
                                   PromptLogprobsResponse,
                                   RateLimitedError, TokenAlternatives, TransientLLMError, UnsupportedError, Usage)

CONFIGURED = {
    "chat": Capabilities(chat=True),
    "chat_logprobs": Capabilities(chat=True, chat_logprobs=True),
    "completions_echo": Capabilities(chat=True, prompt_logprobs=True),
}
_PROBED: dict[tuple[str, str], Capabilities] = {}  # (base_url, model) -> capabilities, probed once per process
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
    largest x-ratelimit-reset-requests/-tokens. None when the response says nothing."""
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
            try:
                when = email.utils.parsedate_to_datetime(value).timestamp()
                return max(0.0, when - (now if now is not None else time.time()))
            except (TypeError, ValueError):
                pass
    resets = [parse_duration(h[k]) for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens") if k in h]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


class OpenAICompatBackend:
    provider = "openai"

    def __init__(self, cfg: Backend, *, env: Mapping[str, str], client: openai.AsyncOpenAI | None = None):
        self.model = cfg.model
        self.base_url = cfg.base_url
        self.timeout_s = cfg.timeout_s
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
        self.capabilities = CONFIGURED[cfg.capabilities] if self._configured else Capabilities(chat=True)
        self._client = client
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(model={self.model!r}, base_url={self.base_url!r})"

    def _api(self) -> openai.AsyncOpenAI:
        """One client per event loop (its connection pool belongs to the loop that first used it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or (self._client_loop is not None and self._client_loop is not loop):
            self._client = openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                              timeout=self.timeout_s)
            self._client_loop = loop
        return self._client

    # --- capabilities ---------------------------------------------------------------------------------------
    async def probe_capabilities(self, via: LLMBackend | None = None) -> Capabilities:
        """Configured, or found once per process with two tiny calls (chat with top_logprobs; echo).
        `via` sends the probe through a wrapper (the LLMClient), so it is journaled and rate limited too:
        a resumed sweep then answers the probe from the journal instead of paying for it again."""
        if self._configured:
            return self.capabilities
        key = (str(self.base_url), self.model)
        if key not in _PROBED:
            chat_lp = prompt_lp = False
            try:
                r = await (via or self).chat([{"role": "user", "content": "Say hi."}], max_tokens=1, top_logprobs=2)
                chat_lp = bool(r.logprobs)
            except PermanentLLMError:
                pass
            except TransientLLMError:
                chat_lp = False
            try:
                r2 = await (via or self).prompt_logprobs("Hello world, hello", [5], top_k=2)
                prompt_lp = bool(r2.positions and r2.positions[0])
            except LLMError:
                pass
            _PROBED[key] = Capabilities(chat=True, chat_logprobs=chat_lp, prompt_logprobs=prompt_lp)
        self.capabilities = _PROBED[key]
        return self.capabilities

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
        try:
            choice = r.choices[0]
            text = choice.message.content
            if text is None:
                raise TypeError("no message content")
            logprobs = None
            if top_logprobs:
                content = choice.logprobs.content if choice.logprobs is not None else None
                if not content:
                    raise TransientLLMError("the response carries no logprobs although they were asked for")
                logprobs = [TokenAlternatives(c.token, float(c.logprob),
                                              {t.token: float(t.logprob) for t in (c.top_logprobs or [])})
                            for c in content]
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            raise _malformed(e) from None
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
            if e.status in (400, 404, 422):
                raise UnsupportedError(f"{self.model} at {self.base_url}: completions with echo+logprobs refused "
                                       f"(HTTP {e.status}); use a chat simulator mode", status=e.status) from None
            raise
        try:
            lp = r.choices[0].logprobs
            if lp is None or lp.text_offset is None or lp.top_logprobs is None:
                raise TransientLLMError("the response carries no logprobs although they were asked for")
            at = {off: i for i, off in reversed(list(enumerate(lp.text_offset)))}  # first token at each offset
            positions = []
            for off in offsets:
                i = at.get(off)
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

    async def _call(self, create, kwargs: dict):
        try:
            return await create(**kwargs)
        except openai.RateLimitError as e:
            raise RateLimitedError(f"{self.model}: rate limited (HTTP 429)",
                                   retry_after_s=retry_after_from_headers(e.response.headers)) from None
        except openai.APITimeoutError:
            raise _kind(TransientLLMError(f"{self.model}: request timed out after {self.timeout_s:g}s"),
                        "timeout") from None
        except openai.APIConnectionError as e:
            raise _kind(TransientLLMError(f"{self.model}: connection failed ({type(e.__cause__ or e).__name__})"),
                        "connection") from None
        except openai.APIStatusError as e:
            status = e.status_code
            detail = self._scrub(_error_message(e))
            if status >= 500 or status in (408, 409):
                err = TransientLLMError(f"{self.model}: HTTP {status} from the endpoint: {detail}", status=status)
                err.retry_after_s = retry_after_from_headers(e.response.headers)
                raise err from None
            raise PermanentLLMError(f"{self.model}: HTTP {status} from the endpoint: {detail}",
                                    status=status) from None
        except openai.APIResponseValidationError as e:
            raise _malformed(e) from None
        except (json.JSONDecodeError, ValueError, TypeError, KeyError) as e:
            raise _malformed(e) from None

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "EMPTY" else text

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:  # its event loop is gone already
                pass
            self._client = None


def _kind(err: LLMError, kind: str) -> LLMError:
    err.kind = kind  # a finer status for metrics ("timeout", "connection", "malformed")
    return err


def _malformed(e: Exception) -> TransientLLMError:
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
