"""A forward tangent on ``attn_mask`` goes through fwdecomp's CPU attention decomposition.

Found by tests/test_opinfo.py (--run-slow, OpInfo's sdpa samples with a mask requiring grad): the
decomposition detached the mask and returned a zero tangent, a silently wrong answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fwdecomp


def test_mask_tangent_matches_finite_differences_and_reverse_mode(enabled):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    mask, direction = (torch.randn(4, 4, dtype=torch.float64, generator=gen) for _ in range(2))

    def f(m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    _, tangent = torch.func.jvp(f, (mask,), (direction,))
    eps = 1e-6
    torch.testing.assert_close(tangent, (f(mask + eps * direction) - f(mask - eps * direction)) / (2 * eps))
    fwdecomp.disable()  # reverse mode: a mask requiring grad takes PyTorch's math path
    jacobian = torch.autograd.functional.jacobian(f, mask)
    torch.testing.assert_close(tangent, torch.einsum("...ij,ij->...", jacobian, direction))
