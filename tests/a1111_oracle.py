"""What A1111 (default settings) conditions the U-Net on for a prompt, computed from diffusers' own tokenizers and
transformers' text encoders: an oracle for sdcli's `prompt_syntax="a1111"`, independent of sdcli's code.

The prompt comes in already parsed, as a list of `(text, weight)` fragments and `BREAK` markers (what A1111's
prompt_parser.parse_prompt_attention returns; tests write it by hand), so nothing here depends on sdcli's parser.
From there, as A1111's sd_hijack_clip / sd_emphasis / sd_samplers_cfg_denoiser do (see shared/FACTS-wave2.md, 4):

- tokens: each fragment tokenized on its own (`add_special_tokens=False, truncation=False`), every token keeping
  its fragment's weight;
- chunks of 75 tokens: BREAK closes the current chunk; a full chunk closes at the next non-comma token, unless a
  comma lies within COMMA_BACKTRACK tokens of its end, in which case the tokens after that comma move on to the
  next chunk; the last chunk is kept if it has tokens or is the only one (an empty prompt is one empty chunk);
- windows: [start] + chunk padded to 75 with the end token + [end] (77), weight 1.0 on everything added; an
  encoder whose pad id is not the end id (OpenCLIP: SD 2.x, SDXL's bigG) gets the pad id after the first end;
- each window encoded alone, then the "Original" emphasis on that one (77, D) output:
  m0 = z.mean(); z = z * w[:, None]; z = z * (m0 / z.mean());
  per encoder for SDXL (CLIP-L and bigG apart, before their concatenation); windows concatenated along tokens;
- clip skip N (1 = last layer) only on SD 1.x's CLIP: final_layer_norm(hidden_states[-N]) for N > 1; SD 2.x's
  OpenCLIP and both SDXL encoders ignore it;
- SDXL's pooled vector: bigG's text_embeds of the first window, unweighted.

A1111 runs a prompt and a negative of different lengths in separate U-Net calls, each attending to its own
tokens only. diffusers wants equal shapes; `equalize` repeats each context along the tokens to the least common
multiple of the two lengths, which leaves cross-attention unchanged (a key/value set repeated r times gives the
same softmax average), so diffusers then renders what A1111 does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

CHUNK_TOKENS = 75  # tokens of a window between its start and end token
COMMA_BACKTRACK = 20  # opts.comma_padding_backtrack's default
WINDOW = CHUNK_TOKENS + 2


class _Break:
    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()  # the marker parse_prompt_attention writes as ["BREAK", -1]

Fragment = tuple[str, float]
Chunk = tuple[list[int], list[float]]  # a window's 77 ids and weights


# --- tokens into windows ------------------------------------------------------------------------------


def fragment_tokens(tokenizer, text: str) -> list[int]:
    """One fragment's token ids, as A1111 tokenizes it: no start/end token, no truncation."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def comma_id(tokenizer) -> int:
    """The id of ",</w>" (a comma ending a word), the token A1111's backtrack looks for."""
    token = tokenizer.convert_tokens_to_ids(",</w>")
    assert token != tokenizer.unk_token_id, "the vocabulary has no ',</w>'"
    return token


def split_chunks(
    pieces: Sequence[Sequence[tuple[int, float]] | _Break], comma: int, backtrack: int = COMMA_BACKTRACK
) -> list[list[tuple[int, float]]]:
    """(token, weight) pieces (one per fragment, or BREAK) -> chunks of at most 75 (token, weight) pairs.

    Written from the rule: a token arriving at a full chunk closes it; if that token is not a comma and the
    chunk's last comma is at most `backtrack` positions from its end, what follows that comma is carried over
    into the new chunk. The last comma position is forgotten whenever a chunk closes."""
    chunks: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_comma: int | None = None  # index in `current` of its last comma

    for piece in pieces:
        if piece is BREAK:
            chunks.append(current)
            current, last_comma = [], None
            continue
        for token, weight in piece:
            if len(current) == CHUNK_TOKENS:
                carried: list[tuple[int, float]] = []
                near = last_comma is not None and CHUNK_TOKENS - last_comma <= backtrack
                if token != comma and backtrack > 0 and near:
                    current, carried = current[: last_comma + 1], current[last_comma + 1 :]
                chunks.append(current)
                current, last_comma = carried, None
            if token == comma:
                last_comma = len(current)
            current.append((token, weight))
    if current or not chunks:
        chunks.append(current)
    return chunks


def window(chunk: Sequence[tuple[int, float]], start: int, end: int, pad: int) -> Chunk:
    """A chunk as the encoder's 77 ids: start, tokens, end-token padding to 75, end; then, for an encoder whose
    pad id is not its end id, the pad id after the first end token. Weights 1.0 outside the chunk's tokens."""
    assert len(chunk) <= CHUNK_TOKENS
    ids = [start] + [t for t, _ in chunk] + [end] * (CHUNK_TOKENS - len(chunk)) + [end]
    weights = [1.0] + [w for _, w in chunk] + [1.0] * (CHUNK_TOKENS + 1 - len(chunk))
    if pad != end:
        first_end = ids.index(end)
        ids = ids[: first_end + 1] + [pad] * (WINDOW - first_end - 1)
    return ids, weights


