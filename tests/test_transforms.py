"""User-level paths under every transform: forward_ad, jvp, jacfwd, hessian, vmap,
nested levels, and reverse mode through the decomposed path.

References are central finite differences in float64 (of the function, of its
JVP, or of its gradient), never fwdecomp's own forward path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_forward_ad_and_jvp, close, fd
from torch.func import grad, hessian, jacfwd, jvp, vmap

import fwdecomp

pytestmark = pytest.mark.usefixtures("backend", "enabled")
f64 = torch.float64


def randn(*shape, dtype=f64):
    return torch.randn(shape, dtype=dtype)


def _spd_sym(A):
    S = (A + A.mT) / 2
    root = torch.linalg.matrix_exp(S * 0.1)
    return root @ root.mT + torch.eye(A.shape[-1], dtype=A.dtype)


# Fixed, not drawn from the global generator: its state at import depends on what the worker imported first.
_constants = torch.Generator().manual_seed(1)
Y = torch.randn(4, 3, dtype=f64, generator=_constants)
Y30 = torch.randn(27, 3, dtype=f64, generator=_constants)
FUNCTIONS = {
    "cdist p=1": lambda x: torch.cdist(x, Y, p=1),
    "cdist p=2": lambda x: torch.cdist(x, Y),
    "cdist p=2 matmul route": lambda x: torch.cdist(torch.cat([x] * 6), Y30),
    "cdist p=3.5": lambda x: torch.cdist(x, Y, p=3.5),
    "cdist p=inf": lambda x: torch.cdist(x, Y, p=math.inf),
    "cdist p=0.5": lambda x: torch.cdist(x, Y, p=0.5),
    "pdist p=2": lambda x: torch.pdist(x),
    "pdist p=1.5": lambda x: torch.pdist(x, p=1.5),
    "cholesky lower": lambda x: torch.cholesky(_spd_sym(x[:3, :3])),
    "cholesky upper": lambda x: torch.cholesky(_spd_sym(x[:3, :3]), upper=True),
    "attention": lambda x: F.scaled_dot_product_attention(
        x.reshape(1, 1, 5, 3), Y.reshape(1, 1, 4, 3), Y.reshape(1, 1, 4, 3).flip(-1)
    ),
    "attention causal + mask": lambda x: F.scaled_dot_product_attention(
        x.reshape(1, 1, 5, 3),
        Y.reshape(1, 1, 4, 3),
        Y.reshape(1, 1, 4, 3),
        attn_mask=torch.linspace(-1, 1, 20, dtype=f64).reshape(5, 4),
        scale=0.7,
    ),
}
CASES = pytest.mark.parametrize("name", list(FUNCTIONS))


@CASES
def test_forward_ad_and_jvp(name):
    assert_forward_ad_and_jvp(FUNCTIONS[name], randn(5, 3), randn(5, 3))


@CASES
def test_jacfwd_matches_reverse_jacobian(name):
    f = FUNCTIONS[name]
    x = randn(5, 3)
    forward = jacfwd(f)(x)
    reverse = torch.autograd.functional.jacobian(f, x)  # no vmap: see README on jacrev + cdist
    close(forward, reverse)


@CASES
def test_hessian_vector_product_forward_over_reverse(name):
    def scalar(x):
        return (FUNCTIONS[name](x) ** 2).sum()

    x, v = randn(5, 3), randn(5, 3)
    expected = fd(lambda z: torch.func.grad(scalar)(z), x, v, eps=1e-5)
    _, hvp = jvp(grad(scalar), (x,), (v,))
    close(hvp, expected, 1e-5)


@pytest.mark.parametrize("name", ["cdist p=2", "cdist p=3.5", "pdist p=1.5", "cholesky lower", "attention"])
def test_full_hessian(name):
    def scalar(x):
        return (FUNCTIONS[name](x) ** 2).sum()

    x = randn(5, 3)
    H = hessian(scalar)(x)
    gradient = torch.func.grad(scalar)
    columns = [fd(gradient, x, e.reshape(5, 3), eps=1e-5) for e in torch.eye(15, dtype=f64)]
    close(H.reshape(15, 15), torch.stack([c.reshape(15) for c in columns], 1), 1e-5)


@CASES
def test_vmap_of_jvp(name):
    f = FUNCTIONS[name]
    x, vs = randn(5, 3), randn(4, 5, 3)
    batched = vmap(lambda v: jvp(f, (x,), (v,))[1])(vs)
    for i in range(4):
        close(batched[i], fd(f, x, vs[i]))


@CASES
def test_jvp_of_vmap(name):
    f = FUNCTIONS[name]
    xs, vs = randn(3, 5, 3), randn(3, 5, 3)
    _, tangent = jvp(vmap(f), (xs,), (vs,))
    for i in range(3):
        close(tangent[i], fd(f, xs[i], vs[i]))


@CASES
def test_nested_jvp_second_directional_derivative(name):
    f = FUNCTIONS[name]
    x, u, w = randn(5, 3), randn(5, 3), randn(5, 3)

    def directional(z):
        return jvp(f, (z,), (u,))[1]

    _, second = jvp(directional, (x,), (w,))
    close(second, fd(directional, x, w, eps=1e-5), 1e-5)


@CASES
def test_reverse_mode_through_the_jvp(name):
    """What consistency training does: a loss of the JVP output, backpropagated."""
    f = FUNCTIONS[name]
    x, v = randn(5, 3), randn(5, 3)

    def loss(z):
        return (jvp(f, (z,), (v,))[1] ** 2).sum()

    x_leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss(x_leaf), x_leaf)
    directions = torch.eye(15, dtype=f64).reshape(15, 5, 3)
    expected = torch.stack([fd(loss, x, d, eps=1e-5) for d in directions]).reshape(5, 3)
    close(gradient, expected, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_attention_against_float64(causal):
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    tq, tk, tv = (torch.randn(2, 4, 16, 8) for _ in range(3))

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    _, t32 = jvp(attend, (q, k, v), (tq, tk, tv))
    fwdecomp.disable()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, t64 = jvp(attend, tuple(t.double() for t in (q, k, v)), tuple(t.double() for t in (tq, tk, tv)))
    fwdecomp.enable()
    assert t32.dtype == torch.float32
    assert ((t32.double() - t64).norm() / t64.norm()).item() < 1e-5


def test_boolean_attention_mask():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=f64) for _ in range(3))
    mask = torch.rand(6, 6) > 0.3
    mask.fill_diagonal_(True)

    def attend(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    tq = torch.randn_like(q)
    close(jvp(attend, (q,), (tq,))[1], fd(attend, q, tq))


def test_plain_calls_unchanged_with_requires_grad():
    x = randn(5, 3).requires_grad_()
    out = torch.cdist(x, Y, p=3.5)
    assert out.grad_fn.name() == "CdistBackward0"
