"""One lock per model: every forward pass on a model holds it, so the sessions and batch generations
sharing the model take turns step by step (`FairLock`): a session's prefill piece, a spoken turn's encoding
and readout forwards, the batched decode step of all sessions replying (`batcher.StepBatcher`), a
whole-batch `generate`.

A spoken turn's encoding and readout are *urgent*: handed the lock ahead of other waiters. The readout runs
an LLM forward per word piece or two heard, and its person waits for all of them before a first token;
queued behind a full round of everyone's prefill pieces and decode steps per forward, 16 people at once
stretched a 3 s clip's readout tenfold. Its forwards are small (a decode step over a few beams), so going
first costs the others little, and the others still get every URGENT_STREAK-th hand-over while urgent work
waits. Prefills stay in arrival order: a 256-position piece first would stall the streaming replies.
(LLM servers likewise schedule first-token work ahead of decode steps, within a budget.)"""
from __future__ import annotations

import collections
import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

import torch

# Urgent hand-overs in a row while other work waits, before the oldest other waiter gets one.
URGENT_STREAK = 4


class FairLock:
    """A lock handed over to its waiters in arrival order, urgent waiters first (see the module's
    docstring). `threading.Lock` lets the thread that has just released it take it again ahead of those
    waiting, so one reply could run many steps in a row while another user's waits; handed over in order,
    sessions sharing a model take one step each."""

    def __init__(self, urgent_streak: int = URGENT_STREAK):
        if urgent_streak < 1:
            raise ValueError(f"urgent_streak must be >= 1, got {urgent_streak}")
        self.urgent_streak = urgent_streak
        self._guard = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._urgent_waiters: collections.deque[threading.Event] = collections.deque()
        self._streak = 0  # urgent hand-overs in a row while other waiters waited
        self._held = False

    def acquire(self, urgent: bool = False) -> bool:
        with self._guard:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            (self._urgent_waiters if urgent else self._waiters).append(turn)
        turn.wait()  # release() hands the lock over by setting it: it is ours now
        return True

    def release(self) -> None:
        with self._guard:
            if not self._held:
                raise RuntimeError("release of a FairLock that is not held")
            waiter = self._next_waiter()
            if waiter is None:
                self._held = False
            else:
                waiter.set()

    def _next_waiter(self) -> threading.Event | None:
        if self._urgent_waiters and (not self._waiters or self._streak < self.urgent_streak):
            self._streak += 1 if self._waiters else 0
            return self._urgent_waiters.popleft()
        self._streak = 0
        return self._waiters.popleft() if self._waiters else None

    def locked(self) -> bool:
        return self._held

    @contextmanager
    def urgent(self) -> Iterator[FairLock]:
        """Hold the lock for urgent work: handed over ahead of other waiters."""
        self.acquire(urgent=True)
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


Shared = TypeVar("Shared")


class PerModel(Generic[Shared]):
    """One object per model, made on first use by `make(model)` and shared by every caller on that model; the
    registry holds models weakly, so it keeps none alive."""

    def __init__(self, make: Callable[[torch.nn.Module], Shared]):
        self._make = make
        self._objects: weakref.WeakKeyDictionary[torch.nn.Module, Shared] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def __call__(self, model: torch.nn.Module) -> Shared:
        with self._guard:
            shared = self._objects.get(model)
            if shared is None:
                shared = self._objects[model] = self._make(model)
            return shared


_model_locks: PerModel[FairLock] = PerModel(lambda model: FairLock())


def model_lock(model: torch.nn.Module) -> FairLock:
    """The lock every forward pass on `model` holds, so sessions sharing a model take turns step by
    step (their caches are their own, so interleaved steps are safe)."""
    return _model_locks(model)


def urgent_model_lock(model: torch.nn.Module):
    """`model_lock(model)` held as urgent work (a first token waits on it): a context manager."""
    return model_lock(model).urgent()
