"""Samplers as pure functions over explicit timestep/sigma lists, each equal to the diffusers scheduler of its name.

One forward process, two coordinates. VP: x_t = alpha*x0 + sigma_vp*eps, walked by DDIM, PLMS and DPM-Solver++.
VE (Karras et al. 2022): x = x_t/alpha = x0 + sigma*eps with sigma = sigma_vp/alpha, walked by Euler, Euler
ancestral, Heun and LMS; the network then sees x/sqrt(sigma²+1) = x_t. `model(x_in, t)` is the raw network (eps
or v, guidance already applied); the denoiser helpers below are the only place that knows which, and mirror
diffusers' arithmetic so results agree to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdcli.config import ScheduleConfig
from sdcli.errors import RequestError
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.schedules import (
    AlphaBarStep,
    ddim_alpha_bars,
    discrete_init_sigma,
    discrete_sigmas,
    dpm_sigmas,
    plms_alpha_bars,
)

Model = Callable[[Tensor, Tensor], Tensor]  # (x_in, t) -> raw eps or v
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, sigma, t) -> x0, in VE coordinates


def vp_predictions(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a network output at x = alpha*x0 + sigma*eps; v = alpha*eps - sigma*x0 (Salimans & Ho 2022)."""
    if prediction == "epsilon":
        return (x - sigma * out) / alpha, out
    return alpha * x - sigma * out, alpha * out + sigma * x


