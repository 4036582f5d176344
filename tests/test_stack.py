"""The boxed calling convention."""

from __future__ import annotations

import pytest
import torch

from fwdecomp.stack import arguments_to_stack, results_to_stack, stack_to_arguments, stack_to_results

aten = torch.ops.aten
ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default._schema


def test_defaults_and_keywords_in_schema_order():
    q = torch.zeros(1)
    stack = arguments_to_stack(ATTENTION, (q, q, q), {"scale": 0.5})
    assert stack[3:] == [0.0, False, None, 0.5]
    args, kwargs = stack_to_arguments(ATTENTION, stack)
    assert len(args) == 5 and kwargs == {"attn_mask": None, "scale": 0.5}


def test_round_trip_results():
    assert stack_to_results(ATTENTION, results_to_stack(ATTENTION, (1, 2))) == (1, 2)
    single = aten.cholesky.default._schema
    assert stack_to_results(single, results_to_stack(single, "x")) == "x"


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        ((), {}, "missing argument 'query'"),
        ((1, 2, 3), {"nope": 1}, "unexpected arguments"),
        ((1, 2, 3, 4, 5, 6, 7, 8), {}, "takes 7 arguments"),
    ],
)
def test_bad_arguments(args, kwargs, fragment):
    with pytest.raises(TypeError, match=fragment):
        arguments_to_stack(ATTENTION, args, kwargs)


def test_wrong_result_count():
    with pytest.raises(TypeError, match="returns 2 values, got 3 values"):
        results_to_stack(ATTENTION, (1, 2, 3))
