"""The package as a user installs it: into a clean venv, from pyproject.toml alone, every module importable.

An import that works in the development venv only because some other package pulled its
dependency in (``braceexpand`` once came in through webdataset) fails here."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def sept_modules() -> list[str]:
    """Every module of the installed-from-source package, by its import name."""
    import sept

    return sorted(m.name for m in pkgutil.walk_packages(sept.__path__, prefix="sept."))


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
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    try:
        proc = subprocess.run([*pip, str(src)], capture_output=True, text=True, timeout=1100)
        assert proc.returncode == 0, proc.stderr[-3000:]
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
        shutil.rmtree(venv, ignore_errors=True)  # about 6 GB with torch's CUDA libraries
