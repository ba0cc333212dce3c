"""prompt_logprob: one placeholder per token in a completion prompt; the backend returns the next-token
distribution at each placeholder (a local forward pass, or echo + logprobs); prediction = expected value.

Where the simulator's tokenizer writes "10" as "1" + "0", the distribution after each placeholder's "1" is
needed too: the backend computes it in the same call (`branch`), or the mode is refused (docs/method.md §5)."""
from __future__ import annotations

from typing import cast

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import BranchingBackend, Capabilities, LLMBackend, UnsupportedError, Usage
from workers.llm.verdict import judged
from workers.method.prompts import MalformedAnswerError, simulator_completion_prompt
from workers.method.scoring import expected_value
from workers.method.simulator.base import SimulatorMode
from workers.method.simulator.values import BRANCH, TEN_FROM_BRANCH, TEN_FROM_TOKEN, ValueReading


class PromptLogprob(SimulatorMode):
    name = "prompt_logprob"
    ten_from = TEN_FROM_TOKEN

    @staticmethod
    def supported(caps: Capabilities) -> bool:
        return caps.prompt_logprobs

    @classmethod
    def value_reading(cls, caps: Capabilities, cfg: SimulatorConfig, digits_split: bool | None) -> ValueReading:
        if digits_split and not caps.prompt_branches:
            raise UnsupportedError(
                'simulator.mode=prompt_logprob: this simulator\'s tokenizer writes "10" as "1" + "0", so the '
                'value 10 needs P("0" after "1") at every placeholder, which this backend cannot compute '
                "(no prompt branches; an echo endpoint gives only the prompt's own positions); with the "
                'first token alone every 10 would be read as 1. Use the local backend, a model whose '
                "tokenizer keeps \"10\" whole, or simulator.mode: generated_logprob / logprob_free")
        branch = caps.prompt_branches and digits_split is not False  # unknown: ask, it is right either way
        return ValueReading(TEN_FROM_BRANCH if branch else TEN_FROM_TOKEN, digits_split, cfg.spaced_digits)

    async def predict(self, backend: LLMBackend, cfg: SimulatorConfig, explanation: str,
                      token_lists: list[list[str]], *, attempt: int, spent: list[Usage]) -> list[list[float]]:
        prompt, offsets = simulator_completion_prompt(explanation, token_lists)
        if self.reading.branch:
            # `reading.branch` is set only for a backend with Capabilities.prompt_branches
            branching = cast(BranchingBackend, backend)
            resp = await branching.prompt_logprobs(prompt, offsets, top_k=cfg.top_logprobs, branch=BRANCH)
        else:
            resp = await backend.prompt_logprobs(prompt, offsets, top_k=cfg.top_logprobs)
        spent.append(resp.usage)
        async with judged(resp):  # the journal keeps an answer only if it parses
            if len(resp.positions) != len(offsets):
                raise MalformedAnswerError(f"backend returned {len(resp.positions)} positions for {len(offsets)} "
                                           "placeholders")
            branches = resp.branches if self.reading.branch else [None] * len(offsets)
            if branches is None or len(branches) != len(offsets):
                raise MalformedAnswerError(f"backend returned {'no' if branches is None else len(branches)} branches "
                                           f"for {len(offsets)} placeholders")
            values = []
            for i, (top, after_one) in enumerate(zip(resp.positions, branches)):
                if self.reading.branch and after_one is None and BRANCH in top:
                    raise MalformedAnswerError(f'placeholder {i}: "{BRANCH}" is in the top-k but the backend gave '
                                               "no distribution after it")
                values.append(expected_value(top, after_one, spaced=self.reading.spaced_digits))
            flat = iter(values)
            return [[next(flat) for _ in tokens] for tokens in token_lists]
