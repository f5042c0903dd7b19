"""Samplers as pure functions over explicit timestep/sigma lists, each equal to the diffusers scheduler of its name.

One forward process, two coordinates. VP: x_t = alpha*x0 + sigma_vp*eps, walked by DDIM, PLMS and DPM-Solver++.
VE (Karras et al. 2022): x = x_t/alpha = x0 + sigma*eps with sigma = sigma_vp/alpha, walked by Euler, Euler
ancestral, Heun and LMS; the network then sees x/sqrt(sigma²+1) = x_t. `model(x_in, t)` is the raw network (eps
or v, guidance already applied); the denoiser helpers below are the only place that knows which, and mirror
diffusers' arithmetic so results agree to float rounding. A run starts from noise (txt2img) or, for img2img, from
init latents noised to the level of a step part-way down the schedule, as each scheduler's add_noise does, and runs
the schedule's remaining steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sdcli.config import ScheduleConfig
from sdcli.errors import RequestError
from sdcli.request import steps_run
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.schedules import (
    AlphaBarStep,
    alphas_cumprod,
    ddim_alpha_bars,
    discrete_init_sigma,
    discrete_sigmas,
    dpm_sigmas,
    plms_alpha_bars,
    plms_timesteps,
)

Model = Callable[[Tensor, Tensor], Tensor]  # (x_in, t) -> raw eps or v
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, sigma, t) -> x0, in VE coordinates
Restore = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, alpha, sigma) -> x: inpainting's blend after a step
After = Callable[[int, Tensor], Tensor]  # (i, x) -> x after diffusers' scheduler step i (one per timestep entry)


def unchanged(i: int, x: Tensor) -> Tensor:
    return x


def after_steps(restore: Restore | None, levels: list[tuple[Tensor, Tensor]]) -> After:
    """What follows scheduler step i: nothing, or `restore` at levels[i], the (alpha, sigma) of x = alpha*x0 +
    sigma*eps that diffusers' add_noise gives the next timestep entry ((1, 0) after the last: x0 itself)."""
    if restore is None:
        return unchanged
    return lambda i, x: restore(x, *levels[i])


def ve_levels(sigmas: Tensor) -> list[tuple[Tensor, Tensor]]:
    """After each step of a VE run over `sigmas` (ending in 0): x0 + sigma_next*eps."""
    return [(torch.ones(()), sigma) for sigma in sigmas[1:]]


def vp_levels(alpha_bars: Tensor) -> list[tuple[Tensor, Tensor]]:
    """After each step of a DDIM/PNDM run: sqrt(alpha-bar)*x0 + sqrt(1-alpha-bar)*eps at the next entry's alpha-bar
    (`alpha_bars`, one per entry but the first), x0 after the last."""
    return [(a**0.5, (1 - a) ** 0.5) for a in alpha_bars] + [(torch.ones(()), torch.zeros(()))]


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
                clip: bool = False, after: After = unchanged) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12): predict x0 and eps at step i's first alpha-bar, then re-noise
    x0 to its second (see ddim_alpha_bars: the next timestep's only under "leading" spacing)."""
    for i, t in enumerate(timesteps):
        alpha_bar, alpha_bar_next = alpha_bars[i]
        denoised, eps = vp_predictions(model(x, t), x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, prediction)
        if clip:
            denoised = denoised.clamp(-1, 1)
        x = after(i, alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * eps)
    return x


def sample_plms(model: Model, x: Tensor, timesteps: Tensor, alpha_bars: list[AlphaBarStep], prediction: str,
                after: After = unchanged) -> Tensor:
    """PLMS (Liu et al. 2022) as diffusers' PNDM with skip_prk_steps, over its evaluation timesteps (plms_timesteps):
    Adams-Bashforth over past network outputs, each step moved by the PNDM transfer, eq. (9), between its two
    alpha-bars (plms_alpha_bars); the second evaluation, at the first step's Euler end point, corrects that step:
    the mean of its output and the first restarts from the first x, and never joins the history.

    diffusers combines the raw outputs and converts the combination to eps at the current x, also for v-prediction;
    so do we, to stay equal.
    """

    def transfer(x: Tensor, step: AlphaBarStep, out: Tensor) -> Tensor:
        alpha_bar, alpha_bar_next = step
        _, eps = vp_predictions(out, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, prediction)
        denom = alpha_bar * (1 - alpha_bar_next) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_next) ** 0.5
        return (alpha_bar_next / alpha_bar) ** 0.5 * x - (alpha_bar_next - alpha_bar) * eps / denom

    first_x, history = x, []
    for i, t in enumerate(timesteps):
        out = model(x, t)
        if i == 1:
            x = transfer(first_x, alpha_bars[1], (out + history[-1]) / 2)
        else:
            history = history[-3:] + [out]
            x = transfer(x, alpha_bars[i], adams_bashforth(history))
        x = after(i, x)
    return x


