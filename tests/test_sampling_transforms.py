"""User-level grid sampling, embedding bags, CTC and margin losses under every transform.

forward_ad, jvp, jacfwd, Hessian-vector products and full Hessians
(forward-over-reverse), vmap of jvp, jvp of vmap, nested jvp, and reverse
mode through the JVP. Each case is a function of one flat tensor (image and
grid, or weight and per-sample weights, packed together). References are
central finite differences in float64, or PyTorch's own reverse mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_forward_ad_and_jvp, close, fd
from torch.func import grad, hessian, jacfwd, jvp, vmap

pytestmark = pytest.mark.usefixtures("enabled")
f64 = torch.float64
_gen = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(shape, dtype=f64, generator=_gen)


def _uniform(*shape, bound=1.0):
    return (torch.rand(shape, dtype=f64, generator=_gen) * 2 - 1) * bound


def _split(x, *shapes):
    parts, start = [], 0
    for shape in shapes:
        count = int(torch.Size(shape).numel())
        parts.append(x[start : start + count].reshape(shape))
        start += count
    return parts


IMAGE = _randn(1, 2, 4, 5)
GRID = _uniform(1, 3, 2, 2, bound=1.3)
VOLUME = _randn(1, 2, 3, 3, 4)
GRID_3D = _uniform(1, 2, 1, 2, 3, bound=1.2)
INDICES, OFFSETS = torch.tensor([1, 2, 4, 5, 4, 3, 2, 0]), torch.tensor([0, 3, 3, 6])
TARGETS = torch.tensor([[1, 2, 2], [3, 1, 0]])
LABELS = torch.tensor([1, 0, 3])
MULTILABELS = torch.tensor([[3, 0, -1, 1], [1, 2, 2, -1], [0, -1, 0, 0]])
MARGIN_WEIGHT = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=f64)


def _grid_sample(mode, padding, align_corners):
    def f(x):
        image, grid = _split(x, IMAGE.shape, GRID.shape)
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=align_corners)

    return f, torch.cat([IMAGE.flatten(), GRID.flatten()])


def _grid_sample_3d(x):
    volume, grid = _split(x, VOLUME.shape, GRID_3D.shape)
    return F.grid_sample(volume, grid, padding_mode="reflection", align_corners=False)


def _embedding_bag_weighted(x):
    weight, psw = _split(x, (6, 3), (8,))
    return F.embedding_bag(INDICES, weight, OFFSETS, mode="sum", per_sample_weights=psw)


BAG_MODULE = torch.nn.EmbeddingBag(6, 3, mode="mean", padding_idx=4, dtype=f64)


def _embedding_bag_module(x):
    return torch.func.functional_call(BAG_MODULE, {"weight": x.reshape(6, 3)}, (INDICES, OFFSETS))


def _embedding_bag_max_2d(x):
    return F.embedding_bag(INDICES.reshape(4, 2), x.reshape(6, 3), mode="max")


def _ctc_mean(x):
    lengths = torch.tensor([5, 4]), torch.tensor([3, 2])
    return F.ctc_loss(x.reshape(5, 2, 4).log_softmax(-1), TARGETS, *lengths)


def _ctc_sum_concatenated(x):
    targets = torch.tensor([1, 3, 3, 0])  # blank is 2
    return F.ctc_loss(x.reshape(5, 2, 4).log_softmax(-1), targets, [5, 5], [3, 1], blank=2, reduction="sum")


def _multi_margin(p, reduction):
    def f(x):
        return F.multi_margin_loss(x.reshape(3, 4), LABELS, p=p, weight=MARGIN_WEIGHT, reduction=reduction)

    return f


def _multilabel(x):
    return F.multilabel_margin_loss(x.reshape(3, 4), MULTILABELS, reduction="none")


CASES = {
    "grid_sample bilinear zeros": _grid_sample("bilinear", "zeros", False),
    "grid_sample bilinear border align": _grid_sample("bilinear", "border", True),
    "grid_sample bicubic reflection": _grid_sample("bicubic", "reflection", False),
    "grid_sample nearest": _grid_sample("nearest", "zeros", False),
    "grid_sample 3d reflection": (_grid_sample_3d, torch.cat([VOLUME.flatten(), GRID_3D.flatten()])),
    "embedding_bag sum per_sample_weights": (_embedding_bag_weighted, torch.cat([_randn(18), _uniform(8)])),
    "nn.EmbeddingBag mean padding_idx": (_embedding_bag_module, _randn(18)),
    "embedding_bag max 2-D input": (_embedding_bag_max_2d, _randn(18)),
    "ctc_loss mean": (_ctc_mean, _randn(40)),
    "ctc_loss sum concatenated blank=2": (_ctc_sum_concatenated, _randn(40)),
    "multi_margin_loss p=1": (_multi_margin(1, "none"), _randn(12)),
    "multi_margin_loss p=2": (_multi_margin(2, "mean"), _randn(12)),
    "multilabel_margin_loss": (_multilabel, _randn(12)),
}
NAMES = pytest.mark.parametrize("name", list(CASES))


def _case(name):
    f, x = CASES[name]
    return f, x.clone()


@NAMES
def test_forward_ad_and_jvp(name):
    f, x = _case(name)
    assert_forward_ad_and_jvp(f, x, _randn(*x.shape))


@NAMES
def test_jacfwd_matches_reverse_jacobian(name):
    f, x = _case(name)
    close(jacfwd(f)(x), torch.autograd.functional.jacobian(f, x))


def _scalar(f):
    return lambda x: (f(x) ** 2).sum()


@NAMES
def test_hessian_vector_product_forward_over_reverse(name):
    f, x = _case(name)
    v = _randn(*x.shape)
    gradient = grad(_scalar(f))
    _, hvp = jvp(gradient, (x,), (v,))
    close(hvp, fd(gradient, x, v, eps=1e-5), 1e-5)


@pytest.mark.parametrize(
    "name", ["grid_sample bicubic reflection", "embedding_bag sum per_sample_weights", "ctc_loss mean"]
)
def test_full_hessian(name):
    f, x = _case(name)
    scalar = _scalar(f)
    H = hessian(scalar)(x)
    gradient = grad(scalar)
    columns = [fd(gradient, x, e, eps=1e-5) for e in torch.eye(x.numel(), dtype=f64)]
    close(H, torch.stack(columns, 1), 1e-5)


@NAMES
def test_vmap_of_jvp(name):
    f, x = _case(name)
    vs = _randn(3, *x.shape)
    batched = vmap(lambda v: jvp(f, (x,), (v,))[1])(vs)
    for i in range(3):
        close(batched[i], fd(f, x, vs[i]))


@NAMES
def test_jvp_of_vmap(name):
    f, x = _case(name)
    xs = x + 0.01 * _randn(2, *x.shape)
    vs = _randn(2, *x.shape)
    _, tangent = jvp(vmap(f), (xs,), (vs,))
    for i in range(2):
        close(tangent[i], fd(f, xs[i], vs[i]))


@NAMES
def test_nested_jvp_second_directional_derivative(name):
    f, x = _case(name)
    u, w = _randn(*x.shape), _randn(*x.shape)

    def directional(z):
        return jvp(f, (z,), (u,))[1]

    _, second = jvp(directional, (x,), (w,))
    close(second, fd(directional, x, w, eps=1e-5), 1e-5)


@NAMES
def test_reverse_mode_through_the_jvp(name):
    """A loss of the JVP output, backpropagated (consistency training)."""
    f, x = _case(name)
    v = _randn(*x.shape)

    def loss(z):
        return (jvp(f, (z,), (v,))[1] ** 2).sum()

    leaf = x.clone().requires_grad_()
    value = loss(leaf)
    # a JVP that does not depend on the point (max mode) has no graph: its gradient is zero
    gradient = torch.autograd.grad(value, leaf)[0] if value.requires_grad else torch.zeros_like(x)
    directions = torch.eye(x.numel(), dtype=f64)
    close(gradient, torch.stack([fd(loss, x, d, eps=1e-5) for d in directions]), 1e-5)
