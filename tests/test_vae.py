"""The VAE against diffusers' AutoencoderKL, loaded through diffusers' own single-file conversion."""

import itertools

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from torch import nn

from sdcli.config import VAEConfig, load_config
from sdcli.errors import ConfigError
from sdcli.nets.vae import AutoencoderKL

PREFIX = "first_stage_model."

VARIANTS = {
    "one_down": VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    # two downsamplings, a level that keeps its width (no shortcut conv), odd latent width
    "two_down": VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=4, latent_channels=3),
}


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial random values everywhere, norms and biases included, so a wrong mapping cannot hide."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.GroupNorm) and name == "weight":
                    p.normal_(1.0, 0.2)
                elif p.ndim == 1:
                    p.normal_(0.0, 0.2)
                else:
                    p.normal_(0.0, p[0].numel() ** -0.5)  # std 1/sqrt(fan_in) keeps activations near unit size
    return model.eval()


def diffusers_config(cfg: VAEConfig) -> dict:
    """The diffusers AutoencoderKL config equivalent to `cfg`."""
    levels = len(cfg.channel_mult)
    return {
        "in_channels": cfg.image_channels,
        "out_channels": cfg.image_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scale_factor,
    }


def reference(model: AutoencoderKL, cfg: VAEConfig) -> DiffusersAutoencoderKL:
    """Our weights as a single-file checkpoint, converted and loaded strictly by diffusers."""
    config = diffusers_config(cfg)
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(state, config)
    assert len(converted) == len(state), "every checkpoint tensor must map to exactly one diffusers tensor"
    ref = DiffusersAutoencoderKL(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    error = (ours - ref).abs().max().item()
    assert error <= 1e-4 * ref.abs().max().item(), f"max error {error}"


@pytest.fixture(params=list(VARIANTS))
def pair(request):
    cfg = VARIANTS[request.param]
    torch.manual_seed(0)
    model = randomize(AutoencoderKL(cfg))
    return cfg, model, reference(model, cfg)


@pytest.mark.parametrize("size", [(4, 4), (5, 3)], ids=["even", "odd"])
def test_decode_matches_diffusers(pair, size):
    cfg, model, ref = pair
    torch.manual_seed(1)
    z = torch.randn(2, cfg.latent_channels, *size)
    with torch.no_grad():
        ours = model.decode(z)
        theirs = ref.decode(z).sample
    assert ours.shape == (2, cfg.image_channels, *(s * cfg.downsample for s in size))
    assert_close(ours, theirs)


@pytest.mark.parametrize("size", [(16, 12), (13, 9)], ids=["even", "odd"])
def test_encode_matches_diffusers(pair, size):
    cfg, model, ref = pair
    torch.manual_seed(1)
    x = torch.rand(2, cfg.image_channels, *size) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(x)
        posterior = ref.encode(x).latent_dist
    assert_close(mean, posterior.mean)
    assert_close(logvar, posterior.logvar)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_construction_then_assign_load(variant):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = randomize(AutoencoderKL(cfg))
    with torch.device("meta"):
        lazy = AutoencoderKL(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in itertools.chain(lazy.parameters(), lazy.buffers()))
    z = torch.randn(1, cfg.latent_channels, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval().decode(z), model.decode(z), rtol=0, atol=0)


def test_norm_groups_must_divide_the_width():
    bad = VAEConfig(base_channels=12, channel_mult=(1, 2), norm_groups=8)
    message = "level 0 has 12 channels, not divisible by norm_groups 8"
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        AutoencoderKL(bad)


@pytest.mark.parametrize("name", ["sd15", "sd21-v"])
def test_bundled_configs_build_the_full_size_layout(name):
    """Full-size, on the meta device: the same tensors, names and shapes as diffusers' conversion expects."""
    cfg = load_config(name).vae
    config = diffusers_config(cfg)
    with torch.device("meta"):
        state = {PREFIX + k: v for k, v in AutoencoderKL(cfg).state_dict().items()}
        expected = DiffusersAutoencoderKL(**config).state_dict()
    converted = convert_ldm_vae_checkpoint(state, config)
    assert len(state) == len(converted)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}
