"""Random-weight LoRA files for the tiny test models, in the two layouts found in the wild, named the way their
trainers name the layers. Both writers walk the real modules of a diffusers pipeline (see reference.py), so a file
holds exactly the layers its trainer would have adapted, with the shapes those layers have.

- kohya-ss (sd-scripts networks/lora.py): `lora_unet_` / `lora_te_` (SDXL: `lora_te1_`, `lora_te2_`) + the module
  path with "." as "_", tensors `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`. kohya trains SD 1.x/2.x
  on a U-Net named like diffusers' and SDXL on one named like the original (sgm) checkpoint; its text encoders are
  HuggingFace CLIP models in both cases. Targets: every Linear and 1x1 Conv2d inside a Transformer2DModel and the
  text encoders' attention and MLP layers; LoCon (`convs`) adds ResnetBlock2D, Downsample2D and Upsample2D
  (3x3 convs at the conv rank, a k x k down conv with the layer's stride and padding, then a 1x1 up conv).
- diffusers/PEFT: made by peft itself (`add_adapter` on copies of the pipeline's networks) and saved by the
  pipeline's own `save_lora_weights`, so keys, alpha metadata (`lora_adapter_metadata`) and patterns are diffusers'.

Up weights are random, never zero (kohya and PEFT initialise them to zero; such a file would change nothing), of a
size that visibly changes a render without wrecking it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# kohya-ss networks/lora.py: the module classes whose Linear/Conv2d children get a LoRA
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
SGM_UNET_PREFIX = "model.diffusion_model."

# PEFT target names: the same layers, as peft matches them (a module whose name ends with one of these)
PEFT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
PEFT_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
PEFT_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def text_encoders(pipe) -> list[tuple[str, str, nn.Module]]:
    """(kohya prefix, diffusers component name, module) of each text encoder of the pipeline."""
    if is_xl(pipe):
        return [("lora_te1", "text_encoder", pipe.text_encoder), ("lora_te2", "text_encoder_2", pipe.text_encoder_2)]
    return [("lora_te", "text_encoder", pipe.text_encoder)]


def hf_text_path(encoder: nn.Module, path: str) -> str:
    """A text encoder module's path as HuggingFace CLIP names it in the files: transformers 5 dropped
    CLIPTextModel's `text_model.` wrapper (CLIPTextModelWithProjection keeps it), kohya's and older diffusers'
    files all have it."""
    return path if hasattr(encoder, "text_model") else f"text_model.{path}"


def kohya_targets(root: nn.Module, classes: tuple[str, ...]) -> dict[str, nn.Module]:
    """Module path -> Linear/Conv2d for every Linear and Conv2d inside a module of one of `classes`, as kohya's
    create_modules finds them (the target's own path + its child's path). A layer with two names (diffusers keeps
    Downsample2D's conv also as Conv2d_0, an alias kohya's own U-Net lacks) is named once, by its non-alias name."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        names: dict[int, list[str]] = {}
        layers: dict[int, nn.Module] = {}
        for child_name, child in module.named_modules(remove_duplicate=False):
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                names.setdefault(id(child), []).append(child_name)
                layers[id(child)] = child
        for key, child in layers.items():
            plain = [n for n in names[key] if "Conv2d_0" not in n.split(".")] or names[key]
            found[f"{name}.{plain[0]}"] = child
    return found


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()


def sgm_names(checkpoint: str | Path, modules: dict[str, nn.Module]) -> dict[str, str]:
    """diffusers module path -> the original (sgm/LDM) module path of the same layer in the single-file
    checkpoint, found by the layer's weight: a random-weight checkpoint holds each weight matrix once, so the
    checkpoint key (minus `.weight`) whose tensor equals the module's weight is that module's original name.
    No renaming table is involved, so the names cannot share a mistake with the code under test."""
    wanted = {_digest(module.weight): path for path, module in modules.items()}
    if len(wanted) != len(modules):
        raise ValueError("two layers share a weight: their original names cannot be told apart")
    found: dict[str, str] = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            if not (key.startswith(SGM_UNET_PREFIX) and key.endswith(".weight")):
                continue
            tensor = f.get_tensor(key)
            if tensor.dim() < 2:
                continue
            path = wanted.get(_digest(tensor))
            if path is not None:
                if path in found:
                    raise ValueError(f"{path}: its weight appears twice in {checkpoint}")
                found[path] = key[len(SGM_UNET_PREFIX) : -len(".weight")]
    missing = sorted(set(modules) - set(found))
    if missing:
        raise ValueError(f"no checkpoint key holds the weight of {missing[:3]}")
    return found


