"""The blockwise attention JVP and its reverse-mode companion, written in PyTorch operators.

Notation, per head (the scale is folded into the queries, ``q = scale * query``)::

    s_ij  = q_i . k_j + mask_ij                    scores (-inf where masked)
    t_ij  = dq_i . k_j + q_i . dk_j + dmask_ij     their tangent
    p_ij  = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    w_ij  = p_ij * z_ij / (1 - dropout_p)          (w = p without dropout; z the keep mask)
    o_i   = sum_j w_ij v_j                         output
    dl_i  = sum_j p_ij t_ij                        tangent of lse
    do_i  = sum_j w_ij (t_ij v_j + dv_j) - dl_i o_i   tangent of the output

:func:`forward` walks the score matrix in blocks of queries x keys with an
online softmax (running row maximum, rescaled running sums), so neither ``s``
nor ``t`` is ever whole: the extra memory is a few blocks plus O(N·d).
:func:`backward` is the vector-Jacobian product of the whole map
``(q, k, v, dq, dk, dv, mask, dmask) -> (o, lse, do, dl)``, recomputing
``s``, ``t`` and ``p`` block by block from the saved ``lse`` (the
FlashAttention backward, extended to the tangent outputs), so reverse mode
through the JVP is O(N·d) too.

Layout: ``q``/``dq`` are ``(B, Hkv, G, L, d)`` (``G`` query heads share each
key/value head: grouped-query attention), ``k``/``dk`` ``(B, Hkv, S, d)``,
``v``/``dv`` ``(B, Hkv, S, e)``; a mask broadcasts to ``(B, Hkv, G, L, S)``
(additive, or boolean with ``True`` = attend). Every function is made of
PyTorch operators with forward and reverse formulas and no data-dependent
Python control flow, so it also runs under ``torch.func`` transforms.

Example:
    >>> import torch
    >>> from fwdecomp.attention.kernel import Spec, forward
    >>> q, k, v = torch.randn(1, 2, 1, 6, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    >>> spec = Spec(scale=0.5, block_query=4, block_key=2)
    >>> o, lse, do, dl = forward(q, k, v, None, torch.ones_like(q), None, None, None, spec)
    >>> s = (q.squeeze(2) * 0.5) @ k.mT
    >>> torch.allclose(o.squeeze(2), s.softmax(-1) @ v, atol=1e-6)
    True
    >>> torch.allclose(lse.squeeze(2), s.logsumexp(-1), atol=1e-6)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Spec", "backward", "forward", "keep_mask"]

Tensor = torch.Tensor
Opt = torch.Tensor | None


@dataclass(frozen=True)
class Spec:
    """What the kernel computes, besides the tensors.

    ``band`` restricts the keys a query sees to ``low <= j - i <= high``
    (``None``: unbounded): causal attention aligned to the top-left corner is
    ``(None, 0)``, to the bottom-right corner ``(None, S - L)``; sliding windows
    bound both sides. ``dead_lse`` is the log-sum-exp reported for a query that
    sees no key (its output and tangents are 0). ``seed`` drives the dropout
    keep mask, drawn block by block so that the backward pass regenerates it.
    """

    scale: float
    band: tuple[int | None, int | None] = (None, None)
    dropout_p: float = 0.0
    seed: int = 0
    dead_lse: float = 0.0
    block_query: int = 256
    block_key: int = 1024


def _spans(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _band_block(spec: Spec, rows: tuple[int, int], cols: tuple[int, int], device: torch.device) -> Tensor | bool:
    """``True``: every score of the block is visible; ``False``: none is; else a ``(rows, cols)`` bool tensor."""
    low, high = spec.band
    least = cols[0] - (rows[1] - 1)
    most = (cols[1] - 1) - rows[0]
    if (low is not None and most < low) or (high is not None and least > high):
        return False
    if (low is None or least >= low) and (high is None or most <= high):
        return True
    diff = torch.arange(cols[0], cols[1], device=device) - torch.arange(rows[0], rows[1], device=device)[:, None]
    visible = torch.ones_like(diff, dtype=torch.bool)
    if low is not None:
        visible = visible & (diff >= low)
    if high is not None:
        visible = visible & (diff <= high)
    return visible


def _span(x: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """``x`` restricted to ``start:stop`` along ``dim`` (``narrow``: a view every vmap supports)."""
    return x.narrow(dim, start, stop - start)


def _slice(mask: Opt, rows: tuple[int, int], cols: tuple[int, int]) -> Opt:
    """The block of a (broadcast) 5-d mask; size-1 (broadcast) dimensions stay whole."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = _span(mask, -2, rows[0], rows[1])
    if mask.shape[-1] != 1:
        mask = _span(mask, -1, cols[0], cols[1])
    return mask


