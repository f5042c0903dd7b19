"""Noise schedules as plain functions: the training tables, then each diffusers scheduler's timesteps and sigmas.

Every sampler walks a list one longer than its timesteps, ending where the last step lands: sigmas end in 0,
alpha-bars in the alpha-bar one spacing below the last timestep (alpha-bar_0, or 1, once that falls below t=0).
Tables are float32 CPU tensors, computed in the dtypes diffusers uses (betas in float32 torch, timestep spacing
and interpolation in float64 then rounded to float32), which decides agreement at the 1e-7 level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdcli.config import ScheduleConfig
from sdcli.errors import RequestError


def alphas_cumprod(schedule: ScheduleConfig) -> Tensor:
    """Training alpha-bar_t = prod(1 - beta_s, s <= t), float32 (N,), as DDPM (Ho et al. 2020) defines it."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def training_sigmas(schedule: ScheduleConfig) -> Tensor:
    """Training sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), the noise level of x/sqrt(alpha-bar), float32 (N,)."""
    alpha_bar = alphas_cumprod(schedule)
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def _linspace(stop: float, num: int) -> Tensor:
    """numpy.linspace(0, stop, num) in float64: i * step, with the end pinned to `stop`."""
    points = torch.arange(num, dtype=torch.float64) * (stop / max(num - 1, 1))
    if num > 1:
        points[-1] = stop
    return points


def leading_alpha_bars(steps: int, schedule: ScheduleConfig) -> tuple[Tensor, list[Tensor]]:
    """DDIM/PNDM "leading" spacing: timesteps (steps,) descending and the steps+1 alpha-bars they move between.

    Each step goes from t to t - N//steps (the next timestep, or for the last one a point whose alpha-bar is
    alpha-bar_0, or 1 with set_alpha_to_one).
    """
    n_train = schedule.num_train_timesteps
    ratio = n_train // steps
    timesteps = [i * ratio + schedule.steps_offset for i in reversed(range(steps))]
    if timesteps[0] >= n_train:
        raise RequestError(f"steps must be below {n_train} with steps_offset {schedule.steps_offset}, got {steps}")
    table = alphas_cumprod(schedule)
    final = torch.tensor(1.0) if schedule.set_alpha_to_one else table[0]
    alpha_bars = [table[t] if t >= 0 else final for t in timesteps + [timesteps[-1] - ratio]]
    return torch.tensor(timesteps, dtype=torch.float32), alpha_bars


def interpolate(x: Tensor, table: Tensor) -> Tensor:
    """numpy.interp(x, arange(len(table)), table) in float64: `table` read at fractional positions `x` (float64)."""
    table = table.double()
    low = x.floor().clamp(max=len(table) - 2)
    i = low.long()
    inside = (table[i + 1] - table[i]) * (x - low) + table[i]
    return torch.where(x >= len(table) - 1, table[-1], inside)


def linspace_sigmas(steps: int, schedule: ScheduleConfig) -> tuple[Tensor, Tensor]:
    """Euler, Euler ancestral, Heun and LMS "linspace" spacing: fractional timesteps (steps,) and sigmas
    (steps+1,) ending in 0."""
    timesteps = _linspace(schedule.num_train_timesteps - 1, steps).flip(0).float()
    sigmas = interpolate(timesteps.double(), training_sigmas(schedule))
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, eq. (5): sigmas evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho for ramp in _linspace(1.0, steps).tolist()]


def sigma_to_t(sigma: float, log_sigmas: Tensor) -> float:
    """The fractional timestep whose training sigma is `sigma`, interpolating linearly in log sigma."""
    log_sigma = math.log(max(sigma, 1e-10))
    low = int((log_sigmas.double() <= log_sigma).sum()) - 1
    low = min(max(low, 0), len(log_sigmas) - 2)
    # diffusers takes the bracket's width in float32 and the rest in float64; so do we
    w = (log_sigmas[low].item() - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]).item()
    w = min(max(w, 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def dpm_sigmas(steps: int, schedule: ScheduleConfig, karras: bool) -> tuple[Tensor, Tensor]:
    """DPMSolverMultistep's integer timesteps (steps,) and sigmas (steps+1,) ending in 0, Karras-spaced or not."""
    table = training_sigmas(schedule)
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        log_sigmas = torch.log(table)
        timesteps = torch.tensor([round(sigma_to_t(sigma, log_sigmas)) for sigma in sigmas], dtype=torch.float32)
        sigmas = torch.tensor(sigmas, dtype=torch.float64).float()
    else:
        # steps+1 evenly spaced points, rounded, the last (t=0) dropped
        timesteps = _linspace(schedule.num_train_timesteps - 1, steps + 1).round().flip(0)[:-1].float()
        sigmas = table[timesteps.long()]
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])
