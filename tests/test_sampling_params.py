"""SamplingParams refuses every value that could not be packed into the engine's shared tensors."""

from __future__ import annotations

import math

import pytest

from chatstream.engine import InvalidSamplingParams, SamplingParams

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize(
    "param, value",
    [
        ("top_k", 2**63),
        ("top_k", 9223372036854775808),
        ("top_k", INT32_MAX + 1),
        ("top_k", -1),
        ("top_k", True),
        ("top_k", 5.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.1),
        ("temperature", 100.5),
        ("temperature", 10**400),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_p", -math.inf),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 101.0),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", math.inf),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("presence_penalty", math.inf),
        ("frequency_penalty", 3),
        ("frequency_penalty", math.nan),
        ("frequency_penalty", True),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", False),
        ("seed", 1.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", INT32_MAX + 1),
        ("max_new_tokens", True),
        ("max_new_tokens", 10.0),
    ],
)
def test_out_of_range_values_are_refused_naming_the_parameter(param: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParams) as caught:
        SamplingParams(**{param: value})  # type: ignore[arg-type]
    assert caught.value.param == param
    assert param in str(caught.value)


@pytest.mark.parametrize(
    "param, value",
    [
        ("top_k", 0),
        ("top_k", INT32_MAX),
        ("temperature", 0),
        ("temperature", 100),
        ("top_p", 1e-9),
        ("top_p", 1),
        ("repetition_penalty", 1e-6),
        ("repetition_penalty", 100),
        ("min_p", 0),
        ("min_p", 1),
        ("presence_penalty", -2),
        ("presence_penalty", 2),
        ("frequency_penalty", -2),
        ("frequency_penalty", 2),
        ("seed", -(2**63)),
        ("seed", 2**64 - 1),
        ("max_new_tokens", 1),
        ("max_new_tokens", INT32_MAX),
    ],
)
def test_values_at_the_bounds_are_accepted(param: str, value: object) -> None:
    assert getattr(SamplingParams(**{param: value}), param) == value  # type: ignore[arg-type]
