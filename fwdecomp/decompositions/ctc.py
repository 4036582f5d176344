"""Connectionist temporal classification: ``_ctc_loss`` (``F.ctc_loss``) and ``_ctc_loss_backward``.

``F.ctc_loss`` reaches ``aten::_ctc_loss`` (lengths as int lists) or
``aten::_ctc_loss.Tensor`` (lengths as tensors); neither has a forward formula,
nor has ``_ctc_loss_backward``, which forward-over-reverse differentiates.

The decomposition is the forward algorithm in log space: the extended label
sequence (blank, l1, blank, l2, ..., blank) of every batch entry, and one
step per time step, vectorised over the batch and the extended labels:
``alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2)) +
log_probs[t, l'(s)]``, the last term only where ``l'(s) != l'(s-2)``. The
backward operator runs the same recursion on the time- and label-reversed
problem to get the betas.

Convention (a decision): PyTorch's reverse mode for ``_ctc_loss`` returns
``exp(log_probs) - exp(log(alpha beta) + nll - log_probs)`` for ``t <
input_length``: the true derivative of the loss with respect to
``log_probs`` *plus* ``exp(log_probs)``, a term that vanishes only after the
backward of a ``log_softmax`` (PyTorch assumes its input is one; see
pytorch/pytorch#52241). So that forward and reverse mode agree for the operator
itself, the tangent of ``neg_log_likelihood`` carries the same extra term,
``sum_t<T, c exp(log_probs) * tangent``: it equals finite differences whenever
the tangent is one of a ``log_softmax`` output (the documented input), and
equals reverse mode always. ``log_alpha`` gets its true tangent (PyTorch does
not differentiate it) since ``_ctc_loss_backward`` reads it; that backward
operator therefore takes the derivative of the loss it reads from
``log_alpha`` (true), not from the ``neg_log_likelihood`` input, so Hessians
equal finite differences of PyTorch's gradient for any input.

Other conventions (PyTorch's): with ``zero_infinity`` an infinite loss keeps
its value (``F.ctc_loss`` zeroes it) and has derivative 0; without it, an
impossible alignment has a NaN derivative, as in reverse mode. An empty input
(``input_length == 0``) has loss 0 (empty target) or inf, derivative 0.
Entries of ``log_alpha`` the kernel leaves uninitialised (``t >=
input_length`` or beyond ``2 * target_length``) are ``-inf`` here.

Under ``torch.func`` transforms, pass the lengths as tensors when
``reduction='mean'``: with int lists PyTorch's ``ctc_loss`` builds a tensor from
them in a way functorch's wrappers reject ("Cannot access data pointer of
Tensor that doesn't have storage"), after ``_ctc_loss`` returns.

Example:
    >>> import torch, torch.nn.functional as F, fwdecomp
    >>> log_probs = torch.randn(6, 2, 4, dtype=torch.float64).log_softmax(-1)
    >>> targets, lengths = torch.tensor([[1, 2], [3, 3]]), (torch.tensor([6, 5]), torch.tensor([2, 2]))
    >>> with fwdecomp.enabled():
    ...     loss, tangent = torch.func.jvp(
    ...         lambda lp: F.ctc_loss(lp, targets, *lengths), (log_probs,), (torch.randn_like(log_probs),))
    >>> torch.allclose(loss, F.ctc_loss(log_probs, targets, *lengths))
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from fwdecomp.decompositions import builtin
from fwdecomp.registry import Sample
from fwdecomp.tangent_rules import with_tangent_rule

aten = torch.ops.aten

__all__ = ["ctc_loss", "ctc_loss_backward"]

#: Stands for log(0) inside the recursions: finite, so that every step has finite
#: derivatives (a logsumexp of -inf terms only has a NaN one); mapped to -inf at the end.
_LOG_ZERO = -1e30
_UNREACHED = _LOG_ZERO / 2


Lengths = Sequence[int] | torch.Tensor


@dataclass
class _Problem:
    """The extended label sequences of a batch, and its lengths, as ``(B, S)`` / ``(B,)`` tensors."""

    labels: torch.Tensor  # l'(s); blank where s > 2 * target_length
    skips: torch.Tensor  # window positions of alpha_{t-1}(s-2), (s-1), s in the (S + 2)-padded row
    input_lengths: torch.Tensor
    target_lengths: torch.Tensor
    states: int

    @property
    def last_state(self) -> torch.Tensor:
        return 2 * self.target_lengths

    def valid(self, steps: int) -> torch.Tensor:
        """``(T, B, S)``: the entries ``t < input_length``, ``s <= 2 * target_length``."""
        device = self.labels.device
        t = torch.arange(steps, device=device).view(-1, 1, 1)
        s = torch.arange(self.states, device=device).view(1, 1, -1)
        return (t < self.input_lengths.view(1, -1, 1)) & (s <= self.last_state.view(1, -1, 1))


def _as_lengths(lengths: Lengths, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise RuntimeError(f"{name} must be integral")
        return lengths.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.tensor(list(lengths), dtype=torch.int64, device=device)


def _check(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> None:
    """PyTorch's input rules for ``_ctc_loss`` (``ctc_loss_allocate_outputs``)."""
    where = "(while checking arguments for ctc_loss_allocate_outputs)"
    if targets.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(
            f"Expected tensor for argument #2 'targets' to have scalar type Long; but got {targets.dtype}"
        )
    if log_probs.dim() != 3:
        raise RuntimeError(
            f"Expected 3-dimensional tensor, but got {log_probs.dim()}-dimensional tensor for argument #1 "
            f"'log_probs' {where}"
        )
    if targets.dim() not in (1, 2):
        raise RuntimeError(
            f"Expected 1 to 2 dimensions, but got {targets.dim()}-dimensional tensor for argument #2 'targets'"
        )
    steps, batch, classes = log_probs.shape
    if not 0 <= blank < classes:
        raise RuntimeError("blank must be in label range")
    if input_lengths.numel() != batch:
        raise RuntimeError("input_lengths must be of size batch_size")
    if target_lengths.numel() != batch:
        raise RuntimeError("target_lengths must be of size batch_size")
    if bool((target_lengths < 0).any()):
        raise RuntimeError(f"Expected target_lengths to have value at least 0 {where}")
    if targets.dim() == 1 and targets.shape[0] != int(target_lengths.sum()):
        raise RuntimeError(
            f"Expected tensor to have size {int(target_lengths.sum())} at dimension 0, but got size "
            f"{targets.shape[0]} for argument #2 'targets' {where}"
        )
    if targets.dim() == 2:
        if targets.shape[0] != batch:
            raise RuntimeError(
                f"Expected tensor to have size {batch} at dimension 0, but got size {targets.shape[0]} "
                f"for argument #2 'targets' {where}"
            )
        longest = int(target_lengths.max()) if batch else 0
        if targets.shape[1] < longest:
            raise RuntimeError(
                f"Expected tensor to have size at least {longest} at dimension 1, but got size "
                f"{targets.shape[1]} for argument #2 'targets' {where}"
            )
    if bool((input_lengths < 0).any()):
        raise RuntimeError(f"Expected input_lengths to have value at least 0 {where}")
    if bool((input_lengths > steps).any()):
        raise RuntimeError(f"Expected input_lengths to have value at most {steps} {where}")


