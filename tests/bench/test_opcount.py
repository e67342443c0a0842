"""The op recorder on small modules whose FLOPs and bytes are known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcgen_quant.bench import opcount


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 96)

    def forward(self, x):  # x [B=1, S=16, 64]
        q, k, v = self.proj(x).view(1, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)  # views: free
        o = nn.functional.scaled_dot_product_attention(q, k, v)  # [1, 2, 16, 16]
        return torch.relu(o)


def test_linear_sdpa_elementwise_counts():
    x = torch.randn(1, 16, 64)
    ops = opcount.trace(lambda: _Block()(x))
    by_name = {op.name: op for op in ops}
    assert [op.component for op in ops if op.name in ("addmm", "sdpa", "relu")] == [
        "linear", "attention", "other",
    ]  # fmt: skip
    mm = by_name["addmm"]
    assert mm.flops == 2 * 16 * 64 * 96
    assert mm.bytes == 4 * (16 * 64 + 96 * 64 + 96 + 16 * 96)  # x, W, b, y (float32)
    attn = by_name["sdpa"]
    assert attn.flops == 4 * 2 * 16 * 16 * 16
    # q, k, v are views into one [16, 96] tensor, each counted at its own size; o like q
    assert attn.bytes == 4 * 4 * (2 * 16 * 16)
    relu = by_name["relu"]
    assert relu.flops == 0 and relu.bytes == 2 * 4 * (2 * 16 * 16)
    assert not any(op.name in ("view", "permute", "t", "unbind", "select") for op in ops)


def test_matmul_inside_attention_module_is_attention():
    class LinearAttention(nn.Module):  # name contains "Attention", like SANA's / DC-AE's
        def __init__(self):
            super().__init__()
            self.to_qkv = nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
            return (q @ (k.transpose(-1, -2) @ v)).relu()

    ops = opcount.trace(lambda: LinearAttention()(torch.randn(2, 8, 32)))
    comps = [(op.name, op.component) for op in ops if op.kind == "mm"]
    assert comps[0][1] == "linear"
    assert [c for _, c in comps[1:]] == ["attention", "attention"]
    summary = opcount.summarize(ops)
    # k^T v: [2, 32, 8] x [2, 8, 32]; q (k^T v): [2, 8, 32] x [2, 32, 32]; 2 FLOPs per MAC
    assert summary["attention"]["flops"] == 2 * (2 * 2 * 32 * 8 * 32)


def test_meta_trace_runs_no_math_for_sdpa():
    q = torch.empty(1, 4, 100_000, 64, device="meta")
    ops = opcount.trace(lambda: nn.functional.scaled_dot_product_attention(q, q, q))
    assert len(ops) == 1 and ops[0].kind == "attn"
    assert ops[0].flops == pytest.approx(4 * 4 * 100_000**2 * 64)
    assert ops[0].tiles == 4 * -(-100_000 // 128)
