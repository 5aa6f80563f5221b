"""The four distributions (reapkit and the plugins under plugins/): licence, metadata, versions.

Released together from this repository: the same version, each plugin requiring a reapkit of
the same major version, the MIT licence text inside every wheel and sdist (``license-files``,
PEP 639). The build itself is checked by a slow test (and ``make wheels`` installs the wheels
in a clean venv). Last, what ``make demo`` and ``make test`` install into ``.venv``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from reapkit._version import __version__

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = [ROOT, *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))]
REPOSITORY = "https://github.com/reapkit/reapkit"
LICENCE = (ROOT / "LICENSE").read_text(encoding="utf-8")


def _project(directory: Path) -> dict[str, Any]:
    with open(directory / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements(project: dict[str, Any]) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, project["project"]["dependencies"])}


def _version(directory: Path) -> str:
    """The version hatch reads (``[tool.hatch.version] path``)."""
    path = directory / _project(directory)["tool"]["hatch"]["version"]["path"]
    scope: dict[str, Any] = {}
    exec(path.read_text(encoding="utf-8"), scope)
    return str(scope["__version__"])


def test_the_licence_is_mit_with_its_holder() -> None:
    assert LICENCE.startswith("MIT License\n\nCopyright (c) 2026 the reapkit authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in LICENCE


@pytest.mark.parametrize("directory", PROJECTS, ids=lambda p: _project(p)["project"]["name"])
def test_every_distribution_declares_and_carries_the_licence(directory: Path) -> None:
    project = _project(directory)["project"]
    assert (project["license"], project["license-files"]) == ("MIT", ["LICENSE"])
    # A copy beside each plugin's pyproject: an sdist cannot reach above its own directory.
    assert (directory / "LICENSE").read_text(encoding="utf-8") == LICENCE
    # PEP 639: the SPDX expression says it; a "License ::" classifier beside it is refused.
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


@pytest.mark.parametrize("directory", PROJECTS, ids=lambda p: _project(p)["project"]["name"])
def test_every_distribution_has_urls_and_classifiers(directory: Path) -> None:
    project = _project(directory)["project"]
    urls = project["urls"]
    assert urls["Homepage"] == REPOSITORY
    assert urls["Source"].startswith(REPOSITORY)
    assert urls["Issues"] == f"{REPOSITORY}/issues"
    classifiers = set(project["classifiers"])
    assert {
        "Development Status :: 4 - Beta",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3 :: Only",
    } <= classifiers
    pythons = sorted(
        Version(c.rsplit(" :: ", 1)[1])
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.")
    )
    assert pythons == [Version("3.11"), Version("3.12"), Version("3.13")]
    assert project["requires-python"] == f">={pythons[0]}"


@pytest.mark.parametrize("directory", PROJECTS, ids=lambda p: _project(p)["project"]["name"])
def test_attrs_is_at_least_what_trio_needs(directory: Path) -> None:
    trio_needs = next(
        Requirement(r) for r in importlib.metadata.requires("trio") or [] if r.startswith("attrs")
    )
    floor = Version(next(s.version for s in trio_needs.specifier if s.operator == ">="))
    ours = _requirements(_project(directory))["attrs"].specifier
    assert [s.operator for s in ours] == [">="]
    assert Version(next(iter(ours)).version) >= floor


@pytest.mark.parametrize("directory", PROJECTS[1:], ids=lambda p: _project(p)["project"]["name"])
def test_plugins_are_released_with_reapkit_and_need_its_major_version(directory: Path) -> None:
    assert "version" in _project(directory)["project"]["dynamic"]
    assert _version(directory) == __version__
    current = Version(__version__)
    wanted = _requirements(_project(directory))["reapkit"].specifier
    assert wanted.contains(current, prereleases=True)
    bounds = {s.operator: Version(s.version) for s in wanted}
    assert set(bounds) == {">=", "<"}
    assert bounds[">="].release[:2] == current.release[:2]
    assert bounds["<"] == Version(f"{current.major + 1}")


@pytest.mark.slow
@pytest.mark.parametrize("directory", PROJECTS, ids=lambda p: _project(p)["project"]["name"])
def test_the_built_wheel_and_sdist_carry_the_licence(directory: Path, tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the 'build' package is not installed (the dev extra)")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(directory)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    name = _project(directory)["project"]["name"].replace("-", "_")
    stem = f"{name}-{_version(directory)}"
    with zipfile.ZipFile(tmp_path / f"{stem}-py3-none-any.whl") as wheel:
        assert wheel.read(f"{stem}.dist-info/licenses/LICENSE").decode() == LICENCE
        metadata = wheel.read(f"{stem}.dist-info/METADATA").decode()
    assert "License-Expression: MIT\n" in metadata
    assert "License-File: LICENSE\n" in metadata
    with tarfile.open(tmp_path / f"{stem}.tar.gz") as sdist:
        member = sdist.getmember(f"{stem}/LICENSE")
        assert member.isfile()
        assert sdist.extractfile(member).read().decode() == LICENCE  # type: ignore[union-attr]


def _dry_run(directory: Path, target: str) -> str:
    """What ``make TARGET`` would run in ``directory`` (``make -n``)."""
    done = subprocess.run(
        ["make", "-n", "-C", str(directory), target],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_demo_installs_the_cli_extra_and_make_test_the_rest(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make(1) is not installed")
    for directory in PROJECTS:  # what the Makefile reads: itself and the pyproject files
        target = tmp_path / directory.relative_to(ROOT)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(directory / "pyproject.toml", target)
    shutil.copy(ROOT / "Makefile", tmp_path)
    demo = _dry_run(tmp_path, "demo")
    assert "setting up .venv (once)" in demo
    assert "pip install --quiet --disable-pip-version-check -e '.[cli]'\n" in demo
    assert "[test" not in demo and "plugins/" not in demo
    # The demo's venv, set up: make test still installs the extras and the plugins.
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch(mode=0o755)
    (venv / ".installed-base").touch()
    assert "pip install" not in _dry_run(tmp_path, "demo")
    test = _dry_run(tmp_path, "test")
    assert "-e '.[cli,test,dev,docs]'" in test
    for plugin in PROJECTS[1:]:
        assert f"-e 'plugins/{plugin.name}[test]'" in test
    # ...and once it has, neither installs again.
    (venv / ".installed").touch()
    assert "pip install" not in _dry_run(tmp_path, "test") + _dry_run(tmp_path, "demo")
