"""Faults met for real by the command line with a tiny model: images that fail, a full or read-only disk,
weights that vanish, shrink or change under a run, corrupt files, pickles, and a process killed outright.
Each must give a clear one-line error and lose no finished image."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdcli.outputs import TEMP_SUFFIX, shareable
from sdcli.runner import NON_FINITE

OVERFLOW = 1e30  # a guidance scale that overflows fp32 in the guided noise estimate


def pairs(folder: Path, *, temps_allowed: bool = False) -> list[str]:
    """Stems of the complete PNG + JSON pairs; fails on orphans, on any other file, and on temporary files
    unless `temps_allowed` (a killed process may leave its hidden temporary file behind)."""
    names = sorted(p.name for p in folder.iterdir() if not (temps_allowed and p.name.endswith(TEMP_SUFFIX)))
    stems = sorted({n.rsplit(".", 1)[0] for n in names})
    assert names == sorted([f"{s}.json" for s in stems] + [f"{s}.png" for s in stems]), names
    for stem in stems:  # complete: the PNG decodes whole, the sidecar parses and describes it
        with Image.open(folder / f"{stem}.png") as image:
            image.load()
            assert json.loads(image.text["sdcli"]) == shareable(json.loads((folder / f"{stem}.json").read_text()))
    return stems


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def model(tiny_model, tmp_path) -> tuple[Path, Path]:
    """A private copy of the tiny model (config, weights) that a test may damage."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "tiny.yaml")
    shutil.copy(tiny_model.parent / "tiny.safetensors", folder / "tiny.safetensors")
    return folder / "tiny.yaml", folder / "tiny.safetensors"


