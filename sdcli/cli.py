"""The sdcli command line: options and commands; the work lives in jobs, outputs and the pipeline.

torch is imported inside command bodies only, so `--help` and every bad-input check answer at once.
Exit codes: 0 done, 1 runtime failure or a failed image, 2 usage or bad input, 130 interrupted (SIGINT),
143 SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sdcli import __version__
from sdcli.checkpoint import check_pickle_allowed
from sdcli.config import SAMPLERS, ModelConfig, bundled_config_names, load_config, user_config_dir
from sdcli.distributed import current_shard, shard_device, share
from sdcli.errors import CheckpointError, ConfigError, RequestError, SdcliError
from sdcli.jobs import MAX_COUNT, Item, Planned, Target, batches, derived_seed, next_index, place, plan, read_items
from sdcli.outputs import (
    DEFAULT_NAME,
    NAME_FIELDS,
    build_metadata,
    check_name_template,
    config_reference,
    load_existing,
    prepare_folder,
    read_metadata,
    remove_stale_temps,
    write_pair,
)
from sdcli.progress import Reporter
from sdcli.request import request_fields

DEFAULT_CONFIG = "demo"
SEED_RANGE = 2**32  # random seeds stay short enough to type back
BATCH_SIZE = 4  # images per U-Net call: about 2x faster than one at a time on the CPU with the demo model
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
SAMPLER_NOTES = {
    "ddim": "DDIM (Song et al. 2020); diffusers DDIMScheduler",
    "pndm": "PNDM/PLMS (Liu et al. 2022); diffusers PNDMScheduler",
    "euler": "Euler (Karras et al. 2022); diffusers EulerDiscreteScheduler",
    "euler_a": "Euler ancestral; diffusers EulerAncestralDiscreteScheduler",
    "heun": "Heun, 2nd order (Karras et al. 2022); diffusers HeunDiscreteScheduler",
    "lms": "linear multistep; diffusers LMSDiscreteScheduler",
    "dpmpp_2m": "DPM-Solver++(2M) (Lu et al. 2022); diffusers DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPM-Solver++(2M), Karras sigmas; the same with use_karras_sigmas=True",
}
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143
NON_FINITE = "the image came out NaN or infinite (a numeric overflow)"


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, discarding the image in flight."""


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


def main() -> None:
    """Console entry point."""
    app(prog_name="sdcli")


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
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Run the U-Net through torch.compile: minutes per new image size or batch shape, then cached on"
        " disk; pixels may differ slightly from eager.",
    ),
]


@dataclass(frozen=True)
class Run:
    """How a job runs, as opposed to what its images are."""

    config: str
    weights: str | None
    device: str
    dtype: str
    out: Path
    batch_size: int | None
    overwrite: bool
    json: bool
    quiet: bool
    fail_fast: bool
    allow_pickle: bool
    compile: bool


def _run_settings(
    *, config, weights, device, dtype, out, name, batch_size, overwrite, json_out, quiet, fail_fast, allow_pickle,
    compile_,
) -> Run:  # fmt: skip
    """Check what can be checked without the model, so a typo fails before a multi-GB load."""
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        raise RequestError(f"--device '{device}': expected auto, cpu, cuda, cuda:N or mps")
    if name is not None:
        check_name_template(name)
    return Run(
        config=config or DEFAULT_CONFIG, weights=weights, device=device or "auto",
        dtype=dtype.value if dtype else "auto", out=out, batch_size=batch_size, overwrite=overwrite,
        json=json_out, quiet=quiet, fail_fast=fail_fast, allow_pickle=allow_pickle, compile=compile_,
    )  # fmt: skip


