"""The VAE decoder and encoder run over horizontal bands of rows, so memory stays flat as images grow.

A whole-image decode holds several full-resolution activations at once (a norm output, its SiLU, a conv
input copy); at 1024x1024 that is gigabytes. Here every 3x3 conv reads its input band plus one halo row
above and below, GroupNorm uses statistics of the whole image (gathered band by band as each map is made,
so they are known before the next layer starts), and res blocks write into memory the level already has.
So the largest map, the last upsampling's output, is about all that is held, and the result equals
`AutoencoderKL.decode` to float rounding: no tile seams, no approximation. The encoder goes the same way down:
its first conv, res blocks and stride-2 downsampling convs band by band, the whole-image maps being its input
resolution's two (a level's input and a res block's hidden map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.nets.layers import Upsample
from sdcli.nets.vae import AutoencoderKL, Decoder, Downsample, Encoder, ResnetBlock

BAND_PIXELS = 1 << 15  # output pixels per band: convs stay as fast as whole-image ones, temporaries stay ~50 MB


def decode_in_bands(vae: AutoencoderKL, z: Tensor, band_pixels: int = BAND_PIXELS) -> Tensor:
    """Raw latent (B, C, h, w) -> image, equal to `vae.decode(z)`; one image and one band of rows at a time."""
    z = vae.post_quant_conv(z)
    return torch.cat([_decode_one(vae.decoder, z[i : i + 1], band_pixels) for i in range(z.shape[0])])


def encode_in_bands(vae: AutoencoderKL, x: Tensor, band_pixels: int = BAND_PIXELS) -> tuple[Tensor, Tensor]:
    """Image (B, 3, H, W) in [-1, 1] -> the posterior's (mean, logvar), equal to `vae.encode(x)`; one image and
    one band of rows at a time."""
    return vae.posterior(torch.cat([_encode_one(vae.encoder, x[i : i + 1], band_pixels) for i in range(x.shape[0])]))


class Moments:
    """Per-group mean and variance of a map, merged band by band as the bands are made (Chan et al. 1979).

    Each band's own moments come from torch's GroupNorm kernel (its fastest reduction, run here with eps 0
    so the variance comes back exactly from rstd), in float32 also for bf16 maps; the merge is float64."""

    def __init__(self, groups: int):
        self.groups, self.count = groups, 0
        self.mean = torch.zeros(groups, dtype=torch.float64)
        self.m2 = torch.zeros(groups, dtype=torch.float64)  # sum of squared deviations from the mean

    def add(self, band: Tensor) -> Tensor:
        """Fold in a band (1, C, rows, W); returns it, so a producer can pass it on."""
        pixels = band[0, 0].numel()
        _, mean, rstd = torch.native_group_norm(band.float(), None, None, 1, band.shape[1], pixels, self.groups, 0.0)
        mean, var = mean.cpu().double().flatten(), rstd.cpu().double().flatten() ** -2
        n = pixels * (band.shape[1] // self.groups)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta**2 * (self.count * n / total)
        self.count = total
        return band

    def per_channel(self, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(mean, var) of each channel's group, float32 (C,)."""
        repeat = channels // self.groups
        return tuple(m.float().repeat_interleave(repeat).to(device) for m in (self.mean, self.m2 / self.count))

    @classmethod
    def of(cls, x: Tensor, groups: int, band_pixels: int) -> Moments:
        """The moments of a map made whole by a plain module."""
        moments = cls(groups)
        for top, bottom in _bands(x, band_pixels):
            moments.add(x[:, :, top:bottom])
        return moments


def _decode_one(decoder: Decoder, z: Tensor, band_pixels: int) -> Tensor:
    """Decoder.forward for one image, maps larger than a band going through the banded layers."""
    norm = decoder.norm_out
    groups = norm.num_groups  # every GroupNorm of the decoder has VAEConfig.norm_groups
    h, moments = decoder.mid(decoder.conv_in(z)), None  # latent resolution: small, the attention needs it whole
    for level in reversed(decoder.up):
        h, moments = _level(level.block, h, moments, groups, band_pixels)
        if isinstance(level.upsample, Upsample):
            h = _compact(h)  # on a line of its own, so the wider buffer goes before the 4x larger output comes
            if _fits((2 * h.shape[2], 2 * h.shape[3]), band_pixels):
                h, moments = level.upsample(h), None
            else:
                h, moments = _upsample(level.upsample, h, groups, band_pixels)
    if _fits(h.shape, band_pixels):
        return decoder.conv_out(F.silu(norm(h)))
    stats = (moments or Moments.of(h, groups, band_pixels)).per_channel(h.shape[1], h.device)
    out = _empty_like(h, decoder.conv_out.out_channels)
    for top, bottom in _bands(h, band_pixels):
        out[:, :, top:bottom] = _conv_rows(decoder.conv_out, h, top, bottom, norm, stats)
    return out


