"""AUTOMATIC1111 infotext read back: the `parameters` text of a webui PNG (or a text file holding it) becomes
sdcli request values, with one warning line for each setting sdcli cannot honour.

The parse follows A1111's `parse_generation_parameters` (modules/infotext_utils.py, 1.9/1.10):
- the text is stripped and split on "\\n"; its last line is the settings line when A1111's pair pattern
  `\\s*(\\w[\\w \\-/]+):\\s*("(?:\\\\.|[^\\\\"])+"|[^,]*)(?:,|$)` finds at least 3 pairs in it, else it is one more
  prompt line (a prompt alone, or a settings line of 2 pairs, is all prompt);
- every other line is stripped; from the first line starting "Negative prompt:" on, lines are the negative
  (each such line loses that prefix); lines are joined with "\\n", leading empty lines dropped;
- a value that starts and ends with '"' is read as a JSON string when it is one (`Lora hashes: "a: 1, b: 2"`);
  a later pair of the same key replaces the earlier one's value; a pair with an empty value is dropped (A1111's
  parser fails on it and skips it).
The pair pattern backtracks quadratically (a 40 kB line of letters takes A1111 20 s), so `_pairs` scans the
line in linear time with the same result (tests/test_infotext.py checks the two agree).

Absent fields mean A1111's defaults (A1111_DEFAULTS): no `Clip skip` is 1, no `RNG` is GPU noise, no
`Schedule type` is Automatic, no `Emphasis` is Original. A1111 also splits any `NxM` value into `KEY-1`/`KEY-2`;
`fields` keeps the text as written and `request_values` reads `Size` itself.

Importing this module imports neither torch nor PIL; PNG chunks are read here, with bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.errors import RequestError
from sdcli.request import MAX_SEED
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.text_limits import clip

NEGATIVE_PREFIX = "Negative prompt:"
MIN_PAIRS = 3  # A1111: a last line with fewer `key: value` pairs is a prompt line
VALUE_CHARS = 60  # how much of a value a warning line echoes
KEY_CHARS = 40
MAX_WARNINGS = 24  # then one line counting the rest
MAX_TEXT_BYTES = 2**20  # a parameters chunk (after decompression) or a text file: PIL's own MAX_TEXT_CHUNK
MAX_CHUNK_BYTES = MAX_TEXT_BYTES + 2**16  # a text chunk as stored: keyword, flags and (compressed) text
MAX_PNG_CHUNKS = 2**16  # a PNG with more chunks is not read through
KEYWORD_BYTES = 80
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEY = b"parameters"  # the text chunk A1111 writes its infotext to (and reads from image.info)
AUTOV2_CHARS = 10  # A1111's short hash: sha256(file)[:10] (CheckpointInfo.shorthash; CivitAI's "AutoV2")
LEGACY_OFFSET, LEGACY_BYTES, LEGACY_CHARS = 0x100000, 0x10000, 8  # sd_models.model_hash, A1111 before 2023

# What each field A1111 (or a common extension) writes means to sdcli: one record per field, one place per fact.
#   request:     becomes a request value (request_values reads it);
#   info:        changes no pixel, so it is dropped on purpose and without a word;
#   unsupported: changes the image in A1111 and sdcli cannot do it: a warning line, unless the value is one of
#                `same` (what sdcli does anyway; numbers compare as numbers).
# Keys not listed (and no PREFIX_RULES match) get UNKNOWN_REASON.


@dataclass(frozen=True)
class Rule:
    effect: str  # "request", "info" or "unsupported"
    note: str  # request: the value it sets; info: why it changes nothing; unsupported: the warning's reason
    same: tuple[str | float, ...] = ()


def _request(note: str) -> Rule:
    return Rule("request", note)


def _info(note: str) -> Rule:
    return Rule("info", note)


def _unsupported(note: str, *same: str | float) -> Rule:
    return Rule("unsupported", note, same)


NO_IMG2IMG = "an img2img/inpaint setting; sdcli renders txt2img only"
FIELDS: dict[str, Rule] = {
    "Steps": _request("steps"),
    "Sampler": _request("sampler, with Schedule type (A1111's get_sampler_and_scheduler)"),
    "Schedule type": _request("sampler: the noise schedule of the Sampler"),
    "CFG scale": _request("guidance"),
    "Seed": _request("seed"),
    "Size": _request("width and height (WIDTHxHEIGHT)"),
    "Clip skip": _request("clip_skip (A1111's numbering, as sdcli's)"),
    "Emphasis": _request("prompt_syntax: Original is a1111, None is plain"),
    "Model hash": _request("model_hash: which weights file (find_model)"),
    "Model": _request("model: the weights file's name without extension, to try first"),
    "Version": _info("the program that wrote it; A1111 versions before 1.7 are warned about (_version_notes)"),
    "User": _info("who rendered it"),
    "Hashes": _info("CivitAI's copy of the model/LoRA hashes; Model hash and Lora hashes say the same"),
    "Template": _info("Dynamic Prompts' unexpanded prompt; the prompt holds what was rendered"),
    "Negative Template": _info("Dynamic Prompts' unexpanded negative; the negative holds what was rendered"),
    "Cache FP16 weight for LoRA": _info("a memory setting of FP8 weights with LoRA"),
    # the noise: sdcli draws it with torch.Generator("cpu") (sdcli/pipeline.py), which is A1111's "CPU" source
    "RNG": _unsupported("A1111 drew the noise on the GPU (NV: its CPU copy of NVIDIA's); sdcli draws it on the "
                        "CPU, so the same seed gives another image", "CPU"),
    "ENSD": _unsupported("eta noise seed delta offsets the ancestral samplers' noise seed", 0.0),
    "Eta": _unsupported("a non-default eta of the ancestral/SDE samplers", 1.0),
    "Eta DDIM": _unsupported("a non-zero DDIM eta", 0.0),
    "Sigma churn": _unsupported("a sampler noise setting sdcli does not have", 0.0),
    "Sigma tmin": _unsupported("a sampler noise setting sdcli does not have", 0.0),
    "Sigma tmax": _unsupported("a sampler noise setting sdcli does not have", math.inf),
    "Sigma noise": _unsupported("a sampler noise setting sdcli does not have", 1.0),
    "Schedule max sigma": _unsupported("a custom sigma range sdcli does not have"),
    "Schedule min sigma": _unsupported("a custom sigma range sdcli does not have"),
    "Schedule rho": _unsupported("a custom schedule rho sdcli does not have"),
    "Beta schedule alpha": _unsupported("a Beta schedule setting; sdcli has no Beta schedule"),
    "Beta schedule beta": _unsupported("a Beta schedule setting; sdcli has no Beta schedule"),
    "Discard penultimate sigma": _unsupported("A1111 dropped the next-to-last sigma; sdcli does not", "False"),
    "SGM noise multiplier": _unsupported("SGM's initial noise scaling, which sdcli does not do", "False"),
    "Downcast alphas_cumprod": _unsupported("A1111 sampled with fp16 alphas_cumprod (its old behaviour); "
                                            "sdcli's schedule is float32", "False"),
    "Pad conds": _unsupported("A1111 padded the shorter of prompt and negative with empty chunks; sdcli does not, "
                              "so the image differs when their 75-token chunk counts differ", "False"),
    "Pad conds v0": _unsupported("A1111's pre-1.6 DDIM padding (it also cut long negatives); sdcli does not pad",
                                 "False"),
    "Old prompt editing timelines": _unsupported("A1111's pre-1.6 [a:b:N] timing", "False"),
    "NGMS": _unsupported("A1111 skipped the negative prompt at low noise", 0.0),
    "NGMS all steps": _unsupported("A1111 skipped the negative prompt at low noise", "False"),
    "Skip Early CFG": _unsupported("A1111 (Forge) skipped guidance in the first steps", 0.0),
    "Token merging ratio": _unsupported("token merging (ToMe) approximates attention; sdcli's is exact", 0.0),
    "Token merging ratio hr": _unsupported("token merging in the hires pass; sdcli has no hires fix", 0.0),
    "Denoising strength": _unsupported("an img2img pass's strength; its init image is not in the infotext: "
                                       "re-render with --init-image and --strength"),  # a hires pass's: _hires
    "Hires upscale": _request("hires_scale"),
    "Hires steps": _request("hires_steps (0: as Steps)"),
    "Hires upscaler": _request("hires_upscale: Latent is latent, Lanczos lanczos (others: see _hires)"),
    "First pass size": _unsupported("the first pass of A1111's old hires fix; sdcli has no hires fix"),
    "Face restoration": _unsupported("sdcli restores no faces (GFPGAN/CodeFormer)"),
    "Tiling": _unsupported("sdcli renders no tileable images", "False"),
    "Variation seed": _unsupported("sdcli mixes in no variation noise"),
    "Variation seed strength": _unsupported("sdcli mixes in no variation noise", 0.0),
    "Seed resize from": _unsupported("sdcli does not resize the noise of another size", "-1x-1"),
    "Lora hashes": _info("the prompt's <lora:NAME:WEIGHT> tags name the files, looked up in the LoRA folders"),
    "TI hashes": _info("the embeddings' names in the prompts name the files, looked up in the embedding folders"),
    "Hypernet": _unsupported("hypernetworks are not supported"),
    "Hypernet hash": _unsupported("hypernetworks are not supported"),
    "Hypernet strength": _unsupported("hypernetworks are not supported"),
    "VAE": _unsupported("a separate VAE, not looked up by name or hash; pass --vae FILE to decode with it"),
    "VAE hash": _unsupported("a separate VAE, not looked up by name or hash; pass --vae FILE to decode with it"),
    "VAE Decoder": _unsupported("a TAESD preview decoder; sdcli decodes with the full VAE", "Full"),
    "VAE Encoder": _unsupported("a TAESD encoder (img2img/hires); sdcli renders txt2img only", "Full"),
    "FP8 weight": _unsupported("FP8-stored weights round the U-Net; sdcli loads the weights as they are",
                               "Disable"),
    "Image CFG scale": _unsupported("instruct-pix2pix image guidance; sdcli renders txt2img only"),
    "Conditional mask weight": _unsupported(NO_IMG2IMG),
    "Init image hash": _unsupported(NO_IMG2IMG),
    "Noise multiplier": _unsupported(NO_IMG2IMG, 1.0),
    "Extra noise": _unsupported(NO_IMG2IMG, 0.0),
    "Mask blur": _unsupported(NO_IMG2IMG),
    "Inpaint area": _unsupported(NO_IMG2IMG),
    "Masked area padding": _unsupported(NO_IMG2IMG),
    "Mask mode": _unsupported(NO_IMG2IMG),
    "Masked content": _unsupported(NO_IMG2IMG),
}  # fmt: skip
PREFIX_RULES: tuple[tuple[str, Rule], ...] = (
    ("Hires ", _unsupported("a hires-fix setting sdcli does not take; its hires pass uses the first pass's")),
    ("ADetailer ", _unsupported("an ADetailer pass; sdcli runs none")),
    ("ControlNet", _unsupported("ControlNet is not supported")),
    ("Refiner", _unsupported("a refiner model; sdcli runs none")),
)
UNKNOWN_REASON = "a setting sdcli does not know; ignored"
# What A1111 assumes for a field the text lacks (parse_generation_parameters and the options' defaults).
A1111_DEFAULTS = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic", "Emphasis": "Original"}
EMPHASIS_SYNTAX = {"Original": "a1111", "None": "plain"}  # A1111's sd_emphasis options sdcli has

# A1111 1.10's schedulers, in its order (sd_schedulers.schedulers: name, label, aliases). The order matters:
# get_sampler_and_scheduler strips a trailing scheduler name off the sampler name trying them in turn.
SCHEDULERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("automatic", "Automatic", ()),
    ("uniform", "Uniform", ()),
    ("karras", "Karras", ()),
    ("exponential", "Exponential", ()),
    ("polyexponential", "Polyexponential", ()),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ("kl_optimal", "KL Optimal", ()),
    ("align_your_steps", "Align Your Steps", ()),
    ("simple", "Simple", ()),
    ("normal", "Normal", ()),
    ("ddim", "DDIM", ()),
    ("beta", "Beta", ()),
)
SCHEDULER_LABELS = {key: label for name, label, _ in SCHEDULERS for key in (name, label)}  # schedulers_map
# A1111 1.9/1.10's samplers and the scheduler each uses for Automatic (sd_samplers_kdiffusion options
# 'scheduler'; None: k-diffusion's own sigmas, which are Uniform's). TIMESTEP_SAMPLERS take no schedule.
K_SAMPLERS: dict[str, str | None] = {
    "DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential", "DPM++ 2M SDE Heun": "exponential",
    "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential", "Euler a": None, "Euler": None, "LMS": None,
    "Heun": None, "DPM2": "karras", "DPM2 a": "karras", "DPM fast": None, "DPM adaptive": None, "Restart": "karras",
    "LCM": None,
}  # fmt: skip
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})
# Sampler names other tools write that A1111 does not know (it would paste its default sampler instead).
SAMPLER_ALIASES = {"PNDM": "PLMS"}
# A1111's backward-compatibility thresholds (infotext_versions.py): an image of an older version was rendered
# with old behaviour that A1111 switches back on when it pastes the infotext.
V160, V170_TSNR = (1, 6, 0, 0), (1, 7, 0, 226)  # 1.6.0; 1.7.0-225 (a post release: rank 225 + 1)


@dataclass(frozen=True)
class Infotext:
    """An A1111 infotext as its parser reads it: prompt, negative and the settings, in the order written."""

    prompt: str
    negative: str
    fields: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()  # keys whose value was empty: A1111's parser skips them


# A1111's pair pattern, in pieces that cannot backtrack (see _pairs).
_KEY_RUN = re.compile(r"\s*(\w[\w \-/]*)")
_SPACE = re.compile(r"\s*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"(?=,|$)')
_PLAIN = re.compile(r"[^,]*")


def _pairs(line: str) -> list[tuple[str, str]]:
    """`re.findall(A1111's pair pattern, line)`, in linear time.

    At a start position the pattern skips whitespace and takes the longest run of key characters from a word
    character; the pair needs that run to be 2 characters or more and followed by ':'. When it is not, every
    start up to the run's end fails the same way, so the scan resumes there. After the colon and any
    whitespace, the value is a quoted string followed by ',' or the end, else everything up to the next ','."""
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(line)
    while pos < end:
        run = _KEY_RUN.match(line, pos)
        if run is None:
            pos += 1
            continue
        colon = run.end()
        if colon - run.start(1) < 2 or colon >= end or line[colon] != ":":
            pos = colon
            continue
        start = _SPACE.match(line, colon + 1).end()
        value = _QUOTED.match(line, start) or _PLAIN.match(line, start)
        pos = value.end() + (1 if value.end() < end else 0)  # the ',' after it
        pairs.append((run.group(1), value.group(0)))
    return pairs


def _unquote(value: str) -> str:
    """A1111's unquote: a value in double quotes is a JSON string when it parses as one."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        text = json.loads(value)
    except (ValueError, RecursionError):
        return value
    return text if isinstance(text, str) else value


