"""sdcli against diffusers on this machine: same weights, same settings, alternating fresh processes.

    python bench/bench.py [--model sd15|sdxl] [--smoke] [--only NAME ...] [--threads N] [--stat best|median]
                          [--json FILE]

Full mode builds (or reuses) a random-weight single file (fp16, weights/random-sd15-fp16.safetensors, or for
--model sdxl weights/random-sdxl-fp16.safetensors) and measures the figures of issue 5 (SD 1.5) or the SDXL
rows (cold load, U-Net CFG call at 1024x1024 in fp32 and bf16, VAE decode at 1024x1024); --smoke runs the
same code on a tiny model of the same family. Each figure comes from
worker processes (bench/worker.py), sdcli and diffusers taking turns, which one goes first alternating
from figure to figure. Prints a table and writes the same figures, with every raw timing, as JSON.

Times are the fastest of the repeats by default: other processes on a shared machine only ever add time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
WORKER = Path(__file__).resolve().parent / "worker.py"
DEFAULT_CHECKPOINTS = {
    "sd15": ROOT / "weights" / "random-sd15-fp16.safetensors",
    "sdxl": ROOT / "weights" / "random-sdxl-fp16.safetensors",
}
DEFAULT_CHECKPOINT = DEFAULT_CHECKPOINTS["sd15"]
TOOLS = ("sdcli", "diffusers")
MODELS = ("sd15", "sdxl")
LORA_RANK = 32
LORA_SWITCHES = 100  # switches between two merged sets: the weights must come back exact, the RSS stay flat


@dataclass(frozen=True)
class Figure:
    """One row of the table: a worker task, its settings, and which number of its result the row shows."""

    name: str
    label: str
    task: str
    memory: bool = False  # the row shows peak RSS (GiB) rather than seconds
    dtype: str = "auto"
    size: int = 512
    repeats: int = 3
    warmup: int = 1
    flops: str | None = None  # which network's FLOPs make the share-of-peak column
    peak_dtype: str = "fp32"
    extra: dict = field(default_factory=dict)
    warm_file: bool = False  # read the checkpoint through the page cache before each worker (see warm_page_cache)
    stat: str = "seconds"  # which list of the worker's result holds the row's times

    def runs(self) -> tuple:
        """Figures with equal runs share one measurement (a time row and its memory row)."""
        return (self.task, self.dtype, self.size, self.repeats, self.warmup, tuple(self.extra.items()))


def figures(smoke: bool, model: str = "sd15", bf16_size: int | None = None) -> list[Figure]:
    """The issue's figures (SD 1.5, or SDXL's: see xl_figures); smoke mode keeps the structure at sizes a
    tiny model renders in a blink."""
    if model == "sdxl":
        return xl_figures(smoke, bf16_size)
    small, large = (64, 128) if smoke else (512, 1024)
    once = {"repeats": 1} if smoke else {}
    steps = 4 if smoke else 20
    load = Figure("load", "cold load: process start to model ready", "load", **once)
    vae_small = Figure("vae_small", f"VAE decode {small}x{small}", "vae", size=small, flops="vae", **once)
    vae_large = Figure("vae_large", f"VAE decode {large}x{large}", "vae", size=large, repeats=1, warmup=0, flops="vae")
    encode_large = Figure("encode_large", f"VAE encode {large}x{large} (img2img)", "encode", size=large, repeats=1,
                          warmup=0)  # fmt: skip
    image = Figure(
        "image",
        f"whole image {small}x{small}, {steps} steps dpmpp_2m_karras, default dtype",
        "image",
        size=small,
        repeats=1,
        warmup=0,
        extra={"steps": steps},
    )
    unet = Figure(
        "unet_fp32",
        f"U-Net call with CFG {small}x{small}, fp32",
        "unet",
        dtype="fp32",
        size=small,
        flops="unet",
        **once,
    )
    return [
        load,
        memory(load, "cold load: peak RSS"),
        unet,
        dataclasses.replace(
            unet, name="unet_bf16", label=unet.label.replace("fp32", "bf16"), dtype="bf16", peak_dtype="bf16"
        ),
        vae_small,
        memory(vae_small, f"VAE decode {small}x{small}: peak RSS"),
        vae_large,
        memory(vae_large, f"VAE decode {large}x{large}: peak RSS"),
        encode_large,
        memory(encode_large, f"VAE encode {large}x{large} (img2img): peak RSS"),
        image,
        memory(image, "whole image: peak RSS of the process"),
        Figure("help", "`--help` wall time (sdcli / diffusers-cli)", "help", repeats=5),
        *lora_figures(smoke),
        # opt-in rows
        dataclasses.replace(image, name="image_bf16", label=image.label.replace("default dtype", "bf16"), dtype="bf16"),
    ]


OPT_IN = {"image_bf16"}


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX). Without them torch's bf16 convolutions and
    matmuls run 10-100x slower than fp32 (docs/performance.md, SDXL), so SDXL's bf16 row is measured small."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def xl_figures(smoke: bool, bf16_size: int | None = None) -> list[Figure]:
    """SDXL's rows: the cold load of the whole model (fp16 file into fp32), one U-Net call with CFG at
    1024x1024 in fp32 and bf16 (13.5 TFLOP: 1.5-3 minutes per call in fp32 on 2 cores, so one timed call
    after one warm-up), and a 1024x1024 decode in VAE-only processes (1-2.5 minutes, one run).
    The bf16 call runs at `bf16_size`, by default 1024 on a CPU with bf16 instructions and 128 (one run, no
    warm-up) on one without, where a 1024 call would take half an hour (sdcli) to hours (diffusers).
    Smoke mode: the tiny SDXL config at 128x128, one run each."""
    size = 128 if smoke else 1024
    if bf16_size is None:
        bf16_size = size if smoke or native_bf16() else 128
    once = {"repeats": 1} if smoke else {}
    # the full-size file (6.5 GiB) and a worker's 13-20 GiB do not both fit in 23 GiB of RAM: the page cache
    # loses part of the file to each load, so every load worker starts from a file read back into the cache
    load = Figure("load", "cold load: process start to model ready", "load", warm_file=not smoke, **once)
    unet = Figure(
        "unet_fp32",
        f"U-Net call with CFG {size}x{size}, fp32",
        "unet",
        dtype="fp32",
        size=size,
        flops="unet",
        repeats=1,
        warmup=1,
    )
    vae = Figure("vae_large", f"VAE decode {size}x{size}", "vae", size=size, repeats=1, warmup=0, flops="vae")
    small = {} if smoke or bf16_size == size else {"repeats": 1, "warmup": 0}
    bf16 = dataclasses.replace(
        unet,
        name="unet_bf16",
        label=f"U-Net call with CFG {bf16_size}x{bf16_size}, bf16" + ("" if bf16_size == size else ", one run"),
        dtype="bf16",
        size=bf16_size,
        peak_dtype="bf16",
        **small,
    )
    return [
        load,
        memory(load, "cold load: peak RSS"),
        unet,
        bf16,
        vae,
        memory(vae, f"VAE decode {size}x{size}: peak RSS"),
        *lora_figures(smoke),
    ]


def lora_figures(smoke: bool) -> list[Figure]:
    """A rank-32 kohya LoRA (bench/make_lora.py) read and merged into the loaded model, and one switch between
    two merged weights of it (sdcli restores the base from copies, diffusers unfuses)."""
    switches = 3 if smoke else LORA_SWITCHES
    merge = Figure("lora_merge", f"LoRA rank {LORA_RANK}: read + merge into the loaded model", "lora",
                   repeats=switches, warmup=0)  # fmt: skip
    return [
        merge,
        memory(merge, f"LoRA rank {LORA_RANK}: peak RSS while merging"),
        dataclasses.replace(merge, name="lora_switch", label=f"LoRA: switch between two merged sets (best of "
                            f"{switches})", stat="switch_seconds"),  # fmt: skip
    ]


def warm_page_cache(path: Path, chunk: int = 64 * 2**20) -> float:
    """Read `path` once (into the page cache, as far as memory allows), so a load starts from a cached file as
    a load right after the previous one does; returns the seconds it took (long: the file had left the cache)."""
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        buffer = bytearray(chunk)
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start


def system_load() -> dict:
    """The machine's load right now: load averages, available memory, and the busiest other processes."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) / 2**20
    ps = subprocess.run(
        ["ps", "-eo", "pid,pcpu,rss,etime,args", "--sort=-pcpu"], capture_output=True, text=True
    ).stdout.splitlines()
    mine = {os.getpid()}
    busy = []
    for line in ps[1:]:
        pid, pcpu, rss, etime, args = line.split(None, 4)
        if int(pid) in mine or args.startswith("ps "):
            continue
        if float(pcpu) >= 5.0 or int(rss) >= 2**20:  # 5% of a core, or 1 GiB resident
            busy.append({"pid": int(pid), "cpu_percent": float(pcpu), "rss_gib": int(rss) / 2**20,
                         "elapsed": etime, "command": args[:160]})  # fmt: skip
    return {"loadavg": os.getloadavg(), "mem_available_gib": available, "busy": busy[:8]}


