"""The blockwise attention JVP: every operator, every option, every output, reverse mode through it.

References are PyTorch's O(N^2) math (``reference`` below, differentiated by
PyTorch's own formulas) in float64, and central finite differences for the
paths where the mask is random. Block sizes are shrunk so that every case
crosses several query and key blocks (online softmax, block skipping).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import jvp

import fwdecomp
from fwdecomp import _torch
from fwdecomp.attention import BlockwiseAttentionJVP, attention_jvp, block_sizes, blocks, kernel
from fwdecomp.attention.function import canonical_mask
from fwdecomp.decompositions.attention import efficient_attention

aten = torch.ops.aten
f64 = torch.float64


def reference(q, k, v, mask=None, is_causal=False, causal_from="top_left", window=(None, None), scale=None, dead=0.0):
    """``(out, lse)`` materialising the scores: what the blockwise kernel must equal."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.mT) * scale
    length, key_length = s.shape[-2:]
    diff = torch.arange(key_length) - torch.arange(length)[:, None]
    diff = diff - (0 if causal_from == "top_left" else key_length - length)
    visible = torch.ones(length, key_length, dtype=torch.bool)
    low, high = window
    if is_causal:
        high = 0 if high is None else min(high, 0)
    if low is not None:
        visible &= diff >= -low
    if high is not None:
        visible &= diff <= high
    s = s.masked_fill(~visible, -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    hidden = (s == -math.inf).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(hidden, 0, s), -1, keepdim=True)
    p = torch.exp(torch.where(hidden, -math.inf, s - lse))
    return p @ v, torch.where(hidden, dead, lse).squeeze(-1)


def randn(*shape, dtype=f64):
    return torch.randn(shape, dtype=dtype)


def close(got, want, tol=1e-10):
    assert got.shape == want.shape, (got.shape, want.shape)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    scale = 1 + want[finite].abs().max().item() if finite.any() else 1
    assert (got[finite] - want[finite]).abs().max().item() <= tol * scale if finite.any() else True


def _fully_masked_row():
    m = randn(9, 6)
    m[2] = -math.inf
    return m


# (B, Hq, Hkv, L, S, d, e), options, mask, mask tangent
CASES = {
    "plain": ((2, 3, 3, 9, 11, 4, 4), {}, None, None),
    "grouped-query heads": ((2, 4, 2, 9, 11, 4, 5), {}, None, None),
    "causal top-left, L > S": ((2, 4, 2, 9, 6, 4, 5), {"is_causal": True}, None, None),
    "causal bottom-right, L > S (hidden rows)": (
        (1, 2, 1, 9, 6, 4, 4),
        {"is_causal": True, "causal_from": "bottom_right"},
        None,
        None,
    ),
    "causal bottom-right, L < S": (
        (1, 2, 2, 6, 9, 4, 4),
        {"is_causal": True, "causal_from": "bottom_right"},
        None,
        None,
    ),
    "sliding window": ((1, 2, 2, 9, 9, 4, 4), {"window": (2, 1), "causal_from": "bottom_right"}, None, None),
    "causal window": ((1, 2, 2, 9, 9, 4, 4), {"is_causal": True, "window": (3, None)}, None, None),
    "additive mask, fully masked row": ((2, 4, 2, 9, 6, 4, 5), {}, _fully_masked_row, None),
    "broadcast mask with tangent, scale": (
        (2, 4, 2, 9, 6, 4, 5),
        {"scale": 0.3},
        lambda: randn(2, 1, 9, 6),
        lambda: randn(2, 1, 9, 6),
    ),
    "per-head key mask with tangent, causal": (
        (2, 4, 2, 9, 6, 4, 5),
        {"is_causal": True},
        lambda: randn(1, 4, 1, 6),
        lambda: randn(1, 4, 1, 6),
    ),
    "per-query mask with tangent": ((2, 2, 2, 9, 6, 4, 4), {}, lambda: randn(9, 1), lambda: randn(9, 1)),
    "boolean mask": ((2, 4, 4, 9, 6, 4, 5), {}, lambda: torch.rand(2, 4, 9, 6) > 0.4, None),
}