@pytest.fixture
def finished(cli, model, tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """Two images already rendered from a prompt file that then gains a third prompt still to render:
    (prompt file, output folder, the finished files' bytes)."""
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a\nb\n")
    assert cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1", "-q").code == 0
    prompts.write_text("a\nb\nc\n")
    return prompts, out, snapshot(out)


def fails_cleanly(ran, code: int, message: str) -> None:
    """One `sdcli: error:` line, the last one, holding `message`; no traceback."""
    assert ran.code == code, ran
    assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
    assert sum(line.startswith("sdcli: error") for line in ran.err_lines) == 1 and "Traceback" not in ran.err


# --- images that fail ---------------------------------------------------------------------------------


def test_an_overflowing_image_is_reported_and_the_batch_goes_on(cli, model, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out"
    prompts.write_text(f'"a"\n{{"prompt": "b", "guidance": {OVERFLOW}}}\n"c"\n"d"\n')
    args = ("batch", prompts, "-c", model[0], "-o", out, "--steps", "1", "--json")
    ran = cli(*args)
    fails_cleanly(ran, 1, "1 of 4 images failed")
    lines = [json.loads(line) for line in ran.out.splitlines()]
    assert sorted((x["prompt"], x["status"]) for x in lines) == [
        ("a", "written"), ("b", "failed"), ("c", "written"), ("d", "written")
    ]  # fmt: skip
    bad = next(x for x in lines if x["status"] == "failed")
    assert "NaN or infinite" in bad["error"] and bad["guidance"] == OVERFLOW
    assert not Path(bad["image"]).exists() and not Path(bad["metadata"]).exists()
    (failed_line,) = [line for line in ran.err_lines if line.startswith("sdcli: failed: ")]
    assert failed_line == f"sdcli: failed: {prompts}:2, seed {bad['seed']}, {Path(bad['image']).name}: {NON_FINITE}"
    assert "done: 3 written, 0 skipped, 1 failed" in ran.err
    assert len(pairs(out)) == 3
    plain = cli(*args[:-1])  # stdout lists only images that exist
    assert plain.code == 1 and sorted(plain.out.splitlines()) == sorted(str(out / f"{s}.png") for s in pairs(out))
    quiet = cli(*args[:-1], "-q")  # a rerun redoes only the failed image, and says so even when quiet
    assert quiet.code == 1 and quiet.out == "" and len(pairs(out)) == 3
    assert [line.split(": ")[1] for line in quiet.err_lines] == ["failed", "done", "error"]
    assert "done: 0 written, 3 skipped, 1 failed" in quiet.err


def test_fail_fast_stops_at_the_first_failed_image(cli, model, tmp_path):
    prompts, out = tmp_path / "p.yaml", tmp_path / "out"
    prompts.write_text(f"- prompt: x\n  guidance: {OVERFLOW:.1e}\n- a\n- b\n")  # YAML 1.1 floats need the dot
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1", "--fail-fast", "--batch-size", "1")
    fails_cleanly(ran, 1, "stopped at the first failed image (--fail-fast): ")
    assert "p.yaml:1" in ran.err_lines[-1]
    assert "sdcli: stopped: 0 written, 0 skipped, 1 failed, 2 remaining" in ran.err_lines
    assert pairs(out) == []


def test_fp16_overflow_fails_only_its_own_image(cli, model, tmp_path):
    out = tmp_path / "out"
    ran = cli(
        "generate", "a", "-c", model[0], "-o", out, "--steps", "1", "--dtype", "fp16", "-g", "1e9", "--json"
    )  # fp16 tops out at 65504: the guided noise estimate overflows (fp32 renders this one)
    fails_cleanly(ran, 1, "1 of 1 images failed")
    assert json.loads(ran.out)["status"] == "failed" and "(a numeric overflow); try --dtype bf16 or fp32" in ran.err
    assert pairs(out) == []


# --- the disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 40 KiB file system (tmpfs), where this process may mount one (root on Linux); yields a
    function that changes its mount options (`size=1m`, `ro`, `rw`)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def remount(options: str) -> Path:
        subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)
        return disk

    try:
        yield remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_keeps_every_finished_image(cli, model, tmp_path, small_disk):
    disk = small_disk("size=40k")
    prompts, out = tmp_path / "p.txt", disk / "out"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
    args = ("batch", prompts, "-c", model[0], "-o", out, "--steps", "1")
    ran = cli(*args)
    fails_cleanly(ran, 1, "No space left on device")
    assert ran.err_lines[-1].startswith("sdcli: error: cannot write ")
    kept = pairs(out)  # no temporary file, no half pair
    assert 1 <= len(kept) < 8 and len(ran.out.splitlines()) == len(kept)
    assert f"sdcli: stopped: {len(kept)} written, 0 skipped, 0 failed, {8 - len(kept)} remaining" in ran.err_lines
    before = snapshot(out)
    small_disk("size=1m")
    again = cli(*args, "--json")
    assert again.code == 0 and len(pairs(out)) == 8
    assert [json.loads(line)["status"] for line in again.out.splitlines()].count("skipped") == len(kept)
    assert all((out / name).read_bytes() == data for name, data in before.items())


def test_a_read_only_folder_is_refused_before_loading(cli, model, small_disk):
    disk = small_disk("ro")
    ran = cli("generate", "a", "-c", model[0], "-o", disk / "out", "--steps", "1")
    fails_cleanly(ran, 2, "cannot write there: Read-only file system")
    assert not any(line.startswith("sdcli: loading") for line in ran.err_lines)


def test_a_folder_that_turns_read_only_mid_batch_keeps_what_is_done(cli, model, tmp_path, small_disk, monkeypatch):
    from sdcli.progress import Reporter

    disk = small_disk("size=1m")
    reported = Reporter.image

    def then_read_only(self, outcome):
        reported(self, outcome)
        if self.done == 1:
            small_disk("ro")

    monkeypatch.setattr(Reporter, "image", then_read_only)
    prompts, out = tmp_path / "p.txt", disk / "out"
    prompts.write_text("a\nb\nc\n")
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1", "--batch-size", "1")
    fails_cleanly(ran, 1, "Read-only file system")
    assert len(pairs(out)) == 1 and "sdcli: stopped: 1 written, 0 skipped, 0 failed, 2 remaining" in ran.err_lines


def test_an_output_path_under_a_file_is_refused(cli, model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    ran = cli("generate", "a", "-c", model[0], "-o", tmp_path / "file" / "out")
    fails_cleanly(ran, 2, "cannot write there: Not a directory")


# --- the weights ---------------------------------------------------------------------------------------


def test_weights_that_vanish_before_loading(cli, model, finished, monkeypatch):
    import sdcli.hashing

    prompts, out, before = finished
    real = sdcli.hashing.sha256_file

    def hash_then_delete(path):
        digest = real(path)
        model[1].unlink()
        return digest

    monkeypatch.setattr(sdcli.hashing, "sha256_file", hash_then_delete)
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1")
    fails_cleanly(ran, 2, f"weights file not found: {model[1]}")
    assert snapshot(out) == before


def test_weights_replaced_between_hashing_and_loading(cli, model, finished, monkeypatch):
    import sdcli.hashing

    prompts, out, before = finished
    real = sdcli.hashing.sha256_file

    def hash_then_replace(path):
        digest = real(path)
        save_file(load_file(model[1]), str(model[1]), metadata={"note": "other bytes"})
        return digest

    monkeypatch.setattr(sdcli.hashing, "sha256_file", hash_then_replace)
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1")
    fails_cleanly(ran, 2, "changed or vanished while it was being read")
    assert snapshot(out) == before  # no image may claim the hash of weights it was not made with


def test_weights_that_shrink_while_loading(cli, model, finished, monkeypatch):
    import sdcli.weights

    prompts, out, before = finished
    real = sdcli.weights.read_header

    def header_then_truncate(path, *file):
        table = real(path, *file)
        os.truncate(path, path.stat().st_size // 2)
        return table

    monkeypatch.setattr(sdcli.weights, "read_header", header_then_truncate)
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1")
    fails_cleanly(ran, 2, "file is truncated (it shrank while being read)")
    assert snapshot(out) == before


def test_weights_truncated_and_deleted_after_loading_do_not_matter(model, tmp_path):
    """Run in a child process: a model still backed by a memory map of the file would die of SIGBUS."""
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(4)))
    sha = hashlib.sha256(model[1].read_bytes()).hexdigest()
    child = _sdcli("batch", prompts, "-c", model[0], "-o", out, "--steps", "3", "--batch-size", "1")
    first = child.stdout.readline()  # the model is loaded and one image is on disk
    os.truncate(model[1], 100)
    model[1].unlink()
    rest, err = child.communicate(timeout=120)
    assert first and child.returncode == 0, err
    assert len(pairs(out)) == 4 and len([first, *rest.splitlines()]) == 4
    assert {json.loads((out / f"{s}.json").read_text())["weights_sha256"] for s in pairs(out)} == {sha}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: b"\xff" * 8 + data[8:], "not a safetensors file, or its header is corrupt or truncated"),
        (lambda data: data[:8] + b"#" + data[9:], "corrupt safetensors header (not JSON)"),
        (lambda data: data[:8] + data[8:].replace(b'"F32"', b'"F31"', 1), "corrupt safetensors header entry for"),
        (lambda data: data[: len(data) - 100], "file is truncated (100 bytes missing)"),
        (lambda data: b"", "not a safetensors file (only 0 bytes)"),
    ],
    ids=["length", "not-json", "bad-dtype", "truncated", "empty"],
)
def test_damaged_weights_are_one_line_errors(cli, model, finished, damage, message):
    prompts, out, before = finished
    model[1].write_bytes(damage(model[1].read_bytes()))
    ran = cli("batch", prompts, "-c", model[0], "-o", out, "--steps", "1")
    fails_cleanly(ran, 2, message)
    assert snapshot(out) == before


