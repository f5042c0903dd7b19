"""One image's complete recipe, and the one schema every other table derives from.

`Request` lists the fields that decide an image's pixels (besides the model and where it runs). Prompt
file keys, the sidecar's types, the `--name` fields, `--from`'s overrides and the planner are all derived
from its fields and the two small tables of non-recipe keys below, so a new option is one new field.
Validated without importing torch: the CLI checks input before a model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli.config import ModelConfig, _suggest
from sdcli.errors import RequestError
from sdcli.sampler_registry import SAMPLERS

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts any unsigned 64-bit value
MAX_SIDE_FACTOR = 4  # a side may be this many times the model's default: SD repeats itself well before
# How prompt text becomes tokens: A1111's emphasis, BREAK and 75-token chunks; or diffusers' literal text cut at 75.
PROMPT_SYNTAXES = ("a1111", "plain")
MAX_LORA_WEIGHT = 10.0  # far past any useful strength (A1111 users stay within about -2..2): beyond it, a typo
HIRES_UPSCALERS = ("latent", "lanczos")  # in latent space (A1111's "Latent"), or decode, resize and encode again
MAX_HIRES_SCALE = 4.0
MAX_MASK_BLUR = 256
MAX_PROMPT_CHARS = 20_000  # some 5000 tokens, 66 chunks: far past any prompt, short of a hostile one's cost


def _shared(**meta: Any) -> dict[str, Any]:
    """A field that images must agree on to share one U-Net call."""
    return {"shared": True, **meta}


@dataclass(frozen=True)
class FileUse:
    """A file an image is rendered with besides the model (a LoRA at a weight, an embedding): its absolute
    path, the weight, and its SHA-256 once the job has hashed it, so a recipe names the bytes, not the name."""

    file: str
    weight: float = 1.0
    sha256: str = ""


FILE_USE_KEYS = {"file", "weight", "sha256"}
MAX_FILE_USES = 64  # LoRAs or embeddings per image; more is a runaway list, not a recipe


def file_uses(raw: Any, key: str, base: Path | None = None) -> tuple[FileUse, ...]:
    """A list of files as a recipe holds it: FileUse values, or JSON/YAML items, each "FILE", "FILE:WEIGHT"
    or {"file": ..., "weight": ..., "sha256": ...}; relative paths are taken from `base` (a prompt file's
    folder), else the working folder."""
    if isinstance(raw, tuple) and all(isinstance(u, FileUse) for u in raw):
        return raw
    if isinstance(raw, str):  # one file, as --init-image and a prompt file's `init_image: FILE` give it
        raw = [raw] if raw else []
    if not isinstance(raw, list) or len(raw) > MAX_FILE_USES:
        raise RequestError(f"'{key}' must be a list of at most {MAX_FILE_USES} files")
    uses = []
    for entry in raw:
        if isinstance(entry, str):
            file, weight = split_weight(entry, key)
            sha = ""
        elif isinstance(entry, dict) and isinstance(entry.get("file"), str) and set(entry) <= FILE_USE_KEYS:
            file, weight, sha = entry["file"], entry.get("weight", 1.0), entry.get("sha256", "")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isinstance(sha, str):
                raise RequestError(f"'{key}': weight must be a number and sha256 text")
        else:
            raise RequestError(f"'{key}': each entry must be \"FILE[:WEIGHT]\" or {{file, weight}}")
        path = Path(file).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        uses.append(FileUse(str(path.absolute()), float(weight), sha))
    return tuple(uses)


def split_weight(text: str, what: str) -> tuple[str, float]:
    """"FILE:WEIGHT" -> (FILE, WEIGHT); a suffix that is no number belongs to the name (weight 1)."""
    name, sep, tail = text.rpartition(":")
    if sep and name:
        try:
            return name, float(tail)
        except ValueError:
            pass
    if not text:
        raise RequestError(f"{what}: an empty file name")
    return text, 1.0


@dataclass(frozen=True)
class Request:
    """Everything that decides the pixels of one image, besides the model and the device/dtype.

    Field metadata: `shared` fields must be equal within a U-Net batch; `in_name` fields are `--name`
    template fields; `legacy` is the value meant by a sidecar written before the field existed."""

    prompt: str
    negative: str
    seed: int = field(metadata={"in_name": True})
    steps: int = field(metadata=_shared(in_name=True))
    guidance: float = field(metadata=_shared(in_name=True))
    sampler: str = field(metadata=_shared(in_name=True))
    width: int = field(metadata=_shared(in_name=True))
    height: int = field(metadata=_shared(in_name=True))
    clip_skip: int = field(default=1, metadata={"in_name": True, "legacy": 1})  # A1111's numbering: 1 = last layer
    prompt_syntax: str = field(default="a1111", metadata={"legacy": "plain"})  # older sidecars meant diffusers'
    # merged into the networks: images with different sets cannot share a U-Net call
    loras: tuple[FileUse, ...] = field(default=(), metadata=_shared(legacy=()))
    # textual-inversion files whose names the prompts use
    embeddings: tuple[FileUse, ...] = field(default=(), metadata={"legacy": ()})
    # an image to start from (img2img; at most one), and how much of the schedule runs from it: the last
    # int(steps * strength) steps; 1 runs them all, from the init latents noised at full strength (as diffusers)
    init_image: tuple[FileUse, ...] = field(default=(), metadata={"legacy": ()})
    strength: float = field(default=0.75, metadata=_shared(legacy=0.75))  # A1111's default denoising strength
    mask: tuple[FileUse, ...] = field(default=(), metadata={"legacy": ()})  # white is repainted (inpainting)
    mask_blur: int = field(default=0, metadata={"legacy": 0})  # pixels of Gaussian blur on the mask's edge
    pad: str = field(default="", metadata=_shared(legacy=""))  # outpainting: "LEFT,TOP,RIGHT,BOTTOM" pixels
    # A1111's hires fix: render, upscale by hires_scale, then an img2img pass at hires_strength
    hires_scale: float = field(default=1.0, metadata=_shared(legacy=1.0))  # 1 is off
    hires_steps: int = field(default=0, metadata=_shared(legacy=0))  # 0 runs `steps`
    hires_strength: float = field(default=0.7, metadata=_shared(legacy=0.7))  # A1111's default
    hires_upscale: str = field(default="latent", metadata=_shared(legacy="latent"))

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one U-Net batch: the shared fields, and whether they start from
        an image (and repaint part of it)."""
        shared = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("shared"))
        return (*shared, bool(self.init_image), bool(self.mask))


