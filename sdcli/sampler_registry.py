"""Every sampler sdcli has, one record each: its name, what it is, the diffusers scheduler it reproduces,
what AUTOMATIC1111 calls the closest setting, and the function that runs it.

Importing this module does not import torch (the CLI lists samplers and checks names before any model
loads); the function is looked up in `sdcli.samplers` when a render asks for it. A name that is not a
key of SAMPLER_SPECS is an error everywhere, never another sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler, as every part of sdcli sees it."""

    name: str  # what --sampler takes and the metadata records
    description: str  # one line for `sdcli samplers`
    scheduler: str  # the diffusers scheduler class it equals, built by from_config(<model's scheduler config>)
    a1111_name: str  # AUTOMATIC1111's "Sampler:" for the closest setting
    a1111_schedule: str | None  # its "Schedule type:" (1.9+); None where A1111 has no schedule choice
    runner: str  # the function in sdcli.samplers that runs it
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # passed to from_config
    extra_evaluations: Callable[[int], int] = lambda steps: 0  # network calls beyond one per step

    def evaluations(self, steps: int) -> int:
        """Network evaluations a run of `steps` steps makes (the progress display's total)."""
        return steps + self.extra_evaluations(steps)

    def function(self) -> Callable:
        """The function that runs it (imports torch)."""
        from sdcli import samplers

        return getattr(samplers, self.runner)


_SPECS = (
    SamplerSpec("ddim", "DDIM (Song et al. 2021); diffusers DDIMScheduler", "DDIMScheduler", "DDIM", None, "run_ddim"),
    SamplerSpec(
        "pndm", "PNDM/PLMS (Liu et al. 2022); diffusers PNDMScheduler", "PNDMScheduler", "PLMS", None, "run_pndm",
        extra_evaluations=lambda steps: 1 if steps > 1 else 0,  # its first step is evaluated twice
    ),
    SamplerSpec(
        "euler", "Euler (Karras et al. 2022); diffusers EulerDiscreteScheduler", "EulerDiscreteScheduler", "Euler",
        "Uniform", "run_euler",
    ),
    SamplerSpec(
        "euler_a", "Euler ancestral; diffusers EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "Euler a", "Uniform", "run_euler_ancestral",
    ),
    SamplerSpec(
        "heun", "Heun, 2nd order (Karras et al. 2022); diffusers HeunDiscreteScheduler", "HeunDiscreteScheduler",
        "Heun", "Uniform", "run_heun",
        extra_evaluations=lambda steps: steps - 1,  # two evaluations a step, one on the last
    ),
    SamplerSpec("lms", "linear multistep; diffusers LMSDiscreteScheduler", "LMSDiscreteScheduler", "LMS", "Uniform",
                "run_lms"),
    SamplerSpec(
        "dpmpp_2m", "DPM-Solver++(2M) (Lu et al. 2022); diffusers DPMSolverMultistepScheduler",
        # A1111's "Uniform" runs down to t=0 (last sigma 0.029); "SGM Uniform" stops where diffusers' linspace
        # does (0.226), within 5e-3 of sdcli's sigmas at 10-50 steps (docs/metadata.md)
        "DPMSolverMultistepScheduler", "DPM++ 2M", "SGM Uniform", "run_dpmpp_2m",
    ),
    SamplerSpec(
        "dpmpp_2m_karras", "DPM-Solver++(2M), Karras sigmas; the same with use_karras_sigmas=True",
        "DPMSolverMultistepScheduler", "DPM++ 2M", "Karras", "run_dpmpp_2m_karras",
        scheduler_options={"use_karras_sigmas": True},
    ),
)  # fmt: skip
SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_SPECS)
