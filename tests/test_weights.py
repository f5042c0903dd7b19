"""Strict single-file loading: what loads, and the one clear error for each way a file can be wrong."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdcli.checkpoint import UNET_PREFIX
from sdcli.errors import CheckpointError
from sdcli.weights import expected_keys, load_components

from reference import tiny_config, write_random_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    config = tiny_config("sd1")
    path = tmp_path_factory.mktemp("weights") / "sd1.safetensors"
    write_random_checkpoint(config, path, dtype=torch.float16, seed=1, extras=True)
    return config, path


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fp16_file_loads_into_fp32_exactly(sd1):
    config, path = sd1
    nets = load_components(config, path, CPU, torch.float32)
    stored = _tensors(path)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert nets.unet.state_dict()[key].dtype == torch.float32
    assert torch.equal(nets.unet.state_dict()[key], stored[UNET_PREFIX + key].float())
    for net in nets.all():
        assert not any(t.is_meta for t in net.state_dict().values())
        assert not any(p.requires_grad for p in net.parameters())


def test_the_model_does_not_depend_on_the_file_once_loaded(tmp_path):
    """fp32 into fp32 is where a loader could hand back a view of a memory-mapped file; run in a child, as
    such a view would die of SIGBUS (or a segfault, once the map is closed) when the file is truncated."""
    config = tiny_config("sd1")
    path = write_random_checkpoint(config, tmp_path / "fp32.safetensors", dtype=torch.float32, seed=2)
    expected = float(_tensors(path)[UNET_PREFIX + "out.2.weight"].double().sum())  # before the file goes
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from reference import tiny_config
from sdcli.weights import load_components
nets = load_components(tiny_config("sd1"), {str(path)!r}, torch.device("cpu"), torch.float32)
os.truncate({str(path)!r}, 0)
total = sum(float(t.double().sum()) for net in nets.all() for t in net.state_dict().values())
print(repr(float(nets.unet.state_dict()["out.2.weight"].double().sum())))
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert float(ran.stdout) == expected


@pytest.mark.parametrize("buffer_bytes", [1, 777, 1 << 14])
def test_tensors_read_in_slices_through_a_small_buffer_are_exact(sd1, monkeypatch, buffer_bytes):
    """Real tensors are larger than the read buffer (SD's largest is 76 MB): slices of whole rows, one row
    at a time when a row outgrows the buffer, land in the right places, also in NHWC conv weights."""
    import sdcli.weights

    config, path = sd1
    monkeypatch.setattr(sdcli.weights, "READ_BUFFER_BYTES", buffer_bytes)
    nets = load_components(config, path, CPU, torch.float32, vae_layout=torch.channels_last)
    stored = _tensors(path)
    conv = nets.vae.state_dict()["decoder.conv_in.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for prefix, net in ((UNET_PREFIX, nets.unet), ("first_stage_model.", nets.vae)):
        for name, tensor in net.state_dict().items():
            assert torch.equal(tensor, stored[prefix + name].float()), name


def test_a_file_that_shrinks_mid_load_is_a_clear_error(tmp_path, monkeypatch):
    """Truncated after some tensors are read (a download rewriting it): one CheckpointError, not a crash."""
    import sdcli.weights

    config = tiny_config("sd1")
    path = write_random_checkpoint(config, tmp_path / "w.safetensors", dtype=torch.float16, seed=3)
    made, empty = [], sdcli.weights.Cast.empty

    def empty_then_truncate(cast, shape):
        made.append(shape)
        if len(made) == 5:
            os.truncate(path, path.stat().st_size // 2)
        return empty(cast, shape)

    monkeypatch.setattr(sdcli.weights.Cast, "empty", empty_then_truncate)
    with pytest.raises(CheckpointError, match="file is truncated \\(it shrank while being read\\)"):
        load_components(config, path, CPU, torch.float32)
    assert len(made) >= 5


def test_extras_in_real_files_are_ignored_but_everything_expected_is_read(sd1):
    config, path = sd1
    stored = _tensors(path)
    expected = expected_keys(config)
    assert set(expected) < set(stored)  # the file holds extras (schedule buffers, position_ids, ...)
    assert all(tuple(stored[k].shape) == s for k, s in expected.items())


def _rewrite(path, out, *, drop=None, reshape=None, add=None):
    tensors = _tensors(path)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = torch.zeros(3, 3, dtype=torch.float16)
    if add:
        tensors[add] = torch.zeros(1, dtype=torch.float16)
    save_file(tensors, str(out))
    return out


def test_missing_tensor_is_named(sd1, tmp_path):
    config, path = sd1
    key = "first_stage_model.decoder.conv_out.weight"
    bad = _rewrite(path, tmp_path / "bad.safetensors", drop=key)
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        load_components(config, bad, CPU, torch.float32)


def test_wrong_shape_names_key_expected_and_found(sd1, tmp_path):
    config, path = sd1
    key = "model.diffusion_model.out.2.weight"
    bad = _rewrite(path, tmp_path / "bad.safetensors", reshape=key)
    message = r"'model\.diffusion_model\.out\.2\.weight' has shape \[3, 3\], expected \[4, 32, 3, 3\]"
    with pytest.raises(CheckpointError, match=message):
        load_components(config, bad, CPU, torch.float32)


def test_unexpected_network_tensor_means_wrong_config(sd1, tmp_path):
    config, path = sd1
    bad = _rewrite(path, tmp_path / "bad.safetensors", add="model.diffusion_model.label_emb.0.0.weight")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.diffusion_model.label_emb.0.0.weight'"):
        load_components(config, bad, CPU, torch.float32)


def test_other_family_gets_a_config_hint(tmp_path):
    path = tmp_path / "sd2.safetensors"
    write_random_checkpoint(tiny_config("sd2"), path, dtype=torch.float16, seed=2)
    with pytest.raises(CheckpointError, match="SD 2.x checkpoint"):
        load_components(tiny_config("sd1"), path, CPU, torch.float32)


def test_truncated_file(sd1, tmp_path):
    config, path = sd1
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_components(config, cut, CPU, torch.float32)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01\x02",
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 5) + b"nope!",
        struct.pack("<Q", 2) + b"[]",
    ],
    ids=["empty", "short", "huge-header", "not-json", "not-a-table"],
)
def test_corrupt_header(sd1, tmp_path, blob):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_components(sd1[0], bad, CPU, torch.float32)


def test_header_entry_with_wrong_byte_count(sd1, tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry for 'x'"):
        load_components(sd1[0], bad, CPU, torch.float32)


def test_no_unet_means_not_a_single_file_checkpoint(sd1, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a CompVis/LDM single-file"):
        load_components(sd1[0], other, CPU, torch.float32)


def test_missing_file_and_pickles(sd1, tmp_path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_components(sd1[0], tmp_path / "absent.safetensors", CPU, torch.float32)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load_components(sd1[0], pickle, CPU, torch.float32)


def test_fp16_request_keeps_the_vae_in_fp32(sd1):
    config, path = sd1
    nets = load_components(config, path, CPU, torch.float16)
    assert next(nets.unet.parameters()).dtype == torch.float16
    assert next(nets.vae.parameters()).dtype == torch.float32
