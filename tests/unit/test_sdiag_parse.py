"""The sdiag parser: the real test-bed output, deltas between snapshots (resets flagged), and any
text at all is a snapshot or a SlurmParseError (hypothesis)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalebox_hpc.slurm.parse import SlurmParseError
from scalebox_hpc.slurm.sdiag import RpcCount, SdiagSnapshot, delta, kind, parse_sdiag

FIXTURES = Path(__file__).parent / "slurm_fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_the_test_beds_sdiag() -> None:
    snap = parse_sdiag(fixture("sdiag_1.txt"))
    assert (snap.taken_at, snap.data_since) == (1796168038, 1796167444)
    assert snap.by_type == {
        "REQUEST_PARTITION_INFO": RpcCount(2009, 6, 1933),
        "REQUEST_NODE_INFO": RpcCount(2007, 6, 2774),
        "MESSAGE_NODE_REGISTRATION_STATUS": RpcCount(1002, 4, 1144),
    }
    assert snap.by_user == {"root": RpcCount(0, 16, 5851)}


def test_delta_of_two_real_snapshots_is_the_first_sdiag_itself() -> None:
    d = delta(parse_sdiag(fixture("sdiag_1.txt")), parse_sdiag(fixture("sdiag_2.txt")))
    assert (d.seconds, d.by_type, d.by_user, d.reset) == (38, {"REQUEST_STATS_INFO": 1}, {"root": 1}, False)
    assert d.by_kind() == {"status": 0, "submit": 0, "cancel": 0, "other": 1}
    assert d.per_minute(19) == 30.0


def snapshot(taken: int, since: int, types: dict[str, int], users: dict[str, int]) -> SdiagSnapshot:
    return SdiagSnapshot(taken, since, {k: RpcCount(i, n) for i, (k, n) in enumerate(types.items())},
                         {k: RpcCount(i, n) for i, (k, n) in enumerate(users.items())})


def test_a_reset_in_between_is_flagged_and_counts_from_the_reset() -> None:
    before = snapshot(1000, 500, {"REQUEST_JOB_INFO": 50}, {"alice": 50})
    midnight = snapshot(1300, 1200, {"REQUEST_JOB_INFO": 4, "REQUEST_SUBMIT_BATCH_JOB": 1}, {"alice": 5})
    d = delta(before, midnight)
    assert d.reset and d.seconds == 100
    assert d.by_type == {"REQUEST_JOB_INFO": 4, "REQUEST_SUBMIT_BATCH_JOB": 1} and d.by_user == {"alice": 5}
    # same Data since, but a counter went down or a row vanished (sdiag -r keeps no trace otherwise)
    assert delta(before, snapshot(1300, 500, {"REQUEST_JOB_INFO": 3}, {"alice": 60})).reset
    assert delta(before, snapshot(1300, 500, {"REQUEST_JOB_INFO": 60}, {"bob": 60})).reset
    assert not delta(before, snapshot(1300, 500, {"REQUEST_JOB_INFO": 60}, {"alice": 60, "bob": 1})).reset


def test_a_busier_real_sdiag_by_kind() -> None:
    snap = parse_sdiag(fixture("sdiag_3.txt"))
    assert snap.by_type["REQUEST_SUBMIT_BATCH_JOB"].ident == 4003 and snap.by_type["REQUEST_KILL_JOB"].count >= 1
    empty = SdiagSnapshot(snap.taken_at - 60, snap.data_since)
    d = delta(empty, snap)
    kinds = d.by_kind()
    assert kinds["submit"] == snap.by_type["REQUEST_SUBMIT_BATCH_JOB"].count
    assert kinds["status"] >= snap.by_type["REQUEST_JOB_INFO"].count
    assert sum(kinds.values()) == sum(row.count for row in snap.by_type.values())
    assert d.by_user == {"root": snap.by_user["root"].count}


def test_kinds() -> None:
    assert [kind(t) for t in ("REQUEST_JOB_INFO", "REQUEST_SUBMIT_BATCH_JOB", "REQUEST_KILL_JOB",
                              "REQUEST_COMPLETE_BATCH_SCRIPT")] == ["status", "submit", "cancel", "other"]


@pytest.mark.parametrize("text", [
    "",
    "not sdiag at all",
    fixture("sdiag_1.txt").replace("Data since", "Data from"),
    fixture("sdiag_1.txt").replace("Remote Procedure Call statistics by user", "RPC by user"),
    fixture("sdiag_1.txt").replace("count:6 ", "count:six "),
    fixture("sdiag_1.txt").replace("\troot            (       0) count:16",
                                   "\troot (0) count:1\n\troot            (       0) count:16"),
    fixture("sdiag_1.txt").replace("(1796168038)", "(17961680380000000)"),
])
def test_what_is_not_sdiag_is_a_parse_error(text: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_sdiag(text)


# -- properties ------------------------------------------------------------------------------------
NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="()").filter(
    lambda c: not c.isspace()), min_size=1, max_size=30)  # sdiag names are passwd's or Slurm's: no blanks
TABLE = st.dictionaries(NAMES, st.tuples(st.integers(0, 99_999), st.integers(0, 10**12), st.integers(0, 10**15)),
                        max_size=8)


def render(taken: int, since: int, types: dict[str, tuple[int, int, int]],
           users: dict[str, tuple[int, int, int]]) -> str:
    """sdiag's layout (its printf widths) for these tables."""
    def rows(table: dict[str, tuple[int, int, int]], width: int) -> str:
        return "".join(f"\t{name:<{width}}({ident:>8}) count:{count:<6} ave_time:{total // max(count, 1):<6} "
                       f"total_time:{total}\n" for name, (ident, count, total) in table.items())

    return (f"*******\nsdiag output at Tue Dec 01 23:33:58 2026 ({taken})\n"
            f"Data since      Tue Dec 01 23:24:04 2026 ({since})\n*******\nServer thread count:  3\n\n"
            f"Main schedule statistics (microseconds):\n\tLast cycle:   11\n\n"
            f"Remote Procedure Call statistics by message type\n{rows(types, 40)}\n"
            f"Remote Procedure Call statistics by user\n{rows(users, 16)}\n"
            f"Pending RPC statistics\n\tNo pending RPCs\n")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**11), st.integers(0, 10**11), TABLE, TABLE)
