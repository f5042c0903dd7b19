"""The CLIP text tower (with OpenCLIP's parameter names) and the prompt tokenizer (OpenCLIP's BPE).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision". SD 1.x
conditions on OpenAI CLIP ViT-L/14's last block, SD 2.x on OpenCLIP ViT-H/14's penultimate block; both
after the final LayerNorm.

Tokenizing '!': SD 2.x was trained with OpenCLIP's tokenizer, where '!' ending a word is the token
"!</w>" (id 256) and "!!" is one token (748). diffusers' SD 2 tokenizer declares "!" (id 0) as its pad
token, so every '!' in a prompt becomes id 0 there (diffusers issue 4153). We follow OpenCLIP, the
model's own tokenizer, so prompts with '!' differ from diffusers' SD 2 ids on purpose.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch
from torch import Tensor, nn

from sdcli.config import TextConfig
from sdcli.errors import CheckpointError, ConfigError
from sdcli.prompt_chunks import CLIP_WORDS

START, END = "<start_of_text>", "<end_of_text>"  # OpenCLIP's names for CLIP's special tokens
BYTE_TOKENS = 256  # byte-level BPE: one base token per byte, once plain and once word-final


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class ResidualAttentionBlock(nn.Module):
    """Pre-norm causal self-attention then an MLP, each residual; OpenCLIP's block and parameter names."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(cfg.width)
        layers = {"c_fc": nn.Linear(cfg.width, hidden), "gelu": ACTIVATIONS[cfg.activation]()}
        self.mlp = nn.Sequential(OrderedDict(layers, c_proj=nn.Linear(hidden, cfg.width)))

    def forward(self, x: Tensor, causal: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=causal)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The stack of blocks, under the `transformer.resblocks` names the checkpoints use."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    """Token ids -> per-token context for cross-attention (the configured block's output, after ln_final
    unless the config says otherwise) and, for an encoder with `pooled`, the pooled embedding: the last
    block's output after ln_final at the first end token, times text_projection (SDXL's bigG).

    OpenCLIP's text tower rebuilt from torch modules: importing open_clip itself costs seconds (it pulls in
    torchvision and transformers), which a cold start should not pay."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        # given its (empty) weight, nn.Embedding skips its random init, which on the meta device would import
        # torch._dynamo: 1.5 s of a cold start, for numbers the checkpoint overwrites anyway
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.pooled:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.width))  # used as x @ text_projection
        self.final_norm = cfg.final_norm
        # the context's block; a later one stays a parameter so strict loads work, and runs only for pooling
        self.depth = cfg.layers - 1 if cfg.output_layer == "penultimate" else cfg.layers
        self.blocks_run = cfg.layers if cfg.pooled else self.depth
        self.honours_clip_skip = cfg.clip_skip

    def forward(
        self, ids: Tensor, clip_skip: int = 1, extra: Tensor | None = None, pool_at: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(context (B, L, width), pooled (B, width) or None); A1111's `clip_skip` N takes the context N-1
        blocks earlier, on an encoder that honours it. `extra` (B, E, width) holds each row's own token vectors
        (textual-inversion embeddings), which ids from vocab_size on pick; `pool_at` (B,) is where pooling reads
        each row (default: its largest id, the first end token)."""
        depth = self.depth - (clip_skip - 1) if self.honours_clip_skip else self.depth
        length = ids.shape[1]
        x = self.embed(ids, extra) + self.positional_embedding[:length]  # (B, L, width)
        # additive causal mask, built here so a meta-device construction holds no stale buffer
        causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        context = x
        for i, block in enumerate(self.transformer.resblocks[: self.blocks_run]):
            x = block(x, causal)
            if i + 1 == depth:
                context = x
            if i + 1 >= depth and not hasattr(self, "text_projection"):
                break  # the later blocks only feed pooling
        if self.final_norm:
            context = self.ln_final(context)
        if not hasattr(self, "text_projection"):
            return context, None
        # the end token has the largest id, so argmax finds the first one (padding is lower or equal)
        end = ids.argmax(dim=-1) if pool_at is None else pool_at
        pooled = self.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), end] @ self.text_projection
        return context, pooled

    def embed(self, ids: Tensor, extra: Tensor | None) -> Tensor:
        """Token vectors (B, L, width): the vocabulary's, and a row's `extra` ones where ids run past it, as
        A1111's EmbeddingsWithFixes and diffusers' added tokens place embeddings (before the positions)."""
        if extra is None:
            return self.token_embedding(ids)
        vocab = self.token_embedding.num_embeddings
        own = ids < vocab
        x = self.token_embedding(ids.where(own, 0))
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        added = extra.to(x.dtype)[rows, (ids - vocab).clamp(min=0)]  # (B, L, width)
        return torch.where(own[..., None], x, added)


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
    """Prompts -> (B, context_length) ids with OpenCLIP's bundled byte-level BPE (Sennrich et al. 2016; CLIP's
    text cleaning, pattern and merges): start, tokens, end, then pad_id."""

    def __init__(self, cfg: TextConfig):
        merges = _merges(cfg.vocab_size)
        base = list(_byte_chars().values())
        vocab = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.comma_id = self.encoder[",</w>"]  # where A1111 may end a long prompt's chunk early
        self.words = {START: START, END: END}  # BPE results per word; OpenCLIP maps the spelled-out specials too
        self.pattern = regex.compile(rf"{START}|{END}|{CLIP_WORDS}", regex.IGNORECASE)
        self.context_length = cfg.context_length
        self.pad_id = cfg.pad_id

    def __call__(self, prompts: list[str]) -> tuple[Tensor, list[bool]]:
        """Token ids and, per prompt, whether tokens past the context were dropped (the end token is kept)."""
        keep = self.context_length - 2  # room left by the start and end tokens
        ids = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        truncated = []
        for row, prompt in zip(ids, prompts, strict=True):
            tokens = self.encode(prompt)
            truncated.append(len(tokens) > keep)
            sequence = [self.start_id, *tokens[:keep], self.end_id]
            row[: len(sequence)] = torch.tensor(sequence)
        return ids, truncated

    def encode(self, text: str) -> list[int]:
        """Token ids of cleaned, lower-cased text: each pattern match as bytes, merged by BPE."""
        text = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        chars = _byte_chars()
        ids = []
        for word in self.pattern.findall(text):
            ids += [self.encoder[piece] for piece in self.bpe("".join(chars[b] for b in word.encode("utf-8")))]
        return ids

    def bpe(self, word: str) -> list[str]:
        """Merge the word's symbols, lowest-ranked pair first, until no known pair is left."""
        if word in self.words:
            return self.words[word].split(" ")
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:], strict=False))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.words[word] = " ".join(symbols)
        return symbols


@lru_cache
def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable bytes stand for themselves, the rest
    for characters from 256 on, so no byte becomes whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@lru_cache
def _merges(vocab_size: int) -> list[tuple[str, str]]:
    """The first vocab_size - 2*256 - 2 merges of OpenCLIP's BPE file (its header line skipped)."""
    spec = importlib.util.find_spec("open_clip")  # locates the package's data without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the tokenizer reads open_clip_torch's BPE vocabulary: pip install open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    count = vocab_size - 2 * BYTE_TOKENS - 2
    return [tuple(line.split()) for line in lines[1 : 1 + count]]
