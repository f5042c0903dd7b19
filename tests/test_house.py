"""Faults found by trying to break sdcli as a new user and as an attacker would; each test reproduces one
with real processes, files and signals, and failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdcli.runner import Job, Outcome, Run, Tally, run_job

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sdcli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """The real command line in a fresh process; args may be bytes (argv that is not UTF-8)."""
    argv = [sys.executable, "-m", "sdcli", *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, env=env or ENV, timeout=300, **kwargs)


def one_error_line(ran, code: int = 2) -> str:
    err = ran.stderr.decode(errors="replace") if isinstance(ran.stderr, bytes) else ran.stderr
    lines = err.strip().splitlines()
    assert ran.returncode == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("sdcli: error: "), err
    return lines[0]


# --- text that is not text ---------------------------------------------------------------------------


def test_a_prompt_of_undecodable_bytes_is_refused_before_rendering(tiny_model, tmp_path):
    ran = sdcli("generate", b"a \xff circle", "-c", tiny_model, "-o", tmp_path / "out")
    assert "prompt is not valid text" in one_error_line(ran)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_lone_surrogate_in_from_json_is_refused(tiny_model, tmp_path, cli):
    recorded = {"prompt": "a", "negative": "\ud800", "seed": 1, "steps": 1, "guidance": 5.0, "sampler": "euler",
                "width": 32, "height": 32, "config": str(tiny_model)}  # fmt: skip
    path = tmp_path / "from.json"
    path.write_text(json.dumps(recorded), encoding="utf-8")  # json escapes it as \ud800
    ran = cli("generate", "--from", path, "-o", tmp_path / "out")
    assert ran.code == 2 and ran.err_lines == ["sdcli: error: the negative is not valid text (it holds bytes that "
                                               "are not UTF-8)"]  # fmt: skip


def test_a_name_of_undecodable_bytes_prints_its_path_even_on_a_strict_stdout(tiny_model, tmp_path):
    out = tmp_path / "out"
    env = {**ENV, "PYTHONIOENCODING": "utf-8:strict"}
    ran = sdcli("generate", "x", "-c", tiny_model, "-o", out, "--name", b"\xff-{seed}", "--seed", "3", env=env)
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    assert ran.stdout == os.fsencode(out) + b"/\xff-3.png\n"  # the file's real bytes, usable by a script
    assert (Path(os.fsdecode(os.fsencode(out) + b"/\xff-3.json"))).is_file()
    listed = sdcli("generate", "x", "-c", tiny_model, "-o", out, "--name", b"\xfe-{seed}", "--seed", "3", "--json",
                   env=env)  # fmt: skip
    line = json.loads(listed.stdout)  # still one valid JSON object
    assert os.fsencode(line["image"]).endswith(b"\xfe-3.png")


# --- name templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, message",
    [
        ("{seed[0]}", "unknown field {seed[0]}"),
        ("{seed.real}", "unknown field {seed.real}"),
        ("{index:>9999999999}", "is not allowed"),
        ("{index:{seed}}", "is not allowed"),
        ("{}", "unknown field {}"),
        ("{slug:x}", "not a valid template"),
        ("é" * 70 + "{seed}", "1-120 bytes"),
    ],
)
def test_name_templates_that_would_crash_are_one_line(cli, tiny_model, tmp_path, template, message):
    ran = cli("generate", "x", "-c", tiny_model, "-o", tmp_path, "--name", template)
    assert ran.code == 2 and len(ran.err_lines) == 1 and message in ran.err, ran.err
    assert "Traceback" not in ran.err


# --- sizes, devices, listings ------------------------------------------------------------------------


def test_sizes_beyond_what_the_model_renders_are_refused_at_once(cli, tiny_model, tmp_path):
    started = time.monotonic()
    ran = cli("generate", "x", "-c", tiny_model, "-o", tmp_path, "--width", "100000")
    assert ran.code == 2 and "--width 100000 is more than tiny renders: at most 128" in ran.err
    assert time.monotonic() - started < 5


def test_a_device_this_machine_lacks_fails_before_hashing_or_loading(cli, tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ran = cli("generate", "x", "-c", tiny_model, "-o", tmp_path / "out", "--device", "cuda")
    assert ran.code == 2 and ran.err_lines == [
        "sdcli: error: device 'cuda' is not available on this machine; choose another with --device"
    ]
    assert not (tmp_path / "out").exists()


def test_listing_help_says_what_json_lists(cli):
    assert "One JSON object per config" in cli("models", "--help").out
    assert "One JSON object per sampler" in cli("samplers", "--help").out


def test_models_reports_a_corrupt_weights_file_as_invalid(cli, sdcli_home, tiny_model):
    configs = sdcli_home / "configs"
    configs.mkdir()
    broken = tiny_model.parent / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    text = tiny_model.read_text().replace("weights: tiny.safetensors", f"weights: {broken}")
    (configs / "broken.yaml").write_text(text)
    rows = {row["name"]: row for row in map(json.loads, cli("models", "--json").out.splitlines())}
    assert rows["broken"]["state"] == "invalid" and "corrupt safetensors header" in rows["broken"]["error"]
    line = next(line for line in cli("models").out.splitlines() if line.startswith("broken "))
    assert line.split()[1] == "invalid"


# --- signals at any moment ---------------------------------------------------------------------------


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` yet (Linux: the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_in_the_first_moments_exits_cleanly(tiny_model, tmp_path, signum, code):
    """From sdcli's first line on (it installs the SIGTERM handler; earlier, the interpreter is still starting
    and no code of ours runs): during imports, parsing, hashing, loading or rendering, never a traceback,
    always the documented code."""
    for delay in (0.0, 0.05, 0.15, 0.3, 0.6):
        child = subprocess.Popen(
            [sys.executable, "-m", "sdcli", "generate", "x", "-c", str(tiny_model), "-o", str(tmp_path / "out")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        )  # fmt: skip
        while not _catches(child.pid, signal.SIGTERM) and child.poll() is None:
            time.sleep(0.001)
        time.sleep(delay)
        child.send_signal(signum)
        out, err = child.communicate(timeout=120)
        if child.returncode == 0:
            continue  # it finished first
        assert child.returncode == code, (delay, err.decode())
        assert b"Traceback" not in err, (delay, err.decode())


def test_ctrl_c_inside_exec_still_exits_130(tmp_path):
    """CPython remembers a bare KeyboardInterrupt that escapes `exec` of source text (dataclasses are made so
    during imports) and, after sdcli caught it and chose 130, kills `python -m` with SIGINT at exit, silently
    (seen as -2 in CI, one run in fifteen). sdcli's own SIGINT exception must not trip that."""
    (tmp_path / "exec_interrupted.py").write_text(
        "import sdcli.cli, sdcli.entry\n"
        "def app(prog_name):\n"
        "    exec('import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor i in range(10**7): pass')\n"
        "sdcli.cli.app = app\n"
        "sdcli.entry.main()\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-m", "exec_interrupted"], capture_output=True, env=env, timeout=120)
    assert done.returncode == 130, done.stderr.decode()
    assert b"Traceback" not in done.stderr