# Prompt-file keys that are not part of an image's recipe: how many images an item makes, and their names.
ITEM_ONLY_TYPES: dict[str, type] = {"count": int, "name": str}
# Sidecar keys beside the recipe: where the image came from and how it ran.
PROVENANCE_TYPES: dict[str, type] = {
    "config": str, "config_path": str, "weights": str, "weights_sha256": str, "vae": str, "vae_sha256": str,
    "device": str, "dtype": str,
    "vae_dtype": str, "threads": int, "batch_size": int, "compile": bool, "sdcli_version": str, "elapsed": float,
    "created": str,
}  # fmt: skip
# Metadata keys (with the request's) whose equality means the same image: resume skips an equal recipe.
RECIPE_PROVENANCE = ("config", "weights_sha256", "vae_sha256")


def request_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Request))


@functools.cache
def request_types() -> dict[str, type]:
    """Each request field's type (str, int, float, or list for a list of files); computed once (planning
    asks per image)."""
    hints = typing.get_type_hints(Request)
    return {name: list if typing.get_origin(hints[name]) is tuple else hints[name] for name in request_fields()}


def file_fields() -> tuple[str, ...]:
    """The request fields that list files (as FileUse)."""
    return tuple(name for name, kind in request_types().items() if kind is list)


def item_types() -> dict[str, type]:
    """What an item of a prompt file may set, and the type each must have."""
    return {**request_types(), **ITEM_ONLY_TYPES}


def metadata_types() -> dict[str, type]:
    """The sidecar's keys and their types."""
    return {**request_types(), **PROVENANCE_TYPES}


def name_fields() -> tuple[str, ...]:
    """The fields of a `--name` template."""
    flagged = tuple(f.name for f in dataclasses.fields(Request) if f.metadata.get("in_name"))
    return ("index", *flagged, "slug", "config")


def recipe_keys() -> tuple[str, ...]:
    return (*request_fields(), *RECIPE_PROVENANCE)


