"""LoRA merging against diffusers: the same random-weight tiny model and the same LoRA files (tests/lora_files.py,
kohya-ss and diffusers/PEFT layouts, LoCon included), loaded by diffusers' load_lora_weights and fused (or run as
weighted adapters), and merged by sdcli's Merger; the renders must agree (PSNR >= 40 dB) while each differs from
the render without the LoRA by far more (PSNR < 30 dB), so a merge that did nothing, or the wrong thing, fails.

Besides pixels, the summed squared weight change of each network (U-Net, each text encoder) is compared: it does
not depend on names or on how q/k/v are stored, and a scale wrong on a few layers (an alpha, an alpha pattern)
shows in it even where a picture would barely move."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sdcli.lora import Merger, read_lora
from sdcli.pipeline import Pipeline
from sdcli.request import FileUse, Request

from lora_files import write_kohya_lora, write_peft_lora
from reference import (
    diffusers_pipeline,
    diffusers_render,
    diffusers_xl_pipeline,
    psnr,
    tiny_config,
    torch_threads,
    write_random_checkpoint,
)

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, highly detailed", "blurry"
SEED, STEPS, GUIDANCE, SIZE = 7, 4, 5.0, 64
SAME, VISIBLE = 40.0, 30.0  # dB: parity at or above SAME; a LoRA's effect on the picture below VISIBLE
ENERGY_RTOL = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@dataclasses.dataclass
class Model:
    """One tiny model as sdcli and diffusers load it, with the diffusers networks' weights as loaded (to undo
    whatever a LoRA test leaves behind exactly) and both base renders."""

    family: str
    config: object
    checkpoint: Path
    folder: Path
    ours: Pipeline
    theirs: object
    snapshot: dict[str, dict[str, torch.Tensor]]
    base_ours: np.ndarray
    base_theirs: np.ndarray

    def networks(self) -> dict[str, torch.nn.Module]:
        names = ("unet", "text_encoder", "text_encoder_2")
        return {n: getattr(self.theirs, n) for n in names if getattr(self.theirs, n, None) is not None}


def render_ours(pipe: Pipeline) -> np.ndarray:
    request = Request(PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, "euler", SIZE, SIZE)
    return np.asarray(pipe.generate([request])[0])


def render_theirs(pipe) -> np.ndarray:
    return diffusers_render(pipe, PROMPT, NEGATIVE, SEED, STEPS, GUIDANCE, SIZE, SIZE)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> Model, each built on first use."""
    built: dict[str, Model] = {}

    def get(family: str) -> Model:
        if family not in built:
            config = tiny_config(family)
            folder = tmp_path_factory.mktemp(f"lora-{family}")
            path = write_random_checkpoint(config, folder / "tiny.safetensors", dtype=torch.float32, seed=3)
            with torch_threads(1):
                ours = Pipeline.load(config, path, device="cpu", dtype="fp32")
                theirs = (diffusers_xl_pipeline if family == "sdxl" else diffusers_pipeline)(config, path, "euler")
                model = Model(family, config, path, folder, ours, theirs, {}, render_ours(ours), render_theirs(theirs))
            model.snapshot = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in model.networks().items()}
            assert psnr(model.base_ours, model.base_theirs) >= SAME  # the base models agree before any LoRA
            built[family] = model
        return built[family]

    return get


# --- the two sides ---------------------------------------------------------------------------------------


