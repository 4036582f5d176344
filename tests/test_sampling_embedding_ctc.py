"""Grid samplers, embedding bags, CTC and margin losses: values, conventions and input rules.

The generic tests (tests/test_decompositions.py) check every sample against
finite differences away from non-smooth points. Here: the outputs (integer
ones included) equal PyTorch's kernels; at ties, kinks, borders and
impossible alignments the forward tangent equals reverse mode's ``J v``
(PyTorch's one-sided convention); the documented deviations (CTC's
reverse-mode convention, ``scale_grad_by_freq``) are what the docstrings say;
bad input raises as in PyTorch.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fwdecomp
from fwdecomp.checks import differentiable_positions
from fwdecomp.contract import DecompositionError

aten = torch.ops.aten
f64 = torch.float64
MODULES = ("sampling", "embedding", "ctc", "loss_margin")


def _my_operators():
    for op in fwdecomp.registry.operators():
        entry = fwdecomp.registry.lookup(op)
        if entry.fn.__module__.rsplit(".", 1)[-1] in MODULES:
            yield op


def _value_cases():
    for op in _my_operators():
        entry = fwdecomp.registry.lookup(op)
        for dtype in entry.dtypes:
            for index, sample in enumerate(entry.samples("cpu", dtype)):
                yield pytest.param(op, dtype, index, id=f"{op}-{str(dtype)[6:]}-{index}-{sample.note}")


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("op, dtype, index", list(_value_cases()))
def test_outputs_equal_the_kernel(enabled, op, dtype, index):
    """What the decomposition returns (with tangents) equals what PyTorch's kernel returns (without)."""
    sample = list(fwdecomp.registry.lookup(op).samples("cpu", dtype))[index]
    expected = _as_tuple(op(*sample.args, **sample.kwargs))
    args = list(sample.args)
    with forward_ad.dual_level():
        for i in differentiable_positions(sample):
            args[i] = forward_ad.make_dual(args[i], torch.randn_like(args[i]))
        got = [
            forward_ad.unpack_dual(t).primal if t is not None else None for t in _as_tuple(op(*args, **sample.kwargs))
        ]
    assert len(got) == len(expected)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for value, want in zip(got, expected):
        if want is None:
            assert value is None
            continue
        assert value.shape == want.shape and value.dtype == want.dtype
        if want.is_floating_point():
            torch.testing.assert_close(value, want, equal_nan=True, **tolerance)
        else:
            assert torch.equal(value, want)


def _reverse_jvp(f, primals, tangents):
    """``J v`` from reverse mode (PyTorch's kernels), without vmap."""
    jacobians = torch.autograd.functional.jacobian(f, primals)
    out = f(*primals)
    total = torch.zeros(out.numel(), dtype=out.dtype)
    for block, tangent in zip(jacobians, tangents):
        total += block.reshape(out.numel(), -1) @ tangent.reshape(-1)
    return total.reshape(out.shape)


def _forward_jvp(f, primals, tangents):
    return torch.func.jvp(f, primals, tangents)[1]


# --- grid samplers -------------------------------------------------------


def _grid_from_pixels(pixels, sizes, align_corners):
    """Normalised grid coordinates that unnormalise to exactly the given pixel coordinates."""
    sizes = torch.tensor(sizes, dtype=f64)
    if align_corners:
        return pixels / ((sizes - 1) / 2) - 1
    return (2 * pixels + 1) / sizes - 1


# integers (tap boundaries), half-integers (nearest rounding), borders, beyond the borders
_SPECIAL = [-1.7, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5, 3.0, 3.5, 4.0, 4.6]


@pytest.mark.parametrize("mode, padding, align_corners", list(itertools.product((0, 1, 2), (0, 1, 2), (False, True))))
def test_grid_sampler_2d_borders_and_cell_edges_follow_reverse_mode(enabled, mode, padding, align_corners):
    image = torch.randn(1, 2, 4, 5, dtype=f64)
    pixels = torch.tensor(list(itertools.product(_SPECIAL, _SPECIAL)), dtype=f64).flip(-1)  # (x, y)
    grid = _grid_from_pixels(pixels, (5, 4), align_corners).reshape(1, -1, 1, 2)
    tangents = (torch.randn_like(image), torch.randn_like(grid))

    def f(image, grid):
        return aten.grid_sampler_2d(image, grid, mode, padding, align_corners)

    forward = _forward_jvp(f, (image, grid), tangents)
    torch.testing.assert_close(forward, _reverse_jvp(f, (image, grid), tangents), rtol=1e-10, atol=1e-10)
    if mode == 1:
        assert torch.equal(
            _forward_jvp(f, (image, grid), (torch.zeros_like(image), tangents[1])), torch.zeros_like(forward)
        )


