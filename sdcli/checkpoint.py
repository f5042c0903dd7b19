"""Single-file checkpoints: validated opening, the format facts, and refusal of pickles.

A .safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range, then the data. Reading the header ourselves lets a truncated or corrupt file fail
with a clear message before any tensor is touched, and gives each tensor's place in the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sdcli.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "hf_clip": "cond_stage_model.transformer.text_model.",  # SD 1.x: HuggingFace CLIPTextModel names
    "open_clip": "cond_stage_model.model.",  # SD 2.x: OpenCLIP names
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers over 100 MB too
SAFETENSORS_DTYPES = {  # bytes per element
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in the file and what it is."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file, end exclusive
    end: int


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    """Pickles can run code when loaded: read one only when the user says so."""
    if is_pickle(path) and not allow_pickle:
        raise CheckpointError(
            f"{path}: pickle checkpoints can run code when loaded and are not read by default; convert it to "
            ".safetensors, or pass --allow-pickle to read its tensors with torch's restricted loader"
        )


def read_header(path: Path, file: BinaryIO | None = None) -> dict[str, TensorInfo]:
    """Validate a .safetensors file's header against its size and return its tensor table; from `file`, an
    open binary file of `path`, when given, so the header and the tensors read later come from one file
    even if another is moved into its place."""
    if file is None and not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    check_pickle_allowed(path, allow_pickle=False)
    try:
        with contextlib.nullcontext(file) if file is not None else path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > HEADER_LIMIT or 8 + length > size:
                raise CheckpointError(f"{path}: not a safetensors file, or its header is corrupt or truncated")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    table: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        checked = _check_entry(entry)
        if checked is None:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{key}'")
        dtype, shape, start, end = checked
        table[key] = TensorInfo(dtype, shape, 8 + length + start, 8 + length + end)
        data_end = max(data_end, end)
    if 8 + length + data_end > size:
        missing = 8 + length + data_end - size
        raise CheckpointError(f"{path}: file is truncated ({missing} bytes missing); download it again")
    return table


def _check_entry(entry) -> tuple[str, tuple[int, ...], int, int] | None:
    """An entry's dtype, shape and data offsets when they are well-formed and agree, else None."""
    if not isinstance(entry, dict):
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return None
    if not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if len(offsets) != 2 or not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
        return None
    count = 1
    for dim in shape:
        count *= dim
    start, end = offsets
    if end - start != count * SAFETENSORS_DTYPES[dtype]:
        return None
    return dtype, tuple(shape), start, end


def describe_family(keys) -> str | None:
    """A human name for the checkpoint family, from which text-encoder layout the keys use."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint"
    if any(k.startswith(TEXT_PREFIXES["open_clip"]) for k in keys):
        return "an SD 2.x checkpoint (OpenCLIP text encoder): try --config sd21-v or sd21-base"
    if any(k.startswith(TEXT_PREFIXES["hf_clip"]) for k in keys):
        return "an SD 1.x checkpoint (CLIP ViT-L text encoder): try --config sd15"
    return None
