"""The diffusers layout: how its U-Net, VAE and text-encoder names relate to the single-file (CompVis/LDM) names
sdcli's networks use, and a diffusers folder or VAE file read as if it were a single file.

The networks are named after the LDM checkpoints, so reading diffusers weights is renaming, plus three changes of
form: the VAE's mid-block attention is 1x1 convs in LDM and Linear in diffusers, OpenCLIP fuses q/k/v into one
in_proj where transformers keeps three, and OpenCLIP multiplies by text_projection where transformers' Linear
multiplies by its transpose. Renaming goes block by block: a table of module prefixes built from the block
structure (levels, res blocks per level, which levels attend), applied to every tensor name under them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from sdcli.checkpoint import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from sdcli.config import UNetConfig, VAEConfig
from sdcli.errors import CheckpointError
from sdcli.nets.unet import UNet
from sdcli.nets.vae import AutoencoderKL
from sdcli.weights import Cast, Tensors, open_tensors

# LDM ResBlock layer -> diffusers ResnetBlock2D layer (U-Net)
UNET_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
    "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}  # fmt: skip
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL's "text_time"
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}  # fmt: skip


def _renamed(key: str, table: dict[str, str]) -> str | None:
    """`key` with its longest prefix of whole dotted parts that `table` holds replaced; None when it holds none."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:end])
        if head in table:
            return ".".join([table[head], *parts[end:]])
    return None


def _block(table: dict[str, str], ldm: str, diffusers: str, layers: dict[str, str] | None = None) -> None:
    """One module's entry, and its layers' where they are named differently inside it."""
    table[ldm] = diffusers
    for old, new in (layers or {}).items():
        table[f"{ldm}.{old}"] = f"{diffusers}.{new}"


def _unet_table(levels: int, num_res_blocks: int, attention_levels) -> dict[str, str]:
    """LDM module prefix -> diffusers module prefix for a U-Net of that structure.

    The LDM numbers its blocks in one run (input_blocks, output_blocks, downsamplers and upsamplers included);
    diffusers groups them per level, its up_blocks starting from the lowest resolution."""
    table = dict(UNET_TOP)
    index = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        down = f"down_blocks.{level}"
        for j in range(num_res_blocks):
            _block(table, f"input_blocks.{index}.0", f"{down}.resnets.{j}", UNET_RESNET)
            _block(table, f"input_blocks.{index}.1", f"{down}.attentions.{j}")
            index += 1
        if level != levels - 1:
            _block(table, f"input_blocks.{index}.0.op", f"{down}.downsamplers.0.conv")
            index += 1
    _block(table, "middle_block.0", "mid_block.resnets.0", UNET_RESNET)
    _block(table, "middle_block.1", "mid_block.attentions.0")
    _block(table, "middle_block.2", "mid_block.resnets.1", UNET_RESNET)
    for k in range(levels):
        level, up = levels - 1 - k, f"up_blocks.{k}"
        for j in range(num_res_blocks + 1):
            index = k * (num_res_blocks + 1) + j
            _block(table, f"output_blocks.{index}.0", f"{up}.resnets.{j}", UNET_RESNET)
            _block(table, f"output_blocks.{index}.1", f"{up}.attentions.{j}")
        upsampler = 2 if level in attention_levels else 1  # after the transformer, when the level has one
        if level:
            _block(table, f"output_blocks.{index}.{upsampler}.conv", f"{up}.upsamplers.0.conv")
    return table


def _map(keys, table: dict[str, str]) -> dict[str, str]:
    renamed = {key: _renamed(key, table) for key in keys}
    missing = [key for key, new in renamed.items() if new is None]
    if missing:
        raise ValueError(f"no diffusers name for '{missing[0]}'")
    return renamed


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """sdcli U-Net parameter name (the LDM name, prefix stripped) -> diffusers UNet2DConditionModel name, for
    every parameter of the U-Net `cfg` builds; shapes are the same on both sides."""
    with torch.device("meta"):
        keys = UNet(cfg).state_dict().keys()
    return _map(keys, _unet_table(len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_levels))


# LDM ResnetBlock -> diffusers ResnetBlock2D (VAE): only the skip's 1x1 conv is renamed
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_LINEAR = ("q", "k", "v", "proj_out")  # 1x1 convs in LDM, Linear in diffusers


