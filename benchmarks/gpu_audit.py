"""``fwdecomp audit`` on CUDA, one process per operator.

Runs every registered decomposition's float64 samples on CUDA tensors through
the AutogradCUDA kernels and checks forward AD, ``torch.func.jvp`` and reverse
mode against central finite differences. Each operator gets its own process,
so a device-side assert (which poisons a CUDA context for good) costs one
row, not the rest of the audit::

    python benchmarks/gpu_audit.py --out "$OUT"      # gpu_audit.json + gpu_audit.md

Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["audit_operator", "main", "operator_names", "render"]

METHODS = "forward_ad,func.jvp,reverse"


def _fwdecomp(*args: str, timeout: float) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "fwdecomp", "audit", "--format", "json", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def operator_names() -> list[str]:
    """Every operator with a registered decomposition."""
    result = _fwdecomp("--no-check", timeout=300)
    return [row["name"] for row in json.loads(result.stdout)["operators"]]


def audit_operator(name: str, device: str = "cuda", timeout: float = 240) -> dict[str, Any]:
    """One operator's audit row, or a row saying how its process ended."""
    try:
        result = _fwdecomp("--device", device, "--methods", METHODS, "--operator", name, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "check": "timeout", "failures": [f"no answer in {timeout:.0f} s"]}
    try:
        return json.loads(result.stdout)["operators"][0]
    except (ValueError, LookupError):
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return {"name": name, "check": "crashed", "failures": [f"exit {result.returncode}: {tail}"]}


def render(rows: list[dict[str, Any]], device_name: str) -> str:
    lines = [
        f"fwdecomp audit on {device_name} (float64 samples; {METHODS} vs central finite differences)",
        "",
        "| operator | check | samples | max error |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        error = row.get("worst_error")
        error = "" if error is None else f"{error:.1e}"
        lines.append(f"| `{row['name']}` | {row['check']} | {row.get('samples', 0)} | {error} |")
    failures = [f"- `{row['name']}` {failure}" for row in rows for failure in row.get("failures", [])]
    return "\n".join([*lines, "", *failures] if failures else lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--jobs", type=int, default=8, help="operators audited at once")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_audit: no CUDA device here; nothing to audit (exit 0).")
        return 0
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    names = operator_names()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda name: audit_operator(name, args.device), names))
    text = render(rows, device_name)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_audit.json"), "w", encoding="utf-8") as handle:
        json.dump({"device": device_name, "torch": torch.__version__, "operators": rows}, handle, indent=1)
    with open(os.path.join(args.out, "gpu_audit.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    return 1 if any(row["check"] not in ("pass", "no CUDA samples") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