def keep_mask(spec: Spec, shape: tuple[int, ...], index: tuple[int, int], device: torch.device) -> Tensor:
    """The dropout keep mask of block ``index``: the same bits every time it is asked for."""
    generator = torch.Generator(device=device)
    generator.manual_seed((spec.seed * 1_000_003 + index[0] * 65_537 + index[1]) % (2**63 - 1))
    return torch.rand(shape, generator=generator, device=device) >= spec.dropout_p


def _grouped(x: Tensor) -> Tensor:
    """``(B, Hkv, G, n, d) -> (B, Hkv, G * n, d)``: one matrix product per key/value head."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], x.shape[4])


def _ungrouped(x: Tensor, groups: int) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], groups, x.shape[2] // groups, x.shape[3])


def _matmul(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``a @ b`` for ``a`` of shape ``(B, Hkv, G, n, d)`` and ``b`` of ``(B, Hkv, d, m)``.

    One ``bmm`` over the flattened ``B * Hkv`` heads where the leading dimensions agree:
    ``matmul`` of 4-d operands adds an expand and reshapes around it (about 8 dispatcher
    calls a product, a quarter of a small attention JVP's operators)."""
    grouped = _grouped(a)
    lead = grouped.shape[:2]
    if b.shape[:2] != lead:
        return _ungrouped(grouped @ b, groups)
    heads = lead[0] * lead[1]
    flat = torch.bmm(grouped.reshape(heads, *grouped.shape[2:]), b.reshape(heads, *b.shape[2:]))
    return flat.view(*a.shape[:4], b.shape[-1])


