"""Tiny inpainting models and their diffusers oracles: a tiny config with a 9-channel U-Net, diffusers'
StableDiffusion(XL)InpaintPipeline over the same single file, and test pictures (an init image, a mask)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from sdcli.config import ModelConfig, inpainting_channels

from reference import diffusers_pipeline, diffusers_xl_pipeline, is_sgm, tiny_config


def tiny_inpaint_config(family: str = "sd1", channels: int | None = None) -> ModelConfig:
    """tiny_config(family) with an inpainting U-Net (latents, mask, masked-image latents in), or `channels` wide."""
    config = tiny_config(family)
    wide = channels if channels is not None else inpainting_channels(config.vae.latent_channels)
    unet = dataclasses.replace(config.unet, in_channels=wide)
    return dataclasses.replace(config, name=f"{config.name}-inpaint", unet=unet)


def diffusers_inpaint_pipeline(config: ModelConfig, checkpoint: str | Path, sampler: str):
    """diffusers' inpainting pipeline (SDXL's for an sgm model) over the single file, fp32 on the CPU, built from
    the text-to-image pipeline's parts (from_pipe), with the scheduler sdcli's `sampler` reproduces."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if is_sgm(config):
        pipe = StableDiffusionXLInpaintPipeline.from_pipe(diffusers_xl_pipeline(config, checkpoint, sampler))
    else:
        pipe = StableDiffusionInpaintPipeline.from_pipe(diffusers_pipeline(config, checkpoint, sampler))
    pipe.set_progress_bar_config(disable=True)  # from_pipe starts a new pipeline's bar afresh
    return pipe


def init_picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colour field with some texture: far from grey, so a repainted area shows."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    rgb = np.stack([0.2 + 0.6 * x, 0.8 - 0.5 * y, 0.5 + 0.3 * np.sin(6 * x * y)], axis=-1)
    rgb = rgb + 0.05 * rng.standard_normal(rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def box_mask(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (16, 12, 44, 40)) -> Image.Image:
    """A black RGB picture with a white box (left, top, right, bottom): the area to repaint."""
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)
