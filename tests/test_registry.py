"""Registration: operator naming, schema validation, and errors that change nothing."""

from __future__ import annotations

import pytest
import torch

import fwdecomp
from fwdecomp import autograd, registry
from fwdecomp.contract import DecompositionError, SignatureMismatchError
from fwdecomp.overloads import UnknownOperatorError, resolve

aten = torch.ops.aten


def test_resolve_forms():
    assert resolve(aten._cdist_forward.default) == [aten._cdist_forward.default]
    assert resolve("aten::_cdist_forward") == [aten._cdist_forward.default]
    assert resolve("aten::add.Tensor") == [aten.add.Tensor]
    assert set(resolve(aten.add)) == {getattr(aten.add, o) for o in aten.add.overloads()}


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("aten::no_such_op", "unknown operator 'aten::no_such_op'"),
        ("aten::cdistt", "Did you mean"),
        ("cdist", "no namespace"),
        ("nosuchns::op", "unknown operator"),
        ("aten::add.NoSuchOverload", "has no overload 'NoSuchOverload'"),
    ],
)
def test_unknown_operator_errors(name, fragment):
    before = registry.snapshot()
    with pytest.raises(UnknownOperatorError, match=fragment):
        fwdecomp.register_decomposition(name)
    assert registry.snapshot() == before


def test_python_function_is_not_an_operator():
    with pytest.raises(TypeError, match="not an operator"):
        fwdecomp.register_decomposition(torch.cdist)


@pytest.mark.parametrize(
    "fn, fragment",
    [
        (lambda x1, x2, p: None, "3 positional parameters, the schema has 4"),
        (lambda a, b, p, compute_mode: None, "parameter 0 is named 'a', the schema calls it 'x1'"),
        (lambda x1, x2, p, compute_mode, extra: None, "requires parameter 'extra'"),
        (lambda x1, x2, p, compute_mode, *, extra: None, "requires keyword 'extra'"),
    ],
)
def test_signature_mismatch(fn, fragment):
    before = registry.snapshot()
    with pytest.raises(SignatureMismatchError, match=fragment) as info:
        fwdecomp.register_decomposition("aten::_cdist_forward", replace=True)(fn)
    assert "def _cdist_forward(x1, x2, p, compute_mode)" in str(info.value)
    assert registry.snapshot() == before


def test_keyword_only_arguments_must_be_accepted_by_keyword():
    op = aten._scaled_dot_product_flash_attention_for_cpu.default

    def no_mask(query, key, value, dropout_p=0.0, is_causal=False, *, scale=None):
        return query

    with pytest.raises(SignatureMismatchError, match="keyword-only argument 'attn_mask'"):
        fwdecomp.register_decomposition(op, replace=True)(no_mask)


def test_flexible_signatures_are_accepted():
    fwdecomp.register_decomposition("aten::_cdist_forward", replace=True)(lambda *args, **kwargs: None)
    fwdecomp.register_decomposition("aten::_cdist_forward", replace=True)(
        lambda x1, x2, p=2.0, compute_mode=None, unused=None: None
    )


def test_duplicate_needs_replace():
    with pytest.raises(fwdecomp.DuplicateDecompositionError, match="replace=True"):
        fwdecomp.register_decomposition("aten::cholesky")(lambda self, upper=False: self)
    assert registry.lookup(aten.cholesky.default).builtin


def test_packet_registers_every_overload():
    packet = aten.special_xlog1py
    fwdecomp.register_decomposition(packet)(lambda *args, **kwargs: None)
    assert all(registry.lookup(getattr(packet, o)) for o in packet.overloads())
    fwdecomp.unregister_decomposition(packet)
    assert not any(registry.lookup(getattr(packet, o)) for o in packet.overloads())


def test_restore_builtin():
    original = registry.lookup(aten.cholesky.default)
    fwdecomp.register_decomposition("aten::cholesky", replace=True)(lambda self, upper=False: self)
    assert registry.lookup(aten.cholesky.default) is not original
    registry.restore_builtin("aten::cholesky")
    assert registry.lookup(aten.cholesky.default) == original


def _jvp_cholesky():
    A = torch.eye(3, dtype=torch.float64) * 2
    return torch.func.jvp(torch.cholesky, (A,), (A,))


def test_decomposition_that_raises_names_the_operator(enabled):
    @fwdecomp.register_decomposition("aten::cholesky", replace=True)
    def broken(self, upper=False):
        raise ValueError("something inside went wrong")

    with pytest.raises(DecompositionError) as info:
        _jvp_cholesky()
    message = str(info.value)
    assert "aten::cholesky" in message and "something inside went wrong" in message
    assert "broken" in message and "test_registry.py" in message
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "result, fragment",
    [
        (lambda A: A[:2], r"\(shape, dtype\) = \(\(2, 3\), torch.float64\), but aten::cholesky returns"),
        (lambda A: A.float(), "torch.float32"),
        (lambda A: (A, A), "output 0"),
        (lambda A: A.tolist(), "returned list for output 0"),
    ],
)
def test_decomposition_returning_wrong_results(enabled, result, fragment):
    @fwdecomp.register_decomposition("aten::cholesky", replace=True)
    def wrong(self, upper=False):
        return result(torch.linalg.cholesky(self))

    with pytest.raises(DecompositionError, match=fragment):
        _jvp_cholesky()


def test_wrong_number_of_results(enabled):
    op = aten._scaled_dot_product_flash_attention_for_cpu.default

    @fwdecomp.register_decomposition(op, replace=True)
    def one_output(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        return query

    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(DecompositionError, match="returns 2 values"):
        torch.func.jvp(lambda q: op(q, q, q), (q,), (q,))


def test_unregistered_operator_falls_back_to_pytorch(enabled):
    fwdecomp.unregister_decomposition("aten::cholesky")
    assert not autograd.is_installed(aten.cholesky.default)
    with pytest.raises(NotImplementedError, match="Trying to use forward AD with cholesky"):
        _jvp_cholesky()


def test_find_follows_every_change_of_the_table():
    """``find`` remembers its answer per operator until the table changes: put, remove, restore."""
    from fwdecomp._operator_table import OperatorTable

    table: OperatorTable[str] = OperatorTable()
    op = aten.cholesky.default
    assert table.find(op) is None
    table.put({op: "first"})
    assert table.find(op) == "first"
    table.put({op: "second"})
    assert table.find(op) == "second"
    saved = table.snapshot()
    assert table.remove(op)
    assert table.find(op) is None
    table.restore(saved)
    assert table.find(op) == "second"
    table.restore({})
    assert table.find(op) is None


def test_find_reaches_an_entry_through_its_schema():
    """An overload object other than the registered one, with the same schema, finds the entry (the
    dispatcher hands the interface a schema)."""
    from fwdecomp._operator_table import OperatorTable

    table: OperatorTable[str] = OperatorTable()
    op = aten.cholesky.default

    class Alias:  # another OpOverload object: same schema, different identity
        _schema = op._schema

    table.put({op: "entry"})
    assert table.find(Alias()) == "entry"
