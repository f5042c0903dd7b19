"""Load a model once, then turn requests into images: tokenize -> encode -> sample -> decode.

Each stage is a short tensor-in, tensor-out method so it can be tested alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sdcli.config import ModelConfig
from sdcli.errors import RequestError
from sdcli.nets.text import Tokenizer
from sdcli.request import Request, check_request
from sdcli.samplers import sample
from sdcli.weights import Components, load_components

log = logging.getLogger("sdcli")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; anything else must name a device that exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RequestError(f"unknown device '{name}'; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise RequestError(f"device '{name}' is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RequestError("device 'mps' is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RequestError(f"unknown device '{name}'; expected auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on GPUs and fp32 on the CPU (where fp32 is exact against the reference)."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise RequestError(f"unknown dtype '{name}'; expected auto, fp32, fp16 or bf16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


class Pipeline:
    """A loaded model on one device, ready to render."""

    def __init__(self, config: ModelConfig, weights: Path, nets: Components, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.weights = weights
        self.nets = nets
        self.device = device
        self.dtype = dtype
        self.tokenizer = Tokenizer(config.text)

    @classmethod
    def load(cls, config: ModelConfig, weights: Path | None = None, device: str = "auto", dtype: str = "auto") -> Pipeline:
        """Build the three networks straight from the weights file, in their final dtype and device."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        path = Path(weights) if weights is not None else config.resolve_weights()
        nets = load_components(config, path, torch_device, torch_dtype)
        return cls(config, path, nets, torch_device, torch_dtype)

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids -> the text context the U-Net cross-attends to, (B, 77, D)."""
        ids, truncated = self.tokenizer(list(prompts))
        for prompt, cut in zip(prompts, truncated):
            if cut:
                log.warning("prompt longer than %d tokens was truncated: %.60s...", self.config.text.context_length - 2, prompt)
        return self.nets.text(ids.to(self.device))

    def initial_noise(self, requests: Sequence[Request]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-image seeded CPU noise, so an image re-renders alone and on any device."""
        factor = self.config.vae.downsample
        generators, noise = [], []
        for r in requests:
            g = torch.Generator("cpu").manual_seed(r.seed)
            shape = (1, self.config.unet.in_channels, r.height // factor, r.width // factor)
            noise.append(torch.randn(shape, generator=g, dtype=torch.float32))
            generators.append(g)
        return torch.cat(noise).to(self.device, self.dtype), generators

    def guided_model(self, context: torch.Tensor, uncond: torch.Tensor | None, guidance: float) -> Callable:
        """The U-Net with classifier-free guidance in one batched call: (uncond, cond) in, combined out."""
        unet = self.nets.unet
        if uncond is None:
            return lambda x, t: unet(x, t.to(self.device, torch.float32).expand(x.shape[0]), context)
        both = torch.cat([uncond, context])

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x, x])
            t_in = t.to(self.device, torch.float32).expand(x_in.shape[0])
            out_uncond, out_cond = unet(x_in, t_in, both).chunk(2)
            return out_uncond + guidance * (out_cond - out_uncond)

        return model

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W) float32 on the CPU."""
        vae = self.nets.vae
        z = latents.to(next(vae.parameters()).dtype) / self.config.vae.scale_factor
        image = vae.decode(z)
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.inference_mode()
    def latents(self, requests: Sequence[Request], on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run the sampler for requests that share steps, guidance, sampler and size."""
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise RequestError("requests in one batch must share steps, guidance, sampler and size")
        for r in requests:
            check_request(r, self.config)
        context = self.encode_prompts([r.prompt for r in requests])
        uncond = None if first.guidance == 1.0 else self.encode_prompts([r.negative for r in requests])
        noise, generators = self.initial_noise(requests)
        model = self.guided_model(context, uncond, first.guidance)
        return sample(first.sampler, model, noise, first.steps, self.config.schedule, generators, on_step)

    def generate(self, requests: Sequence[Request], on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """Render one image per request (all sharing Request.batch_key())."""
        if not requests:
            return []
        images = self.decode(self.latents(requests, on_step))
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p) for p in pixels]