def _scores(
    spec: Spec, q: Tensor, k: Tensor, mask: Opt, rows: tuple[int, int], cols: tuple[int, int], groups: int
) -> Tensor | None:
    """Scaled, masked scores of one block (``None`` if the band hides all of it)."""
    band = _band_block(spec, rows, cols, q.device)
    if band is False:
        return None
    s = _matmul(q, k.mT, groups)
    if band is not True:
        s = s.masked_fill(~band, -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    return s


def _score_tangent(q: Tensor, k: Tensor, dq: Opt, dk: Opt, dmask: Opt, groups: int) -> Opt:
    t = None
    if dq is not None:
        t = _matmul(dq, k.mT, groups)
    if dk is not None:
        term = _matmul(q, dk.mT, groups)
        t = term if t is None else t + term
    if dmask is not None:
        t = dmask.expand((*q.shape[:-1], k.shape[-2])) if t is None else t + dmask
    return t


def _recording(*tensors: Any) -> bool:
    """Whether autograd records operations on any of these (then nothing is overwritten in place)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _in_place(op: str, a: Tensor, b: Tensor | float | None = None) -> Tensor:
    """``a.op_(b)`` on a fresh intermediate ``a`` when autograd does not record it, else ``a.op(b)``.

    In-place saves a pass over a score block's memory and an allocation. When
    autograd records (it may need the old value) it is skipped, and when
    ``torch.func.vmap`` refuses it (``a`` unbatched, ``b`` batched) the
    out-of-place op runs instead.
    """
    args = () if b is None else (b,)
    if not _recording(a, b):
        try:
            return getattr(a, op + "_")(*args)
        except RuntimeError:
            pass
    return getattr(a, op)(*args)


def _cat(tensors: list[Tensor | None]) -> Tensor | None:
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else torch.cat(present, dim=-1)


@dataclass
class _Rows:
    """The online-softmax state of one block of query rows."""

    peak: Tensor | None = None
    total: Tensor | None = None
    acc_o: Tensor | None = None
    acc_t: Tensor | None = None
    acc_dl: Tensor | None = None


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Opt,
    dq: Opt,
    dk: Opt,
    dv: Opt,
    dmask: Opt,
    spec: Spec,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(o, lse, do, dl)``: attention, its log-sum-exp, and their tangents, block by block.

    ``q`` is *not* yet scaled. Shapes: ``o``/``do`` ``(B, Hkv, G, L, e)``,
    ``lse``/``dl`` ``(B, Hkv, G, L)``. Missing tangents (``None``) are zero.

    The loop runs over key blocks outside and query blocks inside, so each
    key block's operands are assembled once: per block, ``s = q k^T``;
    ``t = [dq, q] [k, dk]^T`` (``dq k^T + q dk^T`` in one product); ``p [v, dv]``
    (output and its ``dv`` term in one product) and the row sums of ``p``;
    ``(p * t) v`` (the ``t`` term) and the row sums of ``p * t`` (``dl``). Products
    keep even widths: BLAS runs an odd one (a ones column for the sums) ~20% slower.
    Beyond a few blocks, the memory is the outputs and the running state of every
    row: O(N·d).
    """
    groups, length, key_length = q.shape[2], q.shape[3], k.shape[2]
    e = v.shape[-1]
    has_t = dq is not None or dk is not None or dmask is not None
    dropout = spec.dropout_p > 0
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if dropout else 1.0
    row_spans = _spans(length, spec.block_query)
    state = [_Rows() for _ in row_spans]
    for ki, cols in enumerate(_spans(key_length, spec.block_key)):
        c0, c1 = cols
        kb, vb = _span(k, -2, c0, c1), _span(v, -2, c0, c1)
        dkb = None if dk is None else _span(dk, -2, c0, c1)
        dvb = None if dv is None else _span(dv, -2, c0, c1)
        # p @ values: the output and its dv term in one product (row sums by a separate sum: a
        # ones column would make the product's width odd, which BLAS runs ~20% slower)
        values = _cat([vb, dvb])
        # The scale goes into this block's keys, once per key block (a scaled copy of the queries
        # would cost O(N·d) memory); keys and their tangents side by side for the paired product
        # [dq, q] @ [k, dk]^T = dq k^T + q dk^T (twice the depth, ~20% faster than two products).
        # (contiguous scaled keys for ``s``: a view into the pair runs ~4% slower in BLAS)
        scaled_kb = kb * spec.scale
        scaled_dkb = None if dkb is None else dkb * spec.scale
        paired_keys = None if dkb is None else torch.cat([scaled_kb, scaled_dkb], dim=-1)
        for qi, rows in enumerate(row_spans):
            qb = _span(q, -2, rows[0], rows[1])
            s = _scores(spec, qb, scaled_kb, _slice(mask, rows, cols), rows, cols, groups)
            if s is None:
                continue
            t = None
            if has_t:
                dqb = None if dq is None else _span(dq, -2, rows[0], rows[1])
                if dqb is not None and paired_keys is not None:
                    t = _matmul(torch.cat([dqb, qb], dim=-1), paired_keys.mT, groups)
                elif dqb is not None:
                    t = _matmul(dqb, scaled_kb.mT, groups)
                elif scaled_dkb is not None:
                    t = _matmul(qb, scaled_dkb.mT, groups)
                block_dmask = _slice(dmask, rows, cols)
                if block_dmask is not None:
                    # (never a view of the caller's tensor: ``t`` is scaled in place below)
                    t = block_dmask.expand(s.shape).clone() if t is None else _in_place("add", t, block_dmask)
            _update(spec, state[qi], s, t, values, vb, e, dvb is not None, (qi, ki), keep_scale, groups)
    outputs = []
    for qi, (r0, r1) in enumerate(row_spans):
        outputs.append(_finish(spec, state[qi], _span(q, -2, r0, r1), e))
        state[qi] = _Rows()  # free the running sums as soon as their rows are done
    o, lse, do, dl = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=3) for parts in zip(*outputs))
    return o, lse.squeeze(-1), do, dl.squeeze(-1)


