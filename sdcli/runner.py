"""The job runner: planned images in, finished files out.

It places the images in the output folder, skips those already complete, loads the model only when work
is left, renders in U-Net batches (halving a batch that runs out of GPU memory), writes each image as
it is done and tells an `Events` listener what happens; the CLI's progress display is one listener, the
demo evaluator, the benchmark and the tests can be others. Nothing here parses options or prints.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Protocol

from sdcli.checkpoint import check_pickle_allowed
from sdcli.config import ModelConfig
from sdcli.errors import CheckpointError, RequestError, SdcliError, Terminated, raise_terminated
from sdcli.jobs import Planned, Target, batches, next_index, place
from sdcli.outputs import (
    build_metadata,
    config_reference,
    folder_lock,
    load_existing,
    name_stem,
    prepare_folder,
    remove_stale_temps,
    template_fields,
    write_pair,
)
from sdcli.request import FileUse, file_fields

BATCH_SIZE = 4  # images per U-Net call: about 2x faster than one at a time on the CPU with the demo model
NON_FINITE = "the image came out NaN or infinite (a numeric overflow)"
SUFFIXES = 10_000  # `-1` ... names tried before a write gives up on finding a free one


@dataclass(frozen=True)
class Run:
    """How a job runs, as opposed to what its images are."""

    out: Path
    weights: str | None = None  # instead of the config's
    vae: str | None = None  # a VAE file or folder instead of the config's (else the checkpoint's own)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # CPU threads; None picks by model size and free cores (sdcli.threads)
    batch_size: int = BATCH_SIZE
    overwrite: bool = False
    resume: bool = True  # a complete pair of the same recipe is done (batch); else every image is new (generate)
    fail_fast: bool = False
    allow_pickle: bool = False
    compile: bool = False


@dataclass(frozen=True)
class Outcome:
    """How one image ended: `written`, `skipped` (already complete) or `failed` (with `error`)."""

    status: str
    target: Target
    meta: dict[str, Any]
    error: str = ""


@dataclass
class Tally:
    """What a job has done so far."""

    planned: int = 0  # images left to render once the complete ones were skipped
    written: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def remaining(self) -> int:
        return self.planned - self.written - self.failed


class Events(Protocol):
    """What a running job reports; every method is a notification and returns nothing."""

    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def begin(self, total: int) -> None: ...  # rendering of `total` images starts
    def start_batch(self, size: int) -> None: ...
    def step(self, done: int, total: int) -> None: ...  # network evaluations of the current batch
    def batch_done(self) -> float: ...  # seconds the batch took
    def image(self, outcome: Outcome) -> None: ...
    def summary(self, tally: Tally, interrupted: str | None = None) -> None: ...


@dataclass
class Job:
    """One run of planned images against a model."""

    model: ModelConfig
    planned: list[Planned]
    run: Run
    recorded: dict[str, Any] = field(default_factory=dict)  # --from's metadata, to warn when the weights differ
    source: str = ""  # where `recorded` came from


def run_job(job: Job, events: Events) -> Tally:
    """Render the job's images, reporting to `events`; raises SdcliError when an image failed."""
    from sdcli.hashing import is_hashed, sha256_of

    run, model = job.run, job.model
    _check_device(run.device)
    weights = model.resolve_weights(run.weights)
    if not weights.exists():
        hint = "" if run.weights else f" (config '{model.name}'; put the file there or pass --weights)"
        raise CheckpointError(f"weights file not found: {weights}{hint}")
    check_pickle_allowed(weights, run.allow_pickle)
    prepare_folder(run.out)
    remove_stale_temps(run.out)
    tally = Tally()
    with _warnings_to(events), _sigterm_raises():
        stamp = _stamp(weights)
        if not is_hashed(weights):
            events.info(f"hashing {weights} (once per file)")
        sha = sha256_of(weights)
        if job.recorded and job.recorded.get("weights_sha256") not in (None, sha):
            events.warning(f"{weights} is not the weights file {job.source} was made with; the image will differ")
        vae = _vae(job, events)
        extra = {"config": config_reference(model), "weights_sha256": sha, "vae_sha256": vae[1] if vae else None}
        planned = _hashed(job, events)
        targets = place(planned, run.out, extra, overwrite=run.overwrite, resume=run.resume)
        todo = [t for t in targets if not t.done]
        for target in targets:
            if target.done:
                tally.skipped += 1
                events.image(Outcome("skipped", target, load_existing(target.png, target.sidecar) or {}))
        tally.planned = len(todo)
        events.begin(len(todo))
        try:
            if todo:
                _Renderer(job, events, tally, weights, sha, stamp, vae).render(todo)
        except (KeyboardInterrupt, Terminated) as exc:
            events.summary(tally, "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated")
            raise
        except SdcliError:
            if tally.written or tally.failed:
                events.summary(tally, "stopped")
            raise
        events.summary(tally)
    if tally.failed:
        raise SdcliError(f"{tally.failed} of {len(todo)} images failed; the 'failed:' lines above say why")
    return tally


