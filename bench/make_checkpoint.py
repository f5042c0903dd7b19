"""Write a full-size random-weight checkpoint in the real single-file layout (for benchmarks and slow tests).

    python bench/make_checkpoint.py sd15|sd21-v OUT.safetensors [--dtype fp16|bf16|fp32] [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sdcli.config import load_config  # noqa: E402

import reference  # noqa: E402  (tests/ holds the reference toolkit)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="bundled config name or YAML path: sd15, sd21-v, sd21-base, ...")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weight dtype (default fp16)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    start = time.perf_counter()
    path = reference.write_random_checkpoint(config, args.out, dtype=DTYPES[args.dtype], seed=args.seed)
    size = path.stat().st_size / 2**30
    print(f"{path}: {len(reference.ldm_keys(config))} tensors, {size:.2f} GiB in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
