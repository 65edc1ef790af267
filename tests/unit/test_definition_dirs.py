"""The definition dirs (SCALEBOX_CONTAINERS) and the SIF cache come from the settings the
launcher passes down; only the public constructors built without them read the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalebox_hpc.runtime.choose import RuntimeChooser
from scalebox_hpc.runtime.images import SifCache, default_cache, find_definition
from scalebox_hpc.runtime.podman import EngineCli
from scalebox_hpc.settings import Settings


def _defs(root: Path, name: str) -> Path:
    root.mkdir(parents=True)
    (root / f"{name}.def").write_text("Bootstrap: docker\nFrom: alpine\n")
    (root / f"{name}.Dockerfile").write_text("FROM scratch\n")
    return root


def test_find_definition_reads_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = _defs(tmp_path / "env", "sbx-only-here")
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(env_dir))
    assert find_definition("sbx-only-here", None, ".def") is None
    assert find_definition("sbx-only-here", None, ".def", configured=[env_dir]) == env_dir / "sbx-only-here.def"


def test_the_chooser_passes_its_dirs_to_both_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _defs(tmp_path / "mine", "sbx-img")
    monkeypatch.setenv("SCALEBOX_CONTAINERS", str(_defs(tmp_path / "env", "sbx-env-img")))
    settings = Settings.from_environ({"SCALEBOX_CONTAINERS": str(mine)})
    chooser = RuntimeChooser("auto", sif_cache=tmp_path / "cache", containers=settings.containers,
                             which=lambda name: f"/usr/bin/{name}")
    apptainer = chooser.engine("apptainer")
    assert apptainer.cache.definition_dirs == (mine,)  # type: ignore[attr-defined]
    assert chooser.engine("podman").definition_dirs == (mine,)  # type: ignore[attr-defined]


def test_public_constructors_without_settings_read_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SCALEBOX_CONTAINERS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.setenv("SCALEBOX_SIF_CACHE", str(tmp_path / "sif"))
    cache = SifCache("/usr/bin/apptainer")
    assert cache.definition_dirs == (tmp_path / "a", tmp_path / "b")
    assert cache.root == tmp_path / "sif"
    assert EngineCli("podman", "podman", lock_dir=tmp_path / "locks").definition_dirs == cache.definition_dirs
    assert SifCache("/usr/bin/apptainer", containers=()).definition_dirs == ()


def test_the_default_cache_is_the_configured_one_else_under_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEBOX_SIF_CACHE", "/elsewhere")
    assert default_cache(Path("/sif")) == Path("/sif")
    assert default_cache() == Path.home() / ".cache" / "scalebox_hpc" / "sif"
