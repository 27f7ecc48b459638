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
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

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
        reads = [self._read[a] for a in ancestors]
        lengths = [r.length for r in reads]
        width, added = max(lengths), max(map(len, tails))
        mask = torch.zeros(len(targets), width + added, dtype=torch.long)
        ids = torch.full((len(targets), added), self.start_id, dtype=torch.long)
        for row, (length, tail) in enumerate(zip(lengths, tails)):
            mask[row, width - length: width + len(tail)] = 1  # left padding before the cache, right after the tail
            ids[row, :len(tail)] = torch.tensor(tail)
        positions = torch.tensor(lengths)[:, None] + torch.arange(added)
        cache = self._padded_cache(reads, lengths, width)
        with self.guard():
            out = self.llm(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                           attention_mask=mask.to(self.device), past_key_values=cache, use_cache=True)
        self.forwards += 1
        log_probs = out.logits.float().log_softmax(-1).cpu()
        layers = out.past_key_values.layers
        for row, (target, tail, length) in enumerate(zip(targets, tails, lengths)):
            for step in range(len(tail)):  # every prefix along the tail, each ending at its token
                prefix = target[:len(target) - len(tail) + step + 1]
                if prefix not in self._read:
                    kept = slice(width - length, width + step + 1)
                    self._read[prefix] = _Read(keys=tuple(layer.keys[row, :, kept] for layer in layers),
                                               values=tuple(layer.values[row, :, kept] for layer in layers),
                                               log_probs=log_probs[row, step])

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

    def _padded_cache(self, reads: list[_Read], lengths: list[int], width: int) -> DynamicCache:
        """The ancestors' caches as one batch, each left-padded with zeros to `width`."""
        layers = []
        pads = [width - length for length in lengths]
        for layer in range(len(reads[0].keys)):
            layers.append((_left_padded([r.keys[layer] for r in reads], pads),
                           _left_padded([r.values[layer] for r in reads], pads)))
        return DynamicCache(ddp_cache_data=layers, config=self.llm.config)


# Per LLM: (its weights' fingerprint, the start token's read), shared by the decodes on it.
_START_READS: "weakref.WeakKeyDictionary[PreTrainedModel, tuple[tuple, _Read]]" = weakref.WeakKeyDictionary()


def _left_padded(states: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """(heads, T_i, head_dim) each -> (N, heads, max T_i, head_dim), zeros before the shorter ones."""
    return torch.stack([torch.nn.functional.pad(s, (0, 0, pad, 0)) for s, pad in zip(states, pads)])
