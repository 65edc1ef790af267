"""Log lines that say what happened to which job and why, with the same facts as extras."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from scalebox_hpc import logs
from scalebox_hpc.slurm import SlurmClient
from scalebox_hpc.slurm.commands import CommandResult


class Runner:
    """squeue knows no job; sacct answers ``sacct``."""

    def __init__(self, sacct: CommandResult) -> None:
        self.sacct = sacct

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
        return self.sacct if argv[0] == "sacct" else CommandResult("", "", 0)


def test_sacct_failed_says_the_commands_error_and_which_jobs(caplog: pytest.LogCaptureFixture) -> None:
    client = SlurmClient(Runner(CommandResult("", "sacct: error: slurmdbd: connection refused", 1)), use_json=False)
    with caplog.at_level(logging.WARNING, logger="scalebox_hpc.slurm"):
        assert client.status(["41", "42"]) == {}
    [record] = [r for r in caplog.records if "sacct" in r.getMessage()]
    message = record.getMessage()
    assert message.startswith("sacct failed for jobs 41,42: ") and "connection refused" in message, message
    facts = logs.record_extras(record)
    assert facts["action"] == "slurm_sacct_failed" and facts["job_ids"] == ["41", "42"]
    line = logs.formatter("text").format(record)
    assert "action=slurm_sacct_failed job_ids=[\"41\",\"42\"] error=" in line, line


def test_a_submitted_job_is_named_in_the_message(caplog: pytest.LogCaptureFixture) -> None:
    class Sbatch:
        def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
            return CommandResult("1234;east\n", "", 0)

    with caplog.at_level(logging.INFO, logger="scalebox_hpc.slurm"):
        assert SlurmClient(Sbatch(), use_json=False).submit("#!/bin/bash\ntrue\n") == "1234"
    assert "slurm job 1234 submitted on cluster east" in caplog.text
