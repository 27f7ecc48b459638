"""Decode steps of many sessions in one forward pass.

Each streamed reply used to run its own forward pass per token, one after another under the model lock, so
N replies at once shared one step stream. A decode step reads all the LLM's weights to compute one row; on
a CPU or a GPU a step of a dozen rows costs about what a step of one does. So the sessions that are decoding
hand their next step (last token, position, KV cache) to the model's `StepBatcher`; whoever finds the model
free runs all waiting steps as ONE forward over a left-padded batch of their caches (an attention mask and
a position per row), and each session gets its row's logits back and samples its own token with its own
options. Prefills (new turns) stay per-session pieces under the same fair lock, so a new turn waits behind
at most one batched step, never behind whole replies.

Cache copies. Laying caches out as one batch copies them, and padding costs memory, so:
- one waiting step runs alone on its own cache (no copy), as before;
- a batch is kept from step to step while the same sessions take part: each session's cache holds views of
  its row, so the next step appends to the batch directly (the one copy per step is the key/value
  concatenation every transformers `DynamicLayer.update` makes anyway); it is rebuilt only when a session
  joins or leaves;
- rows are grouped by length so that padding stays under half of a batch (a short history never pads up to
  a 4k-token one);
- a session that stops decoding copies its rows out, so a finished reply's cache does not keep the whole
  batch's tensors alive.
A batched forward that raises is retried step by step, so an error that belongs to one session reaches
that session only. Greedy steps give the same tokens batched as alone (tests/test_batcher.py).
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .lock import PerModel, model_lock

if TYPE_CHECKING:
    from .model import BlspModel

# How long the first waiting step gives the other decoding sessions to hand in theirs (they are sampling
# their last token) before it takes the model: without it, the first one back would run alone every time.
GATHER_SECONDS = 0.05
# A row joins a batch only when its history fills at least this share of the batch's width (the longest
# row's), which keeps padding under half of the batch's memory and compute.
MIN_ROW_FILL = 0.5


@dataclass(eq=False)
class _Step:
    """One session's next decode step: `token` at `position` (= the cache's length) on its own cache."""

    cache: DynamicCache
    token: int
    position: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None  # (V,) for the next position
    error: BaseException | None = None


@dataclass(eq=False)
class _Batch:
    """Caches laid out as one left-padded batch: row r is caches[r], after pads[r] padding positions."""

    caches: list[DynamicCache]
    pads: list[int]
    cache: DynamicCache
    views: list[torch.Tensor] = field(default_factory=list)  # each row's layer-0 keys as handed back

    def still_holds(self, steps: list[_Step]) -> bool:
        """Whether `steps` are this batch's rows and no row's cache changed since it was handed back
        (a session that ran alone, prefilled, cropped or reset its cache holds other tensors now)."""
        if {id(s.cache) for s in steps} != {id(c) for c in self.caches} or len(steps) != len(self.caches):
            return False
        return all(cache.layers[0].keys is view for cache, view in zip(self.caches, self.views))


class StepBatcher:
    """The decode steps of the sessions sharing one model, batched (see the module's docstring).

        with batcher.decoding() as step:
            logits = step(cache, token, position)   # blocks until the batch with this step has run
    """

    def __init__(self, model: BlspModel):
        self._model = weakref.ref(model)  # the per-model registry must not keep its model alive
        self._guard = threading.Condition()
        self._pending: list[_Step] = []
        self._runner_waiting = False   # a thread has the pending steps to run: later ones wait for it
        self._decoders = 0             # sessions between their prefill and their reply's end
        self._batches: list[_Batch] = []  # the last run's batches, kept for the next step

    @contextmanager
    def decoding(self) -> Iterator:
        """A reply's decode loop: yields the step function; on leaving, the cache last stepped owns its
        tensors again (copied out of the batch)."""
        used: list[DynamicCache] = []

        def step(cache: DynamicCache, token: int, position: int) -> torch.Tensor:
            if not used or used[-1] is not cache:
                used.append(cache)
            return self.step(cache, token, position)

        with self._guard:
            self._decoders += 1
        try:
            yield step
        finally:
            with self._guard:
                self._decoders -= 1
                self._guard.notify_all()
            for cache in used:
                self._detach(cache)

    def step(self, cache: DynamicCache, token: int, position: int) -> torch.Tensor:
        """Run `token` at `position` on `cache` (appending its keys and values); the next position's logits (V,)."""
        step = _Step(cache, token, position)
        with self._guard:
            self._pending.append(step)
            self._guard.notify_all()
            lead, self._runner_waiting = not self._runner_waiting, True
        if lead:
            self._gather_and_run()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.logits

    def _gather_and_run(self) -> None:
        with self._guard:
            self._guard.wait_for(lambda: len(self._pending) >= self._decoders, timeout=GATHER_SECONDS)
        with model_lock(self._model()):
            with self._guard:
                steps, self._pending, self._runner_waiting = self._pending, [], False
            try:
                self._run(steps)
            finally:
                for step in steps:
                    step.done.set()

    def _run(self, steps: list[_Step]) -> None:
        with self._guard:
            previous, self._batches = self._batches, []
        for group in _groups_by_length(steps):
            if len(group) == 1 or not all(_batchable(s.cache) for s in group):
                self._run_alone(group)  # one step: its own cache, nothing to copy
                continue
            try:
                batch = next((b for b in previous if b.still_holds(group)), None) or _laid_out(group)
                self._run_batch(batch, group)
            except Exception:  # retried one by one: the step that fails fails alone
                self._run_alone([s for s in group if s.logits is None])
                continue
            with self._guard:
                self._batches.append(batch)

    def _run_alone(self, steps: list[_Step]) -> None:
        for step in steps:
            try:
                step.logits = self._forward(torch.tensor([[step.token]]), None, torch.tensor([[step.position]]),
                                            step.cache)[0]
            except Exception as err:
                step.error = err

    def _run_batch(self, batch: _Batch, steps: list[_Step]) -> None:
        rows = {id(cache): row for row, cache in enumerate(batch.caches)}
        steps = sorted(steps, key=lambda s: rows[id(s.cache)])
        width = batch.cache.get_seq_length()
        mask = torch.ones(len(steps), width + 1, dtype=torch.long)
        for row, pad in enumerate(batch.pads):
            mask[row, :pad] = 0
        logits = self._forward(torch.tensor([[s.token] for s in steps]), mask,
                               torch.tensor([[s.position] for s in steps]), batch.cache)
        batch.views = []
        for row, (step, pad) in enumerate(zip(steps, batch.pads)):
            for own, batched in zip(step.cache.layers, batch.cache.layers):
                own.keys, own.values = batched.keys[row:row + 1, :, pad:], batched.values[row:row + 1, :, pad:]
            batch.views.append(step.cache.layers[0].keys)
            step.logits = logits[row]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """One decode position per row on `cache`; the rows' next-position logits (B, V)."""
        model = self._model()
        out = model.llama_model(inputs_embeds=model.embed_inputs(ids, None), past_key_values=cache,
                                attention_mask=None if mask is None else mask.to(model.device),
                                position_ids=positions.to(model.device), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _detach(self, cache: DynamicCache) -> None:
        """A session stops decoding: its cache gets tensors of its own (views of a batch would keep the
        whole batch alive), and no kept batch holds it."""
        with self._guard:
            self._batches = [b for b in self._batches if not any(c is cache for c in b.caches)]
        for layer in cache.layers:
            if layer.is_initialized and _is_part_of_larger(layer.keys):
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()


def _is_part_of_larger(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()


def _batchable(cache: DynamicCache) -> bool:
    """Plain full-attention layers only (sliding-window or other layer kinds run alone)."""
    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _groups_by_length(steps: list[_Step]) -> list[list[_Step]]:
    """Steps grouped longest first, each group's rows at least MIN_ROW_FILL of its longest."""
    groups: list[list[_Step]] = []
    for step in sorted(steps, key=lambda s: -s.position):
        if groups and step.position >= MIN_ROW_FILL * groups[-1][0].position:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def _laid_out(steps: list[_Step]) -> _Batch:
    """The steps' caches copied into one left-padded batch cache."""
    caches = [s.cache for s in steps]
    lengths = [c.get_seq_length() for c in caches]
    if lengths != [s.position for s in steps]:
        raise ValueError(f"steps at positions {[s.position for s in steps]} on caches of {lengths} positions")
    width = max(lengths)
    pads = [width - length for length in lengths]
    batch = DynamicCache()
    for index, first in enumerate(caches[0].layers):
        keys = first.keys.new_zeros((len(caches), *first.keys.shape[1:2], width, first.keys.shape[-1]))
        values = first.values.new_zeros((len(caches), *first.values.shape[1:2], width, first.values.shape[-1]))
        for row, (cache, pad) in enumerate(zip(caches, pads)):
            keys[row, :, pad:] = cache.layers[index].keys[0]
            values[row, :, pad:] = cache.layers[index].values[0]
        batch.update(keys[:, :, :0], values[:, :, :0], index)  # creates the layer (empty, right dtype and device)
        batch.layers[index].keys, batch.layers[index].values = keys, values
    return _Batch(caches, pads, batch)


_step_batchers: PerModel[StepBatcher] = PerModel(StepBatcher)


def step_batcher(model: BlspModel) -> StepBatcher:
    """The one StepBatcher of `model`, shared by every session on it."""
    return _step_batchers(model)
