"""The frozen LLM as the CTC beam search's language model, scored incrementally over a KV cache.

The beam search asks, at each adapter output, for the LLM's next-piece distribution after each of its
beams. A beam it has not asked about before is nearly always one it asked about plus a word piece, so its
distribution costs a decode step over the parent's cached keys and values, not a reread from the start.

On a CPU a decode step costs about as much for a dozen tokens as for one (reading the weights is the cost),
so each forward also reads ahead: after every prefix it must read, the pieces the search expects the next
outputs to add (`expect`), and it keeps the keys, values and next-piece distribution of every prefix along
the way. When the beams take those pieces, their rows are already there. All prefixes of one call are read
in one batched forward: each ancestor's cache left-padded to the longest, each new stretch right-padded,
padding masked out and positions counting real tokens only, so every row is computed as if it were alone.

Every prefix is read after the start token (BOS, or EOS for LLMs without one). The start token's own read is
the same for every clip, so it is kept per LLM across decodes (while the LLM's weights stay as they were):
a clip's first forward is then a beam's first pieces, not the start token; a single word costs one
forward instead of two, and a sentence one fewer.

Only the prefixes of the latest call (the beams alive) and what was read ahead of them keep their caches,
so memory stays at a few caches per beam however long the clip. One scorer serves one decode.

Each forward runs inside `guard()` (a context manager factory; by default nothing): a caller sharing the
LLM with others passes its lock there, so that a long clip takes the LLM one forward at a time, and the
search's own bookkeeping between forwards leaves it free.

Decodes on one LLM at the same time (several people's spoken turns) share their forwards (`_SharedReads`):
a scorer hands its rows in and the first one waiting for the guard reads the rows of every scorer that has
handed some in by the time it holds it, in one forward. Their rows together cost less than their forwards
one by one (here, one thread: 4 rows of 5 pieces 0.23 s, 16 rows 0.6 s), and each clip's readout then takes
one forward per round of the model lock instead of waiting for the other readouts' forwards one by one
(3-6 spoken turns at once were measured spending 70-80% of their readout waiting for the lock).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from .lock import PerModel

Prefix = tuple[int, ...]


def scoring_start_id(config: PretrainedConfig) -> int:
    """The token a prefix is read after, as at the start of a text: BOS, or EOS for LLMs without one
    (Qwen-style)."""
    start = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if start is None:
        raise ValueError("the LLM has neither a BOS nor an EOS token: nothing to start a transcript from")
    return start


@dataclass
class _Read:
    """One prefix read by the LLM: per layer, its keys and values (heads, 1 + len(prefix), head_dim),
    and the (V,) log-probabilities of the next piece."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    log_probs: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]


# Pieces read ahead of each prefix that must be read: about a second of speech. More cost little more per
# forward on a CPU, but are wasted where the beams leave the expected path.
READ_AHEAD_PIECES = 4


