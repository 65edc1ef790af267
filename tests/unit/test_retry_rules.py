"""Retry rules: exit code → extra attempts."""

from __future__ import annotations

import pytest

from scalebox_hpc.models import DEFAULT_STALL_RETRIES, extra_attempts, parse_retry_rule, stall_retries


@pytest.mark.parametrize(("rule", "parsed"), [("1", (1, 1)), ("2:3", (2, 3)), ("*", (None, 1)), (" *:4 ", (None, 4))])
def test_parse(rule: str, parsed: tuple[int | None, int]) -> None:
    assert parse_retry_rule(rule) == parsed


@pytest.mark.parametrize(("rules", "status", "extra"), [
    (["1", "2:3"], 0, 0), (["1", "2:3"], 1, 1), (["1", "2:3"], 2, 3), (["1", "2:3"], 3, 0),
    (["*"], 7, 1), (["*:2", "7:5"], 7, 5), (["*:2"], 124, 2), (["*"], 0, 0), ([], 1, 0),
])
def test_extra_attempts(rules: list[str], status: int, extra: int) -> None:
    assert extra_attempts(rules, status) == extra


def test_stall_retries_default_and_rules() -> None:
    assert stall_retries([]) == DEFAULT_STALL_RETRIES
    assert stall_retries(["1"]) == DEFAULT_STALL_RETRIES
    assert stall_retries(["123:0"]) == 0
    assert stall_retries(["*:5"]) == 5
