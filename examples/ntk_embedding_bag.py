"""The empirical neural tangent kernel of a bag-of-words model, with ``jacfwd`` through ``nn.EmbeddingBag``.

The empirical NTK of a network ``f(x; θ)`` is ``Θ(x, x') = J(x) J(x')ᵀ`` with
``J = ∂f/∂θ``: it describes how a gradient step on one example moves the
prediction on another, and it is the kernel of the linearised network. Here
``J`` comes from ``torch.func.jacfwd`` (forward mode, one JVP per parameter
direction, batched by ``vmap``) through a text classifier whose first layer is
``nn.EmbeddingBag``.

PyTorch alone cannot push a tangent through ``aten::_embedding_bag``. With
fwdecomp the kernel is computed and compared with the same kernel built from
reverse-mode Jacobians (``jacrev``, which PyTorch supports natively).

    python examples/ntk_embedding_bag.py
    python examples/ntk_embedding_bag.py --tiny     # the size the tests run
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacfwd, jacrev

import fwdecomp

f64 = torch.float64

# jacrev (the reference) vmaps PyTorch's embedding_bag backward, which has no batching rule: slow, but right.
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")


def tiny_requested() -> bool:
    return "--tiny" in sys.argv or os.environ.get("FWDECOMP_EXAMPLES_TINY") == "1"


class BagOfWords(nn.Module):
    """Mean of word embeddings (``nn.EmbeddingBag``), then a small MLP to class scores."""

    def __init__(self, vocabulary: int, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocabulary, dim, mode="mean", dtype=f64)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, dtype=f64), nn.Tanh(), nn.Linear(hidden, classes, dtype=f64))

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(tokens, offsets))


def documents(count: int, vocabulary: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` documents of random length as one flat token tensor and their start offsets."""
    lengths = torch.randint(2, 9, (count,), generator=generator)
    tokens = torch.randint(0, vocabulary, (int(lengths.sum()),), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return tokens, offsets


def ntk(jacobian, model: nn.Module, params: dict[str, torch.Tensor], tokens, offsets) -> torch.Tensor:
    """``Θ = J Jᵀ`` over all (document, class) outputs, with ``J`` from ``jacobian`` (jacfwd or jacrev)."""

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (tokens, offsets)).reshape(-1)

    blocks = jacobian(f)(params)  # {name: (outputs, *param.shape)}
    J = torch.cat([block.reshape(block.shape[0], -1) for block in blocks.values()], dim=1)
    return J @ J.T


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small size the tests run")
    tiny = parser.parse_args().tiny or tiny_requested()
    vocabulary, dim, hidden, classes, count = (20, 4, 6, 2, 3) if tiny else (200, 16, 32, 4, 8)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = BagOfWords(vocabulary, dim, hidden, classes)
    params = {k: p.detach() for k, p in model.named_parameters()}
    tokens, offsets = documents(count, vocabulary, generator)
    size = sum(p.numel() for p in params.values())
    print(f"[ntk] {count} documents x {classes} classes, {size} parameters ({vocabulary}x{dim} embedding table)")

    try:
        ntk(jacfwd, model, params, tokens, offsets)
        print("[ntk] PyTorch alone:  jacfwd ran")
    except (NotImplementedError, RuntimeError) as error:
        print(f"[ntk] PyTorch alone:  {type(error).__name__}: {str(error).splitlines()[0]}")

    reference = ntk(jacrev, model, params, tokens, offsets)  # reverse mode: PyTorch supports it natively
    with fwdecomp.enabled():
        try:
            kernel = ntk(jacfwd, model, params, tokens, offsets)
        except Exception as error:
            print(f"[ntk] with fwdecomp:  FAILED: {type(error).__name__}: {str(error).splitlines()[0]}")
            return 1
    error = ((kernel - reference).norm() / reference.norm()).item()
    print(f"[ntk] with fwdecomp:  NTK from jacfwd matches the NTK from jacrev (relative error {error:.1e})")
    eigenvalues = torch.linalg.eigvalsh(kernel).flip(0)
    shown = ", ".join(f"{value:.3g}" for value in eigenvalues[:4])
    print(f"[ntk] with fwdecomp:  {kernel.shape[0]}x{kernel.shape[1]} kernel, largest eigenvalues {shown}")
    return 0 if error < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
