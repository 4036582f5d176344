"""fwdecomp's library of decompositions, one module per family of operators.

Importing this package registers every built-in decomposition.

- :mod:`~fwdecomp.decompositions.distance`: ``cdist`` (all routes), ``pdist`` and their backward operators
- :mod:`~fwdecomp.decompositions.linalg`: ``cholesky``, ``ormqr``
- :mod:`~fwdecomp.decompositions.attention`: fused attention kernels (float32 attention on CPU)
- :mod:`~fwdecomp.decompositions.ctc`: ``_ctc_loss`` (``F.ctc_loss``) and ``_ctc_loss_backward``
- :mod:`~fwdecomp.decompositions.embedding`: ``_embedding_bag`` (``F.embedding_bag``) and its backward operators
- :mod:`~fwdecomp.decompositions.loss_margin`: ``multi_margin_loss``, ``multilabel_margin_loss_forward`` and
  their backward operators
- :mod:`~fwdecomp.decompositions.sampling`: ``grid_sampler_2d`` / ``grid_sampler_3d`` (``F.grid_sample``)
  and their backward operators
- :mod:`~fwdecomp.decompositions.reduce`: ``index_reduce``, ``segment_reduce`` and its backward operator
- :mod:`~fwdecomp.decompositions.loss`: backward operators of ``huber_loss``, ``soft_margin_loss``, ``mse_loss``
- :mod:`~fwdecomp.decompositions.linear_cross_entropy`: the chunked operators of ``F.linear_cross_entropy``
  (torch >= 2.13), for forward-over-reverse
- :mod:`~fwdecomp.decompositions.activation`: ``hardsigmoid_backward``
- :mod:`~fwdecomp.decompositions.dropout`: ``native_dropout_backward`` (``native_dropout`` is native)
"""

from __future__ import annotations

import functools

from fwdecomp.registry import register_decomposition

#: Register one of fwdecomp's own decompositions (``restore_builtin`` can bring it back).
builtin = functools.partial(register_decomposition, _builtin=True)

from fwdecomp.decompositions import (  # noqa: E402
    activation,
    attention,
    ctc,
    distance,
    dropout,
    embedding,
    linalg,
    linear_cross_entropy,
    loss,
    loss_margin,
    reduce,
    sampling,
)

__all__ = [
    "activation",
    "attention",
    "builtin",
    "ctc",
    "distance",
    "dropout",
    "embedding",
    "linalg",
    "linear_cross_entropy",
    "loss",
    "loss_margin",
    "reduce",
    "sampling",
]
