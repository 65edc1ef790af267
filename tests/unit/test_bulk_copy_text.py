"""copy_text: the COPY text-format lines a bulk submit sends (tests/integration/test_bulk_submit.py
has PostgreSQL read them); here, that every body comes back as it went in."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from scalebox_hpc.db.bulk import copy_text

_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def _parse(text: str) -> list[tuple[int, int, int | None, str]]:
    """A reader of COPY's text format for these four columns (what PostgreSQL does with them)."""
    assert text.endswith("\n") or not text
    out = []
    for line in text.split("\n")[:-1]:
        assert "\r" not in line  # PostgreSQL refuses a literal carriage return in the data
        seq, grp, lineno, body = line.split("\t")
        assert not re.search(r"\\[^\\tnr]|\\$", re.sub(r"\\\\", "", body)), body  # only the four escapes
        out.append((int(seq), int(grp), None if lineno == "\\N" else int(lineno),
                    re.sub(r"\\[\\tnr]", lambda m: _UNESCAPE[m.group(0)], body)))
    return out


BODY = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1)


@given(st.lists(st.tuples(BODY, st.one_of(st.none(), st.integers(1, 10**9))), max_size=30))
def test_every_body_comes_back(items: list[tuple[str, int | None]]) -> None:
    rows = [(i + 1, i % 3, line, body) for i, (body, line) in enumerate(items)]
    assert _parse(copy_text(rows)) == rows


def test_plain_chunk_is_sent_as_it_stands() -> None:
    assert copy_text([(1, 0, 7, "a/b.fits"), (2, 0, None, "c d")]) == "1\t0\t7\ta/b.fits\n2\t0\t\\N\tc d\n"


def test_one_body_to_escape_escapes_it_in_its_chunk() -> None:
    assert copy_text([(1, 0, 1, "plain"), (2, 0, 2, "a\\N\tb\r\n")]) == (
        "1\t0\t1\tplain\n2\t0\t2\ta\\\\N\\tb\\r\\n\n")
