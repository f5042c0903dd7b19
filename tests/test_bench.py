"""The benchmark itself, on a tiny model: both tools measured, the ratio and share of peak computed, the
table printed and the JSON written. Full-size figures come from `make bench` (docs/performance.md)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_smoke_benchmark_measures_both_tools(tmp_path):
    out = tmp_path / "results.json"
    rows = ["unet_fp32", "vae_small", "vae_small_rss", "lora_switch"]
    ran = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--only", *rows, "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [row["name"] for row in results["rows"]] == rows
    for row in results["rows"]:
        assert row["sdcli"] > 0 and row["diffusers"] > 0, row
        assert abs(row["ratio"] - row["sdcli"] / row["diffusers"]) < 1e-9
        assert row["label"] in ran.stdout
    unet, vae, vae_rss, lora = results["rows"]
    assert unet["unit"] == vae["unit"] == lora["unit"] == "s" and vae_rss["unit"] == "GiB"
    assert lora["raw"]["sdcli"]["copies_gib"] > 0  # the weights a LoRA set touched, kept to restore them
    for row in (unet, vae):  # FLOPs of the call over the matmul peak measured in the same run
        peak = results["peak_flops"]["fp32"]
        assert abs(row["share_of_peak"]["sdcli"] - row["flops"] / row["sdcli"] / peak) < 1e-9
