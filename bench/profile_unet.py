"""sdcli's and diffusers' U-Nets in one process, same weights and inputs: alternating timings, the largest
difference between their outputs, and (with --profile) torch.profiler's op table of one call of each.

    python bench/profile_unet.py [--dtype fp32|bf16] [--repeats N] [--profile] [--checkpoint FILE]

One process takes the noise of separate processes out of a comparison of two nearly equal calls; the
figures of docs/performance.md's U-Net section come from here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_CHECKPOINT = ROOT / "weights" / "random-sd15-fp16.safetensors"  # what `make bench` writes

from worker import GUIDANCE  # noqa: E402

from sdcli.config import load_config  # noqa: E402
from sdcli.pipeline import DTYPES, Pipeline  # noqa: E402

import reference  # noqa: E402


def unets(checkpoint: Path, dtype: str, folder: Path):
    """(sdcli's CFG call, diffusers' CFG call, latents) on the same weights and inputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    config = load_config("sd15")
    pipe = Pipeline.load(config, checkpoint, device="cpu", dtype=dtype)
    pipe.nets.vae = pipe.nets.text = None  # only the U-Nets share the process
    diffusers_logging.set_verbosity_error()
    folder = reference.write_diffusers_folder(config, folder)
    theirs = UNet2DConditionModel.from_single_file(
        str(checkpoint), config=str(folder), subfolder="unet", local_files_only=True, torch_dtype=DTYPES[dtype]
    ).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.unet.in_channels, 64, 64, generator=g).to(pipe.dtype)
    uncond, cond = torch.randn(2, config.text[0].context_length, config.unet.context_dim, generator=g).to(pipe.dtype)
    ours = pipe.guided_model(cond[None], uncond[None], GUIDANCE)
    context = torch.stack([uncond, cond])

    def diffusers_call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = theirs(torch.cat([x, x]), t, encoder_hidden_states=context, return_dict=False)[0].chunk(
            2
        )
        return out_uncond + GUIDANCE * (out_cond - out_uncond)

    return ours, diffusers_call, x


def timed(call, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = call(x, torch.tensor(999.0))
        return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the op table of one call of each")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="SD 1.5 single file")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"{args.checkpoint} not found: `make bench` or bench/make_checkpoint.py writes it")
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs, x = unets(args.checkpoint, args.dtype, Path(folder))
    calls = {"sdcli": ours, "diffusers": theirs}
    for call in calls.values():  # oneDNN picks and caches its kernels on the first call
        timed(call, x)
    seconds = {name: [] for name in calls}
    for _ in range(args.repeats):
        outputs = {}
        for name, call in calls.items():
            took, outputs[name] = timed(call, x)
            seconds[name].append(took)
        difference = (outputs["sdcli"].float() - outputs["diffusers"].float()).abs().max().item()
        print(
            f"sdcli {seconds['sdcli'][-1]:.2f} s  diffusers {seconds['diffusers'][-1]:.2f} s  "
            f"ratio {seconds['sdcli'][-1] / seconds['diffusers'][-1]:.3f}  largest difference {difference:.2e}",
            flush=True,
        )
    best = {name: min(s) for name, s in seconds.items()}
    ratio = best["sdcli"] / best["diffusers"]
    print(f"best: sdcli {best['sdcli']:.2f} s, diffusers {best['diffusers']:.2f} s, ratio {ratio:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, call in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                timed(call, x)
            print(f"== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
