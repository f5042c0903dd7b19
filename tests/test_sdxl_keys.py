"""SDXL base 1.0's single-file layout (tests/data/sdxl-keys.txt) against diffusers' converters and sdcli's loader,
on the meta device (shapes only, no memory); and tiny random SDXL checkpoints in that layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from sdcli.config import load_config

import reference

CLIP_L = "conditioner.embedders.0.transformer.text_model."
BIG_G = "conditioner.embedders.1.model."
RELEASED_BYTES = 6_938_078_334  # sd_xl_base_1.0.safetensors as the hub serves it (LFS sha256 31e35c80...)


@pytest.fixture(autouse=True)
def one_thread():
    with reference.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def config():
    return load_config("sdxl")


@pytest.fixture(scope="module")
def keys():
    return reference.read_key_list(reference.KEY_LISTS["sdxl"])


def meta_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The full-size checkpoint as shapes only, for diffusers' converters (they slice and transpose)."""
    return {key: torch.empty(shape, device="meta") for key, shape in keys.items()}


def part(keys: dict, prefix: str) -> dict:
    return {k: s for k, s in keys.items() if k.startswith(prefix)}


def assert_maps_onto(converted: dict, model: torch.nn.Module, consumed: int, allowed_unexpected=frozenset()):
    """The converted state dict fills every tensor of `model` with its shape, from `consumed` file tensors
    (a fused in_proj counts once per q, k, v), and adds nothing outside `allowed_unexpected`."""
    assert all(v is not None for v in converted.values()), "converter read a key the list lacks"
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target) - set(allowed_unexpected))
    wrong = {k: (tuple(converted[k].shape), s) for k, s in target.items() if k in converted and converted[k].shape != s}
    assert not missing, f"diffusers tensors no file key maps onto: {missing[:10]}"
    assert not unexpected, f"file keys diffusers has no place for: {unexpected[:10]}"
    assert not wrong, f"shape mismatches (file, diffusers): {dict(list(wrong.items())[:10])}"
    assert len(converted) == consumed


# --- the key list --------------------------------------------------------------------------------------


def test_key_list_file_is_what_the_generator_writes(config, keys):
    assert keys == reference.ldm_keys(config)


def test_key_counts_are_the_known_totals(keys):
    """Hand-counted: U-Net 1680 (SD's 686 grows by label_emb and 2+10-deep transformers), KL-f8 VAE 248,
    CLIP-L 12 x 16 + 4 + position_ids, bigG 32 x 12 + 4 + text_projection + logit_scale; 2515 in all, the
    count the released file is reported with."""
    assert len(part(keys, reference.UNET_PREFIX)) == 1680
    assert len(part(keys, reference.VAE_PREFIX)) == 248
    assert len(part(keys, CLIP_L)) == 197
    assert len(part(keys, BIG_G)) == 390
    assert len(keys) == 2515
    assert not any(k.startswith(("cond_stage_model.", "model_ema.", "denoiser.")) for k in keys)
    assert not set(reference.SCHEDULE_BUFFERS) & set(keys)


def test_extras_are_position_ids_and_logit_scale(config, keys):
    assert reference.extra_keys(config) == {CLIP_L + "embeddings.position_ids": (1, 77), BIG_G + "logit_scale": ()}
    assert keys[BIG_G + "text_projection"] == (1280, 1280)
    for name, total in (("label_emb.0.0.weight", (1280, 2816)), ("label_emb.0.2.weight", (1280, 1280))):
        assert keys[reference.UNET_PREFIX + name] == total
    # per-level depth: level 1 has 2 blocks, level 2 and the middle 10, level 0 no transformer at all
    blocks = "model.diffusion_model.{}.1.transformer_blocks.{}.attn2.to_k.weight"
    assert keys[blocks.format("input_blocks.4", 1)] == (640, 2048)
    assert blocks.format("input_blocks.4", 2) not in keys
    assert keys[blocks.format("input_blocks.7", 9)] == (1280, 2048)
    assert keys[blocks.format("middle_block", 9)] == (1280, 2048)
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)


