"""One lock per model: every forward pass on a model holds it, so the sessions and batch generations
sharing the model take turns step by step, in arrival order (`FairLock`): a session's prefill piece, the
batched decode step of all sessions replying (`batcher.StepBatcher`), a whole-batch `generate`."""
from __future__ import annotations

import collections
import threading
import weakref

import torch


class FairLock:
    """A lock handed over to its waiters in arrival order. `threading.Lock` lets the thread that has
    just released it take it again ahead of those waiting, so one reply could run many steps in a row
    while another user's waits; handed over in order, sessions sharing a model take one step each."""

    def __init__(self):
        self._guard = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def acquire(self) -> bool:
        with self._guard:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # release() hands the lock over by setting it: it is ours now
        return True

    def release(self) -> None:
        with self._guard:
            if not self._held:
                raise RuntimeError("release of a FairLock that is not held")
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, FairLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> FairLock:
    """The lock every forward pass on `model` holds, so sessions sharing a model take turns step by
    step, in arrival order (their caches are their own, so interleaved steps are safe)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = FairLock()
        return lock
