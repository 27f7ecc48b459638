"""The modality adapter: Whisper frames -> vectors in the LLM's word-embedding space.

Layout and parameter names follow the released BLSP checkpoint exactly:
`subsampler.conv_layers.{i}`, `adapter.fc1`, `adapter.fc2`, `speech_ln` (the last two live on the model).
"""
from __future__ import annotations

import torch
from torch import nn


def subsampled_lengths(lengths: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Output length of `num_layers` stride-2 convolutions with padding k//2: floor((L-1)/2 + 1) each."""
    out = lengths.clone().long()
    for _ in range(num_layers):
        out = torch.div(out - 1, 2, rounding_mode="floor") + 1
    return out


class Conv1dSubsampler(nn.Module):
    """Stride-2 Conv1d + GLU layers: (B, T, d_in) -> (B, ~T/2^n, d_out).

    Widths d_in -> d_in -> ... -> d_out: each conv emits twice the channels and GLU halves them.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_sizes: list[int]):
        super().__init__()
        widths = [in_dim] * len(kernel_sizes) + [out_dim]
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(widths[i], 2 * widths[i + 1], k, stride=2, padding=k // 2)
            for i, k in enumerate(kernel_sizes)
        )

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, T, d_in), lengths (B,) -> (B, T', d_out), lengths' (B,).

        Frames past each row's length are zeroed before every layer, so a clip in a padded batch
        sees exactly the zero padding it would see alone.
        """
        x = frames.transpose(1, 2)
        for conv in self.conv_layers:
            x = nn.functional.glu(conv(zero_past(x, lengths)), dim=1)
            lengths = subsampled_lengths(lengths, 1)
        return zero_past(x, lengths).transpose(1, 2), lengths


def zero_past(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B, C, T): zero the time steps at or after each row's length."""
    real = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
    return x * real[:, None, :].to(x.dtype)


class Bottleneck(nn.Module):
    """Residual bias-free bottleneck: x + fc2(gelu(fc1(x))), (..., d) -> (..., d)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, inner_dim, bias=False)
        self.fc2 = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def embedding_distance_logits(speech: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """(..., d) speech vectors x, (V, d) word embeddings e -> (..., V) logits -||x - e||^2 up to a per-row
    constant (2 x.e - ||e||^2): the nearest embedding wins, and a vector is pulled towards the embedding
    itself, not only along its direction, which is what the LLM reads."""
    embeddings = embeddings.float()
    return 2 * speech.float() @ embeddings.T - (embeddings * embeddings).sum(-1)


def collapse_ctc(ids: list[int], blank_id: int) -> list[int]:
    """Greedy CTC decoding: merge runs of the same class, then drop the blank."""
    return [i for n, i in enumerate(ids) if i != blank_id and (n == 0 or ids[n - 1] != i)]


READOUT_CHUNK = 256  # adapter outputs scored at once: bounds the (chunk, V) logits to ~50 MB for V=49k
# Words of each output's posterior that are kept: at the readout's low temperatures the rest carry
# less than exp(-50) of it, and skipping them spares a second (chunk, V) x (V, d) product.
READOUT_TOP_K = 64


def ctc_label_candidates(speech: torch.Tensor, embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each output's k most likely CTC labels: (L, k) log-probabilities (as the CTC loss scores them) and ids."""
    table = embeddings.float()
    values, ids = [], []
    for chunk in speech.split(READOUT_CHUNK):
        top = embedding_distance_logits(chunk, table).log_softmax(-1).topk(min(k, table.shape[0]), dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


def ctc_readout(speech: torch.Tensor, embeddings: torch.Tensor, blank_id: int, temperature: float) -> torch.Tensor:
    """CTC-compressed readout (as in LegoSLM): (L, d) adapter outputs -> (L', d) vectors, L' <= L.

    Each output is classified by its distance to the (V, d) word embeddings, as the CTC loss trained it.
    Runs of outputs with the same nearest word form a segment (greedy CTC decoding); blank segments are
    dropped, and each other segment becomes its mean posterior (softmax of the logits / temperature, over
    each output's READOUT_TOP_K nearest words) times the embedding table: one vector per word piece,
    inside the span of the LLM's own word embeddings.
    Low temperatures approach the nearest word's embedding. A clip heard as all blank reads as nothing: (0, d).
    """
    if speech.shape[0] == 0:
        return speech
    table = embeddings.float()
    labels, expected = [], []  # per output: its nearest word, and posterior @ table (mean commutes with @)
    for chunk in speech.split(READOUT_CHUNK):
        top, words = embedding_distance_logits(chunk, table).topk(min(READOUT_TOP_K, table.shape[0]), dim=-1)
        labels.append(words[:, 0])
        posterior = torch.softmax(top / temperature, dim=-1)
        expected.append(torch.einsum("lk,lkd->ld", posterior, table[words]))
    labels = torch.cat(labels)
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[1:] = labels[1:] != labels[:-1]
    segment_of = starts.cumsum(0) - 1
    keep = labels[starts] != blank_id
    if not keep.any():
        return speech[:0]
    sums = torch.zeros(len(keep), table.shape[1], device=speech.device).index_add_(0, segment_of, torch.cat(expected))
    sizes = torch.bincount(segment_of, minlength=len(keep)).to(sums.dtype)
    return (sums[keep] / sizes[keep, None]).to(speech.dtype)
