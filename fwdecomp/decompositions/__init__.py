"""fwdecomp's library of decompositions, one module per family of operators.

Importing this package registers every built-in decomposition.

- :mod:`~fwdecomp.decompositions.distance`: ``cdist`` (all routes), ``pdist`` and their backward operators
- :mod:`~fwdecomp.decompositions.linalg`: ``cholesky``
- :mod:`~fwdecomp.decompositions.attention`: fused attention kernels (float32 attention on CPU)
- :mod:`~fwdecomp.decompositions.reduce`: ``index_reduce``, ``segment_reduce`` and its backward operator
"""

from __future__ import annotations

import functools

from fwdecomp.registry import register_decomposition

#: Register one of fwdecomp's own decompositions (``restore_builtin`` can bring it back).
builtin = functools.partial(register_decomposition, _builtin=True)

from fwdecomp.decompositions import attention, distance, linalg  # noqa: E402
from fwdecomp.decompositions import reduce  # noqa: E402

__all__ = ["attention", "builtin", "distance", "linalg", "reduce"]
