"""Tokenizer parity: against transformers' CLIPTokenizer (what diffusers runs) built offline from OpenCLIP's
bundled vocabulary, and against OpenCLIP's own tokenize (what SD 2.x was trained with)."""

import json

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from sdcli.config import TextConfig, load_config
from sdcli.nets.text import Tokenizer

SD1 = load_config("sd15").text[0]
SD2 = load_config("sd21-v").text[0]
START, END = 49406, 49407

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "A Portrait of Ada Lovelace, oil on canvas, by John Singer Sargent; highly detailed (8k), trending on ArtStation.",
    "café crème, naïve façade in Zürich, 日本の桜 🐱🌸 ñandú Ελληνικά",
    "1990s photo, f/1.8, 35mm, ISO-400, 3.14159 #retro @night $100 50% off [red:blue:0.5] {a|b} <lora> a+b=c",
    "  leading and   trailing   spaces\tand\ttabs\nand newlines  ",
    "it's a dog's life, we'll see, they're here, I'm ok, you've done, he'd go",
    "CAPS, MiXeD case, snake_case, kebab-case, dots...and---dashes ~~ ^^ **",
]
LONG = [
    "a " * 75,  # exactly fills the context: not truncated
    "a " * 76,
    "masterpiece, best quality, " * 16 + "a castle on a hill at sunset, volumetric light, 35mm",
]


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """OpenCLIP's BPE written as HuggingFace vocab.json/merges.txt, special tokens under HF's names."""
    bpe = SimpleTokenizer()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder = tmp_path_factory.mktemp("clip_vocab")
    vocab = {hf_names.get(token, token): i for token, i in bpe.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def diffusers_ids(vocab_files, cfg: TextConfig, prompts: list[str]) -> torch.Tensor:
    """What diffusers' pipelines feed the text encoder; SD 2's tokenizer declares '!' its pad token."""
    pad = "<|endoftext|>" if cfg.pad_id == END else "!"
    hf = CLIPTokenizer(vocab=str(vocab_files / "vocab.json"), merges=str(vocab_files / "merges.txt"), pad_token=pad)
    assert hf.pad_token_id == cfg.pad_id
    out = hf(prompts, padding="max_length", max_length=cfg.context_length, truncation=True, return_tensors="pt")
    return out.input_ids


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_matches_diffusers(vocab_files, cfg):
    ids, truncated = Tokenizer(cfg)(PROMPTS + LONG)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS + LONG), cfg.context_length)
    assert torch.equal(ids, diffusers_ids(vocab_files, cfg, PROMPTS + LONG))
    assert truncated == [False] * len(PROMPTS) + [False, True, True]


def test_truncation_keeps_first_tokens_and_end():
    ids, truncated = Tokenizer(SD2)(["a " * 76])
    a = 320  # "a</w>"
    assert truncated == [True]
    assert ids[0].tolist() == [START] + [a] * (SD2.context_length - 2) + [END]


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_exclamation_marks_follow_open_clip(vocab_files, cfg):
    """'!' ending a word is "!</w>" (256), "!!" is 748, "!!!" is 995; diffusers' SD 2 maps each '!' to 0."""
    tail = [cfg.pad_id] * (cfg.context_length - 5)
    ids, _ = Tokenizer(cfg)(["! !! !!!"])
    assert ids[0].tolist() == [START, 256, 748, 995, END] + tail
    theirs = diffusers_ids(vocab_files, cfg, ["! !! !!!"])[0].tolist()
    if cfg.pad_id == END:
        assert theirs == ids[0].tolist()
    else:  # diffusers issue 4153, which we deliberately do not reproduce
        assert theirs[:8] == [START, 0, 0, 0, 0, 0, 0, END]


def test_sd2_equals_open_clip_tokenize():
    """SD 2.x's original conditioning code called open_clip.tokenize: same ids, '!', quotes and entities included."""
    prompts = PROMPTS + LONG + ["hello world!", "“curly” ‘quotes’ &amp; &lt;html&gt; ﬁne ＦＵＬＬ"]
    ids, _ = Tokenizer(SD2)(prompts)
    assert torch.equal(ids, open_clip.tokenize(prompts, context_length=SD2.context_length))
