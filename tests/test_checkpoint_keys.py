"""The real files' key lists against diffusers' converters, and tiny random checkpoints through diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdcli.config import load_config

import reference

REAL = ("sd15", "sd21-v")


@pytest.fixture(autouse=True)
def one_thread():
    with reference.torch_threads(1):
        yield


def meta_checkpoint(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A full-size checkpoint as shapes only, for diffusers' converters (they slice and transpose)."""
    return {key: torch.empty(shape, device="meta") for key, shape in keys.items()}


def part(keys: dict, prefix: str) -> dict:
    return {k: s for k, s in keys.items() if k.startswith(prefix)}


def assert_maps_onto(converted: dict, model: torch.nn.Module, consumed: int, allowed_unexpected=frozenset()):
    """The converted state dict fills every tensor of `model` with the right shape, uses `consumed`
    file tensors, and adds nothing outside `allowed_unexpected`."""
    assert all(v is not None for v in converted.values()), "converter read a key the list lacks"
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target) - set(allowed_unexpected))
    found = {k: tuple(converted[k].shape) for k in target if k in converted}
    wrong = {k: (found[k], s) for k, s in target.items() if k in found and found[k] != s}
    assert not missing, f"diffusers tensors no file key maps onto: {missing[:10]}"
    assert not unexpected, f"file keys diffusers has no place for: {unexpected[:10]}"
    assert not wrong, f"shape mismatches (file, diffusers): {dict(list(wrong.items())[:10])}"
    assert len(converted) == consumed


@pytest.mark.parametrize("name", REAL)
def test_key_list_file_is_what_the_generator_writes(name):
    config = load_config(name)
    on_disk = reference.read_key_list(reference.KEY_LISTS[name])
    assert on_disk == reference.ldm_keys(config)


def test_key_counts_are_the_known_totals():
    """Hand-counted: SD U-Net 686 tensors, KL-f8 VAE 248, CLIP-L 196 + position_ids, OpenCLIP-H 24 x 12 + 6,
    plus 12 schedule buffers and 2 EMA counters."""
    for name, text, total in (("sd15", 197, 1145), ("sd21-v", 294, 1242)):
        keys = reference.read_key_list(reference.KEY_LISTS[name])
        assert len(part(keys, reference.UNET_PREFIX)) == 686
        assert len(part(keys, reference.VAE_PREFIX)) == 248
        assert len(part(keys, "cond_stage_model.")) == text
        assert len(keys) == total


@pytest.mark.parametrize("name", REAL)
def test_diffusers_unet_and_vae_converters_cover_the_key_list(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    config = load_config(name)
    keys = reference.read_key_list(reference.KEY_LISTS[name])
    checkpoint = meta_checkpoint(keys)
    original = reference.original_config(config)

    unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    converted = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert_maps_onto(converted, unet, consumed=len(part(keys, reference.UNET_PREFIX)))

    vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    converted = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    assert_maps_onto(converted, vae, consumed=len(part(keys, reference.VAE_PREFIX)))


def test_diffusers_clip_converter_covers_the_sd15_text_keys():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = load_config("sd15")
    keys = reference.read_key_list(reference.KEY_LISTS["sd15"])
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**reference.text_encoder_config(config.text[0])))
    converted = convert_ldm_clip_checkpoint(meta_checkpoint(keys))
    # transformers >= 5.6 flattened CLIPTextModel; diffusers strips the wrapper's prefix the same way
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # the file's position_ids buffer came from an older transformers that saved it; today's does not
    consumed = len(part(keys, reference.TEXT_PREFIXES["hf_clip"]))
    assert_maps_onto(converted, model, consumed, allowed_unexpected={"embeddings.position_ids"})


def test_diffusers_open_clip_converter_covers_the_sd21_text_keys():
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = load_config("sd21-v")
    keys = reference.read_key_list(reference.KEY_LISTS["sd21-v"])
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**reference.text_encoder_config(config.text[0])))
    converted = convert_open_clip_checkpoint(model, meta_checkpoint(keys))
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    prefix = reference.TEXT_PREFIXES["open_clip"]
    # diffusers' own record of the real file: it skips the last block (SD 2 reads the penultimate) and
    # text_projection by name; logit_scale it never looks at; each fused in_proj becomes q, k and v
    last = f"{prefix}transformer.resblocks.{config.text[0].layers - 1}."
    skipped = {k for k in keys if k.startswith(last)} | {prefix + "text_projection"}
    assert set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) == skipped
    used = [k for k in part(keys, prefix) if k not in skipped and not k.endswith("logit_scale")]
    assert_maps_onto(converted, model, consumed=sum(3 if "in_proj" in k else 1 for k in used))


