"""Images on disk: file names, metadata (JSON sidecar, PNG text chunks, A1111 infotext), atomic writes.

A PNG and its JSON sidecar appear complete or not at all: each is written under a hidden temporary name
in the target folder, flushed to disk, then renamed; the JSON is renamed last, so a sidecar's presence
means its PNG is whole. The PNG carries the same JSON in an iTXt chunk named `sdcli`, so either file
alone re-renders the image.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdcli import __version__
from sdcli.config import SAMPLERS, ModelConfig, bundled_config_dir
from sdcli.errors import RequestError
from sdcli.request import Request, request_fields

DEFAULT_NAME = "{index:05d}-{seed}-{slug}"
NAME_FIELDS = ("index", "seed", "slug", "steps", "guidance", "sampler", "width", "height", "config")
SLUG_CHARS = 40
PNG_KEY = "sdcli"  # the PNG text chunk holding the JSON metadata
TEMP_SUFFIX = ".sdcli-tmp"

# What AUTOMATIC1111's web UI calls each sampler in its `parameters` infotext.
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}

# Metadata keys that decide the pixels (with the device and dtype); equal recipes mean the same image.
RECIPE_KEYS = (*request_fields(), "config", "weights_sha256")
META_TYPES = {
    "prompt": str, "negative": str, "seed": int, "steps": int, "guidance": float, "sampler": str,
    "width": int, "height": int, "config": str, "config_path": str, "weights": str, "weights_sha256": str,
    "device": str, "dtype": str, "batch_size": int, "compile": bool, "sdcli_version": str, "elapsed": float,
    "created": str,
}  # fmt: skip


def slugify(text: str) -> str:
    """A file-name-safe short form of a prompt: lower case words joined by '-', cut at a word end."""
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > SLUG_CHARS:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or (words[0][:SLUG_CHARS] if words else "image")


def check_name_template(template: str) -> None:
    """Reject a --name template that cannot render, before any work is done."""
    name_stem(template, Request("x", "", 0, 1, 1.0, SAMPLERS[0], 8, 8), index=0, config="x")


def name_stem(template: str, request: Request, *, index: int, config: str) -> str:
    """A file name without extension from the --name template and one image's settings."""
    fields = {name: getattr(request, name) for name in ("seed", "steps", "guidance", "sampler", "width", "height")}
    fields |= {"index": index, "slug": slugify(request.prompt), "config": config}
    try:
        stem = template.format_map(fields)
    except KeyError as exc:
        raise RequestError(
            f"--name '{template}': unknown field {{{exc.args[0]}}}; fields: {', '.join(NAME_FIELDS)}"
        ) from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise RequestError(f"--name '{template}': not a valid template: {exc}") from None
    if not stem or stem.startswith(".") or "/" in stem or "\\" in stem or "\0" in stem or len(stem) > 200:
        raise RequestError(
            f"--name '{template}' gives '{stem}': a name must be 1-200 characters, without '/' and not start with '.'"
        )
    return stem


def build_metadata(
    request: Request,
    *,
    config: ModelConfig,
    weights: Path,
    weights_sha256: str,
    device: str,
    dtype: str,
    batch_size: int,
    elapsed: float,
    compiled: bool = False,
) -> dict[str, Any]:
    """Everything needed to re-render an image, in the order it is written."""
    meta: dict[str, Any] = {name: getattr(request, name) for name in request_fields()}
    meta["guidance"] = float(request.guidance)
    meta["config"] = config_reference(config)
    if config.source is not None and config.source.resolve().parent != bundled_config_dir().resolve():
        meta["config_path"] = str(config.source.resolve())
    meta |= {
        "weights": str(Path(weights).resolve()),
        "weights_sha256": weights_sha256,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,  # images that shared one U-Net call: it can change the lowest bits
        **({"compile": True} if compiled else {}),  # compiled kernels round differently from eager ones
        "sdcli_version": __version__,
        "elapsed": round(elapsed, 3),
        "created": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
    }
    return meta


def config_reference(config: ModelConfig) -> str:
    """The name `--config` takes for this config: the file's stem for bundled and user configs."""
    return config.source.stem if config.source is not None else config.name