def _lora_pair(
    layer: nn.Module, rank: int, strength: float, g: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one layer: down ~ N(0, 1/fan_in), like a trained projection; up ~ N(0, strength^2 / rank), so
    up @ down is about `strength` times the base weight's size whatever the rank."""
    if isinstance(layer, nn.Conv2d):
        out_ch, in_ch, kh, kw = layer.weight.shape
        down = torch.randn((rank, in_ch, kh, kw), generator=g) / math.sqrt(in_ch * kh * kw)
        up = torch.randn((out_ch, rank, 1, 1), generator=g) * strength / math.sqrt(rank)
    else:
        out_f, in_f = layer.weight.shape
        down = torch.randn((rank, in_f), generator=g) / math.sqrt(in_f)
        up = torch.randn((out_f, rank), generator=g) * strength / math.sqrt(rank)
    return down.to(dtype), up.to(dtype)


def kohya_layer_names(pipe, *, checkpoint: str | Path | None = None, convs: bool = False, text: bool = True,
                      unet: bool = True) -> dict[str, nn.Module]:  # fmt: skip
    """kohya module name (`lora_unet_...`, `lora_te*_...`) -> the diffusers layer it adapts."""
    layers: dict[str, nn.Module] = {}
    if unet:
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if convs else ())
        modules = kohya_targets(pipe.unet, classes)
        if is_xl(pipe):  # kohya's SDXL U-Net is named like the original checkpoint
            if checkpoint is None:
                raise ValueError("an SDXL kohya LoRA needs the single-file checkpoint for the U-Net's original names")
            renamed = sgm_names(checkpoint, modules)
            modules = {renamed[path]: module for path, module in modules.items()}
        layers |= {"lora_unet_" + path.replace(".", "_"): module for path, module in modules.items()}
    if text:
        for prefix, _, encoder in text_encoders(pipe):
            for path, module in kohya_targets(encoder, TEXT_TARGETS).items():
                layers[f"{prefix}_{hf_text_path(encoder, path).replace('.', '_')}"] = module
    if len({id(m) for m in layers.values()}) != len(layers):
        raise ValueError("two kohya names for one layer")
    return layers