def _ckpt(model, folder: Path, **save_options) -> Path:
    """The tiny model's tensors as a pickle checkpoint in the CompVis layout ({"state_dict": ...})."""
    path = folder / "tiny.ckpt"
    torch.save({"state_dict": load_file(model[1]), "global_step": 1}, path, **save_options)
    return path


def test_pickles_are_refused_unless_allowed_then_equal_safetensors(cli, model, tmp_path):
    args = ("generate", "a", "-c", model[0], "--seed", "3", "--steps", "2", "--json")
    reference = json.loads(cli(*args, "-o", tmp_path / "ref").out)
    for legacy in (False, True):  # torch's zip format (memory-mapped) and the pre-1.6 format
        ckpt = _ckpt(model, tmp_path, _use_new_zipfile_serialization=not legacy)
        refused = cli(*args, "-w", ckpt, "-o", tmp_path / "no")
        fails_cleanly(refused, 2, "pickle checkpoints can run code when loaded")
        assert "--allow-pickle" in refused.err and not (tmp_path / "no").exists()
        made = json.loads(cli(*args, "-w", ckpt, "--allow-pickle", "-o", tmp_path / f"yes{legacy}").out)
        with Image.open(made["image"]) as a, Image.open(reference["image"]) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert made["weights"] == str(ckpt.resolve())


class Payload:
    """A pickle that runs a shell command when loaded by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_holding_code_is_refused_even_when_allowed(cli, model, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": load_file(model[1]), "callback": Payload(marker)}, ckpt)
    ran = cli("generate", "a", "-c", model[0], "-w", ckpt, "--allow-pickle", "-o", tmp_path / "out")
    fails_cleanly(ran, 2, "refused by torch's weights-only loader")
    assert "system" in ran.err_lines[-1] and not marker.exists()
    junk = tmp_path / "junk.ckpt"
    for data in (b"PK\x03\x04 not really a zip", pickle.dumps([1, 2, 3], protocol=2), b""):
        junk.write_bytes(data)
        ran = cli("generate", "a", "-c", model[0], "-w", junk, "--allow-pickle", "-o", tmp_path / "out")
        fails_cleanly(ran, 2, f"{junk}: ")


# --- a killed process ----------------------------------------------------------------------------------


def _sdcli(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sdcli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_mid_batch_leaves_only_complete_pairs_and_a_rerun_completes(cli, model, tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    args = ("batch", prompts, "-c", model[0], "-o", out, "--steps", "4", "--batch-size", "1")
    child = _sdcli(*args)
    first = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert first and child.returncode == -signal.SIGKILL
    done = pairs(out, temps_allowed=True)  # nothing finished-looking is half-written
    assert 1 <= len(done) < 6
    # A temporary file as the killed process would leave it mid-write (its PID is dead now).
    stale = out / f".{done[0]}-x.png.{socket.gethostname()}.{child.pid}{TEMP_SUFFIX}"
    stale.write_bytes(b"\x89PNG half")
    again = cli(*args, "--json")
    assert again.code == 0 and not stale.exists()
    assert [json.loads(line)["status"] for line in again.out.splitlines()].count("skipped") == len(done)
    assert len(pairs(out)) == 6
