"""Whole renders against diffusers: same single-file weights, prompt, seed and settings, every sampler,
SD 1.x (HF-layout CLIP, epsilon) and SD 2.x (OpenCLIP, penultimate layer, v and epsilon)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcli.config import SAMPLERS
from sdcli.pipeline import Pipeline
from sdcli.request import Request

from reference import diffusers_pipeline, diffusers_render, psnr, tiny_config, write_random_checkpoint

MODELS = [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sd2", "epsilon")]
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, highly detailed", "blurry"


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}")
def both(request, tmp_path_factory):
    """sdcli's and diffusers' pipelines over one random-weight tiny checkpoint."""
    family, prediction = request.param
    config = tiny_config(family, prediction)
    path = tmp_path_factory.mktemp("parity") / "tiny.safetensors"
    write_random_checkpoint(config, path, dtype=torch.float32, seed=3)
    ours = Pipeline.load(config, path, device="cpu", dtype="fp32")
    theirs = diffusers_pipeline(config, path, "euler")
    return config, ours, theirs


def render_both(config, ours, theirs, sampler, *, seed=7, steps=5, guidance=7.5, width=64, height=48,
                negative=NEGATIVE):
    from reference import diffusers_scheduler

    theirs.scheduler = diffusers_scheduler(config, sampler)
    expected = diffusers_render(theirs, PROMPT, negative, seed, steps, guidance, width, height)
    request = Request(PROMPT, negative, seed, steps, guidance, sampler, width, height)
    got = np.asarray(ours.generate([request])[0])
    return got, expected


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_matches_diffusers(both, sampler):
    config, ours, theirs = both
    got, expected = render_both(config, ours, theirs, sampler)
    assert got.shape == expected.shape == (48, 64, 3)
    assert expected.std() > 5, "degenerate reference image: the comparison would prove nothing"
    assert psnr(got, expected) >= 40
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


def test_guidance_one_skips_the_unconditional_pass(both):
    config, ours, theirs = both
    got, expected = render_both(config, ours, theirs, "dpmpp_2m", guidance=1.0, negative="")
    assert psnr(got, expected) >= 40


def test_odd_size_and_other_seed(both):
    """A size that is not a multiple of 64 exercises the U-Net's upsample-to-skip-size path."""
    config, ours, theirs = both
    got, expected = render_both(config, ours, theirs, "euler_a", seed=123456789, width=40, height=56)
    assert psnr(got, expected) >= 40


def test_batched_images_equal_single_renders(both):
    """Seeds S and S+1 in one batch give the pictures each gives alone (per-image generators)."""
    _, ours, _ = both
    requests = [Request(PROMPT, NEGATIVE, seed, 4, 7.5, "euler_a", 32, 32) for seed in (11, 12)]
    batched = [np.asarray(im) for im in ours.generate(requests)]
    alone = [np.asarray(ours.generate([r])[0]) for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert np.abs(b.astype(int) - a.astype(int)).max() <= 1
    assert not np.array_equal(batched[0], batched[1])