def prompt_windows(tokenizer, fragments: Sequence[Fragment | _Break], backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A parsed prompt -> its 77-token windows (ids, weights) for one tokenizer."""
    pieces = [
        piece if piece is BREAK else [(t, float(piece[1])) for t in fragment_tokens(tokenizer, piece[0])]
        for piece in fragments
    ]
    chunks = split_chunks(pieces, comma_id(tokenizer), backtrack)
    return [window(c, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) for c in chunks]


# --- windows into contexts ----------------------------------------------------------------------------


def emphasis(z: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """A1111's "Original" emphasis on one window's (77, D) output: weight each token, restore the mean."""
    w = torch.tensor(weights, dtype=z.dtype, device=z.device)
    original_mean = z.mean()
    z = z * w[:, None]
    return z * (original_mean / z.mean())


def _ids(chunk: Chunk, encoder) -> torch.Tensor:
    return torch.tensor([chunk[0]], dtype=torch.long, device=encoder.device)


def honours_clip_skip(pipe) -> bool:
    """SD 1.x's encoder (HF CLIP, padded with its end token) takes clip skip; OpenCLIP (SD 2.x, pad 0) not."""
    return pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id


@torch.no_grad()
def sd_embeds(
    pipe, fragments: Sequence[Fragment | _Break], clip_skip: int = 1, backtrack: int = COMMA_BACKTRACK
) -> torch.Tensor:
    """A StableDiffusionPipeline's (SD 1.x / 2.x) context for a parsed prompt: (1, 77*k, D).

    SD 2.x's pipeline text_encoder already stops at the penultimate block, with the final norm, as ldm's
    FrozenOpenCLIPEmbedder(layer="penultimate") does: its last_hidden_state is the context."""
    skip = clip_skip if honours_clip_skip(pipe) else 1
    encoder = pipe.text_encoder
    outputs = []
    for chunk in prompt_windows(pipe.tokenizer, fragments, backtrack):
        out = encoder(_ids(chunk, encoder), output_hidden_states=True)
        if skip > 1:
            # transformers 5 flattened CLIPTextModel (final_layer_norm on it); 4.x nested it under text_model
            z = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-skip])
        else:
            z = out.last_hidden_state
        outputs.append(emphasis(z[0], chunk[1]))
    return torch.cat(outputs)[None]


@torch.no_grad()
def sdxl_embeds(
    pipe, fragments: Sequence[Fragment | _Break], backtrack: int = COMMA_BACKTRACK
) -> tuple[torch.Tensor, torch.Tensor]:
    """A StableDiffusionXLPipeline's context (1, 77*k, D_L + D_G) and pooled vector (1, D_G) for a parsed prompt.

    Both encoders' penultimate hidden states without the final norm (sgm's FrozenCLIPEmbedder layer_idx and
    FrozenOpenCLIPEmbedder2 "penultimate"; what diffusers takes too); emphasis on each encoder's output apart;
    the pooled vector from bigG's first window."""
    per_encoder, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        outputs = []
        for i, chunk in enumerate(prompt_windows(tokenizer, fragments, backtrack)):
            out = encoder(_ids(chunk, encoder), output_hidden_states=True)
            outputs.append(emphasis(out.hidden_states[-2][0], chunk[1]))
            if i == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        per_encoder.append(torch.cat(outputs))
    assert len({c.shape[0] for c in per_encoder}) == 1, "the two tokenizers chunked the prompt differently"
    assert pooled is not None, "text_encoder_2 gave no text_embeds"
    return torch.cat(per_encoder, dim=-1)[None], pooled


def equalize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, T, D) contexts repeated along the tokens to the least common multiple of their lengths: the
    same cross-attention for each, in the equal shapes diffusers' pipelines require."""
    length = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, length // a.shape[1], 1), b.repeat(1, length // b.shape[1], 1)


# --- diffusers renders from these contexts ------------------------------------------------------------


def render_embeds(
    pipe, context: torch.Tensor, negative: torch.Tensor, seed: int, steps: int, guidance: float, width: int,
    height: int, pooled: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
) -> np.ndarray:  # fmt: skip
    """One diffusers image (uint8 HxWx3, rounded as diffusers_render does) from given contexts, equalized
    first; `pooled` / `negative_pooled` for SDXL."""
    context, negative = equalize(context, negative)
    extra = {} if pooled is None else {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    with torch.no_grad():
        out = pipe(
            prompt_embeds=context,
            negative_prompt_embeds=negative,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **extra,
        )
    return (out.images[0] * 255).round().astype(np.uint8)