def _given(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


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
    count: Count = None,
    from_: Annotated[
        Path | None,
        typer.Option(
            "--from",
            metavar="FILE",
            help="Re-render an sdcli PNG or JSON sidecar; options given here override its values.",
        ),
    ] = None,
    config: Config = None,
    weights: Weights = None,
    device: Device = None,
    dtype: Dtype = None,
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
    values = _given(
        prompt=prompt,
        negative=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        width=width,
        height=height,
    )
    recorded: dict[str, Any] = {}
    if from_ is not None:
        recorded = read_metadata(from_)
        values = {**{key: recorded[key] for key in request_fields()}, **values}
        config = config or _recorded_config(recorded)
        weights = weights or (recorded["weights"] if Path(recorded.get("weights", "")).is_file() else None)
        device = device or recorded.get("device")
        dtype = dtype or (DType(recorded["dtype"]) if recorded.get("dtype") in DType.__members__ else None)
        compile_ = compile_ or recorded.get("compile") is True
    elif prompt is None:
        raise RequestError("give a PROMPT, or --from IMAGE.png to re-render one (see 'sdcli generate --help')")
    if not values["prompt"].strip():
        raise RequestError("the prompt is empty")
    run = _run_settings(
        config=config, weights=weights, device=device, dtype=dtype, out=out, name=name, batch_size=batch_size,
        overwrite=overwrite, json_out=json_out, quiet=quiet, fail_fast=fail_fast, allow_pickle=allow_pickle,
        compile_=compile_,
    )  # fmt: skip
    model = load_config(run.config)
    first = next_index(run.out)
    items = [Item("", 0, values)]
    planned = plan(
        items,
        _given(count=count, name=name),
        model,
        seed_for=lambda _: secrets.randbelow(SEED_RANGE),
        first_index=first,
    )
    _render(run, model, planned, resume=False, recorded=recorded, source=str(from_) if from_ else "")


def _recorded_config(recorded: dict[str, Any]) -> str:
    """The recorded config file when it still exists, else its name."""
    path = recorded.get("config_path")
    return path if path and Path(path).is_file() else recorded["config"]


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
    count: Count = None,
    config: Config = None,
    weights: Weights = None,
    device: Device = None,
    dtype: Dtype = None,
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
    run = _run_settings(
        config=config, weights=weights, device=device, dtype=dtype, out=out, name=name, batch_size=batch_size,
        overwrite=overwrite, json_out=json_out, quiet=quiet, fail_fast=fail_fast, allow_pickle=allow_pickle,
        compile_=compile_,
    )  # fmt: skip
    part = current_shard(shard)
    items = read_items(file)
    model = load_config(run.config)
    options = _given(
        negative=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        width=width,
        height=height,
        count=count,
        name=name,
    )
    planned = share(plan(items, options, model, seed_for=derived_seed), part, run.batch_size or BATCH_SIZE)
    run = dataclasses.replace(run, device=shard_device(run.device, part))
    _render(run, model, planned, resume=True, label=part.label if part.count > 1 else "")


def _render(
    run: Run,
    model: ModelConfig,
    planned: list[Planned],
    *,
    resume: bool,
    recorded=None,
    source: str = "",
    label: str = "",
) -> None:
    """Place the planned images, skip the complete ones, load the model only if work is left, render."""
    from sdcli.hashing import cached_sha256, sha256_file

    weights = model.resolve_weights(run.weights)
    if not weights.is_file():
        hint = "" if run.weights else f" (config '{model.name}'; put the file there or pass --weights)"
        raise CheckpointError(f"weights file not found: {weights}{hint}")
    check_pickle_allowed(weights, run.allow_pickle)
    prepare_folder(run.out)
    remove_stale_temps(run.out)
    with Reporter(quiet=run.quiet, label=label) as reporter, _warnings_to(reporter), _sigterm_raises():
        stamp = _stamp(weights)
        if cached_sha256(weights) is None:
            reporter.info(f"hashing {weights} (once per file)")
        sha = sha256_file(weights)
        if recorded and recorded.get("weights_sha256") not in (None, sha):
            reporter.warning(f"{weights} is not the weights file {source} was made with; the image will differ")
        extra = {"config": config_reference(model), "weights_sha256": sha}
        targets = place(planned, run.out, extra, overwrite=run.overwrite, resume=resume)
        todo = [t for t in targets if not t.done]
        for target in targets:
            if target.done:
                reporter.image_skipped(target.png)
                _emit(run, target, load_existing(target.png, target.sidecar) or {}, "skipped")
        reporter.begin(len(todo))
        try:
            if todo:
                pipe = _load_pipeline(run, model, weights, reporter)
                if _stamp(weights) != stamp:
                    raise CheckpointError(
                        f"{weights} changed or vanished while it was being read; run again once it is complete"
                    )
                _render_targets(run, pipe, sha, todo, reporter)
        except (KeyboardInterrupt, Terminated) as exc:
            how = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
            reporter.summary(len(todo) - reporter.written - reporter.failed, interrupted=how)
            raise
        except SdcliError:
            if reporter.written or reporter.failed:
                reporter.summary(len(todo) - reporter.written - reporter.failed, interrupted="stopped")
            raise
        reporter.summary()
    if reporter.failed:
        raise SdcliError(f"{reporter.failed} of {len(todo)} images failed; the 'failed:' lines above say why")


def _stamp(weights: Path) -> list[int] | None:
    """Size and modification time of the weights, None when the file is gone."""
    from sdcli.hashing import file_stamp

    try:
        return file_stamp(weights)
    except OSError:
        return None


def _load_pipeline(run: Run, model: ModelConfig, weights: Path, reporter: Reporter):
    """The model on its device; a pickle checkpoint only with --allow-pickle."""
    from sdcli.pipeline import Pipeline

    reporter.info(f"loading {model.name} from {weights}")
    try:
        return Pipeline.load(
            model, weights, device=run.device, dtype=run.dtype, allow_pickle=run.allow_pickle, compile=run.compile
        )
    except RequestError as exc:  # a device this machine lacks, perhaps recorded by --from's image
        raise RequestError(f"{exc}; choose another with --device") from None


def _render_targets(run: Run, pipe, sha: str, todo: list[Target], reporter: Reporter) -> None:
    """Render the targets in U-Net batches and write each image as it is done. An image that fails (not
    finite, or out of memory alone) is reported and the job goes on, unless --fail-fast; a batch that runs
    out of memory is halved."""
    import torch

    queue = deque(batches(todo, run.batch_size or BATCH_SIZE))
    while queue:
        group = queue.popleft()
        reporter.start_batch(len(group))
        try:
            images = pipe.generate([t.request for t in group], reporter.step)
            why = NON_FINITE + ("; try --dtype bf16 or fp32" if pipe.dtype_name == "fp16" else "")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(group) > 1:
                half = len(group) // 2
                reporter.warning(f"out of memory with {len(group)} images in one batch; trying {half}")
                queue.extendleft([group[half:], group[:half]])
                continue
            r = group[0].request
            images, why = [None], f"out of memory on {pipe.device_name} for a {r.width}x{r.height} image"
        seconds = reporter.batch_done() / len(group)
        for target, image in zip(group, images, strict=True):
            if image is None:
                _failed(run, target, why, reporter)
                continue
            meta = build_metadata(
                target.request, config=pipe.config, weights=pipe.weights, weights_sha256=sha,
                device=pipe.device_name, dtype=pipe.dtype_name, batch_size=len(group), elapsed=seconds,
                compiled=run.compile,
            )  # fmt: skip
            with _signals_held():
                try:
                    write_pair(image, meta, target.png, target.sidecar)
                except OSError as exc:
                    raise SdcliError(f"cannot write {target.png}: {exc.strerror or exc}") from None
                reporter.image_written(target.png, seconds)
                _emit(run, target, meta, "written")


def _failed(run: Run, target: Target, reason: str, reporter: Reporter) -> None:
    what = ", ".join(filter(None, (target.planned.where, f"seed {target.request.seed}", target.png.name)))
    reporter.image_failed(what, reason)
    _emit(run, target, {**dataclasses.asdict(target.request), "error": reason}, "failed")
    if run.fail_fast:
        raise SdcliError(f"stopped at the first failed image (--fail-fast): {what}")


def _emit(run: Run, target: Target, meta: dict[str, Any], status: str) -> None:
    """The result line on stdout: the PNG path, or with --json the paths, status and metadata (a failed
    image has a line only with --json)."""
    if run.json:
        line = {"image": str(target.png), "metadata": str(target.sidecar), "status": status, **meta}
        print(json.dumps(line, ensure_ascii=False), flush=True)
    elif not run.quiet and status != "failed":
        print(target.png, flush=True)


class _ToReporter(logging.Handler):
    """Routes the library's warnings (e.g. a truncated prompt) through the progress display."""

    def __init__(self, reporter: Reporter):
        super().__init__(logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.warning(record.getMessage())


@contextmanager
def _warnings_to(reporter: Reporter) -> Iterator[None]:
    logger, handler = logging.getLogger("sdcli"), _ToReporter(reporter)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C: the image in flight is discarded, finished ones stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while an image is written and reported, so each pair on disk has its line."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered now


@app.command()
def models(json_out: Json = False) -> None:
    """List the bundled and user model configs and whether their weights are present."""
    names = sorted(set(bundled_config_names()) | {p.stem for p in user_config_dir().glob("*.yaml")})
    rows = []
    for config_name in names:
        try:
            model = load_config(config_name)
        except ConfigError as exc:
            rows.append({"name": config_name, "error": str(exc)})
            continue
        weights = model.resolve_weights()
        rows.append({
            "name": config_name,
            "source": "user" if model.source and model.source.parent == user_config_dir() else "bundled",
            "config": str(model.source),
            "weights": str(weights),
            "present": weights.is_file(),
            "description": model.description,
        })  # fmt: skip
    for row in rows:
        if json_out:
            print(json.dumps(row, ensure_ascii=False))
        elif "error" in row:
            print(f"{row['name']:<16} invalid  {row['error']}")
        else:
            state = "ready" if row["present"] else "missing"
            print(f"{row['name']:<16} {state:<8} {row['source']:<8} {row['weights']}  {row['description']}")


@app.command()
def samplers(json_out: Json = False) -> None:
    """List the samplers, each reproducing one diffusers scheduler."""
    for sampler_name in SAMPLERS:
        if json_out:
            print(json.dumps({"name": sampler_name, "description": SAMPLER_NOTES[sampler_name]}))
        else:
            print(f"{sampler_name:<16} {SAMPLER_NOTES[sampler_name]}")