def sample_euler(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor, after: After = unchanged) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    for i, t in enumerate(timesteps):
        d = to_d(x, sigmas[i], denoise(x, sigmas[i], t))
        x = after(i, x + d * (sigmas[i + 1] - sigmas[i]))
    return x


def sample_euler_ancestral(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor,
                           generators: list[torch.Generator], after: After = unchanged) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh per-image noise of std sigma_up."""
    for i, t in enumerate(timesteps):
        d = to_d(x, sigmas[i], denoise(x, sigmas[i], t))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + d * (sigma_down - sigmas[i])
        # drawn on the last step too (sigma_up = 0 there), so the generators end where diffusers leaves them
        x = after(i, x + per_image_noise(generators, x) * sigma_up)
    return x


def sample_heun(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor, after: After = unchanged) -> Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1 without churn); the last step, to sigma = 0, is Euler's. diffusers
    steps its scheduler twice a step, the Euler end point and the corrected x, so `after` follows both."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, sigma, denoise(x, sigma, t))
        dt = sigma_next - sigma
        if i + 1 == len(timesteps):
            x = after(2 * i, x + d * dt)
        else:
            x_euler = after(2 * i, x + d * dt)
            d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next, timesteps[i + 1]))
            x = after(2 * i + 1, x + (d + d_next) / 2 * dt)
    return x


def sample_lms(denoise: Denoiser, x: Tensor, timesteps: Tensor, sigmas: Tensor, start: int = 0,
               order: int = 4, after: After = unchanged) -> Tensor:
    """Linear multistep in sigma: integrate the polynomial through the last `order` derivatives (k-diffusion LMS),
    from step `start` of the whole schedule. A step's coefficients are those of order min(i+1, order) at its place
    i in the schedule, over the derivatives the run has so far (diffusers' LMSDiscreteScheduler after
    set_begin_index: fewer than the order in an img2img run's first steps)."""
    sigma_list = sigmas.tolist()
    ds: list[Tensor] = []
    for i in range(start, len(timesteps)):
        ds = (ds + [to_d(x, sigmas[i], denoise(x, sigmas[i], timesteps[i]))])[-order:]
        coeffs = [lms_coefficient(sigma_list, i, min(i + 1, order), j) for j in range(len(ds))]
        x = after(i - start, x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True)))
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, timesteps: Tensor, sigmas: Tensor, prediction: str,
                    after: After = unchanged) -> Tensor:
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
        x = after(i, x)
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


def vp_noised(init: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """init at noise level alpha-bar: sqrt(alpha-bar)*x0 + sqrt(1-alpha-bar)*eps (DDIM's and PNDM's add_noise)."""
    return alpha_bar**0.5 * init + (1 - alpha_bar) ** 0.5 * noise


def run_ddim(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
             restore) -> Tensor:
    timesteps, alpha_bars = ddim_alpha_bars(steps, schedule)
    x = noise if init is None else vp_noised(init, noise, alpha_bars[start][0])
    after = after_steps(restore, vp_levels(alphas_cumprod(schedule)[timesteps[start + 1:].long()]))
    return sample_ddim(model, x, timesteps[start:], alpha_bars[start:], schedule.prediction_type, schedule.clip_sample,
                       after)


def run_pndm(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
             restore) -> Tensor:
    timesteps = plms_timesteps(steps, schedule)[start:]
    alpha_bars = plms_alpha_bars(timesteps, steps, schedule)
    x = noise if init is None else vp_noised(init, noise, alpha_bars[0][0])
    after = after_steps(restore, vp_levels(alphas_cumprod(schedule)[timesteps[1:].long()]))
    return sample_plms(model, x, timesteps, alpha_bars, schedule.prediction_type, after)


def _run_dpm(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, karras: bool, init, start,
             restore) -> Tensor:
    timesteps, sigmas = dpm_sigmas(steps, schedule, karras=karras)
    if init is None:
        x = noise
    else:  # DPMSolverMultistep's add_noise: VP coordinates of the VE level sigma
        alpha, sigma_vp = vp_coefficients(sigmas[start])
        x = alpha * init + sigma_vp * noise
    after = after_steps(restore, [vp_coefficients(sigma) for sigma in sigmas[start + 1:]])
    return sample_dpmpp_2m(model, x, timesteps[start:], sigmas[start:], schedule.prediction_type, after)


def run_dpmpp_2m(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
                 restore) -> Tensor:
    return _run_dpm(model, noise, steps, schedule, False, init, start, restore)


def run_dpmpp_2m_karras(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init,
                        start, restore) -> Tensor:
    return _run_dpm(model, noise, steps, schedule, True, init, start, restore)


def _ve_start(noise: Tensor, steps: int, schedule: ScheduleConfig, init, start) -> tuple[Tensor, Tensor, Tensor]:
    """Timesteps, sigmas and the starting x of the VE samplers. From noise: noise times diffusers' init_noise_sigma,
    the largest sigma for "linspace"/"trailing" spacing, sqrt(sigma_max² + 1) for "leading". From init: init plus
    noise times the start step's sigma (their add_noise; never init_noise_sigma, also at strength 1)."""
    timesteps, sigmas = discrete_sigmas(steps, schedule)
    x = noise * discrete_init_sigma(sigmas, schedule) if init is None else init + noise * sigmas[start]
    return timesteps, sigmas, x


def run_euler(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
              restore) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule, init, start)
    after = after_steps(restore, ve_levels(sigmas[start:]))
    return sample_euler(ve_denoiser(model, schedule.prediction_type), x, timesteps[start:], sigmas[start:], after)


