"""Family detection: a checkpoint's keys pick the bundled config that renders it (--weights without
--config), and files of other kinds are named in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcli.checkpoint import config_for_weights, detect_family
from sdcli.errors import CheckpointError

from reference import KEY_LISTS, read_key_list

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"


def header_only(path: Path, keys, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A safetensors file with the given tensor names (empty tensors, but for the shapes given)."""
    shapes = shapes or {}
    save_file({key: torch.zeros(shapes.get(key, (0,)), dtype=torch.float16) for key in keys}, str(path))
    return path


def xl_keys() -> list[str]:
    return [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
        UNET_INPUT,
        "first_stage_model.decoder.conv_in.weight",
    ]


@pytest.mark.parametrize("name, config", [("sd15", "sd15"), ("sd21-v", "sd21-v")])
def test_real_key_lists_pick_their_config(tmp_path, name, config):
    keys = read_key_list(KEY_LISTS[name])
    path = header_only(tmp_path / "model.safetensors", keys, {UNET_INPUT: (320, 4, 3, 3)})
    assert config_for_weights(path) == config


def test_sdxl_keys_pick_sdxl(tmp_path):
    path = header_only(tmp_path / "pony.safetensors", xl_keys(), {UNET_INPUT: (320, 4, 3, 3)})
    assert config_for_weights(path) == "sdxl"


@pytest.mark.parametrize(
    "keys, shapes, says",
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], {}, "Stable Diffusion 3"),
        (["double_blocks.0.img_attn.qkv.weight"], {}, "Flux"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], {}, "a LoRA"),
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], {}, "a LoRA"),
        (["encoder.conv_in.weight", "decoder.conv_in.weight"], {}, "a VAE alone"),
        (["string_to_param.*"], {}, "textual-inversion embedding"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], {}, "diffusers-layout U-Net"),
        ([UNET_INPUT, "cond_stage_model.transformer.text_model.final_layer_norm.weight"], {UNET_INPUT: (320, 8, 3, 3)},
         "a U-Net of 8 input channels"),
        ([UNET_INPUT, "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"],
         {UNET_INPUT: (384, 4, 3, 3)}, "an SDXL refiner"),
        (["some.other.weight"], {}, "not a checkpoint sdcli recognises"),
    ],
)
def test_other_kinds_of_file_are_named(tmp_path, keys, shapes, says):
    path = header_only(tmp_path / "thing.safetensors", keys, shapes)
    with pytest.raises(CheckpointError, match=says):
        config_for_weights(path)


def test_the_cli_names_the_family_in_one_line(cli, tmp_path):
    path = header_only(tmp_path / "flux1-dev.safetensors", ["double_blocks.0.img_attn.qkv.weight"])
    ran = cli("generate", "x", "--weights", path, "-o", tmp_path / "out")
    assert ran.code == 2 and ran.err_lines == [f"sdcli: error: {path}: this looks like a Flux checkpoint, which "
                                               "sdcli does not render"]  # fmt: skip


def test_detection_needs_no_shapes_but_the_unet_input():
    assert detect_family(dict.fromkeys(xl_keys(), ())).config == "sdxl"
