"""YAML model configs -> frozen dataclasses, validated with errors that name the file, line and key.

A config describes one model family completely: its three networks, its noise schedule, its prompt
handling and the defaults a render uses when the command line is silent. No architecture number lives
anywhere else in the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdcli.errors import ConfigError
from sdcli.sampler_registry import SAMPLERS


@dataclass(frozen=True)
class TextConfig:
    """One CLIP text tower (an OpenCLIP TextTransformer) and how prompts become its token ids."""

    layout: Literal["hf_clip", "open_clip"]  # how the checkpoint stores it: SD 1.x hf_clip, SD 2.x open_clip
    width: int  # transformer width: 768 for ViT-L/14 (SD 1.x), 1024 for ViT-H/14 (SD 2.x), 1280 for bigG
    heads: int  # attention heads per layer
    layers: int  # residual blocks stored in the file (all are loaded, even an unused last one)
    activation: Literal["quick_gelu", "gelu"]  # MLP non-linearity: OpenAI CLIP quick_gelu, OpenCLIP gelu
    output_layer: Literal["last", "penultimate"]  # which block's output is the cross-attention context
    pad_id: int  # 49407 (end token) for SD 1.x, 0 for SD 2.x: all 77 positions reach cross-attention
    final_norm: bool = True  # ln_final on that output (SD 1.x/2.x); SDXL's encoders hand it over raw
    pooled: bool = False  # also the pooled embedding: ln_final of the last block at the end token, projected
    prefix: str | None = None  # where the file keeps it; default by layout (SD 1.x/2.x's cond_stage_model)
    vocab_size: int = 49408  # OpenCLIP's bundled BPE vocabulary
    context_length: int = 77  # tokens per prompt, start and end tokens included
    mlp_ratio: float = 4.0  # MLP hidden width over transformer width
    # whether A1111's Clip skip N takes the context N-1 blocks earlier (then ln_final): its SD 1.x CLIP only;
    # A1111 leaves SD 2.x's and SDXL's encoders at their configured layer whatever the setting
    clip_skip: bool = False


@dataclass(frozen=True)
class UNetConfig:
    """The LDM U-Net with spatial transformers, named as in the CompVis/Stability checkpoints."""

    model_channels: int  # channels of the first level: 320 for SD 1.x/2.x
    channel_mult: tuple[int, ...]  # per level multiplier of model_channels; len-1 down-samplings
    num_res_blocks: int  # res blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...]  # levels (indices into channel_mult) that carry transformers
    context_dim: int  # width of the text context fed to cross-attention
    num_heads: int | None = None  # fixed head count (SD 1.x: 8); exactly one of num_heads/head_dim
    head_dim: int | None = None  # fixed head width (SD 2.x: 64), heads = channels / head_dim
    transformer_depth: tuple[int, ...] = (1,)  # transformer blocks per spatial transformer: per level, or one for all
    linear_proj: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 Conv (SD 1.x)
    in_channels: int = 4  # latent channels in; 9 for an inpainting U-Net (latents, mask, masked-image latents)
    out_channels: int = 4  # latent channels out
    norm_groups: int = 32  # GroupNorm groups everywhere in the U-Net
    adm_in_channels: int | None = None  # width of the extra conditioning vector `y` (SDXL: 2816), via label_emb

    def heads_at(self, channels: int) -> int:
        """Attention heads for a transformer of `channels` width."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim

    def depth_at(self, level: int) -> int:
        """Transformer blocks at `level`; the middle block takes the last level's."""
        return self.transformer_depth[min(level, len(self.transformer_depth) - 1)]


@dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL (KL-f8 for SD), named as in the CompVis/Stability checkpoints."""

    base_channels: int  # channels of the first level: 128 for SD
    channel_mult: tuple[int, ...]  # per level multiplier; len-1 down-samplings (SD: 8x)
    num_res_blocks: int = 2  # res blocks per level in the encoder (decoder has one more)
    latent_channels: int = 4  # channels of z
    image_channels: int = 3  # RGB
    norm_groups: int = 32  # GroupNorm groups
    scale_factor: float = 0.18215  # latents are divided by this before decoding
    force_upcast: bool = True  # overflows in fp16 (every SD VAE but fixed fine-tunes): runs in fp32 when fp16 is asked

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule; samplers derive everything from it (diffusers' scheduler config)."""

    prediction_type: Literal["epsilon", "v_prediction"]  # what the U-Net outputs
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    steps_offset: int = 1  # added to "leading" spaced timesteps, as SD's scheduler configs do
    set_alpha_to_one: bool = False  # DDIM/PNDM: alpha of the step before t=0 is alphas_cumprod[0]
    clip_sample: bool = False  # DDIM: clip the predicted x0 to [-1, 1]
    # None: each scheduler's own default (SD 1.x/2.x configs); SDXL: "leading"
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = None


