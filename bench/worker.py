"""One benchmark measurement in a fresh process; prints one `BENCH {json}` line on stdout.

    python bench/worker.py TASK TOOL --config sd15|sdxl|tiny|tiny-sdxl --checkpoint FILE [--folder DIR] [options]

TASK is load, unet, vae, image or peak; TOOL is sdcli or diffusers (peak ignores it). An SDXL config (one
whose U-Net takes the vector y) runs diffusers' StableDiffusionXLPipeline instead of StableDiffusionPipeline,
its U-Net called with added_cond_kwargs (text_embeds, time_ids) where sdcli's takes y. Timings are wall
seconds from time.perf_counter; a phase's peak RSS is the kernel's high-water mark (VmHWM), reset just
before the phase through /proc/self/clear_refs, so it covers the resident model plus that phase's work.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any heavy import: the cold load counts imports

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
SEED, GUIDANCE, SAMPLER = 1234, 7.5, "dpmpp_2m_karras"
LORA_WEIGHTS = (0.8, -0.5)  # the two LoRA sets the lora task switches between


_peak_before_reset = 0.0


def process_peak_gib() -> float:
    """The whole process's peak RSS so far. Not getrusage's ru_maxrss: Linux carries that over from the
    forked parent across exec, so a child never reports less than its parent's size."""
    return max(_peak_before_reset, phase_peak_gib())


def reset_peak() -> None:
    """Start a fresh high-water mark at the current RSS, after handing freed heap back to the kernel."""
    global _peak_before_reset
    _peak_before_reset = process_peak_gib()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def current_rss_gib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


def phase_peak_gib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


TINY = {"tiny": "sd1", "tiny-sdxl": "sdxl"}  # the tiny configs of tests/reference.py, by worker name


def model_config(name: str):
    if name in TINY:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import tiny_config

        return tiny_config(TINY[name], "epsilon")
    from sdcli.config import load_config

    return load_config(name)


def is_xl(config) -> bool:
    """An SDXL-like model: its U-Net takes the vector y (pooled text and the size pairs) besides the context."""
    return config.unet.adm_in_channels is not None