def _join(lines: list[str]) -> str:
    """A1111's `text += ("" if text == "" else "\\n") + line`: leading empty lines add nothing."""
    first = next((i for i, line in enumerate(lines) if line), len(lines))
    return "\n".join(lines[first:])


def parse_infotext(text: str) -> Infotext:
    """Prompt, negative and settings of an A1111 infotext; any text parses (a plain prompt has no settings)."""
    *lines, last = text.strip().split("\n")
    pairs = _pairs(last)
    if len(pairs) < MIN_PAIRS:
        lines.append(last)
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in pairs:
        if not value:
            dropped.append(key)
            continue
        fields[key] = _unquote(value) if value[0] == '"' and value[-1] == '"' else value
    return Infotext(_join(prompt), _join(negative), fields, tuple(dropped))


class _Warnings:
    """The warning lines, each short; after MAX_WARNINGS, one line names how many more there were."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.extra: list[str] = []

    def add(self, line: str, key: str = "") -> None:
        if len(self.lines) < MAX_WARNINGS:
            self.lines.append(line)
        else:
            self.extra.append(key)

    def field(self, key: str, value: str, reason: str) -> None:
        self.add(f"{_key(key)} {clip(value, VALUE_CHARS)}: {reason}", key)

    def result(self) -> list[str]:
        if not self.extra:
            return self.lines
        named = clip(", ".join(k for k in self.extra if k), VALUE_CHARS, quote=False)
        return [*self.lines, f"... and {len(self.extra)} more settings ignored ({named})"]


def _key(key: str) -> str:
    return clip(key, KEY_CHARS, quote=False)


def _rule(key: str) -> Rule | None:
    if key in FIELDS:
        return FIELDS[key]
    return next((rule for prefix, rule in PREFIX_RULES if key.startswith(prefix)), None)


def _is_same(value: str, same: tuple[str | float, ...]) -> bool:
    for expected in same:
        if isinstance(expected, str):
            if value.strip() == expected:
                return True
            continue
        try:
            if float(value) == expected:
                return True
        except ValueError:
            continue
    return False


_WHOLE = re.compile(r"[0-9]{1,20}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?")
_SIZE = re.compile(r"([0-9]{1,9})x([0-9]{1,9})")  # A1111's re_imagesize (^(\d+)x(\d+)$), ASCII digits


def _malformed(key: str, value: str, expected: str) -> RequestError:
    return RequestError(f"infotext {_key(key)} {clip(value, VALUE_CHARS)} is not {expected}")


def _whole(key: str, value: str) -> int:
    if not _WHOLE.fullmatch(value.strip()):
        raise _malformed(key, value, "a whole number")
    return int(value)


def _decimal(key: str, value: str) -> float:
    number = float(value) if _DECIMAL.fullmatch(value.strip()) else math.nan
    if not math.isfinite(number):
        raise _malformed(key, value, "a number")
    return number


def request_values(info: Infotext) -> tuple[dict, list[str]]:
    """sdcli request values from an infotext, and one warning line for each setting sdcli cannot honour.

    Values: prompt, negative, clip_skip and prompt_syntax always (A1111's defaults where the text has none);
    steps, guidance, seed, width, height, sampler, model_hash and model when the text gives them (sampler only
    where sdcli has the same sampler and schedule). model_hash and model are not request fields: they say which
    weights file (find_model). A malformed value of a field sdcli uses is a RequestError."""
    fields = info.fields
    values: dict = {"prompt": info.prompt, "negative": info.negative}
    warnings = _Warnings()
    if "Steps" in fields:
        values["steps"] = _whole("Steps", fields["Steps"])
    if "CFG scale" in fields:
        values["guidance"] = _decimal("CFG scale", fields["CFG scale"])
    if "Seed" in fields:
        values["seed"] = _whole("Seed", fields["Seed"])
        if values["seed"] > MAX_SEED:
            raise _malformed("Seed", fields["Seed"], f"a seed sdcli can use (0 to {MAX_SEED})")
    if "Size" in fields:
        size = _SIZE.fullmatch(fields["Size"].strip())
        if size is None or 0 in (int(size[1]), int(size[2])):
            raise _malformed("Size", fields["Size"], "WIDTHxHEIGHT (positive whole numbers)")
        values["width"], values["height"] = int(size[1]), int(size[2])
    clip_skip = fields.get("Clip skip", A1111_DEFAULTS["Clip skip"])
    values["clip_skip"] = _whole("Clip skip", clip_skip)
    emphasis = fields.get("Emphasis", A1111_DEFAULTS["Emphasis"]).strip()
    if emphasis in EMPHASIS_SYNTAX:
        values["prompt_syntax"] = EMPHASIS_SYNTAX[emphasis]
    else:
        warnings.field("Emphasis", emphasis, "sdcli has A1111's Original (a1111) and None (plain) only")
    for key in ("Model hash", "Model"):
        if fields.get(key, "").strip():
            values[key.lower().replace(" ", "_")] = fields[key].strip()
    sampler = _sdcli_sampler(fields, warnings)
    if sampler is not None:
        values["sampler"] = sampler
    consumed = _hires(fields, values, warnings)
    for key, value in fields.items():
        rule = _rule(key)
        if key in consumed:
            continue
        if rule is None:
            warnings.field(key, value, UNKNOWN_REASON)
        elif rule.effect == "unsupported" and not _is_same(value, rule.same):
            warnings.field(key, value, rule.note)
    for key in info.dropped:
        if key not in fields:
            warnings.add(f"{_key(key)}: its value is empty; ignored (as A1111 does)", key)
    if "Seed" in fields and "RNG" not in fields:
        warnings.add(f"RNG not given, which A1111 reads as GPU: {FIELDS['RNG'].note}", "RNG")
    if emphasis == "None" and "BREAK" in info.prompt + info.negative:
        warnings.add("Emphasis 'None' with BREAK: A1111 still splits there; sdcli's plain syntax reads the word")
    _version_notes(info, warnings)
    return values, warnings.result()


HIRES_UPSCALERS = {"Latent": "latent", "Lanczos": "lanczos"}  # A1111's names of the upscalers sdcli runs


def _hires(fields: dict[str, str], values: dict, warnings: _Warnings) -> set[str]:
    """A1111's hires fix as sdcli's hires fields, when the infotext has one (`Hires upscale`); the keys read.
    Its `Denoising strength` is then the hires pass's. An upscaler sdcli lacks (an ESRGAN model, another latent
    mode) is replaced by the nearest of its own, with a warning."""
    if "Hires upscale" not in fields:
        return set()
    values["hires_scale"] = _decimal("Hires upscale", fields["Hires upscale"])
    if "Hires steps" in fields:
        values["hires_steps"] = _whole("Hires steps", fields["Hires steps"])
    if "Denoising strength" in fields:
        values["hires_strength"] = _decimal("Denoising strength", fields["Denoising strength"])
    written = fields.get("Hires upscaler", "Latent").strip()  # A1111's default upscaler
    upscaler = HIRES_UPSCALERS.get(written)
    if upscaler is None:
        upscaler = "latent" if written.startswith("Latent") else "lanczos"
        warnings.field("Hires upscaler", written, f"sdcli has Latent (bilinear) and Lanczos; {upscaler} used")
    values["hires_upscale"] = upscaler
    return {"Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength"}


def _sdcli_sampler(fields: dict[str, str], warnings: _Warnings) -> str | None:
    """The sdcli sampler that runs what A1111 ran for `Sampler` and `Schedule type`, or None (with a warning)."""
    written = fields.get("Sampler")
    schedule_text = fields.get("Schedule type")
    if written is None:
        if schedule_text is not None:
            warnings.field("Schedule type", schedule_text, "given without a Sampler; ignored")
        return None
    name, scheduler = a1111_sampler(written, schedule_text)
    if scheduler is None:
        warnings.field("Schedule type", schedule_text or "", "not an A1111 schedule type; no sampler taken")
        return None
    shown = f"Sampler {clip(written, VALUE_CHARS)}"
    if name in TIMESTEP_SAMPLERS:
        effective = None  # DDIM, PLMS, UniPC take no schedule
    elif name in K_SAMPLERS:
        effective = K_SAMPLERS[name] if scheduler == "automatic" else scheduler
        effective = SCHEDULER_LABELS[effective or "uniform"]
    else:
        warnings.add(f"{shown}: not an A1111 sampler sdcli knows; pass --sampler")
        return None
    for spec in SAMPLER_SPECS.values():
        if spec.a1111_name == name and spec.a1111_schedule in (None, effective):
            return spec.name
    ours = [f"{spec.a1111_schedule} ({spec.name})" for spec in SAMPLER_SPECS.values() if spec.a1111_name == name]
    which = f"sdcli runs {name} only with {' or '.join(ours)}" if ours else "sdcli has no equivalent"
    warnings.add(f"{shown}, schedule {effective or 'n/a'}: {which}; pass --sampler")
    return None


def a1111_sampler(sampler: str, schedule_type: str | None) -> tuple[str, str | None]:
    """What A1111 1.9+ makes of `Sampler` and `Schedule type` (its get_sampler_and_scheduler, without falling
    back to its default sampler): the sampler name and the scheduler's name ("automatic": the sampler's own
    default), or None for a Schedule type A1111 does not know (it would silently use Automatic).

    A trailing scheduler name is stripped off an old-style sampler name and wins over Schedule type: each
    scheduler is tried in A1111's order against the name as stripped so far (`DPM++ 2M Karras` is DPM++ 2M,
    karras; `DPM++ 2M SGM Uniform` loses " Uniform" first and is no sampler at all, as in A1111)."""
    text = schedule_type if schedule_type is not None else A1111_DEFAULTS["Schedule type"]
    label = SCHEDULER_LABELS.get(text)
    found = None if label is None else next(n for n, lab, _ in SCHEDULERS if lab == label)
    name = SAMPLER_ALIASES.get(sampler, sampler)
    for scheduler, label, aliases in SCHEDULERS:
        for option in (label, scheduler, *aliases):
            if name.endswith(" " + option):
                found, name = scheduler, name[: -(len(option) + 1)]
                break
    return SAMPLER_ALIASES.get(name, name), found


def _a1111_version(text: str) -> tuple[int, int, int, int] | None:
    """A1111's parse_version for the versions it writes (v1.6.0, v1.7.0-225-g1a2b3c, v1.7.0-RC-5-g...):
    (major, minor, micro, rank), rank -1 for a release candidate, 0 a release, N+1 for the Nth commit after;
    None for anything else, which A1111 does not treat as one of its versions either."""
    kept = re.match(r"([^-]+-[^-]+)-.*", text)  # A1111 keeps the first two '-' parts
    m = re.fullmatch(
        r"v?([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})(?:-(?:([0-9]{1,9})|(rc[0-9]{0,9})))?",
        (kept.group(1) if kept else text).strip(),
        re.IGNORECASE,
    )
    if m is None:
        return None
    rank = -1 if m[5] else int(m[4]) + 1 if m[4] else 0
    return int(m[1]), int(m[2]), int(m[3]), rank


def _version_notes(info: Infotext, warnings: _Warnings) -> None:
    """What A1111's infotext_versions.backcompat switches on for an image of an older A1111."""
    version = info.fields.get("Version", "")
    parsed = _a1111_version(version)
    if parsed is None:
        return
    shown = f"Version {clip(version, VALUE_CHARS)}"
    if parsed < V170_TSNR and "Downcast alphas_cumprod" not in info.fields:
        warnings.add(
            f"{shown}: A1111 before 1.7.0-225 sampled with fp16 alphas_cumprod; sdcli's schedule is "
            "float32, so the image differs"
        )
    if parsed < V160 and info.fields.get("Sampler") in ("DDIM", "PLMS") and "Pad conds v0" not in info.fields:
        warnings.add(f"{shown}: A1111 before 1.6 padded DDIM/PLMS prompts its old way (Pad conds v0); sdcli does not")
    if parsed < V160 and "[" in info.prompt and "Old prompt editing timelines" not in info.fields:
        warnings.add(f"{shown}: A1111 before 1.6 timed [a:b:N] prompt editing its old way; sdcli does not")