class DiffusersKey(NamedTuple):
    """A diffusers parameter name, and whether diffusers stores it as a Linear weight (C_out, C_in) where the
    LDM has a 1x1 conv's (C_out, C_in, 1, 1)."""

    name: str
    linear: bool = False


def _vae_mid(table: dict[str, str], ldm: str, diffusers: str) -> None:
    _block(table, f"{ldm}.block_1", f"{diffusers}.resnets.0", VAE_RESNET)
    _block(table, f"{ldm}.attn_1", f"{diffusers}.attentions.0", VAE_ATTENTION)
    _block(table, f"{ldm}.block_2", f"{diffusers}.resnets.1", VAE_RESNET)


def _vae_table(levels: int, num_res_blocks: int) -> dict[str, str]:
    """LDM module prefix -> diffusers module prefix for an AutoencoderKL of that structure; the decoder's
    levels are numbered from the lowest resolution in diffusers, from the highest in the LDM."""
    table = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out"):
        table[name] = name
    table |= {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for level in range(levels):
        down, up = f"encoder.down_blocks.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for j in range(num_res_blocks):
            _block(table, f"encoder.down.{level}.block.{j}", f"{down}.resnets.{j}", VAE_RESNET)
        for j in range(num_res_blocks + 1):
            _block(table, f"decoder.up.{level}.block.{j}", f"{up}.resnets.{j}", VAE_RESNET)
        _block(table, f"encoder.down.{level}.downsample.conv", f"{down}.downsamplers.0.conv")
        _block(table, f"decoder.up.{level}.upsample.conv", f"{up}.upsamplers.0.conv")
    _vae_mid(table, "encoder.mid", "encoder.mid_block")
    _vae_mid(table, "decoder.mid", "decoder.mid_block")
    return table


def _is_linear_in_diffusers(ldm_key: str) -> bool:
    parts = ldm_key.split(".")
    return parts[-1] == "weight" and parts[-3:-1] in [["attn_1", name] for name in VAE_LINEAR]


def vae_key_map(cfg: VAEConfig) -> dict[str, DiffusersKey]:
    """sdcli VAE parameter name (the LDM name, prefix stripped) -> its diffusers AutoencoderKL name, for every
    parameter of the VAE `cfg` builds, saying which diffusers stores as a Linear."""
    with torch.device("meta"):
        keys = AutoencoderKL(cfg).state_dict().keys()
    names = _map(keys, _vae_table(len(cfg.channel_mult), cfg.num_res_blocks))
    return {key: DiffusersKey(name, _is_linear_in_diffusers(key)) for key, name in names.items()}


# --- reading diffusers files as single files ------------------------------------------------------------

Entry = tuple[tuple[int, ...], Callable[[Cast], torch.Tensor]]  # a presented tensor: its shape, how to read it
IGNORED_TEXT = {"embeddings.position_ids"}  # an index buffer older transformers saved
# (diffusers name, single-file name) of the VAE's attention in diffusers files saved before 0.14
VAE_DEPRECATED = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
# a bare LDM VAE file may keep its training loss (LPIPS, discriminator) and EMA copies, which no network reads
VAE_UNUSED = ("loss.", "model_ema.")
# A component's weights, the first of these found: full precision first (exact), then the fp16 variant, each
# whole or sharded (an index naming the shards); pickles last, read only when allowed.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.fp16.json", "model.safetensors.index.fp16.json",
    "diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin",
)  # fmt: skip
TEXT_LAYOUTS = {"quick_gelu": "hf_clip", "gelu": "open_clip"}  # OpenAI's CLIP; OpenCLIP's, converted to HF
SGM_TEXT_ROOT = "conditioner.embedders."  # SDXL's text encoders: embedder N, then the layout's own root
SGM_TEXT_LAYOUT = {"hf_clip": "transformer.text_model.", "open_clip": "model."}
HF_TEXT_ROOT = "text_model."  # where transformers keeps a CLIP text model's tower (see _tower)
# transformers CLIPTextModel block layer -> OpenCLIP's (q/k/v, fused by OpenCLIP, apart)
OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1", "self_attn.out_proj": "attn.out_proj", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}  # fmt: skip


