"""Spreading a batch over processes: --shard i/n and torchrun ranks each render a fixed share, the union of
the shares equals a single-process run file for file, and each shard resumes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.distributed import WHOLE, Shard, current_shard, parse_shard, shard_device, share
from sdcli.errors import RequestError
from sdcli.jobs import Item, batches, derived_seed, plan

PER_RUN = {"elapsed", "created", "device"}  # metadata that may differ between two runs of one recipe
# Seven prompts, one with its own step count: U-Net batches of 2 are [0 1] [2 4] [5 6] (2 steps) and [3] (1 step),
# so three shards take [0 1] [3], then [2 4], then [5 6].
PROMPTS = '"a red circle"\n"b"\n"c"\n{"prompt": "d", "steps": 1}\n"e"\n"f"\n"g"\n'


@pytest.mark.parametrize("text, shard", [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 0/16 ", Shard(0, 16))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text", ["3/3", "1/0", "-1/2", "1", "a/b", "1/2/3", ""])
def test_bad_shards_are_refused(text):
    with pytest.raises(RequestError, match=r"--shard '.*': expected i/n with 0 <= i < n"):
        parse_shard(text)


def test_torchrun_environment_and_shard_option_combine():
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert current_shard(None, {}) == WHOLE
    assert current_shard("1/3", {}) == Shard(1, 3)
    assert current_shard(None, torchrun) == Shard(1, 2, local_rank=1)
    # Shard 1 of 3 split over two ranks: rank 1 takes share 1 + 3*1 of 6.
    assert current_shard("1/3", torchrun) == Shard(4, 6, local_rank=1)
    assert current_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) == Shard(0, 1)
    for bad, message in (
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 does not fit WORLD_SIZE=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a number"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "does not fit WORLD_SIZE=0"),
    ):
        with pytest.raises(RequestError, match=message):
            current_shard(None, bad)


def test_shares_deal_whole_unet_batches(tiny_config):
    items = [Item(f"p:{i}", i, {"prompt": f"p{i}", **({"steps": 1} if i % 4 == 3 else {})}) for i in range(11)]
    planned = plan(items, {"count": 2}, tiny_config, seed_for=derived_seed)
    whole = [[p.index for p in group] for group in batches(planned, 3)]
    for count in (1, 2, 3, 5, 40):
        shares = [share(planned, Shard(i, count), 3) for i in range(count)]
        indices = [p.index for part in shares for p in part]
        assert sorted(indices) == list(range(len(planned)))  # each image in exactly one share
        assert all([p.index for p in part] == sorted(p.index for p in part) for part in shares)  # job order
        dealt = [[p.index for p in group] for part in shares for group in batches(part, 3)]
        assert sorted(dealt) == sorted(whole)  # every share renders exactly single-process batches
        assert shares == [share(planned, Shard(i, count), 3) for i in range(count)]  # deterministic


def test_each_rank_takes_its_local_gpu(monkeypatch):
    assert shard_device("auto", Shard(1, 2, local_rank=1)) == "auto"  # no GPU here: the CPU (or MPS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert shard_device("auto", Shard(1, 4, local_rank=1)) == "cuda:1"
    assert shard_device("cuda", Shard(3, 4, local_rank=3)) == "cuda:1"  # more ranks than GPUs: they share
    assert shard_device("cuda:0", Shard(1, 4, local_rank=1)) == "cuda:0"  # an explicit choice is kept
    assert shard_device("cpu", Shard(1, 4, local_rank=1)) == "cpu"
    assert shard_device("auto", Shard(1, 4)) == "auto"  # --shard alone: the scheduler picks the GPU


def same_files(one: Path, other: Path) -> list[str]:
    """The two folders hold the same file names, pixel-equal PNGs and metadata equal but for run facts
    (PNG bytes embed the metadata, elapsed time included, so they are compared decoded)."""
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    for name in names:
        if name.endswith(".png"):
            with Image.open(one / name) as a, Image.open(other / name) as b:
                assert np.array_equal(np.asarray(a), np.asarray(b)), name
                assert set(a.text) == set(b.text) == {"sdcli", "parameters"}
                assert _run_free(json.loads(a.text["sdcli"])) == _run_free(json.loads(b.text["sdcli"])), name
        else:
            assert _run_free(json.loads((one / name).read_text())) == _run_free(json.loads((other / name).read_text()))
    return names


def _run_free(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in PER_RUN}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, Path, tuple]:
    """The job run by one process over the bundled demo model: (prompt file, its output folder, the
    common arguments)."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    folder = tmp_path_factory.mktemp("single")
    prompts = folder / "p.jsonl"
    prompts.write_text(PROMPTS)
    args = ("-c", "demo", "--steps", "2", "--batch-size", "2")
    ran = CliRunner().invoke(app, ["batch", str(prompts), "-o", str(folder / "out"), *args, "-q"])
    assert ran.exit_code == 0, ran.stderr
    return prompts, folder / "out", args


def test_shards_together_equal_one_process_and_resume_alone(cli, single_run, tmp_path):
    prompts, reference, args = single_run
    out = tmp_path / "out"
    for i in range(3):
        ran = cli("batch", prompts, "-o", out, *args, "--shard", f"{i}/3", "--json")
        assert ran.code == 0 and f"sdcli: shard {i}/3: done: " in ran.err, ran.err
    assert len(same_files(out, reference)) == 14
    # Shard 1 of 3 (images 2 and 4) loses one: its rerun redoes that one and touches nothing else.
    mine = sorted(p for p in out.glob("*.png") if p.name.startswith(("00002", "00004")))
    mine[0].unlink()
    others = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(mine[0].stem)}
    ran = cli("batch", prompts, "-o", out, *args, "--shard", "1/3", "--json")
    statuses = sorted((Path(x["image"]).name, x["status"]) for x in map(json.loads, ran.out.splitlines()))
    assert statuses == [(p.name, "written" if p == mine[0] else "skipped") for p in mine]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in others} == others
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_torchrun_two_ranks_on_the_cpu_equal_one_process(single_run, tmp_path):
    prompts, reference, args = single_run
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    launch = [*command, "--standalone", "--nproc-per-node", "2", "-m", "sdcli"]
    done = subprocess.run(
        [*launch, "batch", str(prompts), "-o", str(out), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len(same_files(out, reference)) == 14
    assert {json.loads(p.read_text())["batch_size"] for p in out.glob("*.json")} == {1, 2}
    assert "sdcli: shard 0/2: done: 4 written" in done.stderr and "sdcli: shard 1/2: done: 3 written" in done.stderr
