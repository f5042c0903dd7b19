"""Train the bundled demo model on this CPU: the VAE first, then the U-Net and text encoder together.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models": an autoencoder with a
slight KL pull, then epsilon-prediction denoising (Ho et al. 2020) in its latent space, conditioned on
the text through cross-attention; captions are dropped for a share of samples so classifier-free
guidance (Ho & Salimans 2022) works. Every random draw comes from the seed, and the denoiser's learning
rate is constant after warm-up, so the checkpoint written at step N equals a run of N steps.

    python -m sdcli.demo.train            # writes sdcli/assets/demo.safetensors, updates scale_factor
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdcli.checkpoint import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
from sdcli.config import ModelConfig, ScheduleConfig, load_config
from sdcli.demo.data import BACKGROUNDS, POSITIONS, Scene, random_caption, render, sample_scenes
from sdcli.nets.text import TextEncoder, Tokenizer
from sdcli.nets.unet import ResBlock, SpatialTransformer, UNet
from sdcli.nets.vae import AutoencoderKL

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdcli.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="model config to train")
    p.add_argument("--out", default=str(REPO / "sdcli" / "assets" / "demo.safetensors"), help="fp16 weights file")
    p.add_argument("--work", default=str(REPO / ".cache" / "demo-train"), help="folder for the VAE between stages")
    p.add_argument("--stage", choices=("all", "vae", "decoder", "denoiser"), default="all",
                   help="a later stage reuses the VAE that earlier ones left in --work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is faster on a shared, busy machine)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5, help="KL pull per latent element, against L1+L2")
    p.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only steps after the VAE")
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--shape-weight", type=float, default=4.0, help="extra loss weight on the shape's pixels")
    p.add_argument("--crop", type=int, default=32, help="VAE trains on crops this wide around the shape ...")
    p.add_argument("--full-share", type=float, default=0.15, help="... but on whole images for this last share")
    p.add_argument("--steps", type=int, default=4000, help="denoiser steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop", type=float, default=0.12, help="share of empty captions, for guidance")
    p.add_argument("--pool", type=int, default=16384, help="scenes encoded once and reused by the denoiser")
    p.add_argument("--save-every", type=int, default=250)
    return p.parse_args(argv)


class Progress:
    """Running loss, speed and time left, on stderr."""

    def __init__(self, stage: str, total: int, every: int = 25):
        self.stage, self.total, self.every = stage, total, every
        self.start, self.losses = time.monotonic(), []

    def step(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every and step + 1 != self.total:
            return
        elapsed = time.monotonic() - self.start
        rate = (step + 1) / elapsed
        recent = sum(self.losses[-self.every :]) / len(self.losses[-self.every :])
        eta = (self.total - step - 1) / rate
        print(
            f"{self.stage} {step + 1}/{self.total} loss {recent:.4f} {rate:.2f} it/s "
            f"elapsed {elapsed / 60:.1f} min ETA {eta / 60:.1f} min",
            file=sys.stderr,
            flush=True,
        )


def crop_around_shapes(x: Tensor, scenes: list[Scene], crop: int, stride: int, gen: torch.Generator) -> Tensor:
    """A crop per picture that holds its shape, at a random offset on the latent grid (stride)."""
    resolution = x.shape[-1]
    last = (resolution - crop) // stride
    crops = []
    for picture, scene in zip(x, scenes, strict=True):
        centre = POSITIONS[scene.position][0]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        left, top = (
            min(max(round((c * resolution - crop / 2) / stride) + s, 0), last) * stride
            for c, s in zip(centre, shift, strict=True)
        )
        crops.append(picture[:, top : top + crop, left : left + crop])
    return torch.stack(crops)


def fit_autoencoder(vae: AutoencoderKL, params: list[nn.Parameter], steps: int, lr: float, seed: int,
                    stage: str, cfg: ModelConfig, args: argparse.Namespace) -> None:
    """Reconstruction (L1 + L2, shape pixels up-weighted) with a slight KL pull towards N(0, 1); crops
    around the shapes first, whole images for the last --full-share of the steps."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    resolution = cfg.defaults.width
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # cosine decay to zero: the last, small steps sharpen the edges
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    progress = Progress(stage, steps)
    whole_from = int(steps * (1 - args.full_share))
    stride = cfg.vae.downsample  # crops on the latent grid keep the strided convs' phase
    for step in range(steps):
        scenes = sample_scenes(args.vae_batch, rng)
        x = render(scenes, resolution, gen)
        if step < whole_from:
            x = crop_around_shapes(x, scenes, args.crop, stride, gen)
        bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
        bg = bg.view(-1, 3, 1, 1) / 127.5 - 1
        # the shape covers a few percent of the pixels but carries all of the caption
        weight = 1 + args.shape_weight * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        error = vae.decode(z) - x
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = (weight * (error.abs() + error.square())).mean() / weight.mean() + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        progress.step(step, loss.item())


def train_vae(cfg: ModelConfig, args: argparse.Namespace) -> AutoencoderKL:
    """The whole autoencoder from scratch."""
    vae = AutoencoderKL(cfg.vae)
    fit_autoencoder(vae, list(vae.parameters()), args.vae_steps, args.vae_lr, args.seed, "vae", cfg, args)
    return vae.eval().requires_grad_(False)


def train_decoder(cfg: ModelConfig, vae: AutoencoderKL, args: argparse.Namespace) -> AutoencoderKL:
    """More training for the decoder alone: the encoder, and so the latent space the denoiser learns, stay
    fixed bit for bit (as Stability's fine-tuned SD VAE decoders did)."""
    vae.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    fit_autoencoder(vae, params, args.decoder_steps, args.decoder_lr, args.seed + 2, "decoder", cfg, args)
    return vae.eval().requires_grad_(False)


