"""How the simulator reads a predicted value from log-probabilities (docs/method.md §5), and the one fact about
the simulator's tokenizer that this needs: does it write "10" as one token, or as "1" + "0"?

Where "10" is two tokens, the token "1" starts both the value 1 and the value 10, so its probability must be
split with the distribution of the token after it (`workers.method.scoring.value_probabilities`). Each mode
says where it gets that distribution (`ValueReading.ten_from`), and the score row's settings record it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from workers.llm.backends.base import LLMBackend, LLMError, UnsupportedError

TEN_SAMPLE = "a\t10\n"  # a value line as the simulator's prompts and answers write it
BRANCH = "1"  # the token whose continuation tells 1 from 10

# how the probability of the value 10 is read
TEN_FROM_BRANCH = "branch"  # prompt_logprob: P("1") * P("0" | ..."1"), the backend computes the branch
TEN_FROM_TOKEN = "token"  # prompt_logprob: the tokenizer keeps "10" whole (or cannot tell), its one token
TEN_FROM_NEXT_TOKEN = "next_generated_token"  # generated_logprob: the alternatives of the token after a "1"
TEN_FROM_TEXT = "answer_text"  # logprob_free: the integer as written


def digits_split(tokens: list[str]) -> bool:
    """Whether a tokenization of TEN_SAMPLE writes "10" in more than one token (no token holds "10")."""
    return not any("10" in t for t in tokens)


_DETECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> digits split (True/False/None)


async def detect_digits_split(backend: LLMBackend, *, required: bool = True) -> bool | None:
    """How the backend's tokenizer writes "10" (True: "1" + "0"), from its `tokenize`; None when it has none
    or refuses (UnsupportedError). Asked once per backend object. Any other error propagates when the answer
    is `required` (prompt_logprob reads values by it); otherwise it gives None, unremembered, so a passing
    outage cannot fail a mode that only records the answer."""
    try:
        return _DETECTED[backend]
    except (KeyError, TypeError):
        pass
    tokenize = getattr(backend, "tokenize", None)
    result: bool | None = None
    if tokenize is not None:
        try:
            result = digits_split(list(await tokenize(TEN_SAMPLE)))
        except UnsupportedError:
            result = None
        except LLMError:
            if required:
                raise
            return None
    try:
        _DETECTED[backend] = result
    except TypeError:  # not weak-referenceable: ask again next time
        pass
    return result


@dataclass(frozen=True)
class ValueReading:
    """How one simulator reads values; stored in every score row's settings."""
    ten_from: str  # one of the TEN_FROM_* above
    digits_split: bool | None = None  # the tokenizer writes "10" as "1" + "0" (None: the backend cannot tell)
    spaced_digits: bool = False  # " 9" counts as 9 (simulator.spaced_digits); the contract says exact strings

    @property
    def branch(self) -> bool:
        return self.ten_from == TEN_FROM_BRANCH

    def settings(self) -> dict:
        return {"ten_from": self.ten_from, "digits_split": self.digits_split, "spaced_digits": self.spaced_digits}