@pytest.mark.parametrize("mode, padding", list(itertools.product((0, 1), (0, 1, 2))))
def test_grid_sampler_3d_borders_and_cell_edges_follow_reverse_mode(enabled, mode, padding):
    image = torch.randn(1, 2, 3, 4, 5, dtype=f64)
    special = [-1.0, 0.0, 1.5, 2.0, 4.0]
    pixels = torch.tensor(list(itertools.product(special, special, special)), dtype=f64).flip(-1)  # (x, y, z)
    grid = _grid_from_pixels(pixels, (5, 4, 3), False).reshape(1, -1, 1, 1, 3)
    tangents = (torch.randn_like(image), torch.randn_like(grid))

    def f(image, grid):
        return aten.grid_sampler_3d(image, grid, mode, padding, False)

    forward = _forward_jvp(f, (image, grid), tangents)
    torch.testing.assert_close(forward, _reverse_jvp(f, (image, grid), tangents), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode, padding", [(0, 1), (0, 2), (2, 2), (2, 1)])
def test_grid_sampler_backward_at_borders_follows_double_backward(enabled, mode, padding):
    """Forward-over-reverse at clipped and reflected coordinates equals PyTorch's double backward."""
    image = torch.randn(1, 2, 4, 5, dtype=f64)
    pixels = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0, 3.0, 4.6], [0.0, 1.5, 3.0])), dtype=f64)
    grid = _grid_from_pixels(pixels, (5, 4), True).reshape(1, -1, 1, 2)
    grad = torch.randn(1, 2, pixels.shape[0], 1, dtype=f64)
    tangents = (torch.randn_like(grad), torch.randn_like(image), torch.randn_like(grid))

    def f(grad, image, grid):
        return torch.cat(
            [t.reshape(-1) for t in aten.grid_sampler_2d_backward(grad, image, grid, mode, padding, True, [True, True])]
        )

    forward = _forward_jvp(f, (grad, image, grid), tangents)
    try:
        reverse = _reverse_jvp(f, (grad, image, grid), tangents)
    except RuntimeError as error:
        if "derivative for aten::grid_sampler_2d_backward is not implemented" not in str(error):
            raise
        pytest.skip(f"torch {torch.__version__} has no double backward of grid_sampler_2d to compare with")
    torch.testing.assert_close(forward, reverse, rtol=1e-9, atol=1e-9)