def _case(name):
    shape, options, make_mask, make_dmask = CASES[name]
    torch.manual_seed(0)
    b, hq, hkv, length, key_length, d, e = shape
    primals = (randn(b, hq, length, d), randn(b, hkv, key_length, d), randn(b, hkv, key_length, e))
    tangents = tuple(torch.randn_like(x) for x in primals)
    mask = make_mask() if make_mask else None
    dmask = make_dmask() if make_dmask else None
    return primals, tangents, mask, dmask, options


def _reference_jvp(primals, tangents, mask, dmask, options):
    if dmask is None:
        return jvp(lambda q, k, v: reference(q, k, v, mask, **options), tuple(primals), tuple(tangents))
    return jvp(lambda q, k, v, m: reference(q, k, v, m, **options), (*primals, mask), (*tangents, dmask))


@pytest.mark.parametrize("blocks_qk", [(2, 3), (4, 4), (64, 64)], ids=["2x3", "4x4", "one block"])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_tangents_match_the_math(name, blocks_qk):
    primals, tangents, mask, dmask, options = _case(name)
    (out, lse), (dout, dlse) = _reference_jvp(primals, tangents, mask, dmask, options)
    got = attention_jvp(
        primals,
        tangents,
        attn_mask=mask,
        attn_mask_tangent=dmask,
        block_query=blocks_qk[0],
        block_key=blocks_qk[1],
        **options,
    )
    for a, b in zip((*got[0], *got[1]), (out, lse, dout, dlse)):
        close(a, b)


def _recorded(node, name, depth=4):
    if node is None or depth < 0:
        return False
    if type(node).__name__ == name:
        return True
    return any(_recorded(child, name, depth - 1) for child, _ in node.next_functions)


@pytest.mark.parametrize("name", list(CASES))
def test_reverse_mode_through_the_jvp(name):
    """Consistency training: a loss of all four outputs, backpropagated to primals, tangents and mask."""
    primals, tangents, mask, dmask, options = _case(name)
    leaves = [x.clone().requires_grad_() for x in (*primals, *tangents)]
    mask_leaf = mask.clone().requires_grad_() if mask is not None and mask.dtype != torch.bool else mask
    dmask_leaf = dmask.clone().requires_grad_() if dmask is not None else None
    inputs = leaves + [x for x in (mask_leaf, dmask_leaf) if x is not None and x.requires_grad]
    weights = None

    def loss(outputs):
        nonlocal weights
        flat = [*outputs[0], *outputs[1]]
        if weights is None:
            weights = [torch.randn_like(o) for o in flat]
        return sum((o * w).sum() for o, w in zip(flat, weights))

    with block_sizes(query=4, key=3):
        ours = attention_jvp(leaves[:3], leaves[3:], attn_mask=mask_leaf, attn_mask_tangent=dmask_leaf, **options)
    assert _recorded(ours[1][0].grad_fn, "BlockwiseAttentionJVPBackward")  # the O(N·d) backward
    got = torch.autograd.grad(loss(ours), inputs)
    want = torch.autograd.grad(loss(_reference_jvp(leaves[:3], leaves[3:], mask_leaf, dmask_leaf, options)), inputs)
    for a, b in zip(got, want):
        close(a, b, 1e-9)


