"""The real command line rendering with a tiny random-weight model: files, metadata, batches, resume,
re-rendering with --from, machine-readable stdout, interrupts and failures mid-run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdcli.outputs import infotext, shareable


def pairs(folder: Path) -> list[str]:
    """Stems of the complete PNG + JSON pairs; fails on anything else (temporary files, orphans)."""
    names = sorted(p.name for p in folder.iterdir())
    stems = sorted({n.rsplit(".", 1)[0] for n in names})
    assert names == sorted([f"{s}.json" for s in stems] + [f"{s}.png" for s in stems]), names
    return stems


def meta(folder: Path, stem: str) -> dict:
    return json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_generate_writes_one_png_and_one_json(cli, tiny_model, tmp_path):
    out = tmp_path / "out"
    ran = cli(
        "generate", "a red circle on a white background", "-c", tiny_model, "-o", out, "--seed", "42", "-n", "blur"
    )
    assert ran.code == 0, ran.err
    assert pairs(out) == ["00000-42-a-red-circle-on-a-white-background"]
    png = out / "00000-42-a-red-circle-on-a-white-background.png"
    assert ran.out == f"{png}\n"
    recorded = meta(out, png.stem)
    recipe = ("prompt", "negative", "seed", "steps", "guidance", "sampler", "width", "height")
    assert {k: recorded[k] for k in recipe} == {
        "prompt": "a red circle on a white background", "negative": "blur", "seed": 42, "steps": 3,
        "guidance": 5.0, "sampler": "euler", "width": 32, "height": 32,
    }  # fmt: skip
    weights = tiny_model.parent / "tiny.safetensors"
    assert recorded["config"] == "tiny" and recorded["config_path"] == str(tiny_model.resolve())
    assert recorded["weights"] == str(weights.resolve())
    import hashlib

    assert recorded["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (recorded["device"], recorded["dtype"], recorded["batch_size"]) == ("cpu", "fp32", 1)
    assert recorded["elapsed"] > 0 and recorded["created"] and recorded["sdcli_version"]
    with Image.open(png) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert json.loads(image.text["sdcli"]) == shareable(recorded)  # no local paths in a shared picture
        assert image.text["parameters"] == infotext(recorded)
        assert np.asarray(image).std() > 1  # a picture, not a flat fill
    assert "[1/1]" in ran.err and "done: 1 written, 0 skipped" in ran.err


def test_count_gives_consecutive_seeds_and_a_random_seed_is_recorded(cli, tiny_model, tmp_path):
    ran = cli("generate", "dots", "-c", tiny_model, "-o", tmp_path, "--seed", "10", "-N", "3", "--steps", "1")
    assert ran.code == 0, ran.err
    assert pairs(tmp_path) == ["00000-10-dots", "00001-11-dots", "00002-12-dots"]
    assert [meta(tmp_path, s)["seed"] for s in pairs(tmp_path)] == [10, 11, 12]
    ran = cli("generate", "dots", "-c", tiny_model, "-o", tmp_path, "--steps", "1")
    (new,) = set(pairs(tmp_path)) - {"00000-10-dots", "00001-11-dots", "00002-12-dots"}
    seed = meta(tmp_path, new)["seed"]
    assert 0 <= seed < 2**32 and new == f"00003-{seed}-dots"  # the folder's numbering goes on


def test_json_lines_on_stdout_and_quiet(cli, tiny_model, tmp_path):
    ran = cli("generate", "a", "-c", tiny_model, "-o", tmp_path, "-N", "2", "--json", "--steps", "1")
    lines = [json.loads(line) for line in ran.out.splitlines()]
    assert [(Path(x["image"]).name, x["status"], x["seed"]) for x in lines] == [
        (f"00000-{lines[0]['seed']}-a.png", "written", lines[0]["seed"]),
        (f"00001-{lines[0]['seed'] + 1}-a.png", "written", lines[0]["seed"] + 1),
    ]
    assert all(Path(x["image"]).is_file() and json.loads(Path(x["metadata"]).read_text()) == {
        k: v for k, v in x.items() if k not in ("image", "metadata", "status")} for x in lines)  # fmt: skip
    assert "done: 2 written" in ran.err
    quiet = cli("generate", "a", "-c", tiny_model, "-o", tmp_path, "-q", "--steps", "1")
    assert (quiet.code, quiet.out, quiet.err) == (0, "", "")
    both = cli("generate", "a", "-c", tiny_model, "-o", tmp_path, "-q", "--json", "--steps", "1")
    assert json.loads(both.out)["status"] == "written" and both.err == ""


def test_from_reproduces_the_pixels_exactly(cli, tiny_model, tmp_path):
    cli("generate", "a blue square", "-c", tiny_model, "-o", tmp_path, "--seed", "7", "--sampler", "dpmpp_2m", "-q")
    (stem,) = pairs(tmp_path)
    original = pixels(tmp_path / f"{stem}.png")
    for source, config in ((f"{stem}.png", ["-c", tiny_model]), (f"{stem}.json", [])):
        # the sidecar records the config file's path; the PNG, which travels, names no local path
        again = cli("generate", "--from", tmp_path / source, *config, "-o", tmp_path / "again", "--json")
        made = json.loads(again.out)
        assert np.array_equal(pixels(Path(made["image"])), original), source
        keep = (
            "prompt",
            "negative",
            "seed",
            "steps",
            "guidance",
            "sampler",
            "width",
            "height",
            "config",
            "weights_sha256",
            "dtype",
        )
        assert {k: made[k] for k in keep} == {k: meta(tmp_path, stem)[k] for k in keep}
    changed = json.loads(
        cli(
            "generate", "--from", tmp_path / f"{stem}.json", "-o", tmp_path / "b", "--json", "--steps", "5", "-W", "48"
        ).out
    )
    assert (changed["steps"], changed["width"], changed["seed"], changed["sampler"]) == (5, 48, 7, "dpmpp_2m")
    other = json.loads(
        cli("generate", "--from", tmp_path / f"{stem}.json", "a green square", "-o", tmp_path / "c", "--json").out
    )
    assert other["prompt"] == "a green square" and not np.array_equal(pixels(Path(other["image"])), original)


def test_from_warns_when_the_weights_differ(cli, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    cli("generate", "x", "-c", tiny_model, "-o", tmp_path, "-q", "--steps", "1")
    (stem,) = pairs(tmp_path)
    twin = tmp_path / "twin.safetensors"
    save_file(
        load_file(tiny_model.parent / "tiny.safetensors"), str(twin), metadata={"note": "same tensors, other bytes"}
    )
    ran = cli("generate", "--from", tmp_path / f"{stem}.json", "-w", twin, "-o", tmp_path / "b")
    assert ran.code == 0 and "warning: " in ran.err and "is not the weights file" in ran.err


def test_never_overwrites(cli, tiny_model, tmp_path):
    args = ("generate", "x", "-c", tiny_model, "-o", tmp_path, "--seed", "1", "--name", "fixed", "-q", "--steps", "1")
    cli(*args)
    before = (tmp_path / "fixed.png").read_bytes()
    assert cli(*args).code == 0
    assert pairs(tmp_path) == ["fixed", "fixed-1"] and (tmp_path / "fixed.png").read_bytes() == before
    cli(*args, "--overwrite", "--steps", "2")
    assert pairs(tmp_path) == ["fixed", "fixed-1"] and meta(tmp_path, "fixed")["steps"] == 2


def test_batch_in_three_formats_with_overrides(cli, tiny_model, tmp_path):
    square = {"prompt": "a blue square", "steps": 2, "sampler": "ddim", "seed": 5, "count": 2, "width": 48}
    square |= {"negative": "green", "guidance": 1, "name": "sq-{seed}"}
    files = {
        "p.txt": "# comment\na red circle\n\na blue square\n",
        "p.jsonl": f'{{"prompt": "a red circle"}}\n{json.dumps(square)}\n',
        "p.yaml": "- a red circle\n- prompt: a blue square\n  steps: 2\n  sampler: ddim\n  seed: 5\n  count: 2\n"
        "  width: 48\n  negative: green\n  guidance: 1\n  name: sq-{seed}\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / name.replace(".", "-")
        ran = cli("batch", tmp_path / name, "-c", tiny_model, "-o", out, "--steps", "1", "--guidance", "3", "--json")
        assert ran.code == 0, ran.err
        made = [json.loads(line) for line in ran.out.splitlines()]
        first = next(m for m in made if m["prompt"] == "a red circle")
        assert (first["steps"], first["guidance"], first["sampler"], first["width"]) == (1, 3.0, "euler", 32)
        if name == "p.txt":
            assert len(made) == 2
            continue
        squares = sorted((m for m in made if m["prompt"] == "a blue square"), key=lambda m: m["seed"])
        assert [(Path(m["image"]).name, m["seed"]) for m in squares] == [("sq-5.png", 5), ("sq-6.png", 6)]
        assert {(m["steps"], m["sampler"], m["width"], m["height"], m["negative"], m["guidance"]) for m in squares} == {
            (2, "ddim", 48, 32, "green", 1.0)
        }
        assert len(pairs(out)) == 3


def test_batch_from_stdin(cli, tiny_model, tmp_path):
    ran = cli("batch", "-", "-c", tiny_model, "-o", tmp_path, "--steps", "1", input="one\ntwo\n")
    assert ran.code == 0 and len(ran.out.splitlines()) == 2 and len(pairs(tmp_path)) == 2


def test_batches_share_the_unet_and_say_so(cli, tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\ne\n")
    for extra, sizes in (([], [1, 4, 4, 4, 4]), (["--batch-size", "2"], [1, 2, 2, 2, 2])):
        out = tmp_path / str(len(extra))
        ran = cli("batch", tmp_path / "p.txt", "-c", tiny_model, "-o", out, "--steps", "1", "--json", *extra)
        assert sorted(json.loads(line)["batch_size"] for line in ran.out.splitlines()) == sizes


def test_resume_renders_only_what_is_missing(cli, tiny_model, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    out = tmp_path / "out"
    args = ("batch", tmp_path / "p.txt", "-c", tiny_model, "-o", out, "--steps", "1", "--json")
    first = [json.loads(line) for line in cli(*args).out.splitlines()]
    assert [m["status"] for m in first] == ["written"] * 4
    stems = pairs(out)
    (out / f"{stems[1]}.png").unlink()
    (out / f"{stems[1]}.json").unlink()
    (out / f"{stems[2]}.json").unlink()  # as if killed between the PNG's and the JSON's publish
    kept = {s: (out / f"{s}.png").stat().st_mtime_ns for s in (stems[0], stems[2], stems[3])}
    second = {Path(m["image"]).stem: m["status"] for m in map(json.loads, cli(*args).out.splitlines())}
    # the lone PNG is whole and carries its metadata: its sidecar is written back from it, not re-rendered
    assert second == {stems[0]: "skipped", stems[1]: "written", stems[2]: "skipped", stems[3]: "skipped"}
    assert pairs(out) == stems and all((out / f"{s}.png").stat().st_mtime_ns == t for s, t in kept.items())

    import sdcli.pipeline

    def no_load(*a, **k):
        raise AssertionError("a finished batch must not load the model")

    monkeypatch.setattr(sdcli.pipeline.Pipeline, "load", no_load)
    third = cli(*args)
    assert third.code == 0 and "done: 0 written, 4 skipped" in third.err
    monkeypatch.undo()
    forced = [json.loads(line)["status"] for line in cli(*args, "--overwrite").out.splitlines()]
    assert forced == ["written"] * 4 and pairs(out) == stems


def test_long_prompts_warn_on_stderr_only_when_cut(cli, tiny_model, tmp_path):
    """The plain syntax cuts at 75 tokens and says so, on stderr; A1111's chunks keep every token, silently."""
    long = " ".join(["circle"] * 100)
    ran = cli("generate", long, "-c", tiny_model, "-o", tmp_path, "--steps", "1", "--json", "--prompt-syntax", "plain")
    assert ran.code == 0 and "sdcli: warning: " in ran.err and "truncated" in ran.err
    assert json.loads(ran.out)["status"] == "written"
    ran = cli("generate", long, "-c", tiny_model, "-o", tmp_path, "--steps", "1", "--json")
    assert ran.code == 0 and "truncated" not in ran.err