# PNG text chunks and text files.


def read_parameters(path: Path, *, where: str | None = None) -> str | None:
    """The A1111 `parameters` text of a PNG (its tEXt, zTXt or iTXt chunk; the last one when there are
    several, as PIL's image.info keeps), None when the PNG has none; or the whole text of any other file,
    which must be UTF-8. Bounded: a chunk or file over MAX_TEXT_BYTES (after decompression) is refused.
    Errors are one RequestError line starting with `where` (default: the path)."""
    where = where or str(path)
    try:
        with Path(path).open("rb") as f:
            if f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
                return _png_parameters(f, where)
            f.seek(0)
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise RequestError(f"{where}: file not found") from None
    except OSError as exc:
        raise RequestError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise RequestError(f"{where}: more than {MAX_TEXT_BYTES} bytes; not an infotext (nor a PNG)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{where}: neither a PNG nor UTF-8 text (byte {exc.start} is not UTF-8)") from None
    if "\x00" in text:
        raise RequestError(f"{where}: neither a PNG nor a text file (it holds NUL bytes)")
    return text


def _png_parameters(f, where: str) -> str | None:
    found = None
    for _ in range(MAX_PNG_CHUNKS):
        head = f.read(8)
        if len(head) < 8:
            return found  # truncated between chunks: what came before stands (PIL reads it too)
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return found
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
            continue
        data = f.read(min(length, KEYWORD_BYTES))  # a keyword is 1-79 bytes and a NUL
        if data.split(b"\0", 1)[0] != PNG_KEY:
            f.seek(length - len(data) + 4, os.SEEK_CUR)
            continue
        if length > MAX_CHUNK_BYTES:
            raise RequestError(f"{where}: its parameters chunk holds {length} bytes, more than sdcli reads")
        data += f.read(length - len(data))
        crc = f.read(4)
        if len(data) < length or len(crc) < 4:
            raise RequestError(f"{where}: the PNG is cut off inside its parameters chunk")
        if zlib.crc32(kind + data) != int.from_bytes(crc, "big"):
            raise RequestError(f"{where}: its parameters chunk is corrupt (CRC mismatch)")
        found = _chunk_text(kind, data[len(PNG_KEY) + 1 :], where)
    raise RequestError(f"{where}: more than {MAX_PNG_CHUNKS} PNG chunks; not read through")