def unet_tensors(config, latent: tuple[int, int]) -> dict:
    """The inputs of one CFG U-Net call, the same numbers for both tools: latents x (1, C, h, w), the
    (uncond, cond) context (2, 77, D) and, for SDXL, the pooled text (2, P) and the image size the vector
    embeds (original and target size the image's own, crop (0, 0), as both pipelines default)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.unet.in_channels, *latent, generator=g)
    context = torch.randn(2, config.text[0].context_length, config.unet.context_dim, generator=g)
    out = {"x": x, "context": context}
    if is_xl(config):
        pairs = len(config.conditioning.vector) - 1  # every part but "pooled" is a size pair
        width = config.unet.adm_in_channels - pairs * 2 * config.conditioning.size_embed_dim
        out["pooled"] = torch.randn(2, width, generator=g)
        out["size"] = (latent[0] * config.vae.downsample, latent[1] * config.vae.downsample)  # (height, width)
    return out


class Sdcli:
    """sdcli through its Pipeline, as the CLI drives it."""

    def __init__(self, config, checkpoint: Path, dtype: str, compile: bool = False):
        from sdcli.pipeline import Pipeline

        options = {"compile": True} if compile else {}
        self.pipe = Pipeline.load(config, checkpoint, device="cpu", dtype=dtype, **options)
        self.config = config

    @property
    def dtype(self):
        return self.pipe.dtype

    def unet_inputs(self, latent: tuple[int, int]):
        from sdcli.pipeline import Conditioning
        from sdcli.request import Request

        inputs = unet_tensors(self.config, latent)
        x, context = inputs["x"].to(self.dtype), inputs["context"].to(self.dtype)
        vector = None
        if "pooled" in inputs:  # SDXL's y, built as Pipeline.conditioning builds it for these sizes
            height, width = inputs["size"]
            request = Request(PROMPT, NEGATIVE, SEED, 1, GUIDANCE, SAMPLER, width, height)
            vector = self.pipe.vector(inputs["pooled"], [request, request]).to(self.dtype)

        def half(i: int) -> Conditioning:
            return Conditioning(context[i : i + 1], None if vector is None else vector[i : i + 1])

        # the batch (uncond, cond) in the order diffusers gets it
        return self.pipe.guided_model(half(1), half(0), GUIDANCE), x

    def unet_call(self, model, x):
        import torch

        with torch.inference_mode():
            return model(x, torch.tensor(999.0))

    def render(self, size: int, steps: int):
        from sdcli.request import Request

        return self.pipe.generate([Request(PROMPT, NEGATIVE, SEED, steps, GUIDANCE, SAMPLER, size, size)])[0]

    def merge_lora(self, path: Path) -> None:
        """Read the LoRA and merge it at the first of LORA_WEIGHTS, as a job with two sets of it starts."""
        from sdcli.lora import LoraSets
        from sdcli.request import FileUse

        self.sets = [(FileUse(str(path), w),) for w in LORA_WEIGHTS]
        self.loras = LoraSets(self.config, self.pipe.nets, self.sets, allow_pickle=False)
        self.loras.use(self.sets[0])

    def switch_lora(self, k: int) -> None:
        self.loras.use(self.sets[k % 2])

    def lora_copies_gib(self) -> float:
        return self.loras.merger.original_bytes() / 2**30


class Diffusers:
    """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) from the same single file,
    offline, as its documentation uses it."""

    def __init__(self, config, checkpoint: Path, dtype: str, folder: Path, original_config: bool = True):
        if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and "torch" not in sys.modules:
            del os.environ["THP_MEM_ALLOC_ENABLE"]  # sdcli's choice (sdcli/__init__.py); diffusers as shipped
        import torch
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # the LDM yaml's deprecation notes are expected
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": torch.float32}[dtype]
        # the yaml, unless diffusers cannot map it (a tiny SDXL's U-Net, see tests/reference.xl_unet_config),
        # when the folder's U-Net config says the model
        original = {"original_config": str(folder / "original.yaml")} if original_config else {}
        if is_xl(config):
            from diffusers import StableDiffusionXLPipeline

            self.pipe = StableDiffusionXLPipeline.from_single_file(
                str(checkpoint),
                config=str(folder),
                local_files_only=True,
                torch_dtype=torch_dtype,
                add_watermarker=False,
                **original,
            )
        else:
            from diffusers import StableDiffusionPipeline

            self.pipe = StableDiffusionPipeline.from_single_file(
                str(checkpoint),
                config=str(folder),
                local_files_only=True,
                torch_dtype=torch_dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **original,
            )
        self.pipe.set_progress_bar_config(disable=True)
        self.config = config

    @property
    def dtype(self):
        return self.pipe.unet.dtype

    def unet_inputs(self, latent: tuple[int, int]):
        import torch

        inputs = unet_tensors(self.config, latent)
        x, context = inputs["x"].to(self.dtype), inputs["context"].to(self.dtype)
        added = {}
        if "pooled" in inputs:  # StableDiffusionXLPipeline's added_cond_kwargs, in the prompt embeds' dtype
            height, width = inputs["size"]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=self.dtype)
            added = {"added_cond_kwargs": {"text_embeds": inputs["pooled"].to(self.dtype), "time_ids": time_ids}}
        unet = self.pipe.unet

        def model(x, t):
            # the per-step work of StableDiffusion(XL)Pipeline.__call__ with classifier-free guidance
            noise = unet(torch.cat([x] * 2), t, encoder_hidden_states=context, return_dict=False, **added)[0]
            uncond, cond = noise.chunk(2)
            return uncond + GUIDANCE * (cond - uncond)

        return model, x

    def unet_call(self, model, x):
        import torch

        with torch.no_grad():  # what the diffusers pipeline runs under
            return model(x, torch.tensor(999.0))

    def merge_lora(self, path: Path) -> None:
        """load_lora_weights then fuse_lora at the first of LORA_WEIGHTS, as diffusers' docs merge a LoRA."""
        self.pipe.load_lora_weights(str(path), adapter_name="bench")
        self.pipe.fuse_lora(lora_scale=LORA_WEIGHTS[0], adapter_names=["bench"])

    def switch_lora(self, k: int) -> None:
        """Unfuse, then fuse at the other weight: diffusers' way from one merged set to another."""
        self.pipe.unfuse_lora()
        self.pipe.fuse_lora(lora_scale=LORA_WEIGHTS[k % 2], adapter_names=["bench"])

    def lora_copies_gib(self) -> float:
        return 0.0

    def render(self, size: int, steps: int):
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import diffusers_render, diffusers_scheduler

        self.pipe.scheduler = diffusers_scheduler(self.config, SAMPLER)
        return diffusers_render(self.pipe, PROMPT, NEGATIVE, SEED, steps, GUIDANCE, size, size)


