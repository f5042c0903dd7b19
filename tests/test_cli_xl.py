"""SDXL through every CLI feature with a tiny random-weight SDXL-layout model: generate, batch, resume,
--from, metadata and shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_XL_YAML = """\
name: tiny-xl
description: tiny random-weight SDXL-layout model for tests
weights: tiny-xl.safetensors
text:
  - {layout: hf_clip, prefix: conditioner.embedders.0.transformer.text_model., width: 32, heads: 2, layers: 2,
     activation: quick_gelu, output_layer: penultimate, final_norm: false, pad_id: 49407}
  - {layout: open_clip, prefix: conditioner.embedders.1.model., width: 48, heads: 2, layers: 2, activation: gelu,
     output_layer: penultimate, final_norm: false, pooled: true, pad_id: 0}
conditioning:
  vector: [pooled, original_size, crop_coords_top_left, target_size]
  size_embed_dim: 16
  zero_empty_negative: true
unet:
  model_channels: 32
  channel_mult: [1, 2]
  num_res_blocks: 1
  attention_levels: [1]
  transformer_depth: [1, 2]
  head_dim: 16
  context_dim: 80
  linear_proj: true
  adm_in_channels: 144
vae:
  base_channels: 32
  channel_mult: [1, 2]
  num_res_blocks: 1
  scale_factor: 0.13025
schedule:
  prediction_type: epsilon
defaults:
  width: 32
  height: 32
  steps: 3
  guidance: 5.0
  sampler: euler
"""


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory) -> Path:
    """The tiny SDXL config beside a seeded random checkpoint in the SDXL single-file layout."""
    import torch
    from conftest import _random_like
    from safetensors.torch import save_file

    from sdcli.config import parse_config
    from sdcli.weights import build_on_meta, expected_keys

    folder = tmp_path_factory.mktemp("tiny-xl")
    config = parse_config(TINY_XL_YAML)
    build_on_meta(config)  # the config builds
    torch.manual_seed(0)
    state = {key: _random_like(key, torch.empty(shape)) for key, shape in expected_keys(config).items()}
    save_file(state, str(folder / "tiny-xl.safetensors"))
    (folder / "tiny-xl.yaml").write_text(TINY_XL_YAML, encoding="utf-8")
    return folder / "tiny-xl.yaml"


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_generate_from_and_metadata(cli, xl_model, tmp_path):
    ran = cli("generate", "a red cube", "-c", xl_model, "-o", tmp_path, "--seed", "3", "--json")
    assert ran.code == 0, ran.err
    made = json.loads(ran.out)
    assert made["config"] == "tiny-xl" and made["width"] == 32 and made["negative"] == ""
    with Image.open(made["image"]) as image:
        assert "Sampler: Euler, Schedule type: Uniform" in image.text["parameters"]
    again = json.loads(cli("generate", "--from", made["metadata"], "-o", tmp_path / "again", "--json").out)
    assert np.array_equal(pixels(again["image"]), pixels(made["image"]))
    negative = json.loads(cli("generate", "a red cube", "-c", xl_model, "-o", tmp_path / "n", "--seed", "3",
                              "-n", "blue", "--json").out)  # fmt: skip
    assert not np.array_equal(pixels(negative["image"]), pixels(made["image"]))


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_karras"])
def test_every_sampler_renders_a_picture(cli, xl_model, tmp_path, sampler):
    ran = cli("generate", "a cube", "-c", xl_model, "-o", tmp_path, "--seed", "1", "--sampler", sampler, "--json")
    assert ran.code == 0, ran.err
    assert pixels(json.loads(ran.out)["image"]).std() > 1  # not a flat field


def test_batch_resume_and_shards_equal_one_process(cli, xl_model, tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("- a\n- prompt: b\n  negative: c\n  width: 48\n- d\n- e\n")
    one = tmp_path / "one"
    assert cli("batch", prompts, "-c", xl_model, "-o", one, "--batch-size", "2").code == 0
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 4
    resumed = cli("batch", prompts, "-c", xl_model, "-o", one, "--batch-size", "2")
    assert "done: 0 written, 4 skipped" in resumed.err
    shards = tmp_path / "shards"
    for i in range(2):
        assert cli("batch", prompts, "-c", xl_model, "-o", shards, "--batch-size", "2", "--shard", f"{i}/2").code == 0
    assert sorted(p.name for p in shards.glob("*.png")) == names
    for name in names:
        assert np.array_equal(pixels(one / name), pixels(shards / name)), name
