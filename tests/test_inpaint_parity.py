"""Inpainting renders against diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline: tiny SD
1.x, SD 2.x (epsilon and v-prediction) and SDXL models with a 9-channel (inpainting) U-Net and with a plain 4-channel
one (blended), the same single file, init image, mask, seed and settings, several samplers, strengths 0.75 and 1 (and
SDXL's default 0.9999); outpainting and a blurred mask; and checks that would catch a vacuous pass: the kept area of a
blended render is the init image's, an inpainting render is no img2img render, a 9-channel U-Net reads its mask.

sdcli's side is composed here from the pipeline's stages (conditioning, encode, decode), inpaint.draw and the
samplers, as Pipeline.latents is to compose it for a request with a mask."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from inpaint_models import box_mask, diffusers_inpaint_pipeline, init_picture, tiny_inpaint_config
from PIL import Image

from sdcli.images import image_tensor, pixels, read_image
from sdcli.inpaint import draw, model_and_restore
from sdcli.masks import blurred, mask_tensor
from sdcli.pipeline import Pipeline
from sdcli.request import Request
from sdcli.samplers import sample, start_step

from reference import diffusers_scheduler, psnr, tiny_config, torch_threads, write_random_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices raised inside diffusers
PROMPT, NEGATIVE = "a red fox in the snow, highly detailed", "blurry"
SEED, STEPS, SIZE = 7, 5, 64
V = "v_prediction"
MODELS = {"sd1-9": ("sd1", 9), "sd1-4": ("sd1", 4), "sdxl-9": ("sdxl", 9), "sdxl-4": ("sdxl", 4),
          "sd2-9": ("sd2", 9), "sd2-4": ("sd2", 4), "sd2v-9": ("sd2", 9, V), "sd2v-4": ("sd2", 4, V)}  # fmt: skip
BLENDS = "restore" in inspect.signature(sample).parameters  # the samplers' hook for 4-channel blending


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def both(request, tmp_path_factory):
    """sdcli's and diffusers' pipelines over one tiny checkpoint, and the init image and mask as files."""
    family, channels, *prediction = MODELS[request.param]
    config = tiny_config(family, *prediction)
    if channels == 9:
        wide = dataclasses.replace(config.unet, in_channels=tiny_inpaint_config(family).unet.in_channels)
        config = dataclasses.replace(config, name=f"{config.name}-inpaint", unet=wide)
    folder = tmp_path_factory.mktemp(f"inpaint-{request.param}")
    path = write_random_checkpoint(config, folder / "tiny.safetensors", dtype=torch.float32, seed=3)
    init_picture().save(folder / "init.png")
    box_mask().save(folder / "mask.png")
    with torch_threads(1):
        ours = Pipeline.load(config, path, device="cpu", dtype="fp32")
        theirs = diffusers_inpaint_pipeline(config, path, "euler")
    return config, ours, theirs, folder


def render_theirs(config, theirs, sampler, image, mask, strength, *, seed=SEED):
    theirs.scheduler = diffusers_scheduler(config, sampler)
    with torch.no_grad():
        out = theirs(
            PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=config.defaults.guidance, strength=strength, width=SIZE, height=SIZE,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def render_ours(config, ours, sampler, image, mask, strength, *, seed=SEED, blend=True):
    """sdcli's render, its final latents and its inpainting inputs; `blend` False runs plain img2img instead."""
    request = Request(PROMPT, NEGATIVE, seed, STEPS, config.defaults.guidance, sampler, SIZE, SIZE)
    cond, uncond = ours.conditioning([PROMPT, NEGATIVE], [request, request]).split(1)
    generators = [torch.Generator().manual_seed(seed)]
    with torch.inference_mode():
        inpainting = draw(image_tensor(image, SIZE, SIZE), mask_tensor(mask, SIZE, SIZE, "m"), generators, ours.encode,
                          config, strength == 1, ours.device, ours.dtype)  # fmt: skip
        model, restore = model_and_restore(ours.guided_model(cond, uncond, config.defaults.guidance), inpainting)
        init = None if strength == 1 else inpainting.image_latents
        blending = {"restore": restore} if restore is not None and blend else {}
        latents = sample(sampler, model, inpainting.noise, STEPS, config.schedule, generators, None, init,
                         start_step(STEPS, strength), **blending)  # fmt: skip
        return pixels(ours.decode(latents))[0].numpy(), latents, inpainting


def pictures(folder):
    """The init image and mask as sdcli reads them, then as diffusers' load_image does."""
    from diffusers.utils import load_image

    ours = read_image(folder / "init.png"), read_image(folder / "mask.png", "mask")
    return *ours, load_image(str(folder / "init.png")), load_image(str(folder / "mask.png"))


SAMPLERS_OF = {
    "sd1-9": ("euler_a", "dpmpp_2m_karras", "pndm", "heun"),
    "sd1-4": ("euler_a", "dpmpp_2m_karras", "pndm", "heun"),
    "sdxl-9": ("euler", "euler_a"),
    "sdxl-4": ("euler", "lms"),
    "sd2-9": ("euler_a", "dpmpp_2m_karras", "ddim"),
    "sd2-4": ("euler", "dpmpp_2m", "heun"),
    "sd2v-9": ("euler", "dpmpp_2m_karras"),
    "sd2v-4": ("euler_a", "lms"),
}
CASES = [(model, sampler, strength) for model, samplers in SAMPLERS_OF.items() for sampler in samplers
         for strength in (0.75, 1.0)]  # fmt: skip
