"""SDXL renders against diffusers' StableDiffusionXLPipeline: the same single-file weights (a tiny SDXL-like model in
sgm's layout, see reference.tiny_xl_config), prompt, seed and settings, every sampler, with a negative prompt and
with an empty one; and the conditioning tensors on the way (context, pooled embedding, size vector).

An empty negative is SDXL's trap: diffusers zeros the unconditional branch (force_zeros_for_empty_prompt) only
for negative_prompt=None; negative_prompt="" is encoded. sdcli's empty negative must be the first, as
generative-models and A1111 do, and the tests show that the two differ."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdcli.pipeline import Pipeline
from sdcli.request import Request
from sdcli.sampler_registry import SAMPLERS

from reference import (
    diffusers_render,
    diffusers_scheduler,
    diffusers_xl_conditioning,
    diffusers_xl_pipeline,
    psnr,
    tiny_config,
    torch_threads,
    write_random_checkpoint,
)

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, highly detailed", "blurry"
SEED, STEPS, GUIDANCE, WIDTH, HEIGHT = 7, 4, 5.0, 64, 64
TENSOR_ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """sdcli's and diffusers' pipelines over one random-weight tiny SDXL checkpoint."""
    config = tiny_config("sdxl")
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("parity-xl") / "tiny-xl.safetensors",
                                   dtype=torch.float32, seed=3)  # fmt: skip
    with torch_threads(1):
        ours = Pipeline.load(config, path, device="cpu", dtype="fp32")
        theirs = diffusers_xl_pipeline(config, path, "euler")
    return config, path, ours, theirs


def render_ours(ours, sampler, negative, *, seed=SEED, guidance=GUIDANCE, width=WIDTH, height=HEIGHT):
    return np.asarray(ours.generate([Request(PROMPT, negative, seed, STEPS, guidance, sampler, width, height)])[0])


def render_theirs(config, theirs, sampler, negative, *, seed=SEED, guidance=GUIDANCE, width=WIDTH, height=HEIGHT):
    theirs.scheduler = diffusers_scheduler(config, sampler)
    return diffusers_render(theirs, PROMPT, negative, seed, STEPS, guidance, width, height)


def assert_same_picture(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert expected.std() > 5, "degenerate reference image: the comparison would prove nothing"
    assert psnr(got, expected) >= 40
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_diffusers_pipeline_is_configured_as_sdxl(both):
    config, _, _, theirs = both
    assert type(theirs).__name__ == "StableDiffusionXLPipeline"
    assert theirs.config.force_zeros_for_empty_prompt is True
    assert theirs.watermark is None
    assert type(theirs.text_encoder).__name__ == "CLIPTextModel"
    assert type(theirs.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert (theirs.tokenizer.pad_token, theirs.tokenizer_2.pad_token, theirs.tokenizer_2.pad_token_id) == (
        "<|endoftext|>", "!", 0,
    )  # fmt: skip
    assert theirs.unet.config.addition_embed_type == "text_time"
    assert theirs.unet.config.addition_time_embed_dim == config.conditioning.size_embed_dim
    assert (theirs.vae.config.scaling_factor, theirs.vae.config.force_upcast) == (0.13025, True)
    if getattr(config.schedule, "timestep_spacing", None) is not None:
        assert theirs.scheduler.config.timestep_spacing == config.schedule.timestep_spacing == "leading"


# --- conditioning tensors ------------------------------------------------------------------------------


def test_prompt_embeds_and_pooled_match(both):
    _, _, ours, theirs = both
    expected = diffusers_xl_conditioning(theirs, PROMPT, NEGATIVE, WIDTH, HEIGHT)
    requests = [Request(p, "", SEED, STEPS, GUIDANCE, "euler", WIDTH, HEIGHT) for p in (PROMPT, NEGATIVE)]
    contexts, pooled = ours.encode_prompts([PROMPT, NEGATIVE], requests)
    context = torch.stack(contexts)
    assert context.shape == (2, 77, 80) and pooled.shape == (2, 48)
    torch.testing.assert_close(context[:1], expected["prompt_embeds"], rtol=0, atol=TENSOR_ATOL)
    torch.testing.assert_close(context[1:], expected["negative_prompt_embeds"], rtol=0, atol=TENSOR_ATOL)
    torch.testing.assert_close(pooled[:1], expected["text_embeds"], rtol=0, atol=TENSOR_ATOL)
    torch.testing.assert_close(pooled[1:], expected["negative_text_embeds"], rtol=0, atol=TENSOR_ATOL)


@pytest.mark.parametrize("width,height", [(64, 64), (64, 48)])
def test_vector_is_pooled_and_size_features(both, width, height):
    """sdcli's y equals diffusers' cat(text_embeds, add_time_proj(add_time_ids)), (h, w) ordered as diffusers'."""
    _, _, ours, theirs = both
    expected = diffusers_xl_conditioning(theirs, PROMPT, NEGATIVE, width, height)
    assert expected["add_time_ids"].tolist() == [[height, width, 0, 0, height, width]]
    request = Request(PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, "euler", width, height)
    conditioning = ours.conditioning([PROMPT, NEGATIVE], [request, request])
    assert conditioning.vector.shape == (2, ours.config.unet.adm_in_channels)
    torch.testing.assert_close(conditioning.vector[:1], expected["y"], rtol=0, atol=TENSOR_ATOL)
    torch.testing.assert_close(conditioning.vector[1:], expected["negative_y"], rtol=0, atol=TENSOR_ATOL)


