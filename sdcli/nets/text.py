"""The CLIP text tower (OpenCLIP's modules and parameter names) and the prompt tokenizer.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision". SD 1.x
conditions on OpenAI CLIP ViT-L/14's last block, SD 2.x on OpenCLIP ViT-H/14's penultimate block; both
after the final LayerNorm.

Tokenizing '!': SD 2.x was trained with OpenCLIP's tokenizer, where '!' ending a word is the token
"!</w>" (id 256) and "!!" is one token (748). diffusers' SD 2 tokenizer declares "!" (id 0) as its pad
token, so every '!' in a prompt becomes id 0 there (diffusers issue 4153). We follow OpenCLIP, the
model's own tokenizer, so prompts with '!' differ from diffusers' SD 2 ids on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import Tensor, nn

from sdcli.config import TextConfig
from sdcli.errors import CheckpointError

ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class TextEncoder(nn.Module):
    """Token ids -> per-token context for cross-attention: the configured block's output after ln_final."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act_layer=ACTIVATIONS[cfg.activation]
        )
        self.ln_final = LayerNorm(cfg.width)
        # SD 2.x stops one block early; the skipped block stays a parameter so strict loads still work
        self.depth = cfg.layers - 1 if cfg.output_layer == "penultimate" else cfg.layers

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, width)
        # additive causal mask, built here so a meta-device construction holds no stale buffer
        causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        for block in self.transformer.resblocks[: self.depth]:
            x = block(x, attn_mask=causal)
        return self.ln_final(x)


# OpenCLIP name <- HuggingFace CLIPTextModel name, for the SD 1.x text weights.
_HF_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_HF_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_IGNORED = {"embeddings.position_ids"}  # an index buffer, not a weight


def _hf_pairs(cfg: TextConfig) -> Iterator[tuple[str, str]]:
    """(OpenCLIP name, HuggingFace name) for every weight that maps one to one."""
    yield from _HF_TOP.items()
    for i in range(cfg.layers):
        for ours, theirs in _HF_BLOCK.items():
            for kind in ("weight", "bias"):
                yield f"transformer.resblocks.{i}.{ours}.{kind}", f"encoder.layers.{i}.{theirs}.{kind}"


def _hf_fused(cfg: TextConfig) -> Iterator[tuple[str, list[str]]]:
    """(OpenCLIP in_proj name, the HuggingFace q, k, v names it stacks, in that order)."""
    for i in range(cfg.layers):
        for kind in ("weight", "bias"):
            qkv = [f"encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            yield f"transformer.resblocks.{i}.attn.in_proj_{kind}", qkv


def hf_clip_key_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every HuggingFace-named tensor an SD 1.x text encoder needs (prefix stripped), with its shape."""
    with torch.device("meta"):
        ours = {name: tuple(t.shape) for name, t in TextEncoder(cfg).state_dict().items()}
    shapes = {theirs: ours[mine] for mine, theirs in _hf_pairs(cfg)}
    for mine, qkv in _hf_fused(cfg):
        rows, *rest = ours[mine]
        shapes |= {name: (rows // 3, *rest) for name in qkv}
    return shapes


def hf_clip_to_open_clip(state: dict[str, Tensor], cfg: TextConfig) -> dict[str, Tensor]:
    """Rename HuggingFace CLIPTextModel weights (prefix stripped) to OpenCLIP's, fusing q/k/v into in_proj."""
    used = set(_HF_IGNORED)

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"text encoder weight '{key}' is missing")
        used.add(key)
        return state[key]

    out = {mine: take(theirs) for mine, theirs in _hf_pairs(cfg)}
    for mine, qkv in _hf_fused(cfg):
        out[mine] = torch.cat([take(name) for name in qkv])  # (3*width, ...): q rows, then k, then v
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise CheckpointError(f"unexpected text encoder weight '{unexpected[0]}' (config has {cfg.layers} layers)")
    return out


class Tokenizer:
    """Prompts -> (B, context_length) ids with OpenCLIP's bundled BPE: start, tokens, end, then pad_id."""

    def __init__(self, cfg: TextConfig):
        self.bpe = SimpleTokenizer(context_length=cfg.context_length)
        self.context_length = cfg.context_length
        self.pad_id = cfg.pad_id

    def __call__(self, prompts: list[str]) -> tuple[Tensor, list[bool]]:
        """Token ids and, per prompt, whether tokens past the context were dropped (the end token is kept)."""
        keep = self.context_length - 2  # room left by the start and end tokens
        ids = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        truncated = []
        for row, prompt in zip(ids, prompts):
            tokens = self.bpe.encode(prompt)
            truncated.append(len(tokens) > keep)
            sequence = [self.bpe.sot_token_id, *tokens[:keep], self.bpe.eot_token_id]
            row[: len(sequence)] = torch.tensor(sequence)
        return ids, truncated
