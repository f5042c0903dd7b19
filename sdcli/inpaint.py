"""Inpainting's part of a render, as diffusers' StableDiffusion(XL)InpaintPipeline computes it.

A 9-channel (inpainting) U-Net reads, after the sampler's scaled input, the latent-size mask and the latents of
the init image with the repainted area grey: the same two for every step and both CFG rows. A 4-channel U-Net
repaints through blending instead: after every sampler step the kept area (mask 0) is put back as the init
image's latents noised to the level that step reached, with the start noise (diffusers' init_latents_proper).

Generators are drawn in diffusers' order: the init image's posterior sample (skipped by a 9-channel U-Net at
strength 1, which starts from noise alone), the start noise, then the masked image's posterior sample (drawn by
diffusers for 4-channel U-Nets too, which then ignore it); euler_a's step noise comes after all three.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sdcli.config import ModelConfig
from sdcli.images import image_tensor, read_image
from sdcli.masks import prepare
from sdcli.request import Request, padding
from sdcli.samplers import Model, Restore, per_image_noise

log = logging.getLogger("sdcli")

Encode = Callable[[Tensor, list[torch.Generator]], Tensor]  # (B,3,H,W) in [-1,1] -> scaled latents (B,C,h,w)


@dataclass(frozen=True)
class Inpainting:
    """Per-image inputs of an inpainting render, at latent size."""

    mask: Tensor  # (B, 1, h, w): 1 where repainted
    noise: Tensor  # (B, C, h, w): the start noise, which also re-noises the kept area
    image_latents: Tensor | None  # the init image's: the start below strength 1, the kept area of 4-channel U-Nets
    masked_latents: Tensor | None  # 9-channel U-Nets: the latents of the image with the repainted area grey


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """The init image (B,3,H,W in [-1,1]) with the repainted area 0, mid grey, as the 9-channel U-Net sees it."""
    return image * (mask < 0.5)


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """(B,1,H,W) -> (B,1,H/factor,W/factor), nearest neighbour (F.interpolate's default, as diffusers calls it)."""
    return F.interpolate(mask, size=(mask.shape[2] // factor, mask.shape[3] // factor))


def inputs(
    requests: Sequence[Request], generators: list[torch.Generator], encode: Encode, config: ModelConfig,
    device: torch.device, dtype: torch.dtype,
) -> Inpainting:  # fmt: skip
    """The inpainting inputs of requests that share a batch: each one's init image (grown by its pad) and mask,
    read, prepared (masks.prepare) and drawn in diffusers' order; a mask of another size is warned about."""
    images, masks = [], []
    for r in requests:
        pad = padding(r.pad, config.vae.downsample) if r.pad else None
        mask_file = Path(r.mask[0].file) if r.mask else None
        image, mask, notes = prepare(read_image(r.init_image[0].file), mask_file, pad, r.mask_blur, r.width, r.height)
        for note in notes:
            log.warning("%s", note)
        images.append(image_tensor(image, r.width, r.height))
        masks.append(mask)
    full = requests[0].strength == 1  # diffusers' is_strength_max
    return draw(torch.cat(images), torch.cat(masks), generators, encode, config, full, device, dtype)


def draw(
    images: Tensor, masks: Tensor, generators: list[torch.Generator], encode: Encode, config: ModelConfig,
    full_strength: bool, device: torch.device, dtype: torch.dtype,
) -> Inpainting:  # fmt: skip
    """The encoded images and the start noise for `images` (B,3,H,W in [-1,1]) and `masks` (B,1,H,W), on `device`
    in the sampler's `dtype`, image i's randomness drawn from generators[i] in diffusers' order. At full strength
    the start is the noise alone, as a plain render's, which a 9-channel U-Net takes without the image's latents."""
    concat = config.unet.in_channels != config.vae.latent_channels
    image_latents = None if concat and full_strength else encode(images, generators).to(device, dtype)
    mask = latent_mask(masks, config.vae.downsample).to(device, dtype)
    noise = per_image_noise(generators, mask.new_empty((len(images), config.vae.latent_channels, *mask.shape[2:])))
    if concat:
        masked_latents = encode(masked_image(images, masks), generators).to(device, dtype)
    else:
        per_image_noise(generators, noise)  # the posterior sample of the masked image diffusers encodes and ignores
        masked_latents = None
    return Inpainting(mask, noise, image_latents, masked_latents)


def concat_model(model: Model, inpainting: Inpainting) -> Model:
    """A 9-channel U-Net as samplers call it: cat(scaled input, mask, masked-image latents) along channels, for
    `model` either side of classifier-free guidance's batching (both rows get the same two)."""
    extra = torch.cat([inpainting.mask, inpainting.masked_latents], dim=1)

    def model_in(x: Tensor, t: Tensor) -> Tensor:
        return model(torch.cat([x, extra], dim=1), t)

    return model_in


def restorer(inpainting: Inpainting) -> Restore:
    """4-channel inpainting's blend after a sampler step that left x at alpha*x0 + sigma*eps (in the sampler's
    own coordinates): the kept area becomes the init image's latents at that level, with the start noise."""
    mask, image_latents, noise = inpainting.mask, inpainting.image_latents, inpainting.noise

    def restore(x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        kept = alpha * image_latents + sigma * noise
        return (1 - mask) * kept + mask * x

    return restore


def model_and_restore(model: Model, inpainting: Inpainting) -> tuple[Model, Restore | None]:
    """What the sampler runs: a 9-channel U-Net with its concat inputs and no blending, or a 4-channel one as is
    with the blend after each step."""
    if inpainting.masked_latents is not None:
        return concat_model(model, inpainting), None
    return model, restorer(inpainting)
