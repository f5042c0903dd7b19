"""Samplers against diffusers' schedulers (the oracle), run the way StableDiffusionPipeline runs them, and laws."""

from __future__ import annotations

import dataclasses
import inspect

import diffusers
import pytest
import torch

from sdcli.config import SAMPLERS, ScheduleConfig, load_config
from sdcli.errors import RequestError
from sdcli.sampler_registry import SAMPLER_SPECS
from sdcli.samplers import sample, vp_coefficients
from sdcli.schedules import ddim_alpha_bars, discrete_sigmas, dpm_sigmas

# The registry names each sampler's diffusers scheduler; these are the classes it must name.
REFERENCE = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices raised inside diffusers
SCHEDULES = {"epsilon": load_config("sd15").schedule, "v_prediction": load_config("sd21-v").schedule}
SPACINGS = ("leading", "trailing", "linspace")  # timestep_spacing set in the scheduler config (SDXL: leading)
# SDXL base's scheduler_config.json as the hub has it; diffusers builds every sampler's scheduler from it
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "interpolation_type": "linear",
    "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False, "set_alpha_to_one": False,
    "skip_prk_steps": True, "clip_sample": False, "sample_max_value": 1.0, "trained_betas": None,
}  # fmt: skip
SDXL_SCHEDULE = ScheduleConfig(prediction_type="epsilon", timestep_spacing="leading")
# Every sampler but lms agrees bit for bit; lms differs by ~4e-7 because diffusers integrates its coefficients
# with scipy.quad over a float32 integrand, where we integrate the polynomial exactly.
RTOL = 1e-5


def smooth(x, t):
    """A toy network: smooth, non-constant, and dependent on t."""
    return 0.3 * x * torch.cos(t / 300) + 0.1 * torch.sin(x)


def flat(x, t):
    """A toy network that ignores t."""
    return 0.2 * x + 0.05 * torch.tanh(x)


def spaced(schedule: ScheduleConfig, spacing: str | None) -> ScheduleConfig:
    return dataclasses.replace(schedule, timestep_spacing=spacing)


def reference_scheduler(sampler: str, schedule: ScheduleConfig | dict):
    """The diffusers scheduler of `sampler`, from `schedule` as SD's scheduler config (no timestep_spacing where it
    is None, so the class default applies) or from a scheduler config dict as it is."""
    cls, extra = REFERENCE[sampler]
    if isinstance(schedule, dict):
        return cls.from_config({**schedule, **extra})
    sd_config = {**dataclasses.asdict(schedule), "skip_prk_steps": True, "trained_betas": None}
    if schedule.timestep_spacing is None:
        del sd_config["timestep_spacing"]
    return cls.from_config({**sd_config, **extra})


def run_diffusers(sampler, schedule, steps, noise, seeds, net):
    """StableDiffusionPipeline's loop (guidance lives in `net`); returns latents and the t values the net saw."""
    scheduler = reference_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    seen = []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        seen.append(t.to(torch.float32))  # what a U-Net's timestep embedding reads
        x = scheduler.step(net(x_in, seen[-1]), t, x, **extra, return_dict=False)[0]
    return x, torch.stack(seen)


def run_sdcli(sampler, schedule, steps, noise, seeds, net):
    seen, progress = [], []

    def model(x_in, t):
        assert t.dim() == 0 and t.dtype == torch.float32
        seen.append(t)
        return net(x_in, t)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = sample(sampler, model, noise, steps, schedule, generators, on_step=lambda i, n: progress.append((i, n)))
    return x, torch.stack(seen), progress


def assert_close(actual, expected):
    assert (actual - expected).abs().max() <= RTOL * expected.abs().max()


def test_every_sampler_has_a_reference_and_the_registry_names_it():
    assert set(REFERENCE) == set(SAMPLERS)
    for name, (cls, options) in REFERENCE.items():
        spec = SAMPLER_SPECS[name]
        assert getattr(diffusers, spec.scheduler) is cls and spec.scheduler_options == options
        assert callable(spec.function())


