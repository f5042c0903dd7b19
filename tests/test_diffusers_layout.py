"""The diffusers layout against diffusers itself: the key maps rename sdcli's networks into diffusers' models
bit for bit, a diffusers folder (saved by diffusers from a random checkpoint) loads exactly as that
checkpoint does, and a VAE in any accepted layout loads as diffusers reads it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcli.checkpoint import UNET_PREFIX, VAE_PREFIX, config_for_weights, weights_problem
from sdcli.config import load_config
from sdcli.diffusers_layout import open_vae_file, unet_key_map, vae_key_map, weight_files
from sdcli.errors import CheckpointError
from sdcli.weights import load_components

from reference import (
    KEY_LISTS,
    diffusers_pipeline,
    diffusers_xl_pipeline,
    original_config,
    read_key_list,
    tiny_config,
    write_random_checkpoint,
)

CPU = torch.device("cpu")
FAMILIES = ("sd1", "sd2", "sdxl")


def _pipeline(family: str, checkpoint):
    build = diffusers_xl_pipeline if family == "sdxl" else diffusers_pipeline
    return build(tiny_config(family), checkpoint, "euler")


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, checkpoint, diffusers pipeline read from it, the folder that pipeline saved)."""
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    checkpoint = write_random_checkpoint(tiny_config(family), root / "model.safetensors", dtype=torch.float32, seed=5)
    pipe = _pipeline(family, checkpoint)
    pipe.save_pretrained(root / "folder")
    return family, checkpoint, pipe, root / "folder"


def _load(family: str, path, **kwargs):
    return load_components(tiny_config(family), path, CPU, torch.float32, **kwargs)


def _as_diffusers_vae(vae, key_map) -> dict[str, torch.Tensor]:
    return {key_map[k].name: v.reshape(v.shape[:2]) if key_map[k].linear else v for k, v in vae.state_dict().items()}


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_unet_key_map_renames_sdcli_unet_into_diffusers(saved):
    family, checkpoint, pipe, _ = saved
    key_map = unet_key_map(tiny_config(family).unet)
    ours = {key_map[key]: value for key, value in _load(family, checkpoint).unet.state_dict().items()}
    _assert_same(ours, pipe.unet.state_dict())


def test_vae_key_map_renames_sdcli_vae_into_diffusers(saved):
    family, checkpoint, pipe, _ = saved
    key_map = vae_key_map(tiny_config(family).vae)
    assert sum(target.linear for target in key_map.values()) == 8  # q, k, v, proj_out of two mid blocks
    _assert_same(_as_diffusers_vae(_load(family, checkpoint).vae, key_map), pipe.vae.state_dict())


@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sdxl"])
def test_key_maps_agree_with_diffusers_converters_at_full_size(name):
    """The released files' layouts (as shapes only): diffusers' single-file converters put each LDM tensor where
    the maps say (the same tensor object, or for a Linear of the VAE a reshaped one)."""
    from diffusers.loaders import single_file_utils as sfu

    config, keys = load_config(name), read_key_list(KEY_LISTS[name])
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
    original = original_config(config)
    unet = sfu.convert_ldm_unet_checkpoint(checkpoint, sfu.create_unet_diffusers_config_from_ldm(original, checkpoint))
    unet_map = unet_key_map(config.unet)
    assert len(unet_map) == len(unet)
    assert all(unet[theirs] is checkpoint[UNET_PREFIX + ours] for ours, theirs in unet_map.items())
    vae = sfu.convert_ldm_vae_checkpoint(checkpoint, sfu.create_vae_diffusers_config_from_ldm(original, checkpoint))
    vae_map = vae_key_map(config.vae)
    assert len(vae_map) == len(vae)
    for ours, theirs in vae_map.items():
        stored = checkpoint[VAE_PREFIX + ours]
        converted = vae[theirs.name]
        assert converted.shape == (stored.shape[:2] if theirs.linear else stored.shape)
        assert (converted is stored) != theirs.linear