def test_grid_sampler_backward_output_mask_leaves_input_gradient_undefined(enabled):
    image, grid = torch.randn(1, 2, 4, 5, dtype=f64), torch.rand(1, 3, 2, 2, dtype=f64) * 2 - 1
    grad = torch.randn(1, 2, 3, 2, dtype=f64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(grid, torch.randn_like(grid))
        grad_input, grad_grid = aten.grid_sampler_2d_backward(grad, image, dual, 0, 0, False, [False, True])
        assert grad_input is None and forward_ad.unpack_dual(grad_grid).tangent is not None


def test_grid_sample_in_reduced_precision_is_close_to_float32(enabled):
    image, grid = torch.randn(2, 3, 6, 7), torch.rand(2, 4, 5, 2) * 2 - 1
    tangents = (torch.randn_like(image), torch.randn_like(grid))

    def f(image, grid):
        return F.grid_sample(image, grid, align_corners=False)

    reference = _forward_jvp(f, (image, grid), tangents)
    for dtype in (torch.bfloat16, torch.float16):
        out, tangent = torch.func.jvp(f, (image.to(dtype), grid.to(dtype)), tuple(t.to(dtype) for t in tangents))
        assert out.dtype == tangent.dtype == dtype
        assert (tangent.float() - reference).abs().max() < 0.1 * (1 + reference.abs().max())


@pytest.mark.parametrize(
    "op, args, match",
    [
        (aten.grid_sampler_2d, (torch.randn(1, 2, 3, 3), torch.rand(2, 2, 2, 2), 0, 0, False), "same batch size"),
        (aten.grid_sampler_2d, (torch.randn(1, 2, 3, 3), torch.rand(1, 2, 2, 3), 0, 0, False), "size 2 in last"),
        (aten.grid_sampler_3d, (torch.randn(1, 2, 3, 3, 3), torch.rand(1, 2, 2, 2, 3), 2, 0, False), "bicubic"),
        (aten.grid_sampler_2d, (torch.randn(1, 2, 0, 3), torch.rand(1, 2, 2, 2), 0, 0, False), "non-empty spatial"),
    ],
)
def test_grid_sampler_bad_input_raises_as_pytorch(enabled, op, args, match):
    with pytest.raises(RuntimeError, match=match):
        op(*args)
    with pytest.raises((RuntimeError, DecompositionError), match=match):
        torch.func.jvp(lambda image: op(image, *args[1:]), (args[0],), (torch.ones_like(args[0]),))


# --- embedding bags ------------------------------------------------------


def test_embedding_bag_max_ties_take_the_first_maximum_as_reverse_mode(enabled):
    weight = torch.tensor([[1.0, 2.0], [1.0, 5.0], [3.0, 2.0], [0.0, 0.0]], dtype=f64)
    indices = torch.tensor([0, 1, 2, 1, 3, 3, 0])  # ties: rows 0 and 1 (dim 0), rows 0 and 2 (dim 1), 3 and 3
    offsets = torch.tensor([0, 2, 4, 4])  # the third bag is empty

    def f(weight):
        return F.embedding_bag(indices, weight, offsets, mode="max")

    tangent = torch.randn_like(weight)
    forward = _forward_jvp(f, (weight,), (tangent,))
    torch.testing.assert_close(forward, _reverse_jvp(f, (weight,), (tangent,)))
    assert torch.equal(forward[2], torch.zeros(2, dtype=f64))
    assert forward[0, 0] == tangent[0, 0]  # the first of the tied rows


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_padding_only_bag_and_empty_bag(enabled, mode):
    weight = torch.randn(6, 3, dtype=f64)
    indices, offsets = torch.tensor([2, 2, 1, 4, 2]), torch.tensor([0, 2, 2, 4])  # bag 0: padding only

    def f(weight):
        return F.embedding_bag(indices, weight, offsets, mode=mode, padding_idx=2)

    tangent = torch.randn_like(weight)
    forward = _forward_jvp(f, (weight,), (tangent,))
    torch.testing.assert_close(forward, _reverse_jvp(f, (weight,), (tangent,)))
    assert torch.equal(forward[:2], torch.zeros(2, 3, dtype=f64))


@pytest.mark.parametrize("flags", [{"scale_grad_by_freq": True}, {"sparse": True}])
def test_embedding_bag_forward_tangent_is_the_true_derivative(enabled, flags):
    """scale_grad_by_freq and sparse change only what reverse mode returns."""
    weight, tangent = torch.randn(8, 3, dtype=f64), torch.randn(8, 3, dtype=f64)
    indices, offsets = torch.tensor([1, 1, 5, 1, 7, 5]), torch.tensor([0, 3])

    def f(weight, **kwargs):
        return F.embedding_bag(indices, weight, offsets, mode="mean", **kwargs)

    forward = _forward_jvp(lambda w: f(w, **flags), (weight,), (tangent,))
    torch.testing.assert_close(forward, _forward_jvp(f, (weight,), (tangent,)))
    finite_difference = (f(weight + 1e-6 * tangent) - f(weight - 1e-6 * tangent)) / 2e-6
    torch.testing.assert_close(forward, finite_difference, rtol=1e-7, atol=1e-7)


def test_embedding_bag_backward_keeps_the_cpu_frequency_scaling(enabled):
    """The CPU kernel divides by the count of the index at the same rank in the sorted indices."""
    indices = torch.tensor([3, 1, 3, 3, 2, 1, 7])
    offset2bag, bag_size = torch.tensor([0, 0, 0, 1, 1, 2, 2]), torch.tensor([3, 2, 2])
    grad = torch.randn(3, 2, dtype=f64)
    args = (indices, offset2bag, bag_size, bag_size, 10, True, 0, None)
    expected = aten._embedding_bag_dense_backward(grad, *args)
    correct_counts = torch.zeros(10, 2, dtype=f64).index_add(
        0, indices, grad[offset2bag] / torch.bincount(indices)[indices, None]
    )
    assert not torch.allclose(expected, correct_counts)  # the PyTorch bug this reproduces
    out, tangent = torch.func.jvp(lambda g: aten._embedding_bag_dense_backward(g, *args), (grad,), (grad,))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(tangent, expected)  # linear in grad


def test_embedding_bag_sparse_backward_with_tangents_says_what_to_do(enabled):
    weight = torch.randn(6, 3, dtype=f64)
    out, offset2bag, bag_size, max_indices = aten._embedding_bag(weight, torch.tensor([1, 2]), torch.tensor([0]))
    grad = torch.randn_like(out)
    with pytest.raises(DecompositionError, match="sparse=False"):
        torch.func.jvp(
            lambda g: aten._embedding_bag_backward(
                g, torch.tensor([1, 2]), torch.tensor([0]), offset2bag, bag_size, max_indices, 6, False, 0, True, None
            ),
            (grad,),
            (grad,),
        )


def test_embedding_bag_per_sample_weights_alone_reach_forward_only(enabled):
    weight, psw = torch.randn(6, 3, dtype=f64), torch.rand(4, dtype=f64)
    indices, offsets = torch.tensor([1, 2, 4, 5]), torch.tensor([0, 2])

    def f(psw):
        return F.embedding_bag(indices, weight, offsets, mode="sum", per_sample_weights=psw)

    tangent = torch.randn_like(psw)
    expected = (f(psw + 1e-6 * tangent) - f(psw - 1e-6 * tangent)) / 2e-6
    torch.testing.assert_close(_forward_jvp(f, (psw,), (tangent,)), expected, rtol=1e-7, atol=1e-7)
    assert fwdecomp.autograd.is_installed(aten._embedding_bag_forward_only.default)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"offsets": torch.tensor([1, 2])}, "offsets\\[0\\] has to be 0"),
        ({"input": torch.tensor([1, 9])}, "idx"),
        ({"mode": "max", "per_sample_weights": torch.ones(2, dtype=f64)}, "per_sample_weights"),
    ],
)
def test_embedding_bag_bad_input_raises_as_pytorch(enabled, kwargs, match):
    arguments = {"input": torch.tensor([1, 2]), "offsets": torch.tensor([0]), **kwargs}
    weight = torch.randn(6, 3, dtype=f64)
    with pytest.raises((RuntimeError, ValueError), match=match):
        F.embedding_bag(weight=weight, **arguments)
    with pytest.raises((RuntimeError, ValueError, DecompositionError), match=match):
        torch.func.jvp(lambda w: F.embedding_bag(weight=w, **arguments), (weight,), (weight,))