@pytest.mark.parametrize("length, key_length, causal", [(3, 6, False), (3, 6, True), (6, 6, True), (7, 4, False)])
def test_forward_over_reverse_in_one_forward_ad_level(enabled, length, key_length, causal):
    """A Hessian-vector product with forward_ad around autograd.grad(create_graph=True) through the CPU
    flash kernel (what gradgradcheck's forward-over-reverse check does): the blockwise backward runs on
    the saved values carrying their tangents again, so the gradient has the right tangent (it had none)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, length, 8, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, key_length, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    w, dq = torch.randn_like(q), torch.randn_like(q)
    dk, dv = torch.randn_like(k), torch.randn_like(v)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(x, t) for x, t in zip(leaves, (dq, dk, dv))]
        out = (F.scaled_dot_product_attention(*duals, is_causal=causal) * w).sum()
        grads = torch.autograd.grad(out, leaves, create_graph=True)
        got = [forward_ad.unpack_dual(g).tangent for g in grads]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        _, want = jvp(
            lambda *x: torch.func.grad(
                lambda *y: (F.scaled_dot_product_attention(*y, is_causal=causal) * w).sum(), argnums=(0, 1, 2)
            )(*x),
            (q, k, v),
            (dq, dk, dv),
        )
    for a, b in zip(got, want):
        assert a is not None
        close(a, b, 1e-10)


def test_block_sizes_do_not_change_results():
    primals, tangents, *_ = _case("causal top-left, L > S")
    results = []
    for query, key in ((1, 1), (2, 5), (3, 2), (100, 100)):
        with block_sizes(query=query, key=key):
            results.append(attention_jvp(primals, tangents, is_causal=True))
    for other in results[1:]:
        for a, b in zip((*results[0][0], *results[0][1]), (*other[0], *other[1])):
            close(a, b, 1e-12)


def test_automatic_block_sizes_and_settings():
    assert blocks.choose(4, 4096, 4096) == (128, 1024)
    assert blocks.choose(4, 100, 50) == (100, 50)  # small problems: one block
    assert blocks.choose(4, 4096, 4096, banded=True) == (256, 256)  # causal: square blocks, skipped ones
    # accelerators: a larger budget (fewer kernel launches), unless one is set
    assert blocks.choose(4, 4096, 4096, device="cuda") == (4096, 1024)
    assert blocks.choose(4, 4096, 4096, banded=True, device=torch.device("cuda", 0)) == (1024, 1024)
    assert blocks.choose(4, 4096, 4096, device="meta") == (128, 1024)
    with block_sizes(budget=2**19):
        assert blocks.choose(4, 4096, 4096, device="cuda") == (128, 1024)
    q, k = blocks.choose(512, 8192, 8192)  # many heads: blocks shrink, never below the minimums
    assert k >= blocks.MIN_KEY_BLOCK and q >= blocks.MIN_QUERY_BLOCK
    previous = blocks.set_block_sizes(query=32)
    try:
        assert blocks.choose(4, 4096, 4096) == (32, 1024)
        with block_sizes(key=64):
            assert blocks.choose(4, 4096, 4096) == (32, 64)
        assert blocks.choose(4, 4096, 4096) == (32, 1024)
    finally:
        blocks.set_block_sizes(previous.query, previous.key, previous.budget)
    assert blocks.choose(4, 4096, 4096) == (128, 1024)
    with pytest.raises(ValueError, match="query must be a positive int"):
        blocks.set_block_sizes(query=0)


def test_float32_tangents_within_1e_4_of_float64():
    torch.manual_seed(0)
    primals = [torch.randn(1, 4, 300, 64) for _ in range(3)]
    tangents = [torch.randn(1, 4, 300, 64) for _ in range(3)]
    with block_sizes(query=64, key=128):
        (_, _), (dout, dlse) = attention_jvp(primals, tangents, is_causal=True)
    (_, _), (want, want_lse) = jvp(
        lambda q, k, v: reference(q, k, v, is_causal=True),
        tuple(p.double() for p in primals),
        tuple(t.double() for t in tangents),
    )
    assert dout.dtype == torch.float32
    assert ((dout.double() - want).norm() / want.norm()).item() < 1e-4
    assert ((dlse.double() - want_lse).norm() / want_lse.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_computed_in_float32(dtype):
    torch.manual_seed(0)
    primals = [torch.randn(1, 2, 40, 16).to(dtype) for _ in range(3)]
    tangents = [torch.randn(1, 2, 40, 16).to(dtype) for _ in range(3)]
    (out, lse), (dout, dlse) = attention_jvp(primals, tangents, is_causal=True, block_query=16, block_key=8)
    assert out.dtype == dout.dtype == dtype and lse.dtype == dlse.dtype == torch.float32
    (_, _), (want, _) = jvp(
        lambda q, k, v: reference(q, k, v, is_causal=True),
        tuple(p.double() for p in primals),
        tuple(t.double() for t in tangents),
    )
    assert ((dout.double() - want).norm() / want.norm()).item() < 2e-2


def test_dropout_output_tangent_and_gradient_share_one_mask():
    torch.manual_seed(0)
    q, k, v = randn(1, 2, 9, 4), randn(1, 2, 7, 4), randn(1, 2, 7, 4)
    dq, dv = randn(1, 2, 9, 4), randn(1, 2, 7, 4)

    def run(q, v, seed=5):
        torch.manual_seed(seed)  # the keep mask is drawn from the global generator
        with block_sizes(query=4, key=3):
            return attention_jvp((q, k, v), (dq, None, dv), dropout_p=0.4)

    (out, _), (dout, dlse) = run(q, v)
    (out2, _), _ = run(q, v)
    (out3, _), _ = run(q, v, seed=6)
    assert torch.equal(out, out2) and not torch.equal(out, out3)
    (clean, _), _ = attention_jvp((q, k, v), (None, None, None))
    assert not torch.allclose(out, clean)
    eps = 1e-6
    (plus, plus_lse), _ = run(q + eps * dq, v + eps * dv)
    (minus, minus_lse), _ = run(q - eps * dq, v - eps * dv)
    close(dout, (plus - minus) / (2 * eps), 1e-6)
    close(dlse, (plus_lse - minus_lse) / (2 * eps), 1e-6)
    # Reverse mode regenerates the same mask block by block.
    leaf_q, leaf_v = q.clone().requires_grad_(), v.clone().requires_grad_()
    weight = torch.randn_like(dout)
    (_, _), (dout_leaf, _) = run(leaf_q, leaf_v)
    grad_q, _ = torch.autograd.grad((dout_leaf * weight).sum(), (leaf_q, leaf_v))
    direction = randn(*q.shape)

    def scalar(qq):
        return (run(qq, v)[1][0] * weight).sum()

    fd = (scalar(q + eps * direction) - scalar(q - eps * direction)) / (2 * eps)
    assert abs((grad_q * direction).sum().item() - fd.item()) < 1e-6 * (1 + abs(fd.item()))


# --- every operator, through the dispatcher ---------------------------------------


def _bhld(*tensors):
    return tuple(t.transpose(1, 2) for t in tensors)


def _operator_calls():
    """(name, call(q, k, v) -> outputs in (B, H, L, d) layout, reference options, output index of lse)."""
    yield (
        "for_cpu",
        lambda q, k, v: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True),
        ({"is_causal": True}),
    )
    yield (
        "sdpa_flash",
        lambda q, k, v: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True),
        ({"is_causal": True, "causal_from": "bottom_right", "dead": math.inf}),
    )
    yield (
        "sdpa_efficient",
        lambda q, k, v: aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True),
        ({"is_causal": True, "dead": math.inf}),
    )
    yield (
        "sdpa_cudnn",
        lambda q, k, v: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True),
        ({"is_causal": True, "dead": math.inf}),
    )

    def flash_forward(q, k, v):
        outs = aten._flash_attention_forward(*_bhld(q, k, v), None, None, q.shape[2], k.shape[2], 0.0, True, False)
        return (outs[0].transpose(1, 2), *outs[1:])

    yield "flash_forward", flash_forward, {"is_causal": True, "causal_from": "bottom_right", "dead": math.inf}

    def efficient_forward(q, k, v):
        outs = aten._efficient_attention_forward(
            *_bhld(q, k, v), None, None, None, q.shape[2], k.shape[2], 0.0, 2, True
        )
        return (outs[0].transpose(1, 2), *outs[1:])

    yield "efficient_forward", efficient_forward, {"is_causal": True, "causal_from": "bottom_right", "dead": math.inf}


OPERATOR_CALLS = {name: (call, options) for name, call, options in _operator_calls()}


def _lse(outputs, length):
    lse = outputs[1]
    if lse.dim() == 4:  # cuDNN: (B, H, L, 1)
        lse = lse.squeeze(-1)
    return lse[..., :length]  # the efficient kernels pad rows to a multiple of 32


@pytest.mark.parametrize("name", list(OPERATOR_CALLS))
def test_every_operator_under_forward_ad_and_func_jvp(enabled, name):
    call, options = OPERATOR_CALLS[name]
    torch.manual_seed(0)
    length = 9
    q, k, v = randn(1, 4, length, 8), randn(1, 2, 12 if name == "for_cpu" else 6, 8), None
    v = torch.randn_like(k)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    (want, want_lse), (dwant, dwant_lse) = jvp(lambda *a: reference(*a, **options), (q, k, v), tangents)
    with block_sizes(query=4, key=4):
        outputs, douts = jvp(
            lambda *a: tuple(o for o in call(*a) if isinstance(o, torch.Tensor))[:2], (q, k, v), tangents
        )
        with forward_ad.dual_level():
            full = call(*(forward_ad.make_dual(p, t) for p, t in zip((q, k, v), tangents)))
            dual_tangent = forward_ad.unpack_dual(full[0]).tangent
    close(outputs[0], want)
    close(douts[0], dwant)
    close(dual_tangent, dwant)
    lse_tol = 1e-10 if outputs[1].dtype == f64 else 1e-6  # the CUDA kernels' log-sum-exp is float32
    close(_lse(outputs, length).double(), want_lse, lse_tol)
    close(_lse(douts, length).double(), dwant_lse, lse_tol)
    if name in ("sdpa_efficient", "efficient_forward"):
        assert outputs[1].shape[-1] == 32 and torch.isinf(outputs[1][..., length:]).all()


def test_every_cuda_operator_is_registered_for_its_autograd_key(enabled):
    for op in (
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._flash_attention_forward.default,
        aten._efficient_attention_forward.default,
    ):
        assert fwdecomp.registry.lookup(op) is not None
        assert op in fwdecomp.covered_operators()
        dump = _torch.dispatch_dump(_torch.qualified_name(op))
        line = next(line for line in dump.splitlines() if line.startswith("AutogradCUDA:"))
        assert "fwdecomp" in line or "autograd.py" in line, line


def test_cuda_samples_exist_only_where_the_kernel_runs():
    entry = fwdecomp.registry.lookup(aten._scaled_dot_product_flash_attention.default)
    assert list(entry.samples("cpu", torch.float16)) == []
    assert len(list(entry.samples("meta", torch.float16))) >= 4


def test_efficient_attention_differentiates_its_bias(enabled):
    torch.manual_seed(0)
    q, k, v = randn(1, 2, 5, 4), randn(1, 2, 7, 4), randn(1, 2, 7, 4)
    bias, dbias = randn(1, 2, 5, 7), randn(1, 2, 5, 7)

    def f(bias):
        return aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, 0.0, False)[0]

    _, tangent = jvp(f, (bias,), (dbias,))
    _, want = jvp(lambda b: reference(q, k, v, b)[0], (bias,), (dbias,))
    close(tangent, want)


def test_flash_forward_variable_length_and_window(enabled):
    torch.manual_seed(0)
    lengths = [5, 3]
    q, k, v = randn(8, 2, 4), randn(8, 2, 4), randn(8, 2, 4)
    dq = randn(8, 2, 4)
    cum = torch.tensor([0, 5, 8], dtype=torch.int32)

    def f(q):
        return aten._flash_attention_forward(
            q, k, v, cum, cum, 5, 5, 0.0, True, False, window_size_left=2, window_size_right=-1
        )[:2]

    (out, lse), (dout, dlse) = jvp(f, (q,), (dq,))
    assert lse.shape == (2, 8)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        part = [x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]

        def ref(qq, kk=part[1], vv=part[2]):
            return reference(qq, kk, vv, is_causal=True, causal_from="bottom_right", window=(2, None))

        (w, _), (dw, dwl) = jvp(
            ref,
            (part[0],),
            (dq[rows].transpose(0, 1).unsqueeze(0),),
        )
        close(out[rows], w.squeeze(0).transpose(0, 1))
        close(dout[rows], dw.squeeze(0).transpose(0, 1))
        close(dlse[:, rows].double(), dwl.squeeze(0), 1e-6)  # float32, as the kernel
        start += n


def test_unsupported_options_raise_clearly(enabled):
    q = randn(1, 2, 4, 4)
    with pytest.raises(fwdecomp.DecompositionError, match="do not support dropout"):
        jvp(lambda q: aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.1), (q,), (q,))
    with pytest.raises(fwdecomp.DecompositionError, match="alibi_slopes"):
        jvp(
            lambda q: aten._flash_attention_forward(q, q, q, None, None, 2, 2, 0.0, False, False, alibi_slopes=q[0, 0])[
                0
            ],
            (q,),
            (q,),
        )
    with pytest.raises(fwdecomp.DecompositionError, match="return_debug_mask=True"):
        jvp(lambda q: aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, True)[0], (q,), (q,))
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attention_jvp((randn(1, 3, 4, 4), randn(1, 2, 4, 4), randn(1, 2, 4, 4)), ())


def test_sdpa_dropout_on_cuda_kernels_is_consistent(enabled):
    """With tangents, the CUDA kernels' dropout uses fwdecomp's own mask for output and tangent."""
    torch.manual_seed(0)
    q, k, v = randn(1, 2, 6, 4), randn(1, 2, 6, 4), randn(1, 2, 6, 4)
    dq = randn(1, 2, 6, 4)

    def f(q):
        torch.manual_seed(3)
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.5, False)[0]

    out, tangent = jvp(f, (q,), (dq,))
    (clean, _), _ = attention_jvp((q, k, v), ())
    assert not torch.allclose(out, clean)  # dropped

    def decomposition(q):  # the same function without tangents (no CUDA kernel to call here)
        torch.manual_seed(3)
        return efficient_attention(q, k, v, None, True, 0.5, False)[0]

    eps = 1e-6
    assert torch.equal(decomposition(q), out)
    close(tangent, (decomposition(q + eps * dq) - decomposition(q - eps * dq)) / (2 * eps), 1e-6)


# --- the autograd.Function under torch.func -----------------------------------------


def _function_inputs():
    torch.manual_seed(0)
    q, dq = randn(1, 2, 1, 6, 4), randn(1, 2, 1, 6, 4)
    k, dk, v, dv = randn(1, 2, 5, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 3), randn(1, 2, 5, 3)
    spec = kernel.Spec(scale=0.5, band=(None, 0), block_query=4, block_key=2)
    return (q, k, v, dq, dk, dv), spec


def _function(spec):
    def f(q, k, v, dq, dk, dv):
        return BlockwiseAttentionJVP.apply(q, k, v, None, dq, dk, dv, None, spec)

    def plain(q, k, v, dq, dk, dv):
        return kernel.forward(q, k, v, None, dq, dk, dv, None, spec)

    return f, plain


def test_function_under_vmap_jvp_and_grad():
    (q, k, v, dq, dk, dv), spec = _function_inputs()
    f, plain = _function(spec)
    batch = torch.randn(3, *dq.shape, dtype=f64)
    got = torch.func.vmap(lambda t: f(q, k, v, t, dk, dv))(batch)
    want = torch.stack([torch.stack([o.flatten() for o in plain(q, k, v, t, dk, dv)[2:3]]) for t in batch])
    close(got[2].reshape(3, -1), want.reshape(3, -1))
    # forward AD over the Function (its jvp) against forward AD through the plain kernel
    directions = [torch.randn_like(x) for x in (q, k, v, dq, dk, dv)]
    _, t_fn = jvp(f, (q, k, v, dq, dk, dv), tuple(directions))
    _, t_plain = jvp(plain, (q, k, v, dq, dk, dv), tuple(directions))
    for a, b in zip(t_fn, t_plain):
        close(a, b)
    # reverse and forward-over-reverse (Hessian-vector products) of a loss of its outputs
    weights = [torch.randn_like(o) for o in plain(q, k, v, dq, dk, dv)]

    def loss(fn):
        return lambda *xs: sum((o * w).sum() for o, w in zip(fn(*xs), weights))

    argnums = tuple(range(6))
    for a, b in zip(
        torch.func.grad(loss(f), argnums)(q, k, v, dq, dk, dv),
        torch.func.grad(loss(plain), argnums)(q, k, v, dq, dk, dv),
    ):
        close(a, b)
    _, hvp_fn = jvp(torch.func.grad(loss(f), argnums), (q, k, v, dq, dk, dv), tuple(directions))
    _, hvp_plain = jvp(torch.func.grad(loss(plain), argnums), (q, k, v, dq, dk, dv), tuple(directions))
    for a, b in zip(hvp_fn, hvp_plain):
        close(a, b, 1e-9)


def test_canonical_mask_rejects_bad_heads():
    with pytest.raises(ValueError, match="head dimension"):
        canonical_mask(torch.zeros(1, 3, 4, 4), 4, 2)


def test_sdpa_user_level_with_block_skipping(enabled):
    """F.scaled_dot_product_attention, causal, several blocks: jvp and hessian-vector product."""
    torch.manual_seed(0)
    q, k, v = randn(1, 2, 20, 8), randn(1, 2, 20, 8), randn(1, 2, 20, 8)
    u = randn(1, 2, 20, 8)

    def f(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with block_sizes(query=4, key=4):
        _, tangent = jvp(f, (q,), (u,))
        _, hvp = jvp(torch.func.grad(lambda x: (f(x) ** 2).sum()), (q,), (u,))
    _, want = jvp(lambda q: reference(q, k, v, is_causal=True)[0], (q,), (u,))
    close(tangent, want)
    _, want_hvp = jvp(torch.func.grad(lambda x: (reference(x, k, v, is_causal=True)[0] ** 2).sum()), (q,), (u,))
    close(hvp, want_hvp, 1e-9)


def _sdpa_and_reference():
    torch.manual_seed(1)
    q, k, v = randn(1, 2, 9, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8)

    def ours(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    def want(q, k, v):
        return reference(q, k, v)[0]

    return (q, k, v), ours, want


def test_func_jvp_runs_below_its_layer_under_every_stack(enabled):
    """Under ``torch.func.jvp`` the JVP runs on the tensors the layer's wrappers hold (below the
    layer): the same tangents with ``vmap`` / ``jacfwd`` under it, a ``jvp`` around it, a ``vmap``
    around it, and ``grad`` / ``jacrev`` around it (reverse over forward)."""
    primals, ours, want = _sdpa_and_reference()
    u = tuple(torch.randn_like(x) for x in primals)
    w = tuple(torch.randn_like(x) for x in primals)
    with block_sizes(query=4, key=3):
        transforms = {
            "jvp": lambda f: jvp(f, primals, u)[1],
            "jacfwd": lambda f: torch.func.jacfwd(lambda q: f(q, *primals[1:]))(primals[0]),
            "jvp of jvp": lambda f: jvp(lambda *p: jvp(f, p, u)[1], primals, w)[1],
            "vmap of jvp": lambda f: torch.func.vmap(lambda t: jvp(lambda q: f(q, *primals[1:]), primals[:1], (t,))[1])(
                torch.stack([u[0], w[0]])
            ),
            "grad of jvp": lambda f: torch.func.grad(lambda *p: (jvp(f, p, u)[1] ** 2).sum(), argnums=(0, 1, 2))(
                *primals
            ),
            "jacrev of jvp": lambda f: torch.func.jacrev(lambda q: jvp(f, (q, *primals[1:]), u)[1].sum(-1))(primals[0]),
        }
        for name, transform in transforms.items():
            got, expected = transform(ours), transform(want)
            got, expected = (x if isinstance(x, tuple) else (x,) for x in (got, expected))
            for a, b in zip(got, expected, strict=True):
                assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-9), name


def test_func_jvp_then_backward_keeps_the_recomputing_backward(enabled):
    """Consistency training with ``torch.func.jvp``: a loss of the JVP, backpropagated outside the
    transform, goes through the O(N·d) recomputing backward (below the jvp layer nothing records
    the blocks) and gives the math backend's gradients."""
    primals, ours, want = _sdpa_and_reference()
    tangents = tuple(torch.randn_like(x) for x in primals)
    leaves = [x.clone().requires_grad_() for x in (*primals, *tangents)]
    with block_sizes(query=4, key=3):
        out, tangent = jvp(ours, tuple(leaves[:3]), tuple(leaves[3:]))
    assert _recorded(tangent.grad_fn, "BlockwiseAttentionJVPBackward")
    got = torch.autograd.grad((out * 2 + tangent**2).sum(), leaves)
    out, tangent = jvp(want, tuple(leaves[:3]), tuple(leaves[3:]))
    for a, b in zip(got, torch.autograd.grad((out * 2 + tangent**2).sum(), leaves)):
        close(a, b, 1e-9)