def recipe(meta: dict[str, Any]) -> tuple:
    return tuple(meta.get(key) for key in RECIPE_KEYS)


def infotext(meta: dict[str, Any]) -> str:
    """The `parameters` text that AUTOMATIC1111-style tools read: prompt, negative, then settings."""
    lines = [meta["prompt"]]
    if meta["negative"]:
        lines.append(f"Negative prompt: {meta['negative']}")
    settings = {
        "Steps": meta["steps"],
        "Sampler": A1111_SAMPLERS[meta["sampler"]],
        "CFG scale": meta["guidance"],
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        "Model hash": meta["weights_sha256"][:10],  # A1111's "AutoV2" short hash
        "Model": Path(meta["weights"]).stem,
        "Version": f"sdcli {meta['sdcli_version']}",
    }
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in settings.items()))
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A1111 quotes a value that would break its `key: value, ...` line."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def write_pair(image: Image.Image, meta: dict[str, Any], png: Path, sidecar: Path) -> None:
    """Write the PNG then the JSON sidecar, each fsynced under a temporary name and then renamed."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta, ensure_ascii=False))  # iTXt (UTF-8) when latin-1 will not do
    info.add_text("parameters", infotext(meta))
    png_temp, json_temp = temp_path(png), temp_path(sidecar)
    try:
        with open(png_temp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            _sync(f)
        with open(json_temp, "wb") as f:
            f.write((json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
            _sync(f)
        os.replace(png_temp, png)
        os.replace(json_temp, sidecar)
    finally:
        png_temp.unlink(missing_ok=True)
        json_temp.unlink(missing_ok=True)
    _sync_dir(png.parent)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Make the renames durable too (POSIX syncs a folder's entries through the folder)."""
    # Some platforms and file systems cannot open or fsync a folder; the files themselves are synced.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(final: Path) -> Path:
    """Hidden, per-process, same folder (so the rename is atomic): `.NAME.HOST.PID.sdcli-tmp`."""
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}")


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files left by killed sdcli processes of this host (live ones are left alone)."""
    host = socket.gethostname()
    for temp in folder.glob(f".*.{host}.*{TEMP_SUFFIX}"):
        pid = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            temp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def prepare_folder(folder: Path) -> None:
    """Create the output folder and prove it writable before the model is loaded."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RequestError(f"--out {folder}: cannot write there: {exc.strerror or exc}") from None


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an sdcli image, from its PNG (text chunk) or its JSON sidecar, type-checked."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"--from {path}: file not found")
    if path.suffix.lower() == ".png":
        try:
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get(PNG_KEY)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(f"--from {path}: not a readable PNG: {exc}") from None
        if text is None:
            raise RequestError(f"--from {path}: the image carries no sdcli metadata")
    elif path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RequestError(f"--from {path}: cannot read: {exc}") from None
    else:
        raise RequestError(f"--from {path}: expected an sdcli .png image or its .json sidecar")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"--from {path}: metadata is not valid JSON: {exc}") from None
    return check_metadata(meta, str(path))


def check_metadata(meta: Any, where: str) -> dict[str, Any]:
    """Metadata must hold a complete recipe; known keys must have their types (ints are floats too)."""
    if not isinstance(meta, dict):
        raise RequestError(f"--from {where}: metadata must be a JSON object")
    for key in (*request_fields(), "config"):
        if key not in meta:
            raise RequestError(f"--from {where}: metadata lacks '{key}'")
    for key, kind in META_TYPES.items():
        if key in meta and not _is(meta[key], kind):
            raise RequestError(f"--from {where}: metadata '{key}' must be {kind.__name__}, got {meta[key]!r}")
    return meta


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def load_existing(png: Path, sidecar: Path) -> dict[str, Any] | None:
    """What is already at an image's names: None when neither file exists, {} when it is not readable
    sdcli metadata, else the metadata (from the sidecar, or the PNG's own chunk when the sidecar is gone)."""
    if not png.exists() and not sidecar.exists():
        return None
    try:
        return check_metadata(
            json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else _png_meta(png), ""
        )
    except (OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError, RequestError):
        return {}


def _png_meta(png: Path) -> Any:
    with Image.open(png) as image:
        return json.loads(getattr(image, "text", {}).get(PNG_KEY, "null"))
