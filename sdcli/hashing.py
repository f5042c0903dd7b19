"""SHA-256 of weights files, cached by path, size and modification time so a 4 GB file is hashed once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CHUNK = 8 * 2**20


def cache_dir() -> Path:
    """$SDCLI_HOME/cache, else $XDG_CACHE_HOME/sdcli (default ~/.cache/sdcli)."""
    if os.environ.get("SDCLI_HOME"):
        return Path(os.environ["SDCLI_HOME"]).expanduser() / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sdcli"


def cached_sha256(path: Path) -> str | None:
    """The cached hash of an unchanged file, or None when it must be computed."""
    path = Path(path).resolve()
    entry = _read_cache(cache_dir() / "sha256.json").get(str(path))
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and entry.get("stamp") == file_stamp(path):
        return entry["sha256"]
    return None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, from the cache when the file's size and mtime are unchanged."""
    path = Path(path).resolve()
    known = cached_sha256(path)
    if known is not None:
        return known
    stamp = file_stamp(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    cache_file = cache_dir() / "sha256.json"
    cache = _read_cache(cache_file)
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_cache(cache_file, cache)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    """A weights file's SHA-256; for a diffusers folder, the SHA-256 of its files' names and hashes, so the
    folder is named by its bytes as a single file is."""
    from sdcli.diffusers_layout import weight_files  # torch: only a run hashes

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    lines = (f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n" for p in weight_files(path))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def is_hashed(path: Path) -> bool:
    """Whether `sha256_of(path)` is answered from the cache (else the user is told it may take a while)."""
    from sdcli.diffusers_layout import weight_files

    return all(cached_sha256(p) is not None for p in weight_files(path))


def file_stamp(path: Path) -> list[int]:
    """Size and modification time: a changed file gets a new stamp (JSON lists, to compare after a reload)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache_file: Path) -> dict:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, cache: dict) -> None:
    """Best effort: the cache only saves time, so a read-only home must not stop a render."""
    temp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temp, cache_file)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
