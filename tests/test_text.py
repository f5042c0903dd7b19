"""TextEncoder parity: against transformers' CLIPTextModel (SD 1.x layout, diffusers' text encoder) and
against OpenCLIP's own TextTransformer (SD 2.x layout), with tiny random weights."""

import pytest
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sdcli.config import TextConfig
from sdcli.errors import CheckpointError
from sdcli.nets.text import TextEncoder, hf_clip_key_shapes, hf_clip_to_open_clip

TINY = dict(width=32, heads=4, layers=3)
SD1 = TextConfig(layout="hf_clip", activation="quick_gelu", output_layer="last", pad_id=49407, **TINY)
SD2 = TextConfig(layout="open_clip", activation="gelu", output_layer="penultimate", pad_id=0, **TINY)
START, END = 49406, 49407


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return (ours - reference).abs().max().item() <= 1e-4 * reference.abs().max().item()


def perturb(module: nn.Module, seed: int) -> nn.Module:
    """Random offsets on every parameter, so norms, biases and embeddings are all non-trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def prompt_ids(cfg: TextConfig, seed: int) -> torch.Tensor:
    """Rows shaped like tokenized prompts (start, words, end, padding), padded with SD 1.x's and SD 2.x's ids."""
    torch.manual_seed(seed)
    rows = []
    for length, pad in ((5, 49407), (12, 0), (cfg.context_length - 2, 0)):
        words = torch.randint(0, START, (length,)).tolist()
        body = [START, *words, END]
        rows.append(body + [pad] * (cfg.context_length - len(body)))
    return torch.tensor(rows)


def encoder_from(state: dict, cfg: TextConfig) -> TextEncoder:
    with torch.device("meta"):
        model = TextEncoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def hf_model(cfg: TextConfig, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        layer_norm_eps=1e-5,
        bos_token_id=START,
        eos_token_id=END,
    )
    return perturb(CLIPTextModel(config), seed + 1)


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1-last", "sd2-penultimate"])
def test_matches_transformers_clip(cfg):
    reference = hf_model(cfg, seed=0)
    model = encoder_from(hf_clip_to_open_clip(reference.state_dict(), cfg), cfg)
    ids = prompt_ids(cfg, seed=2)
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
        # diffusers' SD 2 text encoder keeps all but the last block, then applies final_layer_norm
        if cfg.output_layer == "last":
            expected = out.last_hidden_state
        else:
            expected = reference.final_layer_norm(out.hidden_states[-2])
        ours, _ = model(ids)
    assert ours.shape == (len(ids), cfg.context_length, cfg.width)
    assert close(ours, expected)


def test_penultimate_differs_from_last():
    """The SD 2 output really skips the last block (guards the comparison above against a vacuous pass)."""
    reference = hf_model(SD2, seed=3)
    ids = prompt_ids(SD2, seed=4)
    with torch.no_grad():
        last = reference(ids).last_hidden_state
        ours = encoder_from(hf_clip_to_open_clip(reference.state_dict(), SD2), SD2)(ids)[0]
    assert not close(ours, last)


def test_hf_conversion_fuses_qkv_in_order():
    reference = hf_model(SD1, seed=5)
    state = reference.state_dict()
    ours = hf_clip_to_open_clip(state, SD1)
    w = ours["transformer.resblocks.1.attn.in_proj_weight"]
    assert w.shape == (3 * SD1.width, SD1.width)
    assert torch.equal(w[SD1.width : 2 * SD1.width], state["encoder.layers.1.self_attn.k_proj.weight"])
    v_bias = ours["transformer.resblocks.2.attn.in_proj_bias"][-SD1.width :]
    assert torch.equal(v_bias, state["encoder.layers.2.self_attn.v_proj.bias"])


def test_hf_conversion_ignores_position_ids_only():
    state = dict(hf_model(SD1, seed=6).state_dict())
    state["embeddings.position_ids"] = torch.arange(SD1.context_length)[None]
    with torch.device("meta"):
        names = set(dict(TextEncoder(SD1).named_parameters()))
    assert set(hf_clip_to_open_clip(state, SD1)) == names
    state["encoder.layers.3.mlp.fc1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.3\.mlp\.fc1\.weight"):
        hf_clip_to_open_clip(state, SD1)


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_hf_key_shapes_match_transformers(cfg):
    expected = {name: tuple(t.shape) for name, t in hf_model(cfg, seed=11).state_dict().items()}
    assert hf_clip_key_shapes(cfg) == expected


@pytest.mark.parametrize(
    "missing", ["encoder.layers.2.self_attn.q_proj.bias", "final_layer_norm.weight", "encoder.layers.0.mlp.fc2.weight"]
)
def test_hf_conversion_names_missing_key(missing):
    state = dict(hf_model(SD1, seed=7).state_dict())
    del state[missing]
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        hf_clip_to_open_clip(state, SD1)


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1-last", "sd2-penultimate"])
def test_open_clip_layout_round_trip(cfg):
    """OpenCLIP's own text tower state loads strictly (less its projection) and gives the same hidden states."""
    torch.manual_seed(8)
    reference = TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        act_layer=QuickGELU if cfg.activation == "quick_gelu" else nn.GELU,
        output_tokens=True,
    )
    perturb(reference, seed=9)
    state = reference.state_dict()
    assert "text_projection" in state  # OpenCLIP files carry it; our module does not
    model = encoder_from({k: v for k, v in state.items() if k != "text_projection"}, cfg)
    ids = prompt_ids(cfg, seed=10)
    with torch.no_grad():
        if cfg.output_layer == "last":
            expected = reference(ids)[1]
        else:
            out = reference.forward_intermediates(
                ids, indices=[cfg.layers - 2], normalize_intermediates=True, output_fmt="NLC"
            )
            expected = out["text_intermediates"][0]
        ours, _ = model(ids)
    assert close(ours, expected)
    assert set(dict(model.named_parameters())) | {"text_projection"} == set(state)


