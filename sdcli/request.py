"""One image's complete recipe, validated without importing torch (the CLI checks input before loading)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sdcli.config import SAMPLERS, ModelConfig, _suggest
from sdcli.errors import RequestError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts any unsigned 64-bit value


@dataclass(frozen=True)
class Request:
    """Everything that decides the pixels of one image, besides the model and the device/dtype."""

    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one U-Net batch."""
        return (self.steps, self.guidance, self.sampler, self.width, self.height)


def check_request(request: Request, config: ModelConfig) -> Request:
    """Reject values the model cannot render; returns the request unchanged when it is fine."""
    if request.sampler not in SAMPLERS:
        raise RequestError(
            f"unknown sampler '{request.sampler}'{_suggest(request.sampler, SAMPLERS)}; "
            f"valid samplers: {', '.join(SAMPLERS)}"
        )
    step = config.vae.downsample
    for name in ("width", "height"):
        value = getattr(request, name)
        if value <= 0 or value % step:
            raise RequestError(f"--{name} must be a positive multiple of {step}, got {value}")
    if request.steps < 1:
        raise RequestError(f"--steps must be at least 1, got {request.steps}")
    if request.steps > config.schedule.num_train_timesteps:
        raise RequestError(
            f"--steps must be at most {config.schedule.num_train_timesteps} (the training timesteps), "
            f"got {request.steps}"
        )
    if not request.guidance >= 0 or request.guidance == float("inf"):
        raise RequestError(f"--guidance must be a finite number >= 0, got {request.guidance}")
    if not 0 <= request.seed <= MAX_SEED:
        raise RequestError(f"--seed must be between 0 and {MAX_SEED}, got {request.seed}")
    return request


def request_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Request))
