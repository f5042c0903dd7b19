"""Jobs: prompt files become items, items become planned images with fixed names and seeds, planned
images meet what is already on disk (resume), and the rest are grouped into U-Net batches.

Everything here happens before the model loads, so a bad line in a 10,000-line file fails in a second.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sdcli.config import ModelConfig, _suggest
from sdcli.errors import RequestError
from sdcli.outputs import DEFAULT_NAME, config_reference, load_existing, name_stem, recipe
from sdcli.request import Request, check_request

T = TypeVar("T", "Planned", "Target")
MAX_COUNT = 10_000  # images of one item: a typo such as count: 1e9 must not plan for hours

# What an item of a prompt file may set, and the type each must have.
ITEM_TYPES: dict[str, type] = {
    "prompt": str, "negative": str, "seed": int, "steps": int, "guidance": float, "sampler": str,
    "width": int, "height": int, "count": int, "name": str,
}  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One prompt with its own settings, and where it came from (for messages)."""

    where: str  # "prompts.txt:3"; empty for the command line
    position: int  # 0-based place among the job's items
    values: dict[str, Any]  # the keys of ITEM_TYPES it sets; always a prompt


@dataclass(frozen=True)
class Planned:
    """One image to make: its recipe and its file name."""

    where: str
    index: int  # the image's place in the job, the {index} of --name
    request: Request
    stem: str  # file name without extension, from the --name template


@dataclass(frozen=True)
class Target:
    """A planned image placed in the output folder."""

    planned: Planned
    png: Path
    sidecar: Path
    done: bool  # a complete PNG + JSON pair of this recipe is already there

    @property
    def request(self) -> Request:
        return self.planned.request


def read_items(source: str) -> list[Item]:
    """Items of a prompt file: text (a prompt a line), JSON Lines (.jsonl), or YAML (.yaml/.yml/.json)."""
    path = Path(source)
    try:
        text = sys.stdin.read() if source == "-" else path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RequestError(f"prompt file not found: {source}") from None
    except UnicodeDecodeError:
        raise RequestError(f"{source}: not UTF-8 text") from None
    except OSError as exc:
        raise RequestError(f"{source}: cannot read: {exc.strerror or exc}") from None
    name = "<stdin>" if source == "-" else source
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        items = _jsonl_items(text, name)
    elif suffix in (".yaml", ".yml", ".json"):
        items = _yaml_items(text, name)
    else:
        items = _text_items(text, name)
    if not items:
        raise RequestError(f"{name}: no prompts in the file")
    return items


def _text_items(text: str, name: str) -> list[Item]:
    """A prompt a line; blank lines and lines starting with '#' are skipped."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        prompt = line.strip()
        if prompt and not prompt.startswith("#"):
            items.append(Item(f"{name}:{number}", len(items), {"prompt": prompt}))
    return items


def _jsonl_items(text: str, name: str) -> list[Item]:
    """A JSON object (or a bare JSON string, the prompt) a line; blank lines are skipped."""
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise RequestError(f"{where}: not valid JSON: {getattr(exc, 'msg', exc)}") from None
        except RecursionError:
            raise RequestError(f"{where}: not valid JSON: nested too deeply") from None
        items.append(make_item(value, where, len(items)))
    return items


def _yaml_items(text: str, name: str) -> list[Item]:
    """A YAML (or JSON) list whose entries are prompts or mappings."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RequestError(f"{name}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise RequestError(f"{name}: not valid YAML: nested too deeply") from None
    if root is None:
        return []
    if not isinstance(root, yaml.SequenceNode):
        raise RequestError(f"{name}:{root.start_mark.line + 1}: expected a list of prompts or mappings")
    return [
        make_item(value, f"{name}:{node.start_mark.line + 1}", i)
        for i, (node, value) in enumerate(zip(root.value, data, strict=True))
    ]


def make_item(value: Any, where: str, position: int) -> Item:
    """Check one entry: a prompt, or a mapping of known keys with values of the right type."""
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise RequestError(f"{where}: an item must be a prompt or a mapping with keys {', '.join(ITEM_TYPES)}")
    values: dict[str, Any] = {}
    for key, raw in value.items():
        kind = ITEM_TYPES.get(key) if isinstance(key, str) else None
        if kind is None:
            raise RequestError(
                f"{where}: unknown key '{key}'{_suggest(str(key), ITEM_TYPES)}; keys: {', '.join(ITEM_TYPES)}"
            )
        if isinstance(raw, bool) or not isinstance(raw, (int, float) if kind is float else kind):
            expected = {str: "text", int: "an integer", float: "a number"}[kind]
            raise RequestError(f"{where}: '{key}' must be {expected}, got {json.dumps(raw, default=str)}")
        values[key] = float(raw) if kind is float else raw
    if not values.get("prompt", "").strip():
        raise RequestError(f"{where}: the item has no prompt")
    if not 1 <= values.get("count", 1) <= MAX_COUNT:
        raise RequestError(f"{where}: 'count' must be from 1 to {MAX_COUNT}, got {values['count']}")
    return Item(where, position, values)


