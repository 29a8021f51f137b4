"""Cost measurement: exact parameter and FLOP counts, attention included, and timing structure."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from uniultra.evaluation.efficiency import (
    LatencyStats,
    count_flops,
    count_parameters,
    flops_by_op,
    measure_latency,
    measure_peak_rss,
    peak_rss_mb,
)


class SelfAttention(nn.Module):
    """Minimal multi-head self-attention built on F.scaled_dot_product_attention (as SAM2 is)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


def test_count_parameters_exact_with_frozen_and_tied_weights():
    linear = nn.Linear(10, 5)
    model = nn.Sequential(linear, nn.ReLU(), nn.Conv2d(3, 8, 3), linear)  # linear shared twice
    expected_linear, expected_conv = 10 * 5 + 5, 3 * 8 * 3 * 3 + 8
    assert count_parameters(model) == expected_linear + expected_conv
    model[2].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == expected_linear
    assert count_parameters(model) == expected_linear + expected_conv


def test_linear_flops_match_hand_formula():
    batch, tokens, c_in, c_out = 2, 7, 12, 5
    layer = nn.Linear(c_in, c_out)
    assert count_flops(layer, torch.randn(batch, tokens, c_in)) == 2 * batch * tokens * c_in * c_out


def test_conv2d_flops_match_hand_formula():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 11)
    h_out, w_out = (9 + 2 - 3) // 2 + 1, (11 + 2 - 3) // 2 + 1
    expected = 2 * 2 * 6 * h_out * w_out * (4 // 2) * 3 * 3
    assert count_flops(lambda: conv(x)) == expected


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.inference_mode])
def test_cpu_attention_formula_equals_math_backend(grad_mode):
    torch.manual_seed(0)
    batch, tokens, dim, heads = 2, 16, 32, 4
    block, x = SelfAttention(dim, heads), torch.randn(batch, tokens, dim)
    with grad_mode():
        fused = flops_by_op(block, x)
        with sdpa_kernel(SDPBackend.MATH):
            math_backend = flops_by_op(block, x)
    # The fused CPU kernel really ran (and was counted), the math backend did plain bmm.
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in fused
    assert "aten.bmm" in math_backend
    attention = 2 * batch * heads * tokens * tokens * (2 * dim // heads)
    projections = 2 * batch * tokens * dim * (3 * dim + dim)
    assert fused["aten._scaled_dot_product_flash_attention_for_cpu"] == attention > 0
    assert sum(fused.values()) == sum(math_backend.values()) == projections + attention


def test_grouped_query_and_cross_attention_match_math_backend():
    q, k, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 8)

    def attend():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    with sdpa_kernel(SDPBackend.MATH):
        reference = count_flops(attend)
    assert count_flops(attend) == reference == 2 * 2 * 8 * 10 * 24 * (16 + 8)


def test_attention_backward_counts_the_flash_recomputation():
    batch, heads, length, head_dim = 2, 2, 12, 8
    q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    fused = count_flops(step)
    with sdpa_kernel(SDPBackend.MATH):
        math_backend = count_flops(step)
    # Same forward; flash backward recomputes Q @ K^T, which the math backend kept.
    assert fused - math_backend == 2 * batch * heads * length * length * head_dim


def test_multihead_attention_fast_path_is_counted():
    batch, tokens, dim, heads = 2, 10, 32, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    x = torch.randn(batch, tokens, dim)
    with torch.inference_mode():  # where the fused fast path would hide everything
        flops = count_flops(mha, x, x, x, need_weights=False)
    expected = 2 * batch * tokens * dim * 4 * dim + 2 * batch * heads * tokens * tokens * 2 * (dim // heads)
    assert flops == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_fused_kernel_without_formula_is_refused():
    dim, heads = 16, 2
    x = torch.randn(1, 5, dim)
    weights = (torch.randn(3 * dim, dim), torch.zeros(3 * dim), torch.randn(dim, dim), torch.zeros(dim))
    with pytest.raises(RuntimeError, match="not counted"):
        count_flops(lambda: torch._native_multi_head_attention(x, x, x, dim, heads, *weights))


def test_measure_latency_structure_threads_and_inference_mode():
    calls, inference_flags = [], []

    def work():
        calls.append(1)
        inference_flags.append(torch.is_inference_mode_enabled())
        return torch.ones(64, 64) @ torch.ones(64, 64)

    threads_before = torch.get_num_threads()
    stats = measure_latency(work, warmup=2, repeats=5, threads=1, inference_mode=True, items_per_call=4)
    assert isinstance(stats, LatencyStats)
    assert len(calls) == 7 and all(inference_flags)
    assert len(stats.samples_ms) == 5 and stats.threads == 1 and stats.warmup == 2
    assert stats.min_ms <= stats.p10_ms <= stats.p25_ms <= stats.median_ms <= stats.p75_ms <= stats.p90_ms
    assert stats.iqr_ms >= 0 and stats.mean_ms > 0
    assert stats.throughput == pytest.approx(4 * 1000.0 / stats.median_ms)
    assert "median" in stats.summary()
    assert torch.get_num_threads() == threads_before


def test_measure_latency_restores_threads_on_error_and_validates():
    threads_before = torch.get_num_threads()

    def broken():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        measure_latency(broken, threads=1)
    assert torch.get_num_threads() == threads_before
    with pytest.raises(ValueError):
        measure_latency(lambda: None, repeats=0)


def test_peak_rss_in_process_and_in_fresh_subprocess():
    assert peak_rss_mb() > 0
    # bytes * n writes every byte, so the pages are really resident (unlike a lazy calloc).
    result = measure_peak_rss(functools.partial(operator.mul, b"\x01", 64 * 1024 * 1024))
    assert result.baseline_mb > 0
    assert 60 <= result.work_mb < 200
    # What the work prints cannot corrupt the result; its failure is reported, not hidden.
    assert measure_peak_rss(functools.partial(print, "chatty")).work_mb >= 0
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        measure_peak_rss(functools.partial(operator.truediv, 1, 0))
