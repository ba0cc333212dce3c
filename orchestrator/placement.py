"""Which ShardActor takes the driver's next shard (pure bookkeeping; the driver in pipeline.py does the calls).

Up to `per_actor` shards run at once on each actor, handed out round robin. When an actor dies, every shard it
was running is suspect: any one of them may have killed it. A suspect runs alone, on an actor with nothing else
in flight that takes nothing else until the suspect returns, so a death while it runs is its own and never a
neighbour's: an innocent shard is charged at most the one death it shared, and a shard that kills its actor
every time reaches the driver's limit (`max_shard_crashes`) without taking the others with it. While a suspect
waits, the least busy actor takes no new shard, so that one frees up. An actor that died is `down` (restarting)
until the driver has seen it answer again: a call sent to it meanwhile would only be refused.
"""
from __future__ import annotations


class ActorSlots:
    def __init__(self, n_actors: int, per_actor: int):
        if n_actors < 1 or per_actor < 1:
            raise ValueError(f"need at least one actor and one shard per actor, got {n_actors} x {per_actor}")
        self.inflight = [0] * n_actors
        self.per_actor = per_actor
        self.alone: set[int] = set()  # actors running a suspect
        self.draining: int | None = None  # the actor held back from new shards for a waiting suspect
        self.down: set[int] = set()  # actors restarting after a death
        self._next = 0

    def place(self, *, alone: bool = False) -> int | None:
        """The actor that takes a shard (counted in flight there), or None when none may take it now.
        `alone`: the shard is suspect (see the module docstring)."""
        n = len(self.inflight)
        if alone:
            idle = [k for k in range(n) if self.inflight[k] == 0 and k not in self.alone and k not in self.down]
            if not idle:
                if self.draining is None:
                    open_ = [k for k in range(n) if k not in self.alone and k not in self.down]
                    if open_:
                        self.draining = min(open_, key=lambda k: self.inflight[k])
                return None
            k = self.draining if self.draining in idle else idle[0]
            self.draining = None
            self.alone.add(k)
            self.inflight[k] += 1
            return k
        for i in range(n):
            k = (self._next + i) % n
            if k not in self.alone and k not in self.down and k != self.draining and self.inflight[k] < self.per_actor:
                self._next = k + 1
                self.inflight[k] += 1
                return k
        return None

    def release(self, k: int) -> None:
        """A shard placed on actor `k` came back (committed, failed or its actor died)."""
        if self.inflight[k] <= 0:
            raise ValueError(f"actor {k} has no shard in flight to release")
        self.inflight[k] -= 1
        if self.inflight[k] == 0:
            self.alone.discard(k)

    def mark_down(self, k: int) -> None:
        """Actor `k` died: it takes nothing until `mark_up`."""
        self.down.add(k)
        if self.draining == k:
            self.draining = None

    def mark_up(self, k: int) -> None:
        self.down.discard(k)

    @property
    def in_flight(self) -> int:
        return sum(self.inflight)