def test_folder_loads_as_its_single_file(saved):
    family, checkpoint, _, folder = saved
    from_file, from_folder = _load(family, checkpoint), _load(family, folder)
    for file_net, folder_net in zip(from_file.all(), from_folder.all(), strict=True):
        ours, theirs = file_net.state_dict(), folder_net.state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
        # diffusers keeps SD 2.x's text tower up to the penultimate block, the last one it reads
        unrun = {key for key in ours if key.startswith("transformer.resblocks.2.")} if family == "sd2" else set()
        assert set(ours) - set(theirs) == (unrun if file_net in from_file.text else set())
        assert set(theirs) <= set(ours)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    for file_text, folder_text in zip(from_file.text, from_folder.text, strict=True):
        for file_out, folder_out in zip(file_text(ids), folder_text(ids), strict=True):
            assert (file_out is None and folder_out is None) or torch.equal(file_out, folder_out)


def test_folder_family_is_detected(saved, tmp_path):
    family, _, _, folder = saved
    assert config_for_weights(folder) == {"sd1": "sd15", "sd2": "sd21-base", "sdxl": "sdxl"}[family]
    if family == "sd2":  # the scheduler config tells SD 2.x's v model from its epsilon base
        v_folder = shutil.copytree(folder, tmp_path / "v")
        scheduler = v_folder / "scheduler" / "scheduler_config.json"
        scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
        assert config_for_weights(v_folder) == "sd21-v"


def test_weight_files_are_the_components_files(saved):
    family, checkpoint, _, folder = saved
    names = {file.relative_to(folder).as_posix() for file in weight_files(folder)}
    encoders = {"sd1": 1, "sd2": 1, "sdxl": 2}[family]
    expected = {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    expected |= {f"text_encoder{'_2' if i else ''}/model.safetensors" for i in range(encoders)}
    assert names == expected
    assert weight_files(checkpoint) == [checkpoint]


def test_fp16_variant_and_sharded_folders_load(tmp_path):
    config = tiny_config("sdxl")
    checkpoint = write_random_checkpoint(config, tmp_path / "fp16.safetensors", dtype=torch.float16, seed=6)
    pipe = _pipeline("sdxl", checkpoint)
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    expected = _load("sdxl", checkpoint)
    for folder in ("fp16", "sharded"):
        loaded = _load("sdxl", tmp_path / folder)
        for ours, theirs in zip(expected.all(), loaded.all(), strict=True):
            _assert_same(ours.state_dict(), theirs.state_dict())


def test_a_folder_with_a_stray_tensor_is_refused(saved, tmp_path):
    family, _, _, folder = saved
    copy = shutil.copytree(folder, tmp_path / "copy")
    unet_file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(unet_file) | {"down_blocks.0.extra.weight": torch.zeros(2)}, unet_file)
    with pytest.raises(CheckpointError, match="unexpected tensor 'down_blocks.0.extra.weight' for a diffusers U-Net"):
        _load(family, copy)


def test_a_broken_folder_is_named_in_one_line(saved, tmp_path):
    _, _, _, folder = saved
    assert weights_problem(folder) is None
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    problem = weights_problem(copy)
    assert problem is not None and "\n" not in problem and str(copy / "vae") in problem
    (copy / "model_index.json").unlink()
    assert "not a diffusers one" in weights_problem(copy)


# --- the VAE from a file of its own --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_sources(tmp_path_factory):
    """The SD 1.x checkpoint the model loads from, another one whose VAE overrides it, and diffusers' reading
    of that VAE; the other VAE saved in each accepted layout."""
    root, config = tmp_path_factory.mktemp("vae"), tiny_config("sd1")
    model = write_random_checkpoint(config, root / "model.safetensors", dtype=torch.float32, seed=7)
    other = write_random_checkpoint(config, root / "other.safetensors", dtype=torch.float32, seed=8)
    pipe = diffusers_pipeline(config, other, "euler")
    pipe.save_pretrained(root / "pipeline")
    vae_dir = root / "pipeline" / "vae"
    ldm = {k[len(VAE_PREFIX) :]: v for k, v in load_file(other).items() if k.startswith(VAE_PREFIX)}
    save_file({k: v.half() for k, v in ldm.items()}, root / "bare-fp16.safetensors")
    save_file({VAE_PREFIX + k: v for k, v in ldm.items()}, root / "prefixed.safetensors")
    diffusers_state = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    for new, old in old_names.items():
        diffusers_state = {k.replace(new, old): v for k, v in diffusers_state.items()}
    (root / "deprecated").mkdir()
    save_file(diffusers_state, root / "deprecated" / "diffusion_pytorch_model.safetensors")
    layouts = {
        "whole-checkpoint": other,
        "prefixed": root / "prefixed.safetensors",
        "bare-ldm-fp16": root / "bare-fp16.safetensors",
        "diffusers-file": vae_dir / "diffusion_pytorch_model.safetensors",
        "diffusers-vae-folder": vae_dir,
        "diffusers-pipeline-folder": root / "pipeline",
        "diffusers-before-0.14": root / "deprecated",
    }
    return model, layouts, pipe.vae.state_dict()


