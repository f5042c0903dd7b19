"""Single-file checkpoints: validated opening, the format facts, and refusal of pickles.

A .safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range, then the data. Reading the header ourselves lets a truncated or corrupt file fail
with a clear message before any tensor is touched, and gives each tensor's place in the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
# A tensor entry nests 3 deep and the metadata 2; the slack admits small extra fields, which safetensors ignores.
HEADER_DEPTH = 8
NAME_SHOWN = 100  # characters of a tensor's name that a message quotes
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
    header, _ = _parse_header(path, raw)
    table: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        checked = _check_entry(entry)
        if checked is None:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{_shown(key)}'")
        dtype, shape, start, end = checked
        table[key] = TensorInfo(dtype, shape, 8 + length + start, 8 + length + end)
    _check_layout(path, table, 8 + length, size)
    return table


def weights_problem(path: Path) -> str | None:
    """Why the weights at `path` would not load (the one-line error, a missing file's included), or None when
    they look loadable: cheap enough for a listing, so a .safetensors header is checked against the file (each
    one of a diffusers folder), and a pickle only for being a non-empty file, since unpickling one can run code."""
    path = Path(path)
    try:
        if path.is_dir():
            from sdcli.weights import open_tensors  # torch, only for a folder

            with open_tensors(path):
                pass
        elif not is_pickle(path):
            read_header(path)
        elif not path.is_file():
            raise CheckpointError(f"weights file not found: {path}")
        elif path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty")
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: cannot read weights: {exc.strerror or exc}"
    return None


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict[str, str]]:
    """The header's tensor entries and its (checked) metadata; strict UTF-8 JSON, as safetensors reads it."""
    corrupt = f"{path}: corrupt safetensors header"
    problem = _nesting_problem(raw)
    if problem is not None:
        raise CheckpointError(f"{corrupt} ({problem})")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{corrupt} (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(corrupt)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{corrupt} (__metadata__ is not a table of text)")
    return header, metadata or {}


def read_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's `__metadata__` text table (trainers keep LoRA settings there); {} when it has none."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return _parse_header(path, f.read(length))[1]


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_AS_BRACES = bytes.maketrans(b"[]", b"{}")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _nesting_problem(raw: bytes) -> str | None:
    """Why json.loads could recurse past HEADER_DEPTH on `raw`, found without recursing: it recurses once per
    open bracket, so a hostile header would exhaust the stack.

    With the strings gone, brackets nested no deeper than HEADER_DEPTH vanish in as many passes of deleting
    the innermost pairs; what is left nests deeper, or is brackets json refuses. Read as bytes, which is
    sound for the UTF-8 that json.loads later insists on: no multi-byte character holds a quote or bracket."""
    brackets = _JSON_STRING.sub(b"", raw).translate(_AS_BRACES, _NOT_BRACKETS)
    for _ in range(HEADER_DEPTH):
        brackets = brackets.replace(b"{}", b"")
    if not brackets:
        return None
    return "nested too deeply" if b"{}" in brackets else "not JSON"


def _check_layout(path: Path, table: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The tensors must tile the data exactly, each starting where the one before ends, from the header's end
    to the file's, as safetensors requires: an overlap would alias two tensors, a gap or a tail hides bytes."""
    end = data_start
    for key, info in sorted(table.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < end:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor '{_shown(key)}' overlaps another tensor's bytes"
            )
        if info.begin > end:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: {info.begin - end} unused bytes before tensor '{_shown(key)}'"
            )
        end = info.end
    if end > size:
        raise CheckpointError(f"{path}: file is truncated ({end - size} bytes missing); download it again")
    if end < size:
        raise CheckpointError(f"{path}: corrupt safetensors file: {size - end} bytes after the last tensor")


def _shown(key: str) -> str:
    """A tensor name fit for a one-line message: cut short, its control characters escaped."""
    cut = key[:NAME_SHOWN] + ("..." if len(key) > NAME_SHOWN else "")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)


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


def text_prefix(cfg) -> str:
    """Where a text encoder (a TextConfig) lives in the file: its config's prefix, else its layout's SD 1.x/2.x one."""
    return cfg.prefix or TEXT_PREFIXES[cfg.layout]


# Keys that tell one family of single-file checkpoints from another (diffusers' single_file_utils
# CHECKPOINT_KEY_NAMES, and the files themselves).
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
SDXL_BIGG = "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
UNET_INPUT = UNET_PREFIX + "input_blocks.0.0.weight"
INPAINT_INPUTS = 9  # an inpainting U-Net's input width: 4 latents, the mask, 4 masked-image latents


@dataclass(frozen=True)
class Family:
    """What a checkpoint's keys say it is: a bundled config that renders it, or why none does."""

    description: str
    config: str | None = None  # the bundled config's name, when sdcli renders the family


def detect_family(shapes: dict[str, tuple[int, ...]]) -> Family | None:
    """The family of a checkpoint from its tensor names (and one shape); None when nothing is recognised."""
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(UNET_PREFIX + "joint_blocks.") or has("joint_blocks."):
        return Family("a Stable Diffusion 3 checkpoint (MMDiT), which sdcli does not render")
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks.") or has("double_stream_blocks."):
        return Family("a Flux checkpoint, which sdcli does not render")
    if has("lora_unet_") or has("lora_te") or any(".lora_A." in k or ".lora_down." in k for k in keys):
        return Family("a LoRA (weights to add to a model), not a checkpoint")
    if any(k.endswith(("hada_w1_a", "lokr_w1")) for k in keys):
        return Family("a LyCORIS LoHa/LoKr, not a checkpoint")
    if has("string_to_param") or (len(shapes) <= 2 and has("emb_params")) or (has("clip_l") and has("clip_g")):
        return Family("a textual-inversion embedding, not a checkpoint")
    unet = has(UNET_PREFIX)
    if not unet and (has("decoder.conv_in.") or has(VAE_PREFIX + "decoder.")):
        return Family("a VAE alone, not a whole checkpoint")
    if not unet and (has("down_blocks.") or has("mid_block.")):
        return Family("a diffusers-layout U-Net alone, not a single-file checkpoint")
    if not unet:
        return None
    shape = shapes.get(UNET_INPUT) or ()
    inputs = shape[1] if len(shape) > 1 else 4
    if inputs not in (4, INPAINT_INPUTS):
        return Family(f"a checkpoint with a U-Net of {inputs} input channels, which sdcli does not render")
    if has(REFINER_BIGG) and not has(SDXL_CLIP_L):
        return Family("an SDXL refiner, which sdcli does not render")
    if inputs == INPAINT_INPUTS:
        return _inpainting_family(has)
    if has(SDXL_CLIP_L) and has(SDXL_BIGG):
        return Family("an SDXL checkpoint", "sdxl")
    if has(TEXT_PREFIXES["open_clip"]):
        # v-prediction and epsilon files have the same keys; the 768-v model is the common download
        return Family("an SD 2.x checkpoint (OpenCLIP text encoder; 512 base files need --config sd21-base)", "sd21-v")
    if has(TEXT_PREFIXES["hf_clip"]):
        return Family("an SD 1.x checkpoint (CLIP ViT-L text encoder)", "sd15")
    return None


def _inpainting_family(has) -> Family | None:
    """Which inpainting model a 9-channel U-Net belongs to, by its text encoders (diffusers'
    infer_diffusers_model_type: xl_inpaint, inpainting_v2, inpainting); SD 2's is the 512 epsilon one."""
    if has(SDXL_CLIP_L) and has(SDXL_BIGG):
        return Family("an SDXL inpainting checkpoint (9-channel U-Net)", "sdxl-inpainting")
    if has(TEXT_PREFIXES["open_clip"]):
        return Family("an SD 2 inpainting checkpoint (9-channel U-Net, OpenCLIP text encoder)", "sd2-inpainting")
    if has(TEXT_PREFIXES["hf_clip"]):
        return Family("an SD 1.x inpainting checkpoint (9-channel U-Net)", "sd15-inpainting")
    return None


# the bundled config of a family's epsilon-predicting twin, which a diffusers folder's scheduler config can name
EPSILON_CONFIGS = {"sd21-v": "sd21-base"}


def config_for_weights(path: Path, *, allow_pickle: bool = False) -> str:
    """The bundled config that renders a checkpoint (file or diffusers folder), from its keys: what `--weights`
    without `--config` means. Weights of a family sdcli does not render are a clear error naming what they look
    like."""
    path = Path(path)
    if is_pickle(path) or path.is_dir():
        check_pickle_allowed(path, allow_pickle)
        from sdcli.weights import open_tensors  # torch, only for a pickle or a folder

        with open_tensors(path, allow_pickle=True) as tensors:
            shapes = tensors.shapes
    else:
        shapes = {key: info.shape for key, info in read_header(path).items()}
    family = detect_family(shapes)
    if family is None:
        raise CheckpointError(
            f"{path}: not a checkpoint sdcli recognises (SD 1.x, SD 2.x or SDXL single-file layout); "
            "pass --config for a model of your own"
        )
    if family.config is None:
        raise CheckpointError(f"{path}: this looks like {family.description}")
    if path.is_dir() and family.config in EPSILON_CONFIGS:
        from sdcli.diffusers_layout import prediction_type

        if prediction_type(path) == "epsilon":
            return EPSILON_CONFIGS[family.config]
    return family.config


def describe_family(shapes) -> str | None:
    """A human name for the checkpoint family, with the config that renders it when there is one."""
    family = detect_family(shapes if isinstance(shapes, dict) else dict.fromkeys(shapes, ()))
    if family is None:
        return None
    return f"{family.description}: try --config {family.config}" if family.config else family.description