def load_tool(args):
    config = model_config(args.config)
    if args.tool == "sdcli":
        return Sdcli(config, args.checkpoint, args.dtype, args.compile)
    return Diffusers(config, args.checkpoint, args.dtype, args.folder, not args.folder_unet)


def timed(fn, repeats: int, warmup: int) -> dict:
    """Wall and CPU seconds of each of `repeats` calls after `warmup` untimed ones, the fastest and the median
    wall time, and the peak RSS over the timed calls."""
    for _ in range(warmup):
        fn()
    seconds, cpu, peak = [], [], 0.0
    for _ in range(repeats):
        reset_peak()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        peak = max(peak, phase_peak_gib())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "best": min(seconds),
        "median": statistics.median(seconds),
        "peak_gib": peak,
    }


def task_load(args) -> dict:
    load_tool(args)
    return {"ready_at": time.time(), "cpu_seconds": time.process_time(), "peak_gib": process_peak_gib()}


def task_unet(args) -> dict:
    tool = load_tool(args)
    side = args.size // tool.config.vae.downsample
    model, x = tool.unet_inputs((side, side))
    return {**timed(lambda: tool.unet_call(model, x), args.repeats, args.warmup), "dtype": str(tool.dtype)}


def sdcli_vae_only(config, checkpoint: Path):
    """sdcli's Pipeline (its decode and encode) holding only the VAE: built on the meta device and filled
    from the file tensor by tensor (through safetensors here, which does not change the decode)."""
    import torch
    from safetensors import safe_open

    from sdcli.checkpoint import VAE_PREFIX
    from sdcli.nets.vae import AutoencoderKL
    from sdcli.pipeline import Pipeline
    from sdcli.weights import Components

    with torch.device("meta"):
        vae = AutoencoderKL(config.vae)
    with safe_open(str(checkpoint), framework="pt") as f:
        state = {name: f.get_tensor(VAE_PREFIX + name).float() for name in vae.state_dict()}
    vae.load_state_dict(state, strict=True, assign=True)
    nets = Components(unet=None, vae=vae.eval().requires_grad_(False), text=None)
    return Pipeline(config, checkpoint, nets, torch.device("cpu"), torch.float32)


def diffusers_decoder(checkpoint: Path, folder: Path):
    """diffusers' AutoencoderKL alone, from the same single file, decoding as its pipeline does."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_single_file(
        str(checkpoint), config=str(folder), subfolder="vae", local_files_only=True, torch_dtype=torch.float32
    )

    def decode(latents):
        with torch.no_grad():
            return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    return decode


def task_vae(args) -> dict:
    """A process that loads only the VAE, as the decode's memory is the point: other networks freed before it
    would leave their pages to glibc's heap, which then counts toward the decode."""
    import torch

    config = model_config(args.config)
    decode = (
        sdcli_vae_only(config, args.checkpoint).decode
        if args.tool == "sdcli"
        else diffusers_decoder(args.checkpoint, args.folder)
    )
    factor = config.vae.downsample
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.vae.latent_channels, args.size // factor, args.size // factor, generator=g)
    latents = latents * config.vae.scale_factor  # what a sampler hands over
    return timed(lambda: decode(latents), args.repeats, args.warmup)


