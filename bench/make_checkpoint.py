"""Write a full-size random-weight checkpoint in the real single-file layout (for benchmarks and slow tests).

    python bench/make_checkpoint.py sd15|sd21-v|sdxl OUT.safetensors [--dtype fp16|bf16|fp32] [--seed N]
    python bench/make_checkpoint.py --family sdxl OUT.safetensors

sd15 / sd21-v give CompVis/Stability LDM files (cond_stage_model.*, schedule buffers, EMA counters); sdxl gives
sd_xl_base_1.0's sgm layout: every key and shape of the released file (tests/data/sdxl-keys.txt, 2515 tensors,
about 6.9 GB in fp16, position_ids int64). Tensors are streamed one at a time, so memory stays at the largest
(bigG's token embedding, 49408 x 1280).
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
FAMILIES = {"sd1": "sd15", "sd15": "sd15", "sd2": "sd21-v", "sd21-v": "sd21-v", "sdxl": "sdxl"}  # --family -> config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "config", nargs="?", help="bundled config name or YAML path: sd15, sd21-v, sd21-base, sdxl, ..."
    )
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="instead of a config: the family's bundled config")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weight dtype (default fp16)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.family is None):
        parser.error("give either a config name or --family (one of them)")
    config = load_config(args.config if args.config is not None else FAMILIES[args.family])
    layout = "sgm (SDXL)" if reference.is_sgm(config) else "LDM"
    start = time.perf_counter()
    path = reference.write_random_checkpoint(config, args.out, dtype=DTYPES[args.dtype], seed=args.seed)
    size = path.stat().st_size / 2**30
    count = len(reference.ldm_keys(config))
    seconds = time.perf_counter() - start
    print(f"{path}: {config.name}, {layout} layout, {count} tensors, {size:.2f} GiB in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