def _problem(
    log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Lengths, target_lengths: Lengths, blank: int
) -> _Problem:
    device = log_probs.device
    inputs = _as_lengths(input_lengths, "input_lengths", device)
    lengths = _as_lengths(target_lengths, "target_lengths", device)
    _check(log_probs, targets, inputs, lengths, blank)
    batch = log_probs.shape[1]
    longest = int(lengths.max()) if batch else 0
    position = torch.arange(longest, device=device)
    inside = position.view(1, -1) < lengths.view(-1, 1)
    if targets.dim() == 2:
        labels = targets[:, :longest].to(device=device, dtype=torch.int64)
    elif targets.numel() == 0:
        labels = torch.full((batch, longest), blank, dtype=torch.int64, device=device)
    else:
        starts = torch.cumsum(lengths, 0) - lengths
        where = (starts.view(-1, 1) + position.view(1, -1)).clamp(max=targets.numel() - 1)
        labels = targets.to(device=device, dtype=torch.int64)[where]
    labels = torch.where(inside, labels, blank)
    states = 2 * longest + 1
    extended = torch.full((batch, states), blank, dtype=torch.int64, device=device)
    extended[:, 1::2] = labels
    return _Problem(extended, _skip_windows(extended), inputs, lengths, states)


def _skip_windows(extended: torch.Tensor) -> torch.Tensor:
    """For each state s, where alpha_{t-1}(s-2), (s-1), (s) sit in the row padded by 2 on the left.

    The first (s-2) points at a padding column (log 0) unless ``l'(s) != l'(s-2)``.
    """
    batch, states = extended.shape
    s = torch.arange(states, device=extended.device)
    window = torch.stack([s, s + 1, s + 2], -1).expand(batch, states, 3).clone()
    previous = torch.cat([extended.new_full((batch, 2), -1), extended], 1)[:, :states]  # l'(s - 2)
    window[..., 0] = torch.where(extended != previous, s, 0)  # column 0 of the padded row is log 0
    window[:, :2, 0] = 0
    return window.reshape(batch, states * 3)