# --- CTC -----------------------------------------------------------------

_TARGETS = torch.tensor([[1, 2, 2], [3, 1, 4], [2, 0, 0]])
_INPUT_LENGTHS, _TARGET_LENGTHS = [6, 4, 5], [3, 2, 1]  # shorter inputs and targets than the padding


def _ctc(
    log_probs, zero_infinity=False, targets=_TARGETS, input_lengths=_INPUT_LENGTHS, target_lengths=_TARGET_LENGTHS
):
    return aten._ctc_loss(log_probs, targets, input_lengths, target_lengths, 0, zero_infinity)


def test_ctc_meaningful_outputs_equal_the_kernel_for_any_lengths(enabled):
    log_probs = torch.randn(6, 3, 5, dtype=f64).log_softmax(-1)
    nll, log_alpha = _ctc(log_probs)
    with forward_ad.dual_level():
        got_nll, got_alpha = _ctc(forward_ad.make_dual(log_probs, torch.randn_like(log_probs)))
        got_nll, got_alpha = forward_ad.unpack_dual(got_nll).primal, forward_ad.unpack_dual(got_alpha).primal
    torch.testing.assert_close(got_nll, nll)
    for b, (steps, length) in enumerate(zip(_INPUT_LENGTHS, _TARGET_LENGTHS)):
        torch.testing.assert_close(got_alpha[b, :steps, : 2 * length + 1], log_alpha[b, :steps, : 2 * length + 1])
        assert torch.isneginf(got_alpha[b, steps:]).all() and torch.isneginf(got_alpha[b, :, 2 * length + 1 :]).all()