def memory(figure: Figure, label: str) -> Figure:
    """The peak-RSS row of the same worker runs as `figure`."""
    return dataclasses.replace(figure, name=figure.name + "_rss", label=label, memory=True, flops=None)


def run_worker(figure: Figure, tool: str, common: list[str]) -> dict:
    """One fresh worker process; its BENCH line as a dict (with `error` when it failed)."""
    args = [
        sys.executable,
        str(WORKER),
        figure.task,
        tool,
        *common,
        "--dtype",
        figure.dtype,
        "--size",
        str(figure.size),
        "--repeats",
        str(figure.repeats),
        "--warmup",
        str(figure.warmup),
    ]
    for key, value in figure.extra.items():
        args += [f"--{key}", str(value)]
    warm = None
    if figure.warm_file:
        checkpoint = Path(common[common.index("--checkpoint") + 1])
        warm = warm_page_cache(checkpoint)
    available = system_load()["mem_available_gib"] if figure.warm_file or figure.size >= 1024 else None
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result = json.loads(lines[-1][len("BENCH ") :])
    if warm is not None:
        result["page_cache_read_s"] = warm
    if available is not None:
        result["mem_available_before_gib"] = available
    if figure.task == "load":
        result["seconds"] = [result["ready_at"] - started]  # from before the spawn, not the interpreter's start
    return result