def required_metadata() -> tuple[str, ...]:
    """The request fields every sidecar must hold: all but those added after sidecars were first written."""
    return tuple(f.name for f in dataclasses.fields(Request) if "legacy" not in f.metadata)


@functools.cache
def legacy_values() -> dict[str, Any]:
    """Each field added after sidecars were first written, with what a sidecar without it meant."""
    return {f.name: f.metadata["legacy"] for f in dataclasses.fields(Request) if "legacy" in f.metadata}


def recorded_values(meta: dict[str, Any]) -> dict[str, Any]:
    """A sidecar's request fields; a field it predates takes its `legacy` value."""
    values = {}
    for f in dataclasses.fields(Request):
        if f.name in meta:
            values[f.name] = file_uses(meta[f.name], f.name) if f.name in file_fields() else meta[f.name]
        elif "legacy" in f.metadata:
            values[f.name] = f.metadata["legacy"]
    return values


def build_request(values: dict[str, Any], config: ModelConfig) -> Request:
    """A request from the values given (prompt and seed always), the rest from the config's defaults or,
    for a field the config has no default for, the field's own."""
    chosen = {}
    for f in dataclasses.fields(Request):
        if f.name in values:
            chosen[f.name] = values[f.name]
        elif hasattr(config.defaults, f.name):
            chosen[f.name] = getattr(config.defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            chosen[f.name] = f.default
    types = request_types()
    convert = {float: lambda v, _: float(v), list: file_uses}
    chosen = {k: convert[types[k]](v, k) if types[k] in convert else v for k, v in chosen.items()}
    return Request(**chosen)


def check_request(request: Request, config: ModelConfig) -> Request:
    """Reject values the model cannot render; returns the request unchanged when it is fine."""
    for name, kind in request_types().items():
        value = getattr(request, name)
        if kind is str and not _is_text(value):
            raise RequestError(f"the {name} is not valid text (it holds bytes that are not UTF-8)")
    for name in ("prompt", "negative"):
        if len(getattr(request, name)) > MAX_PROMPT_CHARS:
            raise RequestError(
                f"the {name} is {len(getattr(request, name))} characters long; at most {MAX_PROMPT_CHARS}"
            )
    if request.sampler not in SAMPLERS:
        raise RequestError(
            f"unknown sampler '{request.sampler[:40]}'{_suggest(request.sampler, SAMPLERS)}; "
            f"valid samplers: {', '.join(SAMPLERS)}"
        )
    step = config.vae.downsample
    for name in ("width", "height"):
        value = getattr(request, name)
        if value <= 0 or value % step:
            raise RequestError(f"--{name} must be a positive multiple of {step}, got {value}")
        largest = _largest(config, name)
        if value > largest:
            raise RequestError(
                f"--{name} {value} is more than {config.name} renders: at most {largest} "
                f"({MAX_SIDE_FACTOR}x its default {getattr(config.defaults, name)})"
            )
    if request.prompt_syntax not in PROMPT_SYNTAXES:
        raise RequestError(
            f"unknown prompt syntax '{request.prompt_syntax[:40]}'; valid: {', '.join(PROMPT_SYNTAXES)}"
        )
    _check_image_inputs(request, config)
    for use in request.embeddings:
        if use.weight != 1.0:
            raise RequestError(
                f"embedding {Path(use.file).name[:60]}: an embedding takes no weight ({use.weight:g}); weight its "
                "name in the prompt instead, as in (name:1.2)"
            )
    if len(request.loras) > MAX_FILE_USES:
        raise RequestError(f"{len(request.loras)} LoRAs for one image; at most {MAX_FILE_USES}")
    for use in request.loras:
        if not -MAX_LORA_WEIGHT <= use.weight <= MAX_LORA_WEIGHT:
            raise RequestError(
                f"LoRA weight {use.weight:g} for {Path(use.file).name[:60]} is outside "
                f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}"
            )
    layers = min(text.layers for text in config.text)
    if not 1 <= request.clip_skip <= layers:
        raise RequestError(
            f"--clip-skip must be between 1 and {layers} (the text encoder's layers), got {request.clip_skip}"
        )
    if request.steps < 1:
        raise RequestError(f"--steps must be at least 1, got {request.steps}")
    if request.steps > config.schedule.num_train_timesteps:
        raise RequestError(
            f"--steps must be at most {config.schedule.num_train_timesteps} (the training timesteps), "
            f"got {request.steps}"
        )
    if not request.guidance >= 0 or request.guidance == float("inf"):
        raise RequestError(f"--guidance must be a finite number >= 0, got {request.guidance}")
    if not 0 <= request.seed <= MAX_SEED:
        raise RequestError(f"--seed must be between 0 and {MAX_SEED}, got {request.seed}")
    return request


