"""What a job tells the user on stderr: a live rich display on a terminal, plain lines in logs and pipes.

stdout is never touched here: it carries only results.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

PLAIN_STEP_EVERY = 10.0  # seconds between plain "step i/n" lines, so logs show a long render is alive


class Reporter:
    """Progress over a job's images and the current batch's sampler steps, warnings, and a summary."""

    def __init__(self, *, quiet: bool, stream: TextIO | None = None, label: str = ""):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.prefix = f"sdcli: {label}: " if label else "sdcli: "
        self.can_go_live = not label  # a shard's processes share one terminal: plain labelled lines only
        self.total = 0  # images to render (skipped ones excluded)
        self.written = 0
        self.skipped = 0
        self.failed = 0
        self.steps = 0
        self.started = time.monotonic()
        self.render_seconds = 0.0
        self._group_started = self._last_line = self.started
        self._group: tuple[int, int] = (0, 0)  # first image number, images in the batch
        self._live = None

    def __enter__(self) -> Reporter:
        return self

    def begin(self, total: int) -> None:
        """Rendering of `total` images starts: on a terminal, the live display appears."""
        self.total = total
        if total and not self.quiet and self.can_go_live and self.stream.isatty():
            self._start_live()

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            """Steps (or images) per second, from rich's own moving average."""

            def render(self, task) -> Text:
                return Text(f"{task.speed:.2f} it/s" if task.speed else "", style="progress.data.speed")

        self._live = Progress(
            TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=True,
        )  # fmt: skip
        self._images = self._live.add_task("images", total=self.total)
        self._steps = self._live.add_task("steps", total=None)
        self._live.start()

    def _line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self._line(f"{self.prefix}{message}")

    def warning(self, message: str) -> None:
        if not self.quiet:
            self._line(f"{self.prefix}warning: {message}")

    def start_batch(self, size: int) -> None:
        """A U-Net batch of `size` images begins."""
        self._group = (self.written + self.failed + 1, size)
        self._group_started = time.monotonic()
        if self._live is not None:
            self._live.reset(self._steps, total=None)

    def step(self, done: int, total: int) -> None:
        """Sampler callback: `done` of `total` steps of the current batch are finished."""
        self.steps += 1
        now = time.monotonic()
        if self._live is not None:
            self._live.update(self._steps, completed=done, total=total)
        elif not self.quiet and now - self._last_line >= PLAIN_STEP_EVERY:
            self._last_line = now
            first, size = self._group
            images = f"image {first}" if size == 1 else f"images {first}-{first + size - 1}"
            self._line(f"{self.prefix}{images} of {self.total}: step {done}/{total}")

    def batch_done(self) -> float:
        """Seconds the batch took; adds them to the render time."""
        seconds = time.monotonic() - self._group_started
        self.render_seconds += seconds
        return seconds

    def image_written(self, path: Path, seconds: float) -> None:
        self.written += 1
        if self._live is not None:
            self._live.advance(self._images)
        self._last_line = time.monotonic()
        self.info(f"[{self.written + self.failed}/{self.total}] {path} ({seconds:.1f} s)")

    def image_failed(self, what: str, reason: str) -> None:
        """An image could not be made; said even under --quiet, and the job goes on."""
        self.failed += 1
        if self._live is not None:
            self._live.advance(self._images)
        self._line(f"{self.prefix}failed: {what}: {reason}")

    def image_skipped(self, path: Path) -> None:
        self.skipped += 1
        self.info(f"skipped {path}: already complete")

    def summary(self, remaining: int = 0, interrupted: str | None = None) -> None:
        """The closing line; an interruption or a failed image makes it appear even under --quiet."""
        rate = f", {self.steps / self.render_seconds:.2f} it/s" if self.render_seconds > 0 and self.steps else ""
        counts = f"{self.written} written, {self.skipped} skipped, {self.failed} failed"
        self.__exit__()
        if interrupted:
            self._line(f"{self.prefix}{interrupted}: {counts}, {remaining} remaining")
        elif self.failed or not self.quiet:
            self._line(f"{self.prefix}done: {counts} in {time.monotonic() - self.started:.1f} s{rate}")
