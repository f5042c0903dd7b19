"""LoRAs through the real command line with the tiny model: --lora and <lora:> tags give the same pixels, the
sidecar names each file by hash so --from re-renders exactly, a batch of several sets regroups and unmerges
exactly, and every bad LoRA is one line with nothing rendered. (Parity with diffusers: test_lora_parity.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdcli.config import parse_config
from sdcli.nets.unet import UNet

from test_cli_render import meta, pairs, pixels


def kohya_names(tiny_model) -> dict[str, tuple[int, int]]:
    """kohya names (diffusers' module names for the U-Net, HF CLIP's for the text) -> (out, in) of a few layers."""
    config = parse_config(tiny_model.read_text())
    names = {}
    for name, module in UNet(config.unet).named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2")):
            names["lora_unet_" + name.replace(".", "_")] = tuple(module.weight.shape)
    width = config.text[0].width
    for layer in range(config.text[0].layers):
        for part in ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"):
            rows = 4 * width if part == "mlp_fc1" else width
            names[f"lora_te_text_model_encoder_layers_{layer}_{part}"] = (rows, width)
    return names


def write_lora(path, names, *, seed=0, rank=2, extra=None):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, cols) in names.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g) / cols**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file({**tensors, **(extra or {})}, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    names = kohya_names(tiny_model)
    return write_lora(folder / "style.safetensors", names, seed=1), write_lora(folder / "other.safetensors", names)


def render(cli, tiny_model, out, *args):
    ran = cli("generate", "a red circle", "-c", tiny_model, "-o", out, "--seed", "3", "--json", *args)
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    return made, pixels(made["image"])


def test_a_lora_changes_the_image_and_is_recorded(cli, tiny_model, tmp_path, loras):
    style, _ = loras
    _, base = render(cli, tiny_model, tmp_path / "base")
    made, image = render(cli, tiny_model, tmp_path / "lora", "--lora", f"{style}:0.8")
    assert np.abs(image.astype(int) - base).mean() > 2  # a LoRA that changes nothing would pass everything else
    import hashlib

    sha = hashlib.sha256(style.read_bytes()).hexdigest()
    assert made["loras"] == [{"file": str(style), "weight": 0.8, "sha256": sha}]
    stem = pairs(tmp_path / "lora")[0]
    from PIL import Image

    with Image.open(tmp_path / "lora" / f"{stem}.png") as png:
        shared, parameters = json.loads(png.text["sdcli"]), png.text["parameters"]
    assert shared["loras"][0]["file"] == "style.safetensors"  # no local path in a shared picture
    assert parameters.startswith("a red circle <lora:style:0.8>\n")
    assert re.search(r"Lora hashes: \"style: [0-9a-f]{12}\"", parameters)
    _, zero = render(cli, tiny_model, tmp_path / "zero", "--lora", f"{style}:0")
    assert np.array_equal(zero, base)


def test_tag_equals_option_and_from_reproduces(cli, tiny_model, tmp_path, loras):
    style, _ = loras
    made, by_option = render(cli, tiny_model, tmp_path / "a", "--lora", f"{style}:0.6")
    ran = cli("generate", "a red circle <lora:STYLE:0.6>", "-c", tiny_model, "-o", tmp_path / "b", "--seed", "3",
              "--json", "--lora-dir", style.parent)  # fmt: skip
    tagged = json.loads(ran.out)
    assert tagged["prompt"] == "a red circle " and np.array_equal(pixels(tagged["image"]), by_option)
    stem = pairs(tmp_path / "a")[0]
    for source in (tmp_path / "a" / f"{stem}.json", tmp_path / "a" / f"{stem}.png"):
        again = cli("generate", "--from", source, "-c", tiny_model, "-o", tmp_path / "again", "--json", "--lora-dir",
                    style.parent)  # fmt: skip
        assert again.code == 0, again.err
        assert np.array_equal(pixels(json.loads(again.out)["image"]), by_option)


def test_a_batch_of_several_sets_regroups_and_unmerges_exactly(cli, tiny_model, tmp_path, loras):
    style, other = loras
    expected = {}
    for key, args in (("none", []), ("style", ["--lora", f"{style}:0.7"]),
                      ("both", ["--lora", f"{style}:0.7", "--lora", f"{other}:-0.4"])):  # fmt: skip
        expected[key] = render(cli, tiny_model, tmp_path / key, "--batch-size", "1", *args)[1]
    items = [
        {"prompt": "a red circle", "seed": 3, "name": "1-none"},
        {"prompt": "a red circle <lora:style:0.7>", "seed": 3, "name": "2-style"},
        {"prompt": "a red circle", "seed": 3, "name": "3-both", "loras": [f"{style}:0.7", f"{other}:-0.4"]},
        {"prompt": "a red circle", "seed": 3, "name": "4-none", "steps": 3},
        {"prompt": "a red circle", "seed": 3, "name": "5-style",
         "loras": [{"file": "style.safetensors", "weight": 0.7}]},  # fmt: skip
    ]
    (style.parent / "jobs.jsonl").write_text("\n".join(json.dumps(i) for i in items), encoding="utf-8")
    jobs = style.parent / "jobs.jsonl"
    folders = ("--lora-dir", style.parent)
    ran = cli("batch", jobs, "-c", tiny_model, "-o", tmp_path / "batch", "--batch-size", "1", *folders)
    assert ran.code == 0, ran.err
    for stem in pairs(tmp_path / "batch"):
        assert np.array_equal(pixels(tmp_path / "batch" / f"{stem}.png"), expected[stem.split("-")[1]]), stem
    assert meta(tmp_path / "batch", "5-style")["loras"][0]["file"] == str(style)  # beside the prompt file
    again = cli("batch", jobs, "-c", tiny_model, "-o", tmp_path / "batch", "--lora-dir", style.parent)
    assert "done: 0 written, 5 skipped" in again.err  # the recipe holds the files by hash


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p, n: write_lora(p, {"lora_te2_text_model_encoder_layers_0_mlp_fc1": (128, 32)}), [],
         "it is for a model with two text encoders"),
        (lambda p, n: write_lora(p, {**n, "lora_unet_no_such_block_proj": (4, 4)}), [],
         "layer 'lora_unet_no_such_block_proj' matches no module"),
        (lambda p, n: write_lora(p, {"lora_unet_" + next(iter(n))[10:]: (7, 7)}), [], "does not fit"),
        (lambda p, n: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), [], "corrupt safetensors header"),
        (lambda p, n: save_file({"x.hada_w1_a": torch.zeros(2, 2)}, str(p)), [], "a LoHa file; sdcli merges"),
        (lambda p, n: write_lora(p, n), ["--lora", "LORA:11"], "outside -10..10"),
        (lambda p, n: write_lora(p, n), ["--lora", "missing.safetensors"], "LoRA file not found"),
        (lambda p, n: torch.save({"a": torch.zeros(1)}, p.with_suffix(".pt")), ["--lora", "PT"],
         "pickle checkpoints can run code"),
    ],
)  # fmt: skip
def test_bad_loras_are_one_line_and_render_nothing(cli, tiny_model, tmp_path, make, args, message):
    path = tmp_path / "bad.safetensors"
    make(path, kohya_names(tiny_model))
    args = [a.replace("LORA", str(path)).replace("PT", str(path.with_suffix(".pt"))) for a in args] or ["--lora", path]
    ran = cli("generate", "x", "-c", tiny_model, "-o", tmp_path / "out", *args)
    assert ran.code == 2 and ran.out == "", ran
    assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
    assert not any(line.startswith("sdcli: error") for line in ran.err_lines[:-1])
    assert not (tmp_path / "out").exists() or pairs(tmp_path / "out") == []


def test_compile_refuses_several_sets(cli, tiny_model, tmp_path, loras):
    style, _ = loras
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a <lora:style>\nb\n", encoding="utf-8")
    ran = cli("batch", jobs, "-c", tiny_model, "-o", tmp_path / "o", "--compile", "--lora-dir", style.parent)
    assert ran.code == 2 and "--compile renders one LoRA set per job" in ran.err_lines[-1], ran.err