def _chunk_text(kind: bytes, body: bytes, where: str) -> str:
    """A text chunk's text after its keyword: tEXt Latin-1; zTXt method byte, zlib Latin-1; iTXt compression
    flag and method, language and translated keyword (NUL-ended), then UTF-8, zlib when flagged."""
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        if body[:1] != b"\0":
            raise RequestError(f"{where}: its parameters chunk is malformed (unknown compression)")
        return _inflate(body[1:], where).decode("latin-1")
    parts = body[2:].split(b"\0", 2)
    if len(body) < 2 or body[0] not in (0, 1) or (body[0] and body[1] != 0) or len(parts) < 3:
        raise RequestError(f"{where}: its parameters chunk is malformed (iTXt header)")
    text = _inflate(parts[2], where) if body[0] else parts[2]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{where}: its parameters chunk is not UTF-8 (byte {exc.start})") from None


def _inflate(data: bytes, where: str) -> bytes:
    """zlib data decompressed to at most MAX_TEXT_BYTES: a bomb is refused after that much work, no more."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise RequestError(f"{where}: its parameters chunk does not decompress ({exc})") from None
    if len(text) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise RequestError(f"{where}: its parameters chunk decompresses to more than {MAX_TEXT_BYTES} bytes")
    if not inflater.eof:
        raise RequestError(f"{where}: its parameters chunk's compressed text is cut off")
    return text


# Model hashes: which weights file an infotext's `Model hash` names.


def legacy_model_hash(path: Path) -> str:
    """A1111's old "model hash" (sd_models.model_hash, before 2023): the first 8 hex digits of the SHA-256
    of the 64 KiB at offset 1 MiB (of whatever is there: a smaller file hashes fewer bytes, or none)."""
    with Path(path).open("rb") as f:
        f.seek(LEGACY_OFFSET)
        return hashlib.sha256(f.read(LEGACY_BYTES)).hexdigest()[:LEGACY_CHARS]


def hash_kind(recorded: str) -> str | None:
    """The kind of a Model hash: "sha256" (64 hex digits), "autov2" (10: A1111's short hash, sha256[:10]),
    "legacy" (8: the old model hash), or None for anything else (any case is fine)."""
    text = recorded.strip().lower()
    if not re.fullmatch(r"[0-9a-f]+", text):
        return None
    return {64: "sha256", AUTOV2_CHARS: "autov2", LEGACY_CHARS: "legacy"}.get(len(text))


def hash_matches(file_sha256: str, path: Path, recorded: str) -> bool:
    """Whether `recorded` (a Model hash: full SHA-256, 10-digit AutoV2 or 8-digit legacy; any case) names the
    file at `path`, whose SHA-256 is `file_sha256` (sdcli.hashing.sha256_file). Only the legacy kind reads
    the file (64 KiB)."""
    kind, text, sha = hash_kind(recorded), recorded.strip().lower(), file_sha256.lower()
    if kind == "sha256":
        return sha == text
    if kind == "autov2":
        return sha[:AUTOV2_CHARS] == text
    if kind == "legacy":
        try:
            return legacy_model_hash(path) == text
        except OSError:
            return False
    return False


def find_model(
    recorded_hash: str,
    candidates: Iterable[Path],
    sha256_of: Callable[[Path], str],
    *,
    model_name: str | None = None,
) -> Path | None:
    """The first candidate file whose hash is `recorded_hash`, or None. Files named `model_name` (the
    infotext's Model: the file name without extension) are tried first; a legacy 8-digit hash is checked
    without `sha256_of` (which hashes the whole file; pass sdcli.hashing.sha256_file, which caches). The
    legacy hash covers 64 KiB only, so two files can share one: the first wins. Unreadable files are skipped."""
    kind = hash_kind(recorded_hash)
    if kind is None:
        return None
    seen: set[str] = set()
    files: list[Path] = []
    for candidate in candidates:
        path = Path(candidate)
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)
    if model_name:
        files.sort(key=lambda p: p.stem != model_name)  # stable: the caller's order otherwise
    for path in files:
        try:
            if not path.is_file():
                continue
            sha = "" if kind == "legacy" else sha256_of(path)
            if hash_matches(sha, path, recorded_hash):
                return path
        except OSError:
            continue
    return None