CASES += [("sdxl-9", "euler", 0.9999), ("sdxl-4", "dpmpp_2m", 0.9999)]  # SDXL inpaint's default: step 1 on, noised


def skip_without_blending(config):
    if config.unet.in_channels == config.vae.latent_channels and not BLENDS:
        pytest.skip("samplers.sample has no restore hook yet: 4-channel blending needs it")


@pytest.mark.parametrize("both, sampler, strength", CASES, indirect=["both"])
def test_inpainting_matches_diffusers(both, sampler, strength):
    config, ours, theirs, folder = both
    skip_without_blending(config)
    image, mask, their_image, their_mask = pictures(folder)
    expected = render_theirs(config, theirs, sampler, their_image, their_mask, strength)
    got, _, _ = render_ours(config, ours, sampler, image, mask, strength)
    assert expected.std() > 5, "degenerate reference image: the comparison would prove nothing"
    assert psnr(got, expected) >= 40


@pytest.mark.parametrize("both", ["sd1-9", "sd1-4", "sd2-4"], indirect=True)
def test_outpainting_matches_diffusers_given_the_grown_canvas(both):
    """diffusers has no outpainting: given the canvas grown from its edges and the border's white mask (numpy's
    own edge padding here), its inpainting pipeline is what sdcli's outpainting must equal."""
    from sdcli.masks import prepare

    config, ours, theirs, folder = both
    skip_without_blending(config)
    narrow = init_picture(48, 56)
    canvas, mask, _ = prepare(narrow, None, (8, 0, 8, 8), 0, SIZE, SIZE)
    grown = Image.fromarray(np.pad(np.asarray(narrow), ((0, 8), (8, 8), (0, 0)), mode="edge"))
    white = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    white[:56, 8:56] = 0
    expected = render_theirs(config, theirs, "euler", grown, Image.fromarray(white), 0.75)
    got, _, _ = render_ours(config, ours, "euler", canvas, Image.fromarray(white), 0.75)
    assert torch.equal(mask, mask_tensor(Image.fromarray(white), SIZE, SIZE, "m"))
    assert psnr(got, expected) >= 40


@pytest.mark.parametrize("both", ["sd1-4"], indirect=True)
def test_a_blurred_mask_matches_diffusers_blur(both):
    config, ours, theirs, folder = both
    skip_without_blending(config)
    image, mask, their_image, their_mask = pictures(folder)
    expected = render_theirs(config, theirs, "dpmpp_2m", their_image, theirs.mask_processor.blur(their_mask, 6), 0.75)
    got, _, _ = render_ours(config, ours, "dpmpp_2m", image, blurred(mask, 6), 0.75)
    sharp, _, _ = render_ours(config, ours, "dpmpp_2m", image, mask, 0.75)
    assert psnr(got, expected) >= 40 and not np.array_equal(got, sharp)


@pytest.mark.parametrize("both", ["sd1-4", "sd2-4", "sdxl-4"], indirect=True)
def test_blending_keeps_the_init_image_outside_the_mask(both):
    """The kept area's latents are the init image's exactly and the repainted area's are not; the render is no
    plain img2img one, whose kept area strays further from the init image's VAE round trip. (In pixels a tiny
    random VAE's global mid-block attention spreads the repainted latents everywhere, so only the order shows.)"""
    config, ours, _, folder = both
    skip_without_blending(config)
    image, mask, _, _ = pictures(folder)
    got, latents, inpainting = render_ours(config, ours, "euler_a", image, mask, 0.75)
    kept = (inpainting.mask == 0).expand_as(latents)
    assert torch.equal(latents[kept], inpainting.image_latents[kept])
    assert (latents[~kept] - inpainting.image_latents[~kept]).abs().mean() > 0.1
    img2img, _, _ = render_ours(config, ours, "euler_a", image, mask, 0.75, blend=False)
    round_trip = pixels(ours.decode(inpainting.image_latents))[0].numpy()
    outside = np.asarray(mask)[..., 0] == 0
    assert psnr(got, img2img) < 30
    assert psnr(got[outside], round_trip[outside]) > psnr(img2img[outside], round_trip[outside]) + 2


@pytest.mark.parametrize("both", ["sd1-9", "sd2-9", "sdxl-9"], indirect=True)
def test_a_9_channel_unet_reads_its_mask(both):
    """Another mask changes the render inside both masks, in sdcli as in diffusers."""
    config, ours, theirs, folder = both
    image, mask, their_image, _ = pictures(folder)
    other = box_mask(box=(30, 30, 60, 60))
    got, _, _ = render_ours(config, ours, "euler", image, other, 1.0)
    expected = render_theirs(config, theirs, "euler", their_image, other, 1.0)
    first, _, _ = render_ours(config, ours, "euler", image, mask, 1.0)
    assert psnr(got, expected) >= 40 and psnr(got, first) < 30
