"""The command line without a model: help, listings, and every bad input caught before a model loads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdcli import __version__
from sdcli.config import SAMPLERS, bundled_config_names
from sdcli.jobs import Planned, Target
from sdcli.progress import Reporter
from sdcli.request import Request
from sdcli.runner import Outcome, Tally


def target(stem: str) -> Target:
    request = Request("a", "", 1, 1, 1.0, SAMPLERS[0], 8, 8)
    return Target(Planned("", 0, request, stem), Path(f"{stem}.png"), Path(f"{stem}.json"), done=False)

HELP_WITHOUT_TORCH = """
import resource, sys
from sdcli.cli import app
for args in (["--help"], ["generate", "--help"], ["batch", "--help"]):
    try:
        app(args, prog_name="sdcli")
    except SystemExit as exc:
        assert exc.code == 0, exc.code
assert "torch" not in sys.modules, "help imported torch"
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_utime + usage.ru_stime, file=sys.stderr)
"""


def test_help_is_instant_and_never_imports_torch():
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage: sdcli generate [OPTIONS] [PROMPT]" in done.stdout and "--from FILE" in done.stdout
    cpu_seconds = float(done.stderr.strip().splitlines()[-1])
    assert cpu_seconds < 1.0  # CPU time, not wall time, so a busy machine does not fail it


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "sdcli", "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"sdcli {__version__}\n", "")


def test_no_command_prints_help(cli):
    ran = cli()
    assert ran.code == 0 and "generate" in ran.out and "batch" in ran.out


def test_samplers(cli):
    ran = cli("samplers")
    assert ran.code == 0 and [line.split()[0] for line in ran.out.splitlines()] == list(SAMPLERS)
    rows = [json.loads(line) for line in cli("samplers", "--json").out.splitlines()]
    assert [row["name"] for row in rows] == list(SAMPLERS) and all(row["description"] for row in rows)


def test_models_lists_bundled_and_user_configs(cli, sdcli_home, tiny_model):
    user = sdcli_home / "configs"
    user.mkdir()
    (user / "mine.yaml").write_text(
        tiny_model.read_text().replace("weights: tiny.safetensors", f"weights: {tiny_model.parent}/tiny.safetensors")
    )
    (user / "broken.yaml").write_text("name: broken\nunet: {}\n")
    rows = {row["name"]: row for row in map(json.loads, cli("models", "--json").out.splitlines())}
    assert set(rows) == set(bundled_config_names()) | {"mine", "broken"}
    assert rows["mine"]["source"] == "user" and rows["mine"]["present"] is True
    assert rows["sd15"]["source"] == "bundled" and rows["sd15"]["present"] is False
    assert "missing key" in rows["broken"]["error"]
    table = {line.split()[0]: line.split()[1] for line in cli("models").out.splitlines()}
    assert (table["mine"], table["sd15"], table["broken"]) == ("ready", "missing", "invalid")


@pytest.fixture
def prompts(tmp_path):
    """Writes a prompt file and returns its path."""

    def write(name: str, text: str):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def bad_inputs(tmp, tiny):
    """(arguments, the error line it must give); every one fails before a model would load."""
    return [
        (["generate"], "give a PROMPT, or --from IMAGE.png"),
        (["generate", "  "], "the prompt is empty"),
        (["generate", "x", "--stpes", "3"], "No such option: --stpes"),
        (["generate", "x", "--steps", "many"], "Invalid value for '--steps'"),
        (["generate", "x", "--steps", "0"], "Invalid value for '--steps'"),
        (["generate", "x", "--dtype", "fp8"], "Invalid value for '--dtype'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["generate", "x", "-c", tiny, "--width", "33"], "--width must be a positive multiple of 2, got 33"),
        (["generate", "x", "-c", tiny, "--steps", "5000"], "--steps must be at most 1000"),
        (
            ["generate", "x", "-c", tiny, "--sampler", "eulr"],
            "unknown sampler 'eulr' (did you mean 'euler'?); valid samplers: ddim",
        ),
        (["generate", "x", "-c", tiny, "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["generate", "x", "-c", "nope"], "unknown config 'nope'"),
        (["generate", "x", "-c", f"{tmp}/none.yaml"], "config file not found"),
        (["generate", "x", "-c", f"{tmp}/bad.yaml"], "bad.yaml:2: unknown key 'uent' (did you mean 'unet'?)"),
        (["generate", "x", "-c", tiny, "--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        (["generate", "x", "-c", tiny, "--name", "{when}"], "--name '{when}': unknown field {when}"),
        (["generate", "x", "-c", tiny, "--name", "{slug}", "-N", "2"], "file name 'x' is also given to another image"),
        (["generate", "x", "-c", tiny, "-w", f"{tmp}/none.safetensors"], "weights file not found"),
        (["generate", "x", "-c", "sd15"], "weights file not found"),
        (["generate", "x", "-c", tiny, "-o", f"{tmp}/file/sub"], "cannot write there"),
        (["generate", "--from", f"{tmp}/none.png"], "--from"),
        (["generate", "--from", f"{tmp}/p.txt"], "A1111 infotext that names no model (no Model hash)"),
        (["batch", f"{tmp}/none.txt"], "prompt file not found"),
        (["batch", f"{tmp}/empty.txt", "-c", tiny], "empty.txt: no prompts in the file"),
        (["batch", f"{tmp}/p.jsonl", "-c", tiny], "p.jsonl:2: unknown key 'stpes' (did you mean 'steps'?)"),
        (["batch", f"{tmp}/p.yaml", "-c", tiny], "p.yaml:2: --height must be a positive multiple of 2, got 31"),
    ]


def test_each_bad_input_gives_one_line_and_exit_2(cli, tmp_path, tiny_model, prompts, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so no real weights/ folder is found
    prompts("bad.yaml", "name: bad\nuent: {}\n")
    prompts("file", "not a folder")
    prompts("empty.txt", "# nothing here\n")
    prompts("p.txt", "a prompt\n")
    prompts("p.jsonl", '{"prompt": "fine"}\n{"prompt": "typo", "stpes": 3}\n')
    prompts("p.yaml", "- fine\n- prompt: short\n  height: 31\n")
    out = tmp_path / "out"
    for args, message in bad_inputs(tmp_path, tiny_model):
        ran = cli(*args, *([] if "-o" in args or args[0] not in ("generate", "batch") else ["-o", out]))
        assert (ran.code, ran.out) == (2, ""), (args, ran)
        assert len(ran.err_lines) == 1 and ran.err_lines[0].startswith("sdcli: error: "), (args, ran.err)
        assert message in ran.err_lines[0], (args, ran.err)
        assert not out.exists() or list(out.iterdir()) == [], args


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_on_a_terminal_and_plain_lines_elsewhere():
    for stream, live in ((Terminal(), True), (io.StringIO(), False)):
        with Reporter(quiet=False, stream=stream, results=io.StringIO()) as reporter:
            reporter.begin(2)
            reporter.start_batch(2)
            reporter.step(1, 3)
            reporter.warning("careful")
            reporter.step(3, 3)
            reporter.batch_done()
            for name in ("a", "b"):
                reporter.image(Outcome("written", target(name), {"elapsed": 0.5}))
            reporter.summary(Tally(planned=2, written=2))
        text = stream.getvalue()
        assert "sdcli: warning: careful" in text and "done: 2 written, 0 skipped" in text
        assert "[2/2] b.png (0.5 s)" in text
        assert ("\x1b[" in text) is live  # only a terminal gets the live display's escape codes


def test_quiet_reporter_says_nothing_but_interruptions():
    stream = io.StringIO()
    with Reporter(quiet=True, stream=stream) as reporter:
        reporter.begin(3)
        reporter.warning("hidden")
        reporter.summary(Tally(planned=3))
        assert stream.getvalue() == ""
        reporter.summary(Tally(planned=2), interrupted="interrupted")
    assert stream.getvalue() == "sdcli: interrupted: 0 written, 0 skipped, 0 failed, 2 remaining\n"
