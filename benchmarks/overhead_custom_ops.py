"""Per-call overhead of fwdecomp on calls WITHOUT tangents (the path every plain call takes).

For an aten operator fwdecomp routes (``_cdist_forward`` on tiny inputs) and
a custom operator (``custom_op`` with a backward), the time per call with
fwdecomp disabled, and enabled: routed by a decomposition, by a JVP rule,
or guarded in strict mode. The difference is fwdecomp's Python kernel.

    python benchmarks/overhead_custom_ops.py [--calls N] [--rounds R]

Runs against whichever fwdecomp is importable (``PYTHONPATH=/path/to/other/checkout``
compares another version; parts that version lacks are skipped).
"""

from __future__ import annotations

import argparse
import platform
import timeit

import torch

import fwdecomp


@torch.library.custom_op("overhead_bench::scale", mutates_args=())
def scale(x: torch.Tensor, s: float) -> torch.Tensor:
    return x * s


scale.register_fake(lambda x, s: torch.empty_like(x))
scale.register_autograd(
    lambda ctx, grad: (grad * ctx.s, None), setup_context=lambda ctx, inputs, out: setattr(ctx, "s", inputs[1])
)
OP = torch.ops.overhead_bench.scale.default


def _time(fn, calls: int) -> float:
    return timeit.timeit(fn, number=calls) / calls * 1e6


def _compare(call, setup, teardown, calls: int, rounds: int) -> tuple[float, float]:
    """Best time per call (us) disabled and enabled, measured alternately so machine load hits both alike."""
    disabled, enabled = [], []
    for _ in range(rounds):
        disabled.append(_time(call, calls))
        setup()
        enabled.append(_time(call, calls))
        teardown()
    return min(disabled), min(enabled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    cdist = torch.ops.aten._cdist_forward.default

    def register_decomposition():
        fwdecomp.register_decomposition(OP)(lambda x, s: x * s)

    def register_rule():
        fwdecomp.register_jvp(OP)(lambda p, t: (OP(*p), t[0] * p[1]))

    def unregister():
        if fwdecomp.registry.lookup(OP) is not None:
            fwdecomp.unregister_decomposition(OP)
        if hasattr(fwdecomp, "unregister_jvp"):
            fwdecomp.unregister_jvp(OP)

    cases = [("aten::_cdist_forward", "built-in decomposition", lambda: cdist(x, y, 2.0, None), None, cdist)]
    cases.append(("custom op", "decomposition", lambda: OP(x, 2.0), register_decomposition, OP))
    if hasattr(fwdecomp, "register_jvp"):
        cases.append(("custom op", "JVP rule", lambda: OP(x, 2.0), register_rule, OP))
        cases.append(("custom op", "strict guard (no registration)", lambda: OP(x, 2.0), None, OP))
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}")
    print(f"best of {args.rounds} alternating rounds of {args.calls} calls")
    print(f"{'operator':22s} {'routed by':32s} {'disabled':>9s} {'enabled':>9s} {'overhead':>9s}  (us/call)")
    for name, label, call, register, op in cases:
        if register is not None:
            register()

        def setup(op=op):
            fwdecomp.enable()
            assert fwdecomp.autograd.is_installed(op)

        base, timed = _compare(call, setup, fwdecomp.disable, args.calls, args.rounds)
        unregister()
        print(f"{name:22s} {label:32s} {base:9.2f} {timed:9.2f} {timed - base:+9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