def write_kohya_lora(
    pipe,
    path: str | Path,
    *,
    checkpoint: str | Path | None = None,
    rank: int = 4,
    alpha: float | None = 2.0,
    convs: bool = False,
    conv_rank: int = 2,
    conv_alpha: float | None = 1.0,
    text: bool = True,
    unet: bool = True,
    seed: int = 0,
    strength: float = 0.35,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """A kohya-ss LoRA (LoCon with `convs`) for the diffusers pipeline `pipe`'s networks, random weights from
    `seed`. Linear and 1x1 conv layers get `rank`/`alpha`, 3x3 convs `conv_rank`/`conv_alpha` (kohya's conv_dim,
    conv_alpha); alpha None leaves the `.alpha` tensors out (scale 1). SDXL needs `checkpoint`, the single file the
    pipeline was loaded from, for the U-Net's original names. Saved in `dtype` (kohya's usual fp16)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in kohya_layer_names(pipe, checkpoint=checkpoint, convs=convs, text=text, unet=unet).items():
        three = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
        r, a = (conv_rank, conv_alpha) if three else (rank, alpha)
        down, up = _lora_pair(layer, r, strength, g, dtype)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if a is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(a), dtype=dtype)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha if alpha is not None else rank),
    }
    if convs:
        metadata["ss_network_args"] = json.dumps({"conv_dim": conv_rank, "conv_alpha": conv_alpha})
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _adapted_copy(module: nn.Module, config, g: torch.Generator, strength: float) -> nn.Module:
    """A copy of `module` with a PEFT LoRA adapter of `config`, A and B random from `g` (B never zero)."""
    from peft import inject_adapter_in_model

    adapted = copy.deepcopy(module)
    if hasattr(adapted, "set_adapters"):  # a diffusers model: its own add_adapter, as diffusers' trainers call it
        adapted.add_adapter(config)
    else:  # transformers' add_adapter wants a newer peft than diffusers does; this is what it calls
        inject_adapter_in_model(config, adapted, adapter_name="default")
    with torch.no_grad():
        for name, param in sorted(adapted.named_parameters()):
            if ".lora_A." in name:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(fan_in))
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * strength / math.sqrt(param.shape[1]))
    return adapted


def _jsonable(config: dict) -> dict:
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def write_peft_lora(
    pipe,
    path: str | Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    alpha_pattern: dict[str, float] | None = None,
    rank_pattern: dict[str, int] | None = None,
    convs: bool = False,
    text: bool = True,
    seed: int = 0,
    strength: float = 0.2,
    layout: str = "peft",
    text_model_prefix: bool = True,
) -> Path:
    """A diffusers LoRA for `pipe` made by peft and saved by `type(pipe).save_lora_weights`: keys
    `unet.<module>.lora_A.weight`/`lora_B`, `text_encoder.`, `text_encoder_2.` (SDXL), the LoraConfig of each
    component (lora_alpha, alpha_pattern, rank_pattern) in the safetensors metadata `lora_adapter_metadata`. The
    pipeline's own networks are untouched (the adapters go into copies). `alpha_pattern`/`rank_pattern` are
    the U-Net's (peft matches them as regexes against a module name's end).

    Text layers keep CLIPTextModel's `text_model.` as every file made before transformers 5 does;
    `text_model_prefix` False writes what diffusers saves with transformers 5 (`text_encoder.encoder.layers...`).

    `layout` "diffusers" first converts each state dict with diffusers' convert_state_dict_to_diffusers, as
    diffusers' own LoRA training scripts save (attention `.lora.down.weight`, text `.lora_linear_layer.down`),
    with those scripts' targets, the attention projections only (diffusers' loader decides by the first key
    whether to convert a file, so a file mixing converted and unconverted keys loads only in part)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if layout not in ("peft", "diffusers"):
        raise ValueError(f"layout must be peft or diffusers, not {layout!r}")
    g = torch.Generator().manual_seed(seed)

    def config(targets: tuple[str, ...], patterns: bool) -> LoraConfig:
        return LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True,
            alpha_pattern=dict(alpha_pattern or {}) if patterns else {},
            rank_pattern=dict(rank_pattern or {}) if patterns else {},
        )  # fmt: skip

    if layout == "diffusers":  # the training scripts' targets: attention only
        unet_targets, text_targets = PEFT_UNET_TARGETS[:4], PEFT_TEXT_TARGETS[:4]
    else:
        unet_targets, text_targets = PEFT_UNET_TARGETS, PEFT_TEXT_TARGETS
    parts = [("unet", pipe.unet, config(unet_targets + (PEFT_CONV_TARGETS if convs else ()), True))]
    if text:
        parts += [(c, encoder, config(text_targets, False)) for _, c, encoder in text_encoders(pipe)]
    layers, metadata = {}, {}
    for component, module, lora_config in parts:
        adapted = _adapted_copy(module, lora_config, g, strength)
        state = get_peft_model_state_dict(adapted)
        if component != "unet" and text_model_prefix:
            state = {hf_text_path(module, key): value for key, value in state.items()}
        if layout == "diffusers":
            from diffusers.utils import convert_state_dict_to_diffusers

            state = convert_state_dict_to_diffusers(state)
        layers[f"{component}_lora_layers"] = {k: v.detach().clone().contiguous() for k, v in state.items()}
        metadata[f"{component}_lora_adapter_metadata"] = _jsonable(adapted.peft_config["default"].to_dict())
        del adapted
    path = Path(path)
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **layers, **metadata)
    return path