SIZE_PARTS = ("original_size", "crop_coords_top_left", "target_size")  # SDXL's size conditioning, (h, w) each


@dataclass(frozen=True)
class ConditioningConfig:
    """How the text encoders' outputs and the image size become what the U-Net is conditioned on."""

    vector: tuple[Literal["pooled", "original_size", "crop_coords_top_left", "target_size"], ...] = ()
    # the parts of the U-Net's `y` vector, concatenated in order (SDXL: pooled, then the three size pairs)
    size_embed_dim: int = 256  # Fourier features per size number (sgm ConcatTimestepEmbedderND outdim)
    zero_empty_negative: bool = False  # an empty negative conditions on zeros (SDXL, as sgm and A1111 do)

    def vector_width(self, pooled_width: int) -> int:
        """Width of `y` given the pooled embedding's."""
        return sum(pooled_width if part == "pooled" else 2 * self.size_embed_dim for part in self.vector)


@dataclass(frozen=True)
class Defaults:
    """What a render uses when neither the command line nor a prompt file says otherwise."""

    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    negative: str = ""


@dataclass(frozen=True)
class ModelConfig:
    """One complete model: networks, schedule, prompt handling, defaults and where its weights live."""

    name: str  # short name, recorded in every image's metadata
    weights: str  # .safetensors path; relative paths are searched (see resolve_weights)
    text: tuple[TextConfig, ...]  # the text encoders (YAML: one mapping, or a list); contexts concatenated
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig
    defaults: Defaults
    conditioning: ConditioningConfig = ConditioningConfig()
    description: str = ""
    vae_weights: str | None = None  # a separate VAE file to decode with (as `weights` is searched), else the model's
    source: Path | None = field(default=None, compare=False)  # the YAML file it came from

    def resolve_weights(self, override: str | os.PathLike | None = None) -> Path:
        """The weights file: `override` or the config's path. A relative path is looked up in the current
        directory, in $SDCLI_WEIGHTS_DIR (by path, then by file name), beside the config file and one folder
        up (so a bundled config finds the repository's weights/), then in the sdcli package (bundled assets).
        When none exists, the first place is returned so the error names it."""
        if override is not None:
            return find_weights(override)
        return find_weights(self.weights, self.source)

    def resolve_vae(self, override: str | os.PathLike | None = None) -> Path | None:
        """The separate VAE file: `override`, else the config's, else None (the checkpoint's own VAE)."""
        if override is not None:
            return find_weights(override)
        return None if self.vae_weights is None else find_weights(self.vae_weights, self.source)


def find_weights(raw: str | os.PathLike, config_source: Path | None = None) -> Path:
    """A weights path as ModelConfig.resolve_weights looks it up; beside `config_source` (and one folder up)
    when the path comes from that config file."""
    raw = Path(raw).expanduser()
    if raw.is_absolute():
        return raw
    candidates = [Path.cwd() / raw]
    if os.environ.get("SDCLI_WEIGHTS_DIR"):
        store = Path(os.environ["SDCLI_WEIGHTS_DIR"]).expanduser()
        candidates += [store / raw, store / raw.name]
    if config_source is not None:
        candidates += [config_source.parent / raw, config_source.parent.parent / raw]
    candidates.append(Path(__file__).resolve().parent / raw)
    return next((c for c in candidates if c.exists()), candidates[0])


# Bounds on config numbers, so a value that no network can be built or run with is refused with its file and
# line rather than failing later inside torch or the tokenizer.
MAX_WIDTH = 1 << 16  # channels, widths and image sides: far above any SD model's, far below overflowing a size
MAX_COUNT = 1000  # layers, blocks, heads and tokens: more than any model has, few enough to build at once
MAX_LEVELS = 16  # resolution levels, each halving the image: 16 take a MAX_WIDTH side down to 2 pixels
MAX_TIMESTEPS = 100_000  # SD trains on 1000; the schedule's tables are this long
MAX_VOCAB = 1 << 20  # far beyond any BPE vocabulary (OpenCLIP's has 49408)
MIN_VOCAB = 2 * 256 + 2  # the tokenizer's byte tokens, plain and word-final (text.BYTE_TOKENS), start and end