def _vae(job: Job, events: Events) -> tuple[Path, str] | None:
    """The separate VAE to decode with and its SHA-256 (of the weights file inside a diffusers folder)."""
    from sdcli.hashing import is_hashed, sha256_of

    path = job.model.resolve_vae(job.run.vae)
    if path is None:
        return None
    if not path.exists():
        raise CheckpointError(f"VAE file not found: {path}")
    check_pickle_allowed(path, job.run.allow_pickle)
    if not is_hashed(path):
        events.info(f"hashing {path}")
    sha = sha256_of(path)
    if job.recorded.get("vae_sha256") not in (None, sha):
        events.warning(f"{path} is not the VAE {job.source} was made with; the image will differ")
    return path, sha


def _hashed(job: Job, events: Events) -> list[Planned]:
    """The planned images with the SHA-256 of every LoRA and embedding they use, so a recipe names bytes
    (resume compares them); a pickle is refused here without --allow-pickle, before the model loads."""
    from sdcli.hashing import cached_sha256, sha256_file

    known: dict[str, str] = {}

    def hashed(use: FileUse) -> FileUse:
        if use.file not in known:
            path = Path(use.file)
            check_pickle_allowed(path, job.run.allow_pickle)
            if cached_sha256(path) is None:
                events.info(f"hashing {path}")
            known[use.file] = sha256_file(path)
        sha = known[use.file]
        if use.sha256 and use.sha256 != sha:
            made = job.source or "the recipe"
            events.warning(f"{use.file} is not the file {made} was made with; the image will differ")
        return dataclasses.replace(use, sha256=sha)

    return [
        dataclasses.replace(p, request=dataclasses.replace(
            p.request, **{name: tuple(map(hashed, getattr(p.request, name))) for name in file_fields()}
        ))
        for p in job.planned
    ]  # fmt: skip


def _check_device(name: str) -> None:
    """A device this machine lacks fails before any hashing or loading."""
    from sdcli.pipeline import resolve_device

    try:
        resolve_device(name)
    except RequestError as exc:  # perhaps recorded by --from's image
        raise RequestError(f"{exc}; choose another with --device") from None


