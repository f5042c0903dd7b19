"""sdcli renders what diffusers renders from the same single file: full-size random SD 1.5 and SD 2.1-v.

The slow tests write full-size fp16 checkpoints in the real layout (cached under weights/, about 2 and
2.6 GB), render 256x256 in 4 steps with diffusers' own single-file loader and pipeline, then with sdcli,
one after the other (peak near 7 GB). The same comparison on tiny models runs in the fast suite.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcli.config import ModelConfig, load_config

import reference

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEED, GUIDANCE = 1234, 7.5
MIN_PSNR = 40.0


@pytest.fixture
def one_thread():
    with reference.torch_threads(1):
        yield


def cached_checkpoint(config: ModelConfig, path: Path) -> Path:
    """A random fp16 checkpoint for `config` at `path`, written unless a complete one is already there."""
    checkpoint = pytest.importorskip("sdcli.checkpoint")
    if path.exists():
        try:
            table = checkpoint.read_header(path)
        except Exception:  # a stale or partial file is simply rewritten
            table = {}
        if {k: v.shape for k, v in table.items()} == reference.ldm_keys(config):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return reference.write_random_checkpoint(config, path, dtype=torch.float16, seed=0)


def render_both(config: ModelConfig, path: Path, sampler: str, size: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(diffusers, sdcli) images for one request; one model in memory at a time."""
    pipeline = pytest.importorskip("sdcli.pipeline", reason="sdcli.pipeline not importable yet")
    from sdcli.request import Request

    pipe = reference.diffusers_pipeline(config, path, sampler)
    expected = reference.diffusers_render(pipe, PROMPT, NEGATIVE, SEED, steps, GUIDANCE, size, size)
    del pipe
    gc.collect()
    ours = pipeline.Pipeline.load(config, path, device="cpu", dtype="fp32")
    request = Request(PROMPT, NEGATIVE, SEED, steps, GUIDANCE, sampler, width=size, height=size)
    image = np.asarray(ours.generate([request])[0])
    del ours
    gc.collect()
    return expected, image


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "family,prediction,sampler", [("sd1", "epsilon", "ddim"), ("sd2", "v_prediction", "dpmpp_2m_karras")]
)
def test_tiny_sdcli_matches_diffusers(family, prediction, sampler, tmp_path):
    torch.manual_seed(0)
    config = reference.tiny_config(family, prediction)
    path = reference.write_random_checkpoint(config, tmp_path / "tiny.safetensors")
    expected, image = render_both(config, path, sampler, size=64, steps=4)
    assert image.shape == expected.shape
    assert reference.psnr(image, expected) >= MIN_PSNR


@pytest.mark.usefixtures("one_thread")
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="diffusers' SD 2 tokenizer has pad token '!', so every '!' becomes id 0 (diffusers#4153); "
    "sdcli tokenizes like OpenCLIP (256)",
)
def test_tiny_sd2_prompt_with_exclamation_mark_matches_diffusers(tmp_path):
    config = reference.tiny_config("sd2", "v_prediction")
    path = reference.write_random_checkpoint(config, tmp_path / "tiny.safetensors")
    pipeline = pytest.importorskip("sdcli.pipeline", reason="sdcli.pipeline not importable yet")
    from sdcli.request import Request

    prompt = "a red cube!"
    pipe = reference.diffusers_pipeline(config, path, "euler")
    expected = reference.diffusers_render(pipe, prompt, "", 7, 4, 7.5, 64, 64)
    ours = pipeline.Pipeline.load(config, path, device="cpu", dtype="fp32")
    image = np.asarray(ours.generate([Request(prompt, "", 7, 4, 7.5, "euler", 64, 64)])[0])
    assert reference.psnr(image, expected) >= MIN_PSNR


@pytest.mark.slow
@pytest.mark.parametrize("name,sampler", [("sd15", "ddim"), ("sd21-v", "dpmpp_2m_karras")])
def test_fullsize_sdcli_matches_diffusers(name, sampler):
    torch.manual_seed(0)
    config = load_config(name)
    path = cached_checkpoint(config, WEIGHTS / f"random-{name}-fp16.safetensors")
    expected, image = render_both(config, path, sampler, size=256, steps=4)
    assert image.shape == expected.shape == (256, 256, 3)
    assert expected.std() > 1  # a picture, not a flat colour that any two renderers would agree on
    assert reference.psnr(image, expected) >= MIN_PSNR
