"""Textual-inversion files in the layouts real trainers write, with seeded random vectors: A1111's .pt
(string_to_param, with its bookkeeping entries), the original repository's ParameterDict .pt, single-tensor
.safetensors (kohya's emb_params, diffusers' {token: tensor}), SDXL's clip_l/clip_g, and hostile pickles."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

VECTOR_SCALE = 0.5  # far from any learned token, so an embedding visibly changes a tiny model's picture


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    """(count, width) float32 vectors, the same for the same seed."""
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * VECTOR_SCALE


def write_a1111_pt(path: Path, vecs: torch.Tensor) -> Path:
    """A1111's Embedding.save layout: the vectors under string_to_param['*'], beside its bookkeeping."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vecs.clone().requires_grad_(True)},
        "name": "trained-name-is-ignored",
        "step": 1500,
        "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    torch.save(data, path)
    return path


def write_parameter_dict_pt(path: Path, vecs: torch.Tensor) -> Path:
    """The original textual_inversion repository's layout: string_to_param is an nn.ParameterDict."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vecs.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, path)
    return path


def write_single(path: Path, vecs: torch.Tensor, key: str = "emb_params") -> Path:
    """One tensor under one key: kohya's emb_params, diffusers' learned_embeds {token: tensor} (.safetensors,
    or a .bin pickle)."""
    if path.suffix == ".safetensors":
        save_file({key: vecs.contiguous()}, str(path))
    else:
        torch.save({key: vecs}, path)
    return path


def write_sdxl(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """An SDXL embedding: one vector set per text encoder."""
    save_file({"clip_l": clip_l.contiguous(), "clip_g": clip_g.contiguous()}, str(path))
    return path


class _RunsCode:
    """Unpickling this calls os.system: what a malicious embedding would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_pickle_with_code(path: Path, width: int, marker: Path) -> Path:
    """A .pt that looks like an A1111 embedding but, unpickled without restrictions, creates `marker`."""
    torch.save({"string_to_param": {"*": vectors(1, width, 0)}, "payload": _RunsCode(f"touch '{marker}'")}, path)
    return path
