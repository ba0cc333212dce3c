"""Which actor takes the driver's next shard: round robin up to the per-actor limit; a suspect shard alone."""
import pytest

from orchestrator.placement import ActorSlots


def test_shards_go_round_robin_up_to_the_limit_per_actor():
    slots = ActorSlots(2, 2)
    assert [slots.place() for _ in range(5)] == [0, 1, 0, 1, None]
    slots.release(1)
    assert slots.place() == 1 and slots.in_flight == 4


def test_a_suspect_waits_for_an_actor_to_drain_then_runs_there_alone():
    slots = ActorSlots(2, 2)
    for _ in range(4):
        slots.place()  # both actors full
    assert slots.place(alone=True) is None  # none idle: actor 0 (the least busy, first of equals) now drains
    slots.release(0)
    assert slots.place() is None  # actor 0 has room but takes nothing new; actor 1 is full
    slots.release(0)
    assert slots.place(alone=True) == 0  # drained
    assert slots.place() is None  # actor 0 runs the suspect alone, actor 1 is still full
    slots.release(1)
    assert slots.place() == 1
    slots.release(0)  # the suspect came back: actor 0 takes shards again
    assert slots.place() == 0


def test_a_suspect_takes_an_idle_actor_at_once():
    slots = ActorSlots(3, 4)
    assert slots.place() == 0
    assert slots.place(alone=True) == 1  # the first idle actor
    assert [slots.place() for _ in range(4)] == [2, 0, 2, 0]  # never actor 1 while its suspect runs


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="at least one actor"):
        ActorSlots(0, 2)
    with pytest.raises(ValueError, match="actor 1 has no shard in flight"):
        ActorSlots(2, 1).release(1)


def test_an_actor_that_died_takes_nothing_until_it_is_back():
    slots = ActorSlots(2, 1)
    slots.mark_down(0)
    assert slots.place() == 1 and slots.place() is None
    assert slots.place(alone=True) is None and slots.draining == 1  # not the restarting actor
    slots.mark_up(0)
    assert slots.place(alone=True) == 0
