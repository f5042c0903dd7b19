"""One batch spread over many processes: torchrun's ranks and `--shard i/n` each render their own share.

Shares are dealt from the job alone (the prompt file, the options and the batch size), never from what is
on disk or from messages between processes, so the ranks need no process group, a rerun of one shard
resumes exactly its own images, and the union of all shares is the job. torchrun's ranks (RANK,
WORLD_SIZE) and `--shard` combine: shard i of n split over w ranks is share i + n*rank of n*w.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sdcli.errors import RequestError
from sdcli.jobs import Planned, batches

SHARD_PATTERN = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class Shard:
    """This process's share of a job."""

    index: int  # 0-based, below count
    count: int  # processes sharing the job
    local_rank: int | None = None  # torchrun's LOCAL_RANK: which GPU of this machine to use

    @property
    def label(self) -> str:
        return f"shard {self.index}/{self.count}"


WHOLE = Shard(0, 1)


def parse_shard(text: str) -> Shard:
    """`--shard i/n`: the i-th of n shares, counting from 0 (Slurm: --array=0-(n-1))."""
    match = SHARD_PATTERN.fullmatch(text.strip())
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise RequestError(f"--shard '{text}': expected i/n with 0 <= i < n, e.g. 0/4 ... 3/4")
    return Shard(int(match[1]), int(match[2]))


def current_shard(option: str | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """This process's share: from --shard, from torchrun's environment, or both combined."""
    shard = parse_shard(option) if option is not None else WHOLE
    if "WORLD_SIZE" not in environ:
        return shard
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    local = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else None
    if world < 1 or not 0 <= rank < world:
        raise RequestError(f"torchrun environment: RANK={rank} does not fit WORLD_SIZE={world}")
    return Shard(shard.index + shard.count * rank, shard.count * world, local)


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "0")
    if not re.fullmatch(r"\d+", value.strip()):
        raise RequestError(f"torchrun environment: {name}={value!r} is not a number")
    return int(value)


def share(planned: Sequence[Planned], shard: Shard, batch_size: int) -> list[Planned]:
    """The shard's images: the job's U-Net batches dealt out in turn, so each shard renders exactly the
    batches a single process would (equal pixels and metadata, whatever the number of shards)."""
    if shard.count == 1:
        return list(planned)
    mine = [group for j, group in enumerate(batches(planned, batch_size)) if j % shard.count == shard.index]
    return sorted((p for group in mine for p in group), key=lambda p: p.index)


def shard_device(requested: str, shard: Shard) -> str:
    """Under torchrun, `auto` and `cuda` mean this machine's GPU number LOCAL_RANK (wrapping round when
    there are more ranks than GPUs); an explicit `cuda:N`, `cpu` or `mps` is kept."""
    if shard.local_rank is None or requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