class KvCachedPrefixScorer:
    """An `LmScorer` (ctc_decode) over a causal LM: prefixes -> (V,) next-piece log-probabilities each,
    equal to reading every prefix from the start token, at the cost of reading only its new pieces."""

    def __init__(self, llm: PreTrainedModel, read_ahead: int = READ_AHEAD_PIECES,
                 guard: Callable[[], ContextManager] = contextlib.nullcontext):
        if any(DynamicCache(config=llm.config).is_sliding):
            raise ValueError("the KV-cached prefix scorer needs full attention in every layer; this LLM has "
                             "sliding-window layers")
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be >= 0, got {read_ahead}")
        self.llm = llm
        self.start_id = scoring_start_id(llm.config)
        self.read_ahead = read_ahead
        self.guard = guard  # entered around each forward of the LLM
        self.forwards = 0  # how many times the LLM ran: what a decode cost
        self._expected: tuple[int, ...] = ()
        self._read: dict[Prefix, _Read] = {}

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def cached_prefixes(self) -> list[Prefix]:
        return list(self._read)

    def expect(self, pieces: Sequence[int]) -> None:
        """The pieces the next outputs most likely add: read after each prefix the next call must read."""
        self._expected = tuple(pieces)

    def _start_read(self) -> _Read:
        """The start token read alone: kept per LLM, and read again when its weights changed (in place, as
        an optimiser step changes them, or for new tensors)."""
        fingerprint = tuple((p.data_ptr(), p._version) for p in self.llm.parameters())
        known = _START_READS.get(self.llm)
        if known is not None and known[0] == fingerprint:
            return known[1]
        with self.guard():
            out = self.llm(input_ids=torch.tensor([[self.start_id]], device=self.device), use_cache=True)
        self.forwards += 1
        layers = out.past_key_values.layers
        read = _Read(keys=tuple(layer.keys[0] for layer in layers), values=tuple(layer.values[0] for layer in layers),
                     log_probs=out.logits[0, -1].float().log_softmax(-1).cpu())
        _START_READS[self.llm] = (fingerprint, read)
        return read

    @torch.no_grad()
    def __call__(self, prefixes: Sequence[Prefix]) -> list[torch.Tensor]:
        prefixes = [tuple(p) for p in prefixes]
        if () in prefixes:
            self._nearest_read(())  # the start token's read, kept across decodes: nothing to run
        missing = [p for p in dict.fromkeys(prefixes) if p not in self._read]
        if missing:
            self._read_ahead_of(missing)
        rows = [self._read[p].log_probs for p in prefixes]
        alive = set(prefixes)
        self._read = {p: read for p, read in self._read.items()
                      if any(p[:end] in alive for end in range(len(p) + 1))}  # alive, or read ahead of one
        return rows

    def _read_ahead_of(self, missing: list[Prefix]) -> None:
        """One forward: each missing prefix and the expected pieces after it, over its nearest read ancestor."""
        targets, ancestors = self._chains(missing)
        tails = [t[len(a):] for t, a in zip(targets, ancestors)]
        rows = _shared_reads(self.llm).read([_Row(self._read[a], tail) for a, tail in zip(ancestors, tails)],
                                            self.guard)
        self.forwards += 1
        for target, tail, (ancestor_length, row) in zip(targets, tails, rows):
            for step in range(len(tail)):  # every prefix along the tail, each ending at its token
                prefix = target[:len(target) - len(tail) + step + 1]
                if prefix not in self._read:
                    kept = slice(0, ancestor_length + step + 1)
                    self._read[prefix] = _Read(keys=tuple(keys[:, kept] for keys in row.keys),
                                               values=tuple(values[:, kept] for values in row.values),
                                               log_probs=row.log_probs[step])

    def _chains(self, missing: list[Prefix]) -> tuple[list[Prefix], list[Prefix]]:
        """What to read: each missing prefix and its expected pieces, and the read ancestor to read it from;
        a chain that another covers (read from an ancestor no longer than its own) is read with that one."""
        chains = {p + self._expected_after(p): self._nearest_read(p) for p in missing}
        targets = [t for t, a in chains.items()
                   if not any(o != t and o[:len(t)] == t and len(b) <= len(a) for o, b in chains.items())]
        return targets, [chains[t] for t in targets]

    def _expected_after(self, prefix: Prefix) -> Prefix:
        """The expected pieces that follow `prefix` (a piece it already ends with is being held, not added)."""
        expected = self._expected
        if prefix and expected and expected[0] == prefix[-1]:
            expected = expected[1:]
        return expected[:self.read_ahead]

    def _nearest_read(self, prefix: Prefix) -> Prefix:
        """The longest read prefix of `prefix`: at least the empty one, the start token's read."""
        for end in range(len(prefix), 0, -1):
            if prefix[:end] in self._read:
                return prefix[:end]
        if () not in self._read:
            self._read[()] = self._start_read()
        return ()


@dataclass(eq=False)
class _Row:
    """One row to read: `tail` after the ancestor `read`."""

    read: _Read
    tail: Prefix


@dataclass(eq=False)
class _Request:
    """One scorer's rows for one forward, and what came back: per row, the ancestor's length and the
    read of its whole tail (the keys and values of ancestor + tail, log-probabilities after each tail piece)."""

    rows: list[_Row]
    done: threading.Event = field(default_factory=threading.Event)
    result: list[tuple[int, _Read]] | None = None
    error: BaseException | None = None