@pytest.mark.parametrize("name", ["", "Euler", "lms ", "dpmpp_2m_karras_x", "sample"])
def test_an_unknown_sampler_never_falls_through(name):
    with pytest.raises(RequestError, match="unknown sampler"):
        sample(name, flat, torch.zeros(1, 4, 8, 8), 4, SCHEDULES["epsilon"], [torch.Generator()])


@pytest.mark.parametrize("steps", [1, 4, 7, 25])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers(sampler, prediction, steps):
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8)
    for net in (smooth, flat):
        expected, expected_t = run_diffusers(sampler, SCHEDULES[prediction], steps, noise, [11, 12], net)
        actual, actual_t, _ = run_sdcli(sampler, SCHEDULES[prediction], steps, noise, [11, 12], net)
        assert torch.equal(actual_t, expected_t)
        assert_close(actual, expected)


@pytest.mark.parametrize("steps", [1, 4, 7, 25])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers_with_timestep_spacing(sampler, spacing, prediction, steps):
    # the scheduler config names timestep_spacing (SDXL's: "leading", with steps_offset 1 as SD's configs have)
    schedule = spaced(SCHEDULES[prediction], spacing)
    assert schedule.steps_offset == 1
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8)
    for net in (smooth, flat):
        expected, expected_t = run_diffusers(sampler, schedule, steps, noise, [11, 12], net)
        actual, actual_t, _ = run_sdcli(sampler, schedule, steps, noise, [11, 12], net)
        assert torch.equal(actual_t, expected_t)
        assert_close(actual, expected)


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_diffusers_built_from_sdxl_scheduler_config(sampler, steps):
    # diffusers builds every scheduler by from_config(SDXL's scheduler_config.json), so all of them space "leading"
    torch.manual_seed(0)
    noise = torch.randn(1, 4, 8, 8)
    expected, expected_t = run_diffusers(sampler, SDXL_SCHEDULER_CONFIG, steps, noise, [3], smooth)
    actual, actual_t, _ = run_sdcli(sampler, SDXL_SCHEDULE, steps, noise, [3], smooth)
    assert reference_scheduler(sampler, SDXL_SCHEDULER_CONFIG).config.timestep_spacing == "leading"
    assert torch.equal(actual_t, expected_t)
    assert_close(actual, expected)


def test_the_bundled_sdxl_config_is_the_hub_scheduler_config():
    assert load_config("sdxl").schedule == SDXL_SCHEDULE
    for key, value in dataclasses.asdict(SDXL_SCHEDULE).items():
        assert SDXL_SCHEDULER_CONFIG[key] == value


@pytest.mark.parametrize("spacing", [None, *SPACINGS])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_progress_counts_network_evaluations(sampler, spacing):
    torch.manual_seed(0)
    noise = torch.randn(1, 4, 4, 4)
    schedule = spaced(SCHEDULES["epsilon"], spacing)
    for steps in (1, 2, 5, 7):
        _, seen, progress = run_sdcli(sampler, schedule, steps, noise, [0], smooth)
        scheduler = reference_scheduler(sampler, schedule)
        scheduler.set_timesteps(steps)
        n = len(scheduler.timesteps)
        assert SAMPLER_SPECS[sampler].evaluations(steps) == n == len(seen)
        assert progress == [(i, n) for i in range(1, n + 1)]


