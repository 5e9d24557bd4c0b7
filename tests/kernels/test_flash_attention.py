"""Flash attention kernels (Triton interpreter): (out, lse) and the gradients of both against the torch
reference, causal and not, GQA, sequence lengths that are not multiples of the interpreter's block of 16.

Legend: B batch, H query heads, HKV kv heads, TQ / TK query / key lengths, D head dim.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_compare import LOW_PRECISION, assert_kernel_matches

from dtensor_plus.kernels import flash_attention as fa


def _qkv(b, h, hkv, tq, tk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype).requires_grad_()
    return q, k, v


CASES = [  # (B, H, HKV, TQ, TK, D, causal)
    (2, 4, 2, 9, 9, 16, True),  # GQA: two query heads per kv head
    (1, 3, 1, 5, 7, 8, True),   # TQ < TK, one kv head for all (MQA)
    (1, 2, 1, 19, 6, 12, False),  # TQ over one block, TK under, D not a power of two
    (1, 2, 2, 18, 18, 8, True),  # two blocks on the diagonal
]


@pytest.mark.parametrize("b, h, hkv, tq, tk, d, causal", CASES)
def test_flash_attention_matches_reference(b, h, hkv, tq, tk, d, causal):
    assert_kernel_matches(lambda q, k, v: fa.flash_attention(q, k, v, causal=causal),
                          _qkv(b, h, hkv, tq, tk, d, torch.float32), kernel="flash_attention", dtype=torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_flash_attention_low_precision(dtype):
    assert_kernel_matches(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, scale=0.3),
                          _qkv(1, 4, 2, 9, 9, 16, dtype), kernel="flash_attention", dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_torch_sdpa(causal):
    q, k, v = _qkv(2, 4, 2, 7, 7, 8, torch.float32)
    out, lse = fa.flash_attention_reference(q, k, v, causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(out, want)
    kk = k.repeat_interleave(2, dim=1)
    scores = q @ kk.transpose(-2, -1) / math.sqrt(8)
    if causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).tril().logical_not(), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))


def test_heads_that_do_not_divide_name_the_fix():
    q, k, v = _qkv(1, 3, 2, 4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="2 kv heads must divide 3 query heads"):
        fa.flash_attention(q, k, v)