class _SharedReads:
    """The rows of all scorers on one LLM that wait for it at once, read in one forward (see the module's
    docstring). The first scorer waiting runs the forward inside its own guard for everyone."""

    def __init__(self, llm: PreTrainedModel):
        self._llm = weakref.ref(llm)  # the per-LLM registry must not keep its LLM alive
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._leader_waiting = False  # a scorer waits for the guard to read the pending rows: others wait for it

    def read(self, rows: list[_Row], guard: Callable[[], ContextManager]) -> list[tuple[int, _Read]]:
        request = _Request(rows)
        with self._lock:
            self._pending.append(request)
            lead, self._leader_waiting = not self._leader_waiting, True
        if lead:
            try:
                with guard():
                    self._run(self._take_pending())
            except BaseException as err:  # the guard itself failed: no one else would read what waits
                for waiting in self._take_pending():
                    waiting.error = err
                    waiting.done.set()
                raise
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _take_pending(self) -> list[_Request]:
        with self._lock:
            requests, self._pending, self._leader_waiting = self._pending, [], False
        return requests

    def _run(self, requests: list[_Request]) -> None:
        try:
            results = self._forward([row for request in requests for row in request.rows])
            for request in requests:
                request.result, results = results[:len(request.rows)], results[len(request.rows):]
        except Exception:  # read again one scorer at a time: a scorer whose rows fail fails alone
            for request in requests:
                try:
                    request.result = self._forward(request.rows)
                except Exception as err:
                    request.error = err
        finally:
            for request in requests:
                request.done.set()

    @torch.no_grad()
    def _forward(self, rows: list[_Row]) -> list[tuple[int, _Read]]:
        """Rows of any ancestors and tails in one forward: ancestors' caches left-padded to the longest, tails
        right-padded, padding masked out and positions counting real tokens, so each row reads as if alone."""
        llm = self._llm()
        device = llm.get_input_embeddings().weight.device
        lengths = [row.read.length for row in rows]
        width, added = max(lengths), max(len(row.tail) for row in rows)
        mask = torch.zeros(len(rows), width + added, dtype=torch.long)
        ids = torch.full((len(rows), added), scoring_start_id(llm.config), dtype=torch.long)
        for index, (length, row) in enumerate(zip(lengths, rows)):
            mask[index, width - length: width + len(row.tail)] = 1
            ids[index, :len(row.tail)] = torch.tensor(row.tail)
        positions = torch.tensor(lengths)[:, None] + torch.arange(added)
        pads = [width - length for length in lengths]
        cache = DynamicCache(ddp_cache_data=[(_left_padded([row.read.keys[layer] for row in rows], pads),
                                              _left_padded([row.read.values[layer] for row in rows], pads))
                                             for layer in range(len(rows[0].read.keys))], config=llm.config)
        out = llm(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask.to(device),
                  past_key_values=cache, use_cache=True)
        log_probs = out.logits.float().log_softmax(-1).cpu()
        layers = out.past_key_values.layers
        results = []
        for index, (length, row) in enumerate(zip(lengths, rows)):
            # Each row's own positions and log-probabilities, copied out: a read kept by one scorer does not
            # hold the whole batch.
            kept = slice(width - length, width + len(row.tail))
            results.append((length, _Read(keys=tuple(layer.keys[index, :, kept].clone() for layer in layers),
                                          values=tuple(layer.values[index, :, kept].clone() for layer in layers),
                                          log_probs=log_probs[index, :len(row.tail)].clone())))
        return results


_shared_reads: PerModel[_SharedReads] = PerModel(_SharedReads)  # the one per LLM


# Per LLM: (its weights' fingerprint, the start token's read), shared by the decodes on it.
_START_READS: "weakref.WeakKeyDictionary[PreTrainedModel, tuple[tuple, _Read]]" = weakref.WeakKeyDictionary()


def _left_padded(states: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """(heads, T_i, head_dim) each -> (N, heads, max T_i, head_dim), zeros before the shorter ones."""
    return torch.stack([torch.nn.functional.pad(s, (0, 0, pad, 0)) for s, pad in zip(states, pads)])