def derived_seed(item: Item) -> int:
    """A seed fixed by the item's place and prompt, so that rerunning a file re-plans the same images."""
    digest = hashlib.sha256(f"{item.position}\n{item.values['prompt']}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def plan(
    items: list[Item],
    options: dict[str, Any],
    config: ModelConfig,
    *,
    seed_for: Callable[[Item], int],
    first_index: int = 0,
) -> list[Planned]:
    """Planned images of all items: an item's value, else the command line's, else the config's default.
    Image i of an item with seed S gets seed S+i."""
    defaults = config.defaults
    planned: list[Planned] = []
    owners: dict[str, str] = {}
    for item in items:
        merged = {**options, **item.values}
        base = merged.get("seed")
        base = seed_for(item) if base is None else base
        template = merged.get("name", DEFAULT_NAME)
        prefix = f"{item.where}: " if item.where else ""
        for i in range(merged.get("count", 1)):
            request = Request(
                prompt=item.values["prompt"],
                negative=merged.get("negative", defaults.negative),
                seed=base + i,
                steps=merged.get("steps", defaults.steps),
                guidance=float(merged.get("guidance", defaults.guidance)),
                sampler=merged.get("sampler", defaults.sampler),
                width=merged.get("width", defaults.width),
                height=merged.get("height", defaults.height),
            )
            try:
                check_request(request, config)
                stem = name_stem(template, request, index=first_index + len(planned), config=config_reference(config))
            except RequestError as exc:
                raise RequestError(f"{prefix}{exc}") from None
            if stem in owners:
                other = f" of {owners[stem]}" if owners[stem] else ""
                raise RequestError(
                    f"{prefix}file name '{stem}' is also given to another image{other}; "
                    "put {index} or {seed} in the name"
                )
            owners[stem] = item.where
            planned.append(Planned(item.where, first_index + len(planned), request, stem))
    return planned


def place(
    planned: list[Planned], folder: Path, extra: dict[str, Any], *, overwrite: bool, resume: bool
) -> list[Target]:
    """Give each planned image its files. A name already taken by a different image (or by a file that is
    not sdcli's) is never overwritten: the image gets the first free `-1`, `-2`, ... suffix instead.
    With `resume`, a complete pair of the same recipe counts as done; `overwrite` replaces whatever is there.
    `extra` holds the recipe keys that are not in the request (config, weights_sha256)."""
    targets: list[Target] = []
    claimed: set[str] = set()
    for p in planned:
        want = recipe({**_request_meta(p.request), **extra})
        suffix = 0
        while True:
            stem = p.stem if suffix == 0 else f"{p.stem}-{suffix}"
            suffix += 1
            if stem in claimed:
                continue
            png, sidecar = folder / f"{stem}.png", folder / f"{stem}.json"
            found = None if overwrite else load_existing(png, sidecar)
            if found and recipe(found) == want:
                complete = png.exists() and sidecar.exists()
                if complete and not resume:
                    continue  # generate makes a new image even when an equal one exists
                targets.append(Target(p, png, sidecar, done=complete))
                break
            if found is None:
                targets.append(Target(p, png, sidecar, done=False))
                break
        claimed.add(stem)
    return targets


def _request_meta(request: Request) -> dict[str, Any]:
    return {**request.__dict__, "guidance": float(request.guidance)}


def batches(images: Sequence[T], size: int) -> list[list[T]]:
    """Images (planned or placed) that share steps, guidance, sampler and size, in groups of at most `size`,
    in job order."""
    groups: dict[tuple, list[T]] = {}
    for image in images:
        groups.setdefault(image.request.batch_key(), []).append(image)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def next_index(folder: Path) -> int:
    """One past the highest leading number of the folder's PNG names, so `generate` keeps counting up."""
    numbers = [int(m.group()) for p in folder.glob("*.png") if (m := re.match(r"\d+", p.name))]
    return max(numbers, default=-1) + 1
