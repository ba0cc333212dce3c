"""Why a unit failed or was skipped: one bounded vocabulary shared by the ledger (`reason` column), the
Prometheus label `reason`, `status`, the viewer and the report.

The reason travels with the exception that caused it (`LLMError.reason`, `NeuronFailure.reason`) and is stored
beside the free-text message; nothing recovers it from message text.
"""
from __future__ import annotations

from enum import Enum


class FailureReason(str, Enum):
    RATE_LIMITED = "rate_limited"  # the provider kept answering 429 past the retry budget
    TIMEOUT = "timeout"  # a request got no answer in time
    SERVER_ERROR = "server_error"  # 5xx from the endpoint
    CONNECTION = "connection"  # the endpoint could not be reached
    MALFORMED = "malformed"  # answers stayed unparseable, misaligned or truncated after retries
    PERMANENT = "permanent"  # 4xx or an unsupported request: a retry cannot fix it
    DEADLINE = "deadline"  # the unit ran past `neuron_deadline_s`
    RECORDS = "records"  # too few records for the requested splits
    NON_FINITE = "non_finite"  # the unit's activations hold NaN or inf
    WORKER_CRASH = "worker_crash"  # the shard's actor died too many times
    ERROR = "error"  # anything else (the message says what)
    DEAD = "dead"  # skipped, not failed: the unit never activates above 0 on the corpus (a dead latent)

    def __str__(self) -> str:
        return self.value


FAILURE_REASONS: tuple[str, ...] = tuple(r.value for r in FailureReason)
