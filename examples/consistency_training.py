"""A consistency / flow-map training step: ``torch.func.jvp`` through a transformer, then backward.

Flow-map models (MeanFlow, continuous-time consistency models) learn the
average velocity ``u(z, r, t)`` of a flow between times ``r`` and ``t``. Their
training target needs the total derivative ``du/dt`` along the flow, which is
one forward-mode JVP through the network:

    u, du_dt = jvp(u_fn, (z, r, t), (v, 0, 1))          # v = dz/dt
    target   = v - (t - r) * du_dt                       # the MeanFlow identity
    loss     = || u - stop_gradient(target) ||^2         # then loss.backward()

The network here is a small transformer built on
``F.scaled_dot_product_attention``. In float32 on the CPU, PyTorch runs the
fused kernel ``_scaled_dot_product_flash_attention_for_cpu``, which has no
forward-mode formula, so PyTorch alone stops at the JVP. With fwdecomp the
step runs, and the JVP is checked against central finite differences of a
float64 copy of the model.

    python examples/consistency_training.py            # a few training steps
    python examples/consistency_training.py --tiny     # the size the tests run
    python -m fwdecomp audit --model examples/consistency_training.py:audit_target
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fwdecomp


def tiny_requested() -> bool:
    return "--tiny" in sys.argv or os.environ.get("FWDECOMP_EXAMPLES_TINY") == "1"


class Block(nn.Module):
    """Pre-norm transformer block: self-attention (SDPA) and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        return h + self.mlp(self.norm2(h))


def time_features(t: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal features of a time in [0, 1], one row per sample."""
    frequencies = torch.exp(torch.linspace(0, math.log(100.0), width // 2, dtype=t.dtype, device=t.device))
    angles = t[:, None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FlowMap(nn.Module):
    """``u(z, r, t)``: the average velocity from time ``r`` to ``t`` of point sets ``z`` (batch, points, 2)."""

    def __init__(self, width: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(2, width)
        self.time = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times = torch.cat([time_features(t, self.width), time_features(t - r, self.width)], dim=-1)
        h = self.embed(z) + self.time(times)[:, None, :]
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h))


def sizes(tiny: bool) -> dict[str, int]:
    if tiny:
        return {"width": 16, "depth": 1, "heads": 2, "batch": 2, "points": 6, "steps": 2}
    return {"width": 32, "depth": 2, "heads": 4, "batch": 16, "points": 24, "steps": 20}


def data(batch: int, points: int, generator: torch.Generator) -> torch.Tensor:
    """Point sets on noisy circles of random radius: the distribution the flow learns to generate."""
    angle = torch.rand(batch, points, generator=generator) * 2 * math.pi
    radius = 0.5 + torch.rand(batch, 1, generator=generator)
    circle = torch.stack([angle.cos(), angle.sin()], dim=-1) * radius[..., None]
    return circle + 0.05 * torch.randn(batch, points, 2, generator=generator)


def flow_sample(x: torch.Tensor, generator: torch.Generator):
    """A point ``z`` on the straight path from data ``x`` (t=0) to noise (t=1), its velocity, and times r <= t."""
    noise = torch.randn(x.shape, generator=generator)
    times = torch.rand(2, x.shape[0], generator=generator)
    r, t = times.min(0).values, times.max(0).values
    z = (1 - t)[:, None, None] * x + t[:, None, None] * noise
    return z, noise - x, r, t


def meanflow_loss(model: nn.Module, z, velocity, r, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The MeanFlow loss; also returns the JVP ``du/dt`` it needed."""
    u, du_dt = torch.func.jvp(model, (z, r, t), (velocity, torch.zeros_like(r), torch.ones_like(t)))
    target = velocity - (t - r)[:, None, None] * du_dt
    return ((u - target.detach()) ** 2).mean(), du_dt


def audit_target(tiny: bool | None = None):
    """``(model, (z, r, t))`` for ``python -m fwdecomp audit --model examples/consistency_training.py:audit_target``."""
    size = sizes(tiny_requested() if tiny is None else tiny)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = FlowMap(size["width"], size["depth"], size["heads"])
    z, _, r, t = flow_sample(data(size["batch"], size["points"], generator), generator)
    return model, (z, r, t)


def jvp_error_against_finite_differences(model: nn.Module, z, velocity, r, t, du_dt) -> float:
    """Relative error of ``du_dt`` against central differences of a float64 copy of the model."""
    wide = copy.deepcopy(model).double()
    z, velocity, r, t = (a.double() for a in (z, velocity, r, t))
    eps = 1e-6
    with torch.no_grad():
        plus = wide(z + eps * velocity, r, t + eps)
        minus = wide(z - eps * velocity, r, t - eps)
    expected = (plus - minus) / (2 * eps)
    return ((du_dt.double() - expected).norm() / expected.norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small size the tests run")
    tiny = parser.parse_args().tiny or tiny_requested()
    size = sizes(tiny)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = FlowMap(size["width"], size["depth"], size["heads"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    z, velocity, r, t = flow_sample(data(size["batch"], size["points"], generator), generator)

    print("PyTorch alone:")
    try:
        meanflow_loss(model, z, velocity, r, t)
        print("  the JVP ran (this PyTorch differentiates the attention kernel forward)")
    except NotImplementedError as error:
        print(f"  NotImplementedError: {str(error).splitlines()[0]}")

    print("With fwdecomp:")
    with fwdecomp.enabled():
        _, du_dt = meanflow_loss(model, z, velocity, r, t)
        error = jvp_error_against_finite_differences(model, z, velocity, r, t, du_dt)
        print(f"  du/dt from jvp vs central differences (float64 copy): relative error {error:.1e}")
        losses = []
        for step in range(size["steps"]):
            z, velocity, r, t = flow_sample(data(size["batch"], size["points"], generator), generator)
            loss, _ = meanflow_loss(model, z, velocity, r, t)
            optimizer.zero_grad()
            loss.backward()  # reverse mode through the primal of the JVP, on fwdecomp's decomposed graph
            optimizer.step()
            losses.append(loss.item())
            if step == 0 or step == size["steps"] - 1 or (step + 1) % 5 == 0:
                print(f"  step {step + 1:3d}  loss {loss.item():.4f}")
    finite = all(math.isfinite(value) for value in losses)
    ok = finite and error < 1e-3
    print("training steps ran" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