# --- the runner without the command line -------------------------------------------------------------


class Recorder:
    """An Events listener that keeps what it is told."""

    def __init__(self):
        self.outcomes: list[Outcome] = []
        self.said: list[str] = []
        self.summaries: list[tuple[Tally, str | None]] = []

    def info(self, message):
        self.said.append(message)

    warning = info

    def begin(self, total):
        self.total = total

    def start_batch(self, size):
        pass

    def step(self, done, total):
        pass

    def batch_done(self):
        return 0.5

    def image(self, outcome):
        self.outcomes.append(outcome)

    def summary(self, tally, interrupted=None):
        self.summaries.append((tally, interrupted))


def test_a_job_runs_without_the_command_line(tiny_model, tmp_path):
    from sdcli.config import load_config
    from sdcli.jobs import Item, derived_seed, plan

    model = load_config(str(tiny_model))
    planned = plan([Item("", 0, {"prompt": "a"}), Item("", 1, {"prompt": "b"})], {"count": 2}, model,
                   seed_for=derived_seed)  # fmt: skip
    events = Recorder()
    tally = run_job(Job(model, planned, Run(out=tmp_path, threads=1)), events)
    assert (tally.written, tally.skipped, tally.failed) == (4, 0, 0) and events.total == 4
    assert [o.status for o in events.outcomes] == ["written"] * 4
    assert all(o.target.png.is_file() and o.target.sidecar.is_file() for o in events.outcomes)
    assert events.outcomes[0].meta["threads"] == 1
    again = Recorder()
    run_job(Job(model, planned, Run(out=tmp_path)), again)
    assert [o.status for o in again.outcomes] == ["skipped"] * 4 and again.summaries[-1][0].skipped == 4


# --- two processes, one folder -----------------------------------------------------------------------


def _generate_together(tiny_model, out, *extra) -> list[subprocess.CompletedProcess]:
    """Two `sdcli generate` started at once into one folder: both plan before either writes."""
    argv = [sys.executable, "-m", "sdcli", "generate", "x", "-c", str(tiny_model), "-o", str(out), *extra]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV) for _ in range(2)]
    return [subprocess.CompletedProcess(argv, c.wait(timeout=300), *c.communicate()) for c in children]


@pytest.mark.parametrize("name", ["img-{index}", None])
def test_two_generates_into_one_folder_keep_both_images_and_indexes(tiny_model, tmp_path, name):
    out = tmp_path / "out"
    runs = _generate_together(tiny_model, out, *(["--name", name] if name else []), "--seed", "5")
    assert [r.returncode for r in runs] == [0, 0], [r.stderr.decode() for r in runs]
    printed = sorted(r.stdout.decode().strip() for r in runs)
    assert printed[0] != printed[1] and all(Path(p).is_file() for p in printed)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 and sorted(p.name for p in out.glob("*.json")) == [n[:-4] + ".json" for n in pngs]
    assert pngs == (["img-0.png", "img-1.png"] if name else pngs) and [n[:6] for n in pngs] != ["00000-"] * 2
    if name is None:
        assert sorted(n[:5] for n in pngs) == ["00000", "00001"]


def test_a_symlink_at_the_name_is_never_written_through(cli, tiny_model, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    for suffix in (".png", ".json"):
        (out / f"img{suffix}").symlink_to(victim)
    ran = cli("generate", "x", "-c", tiny_model, "-o", out, "--name", "img")
    assert ran.code == 0 and ran.out.strip() == str(out / "img-1.png")
    assert victim.read_text() == "precious" and (out / "img.png").is_symlink()