def alphas_cumprod(schedule: ScheduleConfig) -> Tensor:
    """alpha-bar_t of the training schedule (SD's scaled_linear: betas linear in sqrt space)."""
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, schedule.num_train_timesteps) ** 2
    else:
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps)
    return torch.cumprod(1 - betas.double(), 0).float()


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, scenes: list, resolution: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Posterior (mean, logvar) of each scene's picture, encoded once."""
    means, logvars = [], []
    for i in range(0, len(scenes), 256):
        mean, logvar = vae.encode(render(scenes[i : i + 256], resolution, gen))
        means.append(mean)
        logvars.append(logvar)
    return torch.cat(means), torch.cat(logvars)


def init_weights(unet: UNet, text: TextEncoder) -> None:
    """Zero the last layer of every residual branch (the LDM's zero_module), OpenCLIP's embedding scales."""
    for module in unet.modules():
        if isinstance(module, ResBlock):
            nn.init.zeros_(module.out_layers[-1].weight)
            nn.init.zeros_(module.out_layers[-1].bias)
        if isinstance(module, SpatialTransformer):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)
    nn.init.zeros_(unet.out[-1].weight)
    nn.init.zeros_(unet.out[-1].bias)
    nn.init.normal_(text.token_embedding.weight, std=0.02)
    nn.init.normal_(text.positional_embedding, std=0.01)


def weights_file(unet: nn.Module, vae: nn.Module, text: nn.Module, layout: str) -> dict[str, Tensor]:
    """The single-file checkpoint in the SD layout, fp16."""
    state = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIXES[layout], text)):
        state.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
    return state


def save_atomic(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)


def write_scale_factor(config_path: Path, value: float) -> None:
    """Put the measured latent scale into the config's `scale_factor:` line, keeping its comment."""
    text = config_path.read_text(encoding="utf-8")
    updated = re.sub(r"(\n\s+scale_factor:\s*)[0-9.eE+-]+", lambda m: f"{m.group(1)}{value}", text, count=1)
    config_path.write_text(updated, encoding="utf-8")


def train_denoiser(cfg: ModelConfig, vae: AutoencoderKL, args: argparse.Namespace) -> None:
    """Epsilon-prediction loss over uniform timesteps; EMA weights are written every --save-every steps."""
    rng, gen = random.Random(args.seed + 1), torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    scenes = sample_scenes(args.pool, rng)
    print(f"encoding {len(scenes)} scenes", file=sys.stderr, flush=True)
    means, logvars = encode_pool(vae, scenes, cfg.defaults.width, gen)
    scale = float(f"{1 / means.std().item():.4g}")  # LDM's rescaling to unit variance
    print(f"latent std {1 / scale:.4f}: scale_factor {scale}", file=sys.stderr, flush=True)
    if cfg.source is not None and cfg.vae.scale_factor != scale:
        write_scale_factor(cfg.source, scale)
        print(f"wrote scale_factor {scale} into {cfg.source}", file=sys.stderr, flush=True)

    (text_cfg,) = cfg.text  # the demo model has one text encoder
    unet, text, tokenizer = UNet(cfg.unet), TextEncoder(text_cfg), Tokenizer(text_cfg)
    init_weights(unet, text)
    params = [*unet.parameters(), *text.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    abar = alphas_cumprod(cfg.schedule)
    progress = Progress("denoiser", args.steps)
    for step in range(args.steps):
        pick = torch.randint(0, len(scenes), (args.batch,), generator=gen)
        noise = torch.randn(means[pick].shape, generator=gen)
        z0 = (means[pick] + torch.exp(0.5 * logvars[pick]) * noise) * scale
        captions = ["" if rng.random() < args.drop else random_caption(scenes[i], rng) for i in pick.tolist()]
        ids, _ = tokenizer(captions)
        t = torch.randint(0, cfg.schedule.num_train_timesteps, (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = (unet(zt, t.float(), text(ids)[0]) - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        progress.step(step, loss.item())
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_ema(unet, text, vae, ema, params, cfg, args, step + 1)


def save_ema(unet: UNet, text: TextEncoder, vae: AutoencoderKL, ema, params, cfg: ModelConfig, args, step: int) -> None:
    """Write the EMA weights (swapped in, then back) as the model file."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], ema)
        state = weights_file(unet, vae, text, cfg.text[0].layout)
        torch._foreach_copy_([p.data for p in params], live)
    save_atomic(state, Path(args.out), {"producer": "sdcli.demo.train", "step": str(step), "seed": str(args.seed)})
    size = Path(args.out).stat().st_size / 2**20
    print(f"saved {args.out} at step {step} ({size:.1f} MiB)", file=sys.stderr, flush=True)


def load_vae(cfg: ModelConfig, path: Path) -> AutoencoderKL:
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(load_file(str(path)), strict=True)
    return vae.eval().requires_grad_(False)


def save_vae(vae: AutoencoderKL, path: Path, args: argparse.Namespace) -> None:
    save_atomic(dict(vae.state_dict()), path, {"producer": "sdcli.demo.train", "seed": str(args.seed)})
    print(f"saved {path}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(args.config)
    vae_path = Path(args.work) / "vae.safetensors"
    if args.stage in ("all", "vae"):
        save_vae(train_vae(cfg, args), vae_path, args)
    if args.stage in ("all", "decoder"):
        save_vae(train_decoder(cfg, load_vae(cfg, vae_path), args), vae_path, args)
    if args.stage in ("all", "denoiser"):
        train_denoiser(cfg, load_vae(cfg, vae_path), args)


if __name__ == "__main__":
    main()
