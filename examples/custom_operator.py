"""A custom operator made forward-differentiable.

A library author's operator (``torch.library.custom_op``) with a kernel
PyTorch cannot see into (here NumPy; in real life CUDA or Triton) and a
hand-written backward. PyTorch alone silently loses forward-mode tangents
through it. This script prints what PyTorch does, what fwdecomp does in
strict mode (a clear error), and the tangents once the operator has a JVP
rule or a decomposition, checked against finite differences.

    python examples/custom_operator.py [--size N]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.autograd import forward_ad

import fwdecomp


@torch.library.custom_op("example::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, computed outside PyTorch."""
    a = x.numpy(force=True)
    return torch.from_numpy(0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3))))


@gelu_tanh.register_fake
def _(x):
    return torch.empty_like(x)


def _derivative(x: torch.Tensor) -> torch.Tensor:
    inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x * x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * _derivative(x)


gelu_tanh.register_autograd(_backward, setup_context=_setup)


def gelu_tanh_jvp(primals, tangents):
    """The JVP rule: the kernel itself for the output, the derivative times the tangent for its tangent."""
    (x,), (dx,) = primals, tangents
    return gelu_tanh(x), _derivative(x) * dx


def gelu_tanh_decomposition(x):
    """The decomposition: the same function written with PyTorch operators that have formulas."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.size, dtype=torch.float64)
    v = torch.randn(args.size, dtype=torch.float64)
    with torch.no_grad():
        eps = 1e-6
        reference = (gelu_tanh(x + eps * v) - gelu_tanh(x - eps * v)) / (2 * eps)

    def jvp():
        return torch.func.jvp(gelu_tanh, (x,), (v,))[1]

    print("PyTorch alone:")
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(gelu_tanh(forward_ad.make_dual(x, v))).tangent
    print(f"  torch.autograd.forward_ad tangent: {tangent}")
    print(f"  torch.func.jvp tangent: all zeros = {bool((jvp() == 0).all())} (the true one is not)")

    with fwdecomp.enabled():  # strict by default
        print("fwdecomp, no rule registered:")
        try:
            jvp()
        except NotImplementedError as error:
            print("  NotImplementedError: " + str(error).splitlines()[0])

        for kind in ("JVP rule", "decomposition"):
            if kind == "JVP rule":
                fwdecomp.register_jvp("example::gelu_tanh")(gelu_tanh_jvp)
            else:
                fwdecomp.unregister_jvp("example::gelu_tanh")
                fwdecomp.register_decomposition("example::gelu_tanh")(gelu_tanh_decomposition)
            error = (jvp() - reference).abs().max().item()
            print(f"fwdecomp with a {kind}: max |tangent - finite differences| = {error:.1e}")
        fwdecomp.unregister_decomposition("example::gelu_tanh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