def test_sizes_fit_the_released_file(keys):
    """The tensors in fp16 (position_ids int64) plus their safetensors header table come within a few tens of
    KB under the released file's size, the rest being its __metadata__: no tensor of more than ~20k values
    is missing or extra."""
    stored = {"position_ids": 8}
    data = sum(math.prod(s) * stored.get(k.rsplit(".", 1)[-1], 2) for k, s in keys.items())
    table, offset = {}, 0
    for key, shape in keys.items():
        size = math.prod(shape) * stored.get(key.rsplit(".", 1)[-1], 2)
        dtype = "I64" if key.endswith("position_ids") else "F16"
        table[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = 8 + len(json.dumps(table, separators=(",", ":")))
    assert data == 6_937_676_352
    assert 0 < RELEASED_BYTES - data - header < 64 << 10


def test_diffusers_detects_the_layout_as_sdxl_base(keys):
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        is_clip_sdxl_model,
        is_open_clip_sdxl_model,
    )

    checkpoint = meta_checkpoint(keys)
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    assert is_clip_sdxl_model(checkpoint) and is_open_clip_sdxl_model(checkpoint)


# --- diffusers' converters cover every weight --------------------------------------------------------


def test_diffusers_unet_converter_covers_the_key_list(config, keys):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    checkpoint = meta_checkpoint(keys)
    unet_config = create_unet_diffusers_config_from_ldm(reference.original_config(config), checkpoint)
    # what the hub's unet/config.json says, derived by diffusers from the sgm yaml
    assert unet_config["addition_embed_type"] == "text_time" and unet_config["addition_time_embed_dim"] == 256
    assert unet_config["projection_class_embeddings_input_dim"] == 2816
    assert unet_config["transformer_layers_per_block"] == [1, 2, 10]
    assert unet_config["attention_head_dim"] == [5, 10, 20]
    assert unet_config["sample_size"] == 128
    assert reference.xl_unet_config(config) == ({**unet_config, "sample_size": 128}, True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    converted = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert_maps_onto(converted, unet, consumed=len(part(keys, reference.UNET_PREFIX)))
    assert converted["add_embedding.linear_1.weight"].shape == (1280, 2816)


def test_diffusers_vae_converter_covers_the_key_list(config, keys):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    checkpoint = meta_checkpoint(keys)
    vae_config = create_vae_diffusers_config_from_ldm(reference.original_config(config), checkpoint)
    assert vae_config["scaling_factor"] == config.vae.scale_factor == 0.13025
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    assert vae.config.force_upcast is config.vae.force_upcast is True
    converted = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    assert_maps_onto(converted, vae, consumed=len(part(keys, reference.VAE_PREFIX)))


def test_diffusers_clip_converter_covers_the_clip_l_keys(config, keys):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config.text[0]
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**reference.text_encoder_config(cfg, all_layers=True)))
    assert model.config.num_hidden_layers == 12  # all stored; SDXL reads hidden_states[-2]
    converted = convert_ldm_clip_checkpoint(meta_checkpoint(keys))
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel, as diffusers handles
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # the file's position_ids buffer came from an older transformers that saved it; today's does not
    assert_maps_onto(converted, model, len(part(keys, CLIP_L)), allowed_unexpected={"embeddings.position_ids"})


def test_diffusers_open_clip_converter_covers_the_big_g_keys(config, keys):
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = config.text[1]
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**reference.text_encoder_config(cfg, all_layers=True)))
    assert model.config.num_hidden_layers == 32
    converted = convert_open_clip_checkpoint(model, meta_checkpoint(keys), prefix=BIG_G)
    # unlike SD 2's, nothing of bigG is skipped: all 32 blocks and text_projection load; logit_scale is never read
    assert not set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) & set(keys)
    used = [k for k in part(keys, BIG_G) if not k.endswith("logit_scale")]
    assert_maps_onto(converted, model, consumed=sum(3 if "in_proj" in k else 1 for k in used))