@pytest.mark.parametrize("spacing", [None, *SPACINGS])
def test_schedules_equal_diffusers_tables(spacing):
    schedule = spaced(SCHEDULES["epsilon"], spacing)
    for steps in [*range(1, 61), 100, 250, 500, 996, 999]:
        euler = reference_scheduler("euler", schedule)
        euler.set_timesteps(steps)
        timesteps, sigmas = discrete_sigmas(steps, schedule)
        assert torch.equal(timesteps, euler.timesteps) and torch.equal(sigmas, euler.sigmas)
        for sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
            if sampler == "dpmpp_2m" and spacing == "leading" and steps == 999:
                continue  # refused: see test_spacings_diffusers_cannot_run_are_refused
            dpm = reference_scheduler(sampler, schedule)
            dpm.set_timesteps(steps)
            timesteps, sigmas = dpm_sigmas(steps, schedule, karras=sampler == "dpmpp_2m_karras")
            assert torch.equal(timesteps, dpm.timesteps.float()) and torch.equal(sigmas, dpm.sigmas)
        ddim = reference_scheduler("ddim", schedule)
        ddim.set_timesteps(steps)
        timesteps, alpha_bars = ddim_alpha_bars(steps, schedule)
        assert torch.equal(timesteps, ddim.timesteps.float())
        alpha_bar, alpha_bar_next = (torch.stack(ab) for ab in zip(*alpha_bars, strict=True))
        assert torch.equal(alpha_bar, ddim.alphas_cumprod[ddim.timesteps])
        prev = ddim.timesteps - schedule.num_train_timesteps // steps  # where DDIM's step() lands, any spacing
        final = ddim.final_alpha_cumprod.expand(steps)
        assert torch.equal(alpha_bar_next, torch.where(prev >= 0, ddim.alphas_cumprod[prev.clamp(min=0)], final))


def test_karras_sigmas_ignore_the_spacing():
    # diffusers computes the spaced timesteps, then replaces them by the Karras sigmas' own
    torch.manual_seed(0)
    noise = torch.randn(1, 4, 4, 4)
    plain, plain_t, _ = run_sdcli("dpmpp_2m_karras", SCHEDULES["epsilon"], 7, noise, [0], smooth)
    for spacing in SPACINGS:
        for steps in (7, 61, 1000):
            schedule = spaced(SCHEDULES["epsilon"], spacing)
            assert torch.equal(dpm_sigmas(steps, schedule, True)[1], dpm_sigmas(steps, SCHEDULES["epsilon"], True)[1])
        actual, actual_t, _ = run_sdcli("dpmpp_2m_karras", spaced(SCHEDULES["epsilon"], spacing), 7, noise, [0], smooth)
        assert torch.equal(actual, plain) and torch.equal(actual_t, plain_t)
    # "trailing" 61 makes 62 spaced timesteps (below), which the Karras sigmas then replace
    expected, expected_t = run_diffusers("dpmpp_2m_karras", spaced(SCHEDULES["epsilon"], "trailing"), 61, noise, [0],
                                         smooth)
    actual, actual_t, _ = run_sdcli("dpmpp_2m_karras", spaced(SCHEDULES["epsilon"], "trailing"), 61, noise, [0], smooth)
    assert torch.equal(actual_t, expected_t)
    assert_close(actual, expected)


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "dpmpp_2m_karras"])
def test_spacings_diffusers_cannot_run_are_refused(sampler):
    noise = torch.randn(1, 4, 4, 4)
    gens = [torch.Generator().manual_seed(0)]
    # "trailing" 61 of 1000: float rounding in arange(1000, 0, -1000/61) leaves a 62nd timestep, t = -1
    trailing = spaced(SCHEDULES["epsilon"], "trailing")
    scheduler = reference_scheduler(sampler, trailing)
    scheduler.set_timesteps(61)
    assert len(scheduler.timesteps) == SAMPLER_SPECS[sampler].evaluations(62) and scheduler.timesteps[-1] == -1
    with pytest.raises(RequestError, match="trailing"):
        sample(sampler, smooth, noise, 61, trailing, gens)
    # "leading" with steps_offset 1 past the table: DDIM/PNDM index t = 1000 (IndexError), DPM-Solver's steps+1
    # points reach t = 1000 at 999 steps (non-finite) and space 0 apart at 1000 (IndexError); Euler, Euler
    # ancestral, Heun and LMS would feed the network t = 1000 at sigma_max again (LMS: non-finite)
    leading = spaced(SCHEDULES["epsilon"], "leading")
    for steps in (999, 1000) if sampler == "dpmpp_2m" else (1000,):
        with pytest.raises(RequestError, match="steps"):
            sample(sampler, smooth, noise, steps, leading, gens)
    assert sample(sampler, flat, noise, 998, leading, gens).isfinite().all()