@pytest.mark.parametrize("name", REAL)
def test_sdcli_reads_every_network_key_and_ignores_only_the_extras(name):
    weights = pytest.importorskip("sdcli.weights", reason="sdcli.weights not written yet")
    config = load_config(name)
    assert weights.expected_keys(config) == reference.ldm_keys(config, extras=False)


# --- tiny random checkpoints -------------------------------------------------------------------------

TINY = [("sd1", "epsilon"), ("sd2", "v_prediction")]


@pytest.fixture(scope="module", params=TINY, ids=lambda p: f"{p[0]}-{p[1]}")
def tiny(request, tmp_path_factory):
    config = reference.tiny_config(*request.param)
    path = reference.write_random_checkpoint(config, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=1)
    return config, path


def test_random_checkpoint_holds_the_layout_in_the_asked_dtype(tiny):
    config, path = tiny
    keys = reference.ldm_keys(config)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(keys)
        for key, shape in keys.items():
            tensor = f.get_tensor(key)
            assert tuple(tensor.shape) == shape, key
            if key.endswith("position_ids"):
                assert tensor.dtype == torch.int64 and tensor.tolist() == [list(range(config.text[0].context_length))]
            elif key == reference.EMA_UPDATES:
                assert tensor.dtype == torch.int32
            else:
                assert tensor.dtype == torch.float16, key
        # the schedule buffers hold the real schedule: diffusers' scaled_linear alphas_cumprod
        from diffusers import DDPMScheduler

        expected = DDPMScheduler.from_config(reference.scheduler_config(config)).alphas_cumprod
        torch.testing.assert_close(f.get_tensor("alphas_cumprod").float(), expected, rtol=1e-3, atol=0)
        # weights ~ N(0, 1/fan_in), norm scales ~ 1, so activations stay near unit size
        conv = f.get_tensor(reference.UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight").float()
        assert abs(conv.std().item() * math.sqrt(conv[0].numel()) - 1) < 0.05
        norm = f.get_tensor(reference.UNET_PREFIX + "input_blocks.1.0.in_layers.0.weight").float()
        assert (norm - 1).abs().max() < 0.3


def test_random_checkpoint_is_reproducible(tiny, tmp_path):
    config, path = tiny
    again = reference.write_random_checkpoint(config, tmp_path / "again.safetensors", seed=1)
    other = reference.write_random_checkpoint(config, tmp_path / "other.safetensors", seed=2)
    assert again.read_bytes() == path.read_bytes()
    assert other.read_bytes() != path.read_bytes()


def test_sdcli_header_reader_accepts_the_random_checkpoint(tiny):
    checkpoint = pytest.importorskip("sdcli.checkpoint")
    config, path = tiny
    table = checkpoint.read_header(path)
    assert {k: v.shape for k, v in table.items()} == reference.ldm_keys(config)


def test_tiny_checkpoint_loads_into_diffusers_completely(tiny):
    config, path = tiny
    pipe = reference.diffusers_pipeline(config, path, "euler")  # raises if any tensor stayed unloaded
    with safe_open(str(path), framework="pt") as f:
        file_conv_in = f.get_tensor(reference.UNET_PREFIX + "input_blocks.0.0.weight").float()
        hf = config.text[0].layout == "hf_clip"
        token_key = "embeddings.token_embedding.weight" if hf else "token_embedding.weight"
        file_tokens = f.get_tensor(reference.TEXT_PREFIXES[config.text[0].layout] + token_key).float()
        file_q = f.get_tensor(reference.VAE_PREFIX + "decoder.mid.attn_1.q.weight").float()
    assert torch.equal(pipe.unet.conv_in.weight, file_conv_in)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, file_tokens)
    assert torch.equal(pipe.vae.decoder.mid_block.attentions[0].to_q.weight, file_q[:, :, 0, 0])
    layers = config.text[0].layers - (config.text[0].output_layer == "penultimate")
    assert pipe.text_encoder.config.num_hidden_layers == layers
    assert pipe.scheduler.config.prediction_type == config.schedule.prediction_type


