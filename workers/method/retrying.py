"""Retrying a malformed answer with another sample, shared by the explainer, the simulator and the judged
scorers. A malformed or misaligned answer is asked again at a higher temperature with a new seed (so the retry
can differ and misses the call journal); after `MALFORMED_ATTEMPTS` tries it fails the neuron."""
from __future__ import annotations

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from workers.method.prompts import MalformedAnswerError

MALFORMED_ATTEMPTS = 3  # tries per call when the model's answer is malformed or misaligned
RETRY_TEMPERATURE = 0.7  # a retry must be able to give a different answer (and miss the call journal)


def malformed_retrying(attempts: int = MALFORMED_ATTEMPTS) -> AsyncRetrying:
    return AsyncRetrying(stop=stop_after_attempt(attempts), retry=retry_if_exception_type(MalformedAnswerError),
                         reraise=True)


def sample_settings(base_temperature: float, attempt: int) -> tuple[float, int | None]:
    """(temperature, seed) for a numbered attempt: the first as configured, later ones sampled with a new seed."""
    if attempt <= 1:
        return base_temperature, None
    return max(base_temperature, RETRY_TEMPERATURE), attempt
