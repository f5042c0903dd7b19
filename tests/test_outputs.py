"""File names, metadata (sidecar, PNG chunks, A1111 infotext), atomic writes and the weights hash cache."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_YAML
from PIL import Image

from sdcli.config import parse_config
from sdcli.errors import RequestError
from sdcli.hashing import cached_sha256, sha256_file
from sdcli.outputs import (
    DEFAULT_NAME,
    build_metadata,
    check_name_template,
    infotext,
    load_existing,
    name_stem,
    prepare_folder,
    read_metadata,
    remove_stale_temps,
    shareable,
    slugify,
    temp_path,
    write_pair,
)
from sdcli.request import Request

REQUEST = Request("a red circle, on white!", "blurry", 42, 20, 7.5, "dpmpp_2m_karras", 64, 48)


def meta_for(request: Request = REQUEST, config=None, **changes) -> dict:
    meta = build_metadata(
        request,
        config=config or parse_config(TINY_YAML, source=Path("/elsewhere/tiny.yaml")),
        weights=Path("/models/v1-5, pruned.safetensors"),
        weights_sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        device="cpu",
        dtype="fp32",
        threads=2,
        batch_size=1,
        elapsed=1.23456,
    )
    return meta | changes


def picture(seed: int = 0, size=(64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    "prompt, slug",
    [
        ("A red circle, on white!", "a-red-circle-on-white"),
        ("  ***  ", "image"),
        ("snake_case and CAPS", "snake-case-and-caps"),
        ("猫 on a mat", "猫-on-a-mat"),
        ("one two three four five six seven eight nine ten", "one-two-three-four-five-six-seven-eight"),
        ("x" * 60, "x" * 40),
    ],
)
def test_slugify(prompt, slug):
    assert slugify(prompt) == slug


def test_default_name_has_index_seed_slug_and_no_time():
    assert name_stem(DEFAULT_NAME, REQUEST, index=3, config="tiny") == "00003-42-a-red-circle-on-white"
    assert name_stem("{config}_{sampler}_{steps}_{width}x{height}_{guidance}", REQUEST, index=0, config="sd15") == (
        "sd15_dpmpp_2m_karras_20_64x48_7.5"
    )


@pytest.mark.parametrize(
    "template, message",
    [
        ("{date}", "unknown field {date}"),
        ("{index:q}", "not a valid template"),
        ("{", "not a valid template"),
        ("a/{seed}", "without '/'"),
        (".{seed}", "not start with '.'"),
        ("", "1-120 bytes"),
        ("x" * 121, "1-120 bytes"),
    ],
)
def test_bad_name_templates_are_refused(template, message):
    with pytest.raises(RequestError, match=message.replace("{", r"\{").replace("(", r"\(")):
        check_name_template(template)


def test_metadata_holds_the_recipe_and_provenance():
    meta = meta_for()
    assert {k: meta[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "sampler", "width", "height")} == {
        "prompt": "a red circle, on white!", "negative": "blurry", "seed": 42, "steps": 20, "guidance": 7.5,
        "sampler": "dpmpp_2m_karras", "width": 64, "height": 48,
    }  # fmt: skip
    assert meta["config"] == "tiny" and meta["config_path"] == str(Path("/elsewhere/tiny.yaml").resolve())
    assert meta["weights"] == "/models/v1-5, pruned.safetensors" and len(meta["weights_sha256"]) == 64
    assert (meta["device"], meta["dtype"], meta["batch_size"], meta["elapsed"]) == ("cpu", "fp32", 1, 1.235)
    assert meta["sdcli_version"] and meta["created"][:2] == "20" and "T" in meta["created"]


def test_bundled_config_records_no_path():
    from sdcli.config import load_config

    meta = meta_for(config=load_config("sd15"))
    assert meta["config"] == "sd15" and "config_path" not in meta


def test_a1111_infotext():
    # Hand-checked against the web UI's format (modules/processing.py create_infotext): prompt line,
    # "Negative prompt:" line, then "key: value" pairs; values with ',' or ':' are JSON-quoted.
    assert infotext(meta_for()) == (
        "a red circle, on white!\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, "
        'Model hash: 6ce0161689, Model: "v1-5, pruned", RNG: CPU'
    )
    assert "Negative prompt" not in infotext(meta_for(negative=""))
    # DDIM has no schedule choice in A1111, so no "Schedule type"; plain DPM++ 2M is told apart from Karras
    assert "Sampler: DDIM, CFG" in infotext(meta_for(sampler="ddim"))
    assert "Sampler: DPM++ 2M, Schedule type: SGM Uniform," in infotext(meta_for(sampler="dpmpp_2m"))


def test_the_png_carries_no_local_path_and_from_finds_the_weights_by_name(tmp_path, monkeypatch):
    from sdcli.config import load_config
    from sdcli.outputs import recorded_weights

    meta = meta_for(config=parse_config(TINY_YAML, source=tmp_path / "tiny.yaml"))
    write_pair(picture(), meta, [(tmp_path / "a.png", tmp_path / "a.json")])
    with Image.open(tmp_path / "a.png") as png:
        chunks = "".join(png.text.values())
    assert "/models/" not in chunks and str(tmp_path) not in chunks and "config_path" not in chunks
    assert json.loads(png.text["sdcli"])["weights"] == "v1-5, pruned.safetensors"
    assert json.loads((tmp_path / "a.json").read_text())["weights"] == "/models/v1-5, pruned.safetensors"
    store = tmp_path / "store"
    (store / "weights").mkdir(parents=True)
    (store / "weights" / "v1-5, pruned.safetensors").write_bytes(b"x")
    monkeypatch.setenv("SDCLI_WEIGHTS_DIR", str(store))
    found = recorded_weights(shareable(meta), load_config("sd15"))
    assert found == str(store / "weights" / "v1-5, pruned.safetensors")


def test_pair_round_trip(tmp_path):
    meta = meta_for(prompt="ünïcode ✓ prompt")
    image = picture()
    write_pair(image, meta, [(tmp_path / "a.png", tmp_path / "a.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == meta
    with Image.open(tmp_path / "a.png") as png:
        assert np.array_equal(np.asarray(png), np.asarray(image))
        assert json.loads(png.text["sdcli"]) == shareable(meta)
        assert png.text["parameters"] == infotext(shareable(meta))
    assert read_metadata(tmp_path / "a.png") == shareable(meta) and read_metadata(tmp_path / "a.json") == meta


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_pair(picture(), meta_for(), [(tmp_path / "a.png", tmp_path / "a.json")])
    assert list(tmp_path.iterdir()) == []


def test_the_sidecar_is_published_last(tmp_path, monkeypatch):
    """Interrupted between the two publishes, a PNG may stand alone, but a JSON never does."""
    real_link, calls = os.link, []

    def link(src, dst, **kwargs):
        calls.append(Path(dst).name)
        if Path(dst).suffix == ".json":
            raise KeyboardInterrupt
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(KeyboardInterrupt):
        write_pair(picture(), meta_for(), [(tmp_path / "a.png", tmp_path / "a.json")])
    assert calls == ["a.png", "a.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    monkeypatch.undo()
    assert load_existing(tmp_path / "a.png", tmp_path / "a.json")["prompt"] == REQUEST.prompt  # read from the PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]  # and the pair completed from it


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_path(tmp_path / "mine.png")
    theirs = mine.with_name(mine.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    other_host = tmp_path / f".x.png.another-host.{dead_pid}.sdcli-tmp"
    for path in (mine, theirs, other_host):
        path.write_bytes(b"partial")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_host.name])


def test_prepare_folder(tmp_path):
    prepare_folder(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RequestError, match=r"--out .*file/sub: cannot write there"):
        prepare_folder(tmp_path / "file" / "sub")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.txt", "hi", "expected an sdcli .png image or its .json sidecar"),
        ("x.json", "{not json", "not valid JSON"),
        ("x.json", "[1, 2]", "must be a JSON object"),
        ("x.json", '{"prompt": "a"}', "lacks 'negative'"),
        ("x.png", b"\x89PNG\r\n\x1a\n broken", "not a readable PNG"),
    ],
)
def test_bad_metadata_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RequestError, match=message):
        read_metadata(path)


@pytest.mark.parametrize(
    "key, value", [("seed", True), ("seed", 1.5), ("steps", "20"), ("guidance", None), ("prompt", 3)]
)
def test_metadata_types_are_checked(tmp_path, key, value):
    (tmp_path / "x.json").write_text(json.dumps(meta_for() | {key: value}))
    with pytest.raises(RequestError, match=f"'{key}' must be"):
        read_metadata(tmp_path / "x.json")


def test_metadata_accepts_an_integer_guidance(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps(meta_for() | {"guidance": 7}))
    assert read_metadata(tmp_path / "x.json")["guidance"] == 7


def test_png_without_metadata_and_missing_file(tmp_path):
    picture().save(tmp_path / "plain.png")
    with pytest.raises(RequestError, match="carries no sdcli metadata"):
        read_metadata(tmp_path / "plain.png")
    with pytest.raises(RequestError, match="file not found"):
        read_metadata(tmp_path / "gone.png")


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 1000)
    assert cached_sha256(weights) is None
    assert sha256_file(weights) == hashlib.sha256(b"x" * 1000).hexdigest() == cached_sha256(weights)
    cache = Path(os.environ["SDCLI_HOME"]) / "cache" / "sha256.json"
    entries = json.loads(cache.read_text())
    entries[str(weights.resolve())]["sha256"] = "from-the-cache"
    cache.write_text(json.dumps(entries))
    assert sha256_file(weights) == "from-the-cache"  # not re-hashed
    weights.write_bytes(b"y" * 1000)
    os.utime(weights, ns=(1, 1))
    assert sha256_file(weights) == hashlib.sha256(b"y" * 1000).hexdigest()


def test_an_unwritable_cache_does_not_stop_hashing(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SDCLI_HOME", str(blocker))
    (tmp_path / "w").write_bytes(b"abc")
    assert sha256_file(tmp_path / "w") == hashlib.sha256(b"abc").hexdigest()