def measure(figure: Figure, common: list[str], first: str) -> dict:
    """Both tools' results for one figure; `first` goes first (cold loads and --help alternate run by run)."""
    order = TOOLS if first == TOOLS[0] else TOOLS[::-1]
    if figure.task == "help":
        return time_help(figure.repeats, order)
    if figure.task == "load":
        runs = {tool: [] for tool in TOOLS}
        for k in range(figure.repeats):
            for tool in order if k % 2 == 0 else order[::-1]:
                runs[tool].append(run_worker(dataclasses.replace(figure, repeats=1), tool, common))
        return {tool: _fold(r) for tool, r in runs.items()}
    return {tool: run_worker(figure, tool, common) for tool in order}


def time_help(repeats: int, order: tuple[str, str]) -> dict:
    """Wall seconds of `sdcli --help` and `diffusers-cli --help`, each run `repeats` times, alternating."""
    commands = {"sdcli": "sdcli", "diffusers": "diffusers-cli"}
    bin_dir = Path(sys.executable).parent
    seconds = {tool: [] for tool in TOOLS}
    for i in range(repeats):
        for tool in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            subprocess.run([str(bin_dir / commands[tool]), "--help"], capture_output=True, check=True)
            seconds[tool].append(time.perf_counter() - start)
    return {tool: {"seconds": s} for tool, s in seconds.items()}


