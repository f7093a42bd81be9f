"""The package as a user installs it: into a clean venv, from pyproject.toml alone, every module importable.

An import that works in the development venv only because some other package pulled its
dependency in (``braceexpand`` once came in through webdataset) fails here. The clean venv gets
sept built from a copy of the tracked tree (``pip install --no-deps``) and, of the development
venv's packages, exactly the closure of pyproject's dependencies (each package's own
requirements followed, markers evaluated, as pip resolves them), linked rather than unpacked
again: torch's 6 GB install would cost two minutes, and `make install` already resolved these
versions from the registry. ``pip check`` then confirms the closure satisfies every requirement."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata

import pytest
from conftest import REPO


def sept_modules() -> list[str]:
    """Every module of the installed-from-source package, by its import name."""
    import sept

    return sorted(m.name for m in pkgutil.walk_packages(sept.__path__, prefix="sept."))


def dependency_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions pip would install for ``requirements``, following each one's own
    requirements (with the extras asked of it) and skipping those whose markers do not apply."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, metadata.Distribution] = {}
    extras_of: dict[str, set[str]] = {}
    todo = [(Requirement(r), frozenset({""})) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        name = canonicalize_name(req.name)
        wanted = set(req.extras) | {""}
        if name in found and wanted <= extras_of[name]:
            continue
        dist = found.get(name) or metadata.distribution(req.name)
        found[name] = dist
        extras_of.setdefault(name, set()).update(wanted)
        todo.extend((Requirement(r), frozenset(extras_of[name])) for r in dist.requires or [])
    return list(found.values())


def link_distributions(dists: list[metadata.Distribution], site: str) -> None:
    """Make each distribution importable in ``site`` by linking its top-level files and folders."""
    for dist in dists:
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            source = os.path.join(str(dist.locate_file("")), top)
            target = os.path.join(site, top)
            if os.path.exists(source) and not os.path.lexists(target) and not top.endswith(".pth"):
                os.symlink(source, target)


@pytest.mark.timeout(1200)
def test_clean_venv_from_pyproject_imports_every_module(tmp_path):
    # Only what pyproject.toml and the sources say goes into the build: a copy of the tracked tree.
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.exists(os.path.join(REPO, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    dists = dependency_closure(requirements)
    assert sysconfig.get_paths()["purelib"] != site
    link_distributions(dists, site)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    try:
        proc = subprocess.run(
            [*pip, "install", "-q", "--no-deps", str(src)], capture_output=True, text=True, timeout=1100
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        modules = sept_modules()  # the extras (timm) are imported inside functions, never at module level
        script = (
            "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(len(sys.argv) - 1)"
        )
        proc = subprocess.run(
            [str(venv / "bin" / "python"), "-c", script, *modules],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert int(proc.stdout.strip()) == len(modules) > 40
        # The installed package is the copy, not the development checkout.
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sept; print(sept.__file__)"],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            check=True,
        ).stdout
        assert str(venv) in where
    finally:
        shutil.rmtree(venv, ignore_errors=True)
