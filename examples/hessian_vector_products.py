"""Hessian-vector products (forward-over-reverse) through ``cdist`` and ``grid_sample``.

``H v = jvp(grad(loss), (params,), (v,))`` costs about two gradients and never
forms ``H``: it is how curvature is measured (sharpness, the top Hessian
eigenvalue), how Newton-CG and natural-gradient methods step, and how
influence functions are computed. Forward mode runs through the *backward*
pass too, so every backward operator needs a forward formula.

- ``[cdist]``: a radial-basis-function network (``torch.cdist`` to learned
  centres). PyTorch alone: ``_cdist_forward`` / ``_euclidean_dist`` and
  ``_cdist_backward`` have no forward formula. With fwdecomp: HVPs, checked
  against finite differences of the gradient, and the dominant Hessian
  eigenvalue by power iteration.
- ``[grid_sample]``: aligning an image by an affine warp (``F.affine_grid`` +
  ``F.grid_sample``), a spatial-transformer step. With the full Hessian of the
  six warp parameters (six HVPs) it takes a Newton step.

Each part prints what PyTorch alone does and what it does with fwdecomp; the
exit code is 0 only if every part works with fwdecomp.

    python examples/hessian_vector_products.py
    python examples/hessian_vector_products.py --tiny     # the size the tests run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

import fwdecomp

f64 = torch.float64


def tiny_requested() -> bool:
    return "--tiny" in sys.argv or os.environ.get("FWDECOMP_EXAMPLES_TINY") == "1"


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0]}"


def hvp(loss: Callable, params: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward-over-reverse: the JVP of the gradient."""
    return jvp(grad(loss), (params,), (v,))[1]


def hvp_by_differences(loss: Callable, params: dict, v: dict, eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """Central differences of the reverse-mode gradient along ``v`` (no forward mode anywhere)."""

    def gradient(shift: float) -> dict[str, torch.Tensor]:
        point = {k: (p + shift * v[k]).detach().requires_grad_() for k, p in params.items()}
        grads = torch.autograd.grad(loss(point), list(point.values()))
        return dict(zip(point, grads))

    plus, minus = gradient(eps), gradient(-eps)
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in params}


def relative_error(got: dict, want: dict) -> float:
    diff = math.sqrt(sum(float((got[k] - want[k]).pow(2).sum()) for k in want))
    return diff / math.sqrt(sum(float(want[k].pow(2).sum()) for k in want))


def try_without_fwdecomp(tag: str, loss: Callable, params: dict, v: dict) -> None:
    """Print what PyTorch alone does with the HVP (it raises for these operators)."""
    try:
        hvp(loss, params, v)
        print(f"[{tag}] PyTorch alone:  the HVP ran")
    except (NotImplementedError, RuntimeError) as error:
        print(f"[{tag}] PyTorch alone:  {first_line(error)}")


# --- [cdist] a radial-basis-function network -------------------------------------------------


