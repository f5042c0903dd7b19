"""Textual-inversion embeddings against diffusers' load_textual_inversion, on tiny random SD 1.x and SDXL models.

diffusers adds an embedding's name (and name_1, name_2, ... for further vectors) to its tokenizer and its vectors
to the token embedding; for short prompts without emphasis that is exactly A1111's placement, so both syntaxes
render as diffusers does from the text, with one exception: transformers' CLIP under the hub's legacy SDXL config
pools bigG at the largest token id, which an added token outranks, where A1111 (sgm) pools at the end token. The
A1111 renders of SDXL therefore come from diffusers with text_encoder_2 told its real end token; the plain ones
from diffusers as it is. Emphasis and chunk boundaries come from the A1111 oracle (tests/a1111_oracle.py) on
diffusers' encoders, fed the prompt as fragments by hand."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import a1111_oracle as oracle
import numpy as np
import pytest
import torch
from a1111_oracle import BREAK

from sdcli.config import ModelConfig
from sdcli.request import FileUse, Request

from embedding_files import vectors, write_a1111_pt, write_sdxl, write_single
from reference import (
    diffusers_pipeline,
    diffusers_render,
    diffusers_xl_pipeline,
    psnr,
    tiny_config,
    torch_threads,
    write_random_checkpoint,
)

SEED, STEPS, WIDTH, HEIGHT, SAMPLER = 11, 3, 64, 64, "euler"
GUIDANCE = {"sd1": 7.5, "sdxl": 5.0}
PROMPT = "a photo of {} on a wooden table, soft light"
NEGATIVE = "blurry, lowres"
NAMES = {"sd1": ("tiglow", "tistyle"), "sdxl": ("xlglow", "xlstyle")}  # 1 and 3 vectors
COUNTS = (1, 3)


@dataclass
class Model:
    family: str
    config: ModelConfig
    theirs: object  # diffusers' pipeline, with the embeddings loaded
    ours: object  # sdcli's Pipeline
    files: dict[str, Path]  # embedding name -> file
    plain_renders: dict = field(default_factory=dict)  # (prompt, negative) -> sdcli's render without embeddings


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _write_embeddings(family: str, config: ModelConfig, folder: Path) -> dict[str, Path]:
    """SD 1.x: the 1-vector one as A1111's .pt, the 3-vector one as a kohya .safetensors; SDXL: clip_l/clip_g."""
    widths = [t.width for t in config.text]
    files = {}
    for seed, (name, count) in enumerate(zip(NAMES[family], COUNTS, strict=True)):
        if family == "sdxl":
            files[name] = write_sdxl(folder / f"{name}.safetensors", *(vectors(count, w, seed * 2 + i)
                                                                        for i, w in enumerate(widths)))  # fmt: skip
        elif count == 1:
            files[name] = write_a1111_pt(folder / f"{name}.pt", vectors(count, widths[0], seed))
        else:
            files[name] = write_single(folder / f"{name}.safetensors", vectors(count, widths[0], seed))
    return files


