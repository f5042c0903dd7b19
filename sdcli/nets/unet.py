"""The LDM U-Net with spatial-transformer cross-attention (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), named as the CompVis/Stability checkpoints store it under
`model.diffusion_model.`, so those weights load by stripping the prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.config import UNetConfig, unet_width_problem
from sdcli.errors import ConfigError
from sdcli.nets.layers import Upsample, attention

# Fixed by the LDM architecture itself rather than by a model family, so they are not config fields.
TIME_EMBED_MULT = 4  # timestep embedding width over model_channels
FF_MULT = 4  # transformer feed-forward hidden width over its input width
MAX_PERIOD = 10000.0  # longest sinusoid period of the timestep embedding
RES_NORM_EPS = 1e-5  # GroupNorm eps of the res blocks and the output head
TRANSFORMER_NORM_EPS = 1e-6  # GroupNorm eps in front of each spatial transformer


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (Ho et al. 2020)."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=RES_NORM_EPS), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=RES_NORM_EPS),
            nn.SiLU(),
            nn.Identity(),  # the training-time dropout's slot, which keeps the conv at checkpoint index 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens over `context` (themselves when None)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # to_out.1 was a dropout

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, keys))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU up, linear down."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, FF_MULT * dim), nn.Identity(), nn.Linear(FF_MULT * dim, dim))  # .1: dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, then feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, keys)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, as a residual (the LDM's cross-attention)."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        heads = cfg.heads_at(channels)
        self.linear_proj = cfg.linear_proj
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        # SD 1.x projects with 1x1 convs before flattening, SD 2.x with linears after
        self.proj_in = nn.Linear(channels, channels) if cfg.linear_proj else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.context_dim, heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if cfg.linear_proj else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        # made contiguous once, or every LayerNorm and linear of the blocks would copy its transposed input
        y = y.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, C)
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, keys)
        if self.linear_proj:
            y = self.proj_out(y)
        # back in x's own layout, so proj_out's conv and the residual run as they would on x (the NHWC view
        # of the tokens would switch an NCHW network's conv kernel and its rounding)
        layout = torch.channels_last if x.dim() == 4 and x.stride(1) == 1 < x.stride(-1) else torch.contiguous_format
        y = y.transpose(1, 2).unflatten(2, (h, w)).contiguous(memory_format=layout)  # (B, C, h, w)
        if not self.linear_proj:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    """A stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Stage(nn.Sequential):
    """One entry of input_blocks/middle_block/output_blocks: each layer gets the inputs it needs."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size: torch.Size | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, keys)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _check(cfg: UNetConfig) -> None:
    """Reject widths that cannot be built, also in a config made in code rather than read by parse_config."""
    problem = unet_width_problem(cfg)
    if problem is not None:
        raise ConfigError(f"unet: {problem}")


class UNet(nn.Module):
    """The noise (or v) predictor: (B,C,h,w) latents, (B,) timesteps, (B,T,D) text context and, for a config
    with adm_in_channels, a (B, adm_in_channels) vector y (SDXL's pooled text and sizes) -> (B,C_out,h,w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        _check(cfg)
        self.model_channels = cfg.model_channels
        emb_channels = TIME_EMBED_MULT * cfg.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        if cfg.adm_in_channels is not None:  # generative-models' num_classes "sequential": label_emb.0.{0,2}
            embed = nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
            )
            self.label_emb = nn.Sequential(embed)

        def res(channels: int, out_channels: int) -> ResBlock:
            return ResBlock(channels, out_channels, emb_channels, cfg.norm_groups)

        ch = cfg.model_channels
        self.input_blocks = nn.ModuleList([Stage(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                self.input_blocks.append(Stage(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Stage(Downsample(ch)))
                skip_channels.append(ch)

        middle = SpatialTransformer(ch, cfg, cfg.depth_at(len(cfg.channel_mult) - 1))
        self.middle_block = Stage(res(ch, ch), middle, res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch, eps=RES_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(ch, cfg.out_channels, 3, padding=1),
        )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
        context_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Predict from latents `x` at `timesteps` (one per sample, or one for all) given text `context` (and
        the vector `y` when the U-Net has label_emb; `context_keys` (B, T) bool marks each sample's own
        context tokens when samples with contexts of different lengths share the call, padded)."""
        t = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        if hasattr(self, "label_emb"):
            emb = emb + self.label_emb(y.to(x.dtype))
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb, context, keys=context_keys)
            skips.append(h)
        h = self.middle_block(h, emb, context, keys=context_keys)
        for stage in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsampling stage aims at the next skip's size, so odd sizes come back exactly
            h = stage(h, emb, context, skips[-1].shape[-2:] if skips else None, context_keys)
        return self.out(h)