def _update(
    spec: Spec,
    st: _Rows,
    s: Tensor,
    t: Opt,
    values: Tensor,
    t_values: Tensor,
    e: int,
    has_dv: bool,
    index: tuple[int, int],
    keep_scale: float,
    groups: int,
) -> None:
    """Fold one block of scores ``s`` (and their tangent ``t``) into the rows' running state."""
    block_peak = s.detach().amax(-1, keepdim=True)
    new_peak = block_peak if st.peak is None else torch.maximum(st.peak, block_peak)
    finite_peak = torch.where(new_peak == -math.inf, 0.0, new_peak)
    p = _in_place("exp", _in_place("sub", s, finite_peak))
    kept = None
    block_total = p.sum(-1, keepdim=True)
    if spec.dropout_p > 0:
        kept = keep_mask(spec, p.shape, index, p.device) * keep_scale
        products = _matmul(p * kept, values, groups)
    else:
        products = _matmul(p, values, groups)
    block_o = _span(products, -1, 0, e)
    block_t = _span(products, -1, e, 2 * e) if has_dv else None
    block_dl = None
    if t is not None:
        pt = _in_place("mul", t, p)
        block_dl = pt.sum(-1, keepdim=True)
        block_t = _add(block_t, _matmul(pt if kept is None else pt * kept, t_values, groups))
    if st.peak is None:
        st.total, st.acc_o, st.acc_t, st.acc_dl = block_total, block_o, block_t, block_dl
    else:
        # Rescale what was summed under the old running maximum (the online softmax).
        alpha = torch.exp(torch.where(st.peak == -math.inf, -math.inf, st.peak - finite_peak))
        st.total = st.total * alpha + block_total
        st.acc_o = st.acc_o * alpha + block_o
        st.acc_t = _rescaled_sum(st.acc_t, alpha, block_t)
        st.acc_dl = _rescaled_sum(st.acc_dl, alpha, block_dl)
    st.peak = new_peak


