"""Textual-inversion files and their place in a prompt: every file format, the one-line errors for files that do
not fit, refused pickles, name lookup, and the chunker's and text encoder's handling of embedding vectors (the
renders against diffusers are in test_embedding_parity.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdcli.embeddings import check_fits, read_embedding, used_names
from sdcli.errors import CheckpointError, RequestError
from sdcli.nets.text import TextEncoder
from sdcli.prompt_chunks import CHUNK_TOKENS, Trigger, chunk_prompt
from sdcli.request import FileUse, Request, check_request

from embedding_files import (
    vectors,
    write_a1111_pt,
    write_parameter_dict_pt,
    write_pickle_with_code,
    write_sdxl,
    write_single,
)
from reference import tiny_config, torch_threads, write_random_checkpoint

WIDTH = 32


# --- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "write, suffix",
    [
        (write_a1111_pt, ".pt"),
        (write_parameter_dict_pt, ".pt"),
        (write_single, ".safetensors"),
        (lambda p, v: write_single(p, v, key="<my-token>"), ".safetensors"),
        (lambda p, v: write_single(p, v, key="string_to_param.*"), ".safetensors"),
        (lambda p, v: write_single(p, v, key="<cat-toy>"), ".bin"),  # diffusers' learned_embeds.bin
    ],
    ids=["a1111-pt", "parameter-dict-pt", "emb-params", "diffusers-token", "flat-string-to-param", "diffusers-bin"],
)
def test_one_encoder_formats(tmp_path, write, suffix):
    vecs = vectors(3, WIDTH, 1)
    embedding = read_embedding(write(tmp_path / f"Shiny-Style{suffix}", vecs), allow_pickle=True)
    assert embedding.name == "Shiny-Style" and embedding.count == 3  # the file stem, not the name inside
    assert len(embedding.vectors) == 1 and torch.equal(embedding.vectors[0], vecs)


def test_a_single_vector_may_be_one_dimensional(tmp_path):
    embedding = read_embedding(write_single(tmp_path / "one.safetensors", vectors(1, WIDTH, 2)[0]))
    assert embedding.vectors[0].shape == (1, WIDTH)


def test_sdxl_file_keeps_clip_l_then_clip_g(tmp_path):
    clip_l, clip_g = vectors(2, 32, 3), vectors(2, 48, 4)
    embedding = read_embedding(write_sdxl(tmp_path / "xl.safetensors", clip_l, clip_g))
    assert embedding.count == 2 and [v.shape[1] for v in embedding.vectors] == [32, 48]
    assert torch.equal(embedding.vectors[0], clip_l) and torch.equal(embedding.vectors[1], clip_g)
    assert check_fits(embedding, [32, 48]) is embedding


def test_pickles_need_permission(tmp_path):
    path = write_a1111_pt(tmp_path / "style.pt", vectors(1, WIDTH, 0))
    with pytest.raises(CheckpointError, match="pickle.*--allow-pickle"):
        read_embedding(path)


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = write_pickle_with_code(tmp_path / "evil.pt", WIDTH, marker)
    with pytest.raises(CheckpointError) as caught:
        read_embedding(path, allow_pickle=True)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "posix.system" in message
    assert not marker.exists()


def _bad(tmp_path: Path, tensors: dict) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "tensors, problem",
    [
        ({"emb_params": torch.zeros(0, WIDTH)}, "shape"),
        ({"emb_params": torch.full((2, WIDTH), float("nan"))}, "NaN"),
        ({"emb_params": torch.ones(2, WIDTH, dtype=torch.int32)}, "floating-point"),
        ({"emb_params": torch.zeros(2, 3, WIDTH)}, "shape"),
        ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "not a textual-inversion embedding"),
        ({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 48)}, "vector counts differ"),
    ],
    ids=["empty", "nan", "integers", "3-d", "two-tensors", "counts-differ"],
)
def test_broken_files_are_one_line_errors(tmp_path, tensors, problem):
    path = _bad(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=problem) as caught:
        read_embedding(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_pickle_contents_that_are_no_embedding(tmp_path):
    torch.save(torch.zeros(1, WIDTH), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        read_embedding(tmp_path / "bare.pt", allow_pickle=True)
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH), "x": torch.zeros(1, WIDTH)}}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="2 entries"):
        read_embedding(tmp_path / "two.pt", allow_pickle=True)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        read_embedding(tmp_path / "junk.pt", allow_pickle=True)


@pytest.mark.parametrize(
    "widths, count, problem",
    [
        ([768], 1, r"width 1024, but this model's text encoders take 768 \(an embedding for another model family"),
        ([768, 1280], 1, "one-encoder.*this model has 2 text encoder"),
        ([1024], 80, "80 vectors; a prompt chunk holds 75"),
    ],
    ids=["wrong-width", "sd1-on-sdxl", "too-long"],
)
def test_embeddings_that_do_not_fit_the_model(tmp_path, widths, count, problem):
    embedding = read_embedding(write_single(tmp_path / "e.safetensors", vectors(count, 1024, 0)))
    with pytest.raises(CheckpointError, match=problem):
        check_fits(embedding, widths)


def test_an_sdxl_embedding_on_a_one_encoder_model(tmp_path):
    embedding = read_embedding(write_sdxl(tmp_path / "xl.safetensors", vectors(1, 768, 0), vectors(1, 1280, 1)))
    with pytest.raises(CheckpointError, match=r"an SDXL embedding \(clip_l, clip_g\) of width 768 \+ 1280"):
        check_fits(embedding, [768])


# --- names ------------------------------------------------------------------------------------------------


def test_used_names_match_whole_clip_words():
    available = {"myemb": Path("/e/myemb.pt"), "my-style": Path("/e/my-style.pt"), "emb": Path("/e/emb.pt")}
    assert used_names(["a (MyEmb:1.2), photo"], available) == [Path("/e/myemb.pt")]
    assert used_names(["by my - style", "negative"], available) == [Path("/e/my-style.pt")]
    assert used_names(["emb2 and myembx"], available) == [Path("/e/emb.pt")]  # a digit is a word of its own
    assert used_names(["nothing here"], available) == []


# --- chunks -----------------------------------------------------------------------------------------------


class Vocab:
    """One token per word (a fresh id for each new word), ',' its own token; ids stay below 1000."""

    start_id, end_id, pad_id, comma_id = 1, 2, 0, 3

    def __init__(self):
        self.ids: dict[str, int] = {",": 3}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, 10 + len(self.ids)) for w in text.lower().replace(",", " , ").split()]


TRIGGER = Trigger("shiny", (1000, 1001, 1002))


def test_an_embedding_takes_one_position_per_vector_and_its_weight():
    vocab = Vocab()
    (chunk,), _ = chunk_prompt("a (shiny:1.3) cat", vocab, "a1111", [TRIGGER])
    a, cat = vocab.encode("a cat")
    assert chunk.ids[:7] == (1, a, 1000, 1001, 1002, cat, 2)
    assert chunk.weights[:7] == (1.0, 1.0, 1.3, 1.3, 1.3, 1.0, 1.0)
    assert chunk.pool_at == 6  # the end token, not the largest id


def test_an_embedding_that_does_not_fit_opens_the_next_chunk():
    vocab = Vocab()
    first, second = chunk_prompt("w " * 73 + "shiny end", vocab, "a1111", [TRIGGER])[0]
    assert first.ids[74:] == (2, 0, 0) and all(i < 1000 for i in first.ids)
    assert second.ids[1:6] == (1000, 1001, 1002, vocab.encode("end")[0], 2)
    (exact,), _ = chunk_prompt("w " * 72 + "shiny", vocab, "a1111", [TRIGGER])
    assert exact.ids[73:] == (1000, 1001, 1002, 2) and len(exact.ids) == CHUNK_TOKENS + 2


def test_longest_name_first_and_no_match_across_fragments():
    vocab = Vocab()
    short, long = Trigger("shiny", (1000,)), Trigger("shiny style", (1001, 1002))
    (chunk,), _ = chunk_prompt("shiny style shiny", vocab, "a1111", [short, long])
    assert chunk.ids[1:5] == (1001, 1002, 1000, 2)
    (chunk,), _ = chunk_prompt("shiny (style)", vocab, "a1111", [long])  # two fragments: A1111 matches within one
    assert 1001 not in chunk.ids


def test_plain_spells_out_names_as_diffusers_does():
    vocab = Vocab()
    spell = lambda text, triggers=(TRIGGER,): chunk_prompt(text, vocab, "plain", triggers)[0][0].ids  # noqa: E731
    a = vocab.encode("a")[0]
    assert spell("a shiny")[1:6] == (a, 1000, 1001, 1002, 2)
    assert spell("a SHINY")[1:4] == (a, 1000, 2)  # only the exact case is spelled out; any case is a token
    assert spell("ashinya")[1:7] == (a, 1000, 1001, 1002, a, 2)  # inside a word too
    mixed = Trigger("Shiny", (1000, 1001))
    assert spell("a Shiny", (mixed,))[1:4] == (a, 1000, 2)  # a name with capitals is never spelled out
    (chunk,), _ = chunk_prompt("a shiny", vocab, "plain", [TRIGGER])
    assert chunk.pool_at == 4  # the largest id, as transformers' legacy CLIP pooling picks


# --- the text encoder ------------------------------------------------------------------------------------


def test_extra_vectors_stand_where_token_vectors_would():
    """Ids past the vocabulary take the row's extra vectors before the positions are added: the same as the
    vocabulary holding them."""
    cfg = tiny_config("sd1").text[0]
    encoder = TextEncoder(cfg)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    extra = vectors(2, cfg.width, 9)[None]  # (1, 2, width)
    ids = torch.tensor([[49406, 320, cfg.vocab_size + 1, cfg.vocab_size, 49407, 49407]])
    got, _ = encoder(ids, extra=extra)
    same = copy.deepcopy(encoder)
    with torch.no_grad():
        same.token_embedding.weight[[5, 6]] = extra[0]
    want, _ = same(torch.tensor([[49406, 320, 6, 5, 49407, 49407]]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- the pipeline -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from sdcli.pipeline import Pipeline

    config = tiny_config("sd1")
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("ti-unit") / "tiny.safetensors",
                                   dtype=torch.float32, seed=1)  # fmt: skip
    with torch_threads(1):
        return Pipeline.load(config, path, device="cpu", dtype="fp32")


def _request(*uses: FileUse, prompt: str = "a shiny cat") -> Request:
    return Request(prompt, "", 1, 2, 7.5, "euler", 64, 64, embeddings=uses)


def test_pipeline_reads_each_file_once(sd1, tmp_path):
    path = write_single(tmp_path / "shiny.safetensors", vectors(2, WIDTH, 0))
    (first,) = sd1.embeddings_of(_request(FileUse(str(path))))
    path.unlink()  # read already: the model keeps what it read
    (again,) = sd1.embeddings_of(_request(FileUse(str(path))))
    assert again is first


def test_pipeline_request_errors(sd1, tmp_path):
    one = write_single(tmp_path / "Shiny.safetensors", vectors(1, WIDTH, 0))
    (tmp_path / "other").mkdir()
    two = write_single(tmp_path / "other" / "shiny.safetensors", vectors(1, WIDTH, 1))
    with pytest.raises(RequestError, match="takes no weight"):
        check_request(_request(FileUse(str(one), weight=1.5)), sd1.config)
    with pytest.raises(RequestError, match="two embedding files are named 'shiny'"):
        sd1.embeddings_of(_request(FileUse(str(one)), FileUse(str(two))))


def test_pipeline_refuses_files_that_do_not_fit(sd1, tmp_path):
    wide = write_single(tmp_path / "wide.safetensors", vectors(1, 768, 0))
    with pytest.raises(CheckpointError, match="wide.safetensors: vectors of width 768"), torch_threads(1):
        sd1.generate([_request(FileUse(str(wide)), prompt="a wide cat")])
    pt = write_a1111_pt(tmp_path / "shiny.pt", vectors(1, WIDTH, 0))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        sd1.embeddings_of(_request(FileUse(str(pt))))


def test_each_prompt_of_a_batch_reads_its_own_embeddings(sd1, tmp_path):
    shiny = write_single(tmp_path / "shiny.safetensors", vectors(2, WIDTH, 3))
    glow = write_single(tmp_path / "glow.safetensors", vectors(1, WIDTH, 4))
    requests = [
        _request(FileUse(str(shiny)), prompt="a shiny cat"),
        _request(FileUse(str(glow)), FileUse(str(shiny)), prompt="a glow cat"),
        _request(prompt="a shiny cat"),  # the name as plain words
    ]
    prompts = [r.prompt for r in requests]
    with torch_threads(1):
        together = sd1.conditioning(prompts, requests).rows()
        alone = [sd1.conditioning([r.prompt], [r]).rows()[0] for r in requests]
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-2
