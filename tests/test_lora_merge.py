"""The merger's copies for exact restore: the narrowest float type that gives each weight back bit for bit."""

from __future__ import annotations

import torch

from sdcli.lora import compact_copy


def test_weights_from_an_fp16_file_are_kept_in_fp16():
    weight = torch.randn(64, 32).half().float()
    copy = compact_copy(weight)
    assert copy.dtype == torch.float16 and torch.equal(copy.float(), weight)


def test_weights_from_a_bf16_file_are_kept_in_bf16():
    weight = (torch.randn(64, 32) * 1e6).bfloat16().float()  # beyond fp16's range
    copy = compact_copy(weight)
    assert copy.dtype == torch.bfloat16 and torch.equal(copy.float(), weight)


def test_other_weights_are_copied_whole():
    weight = torch.randn(64, 32)
    weight[0, 0] = float("nan")
    copy = compact_copy(weight)
    assert copy.dtype == torch.float32 and copy.data_ptr() != weight.data_ptr()
    assert torch.equal(copy[1:], weight[1:]) and copy[0, 0].isnan()
    half = torch.randn(8).half()
    assert compact_copy(half).dtype == torch.float16  # nothing narrower is tried
