"""Prompt files, planning (precedence, seeds, names), resume placement and U-Net batch grouping."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.errors import RequestError
from sdcli.jobs import Item, batches, derived_seed, next_index, place, plan, read_items
from sdcli.outputs import build_metadata, write_pair


def items_of(tmp_path: Path, name: str, text: str) -> list[Item]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return read_items(str(path))


def test_text_file_skips_blanks_and_comments(tmp_path):
    items = items_of(tmp_path, "p.txt", "# a comment\n\n  a red circle  \n#another\nblue square, #1 of many\n")
    assert [(i.where.rsplit("/", 1)[-1], i.position, i.values) for i in items] == [
        ("p.txt:3", 0, {"prompt": "a red circle"}),
        ("p.txt:5", 1, {"prompt": "blue square, #1 of many"}),
    ]


def test_jsonl_file(tmp_path):
    text = '{"prompt": "a", "steps": 4, "guidance": 3, "count": 2, "name": "x-{seed}"}\n\n"just a prompt"\n'
    items = items_of(tmp_path, "p.jsonl", text)
    assert [i.where.rsplit(":", 1)[-1] for i in items] == ["1", "3"]
    assert items[0].values == {"prompt": "a", "steps": 4, "guidance": 3.0, "count": 2, "name": "x-{seed}"}
    assert items[1].values == {"prompt": "just a prompt"}


def test_yaml_file_keeps_line_numbers(tmp_path):
    text = "# prompts\n- a red circle\n- prompt: blue square\n  sampler: ddim\n  seed: 7\n-   green\n"
    items = items_of(tmp_path, "p.yaml", text)
    assert [i.where.rsplit(":", 1)[-1] for i in items] == ["2", "3", "6"]
    assert items[1].values == {"prompt": "blue square", "sampler": "ddim", "seed": 7}


def test_json_list_reads_like_yaml(tmp_path):
    assert [i.values for i in items_of(tmp_path, "p.json", '["a", {"prompt": "b", "width": 64}]')] == [
        {"prompt": "a"},
        {"prompt": "b", "width": 64},
    ]


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert [(i.where, i.values["prompt"]) for i in read_items("-")] == [("<stdin>:1", "one"), ("<stdin>:2", "two")]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.txt", "\n# only comments\n", r"p.txt: no prompts in the file"),
        ("p.jsonl", "", r"p.jsonl: no prompts in the file"),
        ("p.yaml", "# nothing\n", r"p.yaml: no prompts in the file"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', r"p.jsonl:2: not valid JSON"),
        ("p.jsonl", '{"prompt": "a", "stpes": 3}\n', r"p.jsonl:1: unknown key 'stpes' \(did you mean 'steps'\?\)"),
        ("p.jsonl", '{"prompt": "a", "steps": "20"}\n', r"p.jsonl:1: 'steps' must be an integer, got \"20\""),
        ("p.jsonl", '{"prompt": "a", "seed": true}\n', r"p.jsonl:1: 'seed' must be an integer, got true"),
        ("p.jsonl", '{"prompt": "a", "guidance": "high"}\n', r"'guidance' must be a number"),
        ("p.jsonl", '{"negative": "b"}\n', r"p.jsonl:1: the item has no prompt"),
        ("p.jsonl", '{"prompt": "   "}\n', r"the item has no prompt"),
        ("p.jsonl", '{"prompt": "a", "count": 0}\n', r"'count' must be from 1 to 10000, got 0"),
        ("p.jsonl", "[1, 2]\n", r"p.jsonl:1: an item must be a prompt or a mapping"),
        ("p.yaml", "prompt: a\n", r"p.yaml:1: expected a list"),
        ("p.yaml", "- a\n- [b\n", r"p.yaml:\d+: not valid YAML"),
        ("p.yaml", "- a\n- prompt: b\n  width: wide\n", r"p.yaml:2: 'width' must be an integer"),
        ("p.yaml", "- a\n- 42\n", r"p.yaml:2: an item must be a prompt or a mapping"),
        ("p.yaml", "- prompt: a\n  1: b\n", r"unknown key '1'"),
        ("p.yaml", "- a\n---\n- b\n", r"p.yaml:\d+: not valid YAML"),
    ],
)
def test_bad_prompt_files(tmp_path, name, text, message):
    with pytest.raises(RequestError, match=message):
        items_of(tmp_path, name, text)


def test_unreadable_prompt_files(tmp_path):
    with pytest.raises(RequestError, match="prompt file not found: .*nope.txt"):
        read_items(str(tmp_path / "nope.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(RequestError, match="latin1.txt: not UTF-8 text"):
        read_items(str(tmp_path / "latin1.txt"))
    with pytest.raises(RequestError, match="cannot read"):
        read_items(str(tmp_path))


def test_item_beats_command_line_beats_config(tiny_config):
    items = [Item("f:1", 0, {"prompt": "a", "steps": 9, "count": 2}), Item("f:2", 1, {"prompt": "b"})]
    planned = plan(items, {"steps": 5, "sampler": "ddim", "seed": 100}, tiny_config, seed_for=derived_seed)
    requests = [p.request for p in planned]
    assert [(r.prompt, r.steps, r.sampler, r.seed) for r in requests] == [
        ("a", 9, "ddim", 100),
        ("a", 9, "ddim", 101),
        ("b", 5, "ddim", 100),
    ]
    defaults = tiny_config.defaults
    assert (requests[0].width, requests[0].height, requests[0].guidance) == (
        defaults.width,
        defaults.height,
        defaults.guidance,
    )
    assert [p.stem for p in planned] == ["00000-100-a", "00001-101-a", "00002-100-b"]


def test_derived_seeds_are_fixed_per_item(tiny_config):
    items = [Item("f:1", 0, {"prompt": "a"}), Item("f:2", 1, {"prompt": "a"}), Item("f:3", 2, {"prompt": "b"})]
    seeds = [p.request.seed for p in plan(items, {}, tiny_config, seed_for=derived_seed)]
    again = [p.request.seed for p in plan(items, {}, tiny_config, seed_for=derived_seed)]
    assert seeds == again and len(set(seeds)) == 3 and all(0 <= s < 2**32 for s in seeds)


def test_plan_errors_name_the_item(tiny_config):
    with pytest.raises(RequestError, match=r"^f:2: --width must be a positive multiple of 2, got 33$"):
        plan(
            [Item("f:1", 0, {"prompt": "a"}), Item("f:2", 1, {"prompt": "b", "width": 33})],
            {},
            tiny_config,
            seed_for=derived_seed,
        )
    with pytest.raises(RequestError, match=r"^f:2: unknown sampler 'eulr' \(did you mean 'euler'\?\)"):
        plan([Item("f:2", 0, {"prompt": "b", "sampler": "eulr"})], {}, tiny_config, seed_for=derived_seed)
    with pytest.raises(RequestError, match=r"^--steps must be at least 1"):
        plan([Item("", 0, {"prompt": "b"})], {"steps": 0}, tiny_config, seed_for=derived_seed)


def test_clashing_names_are_refused(tiny_config):
    items = [Item("f:1", 0, {"prompt": "a", "name": "same"}), Item("f:2", 1, {"prompt": "b", "name": "same"})]
    with pytest.raises(
        RequestError, match=r"^f:2: file name 'same' is also given to another image of f:1; put \{index\}"
    ):
        plan(items, {}, tiny_config, seed_for=derived_seed)
    with pytest.raises(RequestError, match="also given to another image;"):
        plan([Item("", 0, {"prompt": "a", "count": 2})], {"name": "{slug}"}, tiny_config, seed_for=derived_seed)


def test_first_index_for_generate(tiny_config):
    planned = plan(
        [Item("", 0, {"prompt": "a", "seed": 5, "count": 2})], {}, tiny_config, seed_for=derived_seed, first_index=7
    )
    assert [(p.index, p.stem) for p in planned] == [(7, "00007-5-a"), (8, "00008-6-a")]


def test_next_index(tmp_path):
    assert next_index(tmp_path / "missing") == 0
    for name in ("00003-1-a.png", "00012-1-b.png", "00040-x.json", "cat.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_index(tmp_path) == 13


def _planned(tiny_config, **values):
    return plan([Item("f:1", 0, {"prompt": "a", "seed": 1, **values})], {}, tiny_config, seed_for=derived_seed)


def _finish(target, tiny_config, sha="s" * 64, *, sidecar=True):
    meta = build_metadata(
        target.planned.request, config=tiny_config, weights=Path("w"), weights_sha256=sha, device="cpu", dtype="fp32",
        threads=1, batch_size=1, elapsed=0.0,
    )  # fmt: skip
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    write_pair(image, meta, [(target.png, target.sidecar)])
    if not sidecar:
        target.sidecar.unlink()


EXTRA = {"config": "tiny", "weights_sha256": "s" * 64}


def test_resume_skips_complete_pairs_of_the_same_recipe(tmp_path, tiny_config):
    planned = _planned(tiny_config)
    (first,) = place(planned, tmp_path, EXTRA, overwrite=False, resume=True)
    assert (first.png.name, first.done) == ("00000-1-a.png", False)
    _finish(first, tiny_config)
    (again,) = place(planned, tmp_path, EXTRA, overwrite=False, resume=True)
    assert (again.png, again.done) == (first.png, True)
    (forced,) = place(planned, tmp_path, EXTRA, overwrite=True, resume=True)
    assert (forced.png, forced.done) == (first.png, False)


def test_resume_skips_a_sidecar_written_before_newer_fields(tmp_path, tiny_config):
    """A sidecar of an older sdcli lacks the fields added since (LoRAs, init image, hires...): it meant their
    legacy values, so an upgrade does not re-render a finished job."""
    import json

    from sdcli.request import legacy_values

    planned = _planned(tiny_config, prompt_syntax="plain", clip_skip=1)
    (first,) = place(planned, tmp_path, EXTRA, overwrite=False, resume=True)
    _finish(first, tiny_config)
    meta = json.loads(first.sidecar.read_text(encoding="utf-8"))
    first.sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k not in legacy_values()}), encoding="utf-8")
    (again,) = place(planned, tmp_path, EXTRA, overwrite=False, resume=True)
    assert again.done


def test_generate_never_reuses_an_equal_image(tmp_path, tiny_config):
    planned = _planned(tiny_config)
    _finish(place(planned, tmp_path, EXTRA, overwrite=False, resume=False)[0], tiny_config)
    (second,) = place(planned, tmp_path, EXTRA, overwrite=False, resume=False)
    assert (second.png.name, second.sidecar.name, second.done) == ("00000-1-a-1.png", "00000-1-a-1.json", False)


def test_a_different_image_under_the_name_is_never_overwritten(tmp_path, tiny_config):
    _finish(place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)[0], tiny_config)
    (other,) = place(_planned(tiny_config, steps=7), tmp_path, EXTRA, overwrite=False, resume=True)
    assert (other.png.name, other.done) == ("00000-1-a-1.png", False)
    (new_weights,) = place(
        _planned(tiny_config), tmp_path, {**EXTRA, "weights_sha256": "t" * 64}, overwrite=False, resume=True
    )
    assert new_weights.png.name == "00000-1-a-1.png"


def test_foreign_files_are_never_overwritten(tmp_path, tiny_config):
    (tmp_path / "00000-1-a.png").write_bytes(b"someone else's picture")
    (tmp_path / "00000-1-a-1.json").write_text("{}")
    (target,) = place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)
    assert target.png.name == "00000-1-a-2.png"


def test_an_orphan_png_of_the_same_recipe_gets_its_sidecar_back(tmp_path, tiny_config):
    """Killed between the PNG's and the JSON's publish: the PNG is whole and carries its metadata, so the
    next run writes the sidecar from it and counts the image done."""
    (first,) = place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)
    _finish(first, tiny_config, sidecar=False)
    (again,) = place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)
    assert (again.png, again.done) == (first.png, True) and first.sidecar.is_file()


def test_an_orphan_sidecar_of_the_same_recipe_is_replaced_in_place(tmp_path, tiny_config):
    (first,) = place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)
    _finish(first, tiny_config)
    first.png.unlink()
    (again,) = place(_planned(tiny_config), tmp_path, EXTRA, overwrite=False, resume=True)
    assert (again.png, again.done, again.replace) == (first.png, False, True)


def test_suffixes_are_not_shared_within_one_job(tmp_path, tiny_config):
    (tmp_path / "a.png").write_bytes(b"foreign")
    items = [Item("f:1", 0, {"prompt": "x", "name": "a"}), Item("f:2", 1, {"prompt": "y", "name": "a-1"})]
    targets = place(plan(items, {}, tiny_config, seed_for=derived_seed), tmp_path, EXTRA, overwrite=False, resume=True)
    assert [t.png.name for t in targets] == ["a-1.png", "a-1-1.png"]


def test_batches_group_equal_settings_in_job_order(tiny_config):
    items = [Item(f"f:{i}", i, {"prompt": f"p{i}", "steps": s}) for i, s in enumerate([3, 4, 3, 3, 4, 3])]
    targets = place(
        plan(items, {}, tiny_config, seed_for=derived_seed), Path("/nonexistent"), EXTRA, overwrite=False, resume=True
    )
    groups = batches(targets, 2)
    assert [[t.planned.request.prompt for t in g] for g in groups] == [["p0", "p2"], ["p3", "p5"], ["p1", "p4"]]
    assert all(len({t.planned.request.batch_key() for t in g}) == 1 for g in groups)
    assert [len(g) for g in batches(targets, 1)] == [1] * 6
