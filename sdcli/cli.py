"""The sdcli command line: options and commands; the work lives in jobs, outputs and the pipeline.

torch is imported inside command bodies only, so `--help` and every bad-input check answer at once.
Exit codes: 0 done, 1 runtime failure or a failed image, 2 usage or bad input, 130 interrupted (SIGINT),
143 SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sdcli import __version__
from sdcli.checkpoint import config_for_weights, weights_problem
from sdcli.config import SAMPLERS, bundled_config_names, find_weights, load_config, user_config_dir
from sdcli.distributed import current_shard, shard_device, share
from sdcli.errors import CheckpointError, ConfigError, RequestError, SdcliError, Terminated
from sdcli.extra_networks import Library
from sdcli.jobs import MAX_COUNT, Item, derived_seed, next_index, plan, read_items
from sdcli.outputs import (
    DEFAULT_NAME,
    NAME_FIELDS,
    check_name_template,
    read_metadata,
    recorded_config,
    recorded_vae,
    recorded_weights,
)
from sdcli.progress import Reporter
from sdcli.request import ITEM_ONLY_TYPES, PROMPT_SYNTAXES, item_types, recorded_values, request_fields
from sdcli.runner import BATCH_SIZE, Job, Run, run_job
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.text_limits import clip

DEFAULT_CONFIG = "demo"
SEED_RANGE = 2**32  # random seeds stay short enough to type back
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Group(TyperGroup):
    """Turns every error into one `sdcli: error: ...` line on stderr and a documented exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = _exit_code(lambda: super(Group, self).main(args, prog_name or "sdcli", complete_var, False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


def _exit_code(call) -> int:
    try:
        result = call()
    except typer.TyperException as exc:  # usage errors: bad option, missing value, wrong type
        where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
        return _fail(f"{exc.format_message()}{where}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Terminated:
        return EXIT_SIGTERM
    except (ConfigError, RequestError, CheckpointError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except SdcliError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except OSError as exc:
        return _fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", EXIT_FAILURE)
    return result if isinstance(result, int) else 0


def _fail(message: str, code: int) -> int:
    one_line = message.strip().replace("\r", "\\r").replace("\n", "\\n")  # user text may hold line breaks
    print(f"sdcli: error: {one_line}", file=sys.stderr, flush=True)
    return code


app = typer.Typer(
    cls=Group,
    name="sdcli",
    help="Stable Diffusion from the shell: text to PNG, pixel-exact with diffusers.",
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context, version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False
) -> None:
    if version:
        print(f"sdcli {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


CONFIGS = "[default: the config's]"
Negative = Annotated[str | None, typer.Option("--negative", "-n", metavar="TEXT", help="Negative prompt.")]
Seed = Annotated[
    int | None,
    typer.Option(metavar="S", min=0, help="Seed of the first image; image i uses seed+i. [default: random]"),
]
Steps = Annotated[int | None, typer.Option(metavar="N", min=1, help=f"Sampler steps. {CONFIGS}")]
Guidance = Annotated[
    float | None, typer.Option("--guidance", "-g", metavar="W", help=f"Guidance scale; 1 turns it off. {CONFIGS}")
]
Sampler = Annotated[str | None, typer.Option(metavar="NAME", help=f"One of {', '.join(SAMPLERS)}. {CONFIGS}")]
Width = Annotated[int | None, typer.Option("--width", "-W", metavar="PX", help=f"Width, a multiple of 8. {CONFIGS}")]
Height = Annotated[int | None, typer.Option("--height", "-H", metavar="PX", help=f"Height, a multiple of 8. {CONFIGS}")]
ClipSkip = Annotated[
    int | None,
    typer.Option(metavar="N", min=1, help="Text layer as A1111 counts: 1 = last, 2 = the one before. [default: 1]"),
]
PromptSyntax = Annotated[
    str | None,
    typer.Option(
        metavar="S",
        help=f"{' or '.join(PROMPT_SYNTAXES)}: A1111's (weights), [less], BREAK and long prompts, "
        "or diffusers' literal text cut at 75 tokens. [default: a1111]",
    ),
]
Count = Annotated[
    int | None, typer.Option("--count", "-N", metavar="N", min=1, max=MAX_COUNT, help="Images per prompt. [default: 1]")
]
Config = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        metavar="CFG",
        help=f"Config name (see 'sdcli models') or YAML file. [default: {DEFAULT_CONFIG}]",
    ),
]
Weights = Annotated[
    str | None, typer.Option("--weights", "-w", metavar="FILE", help="Weights instead of the config's.")
]
InitImage = Annotated[
    str | None, typer.Option("--init-image", metavar="FILE", help="Start from this picture (img2img).")
]
Strength = Annotated[
    float | None,
    typer.Option(metavar="S", help="How much of the schedule runs from the init image, 0 < S <= 1. [default: 0.75]"),
]
Mask = Annotated[
    str | None, typer.Option("--mask", metavar="FILE", help="Repaint the white of this mask (with --init-image).")
]
MaskBlur = Annotated[int | None, typer.Option(metavar="PX", help="Blur the mask's edge by PX pixels. [default: 0]")]
Pad = Annotated[
    str | None,
    typer.Option(metavar="L,T,R,B", help="Outpaint: extend the init image by these pixels and paint the new area."),
]
HiresScale = Annotated[
    float | None,
    typer.Option(metavar="F", help="Hires fix: render, upscale by F, then refine with img2img. [default: 1, off]"),
]
HiresSteps = Annotated[int | None, typer.Option(metavar="N", help="Steps of the hires pass. [default: --steps]")]
HiresStrength = Annotated[
    float | None, typer.Option(metavar="S", help="Strength of the hires pass. [default: 0.7]")
]
HiresUpscale = Annotated[
    str | None, typer.Option(metavar="NAME", help="latent or lanczos: how the hires pass upscales. [default: latent]")
]
Vae = Annotated[
    str | None,
    typer.Option("--vae", metavar="FILE", help="Decode with this VAE (file or diffusers folder), not the model's."),
]
Loras = Annotated[
    list[str] | None,
    typer.Option("--lora", metavar="FILE[:W]", help="A LoRA merged at weight W (default 1); repeatable."),
]
LoraDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--lora-dir", metavar="DIR",
        help="Where <lora:NAME:W> tags are looked up first; then $SDCLI_HOME/loras and weights/loras.",
    ),
]  # fmt: skip
Embeddings = Annotated[
    list[str] | None,
    typer.Option("--embedding", metavar="FILE", help="A textual-inversion file, used where its name is in a prompt."),
]
EmbeddingDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--embedding-dir", metavar="DIR",
        help="Embeddings to look up by name first; then $SDCLI_HOME/embeddings and weights/embeddings.",
    ),
]  # fmt: skip
Device = Annotated[str | None, typer.Option(metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps. [default: auto]")]
Dtype = Annotated[
    DType | None,
    typer.Option(
        help="auto is fp16 on GPUs, fp32 (the reference's pixels) on the CPU; bf16 is ~1.7x faster on CPUs with"
        " bf16 instructions, with slightly different pixels. [default: auto]"
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output folder, created if needed.")]
Name = Annotated[
    str | None,
    typer.Option(metavar="TEMPLATE", help=f"File name; fields: {', '.join(NAME_FIELDS)}. [default: {DEFAULT_NAME}]"),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        metavar="N", min=1, help=f"Most images per U-Net call (1 renders each alone). [default: {BATCH_SIZE}]"
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace files of the same name (else never).")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors (and --json lines) are printed.")]
FailFast = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first image that fails (else report it and go on).")
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Read .ckpt/.pt weights (pickles) with torch's restricted weights-only loader."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        metavar="N", min=1, max=1024,
        help="CPU threads. [default: by model size and the cores free now: one for small models]",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Run the U-Net through torch.compile: minutes per new image size or batch shape, then cached on"
        " disk; pixels may differ slightly from eager.",
    ),
]


def _run_settings(
    *, weights, vae, device, dtype, threads, out, name, batch_size, overwrite, resume, fail_fast, allow_pickle,
    compile_,
) -> Run:  # fmt: skip
    """Check what can be checked without the model, so a typo fails before a multi-GB load."""
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        raise RequestError(f"--device {clip(device)}: expected auto, cpu, cuda, cuda:N or mps")
    if name is not None:
        check_name_template(name)
    return Run(
        out=out, weights=weights, vae=vae, device=device or "auto", dtype=dtype.value if dtype else "auto",
        threads=threads, batch_size=batch_size or BATCH_SIZE, overwrite=overwrite, resume=resume, fail_fast=fail_fast,
        allow_pickle=allow_pickle, compile=compile_,
    )  # fmt: skip


def _given(options: dict[str, Any], keys) -> dict[str, Any]:
    """The options among `keys` that the command line set."""
    return {key: options[key] for key in keys if options.get(key) is not None}


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT", help="What to draw.", show_default=False)] = None,
    negative: Negative = None,
    seed: Seed = None,
    steps: Steps = None,
    guidance: Guidance = None,
    sampler: Sampler = None,
    width: Width = None,
    height: Height = None,
    clip_skip: ClipSkip = None,
    prompt_syntax: PromptSyntax = None,
    count: Count = None,
    init_image: InitImage = None,
    strength: Strength = None,
    mask: Mask = None,
    mask_blur: MaskBlur = None,
    pad: Pad = None,
    hires_scale: HiresScale = None,
    hires_steps: HiresSteps = None,
    hires_strength: HiresStrength = None,
    hires_upscale: HiresUpscale = None,
    from_: Annotated[
        Path | None,
        typer.Option(
            "--from",
            metavar="FILE",
            help="Re-render an sdcli PNG or JSON sidecar, or an A1111 PNG or infotext; options given here override.",
        ),
    ] = None,
    config: Config = None,
    weights: Weights = None,
    vae: Vae = None,
    loras: Loras = None,
    lora_dirs: LoraDirs = None,
    embeddings: Embeddings = None,
    embedding_dirs: EmbeddingDirs = None,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    out: Out = Path("out"),
    name: Name = None,
    batch_size: BatchSize = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    quiet: Quiet = False,
    fail_fast: FailFast = False,
    allow_pickle: AllowPickle = False,
    compile_: Compile = False,
) -> None:
    """Render images of PROMPT (or re-render one with --from) into PNG files with JSON sidecars."""
    options = dict(locals())
    values = _given(options, request_fields())
    recorded: dict[str, Any] = {}
    a1111 = None
    if from_ is not None:
        from sdcli.a1111_source import is_sdcli_file, read_a1111, weights_for  # only --from pays for it
    if from_ is not None and not is_sdcli_file(from_):
        a1111 = read_a1111(from_)
        for line in a1111.warnings:
            print(f"sdcli: warning: --from {clip(str(from_), 60)}: {line}", file=sys.stderr, flush=True)
        values = {**a1111.values, **values}
    elif from_ is not None:
        recorded = read_metadata(from_)
        values = {**recorded_values(recorded), **values}
        device = device or recorded.get("device")
        dtype = dtype or (DType(recorded["dtype"]) if recorded.get("dtype") in DType.__members__ else None)
        threads = threads or recorded.get("threads")
        vae = vae or recorded_vae(recorded)
        compile_ = compile_ or recorded.get("compile") is True
    elif prompt is None:
        raise RequestError("give a PROMPT, or --from IMAGE.png to re-render one (see 'sdcli generate --help')")
    if not values["prompt"].strip():
        raise RequestError("the prompt is empty")
    if a1111 is not None and weights is None:
        found = weights_for(a1111)
        if found is None and config is None:
            where = clip(str(from_), 60)
            if not a1111.model_hash:
                raise RequestError(
                    f"--from {where}: A1111 infotext that names no model (no Model hash); pass --weights or --config"
                )
            raise RequestError(
                f"--from {where}: no file in the weights folders has its Model hash {clip(a1111.model_hash, 20)}; "
                "pass --weights or --config"
            )
        weights = None if found is None else str(found)
    if from_ is not None and a1111 is None and config is None:
        model = _from_config(recorded, from_)
    else:
        model = _model(config, weights, allow_pickle)
    if from_ is not None and a1111 is None and weights is None:
        weights = recorded_weights(recorded, model)
    run = _run_settings(
        weights=weights, vae=vae, device=device, dtype=dtype, threads=threads, out=out, name=name,
        batch_size=batch_size, overwrite=overwrite, resume=False, fail_fast=fail_fast, allow_pickle=allow_pickle,
        compile_=compile_,
    )  # fmt: skip
    items = [Item("", 0, values)]
    seeds = lambda _: secrets.randbelow(SEED_RANGE)  # noqa: E731
    library = Library(tuple(lora_dirs or ()), tuple(embedding_dirs or ()))
    planned = plan(
        items, _given(options, ITEM_ONLY_TYPES), model, seed_for=seeds, first_index=next_index(run.out), library=library
    )
    _run(Job(model, planned, run, recorded, str(from_ or "")), quiet=quiet, json_lines=json_out)