def test_bad_checkpoints_are_bad_input(cli, tiny_model, tmp_path):
    weights = tiny_model.parent / "tiny.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    wide = tmp_path / "wide.yaml"
    wide.write_text(
        tiny_model.read_text()
        .replace("model_channels: 32", "model_channels: 64")
        .replace("weights: tiny.safetensors", f"weights: {weights}")
    )
    for args, message in (
        (["-w", cut, "-c", tiny_model], "truncated"),
        (["-c", wide], "has shape"),
        (["-w", tiny_model, "-c", tiny_model], "not a safetensors file"),
        (["-c", tiny_model, "--device", "cuda:7"], "not available on this machine; choose another with --device"),
    ):
        ran = cli("generate", "x", *args, "-o", tmp_path / "out")
        assert (ran.code, ran.out) == (2, ""), ran
        assert ran.err_lines[-1].startswith("sdcli: error: ") and message in ran.err_lines[-1], ran.err
        assert not any(line.startswith("sdcli: error") for line in ran.err_lines[:-1])
        assert pairs(tmp_path / "out") == []


def test_disk_full_mid_batch_keeps_the_finished_images(cli, tiny_model, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    out, real_fsync = tmp_path / "out", os.fsync

    def fsync(fd):
        if len(list(out.glob("*.json"))) == 2:  # the third image finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ran = cli("batch", tmp_path / "p.txt", "-c", tiny_model, "-o", out, "--steps", "1")
    assert ran.code == 1 and ran.err_lines[-1].startswith("sdcli: error: cannot write ")
    assert "No space left on device" in ran.err_lines[-1] and "2 written, 0 skipped, 0 failed, 1 remaining" in ran.err
    assert len(pairs(out)) == 2 and len(ran.out.splitlines()) == 2
    monkeypatch.undo()
    assert cli("batch", tmp_path / "p.txt", "-c", tiny_model, "-o", out, "--steps", "1").code == 0
    assert len(pairs(out)) == 3


def test_sigterm_mid_batch_leaves_only_complete_pairs(cli, tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    out = tmp_path / "out"
    args = ["batch", str(prompts), "-c", str(tiny_model), "-o", str(out), "--steps", "20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sdcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    first = child.stdout.readline()  # the first image is on disk
    child.send_signal(signal.SIGTERM)
    rest, err = child.communicate(timeout=120)
    assert first and child.returncode == 143, err
    assert "sdcli: terminated: " in err and "Traceback" not in err
    done = pairs(out)
    assert 1 <= len(done) < 6 and len([first, *rest.splitlines()]) == len(done)
    again = cli(*args, "--json")
    assert [json.loads(line)["status"] for line in again.out.splitlines()].count("skipped") == len(done)
    assert len(pairs(out)) == 6


def test_ctrl_c_mid_batch_exits_130_with_a_summary(cli, tiny_model, tmp_path, monkeypatch):
    from sdcli.progress import Reporter

    reported = Reporter.image

    def then_ctrl_c(self, outcome):
        reported(self, outcome)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Reporter, "image", then_ctrl_c)
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    ran = cli("batch", tmp_path / "p.txt", "-c", tiny_model, "-o", tmp_path / "out", "--steps", "1")
    assert ran.code == 130 and ran.err_lines[-1] == "sdcli: interrupted: 1 written, 0 skipped, 0 failed, 2 remaining"
    assert len(pairs(tmp_path / "out")) == 1


def test_compile_flag_reaches_the_pipeline_and_the_sidecar(cli, tiny_model, tmp_path, monkeypatch):
    """--compile is passed to Pipeline.load (whose compiled U-Net is checked against eager in
    test_perf_pipeline) and recorded, so --from compiles again; the load itself runs eager here, as
    compiling takes minutes."""
    import sdcli.pipeline

    asked, load = [], sdcli.pipeline.Pipeline.load.__func__

    def recording_load(cls, *args, compile=False, **kwargs):
        asked.append(compile)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(sdcli.pipeline.Pipeline, "load", classmethod(recording_load))
    out = tmp_path / "out"
    for flags in ([], ["--compile"]):
        ran = cli("generate", "a red circle", "-c", tiny_model, "-o", out, "--steps", "1", "--seed", "7", *flags)
        assert ran.code == 0, ran.err
    eager, compiled = pairs(out)
    assert "compile" not in meta(out, eager) and meta(out, compiled)["compile"] is True
    ran = cli("generate", "--from", out / f"{compiled}.json", "-o", tmp_path / "again")
    assert ran.code == 0, ran.err
    assert asked == [False, True, True]
