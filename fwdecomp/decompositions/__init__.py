"""fwdecomp's library of decompositions, one module per family of operators.

Importing this package registers every built-in decomposition.

- :mod:`~fwdecomp.decompositions.distance`: ``cdist`` (all routes), ``pdist`` and their backward operators
- :mod:`~fwdecomp.decompositions.linalg`: ``cholesky``
- :mod:`~fwdecomp.decompositions.attention`: fused attention kernels (float32 attention on CPU)
- :mod:`~fwdecomp.decompositions.ctc`: ``_ctc_loss`` (``F.ctc_loss``) and ``_ctc_loss_backward``
- :mod:`~fwdecomp.decompositions.embedding`: ``_embedding_bag`` (``F.embedding_bag``) and its backward operators
- :mod:`~fwdecomp.decompositions.loss_margin`: ``multi_margin_loss``, ``multilabel_margin_loss_forward`` and
  their backward operators
- :mod:`~fwdecomp.decompositions.sampling`: ``grid_sampler_2d`` / ``grid_sampler_3d`` (``F.grid_sample``)
  and their backward operators
"""

from __future__ import annotations

import functools

from fwdecomp.registry import register_decomposition

#: Register one of fwdecomp's own decompositions (``restore_builtin`` can bring it back).
builtin = functools.partial(register_decomposition, _builtin=True)

from fwdecomp.decompositions import attention, ctc, distance, embedding, linalg, loss_margin, sampling  # noqa: E402

__all__ = ["attention", "builtin", "ctc", "distance", "embedding", "linalg", "loss_margin", "sampling"]
