"""Banded VAE decoding equals the whole-image decode and diffusers' decoder; memory is reused as claimed."""

import pytest
import torch
import torch.nn.functional as F
from test_vae import VARIANTS, randomize, reference

from sdcli.nets import bands
from sdcli.nets.bands import decode_in_bands
from sdcli.nets.vae import AutoencoderKL

# 1 pixel: every band one row (halo handling everywhere); 40: a few rows; 10**6: one band, the plain modules.
BAND_PIXELS = [1, 40, 10**6]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    cfg = VARIANTS[request.param]
    torch.manual_seed(0)
    return cfg, randomize(AutoencoderKL(cfg))


@pytest.mark.parametrize("band_pixels", BAND_PIXELS)
@pytest.mark.parametrize("size", [(4, 4), (5, 3), (9, 7)], ids=["even", "odd", "taller"])
def test_bands_equal_the_whole_decode(model, size, band_pixels):
    """Same arithmetic, only the order of the GroupNorm sums differs: equal to float32 rounding (1e-5)."""
    cfg, vae = model
    torch.manual_seed(1)
    z = torch.randn(2, cfg.latent_channels, *size)
    with torch.inference_mode():
        whole = vae.decode(z)
        banded = decode_in_bands(vae, z, band_pixels)
    assert banded.shape == whole.shape
    assert relative_error(banded, whole) <= 1e-5


def test_bands_match_diffusers(model):
    cfg, vae = model
    theirs = reference(vae, cfg)
    torch.manual_seed(2)
    z = torch.randn(1, cfg.latent_channels, 7, 6)
    with torch.inference_mode():
        expected = theirs.decode(z).sample
        banded = decode_in_bands(vae, z, band_pixels=3)
    assert relative_error(banded, expected) <= 1e-4


def test_channels_last_input_gives_the_same_image(model):
    cfg, vae = model
    torch.manual_seed(3)
    z = torch.randn(1, cfg.latent_channels, 6, 5)
    with torch.inference_mode():
        whole = vae.decode(z)
        banded = decode_in_bands(vae, z.contiguous(memory_format=torch.channels_last), band_pixels=20)
    assert relative_error(banded, whole) <= 1e-5


def test_bf16_bands_stay_close_to_fp32(model):
    """bf16 keeps 8 mantissa bits; through the whole decoder the image moves by about 1% of its range."""
    cfg, vae = model
    torch.manual_seed(4)
    z = torch.randn(1, cfg.latent_channels, 6, 6)
    low = AutoencoderKL(cfg).to(torch.bfloat16)
    low.load_state_dict(vae.state_dict())
    with torch.inference_mode():
        whole = vae.decode(z)
        banded = decode_in_bands(low.eval(), z.bfloat16(), band_pixels=10)
    assert banded.dtype == torch.bfloat16
    assert relative_error(banded, whole) <= 3e-2


def test_moments_are_the_whole_image_group_norm():
    torch.manual_seed(5)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    x = torch.randn(1, 16, 11, 7) * 3 + 2
    with torch.inference_mode():
        moments = bands.Moments.of(x, norm.num_groups, band_pixels=14)  # 2 rows per band, the last one row
        normed = F.batch_norm(x, *moments.per_channel(16, x.device), norm.weight, norm.bias, False, eps=norm.eps)
        expected = norm(x)
    assert relative_error(normed, expected) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_top_level_runs_inside_its_input(model, channels_last):
    """The memory claim: the top level's first block halves the width, so every block keeps its hidden
    activation and output in the upsampled input's own memory (overwritten band by band, the row above each
    band carried over); nothing of full size is allocated, and the result is still the plain blocks'."""
    cfg, vae = model
    level = vae.decoder.up[0]
    assert 2 * level.block[0].conv2.out_channels <= level.block[0].conv1.in_channels
    torch.manual_seed(6)
    x = torch.randn(1, level.block[0].conv1.in_channels, 9, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = x.clone()
        for block in level.block:
            expected = block(expected)
        out, _ = bands._level(level.block, x, None, cfg.norm_groups, band_pixels=16)  # 2 rows per band
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert relative_error(out, expected) <= 1e-5


def test_moments_of_a_constant_map():
    """With eps 0 GroupNorm's kernel reports rstd = inf for a flat group; its variance must come back as 0."""
    x = torch.full((1, 8, 5, 4), 3.0)
    x[:, 4:] = torch.randn(1, 4, 5, 4)
    mean, var = bands.Moments.of(x, groups=2, band_pixels=8).per_channel(8, x.device)
    assert torch.equal(mean[:4], torch.full((4,), 3.0)) and torch.equal(var[:4], torch.zeros(4))
    assert torch.isfinite(var).all()
