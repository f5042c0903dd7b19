"""`--from` an image or text that AUTOMATIC1111 made: its infotext as request values, the settings sdcli
cannot honour as warnings, and the weights file its `Model hash` names, looked for in the weights folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdcli.config import bundled_config_dir
from sdcli.errors import RequestError
from sdcli.hashing import sha256_file
from sdcli.infotext import find_model, parse_infotext, read_parameters, request_values
from sdcli.outputs import PNG_KEY
from sdcli.request import request_fields
from sdcli.text_limits import clip

WEIGHT_SUFFIXES = (".safetensors",)  # what a hash lookup opens; pickles only ever by name with --allow-pickle


@dataclass(frozen=True)
class A1111Recipe:
    values: dict  # request fields the infotext gives
    warnings: list[str]
    model_hash: str | None
    model: str | None


def is_sdcli_file(path: Path) -> bool:
    """An sdcli sidecar, or a PNG that carries sdcli's own metadata (which wins over its infotext)."""
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() != ".png":
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return PNG_KEY in getattr(image, "text", {})
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(f"--from {path}: not a readable PNG: {clip(str(exc))}") from None


def read_a1111(path: Path) -> A1111Recipe:
    """The recipe in an A1111 PNG's `parameters` chunk or in a text file holding such infotext."""
    if not path.is_file():
        raise RequestError(f"--from {path}: file not found")
    text = read_parameters(path)
    if text is None:
        raise RequestError(f"--from {path}: the image carries neither sdcli metadata nor A1111 parameters")
    values, warnings = request_values(parse_infotext(text))
    if not values.get("prompt", "").strip():
        raise RequestError(f"--from {path}: the infotext holds no prompt")
    fields = set(request_fields())
    return A1111Recipe(
        {k: v for k, v in values.items() if k in fields}, warnings, values.get("model_hash"), values.get("model")
    )


def weights_folders() -> list[Path]:
    """Where a Model hash is looked for: $SDCLI_WEIGHTS_DIR, ./weights, and the repository's weights/."""
    folders = [Path(os.environ["SDCLI_WEIGHTS_DIR"]).expanduser()] if os.environ.get("SDCLI_WEIGHTS_DIR") else []
    folders += [Path.cwd() / "weights", bundled_config_dir().parent / "weights"]
    return [f for f in folders if f.is_dir()]


def weights_for(recipe: A1111Recipe) -> Path | None:
    """The weights file the infotext's Model hash names, if one of the weights folders holds it."""
    if not recipe.model_hash:
        return None
    candidates = [p for f in weights_folders() for p in sorted(f.iterdir()) if p.suffix.lower() in WEIGHT_SUFFIXES]
    return find_model(recipe.model_hash, candidates, sha256_file, model_name=recipe.model)
