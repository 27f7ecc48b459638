"""The frozen LLM as the CTC beam search's language model, scored incrementally over a KV cache.

The beam search asks, at each adapter output, for the LLM's next-piece distribution after each of its
beams. A beam it has not asked about before is nearly always a beam it asked about at the previous step
plus one word piece, so its distribution costs one decode step: that piece read over the parent's cached
keys and values. All such new beams of one step are read in one batched forward, each parent's cache
left-padded to the longest and the padding masked out; positions count real tokens only, so every row
is computed as if it were alone. Anything else (the first, empty prefix; a prefix whose parent is gone)
is read from its start.

Keys and values are kept only for the prefixes of the latest call, which are the beams still alive:
memory stays at `beam_size` caches however long the clip. One scorer serves one decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
class _Scored:
    """One prefix read by the LLM: per layer, its keys and values (heads, 1 + len(prefix), head_dim),
    and the (V,) log-probabilities of the next piece."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    log_probs: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]


class KvCachedPrefixScorer:
    """An `LmScorer` (ctc_decode) over a causal LM: prefixes -> (V,) next-piece log-probabilities each,
    equal to reading every prefix from the start token but one decode step per new prefix."""

    def __init__(self, llm: PreTrainedModel):
        self.llm = llm
        self.start_id = scoring_start_id(llm.config)
        self._scored: dict[Prefix, _Scored] = {}
        if any(DynamicCache(config=llm.config).is_sliding):
            raise ValueError("the KV-cached prefix scorer needs full attention in every layer; this LLM has "
                             "sliding-window layers")

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def cached_prefixes(self) -> list[Prefix]:
        return list(self._scored)

    @torch.no_grad()
    def __call__(self, prefixes: Sequence[Prefix]) -> list[torch.Tensor]:
        alive = list(dict.fromkeys(tuple(p) for p in prefixes))
        pending = [p for p in alive if p not in self._scored]
        while pending:
            extendable = [p for p in pending if p and p[:-1] in self._scored]
            waiting = set(pending) - set(extendable)
            # A prefix whose parent is neither cached nor on its way is read from its start.
            fresh = [p for p in pending if p in waiting and (not p or p[:-1] not in waiting)]
            if extendable:
                self._extend(extendable)
            for prefix in fresh:
                self._read_from_start(prefix)
            pending = [p for p in pending if p not in self._scored]
        rows = [self._scored[tuple(p)].log_probs for p in prefixes]
        self._scored = {p: self._scored[p] for p in alive}  # only the beams still alive keep their caches
        return rows

    def _read_from_start(self, prefix: Prefix) -> None:
        ids = torch.tensor([[self.start_id, *prefix]], device=self.device)
        out = self.llm(input_ids=ids, use_cache=True, logits_to_keep=1)
        self._store([prefix], out, [0])

    def _extend(self, prefixes: list[Prefix]) -> None:
        """One decode step: each prefix's last piece read over its parent's cache, all in one batch."""
        parents = [self._scored[p[:-1]] for p in prefixes]
        lengths = [parent.length for parent in parents]
        width = max(lengths)
        pads = [width - length for length in lengths]
        cache = DynamicCache(
            ddp_cache_data=[(_left_padded([p.keys[layer] for p in parents], pads),
                             _left_padded([p.values[layer] for p in parents], pads))
                            for layer in range(len(parents[0].keys))],
            config=self.llm.config,
        )
        mask = torch.ones(len(prefixes), width + 1, dtype=torch.long, device=self.device)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        out = self.llm(input_ids=torch.tensor([[p[-1]] for p in prefixes], device=self.device),
                       position_ids=torch.tensor([[length] for length in lengths], device=self.device),
                       attention_mask=mask, past_key_values=cache, use_cache=True)
        self._store(prefixes, out, pads)

    def _store(self, prefixes: list[Prefix], out, pads: list[int]) -> None:
        log_probs = out.logits[:, -1].float().log_softmax(-1).cpu()
        layers = out.past_key_values.layers
        for row, (prefix, pad) in enumerate(zip(prefixes, pads)):
            self._scored[prefix] = _Scored(keys=tuple(layer.keys[row, :, pad:] for layer in layers),
                                           values=tuple(layer.values[row, :, pad:] for layer in layers),
                                           log_probs=log_probs[row])


def _left_padded(states: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """(heads, T_i, head_dim) each -> (N, heads, max T_i, head_dim), zeros before the shorter ones."""
    return torch.stack([torch.nn.functional.pad(s, (0, 0, pad, 0)) for s, pad in zip(states, pads)])