def ve_denoised(out: Tensor, x: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """x0 from a network output at x = x0 + sigma*eps, the network having seen x/sqrt(sigma²+1)."""
    if prediction == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def ve_denoiser(model: Model, prediction: str, clip: bool = False) -> Denoiser:
    """k-diffusion's view of an eps/v network: denoise(x, sigma, t) -> x0, optionally clipped to [-1, 1]."""

    def denoise(x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        denoised = ve_denoised(model(x / (sigma**2 + 1) ** 0.5, t), x, sigma, prediction)
        return denoised.clamp(-1, 1) if clip else denoised

    return denoise


def vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma_vp) of VE noise level sigma: alpha = 1/sqrt(sigma²+1), sigma_vp = sigma*alpha."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor) -> tuple[Tensor, Tensor]:
    """Split a step to sigma_to into an ODE step to sigma_down plus fresh noise of std sigma_up."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def per_image_noise(generators: list[torch.Generator], like: Tensor) -> Tensor:
    """Image i's noise from generators[i], drawn on the CPU in fp32, as diffusers' randn_tensor does for a list."""
    shape = (1, *like.shape[1:])
    noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])  # (B,C,h,w)
    return noise.to(like.device, like.dtype)


def adams_bashforth(history: list[Tensor]) -> Tensor:
    """Linear multistep combination of the last 1-4 outputs, newest last (PNDM paper, eq. 12; lower orders first)."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial through sigma_i..sigma_i-order+1 that is
    1 at sigma_i-j (k-diffusion's linear_multistep_coeff)."""

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    # the basis has degree order-1 <= 3, which two-point Gauss-Legendre integrates exactly
    mid, half = (sigmas[i] + sigmas[i + 1]) / 2, (sigmas[i + 1] - sigmas[i]) / 2
    node = half / math.sqrt(3)
    return half * (basis(mid - node) + basis(mid + node))


def sample_ddim(model: Model, x: Tensor, timesteps: Tensor, alpha_bars: list[AlphaBarStep], prediction: str,
                clip: bool = False) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12): predict x0 and eps at step i's first alpha-bar, then re-noise
    x0 to its second (see ddim_alpha_bars: the next timestep's only under "leading" spacing)."""
    for i, t in enumerate(timesteps):
        alpha_bar, alpha_bar_next = alpha_bars[i]
        denoised, eps = vp_predictions(model(x, t), x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, prediction)
        if clip:
            denoised = denoised.clamp(-1, 1)
        x = alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * eps
    return x


def sample_plms(model: Model, x: Tensor, timesteps: Tensor, alpha_bars: list[AlphaBarStep], prediction: str,
                correction: AlphaBarStep | None = None) -> Tensor:
    """PLMS (Liu et al. 2022) as diffusers' PNDM with skip_prk_steps: a pseudo improved Euler first step, then
    Adams-Bashforth over past network outputs, each step moved by the PNDM transfer, eq. (9), between its two
    alpha-bars; the first step's correction restarts from the first x and moves by `correction` (plms_alpha_bars;
    the first step's own alpha-bars where None).

    diffusers combines the raw outputs and converts the combination to eps at the current x, also for v-prediction;
    so do we, to stay equal.
    """

    def transfer(x: Tensor, step: AlphaBarStep, out: Tensor) -> Tensor:
        alpha_bar, alpha_bar_next = step
        _, eps = vp_predictions(out, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, prediction)
        denom = alpha_bar * (1 - alpha_bar_next) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_next) ** 0.5
        return (alpha_bar_next / alpha_bar) ** 0.5 * x - (alpha_bar_next - alpha_bar) * eps / denom

    history: list[Tensor] = []
    for i, t in enumerate(timesteps):
        out = model(x, t)
        if i == 0 and len(timesteps) > 1:
            # the output at the Euler end point only corrects this step; it never joins the history
            out_end = model(transfer(x, alpha_bars[0], out), timesteps[1])
            history.append(out)
            x = transfer(x, alpha_bars[0] if correction is None else correction, (out_end + out) / 2)
        else:
            history = history[-3:] + [out]
            x = transfer(x, alpha_bars[i], adams_bashforth(history))
    return x


def sample_euler(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    for i, t in enumerate(timesteps):
        d = to_d(x, sigmas[i], denoise(x, sigmas[i], t))
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_euler_ancestral(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor,
                           generators: list[torch.Generator]) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh per-image noise of std sigma_up."""
    for i, t in enumerate(timesteps):
        d = to_d(x, sigmas[i], denoise(x, sigmas[i], t))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + d * (sigma_down - sigmas[i])
        # drawn on the last step too (sigma_up = 0 there), so the generators end where diffusers leaves them
        x = x + per_image_noise(generators, x) * sigma_up
    return x


def sample_heun(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without churn); the last step, to sigma = 0, is Euler's."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, sigma, denoise(x, sigma, t))
        dt = sigma_next - sigma
        if i + 1 == len(timesteps):
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next, timesteps[i + 1]))
            x = x + (d + d_next) / 2 * dt
    return x


def sample_lms(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor, order: int = 4) -> Tensor:
    """Linear multistep in sigma: integrate the polynomial through the last `order` derivatives (k-diffusion LMS)."""
    sigma_list = sigmas.tolist()
    ds: list[Tensor] = []
    for i, t in enumerate(timesteps):
        ds = (ds + [to_d(x, sigmas[i], denoise(x, sigmas[i], t))])[-order:]
        coeffs = [lms_coefficient(sigma_list, i, len(ds), j) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, timesteps: Tensor, sigmas: Tensor, prediction: str) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VP coordinates, lambda = log(alpha/sigma_vp); first order on the
    first step and on the last (to sigma = 0), as diffusers does."""
    old_denoised = h_last = None
    for i, t in enumerate(timesteps):
        alpha_s, sigma_s = vp_coefficients(sigmas[i])
        alpha_t, sigma_t = vp_coefficients(sigmas[i + 1])
        denoised, _ = vp_predictions(model(x, t), x, alpha_s, sigma_s, prediction)
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        if old_denoised is None or i + 1 == len(timesteps):
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * denoised
        else:
            r = h_last / h
            D1 = (1.0 / r) * (denoised - old_denoised)
            x = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * denoised
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )
        old_denoised, h_last = denoised, h
    return x


def _reporting(model: Model, device: torch.device, total: int, on_step: Callable[[int, int], None] | None) -> Model:
    """The model as samplers call it: t moved to x's device, on_step(done, total) after each evaluation."""
    done = 0

    def evaluate(x_in: Tensor, t: Tensor) -> Tensor:
        nonlocal done
        out = model(x_in, t.to(device))
        done += 1
        if on_step is not None:
            on_step(done, total)
        return out

    return evaluate


def run_ddim(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, alpha_bars = ddim_alpha_bars(steps, schedule)
    return sample_ddim(model, noise, timesteps, alpha_bars, schedule.prediction_type, schedule.clip_sample)


def run_pndm(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, alpha_bars, correction = plms_alpha_bars(steps, schedule)
    return sample_plms(model, noise, timesteps, alpha_bars, schedule.prediction_type, correction)


def _run_dpm(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, karras: bool) -> Tensor:
    timesteps, sigmas = dpm_sigmas(steps, schedule, karras=karras)
    return sample_dpmpp_2m(model, noise, timesteps, sigmas, schedule.prediction_type)


def run_dpmpp_2m(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    return _run_dpm(model, noise, steps, schedule, karras=False)


def run_dpmpp_2m_karras(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    return _run_dpm(model, noise, steps, schedule, karras=True)


def _ve_start(noise: Tensor, steps: int, schedule: ScheduleConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Timesteps, sigmas and the starting x of the VE samplers: noise times diffusers' init_noise_sigma, the
    largest sigma for "linspace"/"trailing" spacing, sqrt(sigma_max² + 1) for "leading"."""
    timesteps, sigmas = discrete_sigmas(steps, schedule)
    return timesteps, sigmas, noise * discrete_init_sigma(sigmas, schedule)


def run_euler(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule)
    return sample_euler(ve_denoiser(model, schedule.prediction_type), x, timesteps, sigmas)


def run_euler_ancestral(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule)
    return sample_euler_ancestral(ve_denoiser(model, schedule.prediction_type), x, timesteps, sigmas, generators)


def run_heun(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule)
    return sample_heun(ve_denoiser(model, schedule.prediction_type, schedule.clip_sample), x, timesteps, sigmas)


def run_lms(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule)
    return sample_lms(ve_denoiser(model, schedule.prediction_type), x, timesteps, sigmas)


def sample(sampler: str, model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig,
           generators: list[torch.Generator], on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """Denoise standard normal `noise` (B,C,h,w) with `sampler` in `steps` steps; returns the final latents.

    `model(x_in, t)` gets the scaled input and a 0-dim float32 timestep on x's device; on_step(i, n) follows
    network evaluation i of n (SamplerSpec.evaluations). Only euler_a draws noise, image i's from generators[i].
    """
    spec = SAMPLER_SPECS.get(sampler)
    if spec is None:
        raise RequestError(f"unknown sampler '{sampler}'; expected one of {', '.join(SAMPLER_SPECS)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise RequestError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    if len(generators) != noise.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {noise.shape[0]}")
    model = _reporting(model, noise.device, spec.evaluations(steps), on_step)
    return spec.function()(model, noise, steps, schedule, generators)
