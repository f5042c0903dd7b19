"""img2img and inpainting at full size: random-weight SD 1.5 and SD 1.5 inpainting checkpoints in the real
single-file layout, rendered by diffusers (StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline over
the same file) and by sdcli's Pipeline.generate, one model in memory at a time (peak near 7 GB).

The checkpoints are fp16 and cached under weights/ (about 2 GB each), as test_fullsize.py does; the renders are
256x256 in 4 steps. The same comparisons on tiny models run in the fast suite (test_img2img_parity.py,
test_inpaint_parity.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from inpaint_models import box_mask, diffusers_inpaint_pipeline, init_picture
from test_fullsize import WEIGHTS, cached_checkpoint

from sdcli.config import load_config
from sdcli.request import FileUse

import reference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEED, GUIDANCE, STEPS, SIZE = 1234, 7.5, 4, 256
MIN_PSNR = 40.0
BOX = (64, 48, 176, 160)  # the white square of the mask: left, top, right, bottom
CONV_IN = reference.UNET_PREFIX + "input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, Path]:
    """A 256x256 init image (a smooth colour field with texture) and a mask with a white square, as files."""
    folder = tmp_path_factory.mktemp("fullsize-images")
    init_picture(SIZE, SIZE).save(folder / "init.png")
    box_mask(SIZE, SIZE, BOX).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def free() -> None:
    gc.collect()


def diffusers_images(pipe, sampler: str, config, **inputs) -> np.ndarray:
    """One render of a diffusers image pipeline as uint8 HxWx3, rounded as diffusers' numpy_to_pil does."""
    pipe.scheduler = reference.diffusers_scheduler(config, sampler)
    with torch.no_grad():
        out = pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **inputs,
        )  # fmt: skip
    return (out.images[0] * 255).round().astype(np.uint8)


def sdcli_images(config, path: Path, sampler: str, cases: list[dict]) -> list[np.ndarray]:
    """sdcli's render of each request case (Request fields), one model load for all."""
    from sdcli.pipeline import Pipeline
    from sdcli.request import Request

    ours = Pipeline.load(config, path, device="cpu", dtype="fp32")
    try:
        base = dict(width=SIZE, height=SIZE)
        return [
            np.asarray(ours.generate([Request(PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, sampler, **base, **case)])[0])
            for case in cases
        ]
    finally:
        del ours
        free()


def test_sd15_inpainting_layout_is_sd15_but_a_9_channel_conv_in():
    """The real sd-v1-5-inpainting file's keys are sd15's; only the U-Net's first convolution reads 9 channels."""
    inpainting, plain = reference.ldm_keys(load_config("sd15-inpainting")), reference.ldm_keys(load_config("sd15"))
    assert plain == reference.read_key_list(Path(__file__).parent / "data" / "sd15-keys.txt")
    assert inpainting.keys() == plain.keys()
    assert {k for k in plain if plain[k] != inpainting[k]} == {CONV_IN}
    assert inpainting[CONV_IN] == (320, 9, 3, 3) and plain[CONV_IN] == (320, 4, 3, 3)


@pytest.mark.slow
def test_fullsize_sd15_img2img_matches_diffusers(pictures):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import load_image

    torch.manual_seed(0)
    config, sampler, strength = load_config("sd15"), "dpmpp_2m", 0.6
    path = cached_checkpoint(config, WEIGHTS / "random-sd15-fp16.safetensors")
    init, _ = pictures
    txt2img = reference.diffusers_pipeline(config, path, sampler)
    pipe = StableDiffusionImg2ImgPipeline(**txt2img.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    del txt2img
    expected = diffusers_images(pipe, sampler, config, image=load_image(str(init)), strength=strength)
    del pipe
    free()
    (image,) = sdcli_images(config, path, sampler, [{"init_image": (FileUse(str(init)),), "strength": strength}])
    assert image.shape == expected.shape == (SIZE, SIZE, 3)
    assert expected.std() > 5  # a picture, not a flat colour that any two renderers would agree on
    value = reference.psnr(image, expected)
    print(f"sd15 img2img {sampler} strength {strength}: {value:.2f} dB")
    assert value >= MIN_PSNR
    repainted = reference.psnr(image, np.asarray(init_picture(SIZE, SIZE)))
    print(f"  against the init image: {repainted:.2f} dB")
    assert repainted < 30  # the render repainted the init image


@pytest.mark.slow
def test_fullsize_sd15_inpainting_matches_diffusers(pictures):
    from diffusers.utils import load_image

    torch.manual_seed(0)
    config, sampler, strengths = load_config("sd15-inpainting"), "euler", (1.0, 0.75)
    path = cached_checkpoint(config, WEIGHTS / "random-sd15-inpainting-fp16.safetensors")
    init, mask = pictures
    pipe = diffusers_inpaint_pipeline(config, path, sampler)
    assert pipe.unet.config.in_channels == 9  # diffusers read a 9-channel U-Net from the file
    inputs = dict(image=load_image(str(init)), mask_image=load_image(str(mask)), width=SIZE, height=SIZE)
    expected = [diffusers_images(pipe, sampler, config, strength=s, **inputs) for s in strengths]
    del pipe
    free()
    files = {"init_image": (FileUse(str(init)),), "mask": (FileUse(str(mask)),)}
    images = sdcli_images(config, path, sampler, [{**files, "strength": s} for s in strengths])
    for strength, image, theirs in zip(strengths, images, expected, strict=True):
        assert image.shape == theirs.shape == (SIZE, SIZE, 3)
        assert theirs.std() > 5
        value = reference.psnr(image, theirs)
        print(f"sd15-inpainting {sampler} strength {strength}: {value:.2f} dB")
        assert value >= MIN_PSNR
    apart = reference.psnr(images[0], images[1])
    repainted = [reference.psnr(image, np.asarray(init_picture(SIZE, SIZE))) for image in images]
    print(f"  1 against 0.75: {apart:.2f} dB; against the init image: {repainted[0]:.2f}, {repainted[1]:.2f} dB")
    assert apart < 30  # the strength matters: neither render is the other
    assert max(repainted) < 30  # the renders are no copies of the init image
