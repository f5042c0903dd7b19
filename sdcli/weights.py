"""Build the three networks without initialising them, then fill them from a single-file checkpoint (or a
diffusers folder, which sdcli.diffusers_layout presents as one).

Networks are made on the meta device (no memory, no random init) and every tensor is read from the file
in slices of whole rows through one small reused buffer, each slice cast straight into the tensor's final
memory (dtype, device, conv layout), so the peak stays near the model's own size and no tensor is copied
twice. Plain reads, not a memory map: a mapped file that shrinks (a download rewriting it, say) kills the
process with SIGBUS at the next read of a missing page, where a read comes up short and gives a clear
error; and the model never depends on the file, which may be deleted or rewritten during a batch.
Loading is strict: every expected tensor must be there with its exact shape; keys outside the three
networks' prefixes (EMA copies, schedule buffers) and a short list of known unused text-encoder extras
are ignored on purpose.

Pickle checkpoints (.ckpt) are read only when allowed, through torch's restricted `weights_only` loader,
into the same strict loading.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sdcli.checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    check_pickle_allowed,
    describe_family,
    is_pickle,
    read_header,
    text_prefix,
)
from sdcli.config import ModelConfig, TextConfig
from sdcli.errors import CheckpointError
from sdcli.nets.text import TextEncoder, hf_clip_key_shapes, hf_clip_to_open_clip
from sdcli.nets.unet import UNet
from sdcli.nets.vae import AutoencoderKL

# Present in real files, unused by the text encoder: HF's position id buffer, OpenCLIP's contrastive head
# (its projection is read by an encoder whose pooled embedding conditions the U-Net).
IGNORED_TEXT_KEYS = {"embeddings.position_ids", "text_projection", "logit_scale"}
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass
class Components:
    """The networks of a latent diffusion model, loaded and in eval mode: one text encoder per config entry."""

    unet: UNet
    vae: AutoencoderKL
    text: list[TextEncoder]

    def all(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text]


def build_on_meta(config: ModelConfig) -> Components:
    """The networks as shapes only: no memory is allocated and nothing is initialised."""
    with torch.device("meta"):
        return Components(UNet(config.unet), AutoencoderKL(config.vae), [TextEncoder(t) for t in config.text])


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def expected_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the loader reads for `config`, as the file names it, with its shape."""
    nets = build_on_meta(config)
    keys = {UNET_PREFIX + k: s for k, s in _shapes(nets.unet).items()}
    keys |= {VAE_PREFIX + k: s for k, s in _shapes(nets.vae).items()}
    for cfg, encoder in zip(config.text, nets.text, strict=True):
        shapes = hf_clip_key_shapes(cfg) if cfg.layout == "hf_clip" else _shapes(encoder)
        keys |= {text_prefix(cfg) + k: s for k, s in shapes.items()}
    return keys


READ_BUFFER_BYTES = 32 << 20  # the reused read buffer: large enough for a few syscalls per tensor


