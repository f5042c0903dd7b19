"""The LDM KL autoencoder (Rombach et al. 2022), named as the CompVis/Stability checkpoints store it under
`first_stage_model.`, so those weights load by stripping the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.config import VAEConfig, vae_width_problem
from sdcli.errors import ConfigError
from sdcli.nets.layers import Upsample, attention

NORM_EPS = 1e-6  # GroupNorm eps everywhere in the autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # the LDM's posterior clamps log-variance to this range


class ResnetBlock(nn.Module):
    """Two norm-SiLU-3x3 conv layers as a residual, a 1x1 conv on the skip when the width changes."""

    def __init__(self, channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, as a residual; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, h*w, C)
        y = attention(q, k, v, heads=1).transpose(1, 2).unflatten(2, (h, w))  # (B, C, h, w)
        return x + self.proj_out(y)


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """A stride-2 3x3 conv after padding right and bottom only, as the LDM does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    """The res blocks of one resolution, then the way down (Identity at the last level)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class DecoderLevel(nn.Module):
    """The res blocks of one resolution, then the way up (Identity at level 0)."""

    def __init__(self, blocks: list[nn.Module], upsample: nn.Module):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """Image -> the Gaussian posterior's stacked (mean, logvar), before quant_conv."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        groups, last = cfg.norm_groups, len(cfg.channel_mult) - 1
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.image_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, mult * cfg.base_channels, groups))
                ch = mult * cfg.base_channels
            self.down.append(EncoderLevel(blocks, Downsample(ch) if level != last else nn.Identity()))
        self.mid = MidBlock(ch, groups)
        self.norm_out = nn.GroupNorm(groups, ch, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent -> image; `up[i]` is level i, so the list runs from the highest resolution to the lowest."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        groups = cfg.norm_groups
        ch = cfg.base_channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, groups)
        levels = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, mult * cfg.base_channels, groups))
                ch = mult * cfg.base_channels
            levels.insert(0, DecoderLevel(blocks, Upsample(ch) if level != 0 else nn.Identity()))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(groups, ch, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch, cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check(cfg: VAEConfig) -> None:
    """Reject widths that cannot be built, also in a config made in code rather than read by parse_config."""
    problem = vae_width_problem(cfg)
    if problem is not None:
        raise ConfigError(f"vae: {problem}")


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder that maps images to and from the diffusion latent space."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        _check(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> the posterior's (mean, logvar), each (B, latent_channels, h, w), unscaled."""
        return self.posterior(self.encoder(x))

    def posterior(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output -> the posterior's (mean, logvar), log-variance clamped as the LDM does."""
        mean, logvar = self.quant_conv(moments).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (already divided by scale_factor) -> image in about [-1, 1], unclamped."""
        return self.decoder(self.post_quant_conv(z))