def test_meta_construction_holds_no_buffers():
    with torch.device("meta"):
        model = TextEncoder(SD2)
    assert list(model.buffers()) == []
    assert len(model.transformer.resblocks) == SD2.layers  # the unused last block is still a parameter


# SDXL's two encoders: CLIP-L's and bigG's penultimate hidden states without final_layer_norm, and bigG's
# pooled embedding (diffusers' CLIPTextModelWithProjection text_embeds: the last layer, final_layer_norm,
# the first end token, text_projection).
XL_L = TextConfig(layout="hf_clip", activation="quick_gelu", output_layer="penultimate", pad_id=49407,
                  final_norm=False, **TINY)  # fmt: skip
XL_G = TextConfig(layout="open_clip", activation="gelu", output_layer="penultimate", pad_id=0, final_norm=False,
                  pooled=True, **TINY)  # fmt: skip


def test_sdxl_clip_l_context_is_the_raw_penultimate_state():
    reference = hf_model(XL_L, seed=20)
    model = encoder_from(hf_clip_to_open_clip(reference.state_dict(), XL_L), XL_L)
    ids = prompt_ids(XL_L, seed=21)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True).hidden_states[-2]
        ours, pooled = model(ids)
    assert pooled is None and close(ours, expected)
    assert not close(ours, reference.final_layer_norm(expected))  # the norm really is left out


def test_sdxl_bigg_context_and_pooled_equal_transformers_with_projection():
    from transformers import CLIPTextModelWithProjection

    hf = hf_model(XL_G, seed=22)
    hf.config.projection_dim = XL_G.width  # bigG projects 1280 -> 1280
    reference = CLIPTextModelWithProjection(hf.config)
    reference.text_model.load_state_dict(hf.state_dict())
    torch.manual_seed(23)
    projection = torch.randn(XL_G.width, XL_G.width) / XL_G.width**0.5  # open_clip's x @ P
    with torch.no_grad():
        reference.text_projection.weight.copy_(projection.T)  # HF's Linear: x @ W.T
    state = hf_clip_to_open_clip(hf.state_dict(), XL_G) | {"text_projection": projection}
    with torch.device("meta"):
        model = TextEncoder(XL_G)
    model.load_state_dict(state, strict=True, assign=True)
    ids = prompt_ids(XL_G, seed=24)
    with torch.no_grad():
        out = reference.eval()(ids, output_hidden_states=True)
        ours, pooled = model.eval()(ids)
    assert close(ours, out.hidden_states[-2]) and close(pooled, out.text_embeds)
