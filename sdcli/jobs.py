"""Jobs: prompt files become items, items become planned images with fixed names and seeds, planned
images meet what is already on disk (resume), and the rest are grouped into U-Net batches.

Everything here happens before the model loads, so a bad line in a 10,000-line file fails in a second.
"""

from __future__ import annotations

import dataclasses
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
from sdcli.extra_networks import Library, embeddings_in, locate, take_lora_tags
from sdcli.outputs import DEFAULT_NAME, config_reference, load_existing, name_stem, recipe
from sdcli.request import ITEM_ONLY_TYPES, Request, build_request, check_request, file_uses, item_types, padding
from sdcli.text_limits import clip

T = TypeVar("T", "Planned", "Target")
MAX_COUNT = 10_000  # images of one item: a typo such as count: 1e9 must not plan for hours

ITEM_TYPES = item_types()  # what an item of a prompt file may set, and the type each must have


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
    template: str = DEFAULT_NAME  # the --name template it came from


@dataclass(frozen=True)
class Target:
    """A planned image placed in the output folder."""

    planned: Planned
    png: Path
    sidecar: Path
    done: bool  # a complete PNG + JSON pair of this recipe is already there
    replace: bool = False  # its names hold what it may replace: an incomplete pair of its recipe, or --overwrite

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
    base = Path.cwd() if source == "-" else path.absolute().parent  # an item's files are beside the prompt file
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        items = _jsonl_items(text, name, base)
    elif suffix in (".yaml", ".yml", ".json"):
        items = _yaml_items(text, name, base)
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


def _jsonl_items(text: str, name: str, base: Path) -> list[Item]:
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
        items.append(make_item(value, where, len(items), base))
    return items


# What aliases may add to a prompt file: far beyond any real file, far below what hangs sdcli (an
# "alias bomb" of a few lines repeats a value a billion times). The file's own size is not counted.
_MAX_ALIAS_VALUES = 1_000_000
_MAX_ALIAS_TEXT = 64 * 2**20  # characters: a few long anchored prompts repeated are fine, gigabytes are not


def _node_children(node: yaml.Node) -> list[yaml.Node]:
    """The nodes directly inside `node`, a mapping's keys included (they are expanded too)."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _check_keys(node: yaml.Node, name: str) -> None:
    """Refuse a key given twice in one mapping: loading keeps the last silently, so a typo'd item would run.
    Keys are compared as written (tag and text); a key merged in by `<<` and set again locally is YAML's
    documented override, not a duplicate, since the merged key lives in another node."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if (key.tag, key.value) in seen:
                raise RequestError(f"{name}:{key.start_mark.line + 1}: key {clip(key.value)} given twice")
            seen.add((key.tag, key.value))


