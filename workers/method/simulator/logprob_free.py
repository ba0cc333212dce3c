"""logprob_free: the chat format of generated_logprob, with the integers parsed from the answer text."""
from __future__ import annotations

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import Capabilities, LLMBackend, Usage
from workers.llm.verdict import judged
from workers.method.prompts import parse_simulator_answer
from workers.method.simulator.base import SimulatorMode, ask_chat


class LogprobFree(SimulatorMode):
    name = "logprob_free"
    uses_logprobs = False

    @staticmethod
    def supported(caps: Capabilities) -> bool:
        return caps.chat

    async def predict(self, backend: LLMBackend, cfg: SimulatorConfig, explanation: str,
                      token_lists: list[list[str]], *, attempt: int, spent: list[Usage]) -> list[list[float]]:
        resp = await ask_chat(backend, cfg, explanation, token_lists, attempt=attempt, spent=spent, logprobs=False)
        async with judged(resp):  # the journal keeps an answer only if it parses
            return [[float(p.value) for p in rec] for rec in parse_simulator_answer(resp.text, token_lists)]
