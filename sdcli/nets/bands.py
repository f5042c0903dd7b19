"""The VAE decoder run over horizontal bands of rows, so memory stays flat as images grow.

A whole-image decode holds several full-resolution activations at once (a norm output, its SiLU, a conv
input copy); at 1024x1024 that is gigabytes. Here every 3x3 conv reads its input band plus one halo row
above and below, GroupNorm uses statistics of the whole image (computed in a cheap pass before the band
loop), and a res block writes its output over its own input. So at most two full-resolution tensors live
at a time, and the result equals `AutoencoderKL.decode` to float rounding: no tile seams, no approximation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.nets.layers import Upsample
from sdcli.nets.vae import AutoencoderKL, Decoder, ResnetBlock

BAND_PIXELS = 1 << 15  # output pixels per band: convs stay as fast as whole-image ones, temporaries stay ~50 MB


def decode_in_bands(vae: AutoencoderKL, z: Tensor, band_pixels: int = BAND_PIXELS) -> Tensor:
    """Raw latent (B, C, h, w) -> image, equal to `vae.decode(z)`; one image and one band of rows at a time."""
    z = vae.post_quant_conv(z)
    return torch.cat([_decode_one(vae.decoder, z[i : i + 1], band_pixels) for i in range(z.shape[0])])


def _decode_one(decoder: Decoder, z: Tensor, band_pixels: int) -> Tensor:
    """Decoder.forward for one image, maps larger than a band going through the banded layers."""
    h = decoder.mid(decoder.conv_in(z))  # latent resolution: small, and the attention needs it whole
    for level in reversed(decoder.up):
        for block in level.block:
            h = block(h) if _fits(h.shape, band_pixels) else _resnet(block, h, band_pixels)
        if isinstance(level.upsample, Upsample):
            small = _fits((2 * h.shape[2], 2 * h.shape[3]), band_pixels)
            h = level.upsample(h) if small else _upsample(level.upsample, h, band_pixels)
    if _fits(h.shape, band_pixels):
        return decoder.conv_out(F.silu(decoder.norm_out(h)))
    out = _empty_like(h, decoder.conv_out.out_channels)
    moments = _moments(h, decoder.norm_out, band_pixels)
    for top, bottom in _bands(h, band_pixels):
        out[:, :, top:bottom] = _conv_rows(decoder.conv_out, h, top, bottom, decoder.norm_out, moments)
    return out


def _fits(shape, band_pixels: int) -> bool:
    """Whether a map of this height and width is one band anyway: then the plain module runs it."""
    return shape[-2] * shape[-1] <= band_pixels


def _resnet(block: ResnetBlock, x: Tensor, band_pixels: int) -> Tensor:
    """`block(x)`, band by band; consumes x, whose memory receives the output when it is wide enough."""
    hidden = _empty_like(x, block.conv1.out_channels)
    moments = _moments(x, block.norm1, band_pixels)
    for top, bottom in _bands(x, band_pixels):
        hidden[:, :, top:bottom] = _conv_rows(block.conv1, x, top, bottom, block.norm1, moments)
    moments = _moments(hidden, block.norm2, band_pixels)
    width = block.conv2.out_channels
    out = _reuse(x, width) if width <= x.shape[1] else _empty_like(x, width)
    for top, bottom in _bands(x, band_pixels):
        # the skip reads only this band's rows of x, which are taken before out (x's memory) is written
        skip = block.nin_shortcut(x[:, :, top:bottom])
        out[:, :, top:bottom] = skip + _conv_rows(block.conv2, hidden, top, bottom, block.norm2, moments)
    return out


def _upsample(up: Upsample, x: Tensor, band_pixels: int) -> Tensor:
    """`up(x)`: nearest 2x then a 3x3 conv, computed per output band from the input rows it needs."""
    height = 2 * x.shape[2]
    out = _empty_like(x, up.conv.out_channels, (height, 2 * x.shape[3]))
    for top, bottom in _bands(out, band_pixels):
        first, last = max(top - 1, 0), min(bottom + 1, height)  # upsampled rows the conv reads
        rows = F.interpolate(x[:, :, first // 2 : (last + 1) // 2], scale_factor=2.0, mode="nearest")
        rows = rows[:, :, first % 2 :][:, :, : last - first]
        out[:, :, top:bottom] = _conv_band(up.conv, rows, top == 0, bottom == height)
    return out


def _conv_rows(conv: nn.Conv2d, x: Tensor, top: int, bottom: int, norm: nn.GroupNorm, moments) -> Tensor:
    """Rows top:bottom of conv(silu(norm(x))) for a 3x3 conv, from x's rows top-1:bottom+1."""
    rows = _norm_silu(x[:, :, max(top - 1, 0) : bottom + 1], norm, moments)
    return _conv_band(conv, rows, top == 0, bottom == x.shape[2])


