"""Textual-inversion embeddings through the real command line with the tiny model: a name in the prompt or the
negative brings its file from the folders (or --embedding), the sidecar names it by hash and --from re-renders
exactly, and a bad file is one line with nothing rendered. (Parity with diffusers: test_embedding_parity.py.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from embedding_files import vectors, write_a1111_pt, write_pickle_with_code, write_single
from test_cli_render import pairs, pixels

WIDTH = 32  # the tiny model's text width


def render(cli, tiny_model, out, prompt, *args, negative="blurry"):
    ran = cli("generate", prompt, "-n", negative, "-c", tiny_model, "-o", out, "--seed", "3", "--json", *args)
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    return made, pixels(made["image"])


@pytest.fixture
def folder(tmp_path):
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    write_single(embeddings / "ShinyStyle.safetensors", vectors(3, WIDTH, 1) * 20)
    write_a1111_pt(embeddings / "badpose.pt", vectors(1, WIDTH, 2) * 20)
    return embeddings


def test_a_name_in_either_text_uses_its_file(cli, tiny_model, tmp_path, folder):
    _, base = render(cli, tiny_model, tmp_path / "base", "a red circle, shinystyle")
    made, styled = render(cli, tiny_model, tmp_path / "a", "a red circle, shinystyle", "--embedding-dir", folder)
    assert np.abs(styled.astype(int) - base).mean() > 1
    sha = hashlib.sha256((folder / "ShinyStyle.safetensors").read_bytes()).hexdigest()
    assert made["embeddings"] == [{"file": str(folder / "ShinyStyle.safetensors"), "weight": 1.0, "sha256": sha}]
    _, negative = render(cli, tiny_model, tmp_path / "n", "a red circle", "--embedding-dir", folder,
                         negative="ShinyStyle")  # fmt: skip
    _, plain_negative = render(cli, tiny_model, tmp_path / "pn", "a red circle", negative="ShinyStyle")
    assert not np.array_equal(negative, plain_negative)
    _, given = render(cli, tiny_model, tmp_path / "g", "a red circle, shinystyle", "--embedding",
                      folder / "ShinyStyle.safetensors")  # fmt: skip
    assert np.array_equal(given, styled)
    stem = pairs(tmp_path / "a")[0]
    from PIL import Image

    with Image.open(tmp_path / "a" / f"{stem}.png") as png:
        assert f'TI hashes: "ShinyStyle: {sha[:12]}"' in png.text["parameters"]
    for source in (f"{stem}.json", f"{stem}.png"):
        again = cli("generate", "--from", tmp_path / "a" / source, "-c", tiny_model, "-o", tmp_path / "again",
                    "--json", "--embedding-dir", folder)  # fmt: skip
        assert again.code == 0, again.err
        assert np.array_equal(pixels(json.loads(again.out)["image"]), styled), source


def test_a1111_pt_needs_allow_pickle(cli, tiny_model, tmp_path, folder):
    ran = cli("generate", "badpose", "-c", tiny_model, "-o", tmp_path / "o", "--embedding-dir", folder)
    assert ran.code == 2 and "pickle checkpoints can run code" in ran.err_lines[-1], ran.err
    made, _ = render(cli, tiny_model, tmp_path / "ok", "badpose", "--embedding-dir", folder, "--allow-pickle")
    assert [e["file"] for e in made["embeddings"]] == [str(folder / "badpose.pt")]


@pytest.mark.parametrize("case", ["wide", "code", "weight"])
def test_bad_embeddings_are_one_line_and_render_nothing(cli, tiny_model, tmp_path, case):
    folder = tmp_path / "e"
    folder.mkdir()
    marker = tmp_path / "ran"
    args = ["--embedding-dir", folder]
    if case == "wide":
        write_single(folder / "wide.safetensors", vectors(1, 768, 0))
        prompt, message = "a wide cat", "wide.safetensors: vectors of width 768"
    elif case == "code":
        write_pickle_with_code(folder / "evil.pt", WIDTH, marker)
        prompt, message, args = "evil", "evil.pt", [*args, "--allow-pickle"]
    else:
        jobs = tmp_path / "jobs.jsonl"
        write_single(folder / "x.safetensors", vectors(1, WIDTH, 0))
        jobs.write_text(json.dumps({"prompt": "x", "embeddings": [f"{folder / 'x.safetensors'}:2"]}), encoding="utf-8")
        ran = cli("batch", jobs, "-c", tiny_model, "-o", tmp_path / "out")
        assert ran.code == 2 and "an embedding takes no weight" in ran.err_lines[-1], ran.err
        return
    ran = cli("generate", prompt, "-c", tiny_model, "-o", tmp_path / "out", *args)
    assert ran.code == 2 and ran.out == "", ran
    assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or pairs(tmp_path / "out") == []