def _model(config: str | None, weights: str | None, allow_pickle: bool):
    """The config asked for; without one, the bundled config of the --weights file's family (from its keys),
    else the demo model."""
    if config is None and weights is not None:
        path = find_weights(weights)
        if not path.exists():
            raise CheckpointError(f"weights file not found: {path}")
        config = config_for_weights(path, allow_pickle=allow_pickle)
    return load_config(config or DEFAULT_CONFIG)


def _from_config(recorded: dict[str, Any], source: Path):
    """The config --from's image was made with, or a clear line when it is not here."""
    try:
        return load_config(recorded_config(recorded))
    except ConfigError as exc:
        raise ConfigError(
            f"--from {source}: made with config {clip(recorded['config'])}, which is not here ({exc}); pass --config"
        ) from None


@app.command()
def batch(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE",
            help="Prompt file: text (a prompt a line), .jsonl or .yaml; '-' reads stdin.",
            show_default=False,
        ),
    ],
    negative: Negative = None,
    seed: Annotated[
        int | None,
        typer.Option(metavar="S", help="Seed of every item without its own. [default: fixed per item]", min=0),
    ] = None,
    steps: Steps = None,
    guidance: Guidance = None,
    sampler: Sampler = None,
    width: Width = None,
    height: Height = None,
    clip_skip: ClipSkip = None,
    prompt_syntax: PromptSyntax = None,
    count: Count = None,
    init_image: InitImage = None,
    strength: Strength = None,
    mask: Mask = None,
    mask_blur: MaskBlur = None,
    pad: Pad = None,
    hires_scale: HiresScale = None,
    hires_steps: HiresSteps = None,
    hires_strength: HiresStrength = None,
    hires_upscale: HiresUpscale = None,
    config: Config = None,
    weights: Weights = None,
    vae: Vae = None,
    loras: Loras = None,
    lora_dirs: LoraDirs = None,
    embeddings: Embeddings = None,
    embedding_dirs: EmbeddingDirs = None,
    device: Device = None,
    dtype: Dtype = None,
    threads: Threads = None,
    out: Out = Path("out"),
    name: Name = None,
    batch_size: BatchSize = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    quiet: Quiet = False,
    fail_fast: FailFast = False,
    allow_pickle: AllowPickle = False,
    compile_: Compile = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Render only share I of N (0 <= I < N), e.g. for Slurm arrays; under torchrun, ranks share it.",
        ),
    ] = None,
) -> None:
    """Render every prompt of FILE (items may override the options); a rerun skips finished images."""
    options = dict(locals())
    run = _run_settings(
        weights=weights, vae=vae, device=device, dtype=dtype, threads=threads, out=out, name=name,
        batch_size=batch_size, overwrite=overwrite, resume=True, fail_fast=fail_fast, allow_pickle=allow_pickle,
        compile_=compile_,
    )  # fmt: skip
    part = current_shard(shard)
    items = read_items(file)
    model = _model(config, weights, allow_pickle)
    given = _given(options, (key for key in item_types() if key != "prompt"))
    library = Library(tuple(lora_dirs or ()), tuple(embedding_dirs or ()))
    planned = share(plan(items, given, model, seed_for=derived_seed, library=library), part, run.batch_size)
    run = dataclasses.replace(run, device=shard_device(run.device, part))
    _run(Job(model, planned, run), quiet=quiet, json_lines=json_out, label=part.label if part.count > 1 else "")


