"""Planning with LoRAs and embeddings: <lora:> tags leave the prompt and become files, names are looked up in
the folders, an embedding's name in either text lists its file, and every mistake is one line before a load."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcli.errors import RequestError
from sdcli.extra_networks import Library, embeddings_in, take_lora_tags
from sdcli.jobs import Item, derived_seed, plan, read_items
from sdcli.outputs import infotext, recipe


def planned(tiny_config, prompt, library, **values):
    item = Item("", 0, {"prompt": prompt, "seed": 1, **values})
    return plan([item], {}, tiny_config, seed_for=derived_seed, library=library)[0].request


@pytest.fixture
def folders(tmp_path):
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    for name in ("Style.safetensors", "detail_v2.safetensors", "notes.txt"):
        (loras / name).write_bytes(b"x")
    (embeddings / "EasyNegative.safetensors").write_bytes(b"x")
    (embeddings / "bad-hands.pt").write_bytes(b"x")
    return Library((loras,), (embeddings,))


def test_tags_leave_the_prompt_and_name_files(tiny_config, folders):
    request = planned(tiny_config, "a cat <lora:style:0.7>, oil <lora:DETAIL_V2> painting", folders)
    assert request.prompt == "a cat , oil  painting"
    named = [(Path(u.file).name, u.weight) for u in request.loras]
    assert named == [("Style.safetensors", 0.7), ("detail_v2.safetensors", 1.0)]


def test_cli_loras_come_before_tags(tiny_config, folders, tmp_path):
    given = tmp_path / "given.safetensors"
    given.write_bytes(b"x")
    request = planned(tiny_config, "x <lora:style:-0.4>", folders, loras=[f"{given}:0.5"])
    named = [(Path(u.file).name, u.weight) for u in request.loras]
    assert named == [("given.safetensors", 0.5), ("Style.safetensors", -0.4)]


@pytest.mark.parametrize(
    "prompt, negative, message",
    [
        ("x <lora:missing:1>", "", "<lora:missing>: no such LoRA file in "),
        ("x <lora:style:strong>", "", "the weight is not a number"),
        ("x <lora:style:1:2:3>", "", "expected <lora:NAME> or <lora:NAME:WEIGHT>"),
        ("x <hypernet:h:1>", "", "supports <lora:...> tags only"),
        ("x", "ugly <lora:style:1>", "negative prompt: "),
        ("x <lora:style:11>", "", "LoRA weight 11 for Style.safetensors is outside -10..10"),
    ],
)
def test_bad_tags_are_one_line(tiny_config, folders, prompt, negative, message):
    with pytest.raises(RequestError, match=None) as caught:
        planned(tiny_config, prompt, folders, negative=negative)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_prompt_of_many_tags_is_refused(tiny_config, folders):
    with pytest.raises(RequestError, match="65 LoRAs for one image; at most 64"):
        planned(tiny_config, "x " + "<lora:style:0.1>" * 65, folders)


def test_missing_lora_file_fails_at_planning(tiny_config, folders, tmp_path):
    with pytest.raises(RequestError, match="LoRA file not found: .*nope.safetensors"):
        planned(tiny_config, "x", folders, loras=[str(tmp_path / "nope.safetensors")])


def test_a_recipe_from_elsewhere_finds_its_files_by_name(tiny_config, folders):
    request = planned(tiny_config, "x", folders, loras=[{"file": "/elsewhere/Style.safetensors", "weight": 0.3}])
    assert request.loras[0].file.endswith("loras/Style.safetensors") and request.loras[0].weight == 0.3


def test_embeddings_are_found_by_name_in_either_text(tiny_config, folders):
    request = planned(tiny_config, "a (easynegative:1.2) cat", folders, negative="bad-hands, blurry")
    assert sorted(Path(u.file).name for u in request.embeddings) == ["EasyNegative.safetensors", "bad-hands.pt"]
    assert planned(tiny_config, "easynegatives bad-handsome", folders).embeddings == ()


def test_embeddings_in_lists_every_name_the_words_spell():
    available = {"bad": Path("/e/bad.pt"), "bad-hands": Path("/e/bad-hands.pt"), "good": Path("/e/good.pt")}
    assert [Path(u.file).name for u in embeddings_in(["bad-hands"], available)] == ["bad.pt", "bad-hands.pt"]


def test_folders_are_searched_with_subfolders_first_folder_first(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    for path in (first / "Style.safetensors", first / "sub" / "deep.pt", second / "style.pt", second / "x.txt"):
        path.write_bytes(b"")
    found = Library(embedding_dirs=(first, tmp_path / "missing", second)).embeddings
    assert found["style"] == first / "Style.safetensors" and found["deep"] == first / "sub" / "deep.pt"
    assert "x" not in found


def test_item_files_are_beside_the_prompt_file(tmp_path, tiny_config):
    (tmp_path / "style.safetensors").write_bytes(b"x")
    path = tmp_path / "jobs.yaml"
    path.write_text("- prompt: x\n  loras: ['style.safetensors:0.6']\n- prompt: y\n  loras: 3\n", encoding="utf-8")
    with pytest.raises(RequestError, match="'loras' must be a list of files"):
        read_items(str(path))
    path.write_text("- prompt: x\n  loras: ['style.safetensors:0.6']\n", encoding="utf-8")
    item = read_items(str(path))[0]
    assert item.values["loras"][0].file == str(tmp_path / "style.safetensors")


def test_recipe_compares_names_weights_and_hashes_not_folders(tiny_config, folders):
    request = planned(tiny_config, "x <lora:style:0.5>", folders)
    meta = {"loras": [{"file": "/a/Style.safetensors", "weight": 0.5, "sha256": ""}]}
    assert recipe(meta) == recipe({"loras": list(request.loras)}) != recipe({"loras": []})


def test_infotext_writes_tags_and_hashes(tiny_config, folders):
    from sdcli.outputs import build_metadata

    request = planned(tiny_config, "a cat <lora:style:0.5>", folders, negative="easynegative")
    request = request.__class__(**{**request.__dict__, "loras": tuple(
        u.__class__(u.file, u.weight, "ab" * 32) for u in request.loras)})  # fmt: skip
    meta = build_metadata(request, config=tiny_config, weights=Path("/w/m.safetensors"), weights_sha256="0" * 64,
                          device="cpu", dtype="fp32", batch_size=1, elapsed=0.0, threads=1)  # fmt: skip
    text = infotext(meta)
    assert text.startswith("a cat  <lora:Style:0.5>\nNegative prompt: easynegative\n")
    assert 'Lora hashes: "Style: abababababab"' in text and "TI hashes: " in text


def test_take_lora_tags_is_linear_on_hostile_text(folders):
    prompt, uses = take_lora_tags("<lora:" * 20000, "", folders)
    assert uses == () and len(prompt) == 6 * 20000