def test_diffusers_pipeline_refuses_a_checkpoint_missing_a_tensor(tiny, tmp_path):
    """diffusers leaves the tensor on the meta device, where the fp32 cast fails: loading means complete."""
    from safetensors.torch import load_file, save_file

    config, path = tiny
    state = load_file(path)
    del state[reference.UNET_PREFIX + "out.2.bias"]
    save_file(state, tmp_path / "holed.safetensors")
    with pytest.raises(NotImplementedError, match="meta tensor"):
        reference.diffusers_pipeline(config, tmp_path / "holed.safetensors", "euler")


def test_tiny_diffusers_render_is_a_deterministic_uint8_image(tiny):
    config, path = tiny
    pipe = reference.diffusers_pipeline(config, path, "euler_a")
    args = dict(prompt="a red cube", negative="blurry", steps=3, guidance=7.5, width=48, height=32)
    image = reference.diffusers_render(pipe, seed=7, **args)
    assert image.dtype == np.uint8 and image.shape == (32, 48, 3)
    assert image.std() > 1  # random weights still give a picture, not a flat colour
    assert np.array_equal(image, reference.diffusers_render(pipe, seed=7, **args))
    assert not np.array_equal(image, reference.diffusers_render(pipe, seed=8, **args))


def hf_tokenizer(family: str, folder):
    from transformers import CLIPTokenizer

    cfg = reference.tiny_config(family).text[0]
    reference.write_tokenizer(cfg, folder)
    return cfg, CLIPTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_written_tokenizer_matches_open_clip(family, tmp_path):
    """diffusers' tokenizer (from the files written here) and OpenCLIP's bundled one give the same ids."""
    from open_clip.tokenizer import SimpleTokenizer

    cfg, hf = hf_tokenizer(family, tmp_path)
    simple = SimpleTokenizer()
    start, end = simple.encoder["<start_of_text>"], simple.encoder["<end_of_text>"]
    for prompt in ("a photograph of an astronaut riding a horse", "Hello,   World? it's 3 o'clock", ""):
        ids = hf(prompt, padding="max_length", max_length=cfg.context_length, truncation=True).input_ids
        body = simple.encode(prompt)
        assert ids == [start, *body, end] + [cfg.pad_id] * (cfg.context_length - len(body) - 2)


def test_sd2_tokenizer_turns_every_exclamation_mark_into_padding(tmp_path):
    """diffusers' SD 2 tokenizer has pad token "!", so each "!" becomes id 0 (diffusers issue #4153,
    whose printed ids these are); OpenCLIP gives 256, 748, 995."""
    cfg, hf = hf_tokenizer("sd2", tmp_path)
    ids = hf("! !! !!!", padding="max_length", max_length=cfg.context_length, truncation=True).input_ids
    assert ids == [49406] + [0] * 6 + [49407] + [0] * (cfg.context_length - 8)


@pytest.mark.parametrize("sampler", sorted(reference.SAMPLER_SCHEDULERS))
def test_scheduler_per_sampler(sampler):
    config = reference.tiny_config("sd2", "v_prediction")
    scheduler = reference.diffusers_scheduler(config, sampler)
    expected = {
        "ddim": "DDIMScheduler",
        "pndm": "PNDMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "heun": "HeunDiscreteScheduler",
        "lms": "LMSDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    }[sampler]
    assert type(scheduler).__name__ == expected
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert getattr(scheduler.config, "use_karras_sigmas", False) == (sampler == "dpmpp_2m_karras")


def test_psnr_hand_values():
    a = np.zeros((4, 4, 3), np.uint8)
    assert reference.psnr(a, a) == math.inf
    assert reference.psnr(a, np.full_like(a, 255)) == 0.0
    b = a.copy()
    b[0, 0, 0] = 48  # MSE = 48^2 / 48 = 48
    assert reference.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 48))
