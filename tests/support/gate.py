"""A `TestServer` latency that decides how far a client gets: the first `open_for` requests are answered after
`latency_s`, every later one is held unanswered (it sleeps `hold_s` inside the server) until `open()`; requests
held before `open()` stay held. A test then stops a sweep at a point it chose, not at one a timer happened on."""
from __future__ import annotations

import math
import threading


class RequestGate:
    def __init__(self, open_for: int, latency_s: float = 0.0, hold_s: float = 3600.0):
        self.open_for: float = open_for
        self.latency_s = latency_s
        self.hold_s = hold_s
        self.passed = 0  # requests let through
        self.held = 0  # requests held, never answered
        self._lock = threading.Lock()

    def __call__(self) -> float:  # called by the server once per admitted request
        with self._lock:
            if self.passed < self.open_for:
                self.passed += 1
                return self.latency_s
            self.held += 1
            return self.hold_s

    def open(self) -> None:
        """Let every later request through (the ones held so far stay held: their callers are gone)."""
        with self._lock:
            self.open_for = math.inf
