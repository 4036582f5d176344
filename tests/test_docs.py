"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fwdecomp

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(fwdecomp.__path__, prefix="fwdecomp.") if name != "fwdecomp.__main__"
)


@pytest.mark.parametrize("name", ["fwdecomp", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_modules_have_examples():
    """Private helpers (``_name``) and package indexes are exempt."""
    public = [
        name
        for name in MODULES
        if not name.rsplit(".", 1)[-1].startswith("_") and not hasattr(importlib.import_module(name), "__path__")
    ]
    missing = [name for name in public if ">>>" not in (importlib.import_module(name).__doc__ or "")]
    assert not missing
