"""sdcli: Stable Diffusion from the command line, pixel-exact with the reference implementation."""

import os

__version__ = "0.1.0"

# Ask torch's CPU allocator (read at its first allocation, so before torch is imported) to back tensors of
# 2 MiB and more with transparent huge pages: a model's fresh weights are otherwise faulted in 4 KiB at a
# time, most of an fp32 SDXL load (16.6 s -> 12.5 s on the 2-core VM, docs/performance.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
