"""``python -m fwdecomp``: the command line.

``audit`` prints the operator inventory (see :mod:`fwdecomp.inventory`) and
exits non-zero when a registered decomposition fails its numerical check.
``router`` says which router fwdecomp's kernels use (``--build`` compiles the
C++ one ahead of time; see :mod:`fwdecomp.router`). Other views of ``audit``
plug in with :func:`audit_view`: each adds one ``--NAME`` flag that selects it.

Example:
    >>> from fwdecomp.cli import main
    >>> main(["audit", "--no-check", "--format", "json"])  # doctest: +ELLIPSIS
    {...
    0
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["AuditView", "audit_view", "main"]


@dataclass(frozen=True)
class AuditView:
    """An alternative report of ``fwdecomp audit``, selected by ``--NAME``."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    metavar: str | None = None


_VIEWS: dict[str, AuditView] = {}


def audit_view(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    metavar: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> exit code`` as the ``audit --NAME`` view (``--NAME VALUE`` if ``metavar``)."""

    def decorator(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _VIEWS[name] = AuditView(name, help, run, configure, metavar)
        return run

    return decorator


def _inventory(args: argparse.Namespace) -> int:
    from fwdecomp._tables import markdown_table
    from fwdecomp.inventory import inventory, render_table

    try:
        rows = inventory(
            check=not args.no_check,
            limit=args.limit,
            device=args.device or "cpu",
            methods=tuple(args.methods.split(",")),
            operators=args.operator,
        )
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"operators": [row.to_json() for row in rows]}, indent=2))
    elif args.format == "markdown":
        columns = ["operator", "native forward AD", "fwdecomp", "check", "samples"]
        cells = [
            [f"`{row.name}`", row.native, "routes" if row.covered else "steps aside", row.check, str(row.samples)]
            for row in rows
        ]
        print("\n".join(markdown_table(columns, cells)))
    else:
        print(render_table(rows))
        covered = sum(row.covered for row in rows)
        failed = sum(row.check == "fail" for row in rows)
        print(f"\n{len(rows)} operators with decompositions, {covered} routed by fwdecomp, {failed} failing")
    return 1 if any(row.check == "fail" for row in rows) else 0


def _methods(text: str) -> str:
    from fwdecomp.checks import ALL_METHODS

    unknown = sorted(set(text.split(",")) - set(ALL_METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}"
        )
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fwdecomp", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="what works under forward AD, and is it right")
    audit.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    audit.add_argument("--no-check", action="store_true", help="skip the numerical checks")
    audit.add_argument(
        "--operator",
        action="append",
        metavar="NAME",
        help="only this operator, e.g. aten::_pdist_forward (repeat for more)",
    )
    audit.add_argument("--limit", type=int, default=None, help="check at most N samples per operator")
    audit.add_argument(
        "--device", default=None, help="device of the checks' samples (with --model: of the model), e.g. cuda"
    )
    audit.add_argument(
        "--methods",
        default="forward_ad",
        type=_methods,
        help="comma-separated JVP methods to check: forward_ad, func.jvp, jacfwd, reverse (default forward_ad)",
    )
    for view in _VIEWS.values():
        if view.metavar is not None:
            audit.add_argument(f"--{view.name}", metavar=view.metavar, default=None, help=view.help)
        else:
            audit.add_argument(f"--{view.name}", action="store_true", help=view.help)
        if view.configure is not None:
            view.configure(audit)
    routing = commands.add_parser("router", help="which router fwdecomp's kernels use; --build compiles it")
    routing.add_argument("--build", action="store_true", help="build the compiled router now (cached)")
    routing.add_argument("--verbose", action="store_true", help="show the compiler's output")
    return parser


def _router(args: argparse.Namespace) -> int:
    from fwdecomp import router

    try:
        if args.build:
            router.build(verbose=args.verbose)
        print(router.status())
    except (router.RouterUnavailableError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    import fwdecomp  # installs the backend and the decomposition library
    import fwdecomp.database  # noqa: F401  (registers audit --database)

    args = _parser().parse_args(argv)
    if args.command == "audit":
        for view in _VIEWS.values():
            if getattr(args, view.name.replace("-", "_")) not in (None, False):
                return view.run(args)
        return _inventory(args)
    if args.command == "router":
        return _router(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
