"""Soak test: one long `sdcli batch` in a child process, its resident memory sampled as the images appear.

    python bench/soak.py [--count 1000] [--batch-size 4] [--config demo] [--steps N] [--threads 1]

Memory is flat when the RSS after the first U-Net batch (model loaded, every buffer allocated once) equals
the RSS at the last image; the peak (VmHWM) is reported too. The weights are copied first, so a model being
retrained meanwhile cannot change under the run. Prints one JSON object; Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdcli.config import load_config

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


def prompts(count: int) -> str:
    """`count` different prompts, so the tokenizer and text encoder never see the same one twice."""
    lines = []
    for i in range(count):
        colour, shape, backdrop = COLOURS[i % 8], SHAPES[i // 8 % 6], COLOURS[(i // 48 + 3) % 8]
        lines.append(f"a {colour} {shape} on a {backdrop} background, number {i}")
    return "\n".join(lines) + "\n"


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="prompts (default 1000)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per U-Net call (default 4)")
    parser.add_argument("--config", default="demo", help="model config (default demo)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the config's)")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS for the child (default 1)")
    args = parser.parse_args(argv)
    weights = load_config(args.config).resolve_weights()
    with tempfile.TemporaryDirectory(prefix="sdcli-soak-") as folder:
        work = Path(folder)
        shutil.copy(weights, work / weights.name)
        (work / "prompts.txt").write_text(prompts(args.count))
        command = [sys.executable, "-m", "sdcli", "batch", str(work / "prompts.txt"), "-c", args.config]
        command += ["-w", str(work / weights.name), "-o", str(work / "out"), "--batch-size", str(args.batch_size)]
        command += ["--steps", str(args.steps)] if args.steps else []
        env = {**os.environ, "OMP_NUM_THREADS": args.threads, "SDCLI_HOME": str(work / "home")}
        start = time.monotonic()
        log = (work / "stderr.log").open("w+")  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        samples: dict[int, float] = {}
        peak = 0.0
        for done, _ in enumerate(child.stdout, 1):  # one PNG path a line, printed once the pair is on disk
            if done == args.batch_size or done % 100 == 0 or done == args.count:
                samples[done], peak = memory_mb(child.pid)  # VmHWM only grows: the last one is the peak
        child.wait()
        log.seek(0)
        err = log.read()
        if child.returncode != 0:
            print(err, file=sys.stderr)
            return child.returncode
        first, last = samples[args.batch_size], samples[args.count]
        report = {
            "config": args.config, "images": args.count, "batch_size": args.batch_size, "threads": args.threads,
            "seconds": round(time.monotonic() - start, 1),
            "rss_mib_after_first_batch": round(first, 1), "rss_mib_at_end": round(last, 1),
            "rss_growth_mib": round(last - first, 1), "peak_rss_mib": round(peak, 1),
            "rss_mib_by_images": {n: round(v, 1) for n, v in samples.items()},
            "summary": err.strip().splitlines()[-1],
        }  # fmt: skip
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
