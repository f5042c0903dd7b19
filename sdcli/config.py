"""YAML model configs -> frozen dataclasses, validated with errors that name the file, line and key.

A config describes one model family completely: its three networks, its noise schedule, its prompt
handling and the defaults a render uses when the command line is silent. No architecture number lives
anywhere else in the code.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    """The CLIP text tower (an OpenCLIP TextTransformer) and how prompts become token ids."""

    layout: Literal["hf_clip", "open_clip"]  # how the checkpoint stores it: SD 1.x hf_clip, SD 2.x open_clip
    width: int  # transformer width: 768 for ViT-L/14 (SD 1.x), 1024 for ViT-H/14 (SD 2.x)
    heads: int  # attention heads per layer
    layers: int  # residual blocks stored in the file (all are loaded, even an unused last one)
    activation: Literal["quick_gelu", "gelu"]  # MLP non-linearity: OpenAI CLIP quick_gelu, OpenCLIP gelu
    output_layer: Literal["last", "penultimate"]  # which block's output feeds ln_final then the U-Net
    pad_id: int  # 49407 (end token) for SD 1.x, 0 for SD 2.x: all 77 positions reach cross-attention
    vocab_size: int = 49408  # OpenCLIP's bundled BPE vocabulary
    context_length: int = 77  # tokens per prompt, start and end tokens included
    mlp_ratio: float = 4.0  # MLP hidden width over transformer width


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
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    linear_proj: bool = False  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 Conv (SD 1.x)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # latent channels out
    norm_groups: int = 32  # GroupNorm groups everywhere in the U-Net

    def heads_at(self, channels: int) -> int:
        """Attention heads for a transformer of `channels` width."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


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
    text: TextConfig
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig
    defaults: Defaults
    description: str = ""
    source: Path | None = field(default=None, compare=False)  # the YAML file it came from

    def resolve_weights(self, override: str | os.PathLike | None = None) -> Path:
        """The weights file: `override` or the config's path. A relative path is looked up in the current
        directory, in $SDCLI_WEIGHTS_DIR (by path, then by file name), beside the config file and one folder
        up (so a bundled config finds the repository's weights/), then in the sdcli package (bundled assets).
        When none exists, the first place is returned so the error names it."""
        raw = Path(override if override is not None else self.weights).expanduser()
        if raw.is_absolute():
            return raw
        candidates = [Path.cwd() / raw]
        if os.environ.get("SDCLI_WEIGHTS_DIR"):
            store = Path(os.environ["SDCLI_WEIGHTS_DIR"]).expanduser()
            candidates += [store / raw, store / raw.name]
        if self.source is not None and override is None:
            candidates += [self.source.parent / raw, self.source.parent.parent / raw]
        candidates.append(Path(__file__).resolve().parent / raw)
        return next((c for c in candidates if c.exists()), candidates[0])


def bundled_config_dir() -> Path:
    """Bundled configs: inside the package after a wheel install, else the repository's configs/."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def bundled_config_names() -> list[str]:
    return sorted(p.stem for p in bundled_config_dir().glob("*.yaml"))


def user_config_dir() -> Path:
    """User configs live in $SDCLI_HOME/configs (default ~/.config/sdcli/configs)."""
    home = os.environ.get("SDCLI_HOME") or Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")) / "sdcli"
    return Path(home).expanduser() / "configs"


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
        config = _build(ModelConfig, node, where, "")
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


def _build(cls, node: yaml.Node, where: str, path: str):
    """Turn a YAML mapping node into dataclass `cls`, checking keys, types and enum values."""
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
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"{line}: unknown key '{dotted}'{_suggest(key, fields)}")
        if key in values:
            raise ConfigError(f"{line}: key '{dotted}' given twice")
        values[key] = _convert(hints[key], value_node, where, dotted)
    missing = [n for n, f in fields.items() if n not in values and _is_required(f)]
    if missing:
        raise ConfigError(f"{here}: missing key '{(path + '.') if path else ''}{missing[0]}'")
    try:
        return _check(cls(**values), here, path)
    except TypeError as exc:
        raise ConfigError(f"{here}: {exc}") from None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint, node: yaml.Node, where: str, path: str):
    """Check one YAML value against a type hint and convert it."""
    line = f"{where}:{node.start_mark.line + 1}"
    if dataclasses.is_dataclass(hint):
        return _build(hint, node, where, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], node, where, path)
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{line}: '{path}' must be a list")
        return tuple(_convert(args[0], item, where, path) for item in node.value)
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


def _check(config, here: str, path: str):
    """Cross-field rules that a type hint cannot say."""
    if isinstance(config, UNetConfig):
        if (config.num_heads is None) == (config.head_dim is None):
            raise ConfigError(f"{here}: '{path}' needs exactly one of num_heads and head_dim")
        bad = [lvl for lvl in config.attention_levels if not 0 <= lvl < len(config.channel_mult)]
        if bad:
            raise ConfigError(f"{here}: '{path}.attention_levels' has level {bad[0]} outside channel_mult")
    if isinstance(config, Defaults):
        if config.sampler not in SAMPLERS:
            raise ConfigError(
                f"{here}: '{path}.sampler' is '{config.sampler}'{_suggest(config.sampler, SAMPLERS)}; "
                f"expected one of {', '.join(SAMPLERS)}"
            )
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{here}: '{path + '.' if path else ''}{f.name}' must not be negative")
    return config