def test_ctc_tangent_is_reverse_modes_and_equals_finite_differences_on_log_softmax_inputs(enabled):
    raw = torch.randn(6, 3, 5, dtype=f64)
    tangent = torch.randn_like(raw)

    def loss(log_probs):
        return _ctc(log_probs)[0]

    forward = _forward_jvp(loss, (raw,), (tangent,))
    torch.testing.assert_close(forward, _reverse_jvp(loss, (raw,), (tangent,)))
    finite_difference = (loss(raw + 1e-6 * tangent) - loss(raw - 1e-6 * tangent)) / 2e-6
    excess = sum(
        (raw[:steps, b].exp() * tangent[:steps, b]).sum() * (torch.arange(3) == b)
        for b, steps in enumerate(_INPUT_LENGTHS)
    )
    torch.testing.assert_close(forward, finite_difference + excess, rtol=1e-6, atol=1e-6)  # the documented term

    def normalised(z):
        return loss(z.log_softmax(-1))

    forward = _forward_jvp(normalised, (raw,), (tangent,))
    finite_difference = (normalised(raw + 1e-6 * tangent) - normalised(raw - 1e-6 * tangent)) / 2e-6
    torch.testing.assert_close(forward, finite_difference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_ctc_hessian_vector_product_equals_finite_differences_of_pytorchs_gradient(enabled, zero_infinity):
    raw, tangent = torch.randn(6, 3, 5, dtype=f64), torch.randn(6, 3, 5, dtype=f64)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=f64)

    def gradient(log_probs):
        return torch.func.grad(lambda q: (_ctc(q, zero_infinity)[0] * weights).sum())(log_probs)

    _, hvp = torch.func.jvp(gradient, (raw,), (tangent,))
    fwdecomp.disable()
    expected = (gradient(raw + 1e-5 * tangent) - gradient(raw - 1e-5 * tangent)) / 2e-5
    fwdecomp.enable()
    torch.testing.assert_close(hvp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["loss tangent from the alphas", "from the kernel"])
def test_ctc_impossible_alignment_and_empty_input(enabled, monkeypatch, threshold):
    from fwdecomp.decompositions import ctc

    monkeypatch.setattr(ctc, "KERNEL_LOSS_TANGENT_MAX_NUMEL", threshold)  # both ways of the tangent rule
    log_probs = torch.randn(4, 3, 5, dtype=f64)
    targets = torch.tensor([[1, 1, 1], [2, 3, 0], [1, 0, 0]])
    lengths = ([2, 4, 0], [3, 2, 1])  # 1,1,1 needs 5 steps; the third input is empty
    tangent = torch.randn_like(log_probs)
    for zero_infinity in (False, True):

        def loss(logits, zero_infinity=zero_infinity):
            return aten._ctc_loss(logits.log_softmax(-1), targets, *lengths, 0, zero_infinity)[0]

        out, forward = torch.func.jvp(loss, (log_probs,), (tangent,))
        assert torch.equal(out, loss(log_probs)) and math.isinf(out[0]) and math.isinf(out[2])
        leaf = log_probs.clone().requires_grad_()
        (reverse,) = torch.autograd.grad(loss(leaf)[0], leaf)
        if zero_infinity:
            assert forward[0] == 0 and (reverse == 0).all()
        else:
            assert forward[0].isnan() and reverse[:2, 0].isnan().all()  # as reverse mode: NaN
        assert forward[2] == 0
        difference = (loss(log_probs + 1e-6 * tangent)[1] - loss(log_probs - 1e-6 * tangent)[1]) / 2e-6
        torch.testing.assert_close(forward[1], difference, rtol=1e-6, atol=1e-6)


def test_ctc_tensor_lengths_and_concatenated_targets(enabled):
    log_probs = torch.randn(6, 3, 5, dtype=f64).log_softmax(-1)
    concatenated = torch.cat([_TARGETS[b, :length] for b, length in enumerate(_TARGET_LENGTHS)]).to(torch.int32)
    tangent = torch.randn_like(log_probs)

    def padded(log_probs):
        return _ctc(log_probs)[0]

    def tensors(log_probs):
        return aten._ctc_loss.Tensor(
            log_probs, concatenated, torch.tensor(_INPUT_LENGTHS), torch.tensor(_TARGET_LENGTHS, dtype=torch.int32)
        )[0]

    torch.testing.assert_close(
        _forward_jvp(tensors, (log_probs,), (tangent,)), _forward_jvp(padded, (log_probs,), (tangent,))
    )