@dataclass(frozen=True)
class Cast:
    """Where a tensor goes: device, dtype, and the layout of conv weights (4-D), set as it is read rather
    than by a second copy afterwards."""

    device: torch.device
    dtype: torch.dtype
    layout: torch.memory_format = torch.contiguous_format

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        layout = self.layout if len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=self.dtype, device=self.device, memory_format=layout)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor`, never a view of it."""
        out = self.empty(tuple(tensor.shape))
        return out.copy_(tensor)


@dataclass(frozen=True)
class Tensors:
    """A checkpoint's tensor table, and a way to read one tensor, cast to a dtype and device, into memory
    of its own."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    fetch: Callable[[str, Cast], torch.Tensor]


@contextmanager
def open_tensors(path: Path, *, allow_pickle: bool = False) -> Iterator[Tensors]:
    """The tensors of a .safetensors file, of a pickle checkpoint when `allow_pickle`, or of a diffusers folder
    under the names of its family's single file."""
    path = Path(path)
    if path.is_dir():
        from sdcli.diffusers_layout import open_folder  # it reads each component through this function

        with open_folder(path, allow_pickle=allow_pickle) as tensors:
            yield tensors
        return
    check_pickle_allowed(path, allow_pickle)
    if is_pickle(path):
        yield _pickle_tensors(path)
        return
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        f = open(path, "rb", buffering=0)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    with f:
        table = read_header(path, f)
        shared = torch.empty(READ_BUFFER_BYTES, dtype=torch.uint8)
        shared_view = memoryview(shared.numpy())

        def read(begin: int, view: memoryview) -> None:
            """Fill `view` with the file's bytes from `begin` on."""
            done = 0
            f.seek(begin)
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{path}: file is truncated (it shrank while being read); download it again")
                done += got

        def fetch(key: str, cast: Cast) -> torch.Tensor:
            info = table[key]
            out = cast.empty(info.shape)
            if out.numel() == 0:
                return out
            rows = out.view(1) if out.dim() == 0 else out  # slices along dim 0: whole rows, also of NHWC weights
            row_bytes = (info.end - info.begin) // rows.shape[0]
            # a row larger than the shared buffer (no SD tensor has one) gets a buffer of its own
            buffer = shared if row_bytes <= len(shared) else torch.empty(row_bytes, dtype=torch.uint8)
            view = shared_view if buffer is shared else memoryview(buffer.numpy())
            step = len(buffer) // row_bytes
            for first in range(0, rows.shape[0], step):
                last = min(first + step, rows.shape[0])
                count = (last - first) * row_bytes
                read(info.begin + first * row_bytes, view[:count])
                stored = buffer[:count].view(TORCH_DTYPES[info.dtype]).view(last - first, *rows.shape[1:])
                rows[first:last].copy_(stored)
            return out

        yield Tensors(path, {key: info.shape for key, info in table.items()}, fetch)


def _pickle_tensors(path: Path) -> Tensors:
    """A pickle checkpoint's state dict (under any `state_dict` keys), read by torch's weights-only unpickler,
    which refuses every object but tensors and plain containers."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        # A zip-format file (torch >= 1.6) is memory-mapped; each tensor is copied out below.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        # torch's message is a page long; the line naming the refused object is the one that helps.
        reason = next((line.strip() for line in str(exc).splitlines() if "unsupported" in line.lower()), "")
        raise CheckpointError(
            f"{path}: refused by torch's weights-only loader, which reads only tensors and plain containers"
            f"{f' ({reason})' if reason else ''}"
        ) from None
    except Exception as exc:  # a damaged file surfaces from torch.load as many exception types
        first = next((line.split(". ")[0] for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {first}") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a checkpoint: expected a dict of tensors, found {type(loaded).__name__}")
    state = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return Tensors(
        path,
        {key: tuple(t.shape) for key, t in state.items()},
        lambda key, cast: cast(state[key]),
    )


class _Reader:
    """Reads tensors by name from an open checkpoint, checking shapes and casting on the way."""

    def __init__(self, tensors: Tensors, cast: Cast, hint: str | None = None):
        self.path, self.tensors, self.table = tensors.path, tensors, tensors.shapes
        self.cast = cast
        self.fixed_hint = hint  # what a mismatch suggests, when not the file's family

    def hint(self) -> str:
        if self.fixed_hint is not None:
            return self.fixed_hint
        family = describe_family(self.table)
        return f"; the file looks like {family}" if family else ""

    def read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        found = self.table.get(key)
        if found is None:
            raise CheckpointError(f"{self.path}: missing tensor '{key}'{self.hint()}")
        if found != shape:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' has shape {list(found)}, expected {list(shape)}{self.hint()}"
            )
        return self.tensors.fetch(key, self.cast)

    def under(self, prefix: str) -> Iterator[str]:
        return (k[len(prefix) :] for k in self.table if k.startswith(prefix))


def _check_unexpected(reader: _Reader, prefix: str, expected, ignored=frozenset()) -> None:
    """A tensor under a network's prefix that the network lacks means the config does not fit the file."""
    for name in reader.under(prefix):
        if name not in expected and name not in ignored:
            raise CheckpointError(f"{reader.path}: unexpected tensor '{prefix}{name}' for this config{reader.hint()}")


def _fill(module: nn.Module, reader: _Reader, prefix: str) -> None:
    shapes = _shapes(module)
    _check_unexpected(reader, prefix, shapes)
    state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
    module.load_state_dict(state, strict=True, assign=True)


# where a text encoder's block N lives under its prefix, by layout
TEXT_BLOCKS = {"hf_clip": "encoder.layers.{}.", "open_clip": "transformer.resblocks.{}."}


def _blocks_stored(text: TextEncoder, reader: _Reader, cfg: TextConfig) -> TextConfig:
    """`cfg`, cut to the blocks the encoder runs when the file holds none of the later ones (a diffusers SD 2.x
    folder keeps 23 of OpenCLIP's 24, ending at the penultimate block SD 2 reads); the encoder is cut with it."""
    prefix = text_prefix(cfg)
    unrun = [prefix + TEXT_BLOCKS[cfg.layout].format(i) for i in range(text.blocks_run, cfg.layers)]
    if not unrun or any(key.startswith(tuple(unrun)) for key in reader.table):
        return cfg
    text.transformer.resblocks = text.transformer.resblocks[: text.blocks_run]
    return replace(cfg, layers=text.blocks_run)


def _fill_text(text: TextEncoder, reader: _Reader, cfg: TextConfig) -> None:
    """One text encoder from its prefix; HF-named weights (SD 1.x, SDXL's CLIP-L) renamed to OpenCLIP's."""
    cfg = _blocks_stored(text, reader, cfg)
    prefix = text_prefix(cfg)
    ignored = IGNORED_TEXT_KEYS - set(_shapes(text))  # a pooled encoder reads its text_projection
    if cfg.layout == "open_clip":
        shapes = _shapes(text)
        _check_unexpected(reader, prefix, shapes, ignored)
        state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
    else:
        shapes = hf_clip_key_shapes(cfg)
        _check_unexpected(reader, prefix, shapes, ignored)
        hf_state = {name: reader.read(prefix + name, shape) for name, shape in shapes.items()}
        state = hf_clip_to_open_clip(hf_state, cfg)
    text.load_state_dict(state, strict=True, assign=True)


def _fill_vae(vae: AutoencoderKL, tensors: Tensors, cast: Cast, override: Path | None, allow_pickle: bool) -> None:
    """The VAE from the checkpoint, or from the file `override` (in any layout open_vae_file reads)."""
    if override is None:
        _fill(vae, _Reader(tensors, cast), VAE_PREFIX)
        return
    from sdcli.diffusers_layout import open_vae_file  # it builds on this module

    with open_vae_file(Path(override), allow_pickle=allow_pickle) as own:
        _fill(vae, _Reader(own, cast, hint="; it is not a VAE for this model"), VAE_PREFIX)


def load_components(
    config: ModelConfig, path: Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
    unet_layout: torch.memory_format = torch.contiguous_format,
    vae_layout: torch.memory_format = torch.contiguous_format, vae: Path | None = None,
) -> Components:  # fmt: skip
    """The three networks of `config`, filled from the checkpoint (file or diffusers folder) at `path`, or the
    VAE from the file `vae` when given, on `device` in `dtype`, the U-Net's and the VAE's conv weights in the
    given layouts."""
    path = Path(path)
    try:
        with open_tensors(path, allow_pickle=allow_pickle) as tensors:
            if not any(k.startswith(UNET_PREFIX) for k in tensors.shapes):
                family = describe_family(tensors.shapes)
                detail = f" (it looks like {family})" if family else ""
                raise CheckpointError(
                    f"{path}: no U-Net weights under '{UNET_PREFIX}': "
                    f"not a CompVis/LDM single-file Stable Diffusion checkpoint{detail}"
                )
            nets = build_on_meta(config)
            _fill(nets.unet, _Reader(tensors, Cast(device, dtype, unet_layout)), UNET_PREFIX)
            _fill_vae(nets.vae, tensors, Cast(device, vae_dtype(config, dtype), vae_layout), vae, allow_pickle)
            for cfg, encoder in zip(config.text, nets.text, strict=True):
                _fill_text(encoder, _Reader(tensors, Cast(device, dtype)), cfg)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    for net in nets.all():
        net.eval().requires_grad_(False)
    return nets


def vae_dtype(config: ModelConfig, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: fp16 overflows in a VAE that needs upcasting (diffusers' force_upcast), so that one
    runs in fp32; bf16 shares fp32's range."""
    return torch.float32 if dtype == torch.float16 and config.vae.force_upcast else dtype
