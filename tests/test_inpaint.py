"""Inpainting's parts alone: 9-channel checkpoints found and configured; masks made as diffusers' mask processor
makes them (resized, grayscale, binarised, blurred by its blur), refused when they repaint nothing; the outpainting
canvas and its mask; the latent-size mask, the masked image, the draw order of the generators, the 9-channel
concat and the 4-channel blend."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from inpaint_models import box_mask, init_picture, tiny_inpaint_config
from PIL import Image
from safetensors.torch import save_file

from sdcli.checkpoint import config_for_weights
from sdcli.config import load_config, parse_config
from sdcli.errors import ConfigError, RequestError
from sdcli.inpaint import Inpainting, concat_model, draw, latent_mask, masked_image, model_and_restore, restorer
from sdcli.masks import blurred, mask_tensor, outpaint, prepare, size_note

from reference import KEY_LISTS, read_key_list, tiny_config

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
INPAINTING = {"sd15-inpainting": "sd15", "sd2-inpainting": "sd21-base", "sdxl-inpainting": "sdxl"}


# --- checkpoints and configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, base", INPAINTING.items())
def test_inpainting_configs_are_their_base_with_a_9_channel_unet(name, base):
    config, plain = load_config(name), load_config(base)
    assert config.unet.in_channels == 9 and config.name == name
    same = dataclasses.replace(plain, name=name, description=config.description, weights=config.weights,
                               unet=dataclasses.replace(plain.unet, in_channels=9), source=config.source)  # fmt: skip
    assert config == same


def header_only(path, keys, input_shape):
    shapes = {UNET_INPUT: input_shape}
    save_file({key: torch.zeros(shapes.get(key, (0,)), dtype=torch.float16) for key in keys}, str(path))
    return path


@pytest.mark.parametrize("keys, config", [("sd15", "sd15-inpainting"), ("sd21-v", "sd2-inpainting"),
                                          ("sdxl", "sdxl-inpainting")])  # fmt: skip
def test_a_9_channel_unet_picks_the_inpainting_config(tmp_path, keys, config):
    names = list(read_key_list(KEY_LISTS[keys]))
    assert config_for_weights(header_only(tmp_path / "in.safetensors", names, (320, 9, 3, 3))) == config
    assert config_for_weights(header_only(tmp_path / "base.safetensors", names, (320, 4, 3, 3))) != config


def test_a_config_takes_4_or_9_unet_inputs_only():
    text = (load_config("sd15").source).read_text()
    assert parse_config(text.replace("unet:\n", "unet:\n  in_channels: 9\n")).unet.in_channels == 9
    with pytest.raises(ConfigError, match="unet.in_channels.*9 for an inpainting U-Net, got 5"):
        parse_config(text.replace("unet:\n", "unet:\n  in_channels: 5\n"))


# --- masks --------------------------------------------------------------------------------------------------


def soft_mask(size=(64, 64)) -> Image.Image:
    """Gray levels either side of the 0.5 cut (127/128 included), in colour, so grayscale conversion counts."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), (x + y) * 4 % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("size", [(64, 64), (80, 72), (37, 29)])
@pytest.mark.parametrize("blur", [0, 3])
def test_mask_is_diffusers_mask_processor(size, blur):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask = soft_mask(size)
    given = processor.blur(mask, blur) if blur else mask
    expected = processor.preprocess(given, height=48, width=64)
    got = mask_tensor(blurred(mask, blur), 64, 48, "m")
    assert got.dtype == torch.float32 and got.shape == (1, 1, 48, 64)
    assert torch.equal(got, expected)
    assert 0 < got.mean() < 1


def test_blur_rounds_the_mask_corners():
    sharp = mask_tensor(box_mask(), 64, 64, "m")
    soft = mask_tensor(blurred(box_mask(), 4), 64, 64, "m")
    corner, centre = (..., 12, 16), (..., 26, 30)  # the box's top-left pixel and its middle
    assert sharp[corner] == 1 and soft[corner] == 0 and soft[centre] == 1
    assert torch.equal(sharp[..., 26, :], soft[..., 26, :])  # a straight edge stays where it was


@pytest.mark.parametrize("level", [0, 127])
def test_a_mask_without_white_is_refused(level):
    with pytest.raises(RequestError, match="mask 'x.png': no white pixel at 64x48"):
        mask_tensor(Image.new("RGB", (64, 48), (level,) * 3), 64, 48, "'x.png'")


def test_a_mask_of_another_size_is_stretched_with_a_note(tmp_path):
    path = tmp_path / "small.png"
    box_mask(32, 32, (8, 8, 24, 24)).save(path)
    image, mask, notes = prepare(init_picture(), path, None, 0, 64, 64)
    assert notes == ["mask 'small.png' is 32x32 but the init image is 64x64: the mask is resized to fit"]
    assert mask[0, 0, 20:44, 20:44].all() and not mask[0, 0, :12].any()
    assert size_note(box_mask(), init_picture(), "m") is None


def test_a_bad_mask_file_is_named(tmp_path):
    path = tmp_path / "mask.png"
    path.write_bytes(b"not an image")
    with pytest.raises(RequestError, match="mask 'mask.png': not a PNG"):
        prepare(init_picture(), path, None, 0, 64, 64)


# --- outpainting --------------------------------------------------------------------------------------------


