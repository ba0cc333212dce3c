"""generated_logprob: a chat model echoes `token<TAB>value` lines with top_logprobs; prediction = expected
value over the numeric alternatives at each value token.

Where the model wrote a "1", the alternatives of the token it wrote next are P(next | ..."1"), so the value 10
of a tokenizer that writes it "1" + "0" is read exactly there. A "1" that is only an alternative (the model
wrote another digit) has no continuation to read and counts as 1 (docs/method.md §5)."""
from __future__ import annotations

import bisect

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import Capabilities, LLMBackend, TokenAlternatives, Usage
from workers.llm.verdict import judged
from workers.method.prompts import MalformedAnswerError, parse_simulator_answer
from workers.method.scoring import expected_value
from workers.method.simulator.base import SimulatorMode, ask_chat
from workers.method.simulator.values import BRANCH, TEN_FROM_NEXT_TOKEN


def _alternatives(tok: TokenAlternatives) -> dict[str, float]:
    return tok.top or {tok.token: tok.logprob}


def values_from_logprobs(text_tokens: list[TokenAlternatives], offsets: list[int], *,
                         spaced: bool = False) -> list[float]:
    """Expected value at each character offset of the answer, from the generated token that covers it (and,
    when that token is "1", the alternatives of the token generated after it)."""
    starts, pos = [], 0
    for tok in text_tokens:
        starts.append(pos)
        pos += len(tok.token)
    out = []
    for offset in offsets:
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or offset >= pos:
            raise MalformedAnswerError(f"no generated token covers answer offset {offset}")
        tok = text_tokens[i]
        after_one = _alternatives(text_tokens[i + 1]) if tok.token == BRANCH and i + 1 < len(text_tokens) else None
        out.append(expected_value(_alternatives(tok), after_one, spaced=spaced))
    return out


class GeneratedLogprob(SimulatorMode):
    name = "generated_logprob"
    ten_from = TEN_FROM_NEXT_TOKEN

    @staticmethod
    def supported(caps: Capabilities) -> bool:
        return caps.chat and caps.chat_logprobs

    async def predict(self, backend: LLMBackend, cfg: SimulatorConfig, explanation: str,
                      token_lists: list[list[str]], *, attempt: int, spent: list[Usage]) -> list[list[float]]:
        resp = await ask_chat(backend, cfg, explanation, token_lists, attempt=attempt, spent=spent, logprobs=True)
        async with judged(resp):  # the journal keeps an answer only if it parses
            if not resp.logprobs:
                raise MalformedAnswerError("the backend returned no logprobs in generated_logprob mode")
            text = "".join(t.token for t in resp.logprobs)  # offsets must index the tokens' own text
            parsed = parse_simulator_answer(text, token_lists)
            flat = iter(values_from_logprobs(resp.logprobs, [p.offset for rec in parsed for p in rec],
                                             spaced=self.reading.spaced_digits))
            return [[next(flat) for _ in rec] for rec in parsed]
