"""Images on disk: file names, metadata (JSON sidecar, PNG text chunks, A1111 infotext), safe writes.

Each file is written to a new hidden file in the target folder, `.NAME.HOST.PID.RANDOM.sdcli-tmp`, made
with O_EXCL|O_NOFOLLOW so that a file or symlink planted there makes the write fail instead of going
through it; it is fsynced, then published under its real name, the PNG first and its JSON sidecar
second, so a sidecar always has a whole PNG. Unless the caller planned an overwrite, a publish never
replaces a file: a hard link, which fails on an existing name, then the temporary's unlink; on file
systems without hard links renameat2(RENAME_NOREPLACE); with neither, a check then a rename, which is
not atomic. A name taken meanwhile sends the image to the caller's next candidate name. The folder is
fsynced after each publish. The PNG carries the same JSON in an iTXt chunk named `sdcli`, so either file
alone re-renders the image.

What a process killed at any system call leaves, besides the whole files it had published, is at most:
- hidden temporary files (this host, a dead PID), which the next run in that folder deletes or moves into
  place (`repair_folder`, which the CLI calls as `remove_stale_temps`);
- a whole PNG without its sidecar (killed between the two publishes): the next run moves the finished
  temporary sidecar into place. Where none is left (an exception such as Ctrl-C between the publishes
  deletes it; so may a user), the next look at the name (`load_existing`, through `complete_pair`)
  writes the sidecar from the PNG's own chunk;
- killed in the instant it takes back a PNG whose sidecar's name it found taken by another file: that
  PNG beside the other file, which is never touched.
Never a partial file under a real name, never our sidecar without its PNG, and never a replaced file that
was not planned to be (but for the last-resort check-then-rename, where a file system has neither primitive).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import glob
import io
import json
import os
import re
import secrets
import socket
import string
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdcli import __version__
from sdcli.config import ModelConfig, bundled_config_dir
from sdcli.errors import RequestError
from sdcli.extra_networks import lora_tag
from sdcli.request import (
    FileUse,
    Request,
    file_fields,
    legacy_values,
    metadata_types,
    name_fields,
    recipe_keys,
    recorded_values,
    request_fields,
    request_types,
    required_metadata,
)
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.text_limits import clip

DEFAULT_NAME = "{index:05d}-{seed}-{slug}"
NAME_FIELDS = name_fields()
NAME_BYTES = 120  # a stem's most bytes: with '.png', a '-N' suffix and the temporary name's parts, under 255
FORMAT_NUMBER_LIMIT = 99  # widths and precisions in a template: '{index:>9999999999}' would exhaust memory
SLUG_CHARS = 40
PNG_KEY = "sdcli"  # the PNG text chunk holding the JSON metadata
TEMP_SUFFIX = ".sdcli-tmp"
TOKEN_BYTES = 8  # a temporary name's random part: 16 hex digits nobody can guess to plant a file there
SAME_IMAGE = ("seed", "prompt", "created")  # a temporary sidecar and a PNG agreeing on these are one write
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})  # link(2) where a file system has none
NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})  # a kernel or file system without it
AT_FDCWD, RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>
LOCAL_ONLY = ("weights", "config_path")  # absolute paths: kept in the local sidecar, never in the shared PNG


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
    """Reject a --name template that cannot render, before any work is done: only plain fields (no
    `{seed[0]}` or `{seed.real}`), no nested or huge format specs."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RequestError(f"--name {clip(template)}: not a valid template: {exc}") from None
    for _, field_name, spec, _ in parts:
        if field_name is None:
            continue
        if field_name not in NAME_FIELDS:
            raise RequestError(
                f"--name {clip(template)}: unknown field {{{clip(field_name, 40, quote=False)}}}; "
                f"fields: {', '.join(NAME_FIELDS)}"
            )
        if "{" in (spec or "") or any(int(n) > FORMAT_NUMBER_LIMIT for n in re.findall(r"\d+", spec or "")):
            raise RequestError(f"--name {clip(template)}: format spec {clip(spec, 40)} is not allowed")
    sample = {"str": "x", "int": 0, "float": 1.0, "list": ()}
    _format_stem(template, {name: sample[kind.__name__] for name, kind in request_types().items()} | {
        "index": 0, "slug": "x", "config": "x"})


