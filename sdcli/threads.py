"""How many CPU threads a render uses: `--threads N`, else OMP_NUM_THREADS, else a rule from the size of
one U-Net call and the cores that are free right now (docs/threads.md has the measurements behind it).

Importing this module does not import torch, so `sdcli --help` stays instant. The numbers are for the
CPU; on a GPU the thread count only drives the host side and the rule is not needed.

`python -m sdcli.threads` measures one U-Net call at 1 and 2 threads for a few sizes on this machine.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

# Work of one U-Net call, in model_channels x latent pixels per image (the measurements ran CFG's batch
# of 2). On the 2-core development machine, idle, one thread was faster up to 4096 (the bundled demo at
# 64x64 is 2048), the two broke even near 5000, two threads gained 7-13% from 6144 to 18432 and 16-40%
# from 20480 up (SD at 64x64 pixels is 20480, at 512x512 1310720). Two threads start at 16384 rather
# than at the break-even because a job that starts mid-render costs two threads far more (5-14x, see
# docs/threads.md) than one thread loses below 16384 (at most ~13%). Each further thread is given
# another WORK_PER_THREAD: an extrapolation, as only 1 and 2 threads were measured.
WORK_PER_THREAD = 8192

# /proc/loadavg's running count is sampled this many times, SAMPLE_GAP_S apart, and the median taken:
# one snapshot catches short-lived processes (a shell, a compiler) as often as a job that keeps a core.
SAMPLES = 5
SAMPLE_GAP_S = 0.002


def unet_work(model_channels: int, latent_width: int, latent_height: int, images: int = 1) -> int:
    """The size measure of one U-Net call that default_threads takes: model_channels x latent pixels x
    images in the batch (without CFG's doubling)."""
    return model_channels * latent_width * latent_height * max(1, images)


def config_work(config: Any, width: int, height: int, images: int = 1) -> int:
    """unet_work for a ModelConfig rendering `width` x `height` pixels (rounded up to whole latent cells)."""
    factor = config.vae.downsample
    return unet_work(config.unet.model_channels, -(-width // factor), -(-height // factor), images)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (else os.cpu_count()), capped by a cgroup v2
    CPU quota (cpu.max) when one is set, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """Cores allowed by the cgroup v2 quota of this process ("max" or no cgroup: None)."""
    try:
        rel = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        quota, period = (Path("/sys/fs/cgroup") / rel.strip().lstrip("/") / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _own_running() -> int:
    """Threads of this process in state R (running or runnable), at least 1: the one reading. OpenMP
    workers still spinning after a parallel region count too, and must not count as someone else's."""
    running = 0
    try:
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2 :][:1] == "R":
                running += 1
    except OSError:
        pass
    return max(1, running)


def _others_running() -> float | None:
    """Runnable threads of other processes right now, machine-wide, from /proc/loadavg's "running/total"
    field (which counts the reader itself), median of SAMPLES snapshots; None without /proc/loadavg."""
    counts = []
    for i in range(SAMPLES):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(0, running - _own_running()))
        if i + 1 < SAMPLES:
            time.sleep(SAMPLE_GAP_S)
    return statistics.median(counts)


def free_cores() -> int:
    """The cores this process may use that no other process is busy with right now, at least 1.

    Others' load is the instantaneous count of runnable threads in /proc/loadavg (this process's own
    subtracted); without it, the 1-minute load average, which lags a job that just started or ended by
    about a minute (and counts this process too, if it has been busy). Load is machine-wide, so when
    this process may only use some of the machine's cores, only their share of the load is subtracted.
    """
    usable = usable_cores()
    others = _others_running()
    if others is None:
        try:
            others = max(0.0, os.getloadavg()[0] - 1.0)  # less (roughly) ourselves
        except (AttributeError, OSError):
            others = 0.0
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    machine = max(allowed, os.cpu_count() or 1)
    others_here = others * allowed / machine  # load spreads over the whole machine, not only our cores
    return max(1, min(usable, allowed - round(others_here)))


def default_threads(work: int, cores: int | None = None) -> int:
    """Threads for U-Net calls of `work` (see unet_work) on `cores` free cores (default: free_cores()):
    one per WORK_PER_THREAD of work, at least 1 and at most the cores. Small calls run faster on one
    thread: OpenMP's hand-offs between threads cost more than the split saves."""
    if cores is None:
        cores = free_cores()
    return max(1, min(int(cores), int(work) // WORK_PER_THREAD))


def omp_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """OMP_NUM_THREADS as a thread count when it is a positive integer (its first entry, for a nested
    list like "4,2"), else None."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None


def resolve_threads(
    requested: int | None, work: int, environ: Mapping[str, str] | None = None, cores: int | None = None
) -> tuple[int, str]:
    """(threads, where the number came from): an explicit `--threads` wins ("--threads"), then a valid
    OMP_NUM_THREADS the user set ("OMP_NUM_THREADS"), then default_threads(work, cores) ("auto")."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return int(requested), "--threads"
    env = omp_threads(environ)
    if env is not None:
        return env, "OMP_NUM_THREADS"
    return default_threads(work, cores), "auto"


def set_wait_policy(threads: int, environ: MutableMapping[str, str] | None = None) -> bool:
    """Make OpenMP's idle threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning, when more than
    one thread will run and the user has not chosen a policy; True when it was set. OpenMP reads the
    variable when torch is imported, so this does nothing (and says False) once torch is in sys.modules.
    Spinning workers fight a job that shares their core: on the 2-core machine with one core busy, two
    spinning threads were 1.2-9x slower than one on calls of work >= 16384, two sleeping threads
    1.07-1.25x; idle, those calls kept most of their gain (docs/threads.md)."""
    env = os.environ if environ is None else environ
    if threads <= 1 or "OMP_WAIT_POLICY" in env or "torch" in sys.modules:
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count (imports torch)."""
    import torch

    torch.set_num_threads(threads)


# --- measurement (python -m sdcli.threads) --------------------------------------------------------------

SIZES = (  # (config, model_channels or None for the config's own, latent side)
    ("demo", None, 8),
    ("demo", None, 16),
    ("demo", None, 32),
    ("demo", 64, 8),
    ("demo", 64, 16),
    ("demo", 64, 32),
    ("demo", 128, 8),
    ("demo", 128, 16),
    ("demo", 128, 32),
    ("demo", 320, 8),
    ("demo", 320, 16),
    ("demo", 320, 32),
    ("sd15", None, 8),
    ("sd15", None, 16),
    ("sd15", None, 32),
    ("sd15", None, 64),
)


def _cpu_seconds() -> tuple[float, float]:
    """(machine-wide busy CPU seconds from /proc/stat, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    own = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def measure(config: str, model_channels: int | None, latent: int, budget_s: float = 20.0) -> dict[str, Any]:
    """Median seconds of one U-Net call (random weights, batch 2 as with CFG, 77-token context) at 1 and 2
    threads, interleaved so a change of load hits both, and the cores other processes kept busy meanwhile."""
    import dataclasses

    import torch

    from sdcli.config import load_config
    from sdcli.nets.unet import UNet

    cfg = load_config(config).unet
    if model_channels is not None:
        cfg = dataclasses.replace(cfg, model_channels=model_channels)
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    x, t, ctx = torch.randn(2, 4, latent, latent), torch.full((2,), 500.0), torch.randn(2, 77, cfg.context_dim)
    times: dict[int, list[float]] = {1: [], 2: []}
    with torch.inference_mode():
        start = time.perf_counter()
        for n in times:  # warm-up: oneDNN builds its kernels on the first call of each shape
            torch.set_num_threads(n)
            net(x, t, ctx)
        reps = max(1, min(20, int(budget_s / 2 / (time.perf_counter() - start))))
        busy0, own0 = _cpu_seconds()
        wall0 = time.perf_counter()
        for _ in range(reps):
            for n in times:
                torch.set_num_threads(n)
                s = time.perf_counter()
                net(x, t, ctx)
                times[n].append(time.perf_counter() - s)
        busy1, own1 = _cpu_seconds()
        wall = time.perf_counter() - wall0
    return {
        "config": config,
        "model_channels": cfg.model_channels,
        "latent": latent,
        "reps": reps,
        "work": unet_work(cfg.model_channels, latent, latent),
        "t1": statistics.median(times[1]),
        "t2": statistics.median(times[2]),
        "other_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / wall,
    }


def main() -> None:
    import json

    print(f"usable cores {usable_cores()}, free cores {free_cores()}", flush=True)
    for config, channels, latent in SIZES:
        print(json.dumps(measure(config, channels, latent)), flush=True)


if __name__ == "__main__":
    main()
