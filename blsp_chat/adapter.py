"""The modality adapter: Whisper frames -> vectors in the LLM's word-embedding space. How the LLM reads
those vectors (as they are, or as the words a CTC-trained adapter heard) is `readout.py`'s.

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




class ContextEncoder(nn.Module):
    """Pre-norm transformer layers over the subsampled frames: (B, T', d) -> (B, T', d).

    The convolutions see 5 frames a layer; a word's sound spans more, and which word piece a frame carries
    depends on its neighbours. Self-attention lets every output see the whole window. No positional table
    is added: Whisper's frames already carry their absolute positions. Padding frames are masked out of
    attention and zeroed on the way out, so a clip in a padded batch gives what it gives alone.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T', d), lengths (B,) -> (B, T', d) with zeros past each row's length."""
        padding = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths.to(x.device)[:, None]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return self.norm(x).masked_fill(padding[..., None], 0.0)
