"""Safe writes, against real files and real processes: temporaries that a planted symlink cannot redirect,
publishes that never replace a file, racing writers that both keep their image, and processes killed
(SIGKILL, injected by strace at a chosen system call) whose leftovers the next run repairs."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli import outputs
from sdcli.outputs import (
    TEMP_SUFFIX,
    complete_pair,
    load_existing,
    prepare_folder,
    repair_folder,
    shareable,
    temp_path,
    write_pair,
)

ROOT = Path(__file__).resolve().parents[1]
# Built by hand, not by build_metadata: write_pair writes whatever metadata it is given.
META = {
    "prompt": "a red circle, on white!", "negative": "blurry", "seed": 42, "steps": 20, "guidance": 7.5,
    "sampler": "euler", "width": 64, "height": 48, "config": "tiny", "weights": "/models/v1-5.safetensors",
    "weights_sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa", "device": "cpu",
    "dtype": "fp32", "threads": 1, "batch_size": 1, "sdcli_version": "0.1.0", "elapsed": 1.235,
    "created": "2024-05-01T12:00:00+02:00",
}  # fmt: skip
# The publish-related system calls a kill is injected at (the arch's link may be link or linkat, and so on).
PUBLISH_CALLS = ("link", "linkat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "fsync", "write")

# A real writer in its own process: argv = folder, picture seed, JSON options. Candidates NAME, NAME-1, ...
# are made lazily; `sync` (a folder) makes two writers start each round at the same moment; `no_precheck`
# hides taken names from the cheap pre-check so that only the no-replace publish stands in the way.
WRITER = r"""
import itertools, json, os, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from sdcli import outputs

folder, seed, options = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
if options.get("no_precheck"):
    os.path.lexists = lambda path: False
pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
meta = options["meta"]
for r in range(options.get("rounds", 1)):
    out = folder / str(r) if "rounds" in options else folder
    out.mkdir(parents=True, exist_ok=True)
    if "sync" in options:
        sync = Path(options["sync"])
        (sync / f"{r}.{seed}").touch()
        while len(list(sync.glob(f"{r}.*"))) < 2:
            time.sleep(0.0002)
    names = (f"img-{i}" if i else "img" for i in itertools.count())
    png, _ = outputs.write_pair(Image.fromarray(pixels), meta, ((out / f"{n}.png", out / f"{n}.json") for n in names))
    print(png.name, flush=True)
"""


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def candidates(folder: Path, stem: str = "img"):
    """NAME, NAME-1, NAME-2, ... as the job planner would offer them, made only when asked for."""
    for i in itertools.count():
        name = f"{stem}-{i}" if i else stem
        yield folder / f"{name}.png", folder / f"{name}.json"


def writer(folder: Path, seed: int = 0, **options) -> list[str]:
    return [sys.executable, "-c", WRITER, str(folder), str(seed), json.dumps({"meta": META, **options})]


def child_env() -> dict[str, str]:
    # No .pyc writes: their rename and unlink would shift strace's syscall counts.
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def reference_pair(tmp_path: Path) -> dict[str, bytes]:
    """What an unkilled write of the writer's image leaves: {'img.png': ..., 'img.json': ...}."""
    folder = tmp_path / "reference"
    folder.mkdir()
    subprocess.run(writer(folder), env=child_env(), check=True, capture_output=True)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def check_whole(folder: Path, foreign: dict[str, bytes]) -> None:
    """Under every real name a whole file: a foreign one unchanged, a PNG that decodes with our metadata, a
    sidecar equal to it and beside its PNG. Hidden names are temporaries only."""
    for path in folder.iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(TEMP_SUFFIX), path.name
        elif path.name in foreign:
            assert path.read_bytes() == foreign[path.name]
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
                assert json.loads(image.text["sdcli"]) == shareable(META)
        else:
            assert json.loads(path.read_text()) == META and path.with_suffix(".png").is_file(), path.name


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


needs_strace = pytest.mark.skipif(not strace_works(), reason="needs strace on PATH, and ptrace permitted")