@dataclass(frozen=True)
class Bounds:
    """The values a config number, or each number of a list, may take, and how many numbers a list holds."""

    low: float
    high: float = math.inf
    open: bool = False  # both ends excluded: for a float that must be above 0 or below 1
    items: tuple[int, int] | None = None  # a list's fewest and most numbers


_WIDTH = Bounds(1, MAX_WIDTH)
_COUNT = Bounds(1, MAX_COUNT)
_MULTIPLIERS = Bounds(1, MAX_WIDTH, items=(1, MAX_LEVELS))  # one per level, each level's width at most MAX_WIDTH
_FRACTION = Bounds(0, 1, open=True)

# Every int and float field, and every list, has its bounds here; rules between fields are in _check.
FIELD_BOUNDS: dict[type, dict[str, Bounds]] = {
    TextConfig: {
        "width": _WIDTH, "heads": _COUNT, "layers": _COUNT,
        "pad_id": Bounds(0),  # and below vocab_size
        "vocab_size": Bounds(MIN_VOCAB, MAX_VOCAB),
        "context_length": Bounds(3, MAX_COUNT),  # the start and end tokens, and one of the prompt's
        "mlp_ratio": Bounds(0, open=True),  # and an MLP at most MAX_WIDTH wide
    },
    UNetConfig: {
        "model_channels": _WIDTH, "channel_mult": _MULTIPLIERS, "num_res_blocks": _COUNT,
        "attention_levels": Bounds(0, MAX_LEVELS - 1, items=(0, MAX_LEVELS)),  # and levels of channel_mult
        "context_dim": _WIDTH, "num_heads": _COUNT, "head_dim": _WIDTH,
        "transformer_depth": Bounds(1, MAX_COUNT, items=(1, MAX_LEVELS)),  # and one, or one per level
        "in_channels": _WIDTH, "out_channels": _WIDTH, "norm_groups": _WIDTH, "adm_in_channels": _WIDTH,
    },
    VAEConfig: {
        "base_channels": _WIDTH, "channel_mult": _MULTIPLIERS, "num_res_blocks": _COUNT, "latent_channels": _WIDTH,
        "image_channels": Bounds(3, 3),  # images are written as RGB
        "norm_groups": _WIDTH, "scale_factor": Bounds(0, open=True),
    },
    ScheduleConfig: {
        "num_train_timesteps": Bounds(1, MAX_TIMESTEPS), "beta_start": _FRACTION, "beta_end": _FRACTION,
        "steps_offset": Bounds(0),  # and below num_train_timesteps
    },
    ConditioningConfig: {"size_embed_dim": Bounds(2, MAX_WIDTH), "vector": Bounds(0, items=(0, 4))},
    Defaults: {
        "width": _WIDTH, "height": _WIDTH,  # and multiples of the VAE's downsampling
        "steps": Bounds(1),  # and at most num_train_timesteps
        "guidance": Bounds(0),
    },
}  # fmt: skip


def unet_width_problem(cfg: UNetConfig) -> str | None:
    """Why the U-Net's widths cannot be built: a level too wide, or a width that the norm groups or the attention
    heads do not divide; None when they can."""
    problem = _width_problem(cfg.model_channels, cfg.channel_mult, cfg.norm_groups, "model_channels")
    if problem is not None:
        return problem
    split, name = (cfg.num_heads, "num_heads") if cfg.num_heads is not None else (cfg.head_dim, "head_dim")
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        channels = cfg.model_channels * mult
        # the middle block attends at the last level whether or not attention_levels names it
        if (level in cfg.attention_levels or level == last) and channels % split:
            return f"level {level} has {channels} channels, not divisible by {name} {split}"
    return None


def vae_width_problem(cfg: VAEConfig) -> str | None:
    """Why the autoencoder's widths cannot be built: a level too wide, or widths the norm groups do not divide."""
    return _width_problem(cfg.base_channels, cfg.channel_mult, cfg.norm_groups, "base_channels")