class _Renderer:
    """Loads the model, renders the targets batch by batch and writes each image."""

    def __init__(self, job: Job, events: Events, tally: Tally, weights: Path, sha: str, stamp, vae):
        self.job, self.run, self.events, self.tally = job, job.run, events, tally
        self.weights, self.sha, self.stamp, self.vae = weights, sha, stamp, vae

    def render(self, todo: list[Target]) -> None:
        """Render the targets in U-Net batches and write each image as it is done. An image that fails (not
        finite, or out of memory alone) is reported and the job goes on, unless fail_fast; a batch that runs
        out of memory is halved."""
        import torch

        from sdcli.lora import LoraSets

        self.threads = _set_threads(self.run.threads, self.job.model, todo)
        sets = list(dict.fromkeys(t.request.loras for t in todo))  # LoRA sets in job order
        if self.run.compile and len(sets) > 1:
            raise RequestError("--compile renders one LoRA set per job; this one has several (run them apart)")
        pipe = self._load()
        loras = LoraSets(pipe.config, pipe.nets, sets, allow_pickle=self.run.allow_pickle)
        for target in todo:  # every embedding file read and checked before the first image
            pipe.embeddings_of(target.request)
        order = {lora_set: i for i, lora_set in enumerate(sets)}
        queue = deque(sorted(batches(todo, self.run.batch_size), key=lambda g: order[g[0].request.loras]))
        while queue:
            group = queue.popleft()
            loras.use(group[0].request.loras)
            self.events.start_batch(len(group))
            try:
                images = pipe.generate([t.request for t in group], self.events.step)
                why = NON_FINITE + ("; try --dtype bf16 or fp32" if pipe.dtype_name == "fp16" else "")
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if len(group) > 1:
                    half = len(group) // 2
                    self.events.warning(f"out of memory with {len(group)} images in one batch; trying {half}")
                    queue.extendleft([group[half:], group[:half]])
                    continue
                r = group[0].request
                images, why = [None], f"out of memory on {pipe.device_name} for a {r.width}x{r.height} image"
            seconds = self.events.batch_done() / len(group)
            for target, image in zip(group, images, strict=True):
                if image is None:
                    self._failed(target, why)
                    continue
                meta = build_metadata(
                    target.request, config=pipe.config, weights=pipe.weights, weights_sha256=self.sha,
                    device=pipe.device_name, dtype=pipe.dtype_name, vae_dtype=pipe.vae_dtype_name, threads=self.threads,
                    batch_size=len(group), elapsed=seconds, compiled=self.run.compile, vae=self.vae,
                )  # fmt: skip
                self._write(target, image, meta)

    def _load(self):
        """The model on its device; the weights must not have changed since they were hashed."""
        from sdcli.pipeline import Pipeline

        self.events.info(f"loading {self.job.model.name} from {self.weights}")
        pipe = Pipeline.load(
            self.job.model, self.weights, device=self.run.device, dtype=self.run.dtype,
            allow_pickle=self.run.allow_pickle, compile=self.run.compile, vae=self.vae[0] if self.vae else None,
        )  # fmt: skip
        if _stamp(self.weights) != self.stamp:
            raise CheckpointError(
                f"{self.weights} changed or vanished while it was being read; run again once it is complete"
            )
        return pipe

    def _write(self, target: Target, image, meta: dict[str, Any]) -> None:
        """Publish the pair under the first free name of the target's candidates; signals wait meanwhile,
        so each pair on disk has its line."""
        with _signals_held():
            try:
                with folder_lock(self.run.out):
                    png, sidecar = write_pair(image, meta, self._candidates(target), replace=target.replace)
            except OSError as exc:
                raise SdcliError(f"cannot write {target.png}: {exc.strerror or exc}") from None
            placed = dataclasses.replace(target, png=png, sidecar=sidecar)
            self.tally.written += 1
            self.events.image(Outcome("written", placed, meta))

    def _candidates(self, target: Target) -> Iterator[tuple[Path, Path]]:
        """Names to try, in order. A new image (generate) whose name has an {index} counts on from the
        folder's highest number as it is now, to the first free name, so two processes writing into one
        folder never share an index; any other takes the next free `-N` suffix when its name is taken."""
        planned, folder = target.planned, self.run.out
        if self.run.resume or target.replace or "index" not in template_fields(planned.template):
            stems = chain([target.png.stem], (f"{target.png.stem}-{n}" for n in range(1, SUFFIXES)))
            if target.replace:
                stems = islice(stems, 1)
        else:
            start = max(planned.index, next_index(folder))
            config = config_reference(self.job.model)
            stems = (name_stem(planned.template, planned.request, index=i, config=config)
                     for i in range(start, start + SUFFIXES))  # fmt: skip
        return ((folder / f"{stem}.png", folder / f"{stem}.json") for stem in stems)

    def _failed(self, target: Target, reason: str) -> None:
        self.tally.failed += 1
        self.events.image(Outcome("failed", target, dataclasses.asdict(target.request), reason))
        if self.run.fail_fast:
            what = ", ".join(filter(None, (target.planned.where, f"seed {target.request.seed}", target.png.name)))
            raise SdcliError(f"stopped at the first failed image (--fail-fast): {what}")


def _set_threads(requested: int | None, model: ModelConfig, todo: list[Target]) -> int:
    """Set torch's CPU threads: as asked, else what suits the model size and the free cores."""
    import torch

    from sdcli.threads import config_work, resolve_threads

    largest = max((t.request for t in todo), key=lambda r: r.width * r.height)
    threads, _ = resolve_threads(requested, config_work(model, largest.width, largest.height))
    torch.set_num_threads(threads)
    return threads


def _stamp(weights: Path) -> list[int] | None:
    """Size and modification time of the weights (of each file of a diffusers folder), None when gone."""
    from sdcli.diffusers_layout import weight_files
    from sdcli.hashing import file_stamp

    try:
        return [n for f in weight_files(weights) for n in file_stamp(f)]
    except OSError:
        return None


class _ToEvents(logging.Handler):
    """Routes the library's warnings (e.g. a truncated prompt) to the job's listener."""

    def __init__(self, events: Events):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.warning(record.getMessage())


@contextmanager
def _warnings_to(events: Events) -> Iterator[None]:
    logger, handler = logging.getLogger("sdcli"), _ToEvents(events)
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
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while an image is written and reported."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered now