def test_rendered_tables_parse_back(taken: int, since: int, types: dict[str, tuple[int, int, int]],
                                    users: dict[str, tuple[int, int, int]]) -> None:
    snap = parse_sdiag(render(taken, since, types, users))
    assert (snap.taken_at, snap.data_since) == (taken, since)
    assert {k: (v.ident, v.count, v.total_time_us) for k, v in snap.by_type.items()} == types
    assert {k: (v.ident, v.count, v.total_time_us) for k, v in snap.by_user.items()} == users


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000))
def test_any_text_is_a_snapshot_or_a_parse_error(text: str) -> None:
    with contextlib.suppress(SlurmParseError):
        parse_sdiag(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(fixture("sdiag_1.txt").splitlines(keepends=True)), max_size=60),
       st.text(max_size=40), st.integers(0, 60))
def test_shuffled_and_corrupted_real_lines(lines: list[str], junk: str, at: int) -> None:
    lines.insert(min(at, len(lines)), junk)
    try:
        snap = parse_sdiag("".join(lines))
    except SlurmParseError:
        return
    assert all(row.count >= 0 for row in (*snap.by_type.values(), *snap.by_user.values()))


@settings(max_examples=200, deadline=None)
@given(TABLE, TABLE, TABLE, TABLE, st.booleans())
def test_deltas_are_never_negative(t1: dict[str, tuple[int, int, int]], u1: dict[str, tuple[int, int, int]],
                                   t2: dict[str, tuple[int, int, int]], u2: dict[str, tuple[int, int, int]],
                                   same_since: bool) -> None:
    before = parse_sdiag(render(1000, 10, t1, u1))
    after = parse_sdiag(render(2000, 10 if same_since else 1500, t2, u2))
    d = delta(before, after)
    assert all(n > 0 for n in (*d.by_type.values(), *d.by_user.values()))
    assert d.reset or all(after.by_type[k].count - before.by_type.get(k, RpcCount(0, 0)).count == n
                          for k, n in d.by_type.items())
    assert d.seconds == (1000 if not d.reset else 2000 - after.data_since)
