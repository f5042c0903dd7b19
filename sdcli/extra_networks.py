"""The files a prompt may name besides the model: LoRAs (A1111's `<lora:NAME:WEIGHT>` tags, looked up by
file name in the LoRA folders) and textual-inversion embeddings (their file name in the text).

Tags are taken out of the prompt before planning, as A1111 does before encoding, so a request holds the
text actually encoded and the LoRA files by path; a recipe then never depends on which folders were searched.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdcli.config import bundled_config_dir, sdcli_home
from sdcli.errors import RequestError
from sdcli.request import FileUse
from sdcli.text_limits import clip

# A1111's re_extra_net (<(\w+):([^>]+)>, e.g. <lora:name:0.8>), bounded and stopping at '<' so it scans linearly
EXTRA_NETWORK = re.compile(r"<(\w{1,64}):([^<>]{1,300})>")
LORA_KINDS = ("lora", "lyco")  # lyco: the LyCORIS extension's tag, the same files
NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # pickles among them need --allow-pickle


def default_folders(kind: str) -> list[Path]:
    """$SDCLI_HOME/<kind>, ./weights/<kind>, and the repository's weights/<kind> (kind: loras, embeddings)."""
    places = [sdcli_home() / kind, Path.cwd() / "weights" / kind, bundled_config_dir().parent / "weights" / kind]
    return list(dict.fromkeys(p.absolute() for p in places))


@dataclass(frozen=True)
class Library:
    """Where LoRA tags and embedding names are looked up: the folders asked for first, then the defaults;
    `embedding_files` are embeddings given one by one (--embedding)."""

    lora_dirs: tuple[Path, ...] = ()
    embedding_dirs: tuple[Path, ...] = ()
    embedding_files: tuple[Path, ...] = ()

    @functools.cached_property
    def loras(self) -> dict[str, Path]:
        """LoRA file stem (lower case) -> file; the first folder holding a name wins."""
        return _by_stem([*self.lora_dirs, *default_folders("loras")])

    @functools.cached_property
    def embeddings(self) -> dict[str, Path]:
        """Embedding name (file stem, lower case) -> file; --embedding files win over the folders'."""
        found = _by_stem([*self.embedding_dirs, *default_folders("embeddings")])
        return {**found, **{p.stem.lower(): p.absolute() for p in self.embedding_files}}

    def lora(self, name: str) -> Path:
        """The LoRA a tag names, by file name (with or without its suffix), or a one-line error."""
        stem = Path(name).stem if Path(name).suffix.lower() in NETWORK_SUFFIXES else name
        found = self.loras.get(stem.lower())
        if found is None:
            where = ", ".join(str(d) for d in [*self.lora_dirs, *default_folders("loras")])
            raise RequestError(f"<lora:{clip(name, 60, quote=False)}>: no such LoRA file in {where}")
        return found


def _by_stem(folders: Iterable[Path]) -> dict[str, Path]:
    """File stem (lower case) -> file, over the folders and their subfolders (as A1111 searches them), in
    order; the first file of a name wins, a missing folder is skipped."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in NETWORK_SUFFIXES and path.is_file():
                found.setdefault(path.stem.lower(), path.absolute())
    return found


def take_lora_tags(prompt: str, negative: str, library: Library) -> tuple[str, tuple[FileUse, ...]]:
    """The prompt without its `<lora:NAME[:WEIGHT]>` tags, and the LoRAs they name. Tags of other kinds
    (hypernetworks) are errors rather than text the encoder would read; so are LoRA tags in the negative,
    which A1111 leaves in the text too."""
    for match in EXTRA_NETWORK.finditer(negative):
        raise RequestError(f"negative prompt: {_shown(match)}: extra-network tags work in the prompt only")
    uses = []
    for match in EXTRA_NETWORK.finditer(prompt):
        kind, args = match.group(1), match.group(2).split(":")
        if kind not in LORA_KINDS:
            raise RequestError(f"{_shown(match)}: sdcli supports <lora:...> tags only, not <{clip(kind, 20)}:...>")
        if len(args) > 2 or not args[0].strip():
            raise RequestError(f"{_shown(match)}: expected <lora:NAME> or <lora:NAME:WEIGHT>")
        weight = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise RequestError(f"{_shown(match)}: the weight is not a number") from None
        uses.append(FileUse(str(library.lora(args[0].strip())), weight))
    return EXTRA_NETWORK.sub(lambda m: "" if m.group(1) in LORA_KINDS else m.group(0), prompt), tuple(uses)


def _shown(match: re.Match) -> str:
    return clip(match.group(0), 80, quote=False)


def lora_tag(use: FileUse) -> str:
    """The tag A1111 reads back for a LoRA use."""
    return f"<lora:{Path(use.file).stem}:{use.weight:g}>"


def embeddings_in(texts: Sequence[str], available: dict[str, Path]) -> tuple[FileUse, ...]:
    """The embeddings (lower-case name -> file) whose names the texts use, as words of CLIP's pre-tokenizer.
    The encoder matches names on token ids, as A1111 does; a file listed here that the tokens then do not
    trigger (a shorter name inside a longer one's) only costs a read."""
    from sdcli.embeddings import used_names  # the tokenizer's word pattern: only planning pays for it

    return tuple(FileUse(str(path)) for path in used_names(texts, available))


def locate(uses: Sequence[FileUse], found: dict[str, Path], what: str) -> tuple[FileUse, ...]:
    """Every file a request lists, where it is: its path, else a file of the same name in the folders (a
    recipe from another machine names its files), else a one-line error before any model loads."""
    located = []
    for use in uses:
        path = Path(use.file)
        if not path.is_file():
            other = found.get(path.stem.lower())
            if other is None:
                raise RequestError(f"{what} file not found: {clip(str(path), 120)}")
            use = dataclasses.replace(use, file=str(other))
        located.append(use)
    return tuple(located)


def describe(path: Path) -> str:
    """What a LoRA or embedding file is for, from its header alone (a pickle is not opened): the encoders a
    LoRA adapts, an embedding's vectors and width."""
    from sdcli.checkpoint import is_pickle, read_header
    from sdcli.errors import CheckpointError

    if is_pickle(path):
        return "pickle (read with --allow-pickle)"
    try:
        shapes = {key: info.shape for key, info in read_header(path).items()}
    except CheckpointError as exc:
        return f"unreadable: {clip(str(exc), 80, quote=False)}"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        return "LoRA for a model with two text encoders (SDXL)"
    if any(k.startswith(("lora_unet_", "unet.", "lora_te_", "text_encoder.")) for k in shapes):
        kind = "LoCon" if any(len(shape) == 4 and shape[2:] != (1, 1) for shape in shapes.values()) else "LoRA"
        if any(k.startswith(("lora_te_", "text_encoder.")) for k in shapes):
            return f"{kind} for a model with one text encoder (SD 1.x/2.x)"
        return f"{kind} of the U-Net only"
    vectors = [shape for shape in shapes.values() if len(shape) == 2]
    if vectors:
        return "embedding: " + ", ".join(f"{n} x {width}" for n, width in vectors)
    return "unknown"