def test_outpainting_grows_the_canvas_from_its_edges():
    picture = init_picture(40, 24)
    canvas, mask = outpaint(picture, None, (8, 16, 0, 8))
    expected = np.pad(np.asarray(picture), ((16, 8), (8, 0), (0, 0)), mode="edge")
    assert canvas.size == (48, 48) and np.array_equal(np.asarray(canvas), expected)
    white = np.asarray(mask)[..., 0] == 255
    assert white[:16].all() and white[:, :8].all() and white[-8:].all() and not white[16:40, 8:].any()


def test_outpainting_keeps_the_given_mask_inside():
    picture = init_picture(48, 48)
    given = box_mask(24, 24, (0, 0, 12, 12))  # resized onto the image: its top-left quarter
    _, mask = outpaint(picture, given, (0, 0, 16, 0))
    white = np.asarray(mask)[..., 0] >= 128
    assert white[:24, :24].all() and not white[28:, :44].any() and white[:, 48:].all()


def test_an_outpainting_pad_alone_is_a_mask():
    image, mask, notes = prepare(init_picture(48, 64), None, (0, 0, 16, 0), 0, 64, 64)
    assert image.size == (64, 64) and notes == []
    assert mask[0, 0, :, 48:].all() and not mask[0, 0, :, :48].any()


# --- the inpainting math ------------------------------------------------------------------------------------


def test_latent_mask_is_nearest_and_masked_image_is_grey_there():
    mask = mask_tensor(box_mask(), 64, 64, "m")
    small = latent_mask(mask, 8)
    assert small.shape == (1, 1, 8, 8) and torch.equal(small, mask[:, :, ::8, ::8])
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    grey = masked_image(image, mask)
    assert torch.equal(grey, torch.where(mask.bool(), 0.0, image))


def recording_encode(calls: list[str]):
    """An encode whose latents are its own posterior noise (one draw per image): what it drew shows the order."""

    def encode(images, generators):
        calls.append("encode")
        return torch.cat([torch.randn((1, 4, images.shape[2] // 2, images.shape[3] // 2), generator=g)
                          for g in generators])  # fmt: skip

    return encode


@pytest.mark.parametrize("channels, full, order", [
    (9, True, ["noise", "masked"]), (9, False, ["image", "noise", "masked"]),
    (4, True, ["image", "noise", "skipped"]), (4, False, ["image", "noise", "skipped"]),
])  # fmt: skip
def test_generators_are_drawn_in_diffusers_order(channels, full, order):
    config = tiny_inpaint_config("sd1", channels)
    calls: list[str] = []
    images, masks = torch.zeros(2, 3, 16, 16), torch.ones(2, 1, 16, 16)
    seeds = (5, 6)
    got = draw(images, masks, [torch.Generator().manual_seed(s) for s in seeds], recording_encode(calls), config,
               full, torch.device("cpu"), torch.float32)  # fmt: skip
    draws = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for name in [*order, "after"]:
            draws.setdefault(name, []).append(torch.randn((1, 4, 8, 8), generator=g))
    drawn = {name: torch.cat(d) for name, d in draws.items()}
    assert torch.equal(got.noise, drawn["noise"])
    assert got.image_latents is None if "image" not in order else torch.equal(got.image_latents, drawn["image"])
    assert got.masked_latents is None if channels == 4 else torch.equal(got.masked_latents, drawn["masked"])
    assert got.mask.shape == (2, 1, 8, 8) and calls.count("encode") == order.count("image") + order.count("masked")


def test_the_9_channel_model_sees_mask_and_masked_latents_on_every_row():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    inpainting = Inpainting(mask, torch.randn(1, 4, 4, 4), None, torch.randn(1, 4, 4, 4))
    seen = []

    def guided(x, t):  # stands in for CFG's batching: both rows get the same concat inputs
        seen.append(torch.cat([x, x]))
        return x[:, :4] * 2

    model, restore = model_and_restore(guided, inpainting)
    out = model(torch.ones(1, 4, 4, 4), torch.tensor(1.0))
    assert restore is None and torch.equal(out, torch.full((1, 4, 4, 4), 2.0))
    (rows,) = seen
    assert rows.shape == (2, 9, 4, 4)
    for row in rows:
        assert torch.equal(row[4:5], mask[0]) and torch.equal(row[5:], inpainting.masked_latents[0])
    assert concat_model(guided, inpainting)(torch.zeros(1, 4, 4, 4), torch.tensor(2.0)).shape == (1, 4, 4, 4)


def test_the_4_channel_blend_keeps_the_init_latents_outside_the_mask():
    mask = (torch.rand(1, 1, 4, 4) > 0.5).float()
    inpainting = Inpainting(mask, torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), None)
    model, restore = model_and_restore(lambda x, t: x, inpainting)
    x = torch.randn(1, 4, 4, 4)
    last = restore(x, torch.tensor(1.0), torch.tensor(0.0))
    assert torch.equal(last, torch.where(mask.bool(), x, inpainting.image_latents))
    alpha, sigma = torch.tensor(0.8), torch.tensor(0.6)
    noised = restorer(inpainting)(x, alpha, sigma)
    kept = alpha * inpainting.image_latents + sigma * inpainting.noise
    assert torch.equal(noised, torch.where(mask.bool(), x, kept))


def test_tiny_inpaint_config_is_tiny_config_with_9_inputs():
    assert tiny_inpaint_config("sdxl").unet == dataclasses.replace(tiny_config("sdxl").unet, in_channels=9)
