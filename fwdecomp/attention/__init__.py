"""Memory-efficient JVP of softmax attention: blockwise, online softmax, O(N·d) extra memory.

- :func:`attention_jvp` — ``(primals, tangents) -> (outputs, output_tangents)`` for
  ``(query, key, value) -> (out, logsumexp)``; what every fused attention
  operator's decomposition calls (and what a JVP rule would register).
- :func:`block_sizes` / :func:`set_block_sizes` — override the automatic block sizes.
- :mod:`~fwdecomp.attention.kernel` — the blockwise forward and its recomputing backward.
- :mod:`~fwdecomp.attention.function` — the ``torch.autograd.Function`` tying them together.
"""

from __future__ import annotations

from fwdecomp.attention.blocks import block_sizes, set_block_sizes
from fwdecomp.attention.function import BlockwiseAttentionJVP, attention_jvp

__all__ = ["BlockwiseAttentionJVP", "attention_jvp", "block_sizes", "set_block_sizes"]
