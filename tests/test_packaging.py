"""Habits of a maintained project, checked: one version, requirements.txt mirrors pyproject.toml, the training
toolkit is installed, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from zimage_core import version
from zimage_core.cli import main

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_matches_pyproject_dependencies():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line and not line.startswith("#")]
    deps = pyproject()["project"]["dependencies"]
    norm = [re.sub(r"\s+", "", d).replace("'", '"') for d in deps]
    assert [re.sub(r"\s+", "", r) for r in reqs] == norm
    assert not any(re.match(r"torch\b", r) for r in reqs + deps)  # never replace the user's CUDA build


def test_version_is_written_once(capsys):
    assert version() == pyproject()["project"]["version"]
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"zimage {version()}"
    assert "__version__" not in (ROOT / "zimage_core" / "__init__.py").read_text()


def test_train_runs_from_any_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "train.run", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "python -m train.run" in out.stdout
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "train" in find and "zimage_core" in find


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2  # the main job, then the tests
    test_cmd = commands[1]
    assert "pytest" in test_cmd and "torch==" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert f"run: {test_cmd}" in workflow
    for py in ("3.10", "3.11", "3.12"):
        assert f'"{py}"' in workflow
    assert "ruff format --check" in (ROOT / ".ci" / "run").read_text() and "ruff format --check" in workflow