def killed_at(call: str, when: int, folder: Path, **options) -> subprocess.CompletedProcess:
    """The writer, SIGKILLed by strace on entering its `when`-th `call` system call."""
    inject = f"inject={call}:signal=SIGKILL:when={when}"
    return subprocess.run(
        ["strace", "-f", "-o", "/dev/null", "-e", f"trace={call}", "-e", inject, *writer(folder, **options)],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def publish_calls(folder: Path, **options) -> dict[str, int]:
    """How often an unkilled writer makes each publish-related system call (strace's own count)."""
    log = folder.parent / f"{folder.name}.strace"
    subprocess.run(
        ["strace", "-f", "-o", str(log), "-e", f"trace={','.join(PUBLISH_CALLS)}", *writer(folder, **options)],
        env=child_env(), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    calls = re.findall(r"^\d+\s+(\w+)\(", log.read_text(), flags=re.M)
    return {call: calls.count(call) for call in PUBLISH_CALLS if call in calls}


# --- temporary files -----------------------------------------------------------------------------------


def test_temporary_names_are_hidden_per_process_and_unguessable(tmp_path):
    first, second = temp_path(tmp_path / "a.png"), temp_path(tmp_path / "a.png")
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"\.a\.png\.{host}\.{os.getpid()}\.[0-9a-f]{{16}}\.sdcli-tmp", first.name), first.name
    assert first != second and first.parent == tmp_path


def test_a_symlink_planted_at_the_old_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.png", "a.json"):  # where sdcli used to write: `.NAME.HOST.PID.sdcli-tmp`
        (out / f".{name}.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}").symlink_to(victim)
    write_pair(picture(), META, [(out / "a.png", out / "a.json")])
    assert victim.read_text() == "precious"
    assert json.loads((out / "a.json").read_text()) == META


def test_a_symlink_at_the_exact_temporary_name_makes_the_write_fail(tmp_path, monkeypatch):
    """Were the random part guessed, O_EXCL|O_NOFOLLOW still refuses the name instead of following it."""
    monkeypatch.setattr(outputs.secrets, "token_hex", lambda n: "0" * 2 * n)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    temp_path(out / "a.png").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_pair(picture(), META, [(out / "a.png", out / "a.json")])
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == [temp_path(out / "a.png").name]


def test_files_get_the_usual_permissions_less_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        png, sidecar = write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")])
    finally:
        os.umask(old)
    assert (png.stat().st_mode & 0o777, sidecar.stat().st_mode & 0o777) == (0o640, 0o640)


def test_the_writability_probe_does_not_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".probe.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}"  # the old probe's name
    planted.symlink_to(victim)
    prepare_folder(out)
    assert victim.read_text() == "precious" and [p.name for p in out.iterdir()] == [planted.name]


# --- publishing without replacing ----------------------------------------------------------------------


@pytest.mark.parametrize("taken", ["img.png", "img.json"])
@pytest.mark.parametrize("precheck", [True, False], ids=["prechecked", "at-publish"])
def test_a_foreign_file_at_a_name_is_never_replaced(tmp_path, monkeypatch, taken, precheck):
    """Whether the cheap pre-check sees it or the file appears just after it, a taken PNG or sidecar name
    sends the image on to the next candidate, and the foreign file keeps its bytes."""
    (tmp_path / taken).write_bytes(b"not sdcli's")
    if not precheck:
        monkeypatch.setattr(os.path, "lexists", lambda path: False)
    assert write_pair(picture(), META, candidates(tmp_path)) == (tmp_path / "img-1.png", tmp_path / "img-1.json")
    assert (tmp_path / taken).read_bytes() == b"not sdcli's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([taken, "img-1.png", "img-1.json"])


def test_candidates_are_drawn_only_as_needed(tmp_path):
    drawn = []

    def names():
        for pair in candidates(tmp_path):
            drawn.append(pair)
            yield pair

    (tmp_path / "img.png").write_bytes(b"x")
    write_pair(picture(), META, names())
    assert [png.name for png, _ in drawn] == ["img.png", "img-1.png"]


def test_when_every_candidate_is_taken_nothing_is_written(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="every candidate name is taken"):
        write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")])
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_planned_overwrite_replaces(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")
    (tmp_path / "a.json").write_text("{}")
    pair = write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")], replace=True)
    assert pair == (tmp_path / "a.png", tmp_path / "a.json")
    assert load_existing(*pair) == META and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]


def test_a_pair_taken_back_leaves_a_file_that_replaced_it_alone(tmp_path, monkeypatch):
    """An overwriting run replaced our just-published PNG before we found the sidecar's name taken: its
    PNG is not ours to delete."""
    real_link = os.link

    def link(src, dst, **kwargs):
        if Path(dst).name == "img.json":
            (tmp_path / "img.png").unlink()
            (tmp_path / "img.png").write_bytes(b"the other run's")
        real_link(src, dst, **kwargs)

    (tmp_path / "img.json").write_text("{}")
    monkeypatch.setattr(os.path, "lexists", lambda path: False)
    monkeypatch.setattr(os, "link", link)
    write_pair(picture(), META, candidates(tmp_path))
    assert (tmp_path / "img.png").read_bytes() == b"the other run's"
    assert load_existing(tmp_path / "img-1.png", tmp_path / "img-1.json") == META


@pytest.mark.parametrize("fallback", ["renameat2", "check-then-rename"])
def test_file_systems_without_hard_links(tmp_path, monkeypatch, fallback):
    """Where link(2) is refused (FAT says EPERM), a publish falls back to renameat2(RENAME_NOREPLACE), or
    with no renameat2 to check-then-rename, and still refuses a taken name."""
    if fallback == "renameat2" and outputs._renameat2() is None:
        pytest.skip("this C library has no renameat2")

    def no_links(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    def no_plain_rename(src, dst):
        raise AssertionError("renameat2 was available; the racy rename must not be used")

    monkeypatch.setattr(os, "link", no_links)
    if fallback == "renameat2":
        monkeypatch.setattr(os, "rename", no_plain_rename)
    else:
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    temp, taken, free = tmp_path / ".temp", tmp_path / "taken", tmp_path / "free"
    temp.write_bytes(b"new")
    taken.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        outputs.publish(temp, taken)
    assert taken.read_bytes() == b"old" and temp.read_bytes() == b"new"
    outputs.publish(temp, free)
    assert free.read_bytes() == b"new" and not temp.exists()
    png, sidecar = write_pair(picture(), META, candidates(tmp_path))
    assert load_existing(png, sidecar) == META


def test_two_processes_writing_the_same_names_at_once_both_keep_their_image(tmp_path):
    rounds, sync = 20, tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen(writer(tmp_path / "out", seed, rounds=rounds, sync=str(sync)), env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]  # fmt: skip
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    names = [out.split() for out, _ in results]
    for r in range(rounds):
        folder = tmp_path / "out" / str(r)
        assert {names[0][r], names[1][r]} == {"img.png", "img-1.png"}, (r, names[0][r], names[1][r])
        assert sorted(p.name for p in folder.iterdir()) == ["img-1.json", "img-1.png", "img.json", "img.png"]
        for seed, name in ((1, names[0][r]), (2, names[1][r])):
            with Image.open(folder / name) as image:
                assert np.array_equal(np.asarray(image), np.asarray(picture(seed)))  # neither image lost
            assert json.loads((folder / name).with_suffix(".json").read_text()) == META


# --- killed processes and the next run's repair --------------------------------------------------------


@needs_strace
def test_sigkill_between_the_two_publishes_is_repaired_by_the_next_run(tmp_path):
    """The second link is the sidecar's publish: killed on entering it, the PNG stands alone under its name
    with the finished temporary sidecar beside it; the next run moves that into place."""
    probe, out = tmp_path / "probe", tmp_path / "out"
    probe.mkdir()
    out.mkdir()
    call = "linkat" if "linkat" in publish_calls(probe) else "link"  # which one this arch's Python makes
    killed = killed_at(call, 2, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["img.png"]
    temps = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].startswith(".img.json.") and temps[0].endswith(TEMP_SUFFIX)
    check_whole(out, {})
    repair_folder(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference_pair(tmp_path)


@needs_strace
@pytest.mark.parametrize("scenario", ["empty folder", "sidecar name taken"])
def test_a_kill_at_any_publish_call_leaves_whole_files_and_the_next_run_completes_them(tmp_path, scenario):
    """Killed at each publish-related system call in turn: under real names only whole files (or nothing),
    hidden temporaries besides; after the repair no temporary is left and every PNG has its sidecar.
    With the sidecar's name taken the PNG is published, taken back, and the image goes to `img-1`."""
    foreign = {"img.json": b"not sdcli's"} if scenario == "sidecar name taken" else {}
    options = {"no_precheck": True} if foreign else {}
    probe = tmp_path / "probe"
    probe.mkdir()
    for name, data in foreign.items():
        (probe / name).write_bytes(data)
    counts = publish_calls(probe, **options)
    assert counts.get("link", 0) + counts.get("linkat", 0) == (4 if foreign else 2), counts
    reference = reference_pair(tmp_path)
    kills = 0
    for call, count in counts.items():
        for when in range(1, count + 1):
            out = tmp_path / f"{call}-{when}"
            out.mkdir()
            for name, data in foreign.items():
                (out / name).write_bytes(data)
            killed = killed_at(call, when, out, **options)
            assert killed.returncode == -signal.SIGKILL, (call, when, killed.stderr)
            kills += 1
            check_whole(out, foreign)
            repair_folder(out)
            for png in out.glob("*.png"):
                load_existing(png, png.with_suffix(".json"))  # the planner's look completes a lone PNG
            assert not [p.name for p in out.iterdir() if p.name.startswith(".")], (call, when)
            check_whole(out, foreign)
            ours = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in foreign}
            stems = {name.rsplit(".", 1)[0] for name in ours}
            assert len(stems) <= 1, (call, when, sorted(ours))
            for stem in stems:
                got = {name.replace(stem, "img"): data for name, data in ours.items()}
                if set(got) == {"img.png"} and stem == "img":
                    continue  # the one documented case: killed taking back the PNG, beside the foreign file
                assert got == reference, (call, when, sorted(ours))
    assert kills == sum(counts.values())


def test_the_repair_publishes_only_a_whole_matching_sidecar(tmp_path):
    """A dead process's temporary sidecar that is cut short, or says another seed, is deleted, not
    published; a finished matching one is moved into place; a live process's files are left alone."""
    gone = dead_pid()
    host = socket.gethostname()
    for stem, text in (
        ("cut", json.dumps(META)[:-9]),
        ("other", json.dumps({**META, "seed": 7})),
        ("good", json.dumps(META)),
    ):
        write_pair(picture(), META, [(tmp_path / f"{stem}.png", tmp_path / f"{stem}.json")])
        (tmp_path / f"{stem}.json").unlink()
        (tmp_path / f".{stem}.json.{host}.{gone}.{'ab' * 8}{TEMP_SUFFIX}").write_text(text)
    live = temp_path(tmp_path / "live.json")
    live.write_text(json.dumps(META))
    lone = tmp_path / f".lone.json.{host}.{gone}.{'cd' * 8}{TEMP_SUFFIX}"  # its PNG was never published
    lone.write_text(json.dumps(META))
    repair_folder(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["cut.png", "other.png", "good.json", "good.png", live.name])
    assert json.loads((tmp_path / "good.json").read_text()) == META


def test_a_lone_png_gets_its_sidecar_back_from_its_own_chunk(tmp_path):
    png, sidecar = write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")])
    written = sidecar.read_bytes()
    sidecar.unlink()
    assert load_existing(png, sidecar) == shareable(META)  # the PNG's copy: local paths stay out of pictures
    assert json.loads(sidecar.read_bytes()) == shareable(META) != json.loads(written)
    assert complete_pair(png, sidecar) is None  # nothing left to complete
    picture().save(tmp_path / "plain.png")
    assert complete_pair(tmp_path / "plain.png", tmp_path / "plain.json") is None
    assert load_existing(tmp_path / "plain.png", tmp_path / "plain.json") == {}
    assert not (tmp_path / "plain.json").exists()


def test_a_lone_png_still_reads_where_its_sidecar_cannot_be_written(tmp_path, monkeypatch):
    png, sidecar = write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")])
    sidecar.unlink()

    def read_only(final, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs, "_write_temp", read_only)
    assert load_existing(png, sidecar) == shareable(META) and not sidecar.exists()


def test_a_png_whose_writer_is_between_its_publishes_is_not_completed_under_it(tmp_path):
    """A live writer's temporary sidecar is there until its own publish: writing one from the PNG meanwhile
    would take the name from it (it would then take its PNG back, leaving that sidecar alone)."""
    png, sidecar = write_pair(picture(), META, [(tmp_path / "a.png", tmp_path / "a.json")])
    sidecar.unlink()
    temp_path(sidecar).write_text(json.dumps(META))  # this process is alive: the write is still going on
    assert complete_pair(png, sidecar) is None and load_existing(png, sidecar) == shareable(META)
    assert not sidecar.exists()
