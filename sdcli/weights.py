"""Build the three networks without initialising them, then fill them from a single-file checkpoint.

Networks are made on the meta device (no memory, no random init) and every tensor is read from the
memory-mapped file straight into its final dtype and device, one at a time, so the peak stays near the
model's own size. Loading is strict: every expected tensor must be there with its exact shape; keys
outside the three networks' prefixes (EMA copies, schedule buffers) and a short list of known unused
text-encoder extras are ignored on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sdcli.checkpoint import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, describe_family, read_header
from sdcli.config import ModelConfig
from sdcli.errors import CheckpointError
from sdcli.nets.text import TextEncoder, hf_clip_key_shapes, hf_clip_to_open_clip
from sdcli.nets.unet import UNet
from sdcli.nets.vae import AutoencoderKL

# Present in real files, unused by the text encoder: HF's position id buffer, OpenCLIP's contrastive head.
IGNORED_TEXT_KEYS = {"embeddings.position_ids", "text_projection", "logit_scale"}


@dataclass
class Components:
    """The three networks of a latent diffusion model, loaded and in eval mode."""

    unet: UNet
    vae: AutoencoderKL
    text: TextEncoder


def build_on_meta(config: ModelConfig) -> Components:
    """The networks as shapes only: no memory is allocated and nothing is initialised."""
    with torch.device("meta"):
        return Components(UNet(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text))


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def expected_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the loader reads for `config`, as the file names it, with its shape."""
    nets = build_on_meta(config)
    keys = {UNET_PREFIX + k: s for k, s in _shapes(nets.unet).items()}
    keys |= {VAE_PREFIX + k: s for k, s in _shapes(nets.vae).items()}
    text_prefix = TEXT_PREFIXES[config.text.layout]
    text_shapes = hf_clip_key_shapes(config.text) if config.text.layout == "hf_clip" else _shapes(nets.text)
    keys |= {text_prefix + k: s for k, s in text_shapes.items()}
    return keys


class _Reader:
    """Reads tensors by name from an open checkpoint, checking shapes and casting on the way."""

    def __init__(self, path: Path, handle, table, device: torch.device, dtype: torch.dtype):
        self.path, self.handle, self.table = path, handle, table
        self.device, self.dtype = device, dtype

    def read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        info = self.table.get(key)
        if info is None:
            family = describe_family(self.table)
            hint = f"; the file looks like {family}" if family else ""
            raise CheckpointError(f"{self.path}: missing tensor '{key}'{hint}")
        if info.shape != shape:
            family = describe_family(self.table)
            hint = f"; the file looks like {family}" if family else ""
            raise CheckpointError(
                f"{self.path}: tensor '{key}' has shape {list(info.shape)}, expected {list(shape)}{hint}"
            )
        try:
            tensor = self.handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor '{key}': {exc}") from None
        return tensor.to(self.device, self.dtype)

    def under(self, prefix: str) -> Iterator[str]:
        return (k[len(prefix):] for k in self.table if k.startswith(prefix))


def _check_unexpected(reader: _Reader, prefix: str, expected, ignored=frozenset()) -> None:
    """A tensor under a network's prefix that the network lacks means the config does not fit the file."""
    for name in reader.under(prefix):
        if name not in expected and name not in ignored:
            family = describe_family(reader.table)
            hint = f"; the file looks like {family}" if family else ""
            raise CheckpointError(f"{reader.path}: unexpected tensor '{prefix}{name}' for this config{hint}")


def _fill(module: nn.Module, reader: _Reader, prefix: str) -> None:
    shapes = _shapes(module)
    _check_unexpected(reader, prefix, shapes)
    state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
    module.load_state_dict(state, strict=True, assign=True)


def _fill_text(text: TextEncoder, reader: _Reader, config: ModelConfig) -> None:
    prefix = TEXT_PREFIXES[config.text.layout]
    if config.text.layout == "open_clip":
        shapes = _shapes(text)
        _check_unexpected(reader, prefix, shapes, IGNORED_TEXT_KEYS)
        state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
    else:
        shapes = hf_clip_key_shapes(config.text)
        _check_unexpected(reader, prefix, shapes, IGNORED_TEXT_KEYS)
        hf_state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
        state = hf_clip_to_open_clip(hf_state, config.text)
    text.load_state_dict(state, strict=True, assign=True)


def load_components(config: ModelConfig, path: Path, device: torch.device, dtype: torch.dtype) -> Components:
    """The three networks of `config`, filled from the checkpoint at `path`, on `device` in `dtype`."""
    path = Path(path)
    table = read_header(path)
    if not any(k.startswith(UNET_PREFIX) for k in table):
        family = describe_family(table)
        detail = f" (it looks like {family})" if family else ""
        raise CheckpointError(
            f"{path}: no U-Net weights under '{UNET_PREFIX}': not a CompVis/LDM single-file Stable Diffusion checkpoint{detail}"
        )
    nets = build_on_meta(config)
    # The SD VAE overflows in fp16; bf16 shares fp32's range, so only fp16 keeps the VAE in fp32.
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            _fill(nets.unet, _Reader(path, handle, table, device, dtype), UNET_PREFIX)
            _fill(nets.vae, _Reader(path, handle, table, device, vae_dtype), VAE_PREFIX)
            _fill_text(nets.text, _Reader(path, handle, table, device, dtype), config)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc}") from None
    for net in (nets.unet, nets.vae, nets.text):
        net.eval().requires_grad_(False)
    return nets
