"""Noise schedules as plain functions: the training tables, then each diffusers scheduler's timesteps and sigmas.

Timesteps follow the schedule's `timestep_spacing` (Lin et al. 2023, Table 2) the way each diffusers scheduler's
set_timesteps spaces them; where it is None, that scheduler's own default: "leading" for DDIM and PNDM, "linspace"
for the others. Euler, Euler ancestral, Heun, LMS and DPM-Solver++ walk a sigma list one longer than their
timesteps, ending in 0. DDIM and PNDM step from alpha-bar(t) to alpha-bar(t - N//steps) (alpha-bar_0, or 1, once
that falls below t=0), which is the next timestep's alpha-bar only under "leading" spacing. Tables are float32 CPU
tensors, computed in the dtypes diffusers uses (betas in float32 torch, timestep spacing and interpolation in
float64 then rounded to float32), which decides agreement at the 1e-7 level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdcli.config import ScheduleConfig
from sdcli.errors import RequestError

AlphaBarStep = tuple[Tensor, Tensor]  # the alpha-bar a DDIM/PNDM step starts from, and the one it ends at


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


def _arange_down(start: int, step: float) -> list[float]:
    """numpy.arange(start, 0, -step) in float64: ceil(start / step) points, start and start - step, then (as numpy
    fills them) start + i*delta, delta being the float difference of the first two."""
    count = math.ceil(start / step)
    first, second = float(start), start - step
    delta = second - first
    return [first, second, *(first + i * delta for i in range(2, count))][:count]


def leading_timesteps(points: int, schedule: ScheduleConfig) -> list[int]:
    """The "leading" spacing, descending: i * (N // points) + steps_offset for i = points-1 .. 0.

    Refused where the first timestep lands past the table (DDIM/PNDM index past it in diffusers; the sigma
    samplers clamp it onto sigma_max, repeating that sigma) or the spacing is 0 (DPM-Solver's points = steps+1)."""
    n_train = schedule.num_train_timesteps
    ratio = n_train // points
    timesteps = [i * ratio + schedule.steps_offset for i in reversed(range(points))]
    if ratio == 0:
        raise RequestError(f'steps must be below {n_train} with "leading" timestep spacing here: {points} points '
                           f"over {n_train} timesteps")
    if timesteps[0] >= n_train:
        raise RequestError(f'steps must be fewer with "leading" timestep spacing and steps_offset '
                           f"{schedule.steps_offset}: the first timestep would be t = {timesteps[0]}, past the "
                           f"{n_train}-step training table")
    return timesteps


def trailing_timesteps(steps: int, schedule: ScheduleConfig) -> list[int]:
    """The "trailing" spacing, descending: numpy.arange(N, 0, -N/steps).round() - 1.

    For some step counts (61, 103, 121, ... of N = 1000) float rounding leaves a point just above 0, so diffusers
    gets steps+1 timesteps, the last t = -1 (DDIM/PNDM then read alpha-bar_(N-1)); those are refused."""
    n_train = schedule.num_train_timesteps
    timesteps = [round(t) - 1 for t in _arange_down(n_train, n_train / steps)]
    if len(timesteps) != steps:
        raise RequestError(f'steps {steps} cannot be spaced "trailing" over {n_train} timesteps: diffusers makes '
                           f"{len(timesteps)} timesteps of them, the last t = {timesteps[-1]}; choose another count")
    return timesteps


def ddim_alpha_bars(steps: int, schedule: ScheduleConfig) -> tuple[Tensor, list[AlphaBarStep]]:
    """DDIM/PNDM integer timesteps (steps,) descending, and each step's (alpha-bar from, alpha-bar to).

    Spacing (default "leading"): leading i * (N//steps) + steps_offset; trailing arange(N, 0, -N/steps).round() - 1;
    linspace linspace(0, N-1, steps).round(). Every step goes from alpha-bar(t) to alpha-bar(t - N//steps), the
    next timestep's only when leading; below t=0 that is alpha-bar_0, or 1 with set_alpha_to_one.
    """
    spacing = schedule.timestep_spacing or "leading"
    if spacing == "leading":
        timesteps = leading_timesteps(steps, schedule)
    elif spacing == "trailing":
        timesteps = trailing_timesteps(steps, schedule)
    else:
        timesteps = [int(t) for t in _linspace(schedule.num_train_timesteps - 1, steps).round().flip(0).tolist()]
    ratio = schedule.num_train_timesteps // steps
    table = alphas_cumprod(schedule)
    alpha_bars = [(table[t], alpha_bar(t - ratio, table, schedule)) for t in timesteps]
    return torch.tensor(timesteps, dtype=torch.float32), alpha_bars


def alpha_bar(t: int, table: Tensor, schedule: ScheduleConfig) -> Tensor:
    """alpha-bar_t from `table`; below t=0 the final one (alpha-bar_0, or 1 with set_alpha_to_one)."""
    if t >= len(table):
        raise RequestError(f"steps leave a DDIM/PNDM step at t = {t}, past the {len(table)}-step training table")
    if t >= 0:
        return table[t]
    return torch.tensor(1.0) if schedule.set_alpha_to_one else table[0]


def plms_timesteps(steps: int, schedule: ScheduleConfig) -> Tensor:
    """PNDM's evaluation timesteps (diffusers' plms_timesteps, skip_prk_steps): the DDIM ones with the second
    repeated, since the first step's correction evaluates there and so does the next step; one for one step."""
    timesteps, _ = ddim_alpha_bars(steps, schedule)
    return timesteps if steps == 1 else torch.cat([timesteps[:2], timesteps[1:]])


def plms_alpha_bars(timesteps: Tensor, steps: int, schedule: ScheduleConfig) -> list[AlphaBarStep]:
    """The move after each evaluation of a PNDM run over `timesteps` (plms_timesteps, perhaps cut at an img2img
    start): alpha-bar(t) to alpha-bar(t - N//steps); the run's second evaluation corrects its first step, which
    diffusers' step_plms (counter 1) restarts from the first x, moving from alpha-bar(t + N//steps) to
    alpha-bar(t). Cut past its repeat, the schedule keeps that arithmetic, as diffusers does."""
    ratio, table = schedule.num_train_timesteps // steps, alphas_cumprod(schedule)
    moves = []
    for i, t in enumerate(int(t) for t in timesteps):
        start, end = (t + ratio, t) if i == 1 else (t, t - ratio)
        moves.append((alpha_bar(start, table, schedule), alpha_bar(end, table, schedule)))
    return moves


def interpolate(x: Tensor, table: Tensor) -> Tensor:
    """numpy.interp(x, arange(len(table)), table) in float64: `table` read at fractional positions `x` (float64)."""
    table = table.double()
    low = x.floor().clamp(max=len(table) - 2)
    i = low.long()
    inside = (table[i + 1] - table[i]) * (x - low) + table[i]
    return torch.where(x >= len(table) - 1, table[-1], inside)


def discrete_sigmas(steps: int, schedule: ScheduleConfig) -> tuple[Tensor, Tensor]:
    """Euler, Euler ancestral, Heun and LMS: float32 timesteps (steps,) and sigmas (steps+1,) ending in 0.

    Spacing (default "linspace"): linspace(0, N-1, steps) (fractional); leading i * (N//steps) + steps_offset;
    trailing arange(N, 0, -N/steps).round() - 1. Sigmas are the training sigmas interpolated at them (np.interp).
    """
    spacing = schedule.timestep_spacing or "linspace"
    if spacing == "linspace":
        timesteps = _linspace(schedule.num_train_timesteps - 1, steps).flip(0).float()
    elif spacing == "leading":
        timesteps = torch.tensor(leading_timesteps(steps, schedule), dtype=torch.float32)
    else:
        timesteps = torch.tensor(trailing_timesteps(steps, schedule), dtype=torch.float32)
    sigmas = interpolate(timesteps.double(), training_sigmas(schedule))
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def discrete_init_sigma(sigmas: Tensor, schedule: ScheduleConfig) -> Tensor:
    """The std of the starting latent for Euler, Euler ancestral, Heun and LMS (diffusers' init_noise_sigma, float32):
    sigma_max for "linspace" (the default) and "trailing", sqrt(sigma_max² + 1) for "leading"."""
    sigma_max = sigmas.max()
    if (schedule.timestep_spacing or "linspace") in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max**2 + 1) ** 0.5


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
    """DPMSolverMultistep's integer timesteps (steps,) and sigmas (steps+1,) ending in 0, Karras-spaced or not.

    Karras sigmas span the whole training range whatever the spacing (diffusers replaces the spaced timesteps by
    the Karras sigmas' own). Otherwise, spacing (default "linspace") over N+1 points, the last dropped:
    linspace(0, N-1, steps+1).round(); leading i * (N // (steps+1)) + steps_offset for i = steps .. 1;
    trailing arange(N, 0, -N/steps).round() - 1 (steps points, none dropped); sigmas the training sigmas there.
    """
    table = training_sigmas(schedule)
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        log_sigmas = torch.log(table)
        timesteps = torch.tensor([round(sigma_to_t(sigma, log_sigmas)) for sigma in sigmas], dtype=torch.float32)
        sigmas = torch.tensor(sigmas, dtype=torch.float64).float()
        return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])
    spacing = schedule.timestep_spacing or "linspace"
    if spacing == "linspace":
        # steps+1 evenly spaced points, rounded, the last (t=0) dropped
        timesteps = _linspace(schedule.num_train_timesteps - 1, steps + 1).round().flip(0)[:-1].float()
    elif spacing == "leading":
        timesteps = torch.tensor(leading_timesteps(steps + 1, schedule)[:-1], dtype=torch.float32)
    else:
        timesteps = torch.tensor(trailing_timesteps(steps, schedule), dtype=torch.float32)
    sigmas = table[timesteps.long()]
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])
