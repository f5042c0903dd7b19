"""What a job tells the user: each image's result line on stdout (its path, or a JSON object with
--json), everything else on stderr: a live rich display on a terminal, plain lines in logs and pipes.

The job runner's `Events` listener for the command line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sdcli.runner import Outcome, Tally

PLAIN_STEP_EVERY = 10.0  # seconds between plain "step i/n" lines, so logs show a long render is alive


class Reporter:
    """Progress over a job's images and the current batch's sampler steps, warnings, results and a summary."""

    def __init__(
        self, *, quiet: bool, stream: TextIO | None = None, label: str = "", json_lines: bool = False,
        results: TextIO | None = None,
    ):  # fmt: skip
        self.stream = stream or sys.stderr
        self.results = results or sys.stdout
        self.quiet = quiet
        self.json_lines = json_lines
        self.prefix = f"sdcli: {label}: " if label else "sdcli: "
        self.can_go_live = not label  # a shard's processes share one terminal: plain labelled lines only
        self.total = 0  # images to render (skipped ones excluded)
        self.done = 0  # rendered images, written or failed
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
        self._group = (self.done + 1, size)
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

    def image(self, outcome: Outcome) -> None:
        """An image was written, skipped as complete, or failed (said even under --quiet)."""
        if outcome.status != "skipped":
            self.done += 1
            if self._live is not None:
                self._live.advance(self._images)
        png = outcome.target.png
        if outcome.status == "written":
            self._last_line = time.monotonic()
            self.info(f"[{self.done}/{self.total}] {png} ({outcome.meta['elapsed']:.1f} s)")
        elif outcome.status == "skipped":
            self.info(f"skipped {png}: already complete")
        else:
            planned = outcome.target.planned
            what = ", ".join(filter(None, (planned.where, f"seed {planned.request.seed}", png.name)))
            self._line(f"{self.prefix}failed: {what}: {outcome.error}")
        self._result(outcome)

    def _result(self, outcome: Outcome) -> None:
        """The result line on stdout: the PNG path, or with --json the paths, status and metadata (a failed
        image has a line only with --json)."""
        if self.json_lines:
            line = {"image": str(outcome.target.png), "metadata": str(outcome.target.sidecar)}
            line |= {"status": outcome.status, **outcome.meta}
            if outcome.error:
                line["error"] = outcome.error
            print(_json_line(line), file=self.results, flush=True)
        elif not self.quiet and outcome.status != "failed":
            print(outcome.target.png, file=self.results, flush=True)

    def summary(self, tally: Tally, interrupted: str | None = None) -> None:
        """The closing line; an interruption or a failed image makes it appear even under --quiet."""
        rate = f", {self.steps / self.render_seconds:.2f} it/s" if self.render_seconds > 0 and self.steps else ""
        counts = f"{tally.written} written, {tally.skipped} skipped, {tally.failed} failed"
        self.__exit__()
        if interrupted:
            self._line(f"{self.prefix}{interrupted}: {counts}, {tally.remaining} remaining")
        elif tally.failed or not self.quiet:
            self._line(f"{self.prefix}done: {counts} in {time.monotonic() - self.started:.1f} s{rate}")


def _json_line(line: dict) -> str:
    """One JSON object; ASCII-escaped when it holds text that is not UTF-8 (a path from undecodable bytes),
    so the line stays valid JSON and json.loads gives the path back."""
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(line)
    return text
