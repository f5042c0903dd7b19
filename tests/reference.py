"""The oracle toolkit: real single-file checkpoint layouts, random-weight checkpoints and diffusers renders.

Everything sdcli must match lives here, built from a ModelConfig alone:
- `ldm_keys` writes down the CompVis/LDM single-file layout (the key lists in tests/data come from it);
- `write_random_checkpoint` streams a random-weight .safetensors file in that layout;
- `diffusers_pipeline` / `diffusers_render` load such a file with diffusers' own single-file loader,
  offline (a generated diffusers config folder and LDM yaml; this works for tiny configs too), and
  render with the diffusers scheduler that each sdcli sampler reproduces.

SD 1.x/2.x files come from the CompVis/Stability LDM code (`cond_stage_model.*`, DDPM schedule buffers, EMA
counters); SDXL files from generative-models' (sgm) DiffusionEngine (`conditioner.embedders.N.*`, neither
buffers nor counters); `is_sgm` tells them apart by where the text encoders live. `diffusers_xl_pipeline` is
the SDXL counterpart of `diffusers_pipeline`; `diffusers_render` renders with either.

Run `python tests/reference.py` to rewrite tests/data/sd15-keys.txt, sd21-v-keys.txt and sdxl-keys.txt.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml

from sdcli.config import (
    ConditioningConfig,
    Defaults,
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    load_config,
)
from sdcli.sampler_registry import SAMPLER_SPECS

DATA = Path(__file__).resolve().parent / "data"
KEY_LISTS = {"sd15": DATA / "sd15-keys.txt", "sd21-v": DATA / "sd21-v-keys.txt", "sdxl": DATA / "sdxl-keys.txt"}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"hf_clip": "cond_stage_model.transformer.text_model.", "open_clip": "cond_stage_model.model."}
SGM_TEXT_ROOT = "conditioner.embedders."  # sgm's GeneralConditioner: one embedder per text encoder (SDXL)

# DDPM.register_schedule's persistent buffers (ldm/models/diffusion/ddpm.py); lvlb_weights is not persistent.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# LitEma's two buffers survive the "ema-only" pruning script (it drops only the flattened weight copies).
EMA_DECAY, EMA_UPDATES = "model_ema.decay", "model_ema.num_updates"
EMA_DECAY_VALUE = 0.9999  # LitEma's default decay, as stored in the released files

SAMPLER_SCHEDULERS = {name: (spec.scheduler, spec.scheduler_options) for name, spec in SAMPLER_SPECS.items()}

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


# --- the single-file layout -------------------------------------------------------------------------


def _conv(keys: dict, name: str, c_out: int, c_in: int, k: int) -> None:
    keys[f"{name}.weight"] = (c_out, c_in, k, k)
    keys[f"{name}.bias"] = (c_out,)


def _linear(keys: dict, name: str, c_out: int, c_in: int, bias: bool = True) -> None:
    keys[f"{name}.weight"] = (c_out, c_in)
    if bias:
        keys[f"{name}.bias"] = (c_out,)


def _norm(keys: dict, name: str, c: int) -> None:
    keys[f"{name}.weight"] = (c,)
    keys[f"{name}.bias"] = (c,)


def _unet_resblock(keys: dict, name: str, c_in: int, c_out: int, emb: int) -> None:
    """openaimodel.ResBlock: GroupNorm-SiLU-conv, time embedding added, GroupNorm-SiLU-conv, 1x1 skip."""
    _norm(keys, f"{name}.in_layers.0", c_in)
    _conv(keys, f"{name}.in_layers.2", c_out, c_in, 3)
    _linear(keys, f"{name}.emb_layers.1", c_out, emb)
    _norm(keys, f"{name}.out_layers.0", c_out)
    _conv(keys, f"{name}.out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        _conv(keys, f"{name}.skip_connection", c_out, c_in, 1)


def _spatial_transformer(keys: dict, name: str, c: int, cfg: UNetConfig, depth: int) -> None:
    """attention.SpatialTransformer; inner width = heads * head width = c for every SD config."""
    inner = cfg.heads_at(c) * (c // cfg.heads_at(c))
    _norm(keys, f"{name}.norm", c)
    proj = _linear if cfg.linear_proj else (lambda k, n, o, i: _conv(k, n, o, i, 1))
    proj(keys, f"{name}.proj_in", inner, c)
    for d in range(depth):
        block = f"{name}.transformer_blocks.{d}"
        for attn, context in (("attn1", inner), ("attn2", cfg.context_dim)):
            _linear(keys, f"{block}.{attn}.to_q", inner, inner, bias=False)
            _linear(keys, f"{block}.{attn}.to_k", inner, context, bias=False)
            _linear(keys, f"{block}.{attn}.to_v", inner, context, bias=False)
            _linear(keys, f"{block}.{attn}.to_out.0", inner, inner)
        # GEGLU: one projection yields the value and its gate, hence twice the 4x hidden width
        _linear(keys, f"{block}.ff.net.0.proj", inner * 4 * 2, inner)
        _linear(keys, f"{block}.ff.net.2", inner, inner * 4)
        for i in (1, 2, 3):
            _norm(keys, f"{block}.norm{i}", inner)
    proj(keys, f"{name}.proj_out", c, inner)


def unet_keys(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """openaimodel.UNetModel's state dict: input_blocks, middle_block, output_blocks, as the LDM code nests them."""
    keys: dict[str, tuple[int, ...]] = {}
    base, emb, last = cfg.model_channels, cfg.model_channels * 4, len(cfg.channel_mult) - 1
    _linear(keys, "time_embed.0", emb, base)
    _linear(keys, "time_embed.2", emb, emb)
    if cfg.adm_in_channels is not None:  # openaimodel's num_classes "sequential" (SDXL): label_emb.0.{0,2}
        _linear(keys, "label_emb.0.0", emb, cfg.adm_in_channels)
        _linear(keys, "label_emb.0.2", emb, emb)
    _conv(keys, "input_blocks.0.0", base, cfg.in_channels, 3)
    skips, ch, i = [base], base, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            _unet_resblock(keys, f"input_blocks.{i}.0", ch, base * mult, emb)
            ch = base * mult
            if level in cfg.attention_levels:
                _spatial_transformer(keys, f"input_blocks.{i}.1", ch, cfg, cfg.depth_at(level))
            skips.append(ch)
            i += 1
        if level != last:
            _conv(keys, f"input_blocks.{i}.0.op", ch, ch, 3)
            skips.append(ch)
            i += 1
    _unet_resblock(keys, "middle_block.0", ch, ch, emb)
    _spatial_transformer(keys, "middle_block.1", ch, cfg, cfg.depth_at(last))
    _unet_resblock(keys, "middle_block.2", ch, ch, emb)
    i = 0
    for level in reversed(range(len(cfg.channel_mult))):
        for j in range(cfg.num_res_blocks + 1):
            _unet_resblock(keys, f"output_blocks.{i}.0", ch + skips.pop(), base * cfg.channel_mult[level], emb)
            ch = base * cfg.channel_mult[level]
            sub = 1
            if level in cfg.attention_levels:
                _spatial_transformer(keys, f"output_blocks.{i}.1", ch, cfg, cfg.depth_at(level))
                sub = 2
            if level and j == cfg.num_res_blocks:
                _conv(keys, f"output_blocks.{i}.{sub}.conv", ch, ch, 3)
            i += 1
    _norm(keys, "out.0", ch)
    _conv(keys, "out.2", cfg.out_channels, base, 3)
    return keys


