"""Shared fixtures: an isolated sdcli home, a tiny random-weight model, and a runner for the real CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdcli.config import ModelConfig, parse_config

# Tiny models are overhead-bound: one thread per process is as fast on idle cores and avoids OpenMP
# threads spinning against each other when the machine is shared (set before torch is imported, so the
# CLI subprocesses the tests start inherit it too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A complete model at toy size: OpenCLIP text layout (no key renaming), 2x VAE, one U-Net down-sampling.
TINY_YAML = """\
name: tiny
description: tiny random-weight model for tests
weights: tiny.safetensors
text:
  layout: open_clip
  width: 32
  heads: 2
  layers: 2
  activation: gelu
  output_layer: last
  pad_id: 0
unet:
  model_channels: 32
  channel_mult: [1, 2]
  num_res_blocks: 1
  attention_levels: [1]
  num_heads: 2
  context_dim: 32
vae:
  base_channels: 32
  channel_mult: [1, 2]
  num_res_blocks: 1
schedule:
  prediction_type: epsilon
defaults:
  width: 32
  height: 32
  steps: 3
  guidance: 5.0
  sampler: euler
"""


@pytest.fixture(autouse=True)
def sdcli_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own SDCLI_HOME (user configs, hash cache), never the real one."""
    home = tmp_path_factory.mktemp("sdcli-home")
    monkeypatch.setenv("SDCLI_HOME", str(home))
    monkeypatch.delenv("SDCLI_WEIGHTS_DIR", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    """The tiny config alone (no weights): enough for everything that happens before a model loads."""
    return parse_config(TINY_YAML, source=Path("tiny.yaml"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny config YAML next to a seeded random-weight single-file checkpoint; returns the YAML's path."""
    import torch
    from safetensors.torch import save_file

    from sdcli.checkpoint import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX
    from sdcli.nets.text import TextEncoder
    from sdcli.nets.unet import UNet
    from sdcli.nets.vae import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny-model")
    config = parse_config(TINY_YAML)
    torch.manual_seed(0)
    state = {}
    for prefix, net in (
        (UNET_PREFIX, UNet(config.unet)),
        (VAE_PREFIX, AutoencoderKL(config.vae)),
        (TEXT_PREFIXES[config.text[0].layout], TextEncoder(config.text[0])),
    ):
        for key, tensor in net.state_dict().items():
            state[prefix + key] = _random_like(key, tensor)
    save_file(state, str(folder / "tiny.safetensors"))
    (folder / "tiny.yaml").write_text(TINY_YAML, encoding="utf-8")
    return folder / "tiny.yaml"


def _random_like(key: str, tensor):
    """Seeded values of a healthy scale: fan-in scaled matrices, norm gains near 1, small biases (every
    tensor is set, so nothing depends on a module's own init, e.g. parameters made with torch.empty)."""
    import torch

    if tensor.dim() >= 2:
        return torch.randn(tensor.shape) / tensor[0].numel() ** 0.5
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(tensor.shape)
    return 0.02 * torch.randn(tensor.shape)


@dataclass
class Ran:
    """One CLI run: exit code and the two streams, kept apart."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


@pytest.fixture
def cli():
    """Run the real command line in-process (Typer's runner); a crash that is not an exit fails the test."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    def run(*args, input: str | None = None) -> Ran:
        result = CliRunner().invoke(app, [str(a) for a in args], input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run
