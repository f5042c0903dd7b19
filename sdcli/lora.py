"""LoRA files, resolved against the loaded networks' own modules and merged into their weights.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") stores, per adapted layer, a
down projection (rank r rows) and an up projection; the layer's weight becomes W + weight * alpha/r * up @ down.
Files name the layer the way their trainer saw the model:
- kohya-ss: `lora_unet_<module with . as _>`, `lora_te_` (`lora_te1_`/`lora_te2_` for SDXL's two encoders),
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; SD 1.x/2.x U-Net modules under diffusers' names, SDXL's
  under the original (sgm) names; text encoders under HuggingFace CLIP names. LoCon adds the convolutions
  (3x3 down, 1x1 up).
- diffusers/PEFT: `unet.<module>`, `text_encoder.`, `text_encoder_2.`, `.lora_A.weight`/`.lora_B.weight`,
  alpha in the file's `lora_adapter_metadata` (else alpha = r).
Names are looked up in a table built from the real modules (sdcli's own names, diffusers' via the key map,
HuggingFace CLIP's for the text encoders), as kohya and A1111 resolve them, so an underscore in a module
name can never be guessed wrong; a name the table lacks is an error naming it. OpenCLIP's fused q/k/v
projection takes each of the three deltas on its own rows.

Merging happens once per LoRA set, before the U-Net runs (no per-step cost). When a job renders several
sets, the touched weights are copied first and copied back between sets: bit-exact, at the cost of one
copy of what the LoRAs touch (see Merger).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdcli.checkpoint import is_pickle, read_metadata
from sdcli.config import ModelConfig
from sdcli.errors import CheckpointError
from sdcli.request import FileUse

# key suffix -> part, longest suffixes first where one ends another
PARTS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # diffusers' training scripts
}  # fmt: skip
# markers of adapter kinds this module does not merge, with the name users know them by
UNSUPPORTED = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr",
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid)",
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "on_input": "(IA)^3", ".diff": "a full weight difference",
    ".diff_b": "a full weight difference", "hada_t1": "LoHa",
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """The weight a LoRA layer adds to: network index (0 U-Net, 1.. text encoders), parameter name, and the
    rows it owns (q, k or v of a fused projection), or None when the layer exists in files but is never run."""

    net: int
    param: str
    rows: tuple[int, int] | None = None


@dataclass
class LoraLayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


@dataclass
class LoraFile:
    """A LoRA file's layers by the base name the file gives them, with the alpha of a PEFT file's metadata."""

    path: Path
    layers: dict[str, LoraLayer]


def _part(key: str) -> tuple[str, str] | None:
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def read_lora(path: Path, *, allow_pickle: bool = False) -> LoraFile:
    """Every layer of a LoRA file; anything that is not a plain LoRA layer is a one-line error."""
    from sdcli.weights import Cast, open_tensors

    path = Path(path)
    cpu = Cast(torch.device("cpu"), torch.float32)
    with open_tensors(path, allow_pickle=allow_pickle) as tensors:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key in tensors.shapes:
            found = _part(key)
            if found is None:
                kind = next((name for marker, name in UNSUPPORTED.items() if key.endswith(marker)), None)
                if kind:
                    raise CheckpointError(f"{path}: a {kind} file; sdcli merges plain LoRA and LoCon layers only")
                raise CheckpointError(f"{path}: tensor '{_clip(key)}' is not part of a LoRA layer")
            base, part = found
            parts.setdefault(base, {})[part] = tensors.fetch(key, cpu)
        metadata = {} if is_pickle(path) else read_metadata(path)
    if not parts:
        raise CheckpointError(f"{path}: holds no LoRA layers")
    peft_alpha = _peft_alphas(path, metadata)
    layers = {}
    for base, got in parts.items():
        if "down" not in got or "up" not in got:
            missing = "up" if "down" in got else "down"
            raise CheckpointError(f"{path}: layer '{_clip(base)}' has no {missing} weight")
        down, up = got["down"], got["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or not down.shape[0]:
            raise CheckpointError(
                f"{path}: layer '{_clip(base)}' has mismatched shapes {list(down.shape)} and {list(up.shape)}"
            )
        alpha = got.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise CheckpointError(f"{path}: layer '{_clip(base)}' has an alpha of {alpha.numel()} values")
        value = float(alpha) if alpha is not None else peft_alpha(base, down.shape[0])
        if value is not None and not math.isfinite(value):
            raise CheckpointError(f"{path}: layer '{_clip(base)}' has a non-finite alpha")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise CheckpointError(f"{path}: layer '{_clip(base)}' holds NaN or infinite values")
        layers[base] = LoraLayer(down, up, value)
    return LoraFile(path, layers)


def _peft_alphas(path: Path, metadata: dict[str, str]):
    """A function (layer base name, rank) -> alpha from diffusers' `lora_adapter_metadata` (per component:
    lora_alpha, alpha_pattern, use_rslora); None when the file says nothing (alpha = rank)."""
    raw = metadata.get("lora_adapter_metadata")
    config: dict = {}
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its lora_adapter_metadata is not JSON") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: its lora_adapter_metadata is not a table")

    def alpha(base: str, rank: int) -> float | None:
        component, _, module = base.partition(".")
        lora_alpha = config.get(f"{component}.lora_alpha")
        if lora_alpha is None:
            return None
        patterns = config.get(f"{component}.alpha_pattern") or {}
        for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
            if module == pattern or module.endswith("." + pattern):
                lora_alpha = value
        if config.get(f"{component}.use_rslora"):  # rank-stabilised: alpha / sqrt(r) instead of alpha / r
            return float(lora_alpha) * math.sqrt(rank)
        return float(lora_alpha)

    return alpha


def _clip(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- the name table ------------------------------------------------------------------------------------

_HF_LAYER = {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight", "mlp.fc2": "mlp.c_proj.weight"}


def _text_prefixes(count: int) -> list[tuple[str, str]]:
    """(kohya prefix, PEFT prefix) of each text encoder, in config order."""
    if count == 1:
        return [("lora_te_", "text_encoder.")]
    return [(f"lora_te{i + 1}_", "text_encoder." if i == 0 else f"text_encoder_{i + 1}.") for i in range(count)]


def name_table(config: ModelConfig, nets) -> dict[str, Target]:
    """Every name a LoRA file may give a layer of these networks -> its target. U-Net layers under sdcli's
    (sgm) names and diffusers' names, both kohya-style (`lora_unet_` + underscores) and PEFT-style (`unet.`);
    text layers under HuggingFace CLIP names. Two modules whose underscored names collide are left out (a file
    naming them would be ambiguous and gets the unknown-layer error)."""
    from sdcli.diffusers_layout import unet_key_map

    table: dict[str, Target] = {}
    ambiguous: set[str] = set()

    def add(name: str, target: Target) -> None:
        if name in table and table[name] != target:
            ambiguous.add(name)
        table[name] = target

    diffusers = unet_key_map(config.unet)
    for name, module in nets.unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = Target(0, f"{name}.weight")
        theirs = diffusers[f"{name}.weight"].removesuffix(".weight")
        for module_name in (name, theirs):
            add("lora_unet_" + module_name.replace(".", "_"), target)
            add("unet." + module_name, target)
    for index, ((kohya, peft), cfg, encoder) in enumerate(
        zip(_text_prefixes(len(config.text)), config.text, nets.text, strict=True), start=1
    ):
        built = len(encoder.transformer.resblocks)
        for layer in range(cfg.layers):
            hf = f"text_model.encoder.layers.{layer}"
            ours = f"transformer.resblocks.{layer}"
            names = {f"{hf}.self_attn.{p}_proj": (f"{ours}.attn.in_proj_weight", i) for i, p in enumerate("qkv")}
            names |= {f"{hf}.{theirs}": (f"{ours}.{mine}", None) for theirs, mine in _HF_LAYER.items()}
            for hf_name, (param, third) in names.items():
                rows = None if third is None else (third * cfg.width, (third + 1) * cfg.width)
                target = Target(index, param, rows) if layer < built else Target(index, "")
                add(kohya + hf_name.replace(".", "_"), target)
                add(peft + hf_name, target)
                add(peft + hf_name.removeprefix("text_model."), target)  # as transformers 5 saves CLIPTextModel
    for name in ambiguous:
        del table[name]
    return table


def _family_hint(base: str, config: ModelConfig) -> str:
    two = base.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
    if two and len(config.text) == 1:
        return f" (it is for a model with two text encoders, such as SDXL; {config.name} has one)"
    if base.startswith("lora_te_") and len(config.text) > 1:
        return f" (it is for a model with one text encoder, such as SD 1.x; {config.name} has {len(config.text)})"
    return f" (is the LoRA made for another model than {config.name}?)"


# --- merging -------------------------------------------------------------------------------------------


def plan(lora: LoraFile, table: dict[str, Target], params, config: ModelConfig) -> list[tuple[Target, LoraLayer]]:
    """Each layer of the file with the weight it changes, checked against that weight's shape; nothing is
    computed, so a whole job's sets are checked before the first image."""
    planned = []
    for base, layer in lora.layers.items():
        target = table.get(base)
        if target is None:
            raise CheckpointError(f"{lora.path}: layer '{_clip(base)}' matches no module of the model"
                                  f"{_family_hint(base, config)}")  # fmt: skip
        if not target.param:
            continue  # a text block the model never runs (SD 2.x reads the penultimate): no effect to merge
        shape = _target_shape(target, params)
        down, up = layer.down, layer.up
        fits = up.shape[0] == shape[0] and (
            down[0].numel() == math.prod(shape[1:]) if down.dim() == 2 or up.shape[2:] == (1, 1) else False
        )
        if not fits:
            raise CheckpointError(
                f"{lora.path}: layer '{_clip(base)}' ({list(up.shape)} x {list(down.shape)}) does not fit a "
                f"{list(shape)} weight{_family_hint(base, config)}"
            )
        planned.append((target, layer))
    return planned