def _width_problem(base: int, mults: tuple[int, ...], groups: int, name: str) -> str | None:
    """A level too wide, or a width the norm groups do not divide: each level's, and the first conv's `base`,
    which meets a GroupNorm before level 0 widens it."""
    for level, mult in enumerate(mults):
        channels = base * mult
        if channels > MAX_WIDTH:
            return f"level {level} has {channels} channels, more than {MAX_WIDTH}"
        if channels % groups:
            return f"level {level} has {channels} channels, not divisible by norm_groups {groups}"
    return f"{name} {base} is not divisible by norm_groups {groups}" if base % groups else None


def bundled_config_dir() -> Path:
    """Bundled configs: inside the package after a wheel install, else the repository's configs/."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def bundled_config_names() -> list[str]:
    return sorted(p.stem for p in bundled_config_dir().glob("*.yaml"))


def sdcli_home() -> Path:
    """$SDCLI_HOME (default ~/.config/sdcli): user configs, LoRAs and embeddings live in folders under it."""
    home = os.environ.get("SDCLI_HOME") or Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")) / "sdcli"
    return Path(home).expanduser()


def user_config_dir() -> Path:
    return sdcli_home() / "configs"


def find_config(name_or_path: str) -> Path:
    """A config path from a path or a bundled/user config's name."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if candidate.is_file():
            return candidate
        raise ConfigError(f"config file not found: {name_or_path}")
    for folder in (user_config_dir(), bundled_config_dir()):
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    known = sorted(set(bundled_config_names()) | {p.stem for p in user_config_dir().glob("*.yaml")})
    raise ConfigError(f"unknown config '{name_or_path}'{_suggest(name_or_path, known)}; known: {', '.join(known)}")


def load_config(name_or_path: str) -> ModelConfig:
    """Read, validate and freeze a model config."""
    path = find_config(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse_config(text, source=path)


def parse_config(text: str, source: Path | None = None) -> ModelConfig:
    """Validate YAML text into a ModelConfig; errors read `file:line: message`."""
    where = str(source) if source is not None else "<config>"
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise ConfigError(f"{where}: config is empty")
        config = _build(ModelConfig, node, where, "", {})
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    return dataclasses.replace(config, source=source)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls, node: yaml.Node, where: str, path: str, lines: dict[str, str]):
    """Turn a YAML mapping node into dataclass `cls`, checking keys, types, enum values and bounds; `lines`
    gathers each dotted key's `file:line`, for the rules between fields."""
    here = f"{where}:{node.start_mark.line + 1}"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{here}: {path or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        line = f"{where}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{line}: a key must be a plain name")
        key = key_node.value
        dotted = _dotted(path, key)
        if key not in fields:
            raise ConfigError(f"{line}: unknown key '{dotted}'{_suggest(key, fields)}")
        if key in values:
            raise ConfigError(f"{line}: key '{dotted}' given twice")
        lines[dotted] = line
        values[key] = _convert(hints[key], value_node, where, dotted, lines)
        if key in FIELD_BOUNDS.get(cls, {}):
            _check_bounds(values[key], FIELD_BOUNDS[cls][key], line, dotted)
    missing = [n for n, f in fields.items() if n not in values and _is_required(f)]
    if missing:
        raise ConfigError(f"{here}: missing key '{_dotted(path, missing[0])}'")
    try:
        config = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{here}: {exc}") from None
    return _check(config, path, lambda name: _line(lines, _dotted(path, name), here))


def _dotted(path: str, key: str) -> str:
    """`key` under section `path`; the empty key is the section itself."""
    return f"{path}.{key}" if path and key else path or key