def task_encode(args) -> dict:
    """img2img's VAE encode of one image, in a process that loads only the VAE (as task_vae): sdcli's banded
    Pipeline.encode, diffusers' AutoencoderKL.encode with the posterior sample its img2img pipeline draws."""
    import torch

    config = model_config(args.config)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    if args.tool == "sdcli":
        encode = sdcli_vae_only(config, args.checkpoint).encode
        return timed(lambda: encode(image, [torch.Generator().manual_seed(SEED)]), args.repeats, args.warmup)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_single_file(str(args.checkpoint), config=str(args.folder), subfolder="vae",
                                         local_files_only=True, torch_dtype=torch.float32)  # fmt: skip

    def encode():
        with torch.no_grad():
            return vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(SEED))

    return timed(encode, args.repeats, args.warmup)


def task_image(args) -> dict:
    tool = load_tool(args)
    result = timed(lambda: tool.render(args.size, args.steps), args.repeats, args.warmup)
    return {**result, "phase_peak_gib": result["peak_gib"], "peak_gib": process_peak_gib(), "dtype": str(tool.dtype)}


def task_lora(args) -> dict:
    """Read and merge a LoRA into the loaded model (timed once, with the phase's peak RSS), then switch between
    two weights of it `repeats` times; the memory sdcli keeps to restore the base weights exactly."""
    tool = load_tool(args)
    loaded = current_rss_gib()
    merge = timed(lambda: tool.merge_lora(args.lora), 1, 0)
    merged = current_rss_gib()
    switches = iter(range(1, 10**6))
    switch = timed(lambda: tool.switch_lora(next(switches)), args.repeats, 0)
    return {**merge, "switch_seconds": switch["seconds"], "copies_gib": tool.lora_copies_gib(),
            "rss_loaded_gib": loaded, "rss_merged_gib": merged, "rss_after_switches_gib": current_rss_gib(),
            "process_peak_gib": process_peak_gib()}  # fmt: skip


def task_peak(args) -> dict:
    """FLOP/s of a large square matmul, best of `repeats`, in fp32 and bf16. The side is `size`, or less where
    one product would take over 2 s (bf16 on a CPU without bf16 instructions runs near 1 GFLOP/s): a 512
    product first gauges the speed."""
    import torch

    result, sides = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = torch.randn(512, 512).to(dtype)
        rate = 2 * 512**3 / timed(lambda a=probe: torch.mm(a, a), 1, 1)["best"]
        n = max(512, min(args.size, int((rate * 2.0 / 2) ** (1 / 3)) // 256 * 256))
        a = torch.randn(n, n).to(dtype)
        result[name] = 2 * n**3 / timed(lambda a=a: torch.mm(a, a), args.repeats, 1)["best"]
        sides[name] = n
    return {**result, "sides": sides}


TASKS = {"load": task_load, "unet": task_unet, "vae": task_vae, "encode": task_encode, "image": task_image,
         "lora": task_lora,
         "peak": task_peak}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("tool", choices=("sdcli", "diffusers"))
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--folder", type=Path, help="diffusers config folder written by bench.py")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="sdcli: Pipeline.load(compile=True)")
    parser.add_argument(
        "--folder-unet", action="store_true", help="diffusers: U-Net config from --folder, not the yaml (tiny SDXL)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for this process")
    parser.add_argument("--lora", type=Path, help="the lora task's LoRA file (bench/make_lora.py)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = TASKS[args.task](args)
    result["loadavg"] = os.getloadavg()[0]
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