def _encode_one(encoder: Encoder, x: Tensor, band_pixels: int) -> Tensor:
    """Encoder.forward for one image, maps larger than a band going through the banded layers."""
    norm = encoder.norm_out
    groups = norm.num_groups  # every GroupNorm of the encoder has VAEConfig.norm_groups
    h, moments = _conv_in(encoder.conv_in, x, groups, band_pixels)
    for level in encoder.down:
        h, moments = _level(level.block, h, moments, groups, band_pixels)
        if isinstance(level.downsample, Downsample):
            h = _compact(h)
            if _fits(h.shape, band_pixels):
                h, moments = level.downsample(h), None
            else:
                h, moments = _downsample(level.downsample, h, groups, band_pixels)
    h = encoder.mid(h)  # the lowest resolution: small, the attention needs it whole
    if _fits(h.shape, band_pixels):
        return encoder.conv_out(F.silu(norm(h)))
    stats = Moments.of(h, groups, band_pixels).per_channel(h.shape[1], h.device)
    out = _empty_like(h, encoder.conv_out.out_channels)
    for top, bottom in _bands(h, band_pixels):
        out[:, :, top:bottom] = _conv_rows(encoder.conv_out, h, top, bottom, norm, stats)
    return out


def _conv_in(conv: nn.Conv2d, x: Tensor, groups: int, band_pixels: int) -> tuple[Tensor, Moments | None]:
    """`conv(x)` for a 3x3 conv with no norm before it, per band of output rows, gathering the output's moments."""
    if _fits(x.shape, band_pixels):
        return conv(x), None
    out, moments = _empty_like(x, conv.out_channels), Moments(groups)
    for top, bottom in _bands(x, band_pixels):
        rows = x[:, :, max(top - 1, 0) : bottom + 1]
        out[:, :, top:bottom] = moments.add(_conv_band(conv, rows, top == 0, bottom == x.shape[2]))
    return out, moments