def _line(lines: dict[str, str], dotted: str, here: str) -> str:
    """Where `dotted` was written; for a key left to its default, where its section was, else `here`."""
    while dotted not in lines and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return lines.get(dotted, here)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint, node: yaml.Node, where: str, path: str, lines: dict[str, str]):
    """Check one YAML value against a type hint and convert it."""
    line = f"{where}:{node.start_mark.line + 1}"
    if dataclasses.is_dataclass(hint):
        return _build(hint, node, where, path, lines)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], node, where, path, lines)
    if origin is tuple:
        if isinstance(node, yaml.SequenceNode):
            items = node.value
        elif dataclasses.is_dataclass(args[0]) and isinstance(node, yaml.MappingNode):
            items = [node]  # one section where a list of them may stand (a model with one text encoder)
        elif args[0] is int and isinstance(node, yaml.ScalarNode):
            items = [node]  # one number for every entry (transformer_depth of each level)
        else:
            raise ConfigError(f"{line}: '{path}' must be a list")
        if not items and dataclasses.is_dataclass(args[0]):
            raise ConfigError(f"{line}: '{path}' needs at least one entry")
        return tuple(_convert(args[0], item, where, path, lines) for item in items)
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{line}: '{path}' must be a single value")
    try:
        value = yaml.safe_load(yaml.serialize(node))
    except (yaml.YAMLError, ValueError) as exc:  # an unknown tag, or one its text does not fit (!!int x)
        raise ConfigError(f"{line}: '{path}' is not a valid value: {getattr(exc, 'problem', None) or exc}") from None
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise ConfigError(f"{line}: '{path}' is '{value}'{_suggest(str(value), args)}; expected one of {choices}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{line}: '{path}' must be true or false, got '{value}'")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{line}: '{path}' must be an integer, got '{value}'")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{line}: '{path}' must be a number, got '{value}'")
        return float(value)
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{line}: '{path}' must be text")
        return str(value)
    raise ConfigError(f"{line}: '{path}' has an unsupported type")


def _check_bounds(value, bounds: Bounds, line: str, path: str) -> None:
    """Refuse a number, or a list's length or any of its numbers, outside the field's bounds."""
    if value is None:  # an optional field left unset
        return
    if isinstance(value, tuple):
        fewest, most = bounds.items
        if not fewest <= len(value) <= most:
            raise ConfigError(f"{line}: '{path}' must have {fewest} to {most} items, got {len(value)}")
    for number in value if isinstance(value, tuple) else (value,):
        if isinstance(number, str):
            continue  # a list of names: its length is all a bound says
        problem = _out_of_bounds(number, bounds)
        if problem is not None:
            raise ConfigError(f"{line}: '{path}' {problem}, got {number}")


def _out_of_bounds(value: float, bounds: Bounds) -> str | None:
    """What `value` must be instead, when `bounds` refuse it."""
    if not math.isfinite(value):
        return "must be a finite number"
    if bounds.low == bounds.high:
        return None if value == bounds.low else f"must be {bounds.low}"
    if value < 0 <= bounds.low:
        return "must not be negative"  # the commonest slip, said plainly
    if value < bounds.low or (bounds.open and value == bounds.low):
        return f"must be {'above' if bounds.open else 'at least'} {bounds.low}"
    if value > bounds.high or (bounds.open and value == bounds.high):
        return f"must be {'below' if bounds.open else 'at most'} {bounds.high}"
    return None


def _check(config, path: str, at: typing.Callable[[str], str]):
    """Rules between fields, which neither a type hint nor a field's bounds can say; `at(name)` is the
    `file:line` of field `name` (a dotted one for the whole model's rules)."""
    rule = _SECTION_RULES.get(type(config))
    broken = rule(config) if rule is not None else None
    if broken is not None:
        name, problem = broken
        raise ConfigError(f"{at(name)}: '{_dotted(path, name)}' {problem}")
    return config


def _text_problem(cfg: TextConfig) -> tuple[str, str] | None:
    """Heads and an MLP that fit the width, a pad id in the vocabulary, a block before the last, a place in
    the file."""
    if cfg.prefix == "":
        return "prefix", "must not be empty"
    if cfg.pooled and cfg.layout != "open_clip":
        return "pooled", "is only read from the open_clip layout's text_projection"
    hidden = int(cfg.width * cfg.mlp_ratio)  # as the text encoder's MLP rounds it
    if cfg.width % cfg.heads:
        return "heads", f"must divide width {cfg.width}, got {cfg.heads}"
    if not 1 <= hidden <= MAX_WIDTH:
        return "mlp_ratio", f"makes the MLP {hidden} wide, outside 1 to {MAX_WIDTH}; got {cfg.mlp_ratio}"
    if cfg.pad_id >= cfg.vocab_size:
        return "pad_id", f"must be below vocab_size {cfg.vocab_size}, got {cfg.pad_id}"
    if cfg.output_layer == "penultimate" and cfg.layers < 2:
        return "layers", f"must be at least 2 for output_layer penultimate, got {cfg.layers}"
    return None