def test_diffusers_transposes_text_projection_as_sdcli_multiplies_by_it():
    """open_clip computes x @ text_projection, HF's Linear x @ W.T: diffusers stores the transpose, so both
    give the same pooled vector (sdcli's TextEncoder computes x @ text_projection)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = reference.tiny_xl_config().text[1]
    model = CLIPTextModelWithProjection(CLIPTextConfig(**reference.text_encoder_config(cfg, all_layers=True)))
    projection = torch.randn(cfg.width, cfg.width)
    converted = convert_open_clip_checkpoint(model, {cfg.prefix + "text_projection": projection}, prefix=cfg.prefix)
    x = torch.randn(2, cfg.width)
    model.text_projection.weight.data.copy_(converted["text_projection.weight"])
    torch.testing.assert_close(model.text_projection(x), x @ projection)


# --- sdcli reads exactly the network weights ------------------------------------------------------------


def test_sdcli_reads_every_network_key_and_ignores_only_the_extras(config, keys):
    weights = pytest.importorskip("sdcli.weights")
    expected = weights.expected_keys(config)
    extras = reference.extra_keys(config)
    assert expected == {k: s for k, s in keys.items() if k not in extras}
    assert expected == reference.ldm_keys(config, extras=False)
    assert BIG_G + "text_projection" in expected  # read: the pooled embedding goes through it


def test_sdcli_loads_a_file_with_the_extras(tiny):
    """The real file's extras sit under the text encoders' prefixes; sdcli's strict loader must pass them by."""
    weights = pytest.importorskip("sdcli.weights")
    config, path = tiny
    nets = weights.load_components(config, path, torch.device("cpu"), torch.float32)
    with safe_open(str(path), framework="pt") as f:
        projection = f.get_tensor(BIG_G + "text_projection").float()
    torch.testing.assert_close(nets.text[1].text_projection, projection, rtol=0, atol=0)


# --- tiny random SDXL checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = reference.tiny_config("sdxl")
    path = reference.write_random_checkpoint(config, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors", seed=1)
    return config, path


def test_tiny_config_is_built_like_sdxl(tiny):
    config, _ = tiny
    sdxl = load_config("sdxl")
    assert [t.layout for t in config.text] == [t.layout for t in sdxl.text]
    for tiny_text, real in zip(config.text, sdxl.text, strict=True):
        for field in ("activation", "output_layer", "final_norm", "pooled", "pad_id", "prefix"):
            assert getattr(tiny_text, field) == getattr(real, field), field
    assert config.text[0].width != config.text[1].width  # diffusers tells the encoders apart by width
    assert config.conditioning.vector == sdxl.conditioning.vector
    assert config.conditioning.zero_empty_negative
    assert config.unet.adm_in_channels == config.conditioning.vector_width(config.text[1].width)
    assert max(config.unet.transformer_depth) > 1 and 0 not in config.unet.attention_levels
    assert (config.vae.scale_factor, config.vae.force_upcast) == (0.13025, True)
    assert reference.is_sgm(config) and not reference.is_sgm(reference.tiny_config("sd2"))


def test_tiny_checkpoint_holds_the_sgm_layout(tiny):
    config, path = tiny
    keys = reference.ldm_keys(config)
    assert set(reference.extra_keys(config)) == {CLIP_L + "embeddings.position_ids", BIG_G + "logit_scale"}
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(keys)
        for key, shape in keys.items():
            assert tuple(f.get_slice(key).get_shape()) == shape, key
        ids = f.get_tensor(CLIP_L + "embeddings.position_ids")
        assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
        scale = f.get_tensor(BIG_G + "logit_scale")
        assert scale.dtype == torch.float16 and scale.item() == pytest.approx(4.6055, abs=1e-3)  # as the release
        assert f.get_tensor(BIG_G + "text_projection").dtype == torch.float16


def test_sdcli_header_reader_accepts_the_tiny_checkpoint(tiny):
    checkpoint = pytest.importorskip("sdcli.checkpoint")
    config, path = tiny
    assert {k: v.shape for k, v in checkpoint.read_header(path).items()} == reference.ldm_keys(config)


def test_sd_key_lists_are_unchanged_by_the_sgm_layout():
    """The LDM families keep cond_stage_model.*, their schedule buffers and EMA counters."""
    for name in ("sd15", "sd21-v"):
        config = load_config(name)
        assert not reference.is_sgm(config)
        assert reference.ldm_keys(config) == reference.read_key_list(reference.KEY_LISTS[name])