def _run(job: Job, *, quiet: bool, json_lines: bool, label: str = "") -> None:
    with Reporter(quiet=quiet, label=label, json_lines=json_lines) as reporter:
        run_job(job, reporter)


@app.command()
def models(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per config on stdout.")] = False,
) -> None:
    """List the bundled and user model configs and whether their weights are there and readable."""
    names = sorted(set(bundled_config_names()) | {p.stem for p in user_config_dir().glob("*.yaml")})
    for config_name in names:
        try:
            model = load_config(config_name)
        except ConfigError as exc:
            row = {"name": config_name, "state": "invalid", "error": str(exc)}
        else:
            weights = model.resolve_weights()
            problem = weights_problem(weights) if weights.is_file() else None
            row = {
                "name": config_name,
                "state": "invalid" if problem else "ready" if weights.is_file() else "missing",
                "source": "user" if model.source and model.source.parent == user_config_dir() else "bundled",
                "config": str(model.source),
                "weights": str(weights),
                "present": weights.is_file(),
                "description": model.description,
                **({"error": problem} if problem else {}),
            }
        if json_out:
            print(json.dumps(row, ensure_ascii=False))
        elif "source" not in row:
            print(f"{row['name']:<16} invalid  {row['error']}")
        else:
            why = f"  ({row['error']})" if "error" in row else ""
            print(f"{row['name']:<16} {row['state']:<8} {row['source']:<8} {row['weights']}  {row['description']}{why}")


