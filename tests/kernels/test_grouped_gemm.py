"""Grouped GEMM kernels (Triton interpreter) against the per-expert loop of matmuls, forward and backward.

Legend: N rows (sorted by expert), K in features, M out features, E experts; counts[e] rows for expert e.
"""

import pytest
import torch
from kernel_compare import LOW_PRECISION, assert_kernel_matches

from dtensor_plus.kernels import use_kernels
from dtensor_plus.kernels.grouped_gemm import grouped_mm, grouped_mm_reference


def _xw(num_rows, k, m, num_experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_NK = torch.randn(num_rows, k, generator=g).to(dtype).requires_grad_()
    w_EKM = torch.randn(num_experts, k, m, generator=g).to(dtype).requires_grad_()
    return x_NK, w_EKM


# counts: uneven with an expert of no rows and a group over one block of 16 rows; all rows on one expert
# ([7, 0, 14] runs in the low-precision test)
@pytest.mark.parametrize("counts", [[3, 17, 1, 0], [0, 0, 9]])
def test_grouped_mm_matches_reference(counts):
    x_NK, w_EKM = _xw(sum(counts), 19, 17, len(counts), torch.float32)
    assert_kernel_matches(lambda x, w: grouped_mm(x, w, counts), [x_NK, w_EKM], kernel="grouped_mm",
                          dtype=torch.float32, scale=4)  # sums of 19 products: rounding order differs


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_grouped_mm_low_precision(dtype):
    x_NK, w_EKM = _xw(21, 19, 17, 3, dtype)
    assert_kernel_matches(lambda x, w: grouped_mm(x, w, torch.tensor([7, 0, 14])), [x_NK, w_EKM],
                          kernel="grouped_mm", dtype=dtype)


def test_reference_is_a_loop_of_matmuls():
    x_NK, w_EKM = _xw(5, 3, 4, 2, torch.float32)
    want = torch.cat([x_NK[:2] @ w_EKM[0], x_NK[2:] @ w_EKM[1]])
    torch.testing.assert_close(grouped_mm_reference(x_NK, w_EKM, [2, 3]), want)
    torch.testing.assert_close(grouped_mm(x_NK, w_EKM, torch.tensor([2, 3])), want)  # auto on CPU: reference


def test_no_rows():
    x_NK, w_EKM = _xw(0, 3, 4, 2, torch.float32)
    with use_kernels(True):
        y = grouped_mm(x_NK, w_EKM, [0, 0])
        (dw,) = torch.autograd.grad(y.sum(), w_EKM)
    assert y.shape == (0, 4) and torch.equal(dw, torch.zeros_like(w_EKM))


def test_bad_counts_name_the_fix():
    x_NK, w_EKM = _xw(5, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"sum to 4, but x has 5 rows"):
        grouped_mm(x_NK, w_EKM, [2, 2])
    with pytest.raises(ValueError, match="3 counts for 2 experts"):
        grouped_mm(x_NK, w_EKM, [2, 2, 1])
    with pytest.raises(TypeError, match="cast one of them"):
        grouped_mm(x_NK, w_EKM.double(), [2, 3])