def template_fields(template: str) -> set[str]:
    """The fields a (checked) --name template uses."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def name_stem(template: str, request: Request, *, index: int, config: str) -> str:
    """A file name without extension from the --name template and one image's settings."""
    fields = {name: getattr(request, name) for name in NAME_FIELDS if name in request_types()}
    return _format_stem(template, fields | {"index": index, "slug": slugify(request.prompt), "config": config})


def _format_stem(template: str, fields: dict[str, Any]) -> str:
    try:
        stem = template.format_map(fields)
    except KeyError as exc:
        raise RequestError(
            f"--name {clip(template)}: unknown field {{{clip(str(exc.args[0]), 40, quote=False)}}}; "
            f"fields: {', '.join(NAME_FIELDS)}"
        ) from None
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise RequestError(f"--name {clip(template)}: not a valid template: {exc}") from None
    bad = not stem or stem.startswith(".") or any(c in stem for c in "/\\\0")
    if bad or len(os.fsencode(stem)) > NAME_BYTES:
        raise RequestError(
            f"--name {clip(template)} gives {clip(stem)}: a name must be 1-{NAME_BYTES} bytes, "
            "without '/' and not start with '.'"
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
    threads: int,
    vae_dtype: str | None = None,
    compiled: bool = False,
    vae: tuple[Path, str] | None = None,
) -> dict[str, Any]:
    """Everything needed to re-render an image, in the order it is written."""
    meta: dict[str, Any] = {name: getattr(request, name) for name in request_fields()}
    meta |= {name: [dataclasses.asdict(use) for use in meta[name]] for name in file_fields()}
    meta["guidance"] = float(request.guidance)
    meta["config"] = config_reference(config)
    if config.source is not None and config.source.resolve().parent != bundled_config_dir().resolve():
        meta["config_path"] = str(config.source.resolve())
    meta |= {
        "weights": str(Path(weights).resolve()),
        "weights_sha256": weights_sha256,
        **({"vae": str(Path(vae[0]).resolve()), "vae_sha256": vae[1]} if vae else {}),  # decoded with this VAE
        "device": device,
        "dtype": dtype,
        # the VAE's own when it differs: fp16 overflows in most SD VAEs, which then decode in fp32
        **({"vae_dtype": vae_dtype} if vae_dtype not in (None, dtype) else {}),
        "threads": threads,  # CPU threads: some kernels' reductions round differently per thread count
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
    """What makes two images the same: the recipe's values, a file by its name, weight and hash (not where
    it lies)."""
    meta = {**legacy_values(), **meta}  # a sidecar written before a field existed meant its legacy value
    return tuple(_used_files(meta.get(key)) if key in file_fields() else meta.get(key) for key in recipe_keys())


def _used_files(uses: Any) -> tuple | None:
    if not uses:
        return ()
    if not isinstance(uses, (list, tuple)) or not all(isinstance(u, (dict, FileUse)) for u in uses):
        return None
    as_dicts = [dataclasses.asdict(u) if isinstance(u, FileUse) else u for u in uses]
    return tuple((Path(str(u.get("file"))).name, u.get("weight"), u.get("sha256")) for u in as_dicts)


def shareable(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata that travels inside the PNG: absolute paths (which name the user's home) become the
    file's name; `--from` finds the weights again by config, name and hash."""
    shared = {key: value for key, value in meta.items() if key not in LOCAL_ONLY}
    for key in file_fields():
        if isinstance(shared.get(key), list):
            shared[key] = [{**u, "file": Path(u["file"]).name} if isinstance(u, dict) else u for u in shared[key]]
    names = {key: Path(meta[key]).name for key in ("weights", "vae") if isinstance(meta.get(key), str)}
    return {**shared, **names}


def infotext(meta: dict[str, Any]) -> str:
    """The `parameters` text that AUTOMATIC1111-style tools read: prompt, negative, then settings."""
    recipe = recorded_values(meta)  # an older sidecar's meta lacks the newer fields
    # A1111 keeps the tags in the prompt text and reads the LoRAs back from them
    lines = [" ".join([meta["prompt"], *(lora_tag(use) for use in recipe["loras"])])]
    if meta["negative"]:
        lines.append(f"Negative prompt: {meta['negative']}")
    spec = SAMPLER_SPECS[meta["sampler"]]
    settings = {
        "Steps": meta["steps"],
        "Sampler": spec.a1111_name,
        "Schedule type": spec.a1111_schedule,  # A1111 1.9+ reads a bare "DPM++ 2M" as Karras
        "CFG scale": meta["guidance"],
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        **_image_settings(recipe),
        "Clip skip": recipe["clip_skip"] if recipe["clip_skip"] > 1 else None,  # as A1111: only when set
        # A1111's emphasis "None" reads brackets literally, like sdcli's plain syntax (which also cuts at 75)
        "Emphasis": "None" if recipe["prompt_syntax"] == "plain" else None,
        "Model hash": meta["weights_sha256"][:10],  # A1111's "AutoV2" short hash
        "Model": Path(meta["weights"]).stem,
        "VAE hash": meta["vae_sha256"][:10] if meta.get("vae_sha256") else None,
        "VAE": Path(meta["vae"]).name if meta.get("vae") else None,
        "Lora hashes": _short_hashes(recipe["loras"]),  # A1111's 12-digit "shorthash" of each file
        "TI hashes": _short_hashes(recipe["embeddings"]),
        "RNG": "CPU",  # the noise comes from a CPU generator; A1111 assumes GPU noise without this
    }  # no "Version": A1111 reads any version it cannot parse as an old one of its own and turns on its
    # backward-compatibility options (docs/metadata.md); sdcli's own is in the sdcli chunk
    pairs = (f"{key}: {_quote(str(value))}" for key, value in settings.items() if value is not None)
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _image_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """A1111's img2img and hires-fix fields: its `Denoising strength` is the img2img pass's, or the hires pass's."""
    hires = recipe["hires_scale"] != 1
    strength = recipe["strength"] if recipe["init_image"] else recipe["hires_strength"] if hires else None
    return {
        "Denoising strength": strength,
        "Mask blur": recipe["mask_blur"] if recipe["mask"] else None,
        "Hires upscale": recipe["hires_scale"] if hires else None,
        "Hires steps": recipe["hires_steps"] if hires and recipe["hires_steps"] else None,
        "Hires upscaler": {"latent": "Latent", "lanczos": "Lanczos"}[recipe["hires_upscale"]] if hires else None,
    }


def _short_hashes(uses: tuple[FileUse, ...]) -> str | None:
    return ", ".join(f"{Path(u.file).stem}: {u.sha256[:12]}" for u in uses) or None


def _quote(text: str) -> str:
    """A1111 quotes a value that would break its `key: value, ...` line."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def write_pair(
    image: Image.Image, meta: dict[str, Any], candidates: Iterable[tuple[Path, Path]], *, replace: bool = False
) -> tuple[Path, Path]:
    """Write the image under the first candidate (PNG, sidecar) pair whose two names are both free and
    return it; with `replace` (an overwrite the caller planned), the first pair, over what is there.
    Candidates are drawn one at a time, so a generator can name them NAME-1, NAME-2, ... as needed."""
    info = PngImagePlugin.PngInfo()
    shared = shareable(meta)  # the PNG travels; the sidecar with its local paths stays here
    info.add_text(PNG_KEY, json.dumps(shared, ensure_ascii=False))  # iTXt (UTF-8) when latin-1 will not do
    info.add_text("parameters", infotext(shared))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)  # encoded once: a lost race retries under the next name
    data = (encoded.getvalue(), _sidecar_bytes(meta))
    for png, sidecar in candidates:
        if not replace and (os.path.lexists(png) or os.path.lexists(sidecar)):
            continue  # saves writing temporaries for a name already taken; the publish is what guarantees
        try:
            _write_at(data, png, sidecar, replace=replace)
        except FileExistsError:
            continue  # another writer took one of the names since the check
        return png, sidecar
    raise FileExistsError(errno.EEXIST, "every candidate name is taken")


def _write_at(data: tuple[bytes, bytes], png: Path, sidecar: Path, *, replace: bool) -> None:
    """Publish the PNG, then the sidecar (so a sidecar always has a whole PNG); when the sidecar's name
    turns out taken, take the PNG back so that the image can go to the next candidate."""
    with _temporary(png, data[0]) as png_temp, _temporary(sidecar, data[1]) as json_temp:
        # Held open: our PNG's inode, which survives the link or rename, cannot be freed and given to
        # another file while we may still take it back.
        with open(png_temp, "rb") as held:
            publish(png_temp, png, replace=replace)
            try:
                publish(json_temp, sidecar, replace=replace)
            except FileExistsError:
                _withdraw(png, os.fstat(held.fileno()))
                raise


def _withdraw(png: Path, mine: os.stat_result) -> None:
    """Undo a PNG's publish; a file that replaced it since (an overwriting run's) is not ours to delete."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.lstat(png), mine):
            os.unlink(png)
            _sync_dir(png.parent)


def _sidecar_bytes(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


@contextlib.contextmanager
def _temporary(final: Path, data: bytes) -> Iterator[Path]:
    """A finished hidden file holding `data` beside `final`, deleted on the way out if not published."""
    temp = _write_temp(final, data)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def _write_temp(final: Path, data: bytes) -> Path:
    """`data`, fsynced, in a new hidden file beside `final`: O_EXCL and O_NOFOLLOW because a file or symlink
    planted at the name must make the write fail, never be written through."""
    temp = temp_path(final)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # less the umask, as open()
    try:
        with open(fd, "wb") as f:
            f.write(data)
            _sync(f)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Make a publish durable too (POSIX syncs a folder's entries through the folder)."""
    # Some platforms and file systems cannot open or fsync a folder; the files themselves are synced.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(temp: Path, final: Path, *, replace: bool = False) -> None:
    """Give a finished temporary file its real name, durably; unless `replace`, never over an existing file:
    FileExistsError instead."""
    if replace:
        os.replace(temp, final)
    else:
        _publish_new(temp, final)
    _sync_dir(final.parent)


def _publish_new(temp: Path, final: Path) -> None:
    """Hard link then unlink: link(2) refuses an existing name, and the whole file is under some name
    throughout; file systems without hard links get renameat2(RENAME_NOREPLACE)."""
    try:
        os.link(temp, final, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        _rename_new(temp, final)
    else:
        os.unlink(temp)


def _rename_new(temp: Path, final: Path) -> None:
    """renameat2(RENAME_NOREPLACE): one atomic step that refuses an existing name (Linux 3.15+, glibc 2.28+)."""
    rename = _renameat2()
    if rename is not None:
        if rename(AT_FDCWD, os.fsencode(temp), AT_FDCWD, os.fsencode(final), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in NO_RENAMEAT2:
            raise OSError(code, os.strerror(code), str(temp), None, str(final))
    # Last resort, with neither hard links nor renameat2 (FAT on an old kernel, say): check, then rename. It
    # is not atomic: a file created at `final` between the two is replaced; only there can races lose files.
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final))
    os.rename(temp, final)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, None where the C library has none (macOS, glibc before 2.28)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # TypeError: Windows cannot load "no library"
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def temp_path(final: Path) -> Path:
    """A hidden name beside `final` (so publishing is one link or rename): `.NAME.HOST.PID.RANDOM.sdcli-tmp`.
    Host and PID tell a later run whose leftover it is; the random part makes the name unguessable."""
    host, pid = socket.gethostname(), os.getpid()
    return final.with_name(f".{final.name}.{host}.{pid}.{secrets.token_hex(TOKEN_BYTES)}{TEMP_SUFFIX}")


def repair_folder(folder: Path) -> None:
    """Clear up after killed sdcli processes of this host (live ones' files are left alone): a finished
    sidecar whose PNG was published is moved into place, every other temporary file is deleted."""
    for temp, final in _stale_temps(folder):
        if _missing_sidecar(temp, final):
            with contextlib.suppress(FileExistsError, FileNotFoundError):  # another run repaired it first
                publish(temp, final)
        temp.unlink(missing_ok=True)


remove_stale_temps = repair_folder  # the name the CLI has always called


def _stale_temps(folder: Path) -> Iterator[tuple[Path, Path]]:
    """This host's temporary files whose process is dead, each with the path it was meant for."""
    # The random part is optional: earlier sdcli versions had none. At most 9 digits: a PID os.kill takes.
    pattern = re.compile(
        rf"\.(.+)\.{re.escape(socket.gethostname())}\.(\d{{1,9}})(?:\.[0-9a-f]{{{2 * TOKEN_BYTES}}})?"
        + re.escape(TEMP_SUFFIX)
    )
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        match = pattern.fullmatch(temp.name)
        if match and not _alive(int(match[2])):
            yield temp, folder / match[1]


def _missing_sidecar(temp: Path, sidecar: Path) -> bool:
    """Whether a dead process's temporary is the whole sidecar of a published PNG that lacks one: it parses,
    and says the same seed, prompt and time as the PNG's own chunk."""
    png = sidecar.with_suffix(".png")
    if sidecar.suffix != ".json" or temp.is_symlink() or os.path.lexists(sidecar) or not png.is_file():
        return False
    try:
        mine, published = json.loads(temp.read_text(encoding="utf-8")), _png_meta(png)
    except (OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError):
        return False  # cut short, or the PNG is not (yet) readable
    if not isinstance(mine, dict) or not isinstance(published, dict):
        return False
    return all(mine.get(key) == published.get(key) for key in SAME_IMAGE)


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
        _write_temp(folder / "probe", b"").unlink()
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
    for key in (*required_metadata(), "config"):
        if key not in meta:
            raise RequestError(f"--from {where}: metadata lacks '{key}'")
    for key, kind in metadata_types().items():
        if key in meta and not _is(meta[key], kind):
            raise RequestError(f"--from {where}: metadata '{key}' must be {kind.__name__}, got {clip(meta[key])}")
    return meta


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def load_existing(png: Path, sidecar: Path) -> dict[str, Any] | None:
    """What is already at an image's names: None when neither file exists, {} when it is not readable
    sdcli metadata, else the metadata (from the sidecar, which a lone sdcli PNG first gets back)."""
    if not png.exists() and not sidecar.exists():
        return None
    with contextlib.suppress(OSError):  # a folder that cannot be written is still read; a later run repairs
        complete_pair(png, sidecar)
    try:
        return check_metadata(
            json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else _png_meta(png), ""
        )
    except (OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError, RequestError):
        return {}


def complete_pair(png: Path, sidecar: Path) -> dict[str, Any] | None:
    """Give a lone sdcli PNG (its run stopped between the two publishes) its sidecar again, from the PNG's
    own chunk; the PNG's metadata, or None when the sidecar exists or `png` is no readable sdcli image, or
    another writer may still be between the two publishes."""
    if os.path.lexists(sidecar) or not png.is_file() or _being_written(sidecar):
        return None
    try:
        meta = check_metadata(_png_meta(png), str(png))
    except (OSError, ValueError, SyntaxError, RecursionError, Image.DecompressionBombError, RequestError):
        return None
    with _temporary(sidecar, _sidecar_bytes(meta)) as temp, contextlib.suppress(FileExistsError):
        publish(temp, sidecar)  # FileExistsError: another run completed it first
    return meta


def _being_written(sidecar: Path) -> bool:
    """A temporary of the sidecar is there from before its PNG's publish until after its own: a sidecar
    written from the PNG meanwhile would take the name from the writer, which then takes its PNG back."""
    return any(sidecar.parent.glob(f".{glob.escape(sidecar.name)}.*{TEMP_SUFFIX}"))


def _png_meta(png: Path) -> Any:
    with Image.open(png) as image:
        return json.loads(getattr(image, "text", {}).get(PNG_KEY, "null"))


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock on the output folder itself (no lock file is left behind) while a pair is
    named and published, so sdcli processes writing into one folder take turns at choosing free names.
    Where folders cannot be locked (no fcntl, some network file systems) the no-replace publish alone
    still keeps every file, and only the index counting may repeat."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def recorded_config(recorded: dict[str, Any]) -> str:
    """The config an image was made with: its recorded file when that still exists, else its name."""
    path = recorded.get("config_path")
    return path if path and Path(path).is_file() else recorded["config"]


def recorded_weights(recorded: dict[str, Any], config: ModelConfig) -> str | None:
    """The weights an image was made with, when they can be found: the sidecar's absolute path, else a file
    of the recorded name where the config looks for weights (the PNG carries only the name); None leaves
    the config's own. The runner compares the hash and warns when it differs."""
    path = Path(recorded.get("weights", ""))
    if path.is_absolute() and path.is_file():
        return str(path)
    if not path.name or path.name == Path(config.weights).name:
        return None
    for candidate in (path.name, Path(config.weights).parent / path.name):
        found = config.resolve_weights(candidate)
        if found.is_file():
            return str(found)
    return None


def recorded_vae(recorded: dict[str, Any]) -> str | None:
    """The separate VAE an image was decoded with: the sidecar's path when it is there, else its name as the
    weights are looked up (a missing one is then the runner's one-line error); None when it had none."""
    raw = recorded.get("vae")
    if not isinstance(raw, str) or not raw:
        return None
    path = Path(raw)
    return raw if path.is_absolute() and path.exists() else path.name