def _downsample(down: Downsample, x: Tensor, groups: int, band_pixels: int) -> tuple[Tensor, Moments]:
    """`down(x)`: a zero row and column after the last, then a stride-2 3x3 conv; output rows top:bottom read
    input rows 2*top to 2*bottom, the zero row standing in for the one past x's bottom."""
    size = ((x.shape[2] - 2) // 2 + 1, (x.shape[3] - 2) // 2 + 1)
    out, moments = _empty_like(x, down.conv.out_channels, size), Moments(groups)
    for top, bottom in _bands(out, band_pixels):
        rows = x[:, :, 2 * top : 2 * bottom + 1]
        rows = F.pad(rows, (0, 1, 0, 2 * (bottom - top) + 1 - rows.shape[2]))
        out[:, :, top:bottom] = moments.add(F.conv2d(rows, down.conv.weight, down.conv.bias, stride=2))
    return out, moments


def _fits(shape, band_pixels: int) -> bool:
    """Whether a map of this height and width is one band anyway: then the plain module runs it."""
    return shape[-2] * shape[-1] <= band_pixels


def _level(
    blocks, buffer: Tensor, moments: Moments | None, groups: int, band_pixels: int
) -> tuple[Tensor, Moments | None]:
    """A level's res blocks, consuming `buffer`, their input (with its moments when known); returns the output
    and its moments. A block whose output is at most half as wide as the buffer keeps its hidden activation
    in the buffer's low channels and its output in the high ones, so after an upsampling (256 channels into
    128-channel blocks, at 1024x1024 a 1 GiB map) the whole level runs inside the upsampled map's memory."""
    x = buffer
    for block in blocks:
        if _fits(x.shape, band_pixels):
            x = buffer = block(x)
            moments = None
            continue
        moments = moments or Moments.of(x, groups, band_pixels)
        width, channels = buffer.shape[1], block.conv2.out_channels
        if 2 * channels <= width:
            # x is the whole buffer (then overwritten as the band loop passes) or a high slot, off the low one
            hidden, out = buffer[:, :channels], buffer[:, width - channels :]
            x, moments = _resnet(block, x, moments, hidden, out, band_pixels, consumed=x.shape[1] == width)
        else:
            out = x[:, :channels] if channels <= x.shape[1] else _empty_like(x, channels)
            x, moments = _resnet(block, x, moments, _empty_like(x, channels), out, band_pixels, consumed=False)
            buffer = x
    return x, moments


def _resnet(
    block: ResnetBlock, x: Tensor, moments: Moments, hidden: Tensor, out: Tensor, band_pixels: int, consumed: bool
) -> tuple[Tensor, Moments]:
    """`block(x)` into `out`, band by band, with conv1's result kept in `hidden`; returns out and its moments.

    `out` may be x itself or its leading channels: each band's skip is read before the band is written.
    With `consumed`, hidden and out overwrite x row by row during the first pass, so the skip is taken then,
    and the row above each band, which the overwrite has destroyed, is carried over from the band before."""
    stats = moments.per_channel(x.shape[1], x.device)
    hidden_moments, out_moments = Moments(moments.groups), Moments(moments.groups)
    above = None
    for top, bottom in _bands(x, band_pixels):
        h = hidden_moments.add(_conv_rows(block.conv1, x, top, bottom, block.norm1, stats, above))
        if consumed:  # then x is wider than out: the skip is a conv, a tensor of its own
            skip = block.nin_shortcut(x[:, :, top:bottom])
            above = x[:, :, bottom - 1 : bottom].clone()
            out[:, :, top:bottom] = skip
        hidden[:, :, top:bottom] = h
    stats = hidden_moments.per_channel(hidden.shape[1], x.device)
    for top, bottom in _bands(x, band_pixels):
        h = _conv_rows(block.conv2, hidden, top, bottom, block.norm2, stats)
        # the skip is this band's rows of x (or what consumed kept of them), read before out is written
        skip = out[:, :, top:bottom] if consumed else block.nin_shortcut(x[:, :, top:bottom])
        out[:, :, top:bottom] = out_moments.add(skip + h)
    return out, out_moments


def _compact(x: Tensor) -> Tensor:
    """x in memory of its own size, so a larger buffer it is a slot of can be freed."""
    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return x.clone(memory_format=_format(x))
    return x


def _upsample(up: Upsample, x: Tensor, groups: int, band_pixels: int) -> tuple[Tensor, Moments]:
    """`up(x)`: nearest 2x then a 3x3 conv, computed per output band from the input rows it needs."""
    height = 2 * x.shape[2]
    out = _empty_like(x, up.conv.out_channels, (height, 2 * x.shape[3]))
    moments = Moments(groups)
    for top, bottom in _bands(out, band_pixels):
        first, last = max(top - 1, 0), min(bottom + 1, height)  # upsampled rows the conv reads
        rows = F.interpolate(x[:, :, first // 2 : (last + 1) // 2], scale_factor=2.0, mode="nearest")
        rows = rows[:, :, first % 2 :][:, :, : last - first]
        out[:, :, top:bottom] = moments.add(_conv_band(up.conv, rows, top == 0, bottom == height))
    return out, moments


def _conv_rows(
    conv: nn.Conv2d, x: Tensor, top: int, bottom: int, norm: nn.GroupNorm, stats, above: Tensor | None = None
) -> Tensor:
    """Rows top:bottom of conv(silu(norm(x))) for a 3x3 conv, from x's rows top-1:bottom+1 and per-channel
    (mean, var) `stats` of the whole of x; `above` stands in for row top-1 when x's own has been overwritten."""
    rows = x[:, :, max(top - 1, 0) : bottom + 1]
    if above is not None and top > 0:
        rows = torch.cat([above, x[:, :, top : bottom + 1]], dim=2)
    # a band of a channel slot is not dense; batch norm would first copy it into NCHW, 6x slower than this
    rows = rows.contiguous(memory_format=_format(x))
    return _conv_band(conv, _norm_silu(rows, norm, stats), top == 0, bottom == x.shape[2])


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


def _norm_silu(x: Tensor, norm: nn.GroupNorm, stats: tuple[Tensor, Tensor]) -> Tensor:
    """silu(norm(x)) for a band, from whole-image per-channel (mean, var): eval-mode batch norm with those
    statistics is the same affine map, in one fused kernel."""
    mean, var = stats
    y = F.batch_norm(x, mean, var, norm.weight.float(), norm.bias.float(), training=False, eps=norm.eps)
    return F.silu(y, inplace=True)


def _bands(x: Tensor, band_pixels: int) -> list[tuple[int, int]]:
    """(top, bottom) row ranges covering x's height, each about band_pixels pixels."""
    height, width = x.shape[2:]
    rows = max(1, band_pixels // width)
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _format(x: Tensor) -> torch.memory_format:
    """x's layout, also when x is a channel slot of a wider map (then no layout is contiguous)."""
    nhwc = x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1
    return torch.channels_last if nhwc else torch.contiguous_format


def _empty_like(x: Tensor, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """A new (1, channels, *size) tensor in x's dtype, device and layout; size defaults to x's."""
    shape = (1, channels, *(size or x.shape[2:]))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(x))