def test_empty_negative_conditioning_is_diffusers_zeros(both):
    """Context and pooled zeroed, the size features kept: diffusers with negative_prompt=None."""
    _, _, ours, theirs = both
    expected = diffusers_xl_conditioning(theirs, PROMPT, None, WIDTH, HEIGHT)
    assert not expected["negative_prompt_embeds"].any() and not expected["negative_text_embeds"].any()
    request = Request(PROMPT, "", SEED, STEPS, GUIDANCE, "euler", WIDTH, HEIGHT)
    conditioning = ours.conditioning([PROMPT, ""], [request, request])
    assert not conditioning.context[1].any()
    torch.testing.assert_close(conditioning.vector[1:], expected["negative_y"], rtol=0, atol=TENSOR_ATOL)
    encoded = diffusers_xl_conditioning(theirs, PROMPT, "", WIDTH, HEIGHT)
    assert encoded["negative_prompt_embeds"].abs().max() > 0.1  # "" is encoded, not zeroed


# --- whole renders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_matches_diffusers(both, sampler):
    config, _, ours, theirs = both
    assert_same_picture(render_ours(ours, sampler, NEGATIVE), render_theirs(config, theirs, sampler, NEGATIVE))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_empty_negative_matches_diffusers_none(both, sampler):
    config, _, ours, theirs = both
    assert_same_picture(render_ours(ours, sampler, ""), render_theirs(config, theirs, sampler, None))


def test_euler_is_bit_identical(both):
    """Same ops in the same order: sdcli's Euler render is diffusers' to the last bit (others differ by at most
    one level in a few pixels, from float reassociation in the samplers)."""
    config, _, ours, theirs = both
    assert np.array_equal(render_ours(ours, "euler", NEGATIVE), render_theirs(config, theirs, "euler", NEGATIVE))


def test_empty_negative_is_not_diffusers_empty_string(both):
    """The zeroed unconditional branch changes the picture: sdcli's "" must not match diffusers' "" (encoded),
    and diffusers' None and "" differ, so the empty-negative test above can fail."""
    config, _, ours, theirs = both
    zeroed = render_theirs(config, theirs, "euler", None)
    encoded = render_theirs(config, theirs, "euler", "")
    assert psnr(zeroed, encoded) < 30
    assert psnr(render_ours(ours, "euler", ""), encoded) < 30


def test_without_zero_empty_negative_an_empty_negative_is_encoded(both):
    """The config switch is what makes the difference: turned off, sdcli encodes "" as diffusers' "" does."""
    config, path, _, theirs = both
    conditioning = dataclasses.replace(config.conditioning, zero_empty_negative=False)
    plain = Pipeline.load(dataclasses.replace(config, conditioning=conditioning), path, device="cpu", dtype="fp32")
    assert_same_picture(render_ours(plain, "euler", ""), render_theirs(config, theirs, "euler", ""))


def test_non_square_size(both):
    """Height and width reach the size features in diffusers' order, and the U-Net's odd-size path works."""
    config, _, ours, theirs = both
    got = render_ours(ours, "euler_a", NEGATIVE, width=64, height=48, seed=123456789)
    assert_same_picture(got, render_theirs(config, theirs, "euler_a", NEGATIVE, width=64, height=48, seed=123456789))
    assert got.shape == (48, 64, 3)


def test_guidance_one_skips_the_unconditional_pass(both):
    config, _, ours, theirs = both
    got = render_ours(ours, "dpmpp_2m", NEGATIVE, guidance=1.0)
    assert_same_picture(got, render_theirs(config, theirs, "dpmpp_2m", NEGATIVE, guidance=1.0))