def _conv_band(conv: nn.Conv2d, rows: Tensor, at_top: bool, at_bottom: bool) -> Tensor:
    """A 3x3 conv over a band whose halo rows stand in for the vertical zero padding, except at the image's
    edges; there the conv pads both sides itself and the one row that saw a false zero is dropped."""
    pad = int(at_top or at_bottom)
    out = F.conv2d(rows, conv.weight, conv.bias, padding=(pad, conv.padding[1]))
    if pad and not at_top:
        return out[:, :, 1:]
    if pad and not at_bottom:
        return out[:, :, :-1]
    return out


def _moments(x: Tensor, norm: nn.GroupNorm, band_pixels: int) -> tuple[Tensor, Tensor]:
    """Whole-image GroupNorm (mean, var), repeated per channel as float32 (C,).

    Each band's moments come from torch's own GroupNorm kernel (the fastest reduction it has), in float32
    also for bf16 activations, and are merged in float64 (Chan et al. 1979)."""
    groups, count = norm.num_groups, 0
    mean = torch.zeros(groups, dtype=torch.float64)
    m2 = torch.zeros(groups, dtype=torch.float64)  # sum of squared deviations from the mean
    for top, bottom in _bands(x, band_pixels):
        band = x[:, :, top:bottom].float()
        pixels = band[0, 0].numel()
        n_b = pixels * (x.shape[1] // groups)
        _, mean_b, rstd_b = torch.native_group_norm(band, None, None, 1, x.shape[1], pixels, groups, norm.eps)
        mean_b, var_b = mean_b.cpu().double().flatten(), rstd_b.cpu().double().flatten() ** -2 - norm.eps
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + var_b * n_b + delta**2 * (count * n_b / total)
        count = total
    per_channel = x.shape[1] // groups
    return tuple(m.float().repeat_interleave(per_channel).to(x.device) for m in (mean, m2 / count))


def _norm_silu(x: Tensor, norm: nn.GroupNorm, moments: tuple[Tensor, Tensor]) -> Tensor:
    """silu(norm(x)) for a band, from whole-image moments: eval-mode batch norm with per-channel statistics
    is the same affine map, in one fused kernel."""
    mean, var = moments
    y = F.batch_norm(x, mean, var, norm.weight.float(), norm.bias.float(), training=False, eps=norm.eps)
    return F.silu(y, inplace=True)


def _bands(x: Tensor, band_pixels: int) -> list[tuple[int, int]]:
    """(top, bottom) row ranges covering x's height, each about band_pixels pixels."""
    height, width = x.shape[2:]
    rows = max(1, band_pixels // width)
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _format(x: Tensor) -> torch.memory_format:
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _empty_like(x: Tensor, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """A new (1, channels, *size) tensor in x's dtype, device and layout; size defaults to x's."""
    shape = (1, channels, *(size or x.shape[2:]))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(x))


def _reuse(x: Tensor, channels: int) -> Tensor:
    """A (1, channels, H, W) tensor over the start of x's memory, in x's layout (channels <= x's).

    Safe for a band loop that reads x only at the band's own rows before writing them: in NCHW each output
    element sits on the input element of the same place, in NHWC the written prefix stays behind the rows
    still to be read."""
    size = (1, channels, *x.shape[2:])
    stride = torch.empty(size, device="meta", memory_format=_format(x)).stride()
    return x.as_strided(size, stride)