def _finish(spec: Spec, st: _Rows, qb: Tensor, e: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(o, lse, do, dl)`` of a block of rows from its running state."""
    shape = (*qb.shape[:-1], 1)
    if st.peak is None:  # the band hides every key from these rows
        zeros = qb.new_zeros((*qb.shape[:-1], e))
        return zeros, qb.new_full(shape, spec.dead_lse), zeros, qb.new_zeros(shape)
    dead = st.total == 0
    safe_total = torch.where(dead, 1.0, st.total)
    o = st.acc_o / safe_total
    lse = torch.where(dead, spec.dead_lse, torch.where(dead, 0.0, st.peak) + torch.log(safe_total))
    dl = qb.new_zeros(shape) if st.acc_dl is None else st.acc_dl / safe_total
    do = torch.zeros_like(o) if st.acc_t is None else st.acc_t / safe_total
    if st.acc_dl is not None:
        do = do - dl * o
    return o, lse, do, dl


def _rescaled_sum(acc: Opt, alpha: Tensor, term: Opt) -> Opt:
    if acc is None:
        return term
    acc = acc * alpha
    return acc if term is None else acc + term


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


def _add(a: Opt, b: Opt) -> Opt:
    if a is None:
        return b
    return a if b is None else a + b


def _reduce_to(grad: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum a block gradient over the dimensions a broadcast mask block had as 1."""
    dims = [i for i, (g, m) in enumerate(zip(grad.shape, shape)) if m == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


def _assemble(blocks: dict[tuple[int, int], Tensor], mask: Tensor, spec: Spec) -> Tensor:
    """A mask-shaped gradient from per-block pieces (zero for hidden blocks, summed where the mask broadcasts)."""
    row_spans = _spans(mask.shape[-2], spec.block_query) if mask.shape[-2] != 1 else None
    col_spans = _spans(mask.shape[-1], spec.block_key) if mask.shape[-1] != 1 else None
    if row_spans is None and col_spans is None:
        total = torch.zeros_like(mask)
        for piece in blocks.values():
            total = total + piece
        return total
    rows: list[Tensor] = []
    by_row: dict[int, dict[int, Tensor]] = {}
    for (qi, ki), piece in blocks.items():
        r = qi if row_spans is not None else 0
        c = ki if col_spans is not None else 0
        slot = by_row.setdefault(r, {})
        slot[c] = piece if c not in slot else slot[c] + piece
    for r, (r0, r1) in enumerate(row_spans or [(0, 1)]):
        pieces = []
        for c, (c0, c1) in enumerate(col_spans or [(0, 1)]):
            piece = by_row.get(r, {}).get(c)
            pieces.append(torch.zeros_like(_span(_span(mask, -2, r0, r1), -1, c0, c1)) if piece is None else piece)
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows, dim=-2)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Opt,
    dq: Opt,
    dk: Opt,
    dv: Opt,
    dmask: Opt,
    o: Tensor,
    lse: Tensor,
    do: Opt,
    dl: Opt,
    go: Opt,
    gl: Opt,
    gdo: Opt,
    gdl: Opt,
    spec: Spec,
    needs: tuple[bool, ...] = (True,) * 8,
) -> tuple[Opt, ...]:
    """Gradients of ``(o, lse, do, dl)`` (cotangents ``go, gl, gdo, gdl``; ``None`` = 0) with respect
    to ``(q, k, v, mask, dq, dk, dv, dmask)``, in that order (``None`` where not needed).

    ``q`` is not scaled; ``lse`` is the one :func:`forward` returned (any value on
    rows that see no key). Memory O(N·d) plus a few blocks, like :func:`forward`.
    """
    groups, length, key_length = q.shape[2], q.shape[3], k.shape[2]
    scale = spec.scale
    qs = q * scale
    dqs = None if dq is None else dq * scale
    lse = lse.unsqueeze(-1)
    has_t = dq is not None or dk is not None or dmask is not None
    if do is None:
        do = torch.zeros_like(o)
    if dl is None:
        dl = torch.zeros_like(lse)
    else:
        dl = dl.unsqueeze(-1)
    gl = None if gl is None else gl.unsqueeze(-1)
    gdl = None if gdl is None else gdl.unsqueeze(-1)
    # Row-wise cotangents: what reaches o and dl through do = ... - dl * o.
    bar_o = go
    bar_dl = gdl
    if gdo is not None:
        bar_o = _add(bar_o, -dl * gdo) if has_t else bar_o
        bar_dl = _add(bar_dl, -_rowdot(gdo, o))
    row_sum = torch.zeros_like(lse)  # D_i = sum_k p_ik dL/dp_ik
    if bar_o is not None:
        row_sum = row_sum + _rowdot(bar_o, o)
    if gdo is not None:
        row_sum = row_sum + _rowdot(gdo, do + dl * o)
    if bar_dl is not None and has_t:
        row_sum = row_sum + bar_dl * dl
    keep_scale = 1.0 / (1.0 - spec.dropout_p) if spec.dropout_p > 0 else 1.0

    grads_q: list[Opt] = []
    grads_dq: list[Opt] = []
    grads_k: dict[int, Opt] = {}
    grads_v: dict[int, Opt] = {}
    grads_dk: dict[int, Opt] = {}
    grads_dv: dict[int, Opt] = {}
    mask_blocks: dict[tuple[int, int], Tensor] = {}
    dmask_blocks: dict[tuple[int, int], Tensor] = {}
    key_spans = _spans(key_length, spec.block_key)
    for qi, rows in enumerate(_spans(length, spec.block_query)):
        r0, r1 = rows
        qb, lse_b, sum_b = _span(qs, -2, r0, r1), _span(lse, -2, r0, r1), _span(row_sum, -2, r0, r1)
        dqb = None if dqs is None else _span(dqs, -2, r0, r1)
        bar_o_b = None if bar_o is None else _span(bar_o, -2, r0, r1)
        gdo_b = None if gdo is None else _span(gdo, -2, r0, r1)
        bar_dl_b = None if bar_dl is None else _span(bar_dl, -2, r0, r1)
        gl_b = None if gl is None else _span(gl, -2, r0, r1)
        gq_b = gdq_b = None
        for ki, cols in enumerate(key_spans):
            c0, c1 = cols
            kb, vb = _span(k, -2, c0, c1), _span(v, -2, c0, c1)
            s = _scores(spec, qb, kb, _slice(mask, rows, cols), rows, cols, groups)
            if s is None:
                continue
            p = torch.exp(s - lse_b)
            dkb = None if dk is None else _span(dk, -2, c0, c1)
            dvb = None if dv is None else _span(dv, -2, c0, c1)
            t = _score_tangent(qb, kb, dqb, dkb, _slice(dmask, rows, cols), groups) if has_t else None
            w, kept = p, None
            if spec.dropout_p > 0:
                kept = keep_mask(spec, p.shape, (qi, ki), p.device) * keep_scale
                w = p * kept
            # dL/dp = kept * (bar_o.v + gdo.dv + t * gdo.v) + bar_dl * t
            grad_p = None
            if bar_o_b is not None:
                grad_p = _matmul(bar_o_b, vb.mT, groups)
            a = None
            if gdo_b is not None:
                if dvb is not None:
                    grad_p = _add(grad_p, _matmul(gdo_b, dvb.mT, groups))
                if t is not None:
                    a = _matmul(gdo_b, vb.mT, groups)
                    grad_p = _add(grad_p, t * a)
            if grad_p is not None and kept is not None:
                grad_p = kept * grad_p
            if t is not None and bar_dl_b is not None:
                grad_p = _add(grad_p, bar_dl_b * t)
            centre = -sum_b if gl_b is None else gl_b - sum_b
            grad_s = p * (centre if grad_p is None else grad_p + centre)
            grad_t = None
            if t is not None:
                if bar_dl_b is not None:
                    grad_t = p * bar_dl_b
                if a is not None:
                    grad_t = _add(grad_t, w * a)
            # scores s = qs k^T (+ mask); tangent t = dqs k^T + qs dk^T (+ dmask)
            gq_b = _add(gq_b, _matmul(grad_s, kb, groups))
            if grad_t is not None and dkb is not None:
                gq_b = gq_b + _matmul(grad_t, dkb, groups)
            if needs[1]:
                term = _grouped(grad_s).mT @ _grouped(qb)
                if grad_t is not None and dqb is not None:
                    term = term + _grouped(grad_t).mT @ _grouped(dqb)
                grads_k[ki] = _add(grads_k.get(ki), term)
            if needs[2]:
                term = _grouped(w).mT @ _grouped(bar_o_b) if bar_o_b is not None else None
                if gdo_b is not None and t is not None:
                    term = _add(term, _grouped(w * t).mT @ _grouped(gdo_b))
                if term is not None:
                    grads_v[ki] = _add(grads_v.get(ki), term)
            if needs[4] and dq is not None and grad_t is not None:
                gdq_b = _add(gdq_b, _matmul(grad_t, kb, groups))
            if needs[5] and dk is not None and grad_t is not None:
                grads_dk[ki] = _add(grads_dk.get(ki), _grouped(grad_t).mT @ _grouped(qb))
            if needs[6] and dv is not None and gdo_b is not None:
                grads_dv[ki] = _add(grads_dv.get(ki), _grouped(w).mT @ _grouped(gdo_b))
            if needs[3] and mask is not None:
                mask_blocks[(qi, ki)] = _reduce_to(grad_s, _slice(mask, rows, cols).shape)
            if needs[7] and dmask is not None and grad_t is not None:
                dmask_blocks[(qi, ki)] = _reduce_to(grad_t, _slice(dmask, rows, cols).shape)
        grads_q.append(gq_b if gq_b is not None else torch.zeros_like(qb))
        grads_dq.append(gdq_b if gdq_b is not None else (None if dq is None else torch.zeros_like(qb)))

    def keys(parts: dict[int, Opt], like: Tensor) -> Tensor:
        pieces = []
        for ki, (c0, c1) in enumerate(key_spans):
            piece = parts.get(ki)
            pieces.append(torch.zeros_like(_span(like, -2, c0, c1)) if piece is None else piece)
        return torch.cat(pieces, dim=-2)

    gq = torch.cat(grads_q, dim=3) * scale if needs[0] else None
    gk = keys(grads_k, k) if needs[1] else None
    gv = keys(grads_v, v) if needs[2] else None
    gmask = None
    if needs[3] and mask is not None and mask.dtype != torch.bool:
        gmask = _assemble(mask_blocks, mask, spec)
    gdq = torch.cat(grads_dq, dim=3) * scale if needs[4] and dq is not None else None
    gdk = keys(grads_dk, dk) if needs[5] and dk is not None else None
    gdv = keys(grads_dv, dv) if needs[6] and dv is not None else None
    gdmask = None
    if needs[7] and dmask is not None:
        gdmask = _assemble(dmask_blocks, dmask, spec)
    return gq, gk, gv, gmask, gdq, gdk, gdv, gdmask
