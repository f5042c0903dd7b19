"""A random-weight kohya-ss LoRA for a model config, on the layers kohya's trainer adapts: every Linear (and
1x1 conv projection) of the U-Net's transformers and the text encoders' attention and MLP layers.

    python bench/make_lora.py sd15|sdxl OUT.safetensors [--rank 32]

Names as kohya writes them: SD 1.x/2.x U-Nets under diffusers' module names, SDXL's under the original ones,
text encoders under HuggingFace CLIP's. For benchmarks; the layouts' parity is tests/test_lora_parity.py's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sdcli.config import load_config
from sdcli.diffusers_layout import unet_key_map
from sdcli.weights import build_on_meta

TRANSFORMER_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = {"self_attn.q_proj": 1, "self_attn.k_proj": 1, "self_attn.v_proj": 1, "self_attn.out_proj": 1,
               "mlp.fc1": 4, "mlp.fc2": 1}  # fmt: skip  # rows as a multiple of the width (fc2: width rows)


def write_lora(config, path: Path, rank: int = 32, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    sgm = config.unet.adm_in_channels is not None  # kohya names SDXL's U-Net as the original checkpoint does
    renamed = {} if sgm else unet_key_map(config.unet)
    shapes: dict[str, tuple[int, int, bool]] = {}  # name -> rows, columns, a 1x1 conv (4-D tensors)
    for name, module in build_on_meta(config).unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(TRANSFORMER_LAYERS):
            theirs = renamed.get(f"{name}.weight", f"{name}.weight").removesuffix(".weight")
            rows, cols = module.weight.shape[:2]
            shapes["lora_unet_" + theirs.replace(".", "_")] = (rows, cols, isinstance(module, nn.Conv2d))
    prefixes = ["lora_te_"] if len(config.text) == 1 else [f"lora_te{i + 1}_" for i in range(len(config.text))]
    for prefix, text in zip(prefixes, config.text, strict=True):
        for layer in range(text.layers):
            for part, mult in TEXT_LAYERS.items():
                rows, cols = (text.width, 4 * text.width) if part == "mlp.fc2" else (mult * text.width, text.width)
                shapes[f"{prefix}text_model_encoder_layers_{layer}_{part.replace('.', '_')}"] = (rows, cols, False)
    tensors = {}
    for name, (rows, cols, conv) in shapes.items():
        tail = (1, 1) if conv else ()
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, cols, *tail, generator=g) / cols**0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, *tail, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(tensors, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    write_lora(load_config(args.config), args.out, args.rank)


if __name__ == "__main__":
    main()