def _forward_variables(extended_log_probs: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The alphas ``(T, B, S)`` of the recursion, log 0 as ``_LOG_ZERO``; loops over time only."""
    steps, batch, states = extended_log_probs.shape
    start = torch.full((batch, states + 2), _LOG_ZERO, dtype=extended_log_probs.dtype, device=windows.device)
    start[:, 2] = 0  # a virtual step before t = 0 that sits in state 0
    alphas = []
    previous = start
    for t in range(steps):
        terms = previous.gather(1, windows).view(batch, states, 3)
        alpha = torch.logsumexp(terms, -1) + extended_log_probs[t]
        alphas.append(alpha)
        previous = F.pad(alpha, (2, 0), value=_LOG_ZERO)
    if not alphas:
        return extended_log_probs.new_zeros(0, batch, states)
    return torch.stack(alphas)


def _extended_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_probs[t, b, l'(s)]`` as ``(T, B, S)``, -inf clamped to log 0."""
    steps = log_probs.shape[0]
    picked = log_probs.gather(2, labels.unsqueeze(0).expand(steps, *labels.shape))
    return picked.clamp_min(_LOG_ZERO)  # no data-dependent branch: it would break under vmap


def _final_entries(values: torch.Tensor, problem: _Problem, absent: float) -> torch.Tensor:
    """``values`` (T, B, S) at ``t = T_b - 1`` and states ``2L``, ``2L - 1``: ``(B, 2)``, ``absent``
    where there is no such entry (an empty input; no second state for an empty target)."""
    steps, batch = values.shape[:2]
    if steps == 0:  # every input is empty
        return values.new_full((batch, 2), absent)
    last = (problem.input_lengths - 1).clamp(min=0)
    rows = F.pad(values[last, torch.arange(batch, device=values.device)], (0, 1), value=absent)
    second = torch.where(problem.target_lengths > 0, problem.last_state - 1, problem.states)
    return rows.gather(1, torch.stack([problem.last_state, second], 1))


def _at_lengths(alphas: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """``alpha_{T-1}`` at states ``2L`` and ``2L - 1`` for every batch entry, ``(B, 2)``, -inf if absent."""
    ends = _final_entries(alphas, problem, _LOG_ZERO)
    return torch.where(ends.detach() > _UNREACHED, ends, float("-inf"))


def _log_likelihood(ends: torch.Tensor, zero_infinity: bool) -> torch.Tensor:
    """logsumexp of the two end states; with ``zero_infinity`` an impossible one has derivative 0 (else NaN)."""
    if not zero_infinity:
        return torch.logsumexp(ends, 1)
    dead = (ends.detach() == float("-inf")).all(1, keepdim=True)
    return torch.where(dead.squeeze(1), float("-inf"), torch.logsumexp(torch.where(dead, 0, ends), 1))


def _reverse_mode_term(log_probs: torch.Tensor, problem: _Problem, keep: torch.Tensor) -> torch.Tensor:
    """Zero, with derivative ``sum_{t < T, c} exp(log_probs)``: PyTorch's reverse-mode extra term."""
    steps = log_probs.shape[0]
    live = torch.arange(steps, device=log_probs.device).view(-1, 1) < problem.input_lengths.view(1, -1)
    weight = (live & keep.view(1, -1)).to(log_probs.dtype).unsqueeze(-1)
    return ((log_probs.exp() - log_probs.detach().exp()) * weight).sum((0, 2))


def _ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int,
    zero_infinity: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(log_probs, targets, input_lengths, target_lengths, blank)
    alphas = _forward_variables(_extended_log_probs(log_probs, problem.labels), problem.skips)
    reached = problem.valid(log_probs.shape[0]) & (alphas.detach() > _UNREACHED)
    log_alpha = torch.where(reached, alphas, float("-inf")).transpose(0, 1)

    log_likelihood = _log_likelihood(_at_lengths(alphas, problem), zero_infinity)
    empty = problem.input_lengths == 0
    empty_loss = torch.where(problem.target_lengths > 0, float("inf"), 0.0).to(log_probs.dtype)
    nll = torch.where(empty, empty_loss, -log_likelihood)
    keep = ~(torch.isinf(nll.detach()) & zero_infinity)
    return nll + _reverse_mode_term(log_probs, problem, keep), log_alpha


def _ctc_samples(device: str, dtype: torch.dtype, tensor_lengths: bool) -> Iterator[Sample]:
    """Samples whose log_alpha the kernel fills completely: full input lengths, equal target lengths.

    (Entries the kernel leaves uninitialised would make finite differences meaningless; other
    lengths are tested against the kernel's meaningful entries in tests/test_sampling_embedding_ctc.py.)
    ``prepare`` applies log_softmax, the input ``_ctc_loss`` expects (see the module docstring).
    """
    gen = torch.Generator(device=device).manual_seed(0)

    def lengths(*values: int) -> Lengths:
        return torch.tensor(values, device=device) if tensor_lengths else list(values)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def log_softmax(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[0].log_softmax(-1)]

    padded = torch.tensor([[2, 2, 1], [3, 1, 4]], device=device)  # the third column is padding
    concatenated = torch.tensor([2, 2, 3, 1], device=device)
    for zero_infinity in (False, True):
        yield Sample(
            (randn(4, 2, 5), padded, lengths(4, 4), lengths(2, 2), 0, zero_infinity),
            note=f"padded targets, zero_infinity={zero_infinity}",
            prepare=log_softmax,
        )
    yield Sample(
        (randn(4, 2, 5), concatenated, lengths(4, 4), lengths(2, 2), 0, False),
        note="concatenated targets",
        prepare=log_softmax,
    )
    if tensor_lengths or dtype != torch.float64:
        return  # the same function: a few samples suffice for the Tensor overload and float32
    blank_last = torch.tensor([[0, 2, 2], [3, 1, 0]], device=device)
    yield Sample(
        (randn(5, 2, 5), blank_last, lengths(5, 5), lengths(3, 3), 4, False),
        note="blank=4, repeated labels",
        prepare=log_softmax,
    )
    yield Sample(
        (randn(3, 2, 5), padded[:, :0], lengths(3, 3), lengths(0, 0), 0, True),
        note="empty targets",
        prepare=log_softmax,
    )
    yield Sample(
        (randn(4, 3, 6).transpose(0, 1)[:, :2], padded.to(torch.int32), lengths(3, 3), lengths(1, 1), 0, False),
        note="non-contiguous log_probs, int32 targets",
        prepare=log_softmax,
    )


def _log_alpha_tangent(
    log_alpha: torch.Tensor,
    extended_log_probs: torch.Tensor,
    tangents: torch.Tensor,
    reached: torch.Tensor,
    problem: _Problem,
) -> torch.Tensor:
    """The tangent of the alphas ``(T, B, S)``, given the alphas themselves: a linear recursion.

    ``alpha_t(s) = logsumexp_k alpha_{t-1}(s_k) + lp_t(l'(s))``, so its tangent is
    ``sum_k w_tsk dalpha_{t-1}(s_k) + dlp_t(l'(s))`` with ``w`` the softmax of those terms,
    which the alphas give for every step at once (the logsumexp is ``alpha_t(s) - lp_t(l'(s))``,
    ``extended_log_probs`` the latter); the recursion is then one batched
    banded matrix-vector product per step. Unreached entries have tangent 0 (as the
    decomposition's ``-inf``).
    """
    steps, batch, states = log_alpha.shape
    padded = F.pad(log_alpha, (2, 0), value=float("-inf"))  # (T, B, S + 2): columns 0, 1 are log 0
    windows = problem.skips.view(batch, states, 3)
    # alpha_{t-1}(s-2), (s-1), (s) for every t >= 1; a skip that is not allowed points at column 0 (log 0)
    index = problem.skips.unsqueeze(0).expand(steps - 1, -1, -1)
    terms = padded[:-1].gather(2, index).view(steps - 1, batch, states, 3)
    total = (log_alpha[1:] - extended_log_probs[1:]).unsqueeze(-1)
    weights = torch.where(reached[1:].unsqueeze(-1), torch.exp(terms - total), 0.0)
    matrix = log_alpha.new_zeros(steps - 1, batch, states, states + 2)
    matrix.scatter_add_(3, windows.unsqueeze(0).expand(steps - 1, -1, -1, -1), weights)
    matrix = matrix[..., 2:]
    # rows of unreached states in `matrix` are 0 already; columns as (B, S, 1) for baddbmm
    tangents = torch.where(reached, tangents, 0.0).unsqueeze(-1)
    current = tangents[0]
    out = [current]
    for t in range(1, steps):
        current = torch.baddbmm(tangents[t], matrix[t - 1], current)
        out.append(current)
    return torch.stack(out).squeeze(-1)


#: Up to this many ``log_probs`` elements, the tangent rule of ``_ctc_loss`` contracts the loss's
#: tangent from PyTorch's backward kernel (one call); beyond, it takes it from the alphas' tangent,
#: which the rule computes anyway (a few dozen small operations, no second pass over the problem:
#: at T=50, B=16, C=20 the JVP takes 2.3 ms instead of 2.6). Both give the decomposition's tangent.
KERNEL_LOSS_TANGENT_MAX_NUMEL = 2048


def _nll_tangent(
    log_alpha: torch.Tensor,
    d_alpha: torch.Tensor,
    log_probs: torch.Tensor,
    d_log_probs: torch.Tensor,
    nll: torch.Tensor,
    problem: _Problem,
    zero_infinity: bool,
) -> torch.Tensor:
    """The tangent of ``neg_log_likelihood`` from the alphas' and theirs, as the decomposition
    differentiates it: ``-sum softmax(ends) d_ends`` over the two end states (NaN for an impossible
    alignment, 0 with ``zero_infinity``; 0 for an empty input), plus PyTorch's reverse-mode extra
    term ``sum_{t < T, c} exp(log_probs) d_log_probs`` (see the module docstring). It costs a few
    small gathers: the backward kernel the loss's tangent was once contracted from cost 2 primals."""
    ends = _final_entries(log_alpha, problem, float("-inf"))
    weights = torch.softmax(ends, 1)  # NaN where both ends are -inf, as logsumexp's derivative
    if zero_infinity:
        weights = torch.where(torch.isinf(ends).all(1, keepdim=True), 0.0, weights)
    d_log_likelihood = (weights * _final_entries(d_alpha, problem, 0.0)).sum(1)
    d_nll = torch.where(problem.input_lengths == 0, 0.0, -d_log_likelihood)
    live = torch.arange(log_probs.shape[0], device=log_probs.device).view(-1, 1) < problem.input_lengths.view(1, -1)
    keep = live & ~(torch.isinf(nll) & zero_infinity).view(1, -1)
    extra = (torch.exp(log_probs) * d_log_probs).sum(2)
    return d_nll + torch.where(keep, extra, 0.0).sum(0)


def _ctc_loss_rule():
    """The tangent rule of ``_ctc_loss``: PyTorch's kernels for the loss, a linear recursion for the alphas.

    ``neg_log_likelihood``'s tangent is the gradient ``_ctc_loss_backward`` returns (PyTorch's
    convention, with its extra term: see the module's docstring) contracted with the tangent
    of ``log_probs``; ``log_alpha``'s follows from the kernel's alphas
    (:func:`_log_alpha_tangent`). Values are the kernel's, ``log_alpha`` with ``-inf``
    where the kernel leaves entries uninitialised, as the decomposition returns it.
    """

    def rule(primals: list, tangents: list):
        log_probs, targets, input_lengths, target_lengths, blank, zero_infinity = primals
        if (
            tangents[0] is None
            or log_probs.dim() != 3
            or log_probs.shape[0] == 0
            or log_probs.dtype
            not in (
                torch.float32,
                torch.float64,
            )
        ):
            return NotImplemented
        d_log_probs = tangents[0]
        nll, raw_log_alpha = aten._ctc_loss(*primals)  # the overload the lengths' type picks
        problem = _problem(log_probs, targets, input_lengths, target_lengths, blank)
        steps = log_probs.shape[0]
        alphas = raw_log_alpha.transpose(0, 1)  # (T, B, S)
        reached = problem.valid(steps) & (alphas > _UNREACHED)
        log_alpha = torch.where(reached, alphas, float("-inf"))
        index = problem.labels.unsqueeze(0).expand(steps, *problem.labels.shape)
        extended = log_probs.gather(2, index)
        d_alpha = _log_alpha_tangent(log_alpha, extended, d_log_probs.gather(2, index), reached, problem)
        if log_probs.numel() <= KERNEL_LOSS_TANGENT_MAX_NUMEL:  # a few dozen small operations cost more
            grad = aten._ctc_loss_backward(torch.ones_like(nll), *primals[:4], nll, raw_log_alpha, blank, zero_infinity)
            d_nll = (grad * d_log_probs).sum((0, 2))
        else:
            d_nll = _nll_tangent(log_alpha, d_alpha, log_probs, d_log_probs, nll, problem, zero_infinity)
        return (nll, log_alpha.transpose(0, 1)), (d_nll, d_alpha.transpose(0, 1))

    return rule


@builtin(aten._ctc_loss.default, samples=functools.partial(_ctc_samples, tensor_lengths=False))
@builtin(aten._ctc_loss.Tensor, samples=functools.partial(_ctc_samples, tensor_lengths=True))
@with_tangent_rule(_ctc_loss_rule())
def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    blank: int = 0,
    zero_infinity: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC negative log-likelihood per batch entry and the log-alphas, as ``_ctc_loss`` returns them."""
    return _ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)


# --- backward ------------------------------------------------------------


def _reversed(problem: _Problem, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time and state maps of the reversed problem: ``t -> T_b - 1 - t``, ``s -> 2 L_b - s`` (clamped)."""
    device = problem.labels.device
    t = torch.arange(steps, device=device).view(-1, 1)
    time = (problem.input_lengths.view(1, -1) - 1 - t).clamp(min=0)  # (T, B)
    s = torch.arange(problem.states, device=device).view(1, -1)
    state = (problem.last_state.view(-1, 1) - s).clamp(min=0)  # (B, S)
    labels = torch.where(s <= problem.last_state.view(-1, 1), problem.labels.gather(1, state), problem.labels)
    return time, state, labels


def _log_betas(log_probs: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """The betas ``(T, B, S)`` (they include ``log_probs`` at ``t``, as PyTorch's), -inf where unreached."""
    steps, batch, classes = log_probs.shape
    time, state, labels = _reversed(problem, steps)
    reversed_log_probs = log_probs.gather(0, time.unsqueeze(-1).expand(steps, batch, classes))
    alphas = _forward_variables(_extended_log_probs(reversed_log_probs, labels), _skip_windows(labels))
    betas = alphas.gather(0, time.unsqueeze(-1).expand(steps, batch, problem.states))
    betas = betas.gather(2, state.unsqueeze(0).expand(steps, batch, problem.states))
    reached = problem.valid(steps) & (betas.detach() > _UNREACHED)
    return torch.where(reached, betas, float("-inf"))


def _occupancy(log_alpha_beta: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c: ``sum_{s: l'(s) = c} exp(ab - m_c)`` and ``m_c`` (the class's largest ab, 0 if none)."""
    steps, batch, states = log_alpha_beta.shape
    index = labels.unsqueeze(0).expand(steps, batch, states)
    peak = torch.full((steps, batch, classes), float("-inf"), dtype=log_alpha_beta.dtype, device=labels.device)
    peak = peak.scatter_reduce(2, index, log_alpha_beta.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, 0)
    terms = torch.exp(log_alpha_beta - peak.gather(2, index))
    total = torch.zeros(steps, batch, classes, dtype=terms.dtype, device=labels.device).scatter_add(2, index, terms)
    return total, peak


def _nll_from_log_alpha(log_alpha: torch.Tensor, neg_log_likelihood: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """``neg_log_likelihood``'s value with the derivative of the loss ``log_alpha`` gives (true derivative)."""
    ends = _at_lengths(torch.where(torch.isfinite(log_alpha), log_alpha, _LOG_ZERO).transpose(0, 1), problem)
    recomputed = -_log_likelihood(ends, zero_infinity=True)
    finite = torch.isfinite(recomputed.detach()) & (problem.input_lengths > 0)
    return neg_log_likelihood.detach() + torch.where(finite, recomputed - recomputed.detach(), 0)


def _ctc_loss_backward(
    grad: torch.Tensor,
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    neg_log_likelihood: torch.Tensor,
    log_alpha: torch.Tensor,
    blank: int,
    zero_infinity: bool,
) -> torch.Tensor:
    problem = _problem(log_probs, targets, input_lengths, target_lengths, blank)
    steps, _, classes = log_probs.shape
    alphas = log_alpha.transpose(0, 1)[:, :, : problem.states]
    alphas = torch.where(problem.valid(steps), alphas, float("-inf"))
    total, peak = _occupancy(alphas + _log_betas(log_probs, problem), problem.labels, classes)
    nll = _nll_from_log_alpha(log_alpha, neg_log_likelihood, problem).view(1, -1, 1)
    result = (log_probs.exp() - total * torch.exp(peak + nll - log_probs)) * grad.view(1, -1, 1)
    live = torch.arange(steps, device=log_probs.device).view(-1, 1) < problem.input_lengths.view(1, -1)
    if zero_infinity:
        live = live & ~torch.isinf(neg_log_likelihood.detach()).view(1, -1)
    return torch.where(live.unsqueeze(-1), result, 0)


def _ctc_backward_samples(device: str, dtype: torch.dtype, tensor_lengths: bool) -> Iterator[Sample]:
    """The backward operator composed with the forward one: ``prepare`` recomputes its
    ``neg_log_likelihood`` and ``log_alpha`` inputs from ``log_probs`` (as in ``torch.func.hessian``)."""
    gen = torch.Generator(device=device).manual_seed(1)
    for sample in _ctc_samples(device, dtype, tensor_lengths):
        log_probs, targets, input_lengths, target_lengths, blank, zero_infinity = sample.args
        op = aten._ctc_loss.Tensor if tensor_lengths else aten._ctc_loss.default
        nll, log_alpha = op(log_probs.log_softmax(-1), targets, input_lengths, target_lengths, blank, zero_infinity)
        grad = torch.randn(nll.shape, dtype=dtype, device=device, generator=gen)

        def forward(tensors: list[torch.Tensor], args=sample.args, op=op) -> list[torch.Tensor]:
            out, log_probs = tensors[0], tensors[1].log_softmax(-1)
            nll, log_alpha = op(log_probs, *args[1:])
            return [out, log_probs, nll, log_alpha]

        args = (grad, log_probs, targets, input_lengths, target_lengths, nll, log_alpha, blank, zero_infinity)
        yield Sample(args, note=sample.note, tangents=(0, 1, 5, 6), prepare=forward)


@builtin(aten._ctc_loss_backward.default, samples=functools.partial(_ctc_backward_samples, tensor_lengths=False))
@builtin(aten._ctc_loss_backward.Tensor, samples=functools.partial(_ctc_backward_samples, tensor_lengths=True))
def ctc_loss_backward(
    grad: torch.Tensor,
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: Lengths,
    target_lengths: Lengths,
    neg_log_likelihood: torch.Tensor,
    log_alpha: torch.Tensor,
    blank: int,
    zero_infinity: bool = False,
) -> torch.Tensor:
    """PyTorch's gradient of ``_ctc_loss`` with respect to ``log_probs`` (its convention, see above)."""
    return _ctc_loss_backward(
        grad, log_probs, targets, input_lengths, target_lengths, neg_log_likelihood, log_alpha, blank, zero_infinity
    )
