"""Fake Slurm commands for the doctor's tests: bash scripts on PATH, as tests/unit/test_slurm_fake.py.

``sbatch`` runs the submitted script at once on this host (``FAKE_SBATCH_RUN=1``, its
``--output``/``--error`` honoured, the job COMPLETED or FAILED by its exit), or leaves it
PENDING; ``squeue`` reports what sbatch recorded; ``sacctmgr`` prints assoc.txt/qos.txt;
``srun --mpi=list`` prints 22.05's list. Every call is appended to calls.log. No real Slurm
is ever reached: the fake directory comes first on PATH, and each fake answers everything.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from scalebox_hpc.slurm.commands import SubprocessRunner

FAKES = {
    "sinfo": r"""
        echo "sinfo $*" >> "$FAKE_LOG"
        [ "${1:-}" = --version ] && { echo "slurm 22.05.8"; exit 0; }
        if [ -n "${FAKE_SINFO_FAIL:-}" ]; then echo "sinfo: error: $FAKE_SINFO_FAIL" >&2; exit 1; fi
        if [ -f "$FAKE_DIR/sinfo.txt" ]; then cat "$FAKE_DIR/sinfo.txt"; else printf 'debug|up\n'; fi
    """,
    "squeue": r"""
        echo "squeue $*" >> "$FAKE_LOG"
        [ "${1:-}" = --version ] && { echo "slurm 22.05.8"; exit 0; }
        [ "${1:-}" = --help ] && { echo "Usage: squeue [OPTIONS]"; exit 0; }
        ids=""
        for a in "$@"; do case "$a" in --jobs=*) ids="${a#--jobs=}";; esac; done
        for id in ${ids//,/ }; do
          f="$FAKE_DIR/state/$id"
          [ -f "$f" ] || continue
          state=$(cat "$f"); reason=None; [ "$state" = PENDING ] && reason=Resources
          echo "$id|$id|$state|node1|$reason|NONE|5:00|0|sbx-doctor|"
        done
        exit 0
    """,
    "sbatch": r"""
        echo "sbatch $*" >> "$FAKE_LOG"
        [ "${1:-}" = --version ] && { echo "slurm 22.05.8"; exit 0; }
        if [ -n "${FAKE_SBATCH_FAIL:-}" ]; then echo "sbatch: error: $FAKE_SBATCH_FAIL" >&2; exit 1; fi
        out=/dev/null; err=/dev/null
        for a in "$@"; do case "$a" in --output=*) out="${a#--output=}";; --error=*) err="${a#--error=}";; esac; done
        n=$(( $(cat "$FAKE_DIR/next" 2>/dev/null || echo 100) + 1 )); echo "$n" > "$FAKE_DIR/next"
        cat > "$FAKE_DIR/job-$n.sh"
        if [ -n "${FAKE_SBATCH_RUN:-}" ]; then
          if sh "$FAKE_DIR/job-$n.sh" > "$out" 2> "$err"; then echo COMPLETED > "$FAKE_DIR/state/$n"
          else echo FAILED > "$FAKE_DIR/state/$n"; fi
        else
          echo PENDING > "$FAKE_DIR/state/$n"
        fi
        echo "$n"
    """,
    "scancel": r"""
        echo "scancel $*" >> "$FAKE_LOG"
        [ "${1:-}" = --version ] && { echo "slurm 22.05.8"; exit 0; }
        for a in "$@"; do case "$a" in -*) ;; *) echo CANCELLED > "$FAKE_DIR/state/$a";; esac; done
    """,
    "sacct": r"""
        echo "sacct $*" >> "$FAKE_LOG"
        echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1
    """,
    "sacctmgr": r"""
        echo "sacctmgr $*" >> "$FAKE_LOG"
        if [ -n "${FAKE_SACCTMGR_FAIL:-}" ]; then echo "sacctmgr: error: $FAKE_SACCTMGR_FAIL" >&2; exit 1; fi
        case "$*" in
          *"show assoc"*) cat "$FAKE_DIR/assoc.txt" 2>/dev/null;;
          *"show qos"*) cat "$FAKE_DIR/qos.txt" 2>/dev/null;;
        esac
        exit 0
    """,
    "srun": r"""
        echo "srun $*" >> "$FAKE_LOG"
        if [ "${1:-}" = --mpi=list ]; then
          printf 'MPI plugin types are...\n\tnone\n\t%s\n' "${FAKE_MPI:-pmi2}" >&2; exit 0
        fi
        echo "srun: error: the fake srun runs nothing" >&2; exit 1
    """,
}


@dataclass
class FakeSlurm:
    """A directory of fake Slurm commands and their state."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def log(self) -> Path:
        return self.root / "calls.log"

    def env(self, **extra: str) -> dict[str, str]:
        """What a process needs to find the fakes first (and only them)."""
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_DIR": str(self.root),
                "FAKE_LOG": str(self.log), **extra}

    def runner(self, **extra: str) -> SubprocessRunner:
        return SubprocessRunner(extra_env={"SLURM_TIME_FORMAT": "standard", **self.env(**extra)})

    def calls(self, command: str | None = None) -> list[str]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [line for line in lines if command is None or line.split(" ", 1)[0] == command]


def make_fake_slurm(root: Path) -> FakeSlurm:
    """Write the fakes into ``root/bin``."""
    for sub in ("bin", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, body in FAKES.items():
        exe = root / "bin" / name
        exe.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
        exe.chmod(0o755)
    return FakeSlurm(root)
