"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): files of learned token vectors,
called up by their file name in a prompt.

The formats A1111 reads (modules/textual_inversion, `create_embedding_from_data`), each vector set (n, width):
- A1111's own .pt: `string_to_param` holding one tensor (under '*'), also as the ParameterDict of the
  original textual_inversion repository;
- SDXL files: `clip_l` and `clip_g`, one set per text encoder, in the model's encoder order;
- a single tensor under any name: diffusers' learned_embeds ({token: tensor}), kohya's `emb_params`, a
  .safetensors flattening of `string_to_param.*`; a 1-D tensor is one vector.
The name is the file stem, whatever the file says inside, as in A1111. Pickles (.pt, .bin) are read only when
allowed, by torch's weights-only unpickler; nothing here imports torch until a file is read, so the planner can
match names before a model loads.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import regex

from sdcli.checkpoint import check_pickle_allowed, is_pickle
from sdcli.errors import CheckpointError
from sdcli.prompt_chunks import CHUNK_TOKENS, CLIP_WORDS

if TYPE_CHECKING:
    from torch import Tensor

SUFFIXES = (".safetensors", ".pt", ".bin")  # what an embeddings folder holds; pickles need allow_pickle
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL file's vector sets, in the order of the model's text encoders
_WORDS = regex.compile(CLIP_WORDS, regex.IGNORECASE)


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: the name that calls it (the file stem) and one (n, width) float32 vector set per
    text encoder it was trained for (SD 1.x/2.x: one; SDXL: CLIP-L's, then bigG's)."""

    name: str
    path: Path
    vectors: tuple[Tensor, ...]

    @property
    def count(self) -> int:
        """Token positions the embedding takes in a prompt."""
        return self.vectors[0].shape[0]


def read_embedding(path: Path, *, allow_pickle: bool = False) -> Embedding:
    """The embedding in `path`, or a one-line CheckpointError naming the file."""
    path = Path(path)
    data = _unpickle(path, allow_pickle) if is_pickle(path) else _safetensors(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a textual-inversion embedding (holds a {type(data).__name__})")
    vectors = tuple(_checked(path, key, tensor) for key, tensor in _vector_sets(path, data))
    if len({v.shape[0] for v in vectors}) > 1:
        counts = ", ".join(f"{k} {v.shape[0]}" for k, v in zip(SDXL_KEYS, vectors, strict=True))
        raise CheckpointError(f"{path}: its text encoders' vector counts differ ({counts})")
    return Embedding(path.stem, path, vectors)


def check_fits(embedding: Embedding, widths: Sequence[int]) -> Embedding:
    """The embedding, if it fits text encoders of these widths; else a one-line CheckpointError."""
    found = [v.shape[1] for v in embedding.vectors]
    if len(found) != len(widths):
        kind = "an SDXL embedding (clip_l, clip_g)" if len(found) == 2 else "a one-encoder (SD 1.x/2.x) embedding"
        raise CheckpointError(
            f"{embedding.path}: {kind} of width {_widths(found)}; this model has {len(widths)} text encoder(s) "
            f"of width {_widths(widths)}"
        )
    if found != list(widths):
        raise CheckpointError(
            f"{embedding.path}: vectors of width {_widths(found)}, but this model's text encoders take "
            f"{_widths(widths)} (an embedding for another model family)"
        )
    if embedding.count > CHUNK_TOKENS:
        raise CheckpointError(f"{embedding.path}: {embedding.count} vectors; a prompt chunk holds {CHUNK_TOKENS}")
    return embedding


def used_names(texts: Iterable[str], available: dict[str, Path]) -> list[Path]:
    """The files of `available` (lower-case name -> file) whose names appear in the texts as whole words of
    CLIP's pre-tokenizer (letter runs, single digits, punctuation runs), in `available`'s order. A1111 matches
    the name's token ids, which word matches stand for; a name that a word would only spell partly (the end
    of a rare word's BPE pieces) is missed."""
    words = [_words(text) for text in texts]
    present = {word for text in words for word in text}
    names = {name: _name_words(name) for name in available}
    return [
        path for name, path in available.items()
        if names[name] and names[name][0] in present and any(_contains(w, names[name]) for w in words)
    ]  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _name_words(name: str) -> list[str]:
    """An embedding name's words, once per name however many prompts are planned."""
    return _words(name)


def _words(text: str) -> list[str]:
    return _WORDS.findall(" ".join(text.split()).lower())


def _contains(words: list[str], name: list[str]) -> bool:
    n = len(name)
    return n > 0 and any(words[i : i + n] == name for i in range(len(words) - n + 1))


def _widths(widths: Sequence[int]) -> str:
    return " + ".join(map(str, widths))


def _vector_sets(path: Path, data: dict) -> list[tuple[str, object]]:
    """(key, tensor) per text encoder, by the file's format."""
    import torch

    if "string_to_param" in data:
        table = data["string_to_param"]
        params = list(table.values()) if hasattr(table, "values") else []
        if len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} entries; expected one")
        return [("string_to_param", params[0])]
    if all(key in data for key in SDXL_KEYS):
        return [(key, data[key]) for key in SDXL_KEYS]
    tensors = [(key, value) for key, value in data.items() if isinstance(value, torch.Tensor)]
    if len(tensors) != 1:
        keys = ", ".join(map(str, list(data)[:6])) or "nothing"
        raise CheckpointError(
            f"{path}: not a textual-inversion embedding: expected string_to_param, clip_l and clip_g, or a single "
            f"tensor; found {keys}"
        )
    return tensors


def _checked(path: Path, key: str, tensor: object) -> Tensor:
    """A vector set as (n, width) float32, or a one-line error."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise CheckpointError(f"{path}: '{key}' is not a tensor of floating-point vectors")
    vectors = tensor.detach().float().cpu()
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    if vectors.dim() != 2 or 0 in vectors.shape:
        raise CheckpointError(f"{path}: '{key}' has shape {list(tensor.shape)}; expected (vectors, width)")
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{path}: '{key}' holds NaN or infinite values")
    return vectors


def _safetensors(path: Path) -> dict:
    """Every tensor of a .safetensors file, in its stored dtype (so integers are seen for what they are)."""
    import torch

    from sdcli.checkpoint import read_header
    from sdcli.weights import TORCH_DTYPES, Cast, open_tensors

    stored = {key: TORCH_DTYPES[info.dtype] for key, info in read_header(path).items()}
    with open_tensors(path) as tensors:
        return {key: tensors.fetch(key, Cast(torch.device("cpu"), stored[key])) for key in tensors.shapes}


def _unpickle(path: Path, allow_pickle: bool) -> object:
    """A pickled embedding through torch's weights-only unpickler (tensors and plain containers, plus the
    ParameterDict that old files keep their vectors in); what it refuses to run is named in one line."""
    import torch

    check_pickle_allowed(path, allow_pickle)
    if not path.is_file():
        raise CheckpointError(f"embedding file not found: {path}")
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file surfaces from torch.load as many exception types
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = [line for line in lines if "unsupported global" in line.lower()]
        if isinstance(exc, pickle.UnpicklingError) and refused:
            raise CheckpointError(
                f"{path}: refused by torch's weights-only loader ({refused[0].split('. Please')[0]})"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch file: {(lines or [type(exc).__name__])[0][:200]}"
        ) from None