def _indices(keys, prefix: str) -> list[int]:
    """The numbers that follow `prefix` in `keys` (the blocks of a ModuleList), sorted."""
    found = {key[len(prefix) :].split(".", 1)[0] for key in keys if key.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def _direct(tensors: Tensors, key: str) -> Callable[[Cast], torch.Tensor]:
    return lambda cast: tensors.fetch(key, cast)


def _reshaped(tensors: Tensors, key: str, shape: tuple[int, ...]) -> Callable[[Cast], torch.Tensor]:
    """A Linear weight read as the 1x1 conv it is in the LDM, in the conv layout the cast asks for."""
    return lambda cast: cast(tensors.fetch(key, Cast(cast.device, cast.dtype)).reshape(shape))


def _transposed(tensors: Tensors, key: str) -> Callable[[Cast], torch.Tensor]:
    return lambda cast: cast(tensors.fetch(key, cast).t())


def _fused(tensors: Tensors, keys: list[str]) -> Callable[[Cast], torch.Tensor]:
    return lambda cast: torch.cat([tensors.fetch(key, cast) for key in keys])


def _placed(tensors: Tensors, table: dict[str, str], what: str) -> dict[str, str]:
    """Single-file name (no network prefix) -> stored name, for every tensor of `tensors`, renamed by `table`;
    a tensor the table does not place is an error, so nothing is dropped unseen."""
    placed = {}
    for key in tensors.shapes:
        name = _renamed(key, table)
        if name is None:
            raise CheckpointError(f"{tensors.path}: unexpected tensor '{key}' for {what}")
        placed[name] = key
    return placed


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {diffusers: ldm for ldm, diffusers in table.items()}


def _unet_entries(tensors: Tensors) -> dict[str, Entry]:
    """A diffusers UNet2DConditionModel's tensors under their single-file names; the block structure (levels,
    res blocks per level, which levels attend) is read off the names themselves."""
    keys = tensors.shapes
    levels = len(_indices(keys, "down_blocks."))
    attention = [level for level in range(levels) if _indices(keys, f"down_blocks.{level}.attentions.")]
    table = _unet_table(levels, len(_indices(keys, "down_blocks.0.resnets.")), attention)
    placed = _placed(tensors, _inverse(table), "a diffusers U-Net")
    return {UNET_PREFIX + name: (keys[key], _direct(tensors, key)) for name, key in placed.items()}


def _vae_entries(tensors: Tensors) -> dict[str, Entry]:
    """A diffusers AutoencoderKL's tensors under their single-file names, its attention Linears as 1x1 convs;
    the structure is read off the names, and the attention's names from before diffusers 0.14 are accepted."""
    keys = tensors.shapes
    levels, blocks = len(_indices(keys, "encoder.down_blocks.")), len(_indices(keys, "encoder.down_blocks.0.resnets."))
    inverse = _inverse(_vae_table(levels, blocks))
    for part in ("encoder", "decoder"):
        for old, new in VAE_DEPRECATED.items():
            inverse[f"{part}.mid_block.attentions.0.{old}"] = f"{part}.mid.attn_1.{new}"
    entries = {}
    for name, key in _placed(tensors, inverse, "a diffusers VAE").items():
        shape = keys[key]
        if _is_linear_in_diffusers(name) and len(shape) == 2:
            entries[VAE_PREFIX + name] = ((*shape, 1, 1), _reshaped(tensors, key, (*shape, 1, 1)))
        else:
            entries[VAE_PREFIX + name] = (shape, _direct(tensors, key))
    return entries


def _tower(tensors: Tensors) -> Tensors:
    """A transformers CLIP text model's tensors named from the tower down: transformers 4 saves the tower under
    `text_model.`, transformers 5 saves a CLIPTextModel's without it."""
    stored = {key.removeprefix(HF_TEXT_ROOT): key for key in tensors.shapes}
    shapes = {name: tensors.shapes[key] for name, key in stored.items()}
    return Tensors(tensors.path, shapes, lambda name, cast: tensors.fetch(stored[name], cast))


def _hf_text_entries(tensors: Tensors, prefix: str) -> dict[str, Entry]:
    """A CLIPTextModel of OpenAI's CLIP: the single file keeps transformers' names, under `prefix` (which ends
    in `text_model.`)."""
    tower = _tower(tensors)
    return {prefix + name: (shape, _direct(tower, name)) for name, shape in tower.shapes.items()}


def _open_clip_table(layers) -> dict[str, str]:
    """transformers CLIP text tower module prefix -> OpenCLIP's, q/k/v apart (OpenCLIP fuses them)."""
    table = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
    for i in layers:
        for hf, open_clip in OPEN_CLIP_BLOCK.items():
            table[f"encoder.layers.{i}.{hf}"] = f"transformer.resblocks.{i}.{open_clip}"
    return table


def _fused_qkv(tower: Tensors, keys: dict[str, tuple[int, ...]], layers, prefix: str) -> dict[str, Entry]:
    """OpenCLIP's in_proj of every block, stacked from transformers' q, k and v, which leave `keys`."""
    entries = {}
    for i in layers:
        for kind in ("weight", "bias"):
            qkv = [f"encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            missing = [key for key in qkv if key not in keys]
            if len(missing) == len(qkv):
                continue  # the loader names the in_proj it lacks
            if missing:
                raise CheckpointError(f"{tower.path}: missing tensor '{missing[0]}'")
            rows, *rest = keys[qkv[0]]
            entries[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = ((3 * rows, *rest), _fused(tower, qkv))
            for key in qkv:
                del keys[key]
    return entries


def _open_clip_text_entries(tensors: Tensors, prefix: str) -> dict[str, Entry]:
    """A CLIPTextModel(WithProjection) converted from OpenCLIP, back under OpenCLIP's names: q/k/v fused into
    in_proj, the positional embedding a bare parameter, text_projection transposed (OpenCLIP computes x @ P,
    a Linear x @ W.T)."""
    tower = _tower(tensors)
    keys = {name: shape for name, shape in tower.shapes.items() if name not in IGNORED_TEXT}
    entries = {}
    position = "embeddings.position_embedding.weight"
    if position in keys:
        entries[prefix + "positional_embedding"] = (keys.pop(position), _direct(tower, position))
    if "text_projection.weight" in keys:
        rows, cols = keys.pop("text_projection.weight")
        entries[prefix + "text_projection"] = ((cols, rows), _transposed(tower, "text_projection.weight"))
    layers = _indices(keys, "encoder.layers.")
    entries |= _fused_qkv(tower, keys, layers, prefix)
    placed = _placed(Tensors(tower.path, keys, tower.fetch), _open_clip_table(layers), "a CLIP text model")
    return entries | {prefix + name: (keys[key], _direct(tower, key)) for name, key in placed.items()}


TEXT_READERS = {"hf_clip": _hf_text_entries, "open_clip": _open_clip_text_entries}


def _view(path: Path, entries: dict[str, Entry]) -> Tensors:
    return Tensors(path, {key: shape for key, (shape, _) in entries.items()}, lambda key, cast: entries[key][1](cast))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    except ValueError:
        raise CheckpointError(f"{path}: not JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _shards(index: Path) -> list[Path]:
    """The files a sharded component's index names, each once, all beside it."""
    weight_map = _read_json(index).get("weight_map")
    names = list(dict.fromkeys(weight_map.values())) if isinstance(weight_map, dict) else None
    if not names or not all(isinstance(name, str) and Path(name).name == name for name in names):
        raise CheckpointError(f"{index}: not a shard index (a weight_map naming files beside it)")
    return [index.parent / name for name in names]


def _component_files(component: Path) -> list[Path]:
    """The weight files of one component folder (unet/, vae/, text_encoder/...): the first of WEIGHT_NAMES."""
    for name in WEIGHT_NAMES:
        path = component / name
        if path.is_file():
            return _shards(path) if name.endswith(".json") else [path]
    raise CheckpointError(f"{component}: no weights (diffusion_pytorch_model.safetensors, model.safetensors, or .fp16)")


def _merged(path: Path, parts: list[Tensors]) -> Tensors:
    """The shards of one component as one table."""
    owner = {key: part for part in parts for key in part.shapes}
    shapes = {key: part.shapes[key] for key, part in owner.items()}
    return Tensors(path, shapes, lambda key, cast: owner[key].fetch(key, cast))


@contextmanager
def _open_component(component: Path, allow_pickle: bool) -> Iterator[Tensors]:
    with ExitStack() as stack:
        files = _component_files(component)
        parts = [stack.enter_context(open_tensors(file, allow_pickle=allow_pickle)) for file in files]
        yield parts[0] if len(parts) == 1 else _merged(component, parts)


def _text_layout(component: Path) -> str:
    """Which text tower a transformers CLIP text model holds, by its activation: OpenAI's CLIP or OpenCLIP's."""
    activation = _read_json(component / "config.json").get("hidden_act")
    if activation not in TEXT_LAYOUTS:
        known = " nor ".join(f"{name!r} ({layout})" for name, layout in TEXT_LAYOUTS.items())
        raise CheckpointError(f"{component}/config.json: hidden_act {activation!r} is neither {known}")
    return TEXT_LAYOUTS[activation]


def is_diffusers_folder(path: Path) -> bool:
    return Path(path, "model_index.json").is_file()


def _parts(folder: Path) -> list[tuple[str, Callable[[Tensors], dict[str, Entry]]]]:
    """The components of a diffusers pipeline folder sdcli reads, each with its reader: the text encoders
    under the names of the family's single file (LDM's cond_stage_model, or SDXL's embedders in order)."""
    if not is_diffusers_folder(folder):
        raise CheckpointError(f"{folder}: cannot read weights: a folder without model_index.json, not a diffusers one")
    index = _read_json(folder / "model_index.json")
    present = {name for name, value in index.items() if isinstance(value, list) and None not in value}
    pipeline = str(index.get("_class_name", "pipeline"))
    if "unet" not in present:
        raise CheckpointError(f"{folder}: a diffusers {pipeline} folder without a U-Net, which sdcli does not render")
    parts = [("unet", _unet_entries), ("vae", _vae_entries)]
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in present]
    for position, name in enumerate(encoders):
        layout = _text_layout(folder / name)
        if pipeline.startswith("StableDiffusionXL"):
            prefix = f"{SGM_TEXT_ROOT}{position}.{SGM_TEXT_LAYOUT[layout]}"
        else:
            prefix = TEXT_PREFIXES[layout]
        parts.append((name, functools.partial(TEXT_READERS[layout], prefix=prefix)))
    return parts


@contextmanager
def open_folder(folder: Path, *, allow_pickle: bool = False) -> Iterator[Tensors]:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder(_2)/) as the tensors of the single
    file its family is released as, so the single-file loader and family detection read it unchanged."""
    folder = Path(folder)
    with ExitStack() as stack:
        entries: dict[str, Entry] = {}
        for name, read in _parts(folder):
            entries |= read(stack.enter_context(_open_component(folder / name, allow_pickle)))
        yield _view(folder, entries)


def weight_files(path: Path) -> list[Path]:
    """The files the weights at `path` are read from: the file itself, or a diffusers folder's component files."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return [file for name, _ in _parts(path) for file in _component_files(path / name)]


def prediction_type(folder: Path) -> str | None:
    """What a diffusers folder's U-Net predicts, as its scheduler config says ("epsilon", "v_prediction")."""
    config = Path(folder, "scheduler", "scheduler_config.json")
    return _read_json(config).get("prediction_type") if config.is_file() else None


def _vae_view(path: Path, tensors: Tensors) -> Tensors:
    """A VAE's tensors under first_stage_model.: a whole checkpoint's (or a VAE saved with that prefix), a bare
    LDM VAE's (training extras dropped) or a diffusers AutoencoderKL's."""
    keys = tensors.shapes
    if any(key.startswith(VAE_PREFIX) for key in keys):
        entries = {key: (shape, _direct(tensors, key)) for key, shape in keys.items() if key.startswith(VAE_PREFIX)}
    elif _indices(keys, "encoder.down_blocks.") or _indices(keys, "decoder.up_blocks."):
        entries = _vae_entries(tensors)
    elif any(key.startswith(("encoder.", "decoder.")) for key in keys):
        entries = {VAE_PREFIX + k: (s, _direct(tensors, k)) for k, s in keys.items() if not k.startswith(VAE_UNUSED)}
    else:
        raise CheckpointError(f"{path}: not a VAE (no encoder or decoder weights, under LDM or diffusers names)")
    return _view(path, entries)


@contextmanager
def open_vae_file(path: Path, *, allow_pickle: bool = False) -> Iterator[Tensors]:
    """A VAE on its own, as tensors under the single-file names (first_stage_model.): a single-file VAE with or
    without that prefix, a diffusers AutoencoderKL file, a folder holding one (vae/ or the pipeline above it)."""
    path = Path(path)
    if path.is_dir():
        opened = _open_component(path / "vae" if (path / "vae").is_dir() else path, allow_pickle)
    else:
        opened = open_tensors(path, allow_pickle=allow_pickle)
    with opened as tensors:
        yield _vae_view(path, tensors)
