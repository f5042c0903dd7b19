"""The pipeline's fast paths give the plain networks' results: channels_last U-Net calls, banded decoding,
one text-encoder batch for prompt and negative, bf16 close to fp32, and torch.compile (slow)."""

import numpy as np
import pytest
import torch

from sdcli.pipeline import Conditioning, Pipeline
from sdcli.request import Request

from reference import psnr, tiny_config, write_random_checkpoint


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config("sd1", "epsilon")
    path = tmp_path_factory.mktemp("perf") / "tiny.safetensors"
    return config, write_random_checkpoint(config, path, dtype=torch.float32, seed=5)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return Pipeline.load(*checkpoint, device="cpu", dtype="fp32")


def test_guided_call_in_channels_last_equals_the_plain_unet(pipe):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 12, 10)
    cond, uncond = torch.randn(2, 77, pipe.config.unet.context_dim).chunk(2)
    t = torch.tensor(500.0)
    with torch.inference_mode():
        got = pipe.guided_model(Conditioning(cond), Conditioning(uncond), 7.5)(x, t)
        out_uncond, out_cond = pipe.nets.unet(torch.cat([x, x]), t.expand(2), torch.cat([uncond, cond])).chunk(2)
    expected = out_uncond + 7.5 * (out_cond - out_uncond)
    assert relative_error(got, expected) <= 1e-5


def test_decode_in_several_bands_equals_the_whole_decode(pipe):
    """256x192 pixels is more than one band (bands.BAND_PIXELS), so the banded path really runs."""
    factor = pipe.config.vae.downsample
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 192 // factor, 256 // factor)
    with torch.inference_mode():
        expected = pipe.nets.vae.decode(latents / pipe.config.vae.scale_factor)
    got = pipe.decode(latents)
    assert got.shape == (2, 3, 192, 256)
    assert (got - (expected / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


def test_prompt_and_negative_encoded_together_equal_apart(pipe):
    """One text-encoder batch for both halves of classifier-free guidance changes nothing."""
    prompts = ["a red cube on a table", "blurry"]
    requests = [Request(p, "", 1, 4, 7.5, "euler", 64, 64) for p in prompts]
    together = torch.stack(pipe.encode_prompts(prompts, requests)[0])
    apart = torch.stack([pipe.encode_prompts([p], [r])[0][0] for p, r in zip(prompts, requests, strict=True)])
    assert relative_error(together, apart) <= 1e-5


def test_bf16_render_stays_close_to_fp32(checkpoint, pipe):
    low = Pipeline.load(*checkpoint, device="cpu", dtype="bf16")
    request = Request("a photo of a cat", "blurry", 3, 4, 7.5, "dpmpp_2m_karras", 64, 48)
    full = np.asarray(pipe.generate([request])[0])
    half = np.asarray(low.generate([request])[0])
    assert next(low.nets.unet.parameters()).dtype == torch.bfloat16
    assert full.std() > 5  # a picture, not a flat field that any precision would agree on
    assert psnr(half, full) >= 25


@pytest.mark.slow
def test_compiled_unet_equals_eager(checkpoint, pipe, tmp_path, monkeypatch):
    """torch.compile takes minutes on a small CPU even for the tiny model, hence slow; its code lands in
    sdcli's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SDCLI_HOME", raising=False)
    compiled = Pipeline.load(*checkpoint, device="cpu", dtype="fp32", compile=True)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 16, 16)
    cond, uncond = torch.randn(2, 77, pipe.config.unet.context_dim).chunk(2)
    with torch.inference_mode():
        cond, uncond = Conditioning(cond), Conditioning(uncond)
        got = compiled.guided_model(cond, uncond, 7.5)(x, torch.tensor(999.0))
        expected = pipe.guided_model(cond, uncond, 7.5)(x, torch.tensor(999.0))
    assert relative_error(got, expected) <= 1e-4
    assert any((tmp_path / "sdcli" / "inductor").iterdir())