def _fold(runs: list[dict]) -> dict:
    """Several fresh-process runs of one tool as one result."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    return {
        "seconds": [s for r in good for s in r["seconds"]],
        "peak_gib": max(r["peak_gib"] for r in good),
        "runs": runs,
    }


def count_flops(config, sizes: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """FLOPs of one CFG U-Net call and of one VAE decode per image size, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdcli.nets.unet import UNet
    from sdcli.nets.vae import AutoencoderKL

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    factor = config.vae.downsample
    result: dict[str, dict[int, float]] = {"unet": {}, "vae": {}}
    with torch.device("meta"), torch.inference_mode():
        unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
        context = torch.empty(2, config.text[0].context_length, config.unet.context_dim)
        y = {} if config.unet.adm_in_channels is None else {"y": torch.empty(2, config.unet.adm_in_channels)}
        for size in sizes:
            latent = (size // factor, size // factor)
            x = torch.empty(2, config.unet.in_channels, *latent)
            z = torch.empty(1, config.vae.latent_channels, *latent)
            result["unet"][size] = flops(lambda x=x: unet(x, torch.empty(2), context, **y))
            result["vae"][size] = flops(lambda z=z: vae.decode(z))
    return result


def prepare(smoke: bool, checkpoint: Path | None, workdir: Path, model: str = "sd15"):
    """(config name for the workers, ModelConfig, checkpoint path, diffusers config folder, whether diffusers
    must take the U-Net config from the folder rather than from the yaml)."""
    import torch

    import reference

    if smoke:
        family = "sdxl" if model == "sdxl" else "sd1"
        name, config = ("tiny-sdxl" if model == "sdxl" else "tiny"), reference.tiny_config(family, "epsilon")
        path = reference.write_random_checkpoint(config, workdir / f"{name}.safetensors", dtype=torch.float16)
    else:
        from sdcli.checkpoint import read_header
        from sdcli.config import load_config

        name, config = model, load_config(model)
        path = checkpoint or DEFAULT_CHECKPOINTS[model]
        expected = reference.ldm_keys(config)
        if not path.exists() or {k: v.shape for k, v in read_header(path).items()} != expected:
            size = sum(math.prod(shape) for shape in expected.values()) * 2 / 1e9
            print(f"writing a random {model} checkpoint to {path} (about {size:.1f} GB) ...", file=sys.stderr)
            path.parent.mkdir(parents=True, exist_ok=True)
            reference.write_random_checkpoint(config, path, dtype=torch.float16, seed=0)
    folder = reference.write_diffusers_folder(config, workdir / "diffusers")
    folder_unet = reference.is_sgm(config) and not reference.xl_unet_config(config)[1]
    from make_lora import write_lora

    lora = write_lora(config, workdir / "lora.safetensors", LORA_RANK)
    return name, config, path, folder, folder_unet, lora


def value(result: dict, figure: Figure, stat: str) -> float | None:
    if "error" in result:
        return None
    if figure.memory:
        return result["peak_gib"]
    return min(result[figure.stat]) if stat == "best" else statistics.median(result[figure.stat])


def row(figure: Figure, results: dict, stat: str, flops: dict, peak: dict) -> dict:
    values = {tool: value(results[tool], figure, stat) for tool in TOOLS}
    out = {
        "name": figure.name,
        "label": figure.label,
        "unit": "GiB" if figure.memory else "s",
        **values,
        "ratio": values["sdcli"] / values["diffusers"] if None not in values.values() else None,
        "raw": results,
    }
    if figure.flops and peak:
        count = flops[figure.flops][figure.size]
        out["flops"] = count
        out["share_of_peak"] = {tool: count / v / peak[figure.peak_dtype] if v else None for tool, v in values.items()}
    return out


def format_table(rows: list[dict]) -> str:
    def number(v, unit):
        if v is None:
            return "failed"
        return f"{v:.2f} GiB" if unit == "GiB" else f"{v:.3g} s" if v < 1 else f"{v:.2f} s"

    def share(r, tool):
        s = r.get("share_of_peak", {}).get(tool)
        return f"{100 * s:.0f}%" if s is not None else ""

    header = ("figure", "sdcli", "diffusers", "ratio", "sdcli %peak", "diffusers %peak")
    lines = [header] + [
        (
            r["label"],
            number(r["sdcli"], r["unit"]),
            number(r["diffusers"], r["unit"]),
            f"{r['ratio']:.2f}" if r["ratio"] is not None else "",
            share(r, "sdcli"),
            share(r, "diffusers"),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        cells = zip(line, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", "--family", choices=MODELS, default="sd15", help="which model's rows to measure (default sd15)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, small sizes: checks the benchmark itself")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="figures to measure (default: all but opt-in ones)")
    parser.add_argument(
        "--checkpoint", type=Path, help="the model's single file (default weights/random-{sd15,sdxl}-fp16.safetensors)"
    )
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's own choice)")
    parser.add_argument("--stat", choices=("best", "median"), default="best", help="which of the repeats a row shows")
    parser.add_argument("--compile", action="store_true", help="sdcli workers load with compile=True")
    parser.add_argument(
        "--json",
        type=Path,
        help="results file (default bench/results.json, results-sdxl.json; smoke: results-smoke.json)",
    )
    parser.add_argument(
        "--bf16-size",
        type=int,
        help="SDXL: image side of the bf16 U-Net row (default 1024 with bf16 instructions, else 128)",
    )
    args = parser.parse_args(argv)

    all_figures = figures(args.smoke, args.model, args.bf16_size)
    known = {f.name for f in all_figures}
    if args.only and set(args.only) - known:
        parser.error(f"unknown figure {sorted(set(args.only) - known)[0]}; known: {', '.join(sorted(known))}")
    chosen = [f for f in all_figures if (f.name in args.only if args.only else f.name not in OPT_IN)]
    default_json = (
        "results-smoke.json" if args.smoke else {"sd15": "results.json", "sdxl": "results-sdxl.json"}[args.model]
    )
    json_path = args.json or Path(__file__).resolve().parent / default_json

    load_before = system_load()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(args.smoke, args.checkpoint, Path(tmp), args.model)
        name, config, checkpoint, folder, folder_unet, lora = prepared
        common = ["--config", name, "--checkpoint", str(checkpoint), "--folder", str(folder), "--lora", str(lora)]
        common += ["--folder-unet"] if folder_unet else []
        common += ["--threads", str(args.threads)] if args.threads else []
        common += ["--compile"] if args.compile else []
        timed_flops = [f for f in chosen if f.flops]
        flops = count_flops(config, tuple({f.size for f in timed_flops})) if timed_flops else {}
        peak_figure = Figure("peak", "", "peak", size=512 if args.smoke else 4096, repeats=3)
        peaks = [run_worker(peak_figure, "sdcli", common)] if flops else []
        done: dict[tuple, dict] = {}
        for i, figure in enumerate(chosen):
            if figure.runs() not in done:
                print(f"measuring {figure.label} ...", file=sys.stderr, flush=True)
                done[figure.runs()] = measure(figure, common, first=TOOLS[i % 2])
        if flops:  # the peak is measured around the figures, in the same run and under the same load
            peaks.append(run_worker(peak_figure, "sdcli", common))
        peak = {d: max(p.get(d, 0.0) for p in peaks) for d in ("fp32", "bf16")} if peaks else {}
        peak_sides = peaks[-1].get("sides") if peaks else None
        rows = [row(f, done[f.runs()], args.stat, flops, peak) for f in chosen]

    report = {
        "model": args.model,
        "mode": "smoke" if args.smoke else "full",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {"threads": args.threads, "stat": args.stat, "compile": args.compile},
        "machine": {
            "cpu": _cpu_name(),
            "cpu_id": _cpu_id(),
            "cores": os.cpu_count(),
            "native_bf16": native_bf16(),
            "python": platform.python_version(),
            **_versions(),
        },
        "checkpoint": str(checkpoint),
        "peak_flops": peak,
        "peak_matmul_sides": peak_sides,
        "load": {"before": load_before, "after": system_load()},
        "rows": rows,
    }
    json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(format_table(rows))
    if peak:
        print(f"matmul peak: {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {peak['bf16'] / 1e9:.0f} GFLOP/s bf16")
    print(f"times: {args.stat} of the repeats; threads: {args.threads or 'torch default'}; written to {json_path}")
    return 1 if any(r["ratio"] is None for r in rows) else 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _cpu_id() -> str:
    """Family, model and stepping ("AMD EPYC" alone says neither Zen 3 nor Zen 4), and torch's SIMD level."""
    import torch

    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("cpu family", "model", "stepping") and key.strip() not in fields:
            fields[key.strip()] = val.strip()
        if not line.strip():
            break
    described = ", ".join(f"{k} {v}" for k, v in fields.items())
    return f"{described}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "transformers")}


if __name__ == "__main__":
    sys.exit(main())
