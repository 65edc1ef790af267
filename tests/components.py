"""Which real components (Slurm, Apptainer, ...) the test run can use.

Tests call ``need(component, reason)`` when something they depend on is missing:
locally that skips the test, but under ``CI=true`` it fails it, so a broken test-bed
can never turn into a green run made of skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def need(component: str, reason: str) -> None:
    """Skip the calling test (fail it under CI=true) because ``component`` is unavailable."""
    if under_ci():
        pytest.fail(f"{component} required under CI=true but unavailable: {reason}", pytrace=False)
    pytest.skip(f"{component} unavailable: {reason}")


def slurm_nodes() -> list[str]:
    """The test-bed's node names from SCALEBOX_TEST_SLURM_NODES (comma-separated)."""
    return [n.strip() for n in os.environ.get("SCALEBOX_TEST_SLURM_NODES", "").split(",") if n.strip()]


def slurm_available() -> str | None:
    """None when the local Slurm test-bed is usable, else the reason why not."""
    if shutil.which("sinfo") is None:
        return "`sinfo` not found on PATH (launchers/testbed/slurm.sh start installs Slurm)"
    if not slurm_nodes():
        return "SCALEBOX_TEST_SLURM_NODES is not set (launchers/testbed/run-tests.sh sets it)"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`sinfo -h -o %T` did not run: {exc}"
    if proc.returncode != 0:
        return f"`sinfo -h -o %T` failed (exit {proc.returncode}): {proc.stderr.strip()}"
    states = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if not any(s in ("idle", "mixed") for s in states):
        return f"no idle Slurm nodes (node states: {', '.join(states) or 'none'})"
    return None


def slurm_mc_conf() -> str | None:
    """The accounting test-bed's client slurm.conf (SCALEBOX_TEST_SLURM_MC_CONF), if set."""
    return os.environ.get("SCALEBOX_TEST_SLURM_MC_CONF") or None


def slurm_mc_available() -> str | None:
    """None when the multi-cluster Slurm with accounting (launchers/testbed/slurm-mc.sh: clusters
    c1 and c2, QOS limits enforced by slurmdbd) is usable, else the reason why not."""
    conf = slurm_mc_conf()
    if conf is None:
        return "SCALEBOX_TEST_SLURM_MC_CONF is not set (launchers/testbed/run-tests.sh sets it)"
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        proc = subprocess.run(["sinfo", "-M", "c1", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=15, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`sinfo -M c1` did not run: {exc}"
    if proc.returncode != 0:
        return f"`sinfo -M c1` failed (exit {proc.returncode}): {proc.stderr.strip()}"
    if not any(s.strip() in ("idle", "mixed") for s in proc.stdout.splitlines()):
        return f"no idle node on cluster c1: {proc.stdout.strip() or 'none'}"
    return None


def apptainer_binary() -> str | None:
    """SCALEBOX_TEST_APPTAINER, else `apptainer` from PATH."""
    return os.environ.get("SCALEBOX_TEST_APPTAINER") or shutil.which("apptainer")


def apptainer_available() -> str | None:
    """None when Apptainer is usable, else the reason why not."""
    exe = apptainer_binary()
    if not exe:
        return "SCALEBOX_TEST_APPTAINER is not set and `apptainer` is not on PATH"
    try:
        proc = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{exe} version` did not run: {exc}"
    if proc.returncode != 0:
        return f"`{exe} version` failed (exit {proc.returncode}): {proc.stderr.strip()}"
    return None


def podman_available() -> str | None:
    """None when Podman can run containers here, else the reason why not."""
    exe = shutil.which("podman")
    if exe is None:
        return "`podman` not on PATH (launchers/testbed/podman.sh install)"
    try:
        proc = subprocess.run([exe, "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`podman info` did not run: {exc}"
    if proc.returncode != 0:
        return f"`podman info` failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None


def netns_hosts() -> list[str]:
    """The emulated hosts' namespaces (SCALEBOX_TEST_NETNS_HOSTS, default sbx-h1..sbx-h3)."""
    raw = os.environ.get("SCALEBOX_TEST_NETNS_HOSTS") or "sbx-h1,sbx-h2,sbx-h3"
    return [n.strip() for n in raw.split(",") if n.strip()]


def netns_available(names: list[str]) -> str | None:
    """None when these network namespaces (launchers/testbed/netns.sh) can run processes, else why not."""
    if os.geteuid() != 0:
        return "entering network namespaces needs root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not on PATH (launchers/testbed/netns.sh up installs iproute2)"
    missing = [n for n in names if not os.path.exists(f"/run/netns/{n}")]
    if missing:
        return f"namespace(s) {', '.join(missing)} missing (bash launchers/testbed/netns.sh up {len(names)})"
    return None


def pg2_dsn() -> str | None:
    """Cluster 2's database of the one-database-per-cluster tests (SCALEBOX_TEST_DSN2)."""
    return os.environ.get("SCALEBOX_TEST_DSN2") or None


def pg2_available() -> str | None:
    """None when SCALEBOX_TEST_DSN2 (launchers/testbed/postgres2.sh) is reachable, else why not."""
    import psycopg

    dsn = pg2_dsn()
    if dsn is None:
        return "SCALEBOX_TEST_DSN2 is not set (launchers/testbed/run-tests.sh sets it; postgres2.sh start)"
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            return None
    except psycopg.OperationalError as exc:
        return f"cannot connect to SCALEBOX_TEST_DSN2: {str(exc).strip().splitlines()[-1]}"