def _target_shape(target: Target, params) -> tuple[int, ...]:
    shape = tuple(params[target.net][target.param].shape)
    return shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:])


def delta(layer: LoraLayer, weight: float, shape: tuple[int, ...]) -> torch.Tensor:
    """weight * alpha / rank * up @ down, in the target's shape (fp32)."""
    rank = layer.down.shape[0]
    scale = weight * (rank if layer.alpha is None else layer.alpha) / rank
    down, up = layer.down, layer.up
    if down.dim() == 4 and len(shape) == 4:
        change = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # LoCon: a k x k conv, then a 1x1
    else:
        change = up.flatten(1) @ down.flatten(1)
    return change.reshape(shape) * scale


def compact_copy(weight: torch.Tensor) -> torch.Tensor:
    """A copy that gives `weight` back exactly, in the narrowest float type that holds every value: weights
    loaded from an fp16 (or bf16) file into fp32 are fp16 (bf16) values, so their copy takes half the memory."""
    for narrow in (torch.float16, torch.bfloat16):
        if weight.dtype.itemsize > narrow.itemsize:
            candidate = weight.to(narrow)
            if torch.equal(candidate.to(weight.dtype), weight):
                return candidate
    return weight.clone()


class Merger:
    """Keeps the networks' weights equal to the base model plus the current LoRA set.

    A set differing from the current one first restores the weights the current set changed, from copies
    taken before its first merge, so the unmerged model is the loaded one bit for bit however many sets come
    and go. With `keep_originals` False (a job with one set) no copies are taken and the merge is final."""

    def __init__(self, config: ModelConfig, nets, *, keep_originals: bool):
        self.config, self.nets = config, nets
        self.keep_originals = keep_originals
        self.params = [dict(net.named_parameters()) for net in (nets.unet, *nets.text)]
        self.originals: dict[tuple[int, str], torch.Tensor] = {}
        self.current: tuple[FileUse, ...] = ()
        self.table: dict[str, Target] | None = None

    @torch.no_grad()
    def apply(self, uses: Sequence[FileUse], files: dict[str, LoraFile]) -> None:
        uses = tuple(uses)
        if uses == self.current:
            return
        if self.current and not self.keep_originals:
            raise RuntimeError("a final LoRA merge cannot be undone")
        for (net, name), original in self.originals.items():
            self.params[net][name].copy_(original)
        self.current = ()
        self.check(uses, files)
        planned = [(use, plan(files[use.file], self.table, self.params, self.config)) for use in uses]
        for use, layers in planned:
            for target, layer in layers:
                param = self.params[target.net][target.param]
                key = (target.net, target.param)
                if self.keep_originals and key not in self.originals:
                    self.originals[key] = compact_copy(param.detach())
                view = param if target.rows is None else param[target.rows[0] : target.rows[1]]
                view.add_(delta(layer, use.weight, _target_shape(target, self.params)).to(view.device, view.dtype))
        self.current = uses

    def check(self, uses: Sequence[FileUse], files: dict[str, LoraFile]) -> None:
        """Raise the error a merge of `uses` would raise, changing nothing."""
        if self.table is None:
            self.table = name_table(self.config, self.nets)
        for use in uses:
            plan(files[use.file], self.table, self.params, self.config)

    def original_bytes(self) -> int:
        """Memory held by the copies."""
        return sum(t.numel() * t.element_size() for t in self.originals.values())


class LoraSets:
    """The LoRA sets of one job over one loaded model: every file read once, every set checked against the
    model before the first image, and `use` switching the networks to a set (a no-op when already there)."""

    def __init__(self, config: ModelConfig, nets, sets: Sequence[tuple[FileUse, ...]], *, allow_pickle: bool):
        paths = dict.fromkeys(use.file for uses in sets for use in uses)
        self.files = {path: read_lora(Path(path), allow_pickle=allow_pickle) for path in paths}
        self.merger = Merger(config, nets, keep_originals=len(sets) > 1)
        for uses in sets:
            self.merger.check(uses, self.files)

    def use(self, uses: Sequence[FileUse]) -> None:
        self.merger.apply(uses, self.files)