def _squared_change(now: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
    """sum((W - W0)^2) over the weights of `before`; peft's wrapped layers keep the weight as base_layer.*."""
    plain = {k.replace(".base_layer.", "."): v for k, v in now.items() if ".lora_" not in k}
    return sum(float(((plain[k].double() - v.double()) ** 2).sum()) for k, v in before.items())


def with_diffusers(model: Model, uses: list[tuple[Path, float]], *, fuse: bool) -> tuple[np.ndarray, list[float]]:
    """diffusers' render with the LoRAs, and the squared weight change of each network when fused. One LoRA
    `fuse`d: load_lora_weights then fuse_lora(lora_scale=w); otherwise the adapters run unfused at
    set_adapters' weights. Afterwards the pipeline is the loaded one again, bit for bit."""
    pipe = model.theirs
    names = [f"lora{i}" for i in range(len(uses))]
    try:
        for name, (path, _) in zip(names, uses, strict=True):
            pipe.load_lora_weights(str(path), adapter_name=name)
        if fuse:
            assert len(uses) == 1
            pipe.fuse_lora(lora_scale=uses[0][1], adapter_names=names)
            changes = [_squared_change(m.state_dict(), model.snapshot[n]) for n, m in model.networks().items()]
        else:
            pipe.set_adapters(names, [w for _, w in uses])
            changes = []
        return render_theirs(pipe), changes
    finally:
        if fuse:
            pipe.unfuse_lora()
        pipe.unload_lora_weights()
        for n, m in model.networks().items():
            m.load_state_dict(model.snapshot[n], strict=True)


def with_sdcli(model: Model, uses: list[tuple[Path, float]]) -> tuple[np.ndarray, list[float]]:
    """sdcli's render with the LoRAs merged, and the squared weight change of each network; then unmerged."""
    files = {str(path): read_lora(path) for path, _ in uses}
    merger = Merger(model.config, model.ours.nets, keep_originals=True)
    merger.apply([FileUse(str(path), weight) for path, weight in uses], files)
    try:
        changes = [0.0] * len(merger.params)
        for (net, name), original in merger.originals.items():
            changes[net] += float(((merger.params[net][name].double() - original.double()) ** 2).sum())
        return render_ours(model.ours), changes
    finally:
        merger.apply([], files)


def assert_parity(model: Model, uses: list[tuple[Path, float]], *, fuse: bool = True) -> float:
    expected, their_changes = with_diffusers(model, uses, fuse=fuse)
    got, our_changes = with_sdcli(model, uses)
    assert expected.std() > 5, "degenerate reference image: the comparison would prove nothing"
    # the LoRA changes the picture a lot, on both sides: a merge that does nothing cannot pass
    assert psnr(expected, model.base_theirs) < VISIBLE
    assert psnr(got, model.base_ours) < VISIBLE
    if fuse:
        assert len(our_changes) == len(their_changes)
        for ours, theirs in zip(our_changes, their_changes, strict=True):
            assert theirs > 0
            assert ours == pytest.approx(theirs, rel=ENERGY_RTOL)
    value = psnr(got, expected)
    assert value >= SAME, f"{value:.1f} dB"
    return value


# --- renders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_lora_matches_diffusers(models, family):
    model = models(family)
    path = write_kohya_lora(model.theirs, model.folder / "kohya.safetensors", checkpoint=model.checkpoint, seed=1)
    assert_parity(model, [(path, 0.8)])


def test_kohya_lora_without_alpha_matches_diffusers(models):
    """No `.alpha` tensors: the scale is 1 (alpha = rank) on both sides."""
    model = models("sd1")
    path = write_kohya_lora(model.theirs, model.folder / "no-alpha.safetensors", alpha=None, strength=0.25, seed=13)
    assert_parity(model, [(path, 1.0)])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_locon_matches_diffusers(models, family):
    """LoCon: the ResnetBlock2D, Downsample2D and Upsample2D convolutions too (3x3 down, 1x1 up, at their own
    rank and alpha), and time_emb_proj / conv_shortcut at the linear rank."""
    model = models(family)
    path = write_kohya_lora(model.theirs, model.folder / "locon.safetensors", checkpoint=model.checkpoint,
                            convs=True, seed=2)  # fmt: skip
    assert_parity(model, [(path, 1.0)])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_lora_matches_diffusers(models, family):
    """lora_alpha 8 on rank 4 (scale 2, from the file's lora_adapter_metadata), with an alpha pattern and a
    rank pattern for some U-Net layers."""
    model = models(family)
    path = write_peft_lora(model.theirs, model.folder / "peft.safetensors", rank=4, alpha=8.0,
                           alpha_pattern={"attn2.to_k": 1.0}, rank_pattern={"to_v": 2}, seed=3)  # fmt: skip
    assert_parity(model, [(path, 0.9)])


def test_peft_lora_with_convs_matches_diffusers(models):
    model = models("sd1")
    path = write_peft_lora(model.theirs, model.folder / "peft-convs.safetensors", convs=True, seed=4)
    assert_parity(model, [(path, 1.0)])


def test_two_loras_at_their_weights_match_diffusers(models):
    """A kohya LoRA at 0.7 and a PEFT one at -0.4 together (diffusers: two adapters, set_adapters' weights)."""
    model = models("sd1")
    a = write_kohya_lora(model.theirs, model.folder / "a.safetensors", seed=5)
    b = write_peft_lora(model.theirs, model.folder / "b.safetensors", seed=6)
    assert_parity(model, [(a, 0.7), (b, -0.4)], fuse=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weight_zero_is_the_base_render_bit_for_bit(models, family):
    model = models(family)
    path = write_kohya_lora(model.theirs, model.folder / "zero.safetensors", checkpoint=model.checkpoint,
                            convs=True, seed=7)  # fmt: skip
    got, _ = with_sdcli(model, [(path, 0.0)])
    assert np.array_equal(got, model.base_ours)


def test_the_parity_check_can_fail(models):
    """The comparison tells weights apart: sdcli at 0.8 against diffusers at 0.4 is far below parity, as is
    either against the render without the LoRA."""
    model = models("sd1")
    path = write_kohya_lora(model.theirs, model.folder / "fail.safetensors", seed=8)
    ours, _ = with_sdcli(model, [(path, 0.8)])
    theirs, _ = with_diffusers(model, [(path, 0.4)], fuse=True)
    assert psnr(ours, theirs) < VISIBLE
    assert psnr(ours, model.base_ours) < VISIBLE
    assert psnr(theirs, model.base_theirs) < VISIBLE


# --- merge and unmerge -------------------------------------------------------------------------------------


def test_a_hundred_set_changes_restore_every_weight_bit_for_bit(models):
    """[A], [B], [A, B] a hundred times over, then no LoRA: every U-Net and text encoder parameter is the loaded
    one to the last bit, and the copies kept for that are taken once (they do not grow with the sets)."""
    model = models("sd1")
    a = write_kohya_lora(model.theirs, model.folder / "cycle-a.safetensors", convs=True, seed=9)
    b = write_peft_lora(model.theirs, model.folder / "cycle-b.safetensors", seed=10)
    nets = [model.ours.nets.unet, *model.ours.nets.text]
    before = [{k: v.detach().clone() for k, v in net.named_parameters()} for net in nets]
    files = {str(p): read_lora(p) for p in (a, b)}
    merger = Merger(model.config, model.ours.nets, keep_originals=True)
    sets = [[FileUse(str(a), 0.7)], [FileUse(str(b), -0.4)], [FileUse(str(a), 0.7), FileUse(str(b), -0.4)]]
    merger.apply(sets[2], files)
    held = merger.original_bytes()
    assert held > 0
    changed = sum(not torch.equal(p, before[i][k]) for i, net in enumerate(nets) for k, p in net.named_parameters())
    assert changed == len(merger.originals)  # the copies are of exactly the weights the set changes
    for _ in range(100):
        for uses in sets:
            merger.apply(uses, files)
    assert merger.original_bytes() == held
    merger.apply([], files)
    for i, net in enumerate(nets):
        for name, param in net.named_parameters():
            assert torch.equal(param, before[i][name]), name
    assert np.array_equal(render_ours(model.ours), model.base_ours)


# --- other spellings diffusers writes ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_training_script_layout_matches_diffusers(models, family):
    """What diffusers' own LoRA training scripts save (convert_state_dict_to_diffusers of the peft state dict):
    attention layers as `.lora.down.weight`, text layers as `.lora_linear_layer.down.weight`."""
    model = models(family)
    path = write_peft_lora(model.theirs, model.folder / "diffusers.safetensors", layout="diffusers", seed=11)
    assert_parity(model, [(path, 1.0)])


def test_peft_lora_saved_with_transformers_5_matches_diffusers(models):
    """transformers 5 dropped CLIPTextModel's `text_model.` wrapper, so diffusers now saves its text layers as
    `text_encoder.encoder.layers.N...`; diffusers loads both spellings."""
    model = models("sd1")
    path = write_peft_lora(model.theirs, model.folder / "tf5.safetensors", text_model_prefix=False, seed=12)
    assert_parity(model, [(path, 1.0)])