class RBFNetwork(nn.Module):
    """``f(x) = sum_j w_j exp(-|x - c_j|^2 / s^2)``, with learned centres ``c``, weights ``w`` and width ``s``."""

    def __init__(self, centres: int, dim: int = 2) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(centres, dim, dtype=f64))
        self.weights = nn.Parameter(0.1 * torch.randn(centres, dtype=f64))
        self.log_width = nn.Parameter(torch.zeros((), dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(x, self.centres)
        return torch.exp(-((distance / self.log_width.exp()) ** 2)) @ self.weights


def cdist_part(tiny: bool) -> bool:
    torch.manual_seed(0)
    points, centres, iterations = (8, 4, 3) if tiny else (200, 32, 30)
    model = RBFNetwork(centres)
    x = 2 * torch.rand(points, 2, dtype=f64) - 1
    y = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    v = {k: torch.randn_like(p) for k, p in params.items()}
    route = "_euclidean_dist (more than 25 rows)" if points > 25 else "_cdist_forward"
    print(f"[cdist] RBF network, {points} points, {centres} centres; torch.cdist runs {route}")
    try_without_fwdecomp("cdist", loss, params, v)
    with fwdecomp.enabled():
        try:
            got = hvp(loss, params, v)
        except Exception as error:
            print(f"[cdist] with fwdecomp:  FAILED: {first_line(error)}")
            return False
        error = relative_error(got, hvp_by_differences(loss, params, v))
        print(f"[cdist] with fwdecomp:  HVP matches finite differences of the gradient (relative error {error:.1e})")
        # The dominant Hessian eigenvalue (largest in magnitude: the loss surface's sharpness), by power iteration.
        u = {k: t / math.sqrt(sum(float(s.pow(2).sum()) for s in v.values())) for k, t in v.items()}
        eigenvalue = 0.0
        for _ in range(iterations):
            hu = hvp(loss, params, u)
            eigenvalue = sum(float((hu[k] * u[k]).sum()) for k in u)
            norm = math.sqrt(sum(float(t.pow(2).sum()) for t in hu.values()))
            u = {k: t / norm for k, t in hu.items()}
        print(f"[cdist] with fwdecomp:  dominant Hessian eigenvalue ~ {eigenvalue:.4f} ({iterations} HVPs)")
    return error < 1e-6


# --- [grid_sample] aligning an image by an affine warp -------------------------------------------


def blobs(size: int, shift: tuple[float, float]) -> torch.Tensor:
    """A smooth test image (two Gaussian blobs), shifted by ``shift`` in normalised coordinates."""
    axis = torch.linspace(-1, 1, size, dtype=f64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    xx, yy = xx - shift[0], yy - shift[1]
    image = torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.08) + 0.6 * torch.exp(-((xx + 0.35) ** 2 + yy**2) / 0.1)
    return image[None, None]


def grid_sample_part(tiny: bool) -> bool:
    size = 8 if tiny else 48
    fixed, moving = blobs(size, (0.0, 0.0)), blobs(size, (0.12, -0.08))
    # A first guess near the identity. (Not the identity itself: there every sample lands exactly on a pixel
    # centre, where bilinear interpolation has a kink, and derivatives are one-sided.)
    guess = torch.tensor([[[0.97, 0.05, 0.013], [-0.04, 1.02, -0.021]]], dtype=f64)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        grid = F.affine_grid(p["theta"], list(fixed.shape), align_corners=False)
        warped = F.grid_sample(moving, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return ((warped - fixed) ** 2).mean()

    params = {"theta": guess}
    v = {"theta": torch.randn_like(guess)}
    print(f"[grid_sample] affine alignment of a {size}x{size} image (6 warp parameters)")
    try_without_fwdecomp("grid_sample", loss, params, v)
    with fwdecomp.enabled():
        try:
            got = hvp(loss, params, v)
            # The full 6x6 Hessian from six HVPs, then one Newton step.
            basis = torch.eye(6, dtype=f64).reshape(6, 1, 2, 3)
            hessian = torch.stack([hvp(loss, params, {"theta": e})["theta"].reshape(6) for e in basis])
        except Exception as error:
            print(f"[grid_sample] with fwdecomp:  FAILED: {first_line(error)}")
            return False
        error = relative_error(got, hvp_by_differences(loss, params, v))
        print(
            f"[grid_sample] with fwdecomp:  HVP matches finite differences of the gradient (relative error {error:.1e})"
        )
        gradient = grad(loss)(params)["theta"].reshape(6)
        step = torch.linalg.solve(hessian, gradient).reshape(1, 2, 3)
        before = after = loss(params).item()
        scale = 1.0
        while scale > 1e-3:  # backtracking: the loss need not be convex this far from the optimum
            after = loss({"theta": guess - scale * step}).item()
            if after < before:
                break
            scale /= 2
        print(f"[grid_sample] with fwdecomp:  Newton step (x{scale:g}): alignment loss {before:.2e} -> {after:.2e}")
    return error < 1e-6 and after < before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small size the tests run")
    tiny = parser.parse_args().tiny or tiny_requested()
    results = {"cdist": cdist_part(tiny), "grid_sample": grid_sample_part(tiny)}
    failed = [name for name, ok in results.items() if not ok]
    print("every part works with fwdecomp" if not failed else f"FAILED with fwdecomp: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