def _check_image_inputs(request: Request, config: ModelConfig) -> None:
    """An init image, a mask, padding and the hires pass: each in range, and only with what it needs."""
    for name in ("init_image", "mask"):
        uses = getattr(request, name)
        if len(uses) > 1 or any(use.weight != 1.0 for use in uses):
            raise RequestError(f"'{name}' takes one image file, without a weight")
    if not 0 < request.strength <= 1:
        raise RequestError(f"--strength must be in (0, 1], got {request.strength:g}")
    if (request.mask or request.pad) and not request.init_image:
        raise RequestError(f"--{'mask' if request.mask else 'pad'} needs an --init-image to paint into")
    if not 0 <= request.mask_blur <= MAX_MASK_BLUR:
        raise RequestError(f"--mask-blur must be from 0 to {MAX_MASK_BLUR} pixels, got {request.mask_blur}")
    if request.pad:
        padding(request.pad, config.vae.downsample)
    if not 1 <= request.hires_scale <= MAX_HIRES_SCALE:
        raise RequestError(f"--hires-scale must be from 1 to {MAX_HIRES_SCALE:g}, got {request.hires_scale:g}")
    for name in ("width", "height"):
        side = hires_side(getattr(request, name), request.hires_scale, config.vae.downsample)
        largest = _largest(config, name)
        if request.hires_scale != 1 and side > largest:
            raise RequestError(f"--hires-scale {request.hires_scale:g} makes the {name} {side}, over {largest}")
    if not 0 < request.hires_strength <= 1:
        raise RequestError(f"--hires-strength must be in (0, 1], got {request.hires_strength:g}")
    if not 0 <= request.hires_steps <= config.schedule.num_train_timesteps:
        raise RequestError(f"--hires-steps must be from 0 (as --steps) to {config.schedule.num_train_timesteps}")
    if request.hires_upscale not in HIRES_UPSCALERS:
        raise RequestError(
            f"unknown hires upscaler {request.hires_upscale[:40]!r}; valid: {', '.join(HIRES_UPSCALERS)}"
        )
    if request.init_image:
        steps_run(request.steps, request.strength, "strength")
    if request.hires_scale != 1:
        steps_run(request.hires_steps or request.steps, request.hires_strength, "hires strength")


def steps_run(steps: int, strength: float, name: str = "strength") -> int:
    """How many steps an img2img pass of `strength` runs (diffusers' get_timesteps): the last
    min(int(steps * strength), steps) of the `steps`-step schedule; none is an error (`name` is the strength's)."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise RequestError(f"{name} {strength:g} with {steps} steps runs no step: raise it to {1 / steps:.3g} or more, "
                           "or the steps")  # fmt: skip
    return kept


def hires_side(side: int, scale: float, multiple: int = 8) -> int:
    """A side after the hires upscale: side x scale, down to the model's multiple, as A1111 sizes it."""
    return int(side * scale) // multiple * multiple


def _largest(config: ModelConfig, name: str) -> int:
    step = config.vae.downsample
    return MAX_SIDE_FACTOR * getattr(config.defaults, name) // step * step


def padding(text: str, multiple: int) -> tuple[int, int, int, int]:
    """--pad "LEFT,TOP,RIGHT,BOTTOM" -> four pixel counts, each a multiple of the model's latent step."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or any(not 0 <= v <= 4096 or v % multiple for v in values) or not any(values):
        raise RequestError(
            f"--pad {text[:40]!r}: expected LEFT,TOP,RIGHT,BOTTOM, multiples of {multiple} from 0 to 4096, not all 0"
        )
    return values  # type: ignore[return-value]


def _is_text(value: str) -> bool:
    """False for text holding lone surrogates: undecodable argv bytes, or "\\ud800" in JSON, which no file
    could store as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