@app.command()
def loras(
    lora_dirs: LoraDirs = None,
    embedding_dirs: EmbeddingDirs = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per file on stdout.")] = False,
) -> None:
    """List the LoRAs that <lora:NAME> tags find and the embeddings that prompts can name."""
    from sdcli.extra_networks import describe

    library = Library(tuple(lora_dirs or ()), tuple(embedding_dirs or ()))
    for kind, found in (("lora", library.loras), ("embedding", library.embeddings)):
        for _, path in sorted(found.items()):
            row = {"kind": kind, "name": path.stem, "file": str(path), "what": describe(path)}
            if json_out:
                print(json.dumps(row, ensure_ascii=False))
            else:
                print(f"{kind:<10} {path.stem:<24} {row['what']}  {path}")


@app.command()
def samplers(
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per sampler on stdout.")] = False,
) -> None:
    """List the samplers, each reproducing one diffusers scheduler, with A1111's closest setting."""
    for spec in SAMPLER_SPECS.values():
        a1111 = spec.a1111_name + (f", Schedule type: {spec.a1111_schedule}" if spec.a1111_schedule else "")
        if json_out:
            row = {"name": spec.name, "description": spec.description, "diffusers": spec.scheduler}
            print(json.dumps(row | {"a1111_sampler": spec.a1111_name, "a1111_schedule_type": spec.a1111_schedule}))
        else:
            print(f"{spec.name:<16} {spec.description} (A1111: {a1111})")