def _unet_problem(cfg: UNetConfig) -> tuple[str, str] | None:
    """One way to size the heads, attention on existing levels, and widths that can be built."""
    if (cfg.num_heads is None) == (cfg.head_dim is None):
        return "", "needs exactly one of num_heads and head_dim"
    bad = [lvl for lvl in cfg.attention_levels if not 0 <= lvl < len(cfg.channel_mult)]
    if bad:
        return "attention_levels", f"has level {bad[0]} outside channel_mult"
    if len(cfg.transformer_depth) not in (1, len(cfg.channel_mult)):
        levels = len(cfg.channel_mult)
        return "transformer_depth", f"must be one number or one per level ({levels}), got {len(cfg.transformer_depth)}"
    problem = unet_width_problem(cfg)
    return None if problem is None else ("", problem)


def _vae_problem(cfg: VAEConfig) -> tuple[str, str] | None:
    """Widths that can be built."""
    problem = vae_width_problem(cfg)
    return None if problem is None else ("", problem)


def _schedule_problem(cfg: ScheduleConfig) -> tuple[str, str] | None:
    """The offset of "leading" timesteps must leave a timestep to sample."""
    if cfg.steps_offset >= cfg.num_train_timesteps:
        return "steps_offset", f"must be below num_train_timesteps {cfg.num_train_timesteps}, got {cfg.steps_offset}"
    return None


def _defaults_problem(cfg: Defaults) -> tuple[str, str] | None:
    """A sampler that exists (the sides and steps depend on the model: see _model_problem)."""
    if cfg.sampler not in SAMPLERS:
        return "sampler", f"is '{cfg.sampler}'{_suggest(cfg.sampler, SAMPLERS)}; expected one of {', '.join(SAMPLERS)}"
    return None


def inpainting_channels(latent: int) -> int:
    """An inpainting U-Net's input width: the latents, the mask, then the masked image's latents."""
    return 2 * latent + 1


def _model_problem(cfg: ModelConfig) -> tuple[str, str] | None:
    """The networks, schedule and defaults must fit together as the pipeline wires them."""
    widths = sum(text.width for text in cfg.text)
    if cfg.unet.context_dim != widths:
        got = cfg.unet.context_dim
        return "unet.context_dim", f"must equal the text encoders' widths together, {widths}, got {got}"
    pooled = [text for text in cfg.text if text.pooled]
    if len(pooled) > 1:
        return "text", "has more than one encoder with pooled: true"
    if "pooled" in cfg.conditioning.vector and not pooled:
        return "conditioning.vector", "has 'pooled' but no text encoder has pooled: true"
    vector = cfg.conditioning.vector_width(pooled[0].width if pooled else 0) if cfg.conditioning.vector else None
    if cfg.unet.adm_in_channels != vector:
        got = cfg.unet.adm_in_channels
        return "unet.adm_in_channels", f"must be the conditioning vector's width {vector}, got {got}"
    latent = cfg.vae.latent_channels
    if cfg.unet.out_channels != latent:
        return "unet.out_channels", f"must equal vae.latent_channels {latent}, got {cfg.unet.out_channels}"
    if cfg.unet.in_channels not in (latent, inpainting_channels(latent)):
        return "unet.in_channels", (
            f"must be vae.latent_channels {latent}, or {inpainting_channels(latent)} for an inpainting U-Net, "
            f"got {cfg.unet.in_channels}"
        )
    for name in ("width", "height"):
        if getattr(cfg.defaults, name) % cfg.vae.downsample:
            factor, side = cfg.vae.downsample, getattr(cfg.defaults, name)
            return f"defaults.{name}", f"must be a multiple of {factor} (the VAE's downsampling), got {side}"
    if cfg.defaults.steps > cfg.schedule.num_train_timesteps:
        most = cfg.schedule.num_train_timesteps
        return "defaults.steps", f"must be at most num_train_timesteps {most}, got {cfg.defaults.steps}"
    return None


_SECTION_RULES = {
    TextConfig: _text_problem, UNetConfig: _unet_problem, VAEConfig: _vae_problem,
    ScheduleConfig: _schedule_problem, Defaults: _defaults_problem, ModelConfig: _model_problem,
}  # fmt: skip
