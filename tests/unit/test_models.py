"""Status codes and message validation."""

from __future__ import annotations

import pytest

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import MAX_BODY_BYTES, Message, TaskStatus, validate_body, validate_headers


def test_status_names() -> None:
    assert TaskStatus.describe(0) == "OK"
    assert TaskStatus.describe(124) == "TIMEOUT"
    assert TaskStatus.describe(123) == "STALLED"
    assert TaskStatus.describe(7) == "EXIT_7"
    assert TaskStatus.describe(-101) == "SYSTEM_ERROR"
    assert TaskStatus.describe(-150) == "SYSTEM_-150"


@pytest.mark.parametrize(("code", "failed"), [(0, False), (-1, False), (-3, False), (-9, False), (1, True),
                                              (124, True), (-101, True)])
def test_failure_codes(code: int, failed: bool) -> None:
    assert TaskStatus.is_failure(code) is failed


def test_body_limits() -> None:
    assert validate_body("x" * MAX_BODY_BYTES)
    with pytest.raises(InvalidMessageError, match="limit"):
        validate_body("é" * MAX_BODY_BYTES)
    with pytest.raises(InvalidMessageError, match="NUL"):
        validate_body("a\x00")
    with pytest.raises(InvalidMessageError, match="UTF-8"):
        validate_body("\udcff")


def test_headers_must_be_json_objects() -> None:
    assert validate_headers({"a": [1, "b"]}) == {"a": [1, "b"]}
    with pytest.raises(InvalidMessageError):
        validate_headers({"a": object()})
    with pytest.raises(InvalidMessageError):
        Message("x", headers={"k": "a\x00"})
