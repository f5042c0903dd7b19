"""The thread-count rule (sdcli.threads): its properties, the precedence of --threads and OMP_NUM_THREADS,
and that importing it leaves torch unimported (the CLI's --help must not pay for torch)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from sdcli import threads
from sdcli.config import load_config

DEMO_WORK = threads.unet_work(32, 8, 8)  # the bundled demo: 64x64 images, 8x8 latents
SD_WORK = threads.unet_work(320, 64, 64)  # SD 1.x/2.x base at 512x512


def test_config_work_matches_the_size_measure():
    assert threads.config_work(load_config("demo"), 64, 64) == DEMO_WORK
    assert threads.config_work(load_config("sd15"), 512, 512) == SD_WORK
    assert threads.config_work(load_config("sd15"), 512, 512, images=2) == 2 * SD_WORK
    fake = SimpleNamespace(unet=SimpleNamespace(model_channels=320), vae=SimpleNamespace(downsample=8))
    assert threads.config_work(fake, 513, 500) == 320 * 65 * 63  # partial cells round up


def test_tiny_work_runs_on_one_thread():
    for cores in (1, 2, 16, 128):
        assert threads.default_threads(DEMO_WORK, cores) == 1
    assert threads.default_threads(0, 8) == 1


def test_sd_size_work_uses_every_free_core():
    assert threads.default_threads(SD_WORK, 2) == 2
    assert threads.default_threads(SD_WORK, 1) == 1
    assert threads.default_threads(SD_WORK, 16) == 16


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
def test_never_more_than_the_cores_and_at_least_one(cores):
    previous = 1
    for work in [0, 1, 2048, 4096, 8191, 8192, 16384, 20480, 65536, 1 << 20, 1 << 30]:
        n = threads.default_threads(work, cores)
        assert 1 <= n <= cores
        assert n >= previous  # more work never means fewer threads
        previous = n


def test_default_threads_asks_free_cores_when_not_told(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    assert threads.default_threads(SD_WORK) == 1
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    assert threads.default_threads(SD_WORK) == 2


def test_free_cores_is_at_least_one_and_at_most_usable():
    assert 1 <= threads.free_cores() <= threads.usable_cores()


def test_free_cores_subtracts_others_load(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    for others, free in [(0, 2), (1, 1), (2, 1), (7, 1)]:
        monkeypatch.setattr(threads, "_others_running", lambda others=others: others)
        assert threads.free_cores() == free
    # no /proc/loadavg: the 1-minute average, less this process
    monkeypatch.setattr(threads, "_others_running", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.0, 0.0, 0.0))
    assert threads.free_cores() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.9, 0.0, 0.0))
    assert threads.free_cores() == 2


def test_others_running_is_never_negative():
    others = threads._others_running()
    assert others is None or others >= 0


def test_explicit_threads_win_then_omp_num_threads_then_the_rule():
    assert threads.resolve_threads(3, DEMO_WORK, environ={"OMP_NUM_THREADS": "2"}, cores=2) == (3, "--threads")
    assert threads.resolve_threads(None, DEMO_WORK, environ={"OMP_NUM_THREADS": "2"}, cores=2) == (2, "OMP_NUM_THREADS")
    assert threads.resolve_threads(None, SD_WORK, environ={}, cores=2) == (2, "auto")
    assert threads.resolve_threads(None, DEMO_WORK, environ={}, cores=2) == (1, "auto")
    with pytest.raises(ValueError):
        threads.resolve_threads(0, DEMO_WORK, environ={}, cores=2)


@pytest.mark.parametrize(
    "value, expected", [("4", 4), (" 2 ", 2), ("4,2", 4), ("0", None), ("-1", None), ("", None), ("all", None)]
)
def test_omp_num_threads_parsing(value, expected):
    assert threads.omp_threads({"OMP_NUM_THREADS": value}) == expected
    assert threads.resolve_threads(None, SD_WORK, environ={"OMP_NUM_THREADS": value}, cores=2)[0] == (expected or 2)


def test_importing_does_not_import_torch():
    code = "import sys, sdcli.threads; assert 'torch' not in sys.modules, 'sdcli.threads imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wait_policy_is_passive_only_for_several_threads_and_only_unset(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in the CLI before torch is imported
    env: dict[str, str] = {}
    assert not threads.set_wait_policy(1, env) and env == {}
    assert threads.set_wait_policy(2, env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not threads.set_wait_policy(2, env) and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_wait_policy_is_left_alone_once_torch_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace())
    env: dict[str, str] = {}
    assert not threads.set_wait_policy(2, env) and env == {}