def _load_into_diffusers(pipe, family: str, files: dict[str, Path]) -> None:
    """diffusers' own loader, once per text encoder for SDXL (its documented way for clip_l/clip_g files)."""
    from safetensors.torch import load_file

    for name, path in files.items():
        if family == "sdxl":
            state = load_file(str(path))
            pipe.load_textual_inversion(state["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)  # fmt: skip
            pipe.load_textual_inversion(state["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)  # fmt: skip
        else:
            pipe.load_textual_inversion(str(path), token=name)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request, tmp_path_factory) -> Model:
    from sdcli.pipeline import Pipeline

    family = request.param
    config = tiny_config(family)
    folder = tmp_path_factory.mktemp(f"ti-{family}")
    path = write_random_checkpoint(config, folder / "tiny.safetensors", dtype=torch.float32, seed=5)
    files = _write_embeddings(family, config, folder)
    with torch_threads(1):
        theirs = (diffusers_xl_pipeline if family == "sdxl" else diffusers_pipeline)(config, path, SAMPLER)
        _load_into_diffusers(theirs, family, files)
        ours = Pipeline.load(config, path, device="cpu", dtype="fp32", allow_pickle=True)  # the A1111 .pt
    return Model(family, config, theirs, ours, files)


def request(model: Model, prompt: str, negative: str, names, **fields) -> Request:
    uses = tuple(FileUse(str(model.files[n])) for n in names)
    return Request(prompt, negative, SEED, STEPS, GUIDANCE[model.family], SAMPLER, WIDTH, HEIGHT, embeddings=uses,
                   **fields)  # fmt: skip


def render_ours(model: Model, prompt: str, negative: str, names, **fields) -> np.ndarray:
    return np.asarray(model.ours.generate([request(model, prompt, negative, names, **fields)])[0])


@contextlib.contextmanager
def pooling_at_the_end_token(model: Model):
    """diffusers' SDXL with bigG pooling at the first end token, as A1111 (sgm) does, rather than at the largest
    id (transformers' legacy eos_token_id 2 path, which picks an added embedding token)."""
    if model.family != "sdxl":
        yield
        return
    clip = next(m for m in model.theirs.text_encoder_2.modules() if hasattr(m, "eos_token_id"))
    before, clip.eos_token_id = clip.eos_token_id, model.theirs.tokenizer_2.eos_token_id
    try:
        yield
    finally:
        clip.eos_token_id = before


def render_theirs(model: Model, prompt: str, negative: str, *, a1111: bool) -> np.ndarray:
    with pooling_at_the_end_token(model) if a1111 else contextlib.nullcontext():
        return diffusers_render(model.theirs, prompt, negative, SEED, STEPS, GUIDANCE[model.family], WIDTH, HEIGHT)


def assert_same_picture(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape == (HEIGHT, WIDTH, 3)
    assert want.std() > 5, "degenerate reference image: the comparison would prove nothing"
    value = psnr(got, want)
    assert value >= 40
    return value


def assert_changes(got: np.ndarray, without: np.ndarray) -> None:
    """The embedding visibly matters, so a render that ignored it would fail the comparison above."""
    assert psnr(got, without) < 30


@pytest.mark.parametrize("syntax", ["a1111", "plain"])
@pytest.mark.parametrize("place", ["prompt", "negative"])
@pytest.mark.parametrize("which", [0, 1], ids=["1-vector", "3-vector"])
def test_embedding_renders_as_diffusers(model, syntax, place, which):
    name = NAMES[model.family][which]
    prompt = PROMPT.format(name) if place == "prompt" else PROMPT.format("a cat")
    negative = f"{NEGATIVE}, {name}" if place == "negative" else NEGATIVE
    got = render_ours(model, prompt, negative, [name], prompt_syntax=syntax)
    assert_same_picture(got, render_theirs(model, prompt, negative, a1111=syntax == "a1111"))
    if (prompt, negative) not in model.plain_renders:  # the same in both syntaxes: no brackets, under 75 tokens
        model.plain_renders[prompt, negative] = render_ours(model, prompt, negative, [])
    assert_changes(got, model.plain_renders[prompt, negative])


def test_sdxl_plain_pools_where_diffusers_does(model):
    """The plain syntax keeps diffusers' pooling at the added token; A1111's pools at the end token."""
    if model.family != "sdxl":
        pytest.skip("only bigG pools")
    name = NAMES["sdxl"][1]
    prompt = PROMPT.format(name)
    got = {s: model.ours.conditioning([prompt], [request(model, prompt, "", [name], prompt_syntax=s)]).vector
           for s in ("plain", "a1111")}  # fmt: skip
    with torch.no_grad():
        want = model.theirs.encode_prompt(prompt, device=torch.device("cpu"), do_classifier_free_guidance=False)[2]
        with pooling_at_the_end_token(model):
            want_a1111 = model.theirs.encode_prompt(prompt, device=torch.device("cpu"),
                                                    do_classifier_free_guidance=False)[2]  # fmt: skip
    width = want.shape[1]
    torch.testing.assert_close(got["plain"][:, :width], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["a1111"][:, :width], want_a1111, rtol=0, atol=1e-5)
    assert (want - want_a1111).abs().max() > 1e-2


PLAIN_CASES = {  # diffusers' quirks: case, names back to back, inside words, its name_k tokens typed out
    "upper": lambda n: f"{n.upper()} photo",
    "twice": lambda n: f"a {n}{n} b",
    "in-words": lambda n: f"x{n}x and {n.upper()}",
    "spelled": lambda n: f"{n}, {n}_1 and {n}_2",
}


@pytest.mark.parametrize("case", PLAIN_CASES)
def test_plain_reads_names_as_diffusers_tokenizer_does(model, case):
    name = NAMES[model.family][1]
    prompt = PLAIN_CASES[case](name)
    got = model.ours.conditioning([prompt], [request(model, prompt, "", [name], prompt_syntax="plain")]).context
    with torch.no_grad():
        want = model.theirs.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)[0]  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def oracle_context(model: Model, fragments) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A1111's conditioning for hand-parsed fragments, each embedding name spelled out as diffusers' tokens."""
    if model.family == "sdxl":
        with pooling_at_the_end_token(model):
            return oracle.sdxl_embeds(model.theirs, fragments)
    return oracle.sd_embeds(model.theirs, fragments), None


def spelled(model: Model, name: str) -> str:
    return model.theirs.maybe_convert_prompt(name, model.theirs.tokenizer)


def test_emphasis_weighs_the_embedding_positions(model):
    """(name:1.3): the embedding's three positions carry the weight, then the chunk's mean is restored."""
    name = NAMES[model.family][1]
    prompt = f"a photo of ({name}:1.3), soft light"
    fragments = [("a photo of ", 1.0), (spelled(model, name), 1.3), (", soft light", 1.0)]
    got = model.ours.conditioning([prompt], [request(model, prompt, "", [name])])
    want, pooled = oracle_context(model, fragments)
    flat, _ = oracle_context(model, [(f[0], 1.0) for f in fragments])
    torch.testing.assert_close(got.context, want, rtol=0, atol=1e-3)
    assert (want - flat).abs().max() > 1e-2  # the weight matters
    negative, negative_pooled = oracle_context(model, [(NEGATIVE, 1.0)])
    want_image = oracle.render_embeds(model.theirs, want, negative, SEED, STEPS, GUIDANCE[model.family], WIDTH,
                                      HEIGHT, pooled=pooled, negative_pooled=negative_pooled)  # fmt: skip
    assert_same_picture(render_ours(model, prompt, NEGATIVE, [name]), want_image)


def test_an_embedding_that_does_not_fit_moves_whole_to_the_next_chunk(model):
    """73 tokens, then a 3-vector embedding: 76 > 75, so the first chunk closes at 73 and the embedding opens the
    second, as if a BREAK stood before it."""
    name = NAMES[model.family][1]
    words = "tree " * 73
    prompt = f"{words}{name} at dusk"
    got = model.ours.conditioning([prompt], [request(model, prompt, "", [name])]).context
    want, _ = oracle_context(model, [(words, 1.0), BREAK, (spelled(model, name) + " at dusk", 1.0)])
    assert got.shape == want.shape == (1, 154, sum(t.width for t in model.config.text))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    fitting = f"{'tree ' * 72}{name} at dusk"  # 72 + 3 = 75: it stays
    got = model.ours.conditioning([fitting], [request(model, fitting, "", [name])]).context
    want, _ = oracle_context(model, [("tree " * 72 + spelled(model, name), 1.0), BREAK, (" at dusk", 1.0)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_listed_embedding_whose_name_is_absent_changes_nothing(model):
    name = NAMES[model.family][0]
    prompt = PROMPT.format("a cat")
    with_file = model.ours.conditioning([prompt], [request(model, prompt, "", [name])]).context
    without = model.ours.conditioning([prompt], [request(model, prompt, "", [])]).context
    assert torch.equal(with_file, without)