def run_euler_ancestral(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init,
                        start, restore) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule, init, start)
    denoise = ve_denoiser(model, schedule.prediction_type)
    after = after_steps(restore, ve_levels(sigmas[start:]))
    return sample_euler_ancestral(denoise, x, timesteps[start:], sigmas[start:], generators, after)


def run_heun(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
             restore) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule, init, start)
    denoise = ve_denoiser(model, schedule.prediction_type, schedule.clip_sample)
    levels = ve_levels(sigmas[start:])  # each but the last twice: the Euler end point and the corrected x
    after = after_steps(restore, [level for level in levels[:-1] for _ in range(2)] + levels[-1:])
    return sample_heun(denoise, x, timesteps[start:], sigmas[start:], after)


def run_lms(model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig, generators, init, start,
            restore) -> Tensor:
    timesteps, sigmas, x = _ve_start(noise, steps, schedule, init, start)
    after = after_steps(restore, ve_levels(sigmas[start:]))
    return sample_lms(ve_denoiser(model, schedule.prediction_type), x, timesteps, sigmas, start, after=after)


def start_step(steps: int, strength: float, name: str = "strength") -> int:
    """The step an img2img run of `strength` starts at: the `steps`-step schedule less the steps it runs."""
    return steps - steps_run(steps, strength, name)


def evaluations(sampler: str, steps: int, start: int = 0) -> int:
    """Network evaluations of a `steps`-step run from step `start`: the registry's count less the start*order
    timestep entries diffusers' get_timesteps drops, order being what one more step adds (Heun's 2, else 1)."""
    spec = SAMPLER_SPECS[sampler]
    order = spec.evaluations(steps + 1) - spec.evaluations(steps) if start else 0
    return spec.evaluations(steps) - start * order


def sample(sampler: str, model: Model, noise: Tensor, steps: int, schedule: ScheduleConfig,
           generators: list[torch.Generator], on_step: Callable[[int, int], None] | None = None,
           init: Tensor | None = None, start: int = 0, restore: Restore | None = None) -> Tensor:
    """Denoise standard normal `noise` (B,C,h,w) with `sampler` in `steps` steps; returns the final latents. With
    `init` (img2img: scaled latents like noise), the run starts at step `start` (start_step) from init noised to that
    step's level as the diffusers scheduler's add_noise does it. `restore` (4-channel inpainting) follows every
    scheduler step diffusers takes, given x's level there (after_steps).

    `model(x_in, t)` gets the scaled input and a 0-dim float32 timestep on x's device; on_step(i, n) follows
    network evaluation i of n (evaluations). Only euler_a draws noise, image i's from generators[i].
    """
    spec = SAMPLER_SPECS.get(sampler)
    if spec is None:
        raise RequestError(f"unknown sampler '{sampler}'; expected one of {', '.join(SAMPLER_SPECS)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise RequestError(f"steps must be between 1 and {schedule.num_train_timesteps}, got {steps}")
    if len(generators) != noise.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {noise.shape[0]}")
    if not 0 <= start < steps or (start and init is None):
        raise ValueError(f"cannot start at step {start} of {steps} ({'with' if init is not None else 'without'} init)")
    model = _reporting(model, noise.device, evaluations(sampler, steps, start), on_step)
    return spec.function()(model, noise, steps, schedule, generators, init, start, restore)