@pytest.mark.parametrize(
    "layout",
    ["whole-checkpoint", "prefixed", "bare-ldm-fp16", "diffusers-file", "diffusers-vae-folder",
     "diffusers-pipeline-folder", "diffusers-before-0.14"],
)  # fmt: skip
def test_vae_override_loads_as_diffusers_reads_it(vae_sources, layout):
    model, layouts, expected = vae_sources
    if layout == "bare-ldm-fp16":  # diffusers' own reading of that file
        from diffusers import AutoencoderKL

        path = layouts[layout]
        expected = AutoencoderKL.from_single_file(
            str(path), config=str(layouts["diffusers-vae-folder"]), local_files_only=True, torch_dtype=torch.float32
        ).state_dict()
        assert not all(torch.equal(v, vae_sources[2][k]) for k, v in expected.items())  # rounded to fp16
    nets = _load("sd1", model, vae=layouts[layout])
    key_map = vae_key_map(tiny_config("sd1").vae)
    _assert_same(_as_diffusers_vae(nets.vae, key_map), expected)
    own = _as_diffusers_vae(_load("sd1", model).vae, key_map)
    assert not torch.equal(own["decoder.conv_out.weight"], expected["decoder.conv_out.weight"])


def test_vae_override_refuses_what_is_not_a_vae(vae_sources):
    model, layouts, _ = vae_sources
    unet_file = layouts["diffusers-pipeline-folder"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="not a VAE") as caught:
        _load("sd1", model, vae=unet_file)
    assert str(caught.value).startswith(str(unet_file)) and "\n" not in str(caught.value)


def test_vae_override_refuses_a_vae_of_another_shape(vae_sources, tmp_path):
    model, _, _ = vae_sources
    config = tiny_config("sd1")
    wide = replace(config, vae=replace(config.vae, base_channels=64))
    wide_file = write_random_checkpoint(wide, tmp_path / "wide.safetensors", dtype=torch.float16)
    with pytest.raises(CheckpointError, match="has shape .* it is not a VAE for this model") as caught:
        _load("sd1", model, vae=wide_file)
    assert str(caught.value).startswith(str(wide_file)) and "\n" not in str(caught.value)


def test_vae_override_lays_out_conv_weights_as_the_single_file_loader_does(vae_sources):
    """A Linear of the file becomes a 1x1 conv weight with the strides of the one read from a checkpoint."""
    model, layouts, expected = vae_sources
    loaded = [
        load_components(tiny_config("sd1"), model, CPU, torch.float32, vae_layout=torch.channels_last, vae=vae)
        for vae in (layouts["whole-checkpoint"], layouts["diffusers-file"])
    ]
    from_file, from_diffusers = (nets.vae.decoder.mid.attn_1.q.weight for nets in loaded)
    assert from_diffusers.stride() == from_file.stride() != torch.empty(from_file.shape).stride()
    assert torch.equal(
        from_diffusers.reshape(from_diffusers.shape[:2]), expected["decoder.mid_block.attentions.0.to_q.weight"]
    )


def test_open_vae_file_presents_single_file_names(vae_sources):
    _, layouts, _ = vae_sources
    with open_vae_file(layouts["diffusers-file"]) as tensors:
        shapes = tensors.shapes
    assert all(key.startswith(VAE_PREFIX) for key in shapes)
    assert shapes[VAE_PREFIX + "decoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