def noise_levels(sampler: str, steps: int, schedule: ScheduleConfig) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """t -> (alpha, sigma_vp) of the sampler's own schedule, so a toy network can know its noise level."""
    if sampler in ("ddim", "pndm"):
        timesteps, alpha_bars = ddim_alpha_bars(steps, schedule)
        return {t: (ab**0.5, (1 - ab) ** 0.5) for t, (ab, _) in zip(timesteps.tolist(), alpha_bars, strict=True)}
    if sampler.startswith("dpmpp"):
        timesteps, sigmas = dpm_sigmas(steps, schedule, karras=sampler.endswith("karras"))
    else:
        timesteps, sigmas = discrete_sigmas(steps, schedule)
    return {t: vp_coefficients(sigma) for t, sigma in zip(timesteps.tolist(), sigmas, strict=False)}


@pytest.mark.parametrize("spacing", [None, *SPACINGS])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_constant_denoiser_lands_on_it(sampler, prediction, spacing):
    # set_alpha_to_one makes DDIM/PNDM end at alpha-bar = 1 (no noise left); the others end at sigma = 0 anyway
    schedule = spaced(dataclasses.replace(SCHEDULES[prediction], set_alpha_to_one=True), spacing)
    if sampler == "pndm" and prediction == "v_prediction":
        pytest.skip("diffusers' PNDM mixes raw v outputs of different t, so it only approximates the ODE here")
    if sampler == "pndm" and spacing in ("trailing", "linspace"):
        pytest.skip("PNDM's first correction then evaluates at t_1 an x that lies at alpha-bar(t_0 - N//steps)")
    if sampler == "ddim" and spacing == "trailing":
        pytest.skip("trailing's last step lands on t = 0, so noise of std sqrt(1 - alpha-bar_0) is left")
    torch.manual_seed(0)
    c = torch.randn(1, 4, 4, 4)
    steps = 7
    levels = noise_levels(sampler, steps, schedule)

    def constant(x_in, t):
        alpha, sigma = levels[t.item()]
        eps = (x_in - alpha * c) / sigma
        return eps if prediction == "epsilon" else alpha * eps - sigma * c

    x = sample(sampler, constant, torch.randn(1, 4, 4, 4), steps, schedule, [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(x, c, rtol=0, atol=1e-5 * c.abs().max().item())


def test_euler_a_images_follow_their_own_generator():
    torch.manual_seed(0)
    noise = torch.randn(2, 4, 8, 8)
    schedule = SCHEDULES["epsilon"]
    pair, _, _ = run_sdcli("euler_a", schedule, 7, noise, [5, 6], smooth)
    first, _, _ = run_sdcli("euler_a", schedule, 7, noise[:1], [5], smooth)
    second, _, _ = run_sdcli("euler_a", schedule, 7, noise[1:], [6], smooth)
    assert torch.equal(pair[:1], first) and torch.equal(pair[1:], second)
    reference, _ = run_diffusers("euler_a", schedule, 7, noise[:1], [5], smooth)
    assert_close(first, reference)
    reseeded, _, _ = run_sdcli("euler_a", schedule, 7, noise[:1], [7], smooth)
    assert not torch.allclose(reseeded, first)


def test_bad_requests_are_refused():
    noise = torch.randn(1, 4, 4, 4)
    gens = [torch.Generator().manual_seed(0)]
    with pytest.raises(RequestError, match="dpmpp_2m_karras"):
        sample("euler_ancestral", smooth, noise, 5, SCHEDULES["epsilon"], gens)
    for steps in (0, 1001):
        with pytest.raises(RequestError, match="steps"):
            sample("euler", smooth, noise, steps, SCHEDULES["epsilon"], gens)
    # "leading" spacing with steps_offset 1 would start at t = 1000, past the table (diffusers: IndexError)
    with pytest.raises(RequestError, match="steps"):
        sample("ddim", smooth, noise, 1000, SCHEDULES["epsilon"], gens)
