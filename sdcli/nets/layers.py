"""Pieces shared by the U-Net and the VAE: multi-head attention and nearest-neighbour upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention over token sequences (Vaswani et al. 2017); `keys` (B, M) bool,
    when given, says which of the M keys each sample may attend to (the others are padding)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, head_dim)
    mask = None if keys is None else keys[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)  # (B, N, heads * head_dim)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        # `size` pins odd sizes to the skip connection's, where doubling would overshoot by one
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