@pytest.mark.parametrize(
    "args, match",
    [
        ((_TARGETS, [6, 4, 5], [3, 2, 1], 7), "blank must be in label range"),
        ((_TARGETS, [7, 4, 5], [3, 2, 1], 0), "at most 6"),
        ((_TARGETS, [6, 4], [3, 2, 1], 0), "input_lengths must be of size batch_size"),
        ((_TARGETS[:, :1], [6, 4, 5], [3, 2, 1], 0), "size at least 3"),
    ],
)
def test_ctc_bad_input_raises_as_pytorch(enabled, args, match):
    log_probs = torch.randn(6, 3, 5, dtype=f64).log_softmax(-1)
    with pytest.raises(RuntimeError, match=match):
        aten._ctc_loss(log_probs, *args)
    with pytest.raises(DecompositionError, match=match):
        torch.func.jvp(lambda q: aten._ctc_loss(q, *args)[0], (log_probs,), (log_probs,))


# --- margin losses -------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_kinks_follow_reverse_mode(enabled, p):
    # frame 0 (target 1): margins 0 (kink), 0.5, -1; frame 1 (target 0): 0 (kink), 0 (kink), 1.25
    x = torch.tensor([[0.5, 1.5, 1.0, -0.5], [2.0, 1.0, 1.0, 2.25]], dtype=f64)
    target = torch.tensor([1, 0])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=f64)
    for reduction in ("none", "mean"):

        def f(x, reduction=reduction):
            return F.multi_margin_loss(x, target, p=p, weight=weight, reduction=reduction)

        tangent = torch.randn_like(x)
        torch.testing.assert_close(_forward_jvp(f, (x,), (tangent,)), _reverse_jvp(f, (x,), (tangent,)))


def test_multilabel_margin_kinks_follow_reverse_mode(enabled):
    target = torch.tensor([[1, -1, 0, 0], [0, 3, -1, 2]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.3], [2.0, 1.0, 1.0, 2.5]], dtype=f64)  # several margins exactly 0

    def f(x):
        return F.multilabel_margin_loss(x, target, reduction="none")

    tangent = torch.randn_like(x)
    torch.testing.assert_close(_forward_jvp(f, (x,), (tangent,)), _reverse_jvp(f, (x,), (tangent,)))


def test_margin_backward_at_a_kink_takes_the_inactive_side(enabled):
    """At a kink the hinge counts as inactive (PyTorch's ``z > 0``): its derivative is the one from below."""
    x = torch.tensor([[0.5, 1.5, 1.0, -0.5]], dtype=f64)  # margin of class 0 is exactly 0
    target = torch.tensor([1])
    direction = torch.tensor([[-1.0, 0.0, 0.0, 0.0]], dtype=f64)  # moves that margin below 0

    def gradient(x):
        return torch.func.grad(lambda q: F.multi_margin_loss(q, target, p=2))(x)

    _, tangent = torch.func.jvp(gradient, (x,), (direction,))
    fwdecomp.disable()
    one_sided = (gradient(x + 1e-6 * direction) - gradient(x)) / 1e-6
    fwdecomp.enable()
    torch.testing.assert_close(tangent, one_sided, rtol=1e-6, atol=1e-6)


def test_margin_weight_is_not_differentiated(enabled):
    x, target, weight = torch.randn(3, 4, dtype=f64), torch.tensor([0, 3, 1]), torch.rand(4, dtype=f64)
    _, tangent = torch.func.jvp(
        lambda w: F.multi_margin_loss(x, target, weight=w), (weight,), (torch.ones_like(weight),)
    )
    assert tangent == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: aten.multi_margin_loss(x, torch.tensor([0, 9, 1]), 1, 1.0, None, 1), "target out of range"),
        (lambda x: aten.multi_margin_loss(x, torch.tensor([0, 2, 1]), 3, 1.0, None, 1), "only p == 1 and p == 2"),
        (
            lambda x: aten.multi_margin_loss(x, torch.tensor([0, 2]), 1, 1.0, None, 1),
            "target tensor should be 1-D|inconsistent target size",  # torch >= 2.12 | torch 2.11
        ),
        (lambda x: aten.multi_margin_loss(x, torch.tensor([0, 2, 1]), 1, 1.0, x[0, :3], 1), "inconsistent weight"),
        (lambda x: aten.multilabel_margin_loss_forward(x, torch.tensor([0, 2]), 1)[0], "inconsistent target size"),
    ],
)
def test_margin_bad_input_raises_as_pytorch(enabled, call, match):
    x = torch.randn(3, 4, dtype=f64)
    with pytest.raises(RuntimeError, match=match):
        call(x)
    with pytest.raises(DecompositionError, match=match):
        torch.func.jvp(call, (x,), (x,))