def _vae_resblock(keys: dict, name: str, c_in: int, c_out: int) -> None:
    """diffusionmodules.model.ResnetBlock without a time embedding (temb_channels=0)."""
    _norm(keys, f"{name}.norm1", c_in)
    _conv(keys, f"{name}.conv1", c_out, c_in, 3)
    _norm(keys, f"{name}.norm2", c_out)
    _conv(keys, f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        _conv(keys, f"{name}.nin_shortcut", c_out, c_in, 1)


def _vae_mid(keys: dict, name: str, c: int) -> None:
    """Two res blocks around one single-head self-attention whose q/k/v/proj_out are 1x1 convs."""
    _vae_resblock(keys, f"{name}.block_1", c, c)
    _norm(keys, f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(keys, f"{name}.attn_1.{proj}", c, c, 1)
    _vae_resblock(keys, f"{name}.block_2", c, c)


def vae_keys(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """ldm.models.autoencoder.AutoencoderKL: Encoder, Decoder (no attention outside the middle), quant convs."""
    keys: dict[str, tuple[int, ...]] = {}
    base, z, last = cfg.base_channels, cfg.latent_channels, len(cfg.channel_mult) - 1
    _conv(keys, "encoder.conv_in", base, cfg.image_channels, 3)
    ch = base
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(cfg.num_res_blocks):
            _vae_resblock(keys, f"encoder.down.{level}.block.{j}", ch, base * mult)
            ch = base * mult
        if level != last:
            _conv(keys, f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    _vae_mid(keys, "encoder.mid", ch)
    _norm(keys, "encoder.norm_out", ch)
    _conv(keys, "encoder.conv_out", 2 * z, ch, 3)  # double_z: mean and log-variance
    _conv(keys, "decoder.conv_in", ch, z, 3)
    _vae_mid(keys, "decoder.mid", ch)
    for level in reversed(range(len(cfg.channel_mult))):
        for j in range(cfg.num_res_blocks + 1):
            _vae_resblock(keys, f"decoder.up.{level}.block.{j}", ch, base * cfg.channel_mult[level])
            ch = base * cfg.channel_mult[level]
        if level:
            _conv(keys, f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    _norm(keys, "decoder.norm_out", ch)
    _conv(keys, "decoder.conv_out", cfg.image_channels, ch, 3)
    _conv(keys, "quant_conv", 2 * z, 2 * z, 1)
    _conv(keys, "post_quant_conv", z, z, 1)
    return keys


def text_keys(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """The text tower's weights in the file's own naming (HF CLIPTextModel or OpenCLIP), extras excluded."""
    keys: dict[str, tuple[int, ...]] = {}
    w, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    if cfg.layout == "hf_clip":
        keys["embeddings.token_embedding.weight"] = (cfg.vocab_size, w)
        keys["embeddings.position_embedding.weight"] = (cfg.context_length, w)
        for i in range(cfg.layers):
            layer = f"encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _linear(keys, f"{layer}.self_attn.{proj}", w, w)
            _norm(keys, f"{layer}.layer_norm1", w)
            _linear(keys, f"{layer}.mlp.fc1", hidden, w)
            _linear(keys, f"{layer}.mlp.fc2", w, hidden)
            _norm(keys, f"{layer}.layer_norm2", w)
        _norm(keys, "final_layer_norm", w)
    else:
        keys["token_embedding.weight"] = (cfg.vocab_size, w)
        keys["positional_embedding"] = (cfg.context_length, w)
        for i in range(cfg.layers):
            block = f"transformer.resblocks.{i}"
            _norm(keys, f"{block}.ln_1", w)
            keys[f"{block}.attn.in_proj_weight"] = (3 * w, w)  # q, k, v stacked
            keys[f"{block}.attn.in_proj_bias"] = (3 * w,)
            _linear(keys, f"{block}.attn.out_proj", w, w)
            _norm(keys, f"{block}.ln_2", w)
            _linear(keys, f"{block}.mlp.c_fc", hidden, w)
            _linear(keys, f"{block}.mlp.c_proj", w, hidden)
        _norm(keys, "ln_final", w)
        if cfg.pooled:  # the pooled embedding is ln_final(last block)[end token] @ text_projection (SDXL's bigG)
            keys["text_projection"] = (w, w)
    return keys


def text_prefix(cfg: TextConfig) -> str:
    """Where a text encoder lives in the file: its config's prefix, else SD 1.x/2.x's cond_stage_model one."""
    return cfg.prefix or TEXT_PREFIXES[cfg.layout]


def is_sgm(config: ModelConfig) -> bool:
    """An sgm (generative-models) file, as SDXL's: text encoders under conditioner.embedders.N."""
    return any(text_prefix(t).startswith(SGM_TEXT_ROOT) for t in config.text)


def extra_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors the released files carry that no network uses: schedule buffers, EMA counters, text extras.

    LDM files (SD 1.x/2.x) hold DDPM's 12 schedule buffers and LitEma's 2 counters; sgm files (SDXL) neither
    (DiffusionEngine registers no schedule buffers and the release has no EMA). Both keep each text
    encoder's leftovers: HF CLIP's position_ids buffer, OpenCLIP's logit_scale and, unless the encoder
    pools through it, its text_projection."""
    keys: dict[str, tuple[int, ...]] = {}
    if not is_sgm(config):
        keys |= {name: (config.schedule.num_train_timesteps,) for name in SCHEDULE_BUFFERS}
        keys[EMA_DECAY] = ()
        keys[EMA_UPDATES] = ()
    for text in config.text:
        prefix = text_prefix(text)
        if text.layout == "hf_clip":
            keys[prefix + "embeddings.position_ids"] = (1, text.context_length)
        else:
            # OpenCLIP's contrastive head: the projection to the joint embedding (width -> width) and 1/T
            if not text.pooled:
                keys[prefix + "text_projection"] = (text.width, text.width)
            keys[prefix + "logit_scale"] = ()
    return keys


def ldm_keys(config: ModelConfig, extras: bool = True) -> dict[str, tuple[int, ...]]:
    """The complete single-file layout for `config`: every key with its shape, extras included by default."""
    keys = {UNET_PREFIX + k: s for k, s in unet_keys(config.unet).items()}
    keys |= {VAE_PREFIX + k: s for k, s in vae_keys(config.vae).items()}
    keys |= {text_prefix(text) + k: s for text in config.text for k, s in text_keys(text).items()}
    if extras:
        keys |= extra_keys(config)
    return dict(sorted(keys.items()))


# --- key list files ----------------------------------------------------------------------------------

_KEY_LIST_HEADERS = {
    "sd15": """\
# The tensors of v1-5-pruned-emaonly.safetensors (runwayml / stable-diffusion-v1-5), one per line:
# key<TAB>shape (comma separated; empty for a scalar). Generated by `python tests/reference.py` from
# configs/sd15.yaml, whose numbers are CompVis' v1-inference.yaml: U-Net model_channels 320,
# channel_mult [1,2,4,4], num_res_blocks 2, attention_resolutions [4,2,1], num_heads 8, context_dim 768,
# 1x1-conv proj_in/proj_out; KL-f8 VAE ch 128, ch_mult [1,2,4,4], num_res_blocks 2, z_channels 4,
# embed_dim 4; text: HuggingFace CLIPTextModel of openai/clip-vit-large-patch14 (FrozenCLIPEmbedder).
# Module nesting follows the LDM code (openaimodel.UNetModel, diffusionmodules.model.Encoder/Decoder).
# Besides the weights the file holds the 12 persistent DDPM schedule buffers, the two LitEma counters
# model_ema.decay / model_ema.num_updates (the ema-only pruning keeps them and drops model_ema.* weight
# copies) and CLIP's embeddings.position_ids buffer (int64).
# Cross-checked by tests/test_checkpoint_keys.py: diffusers' convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint and convert_ldm_clip_checkpoint map every weight here onto a parameter of
# diffusers' UNet2DConditionModel / AutoencoderKL / transformers' CLIPTextModel (configured from the
# matching original yaml by diffusers' own config mapping) with the same shape, and cover all of them.
""",
    "sd21-v": """\
# The tensors of v2-1_768-ema-pruned.safetensors (stabilityai / stable-diffusion-2-1), one per line:
# key<TAB>shape (comma separated; empty for a scalar). Generated by `python tests/reference.py` from
# configs/sd21-v.yaml, whose numbers are Stability's v2-inference-v.yaml: U-Net model_channels 320,
# channel_mult [1,2,4,4], num_res_blocks 2, attention_resolutions [4,2,1], num_head_channels 64,
# context_dim 1024, use_linear_in_transformer (Linear proj_in/proj_out); KL-f8 VAE as SD 1.x; text:
# FrozenOpenCLIPEmbedder(ViT-H-14) with the visual tower deleted: width 1024, 24 resblocks (all stored,
# though SD 2 reads the penultimate one), fused attn.in_proj, text_projection and logit_scale kept.
# Besides the weights the file holds the 12 persistent DDPM schedule buffers and the two LitEma counters
# model_ema.decay / model_ema.num_updates.
# Cross-checked by tests/test_checkpoint_keys.py: diffusers' convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint and convert_open_clip_checkpoint map every weight here (bar the last
# resblock, text_projection and logit_scale, which diffusers drops too) onto a parameter of diffusers'
# models with the same shape, and cover all of them.
""",
    "sdxl": """\
# The tensors of sd_xl_base_1.0.safetensors (stabilityai / stable-diffusion-xl-base-1.0), one per line:
# key<TAB>shape (comma separated; empty for a scalar). Generated by `python tests/reference.py` from
# configs/sdxl.yaml, whose numbers are generative-models' configs/inference/sd_xl_base.yaml: U-Net
# model_channels 320, channel_mult [1,2,4], num_res_blocks 2, attention_resolutions [4,2] (none on level 0),
# transformer_depth [1,2,10] (middle block 10), num_head_channels 64, context_dim 2048, linear proj_in/out,
# num_classes "sequential" with adm_in_channels 2816 (label_emb.0.0 / label_emb.0.2); KL-f8 VAE as SD 1.x;
# conditioner.embedders.0 = FrozenCLIPEmbedder (HF CLIPTextModel of ViT-L/14, 12 layers, all stored),
# conditioner.embedders.1 = FrozenOpenCLIPEmbedder2(ViT-bigG-14) with the visual tower deleted: width 1280,
# 32 resblocks, fused attn.in_proj, text_projection [1280,1280] (the pooled embedding's) and logit_scale.
# 2515 tensors: U-Net 1680, VAE 248, CLIP-L 197, bigG 390. Extras (no network reads them): CLIP-L's
# embeddings.position_ids (int64 [1,77]) and bigG's logit_scale (fp16 scalar, 4.6055 = ln 100); no DDPM
# schedule buffers and no model_ema.* counters (sgm's DiffusionEngine has neither), and no denoiser.sigmas.
# Evidence: diffusers' CHECKPOINT_KEY_NAMES detect the file by conditioner.embedders.1.model.transformer.
# resblocks.9.mlp.c_proj.bias / ...embedders.0.transformer.text_model.embeddings.position_embedding.weight
# / ...embedders.1.model.positional_embedding, and convert_open_clip_checkpoint reads ...text_projection;
# kohya-ss sd-scripts (library/sdxl_model_util.py) strips ...embeddings.position_ids and carries
# ...embedders.1.model.logit_scale through a round trip ("logit_scale is not in Diffusers but needed when
# saving"); SLAPaper's SDXL clip-fix tool checks that position_ids is an integer [1,77] tensor and restores
# logit_scale as fp16 4.6055 "value from sd_xl base 1.0"; stable-diffusion.cpp lists position_ids,
# logit_scale and denoiser.sigmas as known unused tensors; installs that check the real file report 2515
# keys (its fine-tunes 2515-2516). generative-models' DiscreteDenoiser does register `sigmas` as a buffer,
# but the released base has 2515 tensors, which leaves no room for it. The released file is 6,938,078,334
# bytes; these tensors in fp16 (position_ids int64) take 6,937,676,352, leaving 401,982 bytes of header:
# the tensor table needs 364,784 of them in safetensors' compact JSON (plus the 8-byte length), leaving
# 37,190 for its __metadata__ (Stability's modelspec.* keys); so the size alone cannot rule out a 4 KB
# denoiser.sigmas, but it does rule out any missing or extra weight larger than ~18k fp16 values.
# Cross-checked by tests/test_sdxl_keys.py: diffusers' convert_ldm_unet_checkpoint,
# convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint and convert_open_clip_checkpoint map every weight
# here (bar logit_scale, which diffusers never reads) onto a parameter of diffusers' UNet2DConditionModel,
# AutoencoderKL, CLIPTextModel and CLIPTextModelWithProjection (configured from the sgm yaml) with the same
# shape, and cover all of them; sdcli.weights.expected_keys reads exactly the rest.
""",
}


def format_key_list(keys: dict[str, tuple[int, ...]]) -> str:
    return "".join(f"{k}\t{','.join(map(str, s))}\n" for k, s in keys.items())


def read_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """A key list file back into {key: shape}; '#' lines are comments."""
    keys = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            keys[key] = tuple(int(d) for d in shape.split(",")) if shape else ()
    return keys


def write_key_lists() -> None:
    DATA.mkdir(exist_ok=True)
    for name, path in KEY_LISTS.items():
        path.write_text(_KEY_LIST_HEADERS[name] + format_key_list(ldm_keys(load_config(name))), encoding="utf-8")


# --- random-weight checkpoints ----------------------------------------------------------------------


def schedule_buffers(schedule: ScheduleConfig) -> dict[str, np.ndarray]:
    """DDPM.register_schedule's buffers, computed in float64 as the LDM code does (v_posterior = 0)."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = np.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=np.float64) ** 2
    else:
        betas = np.linspace(schedule.beta_start, schedule.beta_end, n, dtype=np.float64)
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    prev = np.append(1.0, cumprod[:-1])
    posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod),
    }


def _stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """Counters and position ids are integers in the released files; the rest has the file's dtype."""
    if key == EMA_UPDATES:
        return torch.int32
    return torch.int64 if key.endswith("position_ids") else dtype


def _extra_value(config: ModelConfig, key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The real value of an extra tensor (the schedule is deterministic) in the dtype the released files use."""
    if key in SCHEDULE_BUFFERS:
        return torch.from_numpy(schedule_buffers(config.schedule)[key]).to(dtype)
    if key == EMA_DECAY:
        return torch.tensor(EMA_DECAY_VALUE, dtype=dtype)
    if key == EMA_UPDATES:
        return torch.tensor(0, dtype=_stored_dtype(key, dtype))
    if key.endswith("position_ids"):
        return torch.arange(shape[1], dtype=_stored_dtype(key, dtype))[None]
    if key.endswith("logit_scale"):
        if key.startswith(SGM_TEXT_ROOT):
            return torch.tensor(math.log(100.0), dtype=dtype)  # SDXL's bigG: trained to CLIP's clamp, 1/T = 100
        return torch.tensor(math.log(1 / 0.07), dtype=dtype)  # CLIP's initial temperature
    return _random_weight(key, shape, dtype, seed)  # text_projection


def _random_weight(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values that keep activations near unit scale: weights ~ N(0, 1/fan_in), norms ~ 1, biases and
    embeddings small. Each key has its own generator, so a tensor does not depend on the others."""
    # the CPU generator keeps 32 bits of its seed, so seed and key are hashed together
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    noise = torch.randn(shape, generator=g)
    if len(shape) == 1:
        # 1-d weights are GroupNorm/LayerNorm scales in every SD network
        value = 1 + 0.05 * noise if key.endswith("weight") else 0.02 * noise
    elif "embedding" in key:
        value = 0.02 * noise
    else:
        value = noise / math.sqrt(math.prod(shape[1:]))
    return value.to(dtype)


def write_random_checkpoint(
    config: ModelConfig, path: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0, extras: bool = True
) -> Path:
    """A random-weight single-file checkpoint in the real layout, streamed one tensor at a time.

    The safetensors header is written first from the shapes alone, so memory stays at one tensor."""
    path = Path(path)
    keys = ldm_keys(config, extras=extras)
    extra = extra_keys(config) if extras else {}

    def tensor(key: str) -> torch.Tensor:
        shape = keys[key]
        if key in extra:
            return _extra_value(config, key, shape, dtype, seed)
        return _random_weight(key, shape, dtype, seed)

    header, offset = {}, 0
    for key, shape in keys.items():
        stored = _stored_dtype(key, dtype)
        size = math.prod(shape) * torch.empty((), dtype=stored).element_size()
        header[key] = dict(dtype=_SAFETENSORS_DTYPES[stored], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            f.write(tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy())
    partial.replace(path)
    return path


# --- diffusers, offline -----------------------------------------------------------------------------


def _ddconfig(v: VAEConfig) -> dict:
    """The autoencoder's `ddconfig` (Encoder/Decoder), the same in LDM and sgm yamls."""
    return {
        "double_z": True,
        "z_channels": v.latent_channels,
        "resolution": 256,
        "in_channels": v.image_channels,
        "out_ch": v.image_channels,
        "ch": v.base_channels,
        "ch_mult": list(v.channel_mult),
        "num_res_blocks": v.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def _transformer_depth(u: UNetConfig):
    return u.transformer_depth[0] if len(u.transformer_depth) == 1 else list(u.transformer_depth)


def original_config(config: ModelConfig) -> dict:
    """The training yaml as far as diffusers reads it: LDM's v1-inference.yaml / v2-inference-v.yaml, or for an
    sgm model (SDXL) generative-models' sd_xl_base.yaml (see sgm_config)."""
    if is_sgm(config):
        return sgm_config(config)
    (t,) = config.text
    u, v, s = config.unet, config.vae, config.schedule
    unet = {
        "image_size": config.defaults.height // v.downsample,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": [2**level for level in u.attention_levels],
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "use_spatial_transformer": True,
        "use_linear_in_transformer": u.linear_proj,
        "transformer_depth": _transformer_depth(u),
        "context_dim": u.context_dim,
        "legacy": False,
    }
    unet |= {"num_heads": u.num_heads} if u.num_heads is not None else {"num_head_channels": u.head_dim}
    cond = (
        {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        if t.layout == "hf_clip"
        else {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": t.output_layer},
        }
    )
    params = {
        "linear_start": s.beta_start,
        "linear_end": s.beta_end,
        "timesteps": s.num_train_timesteps,
        "image_size": config.defaults.height // v.downsample,
        "channels": v.latent_channels,
        "conditioning_key": "crossattn",
        "scale_factor": v.scale_factor,
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": v.latent_channels,
                "ddconfig": _ddconfig(v),
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": cond,
    }
    if s.prediction_type == "v_prediction":
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


SIZE_INPUT_KEYS = {  # sgm's batch keys for SDXL's size conditioning
    "original_size": "original_size_as_tuple",
    "crop_coords_top_left": "crop_coords_top_left",
    "target_size": "target_size_as_tuple",
}


def _sgm_text_embedder(t: TextConfig) -> dict:
    """One text entry of GeneralConditioner's emb_models, as sd_xl_base.yaml writes it."""
    if t.layout == "hf_clip":
        # FrozenCLIPEmbedder(layer="hidden", layer_idx=i) returns hidden_states[i], the output of block i
        layer = {"layer": "hidden", "layer_idx": t.layers - 1} if t.output_layer == "penultimate" else {"layer": "last"}
        return {"is_trainable": False, "input_key": "txt",
                "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder", "params": layer}  # fmt: skip
    params = {"arch": "ViT-bigG-14" if t.width == 1280 else f"tiny-{t.width}", "version": "laion2b_s39b_b160k",
              "freeze": True, "layer": t.output_layer, "always_return_pooled": t.pooled, "legacy": False}  # fmt: skip
    return {"is_trainable": False, "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2", "params": params}  # fmt: skip


def sgm_config(config: ModelConfig) -> dict:
    """generative-models' configs/inference/sd_xl_base.yaml for `config`: DiffusionEngine with network_config
    (openaimodel.UNetModel, num_classes "sequential"), conditioner_config (the text embedders in file order,
    then one ConcatTimestepEmbedderND per size part of the vector), first_stage_config and scale_factor.
    diffusers reads network_config, first_stage_config and scale_factor of it."""
    u, v, s, c = config.unet, config.vae, config.schedule, config.conditioning
    unet = {
        "adm_in_channels": u.adm_in_channels,
        "num_classes": "sequential",
        "use_checkpoint": True,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": sorted((2**level for level in u.attention_levels), reverse=True),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        **({"num_heads": u.num_heads} if u.num_heads is not None else {"num_head_channels": u.head_dim}),
        "use_linear_in_transformer": u.linear_proj,
        "transformer_depth": _transformer_depth(u),
        "context_dim": u.context_dim,
        "spatial_transformer_attn_type": "softmax-xformers",
    }
    if u.adm_in_channels is None:
        del unet["adm_in_channels"], unet["num_classes"]
    embedders = [_sgm_text_embedder(t) for t in config.text]
    embedders += [
        {"is_trainable": False, "input_key": SIZE_INPUT_KEYS[part],
         "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": c.size_embed_dim}}
        for part in c.vector if part != "pooled"
    ]  # fmt: skip
    scaling = "VScaling" if s.prediction_type == "v_prediction" else "EpsScaling"
    params = {
        "scale_factor": v.scale_factor,
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": s.num_train_timesteps,
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
                },
            },
        },
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": {
            "target": "sgm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": v.latent_channels,
                "monitor": "val/rec_loss",
                "ddconfig": {"attn_type": "vanilla-xformers", **_ddconfig(v)},
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def scheduler_config(config: ModelConfig) -> dict:
    """The model's diffusers scheduler config (its scheduler_config.json). timestep_spacing only where the
    schedule sets it (SDXL's hub config: "leading"); otherwise none, so each scheduler class keeps its own
    default, as with SD 1.x/2.x's."""
    s = config.schedule
    spacing = getattr(s, "timestep_spacing", None)  # the field is newer than this toolkit's first configs
    return ({"timestep_spacing": spacing} if spacing is not None else {}) | {
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule,
        "steps_offset": s.steps_offset,
        "set_alpha_to_one": s.set_alpha_to_one,
        "clip_sample": s.clip_sample,
        "skip_prk_steps": True,
        "prediction_type": s.prediction_type,
    }


def diffusers_scheduler(config: ModelConfig, sampler: str):
    """The diffusers scheduler an sdcli sampler reproduces, built as `Cls.from_config(model config)`."""
    import diffusers

    cls_name, overrides = SAMPLER_SCHEDULERS[sampler]
    return getattr(diffusers, cls_name).from_config(scheduler_config(config), **overrides)


def text_encoder_config(cfg: TextConfig, all_layers: bool = False) -> dict:
    """transformers' CLIPTextConfig for the layers that feed the U-Net: SD 2 drops the last block; SDXL
    (`all_layers`) keeps every block and takes hidden_states[-2], and its pooled encoder is a
    CLIPTextModelWithProjection (the hub's text_encoder_2, legacy eos_token_id 2: pooling at argmax(ids))."""
    from transformers import CLIPTextConfig

    layers = cfg.layers if cfg.output_layer == "last" or all_layers else cfg.layers - 1
    extra = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1} if all_layers else {}
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        projection_dim=cfg.width,
        architectures=["CLIPTextModelWithProjection" if cfg.pooled else "CLIPTextModel"],
        **extra,
    ).to_dict()


def write_tokenizer(cfg: TextConfig, folder: Path) -> None:
    """HF CLIPTokenizer files from OpenCLIP's bundled BPE, so both tokenizers share one vocabulary."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    # OpenCLIP spells the special tokens <start_of_text>/<end_of_text>; HF's CLIP vocabulary uses these
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {hf_names.get(token, token): i for token, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    decoder = {i: token for token, i in vocab.items()}
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = decoder[cfg.pad_id]
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": cfg.context_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")


def write_diffusers_folder(config: ModelConfig, folder: Path) -> Path:
    """A diffusers-format config folder (no weights) for `config`, plus the original yaml beside it.

    U-Net and VAE configs come from diffusers' own LDM-yaml mapping, so they are what from_single_file
    derives from the yaml."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    if is_sgm(config):
        return write_diffusers_xl_folder(config, folder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    original = original_config(config)
    latent_size = config.defaults.height // config.vae.downsample
    (folder / "original.yaml").write_text(yaml.safe_dump(original, sort_keys=False), encoding="utf-8")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    configs = {
        "model_index.json": model_index,
        "unet/config.json": create_unet_diffusers_config_from_ldm(original, {}) | {"sample_size": latent_size},
        "vae/config.json": create_vae_diffusers_config_from_ldm(original, {}) | {"sample_size": config.defaults.height},
        "text_encoder/config.json": text_encoder_config(config.text[0]),
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", **scheduler_config(config)},
    }
    for name, content in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    write_tokenizer(config.text[0], folder / "tokenizer")
    return folder


def diffusers_pipeline(config: ModelConfig, checkpoint_path: str | Path, scheduler_name: str):
    """diffusers' StableDiffusionPipeline from a single file, offline, fp32 on the CPU, with the scheduler
    that sdcli's sampler `scheduler_name` reproduces. A tensor missing from the file stays on the meta
    device, and the fp32 cast then fails, so a pipeline that loads has every weight."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # its one note, on casting AutoencoderKL, is moot in fp32
    diffusers_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as folder:
            write_diffusers_folder(config, Path(folder))
            pipe = StableDiffusionPipeline.from_single_file(
                str(checkpoint_path),
                config=folder,
                original_config=str(Path(folder) / "original.yaml"),
                local_files_only=True,
                torch_dtype=torch.float32,
                scheduler=diffusers_scheduler(config, scheduler_name),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_render(
    pipe, prompt: str, negative: str | None, seed: int, steps: int, guidance: float, width: int, height: int
) -> np.ndarray:
    """One image as uint8 HxWx3, rounded the way diffusers' numpy_to_pil does. For SDXL, `negative` None is
    diffusers' "no negative prompt": with force_zeros_for_empty_prompt the unconditional branch is zeros
    (text and pooled); "" is encoded like any prompt."""
    with torch.no_grad():
        out = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        )
    return (out.images[0] * 255).round().astype(np.uint8)


# --- diffusers SDXL, offline --------------------------------------------------------------------------

XL_TEXT_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # the pipeline's names


def xl_unet_config(config: ModelConfig) -> tuple[dict, bool]:
    """diffusers' UNet2DConditionModel config for an SDXL-like model, and whether the sgm yaml says it all.

    diffusers' create_unet_diffusers_config_from_ldm maps num_classes "sequential" to SDXL's "text_time"
    addition embedding (addition_time_embed_dim 256) only for context_dim 2048 or 1280; for any other width
    it makes a class-label projection, which the SDXL pipeline cannot drive. Such a (tiny) model gets the
    text_time fields set here, with the Fourier width its config names; from_single_file must then take the
    U-Net config from the folder, not from the yaml."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet = create_unet_diffusers_config_from_ldm(sgm_config(config), {})
    unet["sample_size"] = config.defaults.height // config.vae.downsample
    text_time = {
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": config.conditioning.size_embed_dim,
        "projection_class_embeddings_input_dim": config.unet.adm_in_channels,
    }
    expressed = all(unet.get(k) == v for k, v in text_time.items())
    return unet | text_time, expressed


def write_diffusers_xl_folder(config: ModelConfig, folder: Path) -> Path:
    """A StableDiffusionXLPipeline config folder (no weights) for `config` (model_index.json, unet, vae,
    text_encoder(_2), tokenizer(_2), scheduler), plus the sgm yaml beside it as original.yaml.

    U-Net and VAE configs come from diffusers' own mapping of the sgm yaml (see xl_unet_config). The first
    encoder is a CLIPTextModel, the pooled one a CLIPTextModelWithProjection; their tokenizers pad as the
    hub's do (tokenizer "<|endoftext|>", tokenizer_2 "!", id 0) because the configs' pad_id says so."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    if len(config.text) != 2:
        raise ValueError(f"StableDiffusionXLPipeline has two text encoders; {config.name} has {len(config.text)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    original = sgm_config(config)
    (folder / "original.yaml").write_text(yaml.safe_dump(original, sort_keys=False), encoding="utf-8")
    encoders = [("transformers", "CLIPTextModelWithProjection" if t.pooled else "CLIPTextModel") for t in config.text]
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": config.conditioning.zero_empty_negative,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": list(encoders[0]),
        "text_encoder_2": list(encoders[1]),
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    vae = create_vae_diffusers_config_from_ldm(original, {}) | {
        "sample_size": config.defaults.height,
        "force_upcast": config.vae.force_upcast,
    }
    configs = {
        "model_index.json": model_index,
        "unet/config.json": xl_unet_config(config)[0],
        "vae/config.json": vae,
        "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **scheduler_config(config)},
    }
    for (encoder, _), text in zip(XL_TEXT_FOLDERS, config.text, strict=True):
        configs[f"{encoder}/config.json"] = text_encoder_config(text, all_layers=True)
    for name, content in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    for (_, tokenizer), text in zip(XL_TEXT_FOLDERS, config.text, strict=True):
        write_tokenizer(text, folder / tokenizer)
    return folder


def diffusers_xl_pipeline(
    config: ModelConfig,
    checkpoint_path: str | Path,
    scheduler_name: str,
    use_original_config: bool | None = None,
    load_dtype: torch.dtype = torch.float32,
):
    """diffusers' StableDiffusionXLPipeline from a single file, offline, fp32 on the CPU, without the
    invisible watermark, with the scheduler that sdcli's sampler `scheduler_name` reproduces (built from the
    model's scheduler config, timestep_spacing included).

    The generated folder configures the text encoders, tokenizers and pipeline (force_zeros_for_empty_prompt
    from the config's zero_empty_negative); the sgm yaml is passed as original_config, from which diffusers
    builds the U-Net and VAE configs itself, whenever its mapping can say the model (`use_original_config`
    None: decided by xl_unet_config; a tiny model's U-Net comes from the folder). As with
    diffusers_pipeline, a tensor missing from the file fails the fp32 cast, so a pipeline that loads is complete.

    Note the two encoders' widths must differ: diffusers tells text_encoder_2's weights from text_encoder's
    by their width alone (create_diffusers_clip_model_from_ldm).

    `load_dtype` float16 reads an fp16 file into fp16 models and casts them to fp32 afterwards: the same fp32
    weights (the widening is exact), without diffusers holding the whole file in memory next to the fp32
    models (full-size SDXL: ~14 GB peak instead of ~21)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    if len({t.width for t in config.text}) != len(config.text):
        raise ValueError("diffusers tells SDXL's text encoders apart by width; these have equal widths")
    if use_original_config is None:
        use_original_config = xl_unet_config(config)[1]
    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as folder:
            write_diffusers_xl_folder(config, Path(folder))
            original = {"original_config": str(Path(folder) / "original.yaml")} if use_original_config else {}
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(checkpoint_path),
                config=folder,
                local_files_only=True,
                torch_dtype=load_dtype,
                scheduler=diffusers_scheduler(config, scheduler_name),
                add_watermarker=False,
                **original,
            )
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    if load_dtype != torch.float32:
        import gc

        gc.collect()  # the checkpoint dict from_single_file read is garbage now
        pipe.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_xl_conditioning(pipe, prompt: str, negative: str | None, width: int, height: int) -> dict:
    """What StableDiffusionXLPipeline conditions the U-Net on for one image, guidance on: prompt_embeds and
    negative_prompt_embeds (B, 77, 2048-like), the pooled text_embeds of both, the add_time_ids and the
    U-Net's `y` = cat(text_embeds, add_time_proj(time ids)) that its add_embedding consumes."""
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative,
        )  # fmt: skip
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype, projection)

        def vector(text_embeds: torch.Tensor) -> torch.Tensor:
            time = pipe.unet.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            return torch.cat([text_embeds, time.to(text_embeds.dtype)], dim=-1)

        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "text_embeds": pooled,
            "negative_text_embeds": negative_pooled,
            "add_time_ids": time_ids,
            "y": vector(pooled),
            "negative_y": vector(negative_pooled),
        }


@contextlib.contextmanager
def torch_threads(count: int):
    """Run a block on `count` CPU threads; tiny models are fastest on one, where a shared CPU makes more
    threads fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --- tiny configs -----------------------------------------------------------------------------------


def tiny_config(family: str = "sd1", prediction: str = "epsilon") -> ModelConfig:
    """A small model of the SD 1.x (`sd1`), SD 2.x (`sd2`) or SDXL (`sdxl`, see tiny_xl_config) family that
    renders 64x64 in about a second.

    Same structure as the real ones: attention on all levels but the last, a 1x1-conv (sd1) or linear
    (sd2) transformer projection, fixed heads (sd1) or fixed head width (sd2), and for sd2 an extra text
    block that only the file holds (penultimate output)."""
    if family == "sdxl":
        return tiny_xl_config(prediction)
    sd1 = family == "sd1"
    text = TextConfig(
        layout="hf_clip" if sd1 else "open_clip",
        width=32,
        heads=2,
        layers=2 if sd1 else 3,
        activation="quick_gelu" if sd1 else "gelu",
        output_layer="last" if sd1 else "penultimate",
        pad_id=49407 if sd1 else 0,
        clip_skip=sd1,
    )
    unet = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_levels=(0,),
        context_dim=text.width,
        num_heads=2 if sd1 else None,
        head_dim=None if sd1 else 16,
        linear_proj=not sd1,
    )
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    return ModelConfig(
        name=f"tiny-{family}-{'v' if prediction == 'v_prediction' else 'eps'}",
        weights=f"tiny-{family}.safetensors",
        text=(text,),
        unet=unet,
        vae=vae,
        schedule=ScheduleConfig(prediction_type=prediction),
        defaults=Defaults(width=64, height=64, steps=4, guidance=7.5, sampler="euler"),
    )


def tiny_xl_config(prediction: str = "epsilon", size_embed_dim: int = 64) -> ModelConfig:
    """A small model built like SDXL base: a CLIP-L-like encoder (hf_clip, quick_gelu, penultimate block
    without the final norm, padded with the end token) then a bigG-like one (open_clip, gelu, penultimate
    without the final norm, pooled through text_projection, padded with 0), of different widths (32 + 48 =
    context 80); a three-level U-Net without attention on level 0, fixed head width, linear projections, a
    deeper transformer on the last level and in the middle (depth 2) and label_emb fed by the SDXL vector
    (pooled 48 + 3 size pairs x 2 x size_embed_dim); SDXL's VAE scale 0.13025 with force_upcast; the hub's
    "leading" timesteps; an empty negative conditions on zeros. Written in sgm's layout (conditioner.*)."""
    vector = ("pooled", "original_size", "crop_coords_top_left", "target_size")
    clip_l = TextConfig(
        layout="hf_clip", prefix=SGM_TEXT_ROOT + "0.transformer.text_model.", width=32, heads=2, layers=3,
        activation="quick_gelu", output_layer="penultimate", final_norm=False, pad_id=49407,
    )  # fmt: skip
    big_g = TextConfig(
        layout="open_clip", prefix=SGM_TEXT_ROOT + "1.model.", width=48, heads=3, layers=3, activation="gelu",
        output_layer="penultimate", final_norm=False, pooled=True, pad_id=0,
    )  # fmt: skip
    conditioning = ConditioningConfig(vector=vector, size_embed_dim=size_embed_dim, zero_empty_negative=True)
    unet = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1, 2),
        transformer_depth=(1, 1, 2),
        head_dim=16,
        context_dim=clip_l.width + big_g.width,
        linear_proj=True,
        adm_in_channels=conditioning.vector_width(big_g.width),
    )
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025, force_upcast=True)
    spacing = {"timestep_spacing": "leading"} if "timestep_spacing" in ScheduleConfig.__dataclass_fields__ else {}
    return ModelConfig(
        name=f"tiny-sdxl-{'v' if prediction == 'v_prediction' else 'eps'}",
        weights="tiny-sdxl.safetensors",
        text=(clip_l, big_g),
        unet=unet,
        vae=vae,
        schedule=ScheduleConfig(prediction_type=prediction, **spacing),
        defaults=Defaults(width=64, height=64, steps=4, guidance=5.0, sampler="euler"),
        conditioning=conditioning,
    )


if __name__ == "__main__":
    write_key_lists()
    sys.stdout.write("".join(f"{path}: {len(read_key_list(path))} keys\n" for path in KEY_LISTS.values()))
