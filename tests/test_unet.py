"""The U-Net against diffusers' UNet2DConditionModel, loaded through diffusers' own single-file conversion."""

import itertools

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import nn

from sdcli.config import UNetConfig, load_config
from sdcli.errors import ConfigError
from sdcli.nets.unet import UNet

PREFIX = "model.diffusion_model."
CONTEXT_TOKENS = 5

# context_dim differs from every width so a transposed cross-attention projection cannot load
VARIANTS = {
    # SD 1.x style: fixed head count, 1x1-conv projections, no attention at the last level
    "sd1": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
        context_dim=24, num_heads=2, norm_groups=8,
    ),
    # SD 2.x style: fixed head width, linear projections, two transformer blocks per level
    "sd2": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
        context_dim=24, head_dim=16, linear_proj=True, transformer_depth=(2,), norm_groups=8,
    ),
    # head width with conv projections, attention at every level, odd in/out channels
    "mixed": UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
        context_dim=24, head_dim=8, norm_groups=4, in_channels=5, out_channels=3,
    ),
}


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial random values everywhere, norms and biases included, so a wrong mapping cannot hide."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                    p.normal_(1.0, 0.2)
                elif p.ndim == 1:
                    p.normal_(0.0, 0.2)
                else:
                    p.normal_(0.0, p[0].numel() ** -0.5)  # std 1/sqrt(fan_in) keeps activations near unit size
    return model.eval()


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config equivalent to `cfg`."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attends = [level in cfg.attention_levels for level in range(len(widths))]
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' attention_head_dim is a head count per level (a naming slip it keeps for SD configs)
        "attention_head_dim": [cfg.heads_at(w) for w in widths],
        "use_linear_projection": cfg.linear_proj,
        "transformer_layers_per_block": [cfg.depth_at(level) for level in range(len(widths))],
        "norm_num_groups": cfg.norm_groups,
    }


def reference(model: UNet, cfg: UNetConfig) -> UNet2DConditionModel:
    """Our weights as a single-file checkpoint, converted and loaded strictly by diffusers."""
    config = diffusers_config(cfg)
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(state, config)
    assert len(converted) == len(state), "every checkpoint tensor must map to exactly one diffusers tensor"
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def inputs(cfg: UNetConfig, size: tuple[int, int]):
    torch.manual_seed(1)
    x = torch.randn(2, cfg.in_channels, *size)
    context = torch.randn(2, CONTEXT_TOKENS, cfg.context_dim)
    timesteps = torch.tensor([999.0, 12.75])  # an integer step and a fractional one (Karras-style schedules)
    return x, timesteps, context


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    error = (ours - ref).abs().max().item()
    assert error <= 1e-4 * ref.abs().max().item(), f"max error {error}"


@pytest.mark.parametrize("size", [(8, 8), (9, 7)], ids=["even", "odd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers(variant, size):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = randomize(UNet(cfg))
    ref = reference(model, cfg)
    x, timesteps, context = inputs(cfg, size)
    with torch.no_grad():
        ours = model(x, timesteps, context)
        theirs = ref(x, timesteps, encoder_hidden_states=context).sample
    assert ours.shape == (2, cfg.out_channels, *size)
    assert_close(ours, theirs)


def test_one_timestep_serves_the_batch():
    cfg = VARIANTS["sd2"]
    torch.manual_seed(0)
    model = randomize(UNet(cfg))
    x, _, context = inputs(cfg, (8, 8))
    with torch.no_grad():
        shared = model(x, torch.tensor(500.5), context)
        each = model(x, torch.tensor([500.5, 500.5]), context)
    torch.testing.assert_close(shared, each, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_construction_then_assign_load(variant):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = randomize(UNet(cfg))
    with torch.device("meta"):
        lazy = UNet(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.load_state_dict(model.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in itertools.chain(lazy.parameters(), lazy.buffers()))
    x, timesteps, context = inputs(cfg, (9, 7))
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval()(x, timesteps, context), model(x, timesteps, context), rtol=0, atol=0)


def test_heads_must_divide_the_width():
    bad = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,), context_dim=24,
        head_dim=24, norm_groups=8,
    )
    message = "level 0 has 32 channels, not divisible by head_dim 24"
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        UNet(bad)


@pytest.mark.parametrize("name", ["sd15", "sd21-v"])
def test_bundled_configs_build_the_full_size_layout(name):
    """Full-size, on the meta device: the same tensors, names and shapes as diffusers' conversion expects."""
    cfg = load_config(name).unet
    config = diffusers_config(cfg)
    with torch.device("meta"):
        state = {PREFIX + k: v for k, v in UNet(cfg).state_dict().items()}
        expected = UNet2DConditionModel(**config).state_dict()
    converted = convert_ldm_unet_checkpoint(state, config)
    assert len(state) == len(converted)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_spatial_transformer_projects_out_in_its_input_layout(layout):
    """The tokens reach the 1x1 proj_out conv in the map's own layout: an NCHW network whose conv were handed
    the NHWC view of the tokens would run another conv kernel than diffusers' (full-size fp32 outputs then
    differed by 3e-5 instead of being bit-identical), and an NHWC one would pay a copy."""
    cfg = VARIANTS["sd1"]
    torch.manual_seed(0)
    block = randomize(UNet(cfg)).input_blocks[1][1]
    seen = []
    block.proj_out.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(memory_format=layout)))
    x = torch.randn(2, block.norm.num_channels, 6, 5).contiguous(memory_format=layout)
    with torch.no_grad():
        block(x, torch.randn(2, CONTEXT_TOKENS, cfg.context_dim))
    assert seen == [True]