def _expanded_size(node: yaml.Node, sizes: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """Values and characters of text that `node` becomes once its aliases are expanded, from its children's."""
    if isinstance(node, yaml.ScalarNode):
        return 1, len(node.value)
    parts = [sizes[id(child)] for child in _node_children(node)]
    return 1 + sum(values for values, _ in parts), sum(chars for _, chars in parts)


def _check_alias_growth(values: int, chars: int, where: str) -> None:
    """Refuse once aliases have added more than the bounds, naming the mapping or list whose alias crossed it."""
    if values > _MAX_ALIAS_VALUES:
        over = f"{_MAX_ALIAS_VALUES:,} values"
    elif chars > _MAX_ALIAS_TEXT:
        over = f"{_MAX_ALIAS_TEXT:,} characters of text"
    else:
        return
    raise RequestError(f"{where}: YAML aliases expand to too much data (over {over})")


def _check_yaml_graph(root: yaml.Node, name: str) -> None:
    """Refuse duplicate keys and aliases that expand too far, before any value is built. Composing shares an
    anchored node among its aliases, so visiting each node once (iteratively: the file may nest deeply) is
    linear in the file even for a bomb; each later reference adds the node's whole expansion."""
    sizes: dict[int, tuple[int, int]] = {}  # id of a finished node -> its expanded size
    open_ids = {id(root)}  # nodes being walked: an alias to one of them would expand forever
    stack = [(root, iter(_node_children(root)))]
    added_values = added_chars = 0
    _check_keys(root, name)
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            open_ids.discard(id(node))
            sizes[id(node)] = _expanded_size(node, sizes)
        elif id(child) in open_ids:
            raise RequestError(f"{name}:{node.start_mark.line + 1}: a YAML alias refers to a value it is inside")
        elif id(child) in sizes:
            values, chars = sizes[id(child)]
            added_values, added_chars = added_values + values, added_chars + chars
            _check_alias_growth(added_values, added_chars, f"{name}:{node.start_mark.line + 1}")
        else:
            _check_keys(child, name)
            open_ids.add(id(child))
            stack.append((child, iter(_node_children(child))))


def _yaml_error(exc: yaml.YAMLError, name: str) -> RequestError:
    """The parser's complaint, clipped: it quotes the file's text (an undefined alias, an unknown tag)."""
    mark = getattr(exc, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return RequestError(f"{name}{line}: not valid YAML: {clip(problem, 160, quote=False)}")


def _yaml_items(text: str, name: str, base: Path) -> list[Item]:
    """A YAML (or JSON) list whose entries are prompts or mappings. The text is parsed once into nodes, which
    keep line numbers and are checked before values are built from them."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return []
            if not isinstance(root, yaml.SequenceNode):
                raise RequestError(f"{name}:{root.start_mark.line + 1}: expected a list of prompts or mappings")
            _check_yaml_graph(root, name)
            data = loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, name) from None
    except RecursionError:
        raise RequestError(f"{name}: not valid YAML: nested too deeply") from None
    return [
        make_item(value, f"{name}:{node.start_mark.line + 1}", i, base)
        for i, (node, value) in enumerate(zip(root.value, data, strict=True))
    ]


def make_item(value: Any, where: str, position: int, base: Path | None = None) -> Item:
    """Check one entry: a prompt, or a mapping of known keys with values of the right type; the files it
    lists are taken from `base` (the prompt file's folder) when relative."""
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise RequestError(f"{where}: an item must be a prompt or a mapping with keys {', '.join(ITEM_TYPES)}")
    values: dict[str, Any] = {}
    for key, raw in value.items():
        kind = ITEM_TYPES.get(key) if isinstance(key, str) else None
        if kind is None:
            raise RequestError(
                f"{where}: unknown key {clip(str(key))}{_suggest(str(key), ITEM_TYPES)}; keys: {', '.join(ITEM_TYPES)}"
            )
        accepted = {float: (int, float), list: (list, str)}.get(kind, kind)  # one file may stand for a list
        if isinstance(raw, bool) or not isinstance(raw, accepted):
            expected = {str: "text", int: "an integer", float: "a number", list: "a list of files"}[kind]
            shown = clip(json.dumps(raw, default=str), quote=False)
            raise RequestError(f"{where}: '{key}' must be {expected}, got {shown}")
        try:
            values[key] = float(raw) if kind is float else file_uses(raw, key, base) if kind is list else raw
        except RequestError as exc:
            raise RequestError(f"{where}: {exc}") from None
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
    library: Library | None = None,
) -> list[Planned]:
    """Planned images of all items: an item's value, else the command line's, else the config's default.
    Image i of an item with seed S gets seed S+i. The prompt's LoRA tags and embedding names are looked up
    in `library` (the default folders when None)."""
    library = library or Library()
    planned: list[Planned] = []
    owners: dict[str, str] = {}
    for item in items:
        merged = {**options, **item.values}
        base = merged.get("seed")
        base = seed_for(item) if base is None else base
        template = merged.get("name", DEFAULT_NAME)
        prefix = f"{item.where}: " if item.where else ""
        given = {key: value for key, value in merged.items() if key not in ITEM_ONLY_TYPES}
        try:  # what every image of the item shares: its size, files and tags are found once
            values, picture = _read_pictures({**given, "prompt": item.values["prompt"], "seed": base}, config)
            resolved = _with_networks(build_request(values, config), library)
            _check_mask(resolved, picture, config)
        except RequestError as exc:
            raise RequestError(f"{prefix}{exc}") from None
        for i in range(merged.get("count", 1)):
            request = dataclasses.replace(resolved, seed=base + i)
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
            planned.append(Planned(item.where, first_index + len(planned), request, stem, template))
    return planned


def _read_pictures(values: dict[str, Any], config: ModelConfig) -> tuple[dict[str, Any], Any]:
    """The item's values with the init image's own size where none is given (upright, as read; down to the
    model's multiple as diffusers' image processor sizes it; grown by the outpainting pad), and the init image
    as read (None without one), so a bad picture fails before the model loads."""
    uses = file_uses(values.get("init_image", ()), "init_image")
    if not uses:
        return values, None
    from sdcli.images import read_image  # torch and Pillow: only a job with pictures pays for them

    picture = read_image(uses[0].file)
    if "width" in values and "height" in values:
        return values, picture
    step = config.vae.downsample
    width, height = picture.size
    left, top, right, bottom = padding(values["pad"], step) if values.get("pad") else (0, 0, 0, 0)
    return {"width": width // step * step + left + right, "height": height // step * step + top + bottom,
            **values}, picture  # fmt: skip


def _check_mask(request: Request, picture: Any, config: ModelConfig) -> None:
    """The mask (or outpainting border) prepared as the render will prepare it: unreadable or all black fails
    here, before the model loads."""
    if picture is None or not (request.mask or request.pad):
        return
    from sdcli.masks import prepare

    mask = Path(request.mask[0].file) if request.mask else None
    pad = padding(request.pad, config.vae.downsample) if request.pad else None
    prepare(picture, mask, pad, request.mask_blur, request.width, request.height)


def _with_networks(request: Request, library: Library) -> Request:
    """The request with its prompt's LoRA tags moved to `loras`, `embeddings` the embedding files whose names
    its texts use (those it listed first, then the library's), and every file it names found."""
    prompt, tagged = take_lora_tags(request.prompt, request.negative, library)
    loras = locate(request.loras + tagged, library.loras, "LoRA")
    given = locate(request.embeddings, library.embeddings, "embedding")
    listed = {Path(u.file).stem.lower(): Path(u.file) for u in given}
    used = embeddings_in((prompt, request.negative), {**library.embeddings, **listed})
    weights = {u.file: u.weight for u in given}  # a weight given to an embedding is refused by check_request
    used = tuple(dataclasses.replace(u, weight=weights.get(u.file, 1.0)) for u in used)
    images = {name: locate(getattr(request, name), {}, name.replace("_", " ")) for name in ("init_image", "mask")}
    return dataclasses.replace(request, prompt=prompt, loras=loras, embeddings=used, **images)


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
                targets.append(Target(p, png, sidecar, done=complete, replace=not complete))
                break
            if found is None:
                targets.append(Target(p, png, sidecar, done=False, replace=overwrite))
                break
        claimed.add(stem)
    return targets


def _request_meta(request: Request) -> dict[str, Any]:
    return dataclasses.asdict(request)


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
